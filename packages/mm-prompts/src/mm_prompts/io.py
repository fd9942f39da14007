"""``config.json`` + ``model.safetensors`` folders: a state dict, never a pickled module."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from mmcore import atomic_write, read_json, save_directory

__all__ = ["read_pretrained", "saved_dtype", "write_pretrained"]

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def write_pretrained(
    directory: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any],
    caller: str,
) -> None:
    """Write ``state_dict`` and ``config`` to ``directory`` (created), each file atomically."""
    directory = save_directory(directory, caller)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_write(directory / WEIGHTS, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata={"format": "pt", "library": "mm_prompts"}))
    with atomic_write(directory / CONFIG) as f:
        json.dump(config, f, indent=2)


def read_pretrained(
    directory: str | os.PathLike[str], caller: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, state_dict)`` from a folder :func:`write_pretrained` wrote (on the CPU)."""
    directory = Path(directory)
    config = read_json(directory / CONFIG, caller)
    if not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{caller}: {directory / WEIGHTS} not found.")
    try:
        return config, load_file(str(directory / WEIGHTS))
    except SafetensorError as err:
        raise ValueError(f"{caller}: cannot read {directory / WEIGHTS}: {err}") from None


def saved_dtype(
    state_dict: Mapping[str, Tensor], dtype: torch.dtype | None, caller: str
) -> torch.dtype:
    """The dtype to load ``state_dict`` in.

    ``dtype`` itself, or where it is ``None`` the floating dtype the weights were saved in (the
    most elements' where they differ; float32 for a state with no floating tensor).
    """
    if dtype is not None:
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"{caller}: dtype must be a floating torch.dtype or None, got {dtype!r}."
            )
        return dtype
    counts: dict[torch.dtype, int] = {}
    for v in state_dict.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32
