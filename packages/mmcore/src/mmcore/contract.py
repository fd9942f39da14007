"""The model contract: "per-modality encoders → fusion → head", and how packages find the parts.

Every method package works on a model the user already has. It finds the parts either through
:class:`MultimodalModel` (a model with ``encoders``, ``fusion`` and ``head`` attributes), or
through dotted module paths the user names (as HuggingFace PEFT's ``target_modules``), resolved
by :func:`resolve_module` with a did-you-mean error.

Encoders may be plain modules returning a tensor or HuggingFace ``transformers`` models returning
a ``ModelOutput``; :func:`run_encoder` calls either and :func:`encoder_features` unwraps the output.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any, Protocol, TypeGuard

import torch
from torch import Tensor, nn

from mmcore.batch import ModalityBatch

__all__ = [
    "ModulePathError",
    "MultimodalModel",
    "accepts_padding_mask",
    "call_padding_mask",
    "check_distinct_modules",
    "check_module_names",
    "check_multimodal_model",
    "compiled_inner",
    "encoder_features",
    "find_modality_batch",
    "held_module",
    "masked_mean",
    "modalities_not_in_batch",
    "parallel_inner",
    "resolve_module",
    "run_encoder",
]


class MultimodalModel(Protocol):
    """A model of the shape "per-modality encoders → fusion → head" (for type annotations).

    Check a model at run time with :func:`is_multimodal_model` or
    :func:`check_multimodal_model`, not ``isinstance``: from Python 3.12 ``isinstance`` looks
    protocol attributes up statically, so it never sees the submodules that ``nn.Module`` keeps
    in ``_modules``, and it would be ``False`` for every model.

    Attributes:
        encoders: ``nn.ModuleDict`` keyed by modality name; ``encoders[m]`` maps the modality's
            input to features (``[B, T, d]`` or ``[B, d]``).
        fusion: the module that consumes the encoders' outputs, called as
            ``fusion(features: dict[str, Tensor], batch)`` and returning the fused representation
            ``[B, F]``.
        head: the module mapping the fused representation to the output.

    Calling the model with a :class:`~mmcore.batch.ModalityBatch` returns the head's output.
    """

    encoders: nn.ModuleDict
    fusion: nn.Module
    head: nn.Module

    def __call__(self, batch: ModalityBatch) -> Any: ...  # noqa: D102


def is_multimodal_model(model: object) -> TypeGuard[MultimodalModel]:
    """Whether ``model`` follows the contract (see :func:`check_multimodal_model` for why not)."""
    return not _contract_problems(model)


def check_multimodal_model(model: object) -> None:
    """Raise a :class:`TypeError` naming what ``model`` lacks to follow the contract."""
    problems = _contract_problems(model)
    if problems:
        raise TypeError(
            f"{type(model).__name__} does not follow the mmcore model contract "
            "(encoders → fusion → head): "
            + "; ".join(problems)
            + ". Name the modules explicitly instead (dotted paths)."
        )


def _contract_problems(model: object) -> list[str]:
    problems = []
    if not isinstance(model, nn.Module):
        problems.append(f"it is a {type(model).__name__}, not a torch.nn.Module")
    encoders = getattr(model, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        problems.append(
            "`encoders` must be an nn.ModuleDict keyed by modality name"
            + (f" (found {type(encoders).__name__})" if encoders is not None else " (missing)")
        )
    for part in ("fusion", "head"):
        if not isinstance(getattr(model, part, None), nn.Module):
            problems.append(f"`{part}` must be an nn.Module (missing or not a module)")
    return problems


class ModulePathError(LookupError, ValueError):
    """A dotted module path names no submodule; the message lists the closest real names."""


def resolve_module(root: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``root`` at dotted ``path`` (``""`` is ``root`` itself).

    Raises:
        ModulePathError: no such submodule; the message suggests the closest existing names.
    """
    if not isinstance(path, str):
        raise TypeError(f"module path must be a string, found {type(path).__name__}.")
    try:
        return root.get_submodule(path)
    except AttributeError:
        close = closest_module_names(root, path)
        hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""
        count = sum(1 for n, _ in root.named_modules() if n)
        raise ModulePathError(
            f"{type(root).__name__} has no submodule '{path}'.{hint} "
            f"({count} submodules; list them with `[n for n, _ in model.named_modules()]`.)"
        ) from None


def closest_module_names(root: nn.Module, path: str, n: int = 5) -> list[str]:
    """Up to ``n`` submodule names of ``root`` closest to ``path`` (by spelling, else by leaf)."""
    names = [name for name, _ in root.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=n, cutoff=0.5)
    if not close:  # fall back to the names that share the last component
        leaf = path.rsplit(".", 1)[-1]
        close = [name for name in names if name.rsplit(".", 1)[-1] == leaf][:n]
    return close


def contract_encoder_paths(model: nn.Module, alternative: str) -> dict[str, str]:
    """``{modality: "encoders.<modality>"}`` for a model following the mmcore contract.

    Raises :class:`ModulePathError` naming ``alternative`` (how to point at the encoders
    explicitly) when ``model`` has no ``encoders`` ``ModuleDict``.
    """
    encoders = getattr(model, "encoders", None)
    if not isinstance(encoders, nn.ModuleDict):
        raise ModulePathError(
            f"{type(model).__name__} has no `encoders` ModuleDict (the mmcore contract); pass "
            f"{alternative}."
        )
    return {m: f"encoders.{m}" for m in encoders}


def check_distinct_modules(modules: Mapping[str, nn.Module], field: str) -> None:
    """Raise ``ValueError`` when two modalities name the same module.

    Hooks on a module shared by two modalities would see both modalities' calls and keep the
    last, so both would get one modality's features (and a modulator would scale the shared
    parameters twice): each modality needs a module of its own.
    """
    owner: dict[int, str] = {}
    for m, module in modules.items():
        first = owner.setdefault(id(module), m)
        if first != m:
            raise ValueError(
                f"{field}: modalities '{first}' and '{m}' name the same module; each modality "
                "needs its own module, called once per forward pass on that modality's input."
            )


def encoder_features(output: Any) -> Tensor:
    """The feature tensor inside an encoder's output.

    Accepts a tensor, a HuggingFace ``ModelOutput`` (or any object / mapping) with
    ``last_hidden_state``, or a tuple/list whose first element is the features.
    """
    if isinstance(output, Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, dict):
        hidden = output.get("last_hidden_state")
    if isinstance(hidden, Tensor):
        return hidden
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find features in an encoder output of type {type(output).__name__}: expected a "
        "Tensor, an output with `last_hidden_state` (transformers), or a tuple whose first item "
        "is a Tensor."
    )


def _is_transformers_model(module: nn.Module) -> bool:
    return hasattr(module, "config") and hasattr(module, "main_input_name")


def accepts_padding_mask(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward`` has a ``padding_mask`` parameter (``True`` = padding).

    The convention of every package here: such a module is called with
    ``padding_mask=...``; any other one gets its input alone.
    """
    return _accepts_padding_mask(type(module))  # type: ignore[arg-type]  # lru_cache vs Module.__hash__


@lru_cache(maxsize=256)
def _accepts_padding_mask(cls: type[nn.Module]) -> bool:
    try:
        return "padding_mask" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def run_encoder(encoder: nn.Module, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Call a modality encoder and return its features.

    * A ``transformers`` model gets ``input_ids`` (integer ``x``) or ``inputs_embeds`` (floating
      ``x``) and ``attention_mask = ~padding_mask``; its ``last_hidden_state`` is returned.
    * A module whose ``forward`` has a ``padding_mask`` parameter gets it (``True`` = padding).
    * Any other module is called as ``encoder(x)``.
    """
    if _is_transformers_model(encoder):
        key = str(encoder.main_input_name) if not x.is_floating_point() else "inputs_embeds"
        kwargs: dict[str, Tensor] = {key: x}
        if padding_mask is not None:
            kwargs["attention_mask"] = (~padding_mask).long()
        return encoder_features(encoder(**kwargs))
    if padding_mask is not None and accepts_padding_mask(encoder):
        return encoder_features(encoder(x, padding_mask=padding_mask))
    return encoder_features(encoder(x))


def compiled_inner(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper holds (``_orig_mod``); ``None`` for any other.

    Graphs a compiled model traced before a hook was added do not run that hook (dynamo does not
    re-trace for it), so the packages hook the module inside, or say why they cannot.
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def parallel_inner(model: nn.Module) -> nn.Module | None:
    """The module a ``DistributedDataParallel`` or ``DataParallel`` wrapper holds; else ``None``.

    Their forward calls that module (``.module``), so hooks on it run.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return None


def check_module_names(names: Iterable[str], caller: str) -> None:
    """Modality names that key submodules (``nn.ModuleDict``) must be valid module names.

    torch refuses a module name with a ``.`` (or an empty one), or one that is an attribute of
    ``nn.ModuleDict`` (``"type"``, ``"to"``, ``"keys"``), with a bare ``KeyError``; this says
    which modality and what to do.
    """
    names = list(names)
    bad = [n for n in names if not n or "." in n]
    if bad:
        raise ValueError(
            f"{caller}: the modality names {bad} key submodules, and a torch module name may "
            "not contain '.' (or be empty); rename them, in the batch too (e.g. "
            f"{bad[0].replace('.', '_') or 'text'!r})."
        )
    empty = nn.ModuleDict()
    taken = [n for n in names if hasattr(empty, n)]
    if taken:
        raise ValueError(
            f"{caller}: the modality names {taken} key submodules, and torch's ModuleDict has "
            f"attributes of those names; rename them, in the batch too (e.g. '{taken[0]}_')."
        )


def held_module(model: nn.Module, *, compiled: bool = True) -> nn.Module:
    """The module inside ``torch.compile`` and DDP / ``DataParallel`` wrappers, nested either way.

    ``model`` itself when it is no wrapper. ``compiled=False`` stops at a compiled wrapper
    (for code that hooks it before its first call, which dynamo then traces).
    """
    while True:
        inner = parallel_inner(model)
        if inner is None and compiled:
            inner = compiled_inner(model)
        if inner is None:
            return model
        model = inner


def modalities_not_in_batch(names: Iterable[str], batch: ModalityBatch, what: str) -> str | None:
    """A warning text when some of ``names`` are not modalities of ``batch``, else ``None``.

    Padding and presence masks are read from the batch by modality name, so a modality named
    otherwise (``"text"`` for the batch's ``"txt"``) would silently get none. ``what`` opens
    the text, e.g. ``"Wander: the adapter's"``.
    """
    unmatched = [m for m in names if m not in batch]
    if not unmatched:
        return None
    return (
        f"{what} modalities {unmatched} are not modalities of the ModalityBatch (it has "
        f"{list(batch.modalities)}). Padding and presence masks are read from the batch by "
        "modality name, so the batch's will not be applied to them; name them as the batch does."
    )


def find_modality_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ModalityBatch | None:
    """The first :class:`ModalityBatch` among a call's arguments (for forward pre-hooks)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, ModalityBatch):
            return value
    return None


def call_padding_mask(
    module: nn.Module, kwargs: Mapping[str, Any], batch_size: int
) -> Tensor | None:
    """The padding mask ``[B, T]`` (``True`` = padding) ``module`` was called with, if any.

    For forward hooks on encoders of a model whose input is not a :class:`ModalityBatch` (say
    ``model(input_ids, attention_mask)``): the mask is read from the call's keyword arguments
    in the field's conventions. A boolean ``padding_mask`` (this toolkit's),
    ``src_key_padding_mask`` or ``key_padding_mask`` (torch's transformer layers), ``True`` =
    padding; and, for a ``transformers`` model only, a 2-D ``attention_mask`` (1 = real token,
    0 = padding), a name other modules also give to attention masks that are no padding masks
    (a causal ``[T, T]`` one). Positional arguments are not read: their meaning depends on the
    module. A mask whose first axis is not ``batch_size`` (the module output's) is no
    per-sample padding mask.
    """
    if not kwargs:  # the common call, module(x): nothing to read
        return None

    def per_sample(name: str) -> Tensor | None:
        mask = kwargs.get(name)
        ok = isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[0] == batch_size
        return mask if ok else None

    for name in ("padding_mask", "src_key_padding_mask", "key_padding_mask"):
        mask = per_sample(name)
        if mask is not None and mask.dtype == torch.bool:
            return mask
    mask = per_sample("attention_mask") if _is_transformers_model(module) else None
    return None if mask is None else mask == 0


def masked_mean(features: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Mean over the time axis of ``[B, T, D]`` features, ignoring padding (``True``) positions.

    ``[B, D]`` features are returned unchanged. A sample whose every step is padding gives zeros.
    Padded steps may hold anything, ``inf`` included (they are selected out, not multiplied by 0).
    """
    if features.ndim == 2:
        return features
    if padding_mask is None:
        return features.mean(dim=1)
    padding = padding_mask.unsqueeze(-1)  # [B, T, 1]
    count = (~padding).sum(dim=1).clamp_min(1).to(features.dtype)
    return features.masked_fill(padding, 0.0).sum(dim=1) / count
