"""Small shared utilities: seeding, safe file writes and reads, sinusoidal positions, dtypes."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import IO, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "atomic_write",
    "collective_device",
    "fused_optimizer",
    "is_compiling",
    "make_config",
    "read_json",
    "save_directory",
    "seed_everything",
    "sinusoidal_positions",
    "stacklevel_outside",
    "trainable_dtype",
]


_Config = TypeVar("_Config")


def make_config(cls: type[_Config], caller: str, **kwargs: Any) -> _Config:
    """``cls(**kwargs)`` for a config dataclass, naming the closest field for an unknown name.

    ``caller`` is what the user called (e.g. ``"CASP"``): a keyword misspelt there would
    otherwise surface as ``cls.__init__() got an unexpected keyword argument``.
    """
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"{caller}: unknown option {', '.join(hints)}; {cls.__name__} has the fields "
            f"{', '.join(fields)}."
        )
    return cls(**kwargs)


def collective_device() -> torch.device:
    """Where the default process group's collectives take their tensors.

    The CPU when its backend serves CPU tensors (gloo, mpi, ucc, or a pair such as
    ``"cpu:gloo,cuda:nccl"``); for NCCL alone, the current CUDA device (NCCL has no CPU
    tensors: a metric's CPU buffers, all-gathered as they are, would fail there).
    """
    backend = str(dist.get_backend()).lower()
    if any(name in backend for name in ("gloo", "mpi", "ucc")):
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a ``torch.Generator`` seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", **open_kwargs: Any
) -> Iterator[IO[Any]]:
    """Write ``path`` atomically: to a temporary file beside it, renamed over it on success.

    A crash inside the block leaves any previous version of ``path`` intact.

    Example:
        >>> with atomic_write("results.json") as f:  # doctest: +SKIP
        ...     json.dump(results, f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', found {mode!r}.")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def modes_kept(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside: switch ``model`` to train or eval mode freely; on exit each module's mode is back.

    ``model.train(was_training)`` would set every submodule alike, losing one the owner keeps in
    eval mode on purpose (a frozen BatchNorm in a pretrained backbone).
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def save_directory(path: str | os.PathLike[str], caller: str) -> Path:
    """``path`` as a folder to save into, created with its parents where missing.

    Raises:
        NotADirectoryError: ``path``, or a folder above it, is a file.
    """
    directory = Path(path)
    for folder in (directory, *directory.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(
                f"{caller}: cannot save into {directory}: {folder} is a file, not a folder."
            )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def read_json(path: str | os.PathLike[str], caller: str) -> dict[str, Any]:
    """The JSON object in ``path``; a missing, damaged or non-object file is an error naming it.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: it is not valid JSON, or holds something other than an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{caller}: {path} not found.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{caller}: {path} is not valid JSON ({err}); is it damaged?") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{caller}: {path} holds a JSON {type(data).__name__}, expected an object."
        )
    return data


def stacklevel_outside(*packages: ModuleType) -> int:
    """``stacklevel`` for a ``warnings.warn`` call that names the user's line.

    Counts the frames from the caller up to the first one outside ``packages`` and torch (whose
    module call and ``no_grad`` wrappers sit between a hook and the user's code), however deep
    the warning was raised.
    """
    roots = tuple(
        os.path.join(Path(p.__file__).parent, "") for p in (*packages, torch) if p.__file__
    )
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(roots):
        frame, level = frame.f_back, level + 1
    return level


def sinusoidal_positions(
    length: int,
    dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[length, dim]`` sinusoidal position table (Vaswani et al., 2017).

    Computed in float32 and returned in ``dtype`` (default float32): pass the dtype of the
    sequence it is added to, or a half-precision sequence is promoted to float32.
    """
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table if dtype is None else table.to(dtype)


def trainable_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype for small trained parts (adapters, auxiliary classifiers) of a model.

    The model's own dtype, except float32 for a model in a floating dtype of fewer than 32 bits
    (float16, bfloat16, the float8 formats), as PEFT's ``autocast_adapter_dtype``: small
    parameters trained in low precision lose their updates to rounding, and float8 has no
    general matrix product.
    """
    low = model_dtype.is_floating_point and torch.finfo(model_dtype).bits < 32
    return torch.float32 if low else model_dtype


def fused_optimizer(
    optimizer_cls: type[torch.optim.Optimizer], params: Iterable[Tensor], **kwargs: Any
) -> torch.optim.Optimizer:
    """``optimizer_cls(params, **kwargs)`` with one fused kernel for every parameter where it can.

    On small models the per-tensor loop of a plain optimiser step costs more than the model's
    forward pass. Fused kernels exist for floating-point parameters on CUDA and, from torch 2.4,
    on the CPU (SGD's from 2.3 on CUDA); elsewhere this falls back to the ``foreach`` kernels,
    which every device supports.

    Example:
        >>> opt = fused_optimizer(torch.optim.AdamW, model.parameters(), lr=1e-3)  # doctest: +SKIP
    """
    params = list(params)
    if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return optimizer_cls(params, fused=True, **kwargs)  # type: ignore[call-arg]
        except (RuntimeError, TypeError):  # no fused kernel in this torch for this device
            pass
    return optimizer_cls(params, foreach=True, **kwargs)  # type: ignore[call-arg]


def is_compiling() -> bool:
    """Whether the calling code is being traced by ``torch.compile`` (any torch from 2.2)."""
    return bool(_COMPILE_CHECK())


def _compile_check() -> Callable[[], bool]:
    check = getattr(torch.compiler, "is_compiling", None)  # public from torch 2.3
    if check is None:
        from torch import _dynamo

        check = _dynamo.is_compiling
    return check


# looked up once: is_compiling runs on the dropout's hot path (and dynamo traces no caches)
_COMPILE_CHECK = _compile_check()
