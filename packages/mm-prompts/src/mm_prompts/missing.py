"""Missing cases as bitmasks over modalities, and missing-modality simulation for any model.

A *case* is an integer bitmask over the modalities in a fixed order: bit ``i`` set means
modality ``i`` is **present**. With ``M`` modalities there are ``2^M − 1`` valid cases (at least
one modality present); ``2^M − 1`` itself is the complete case. For ``M = 3`` in the order
``(text, audio, vision)`` the released code numbers the cases differently (``k`` = 0…6, see
:data:`REFERENCE_CASES`); :func:`reference_case_to_mask` converts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmcore import ModalityBatch, require_modality_batch

__all__ = [
    "REFERENCE_CASES",
    "all_cases",
    "apply_case",
    "case_from_presence",
    "case_name",
    "presence_from_case",
    "reference_case_to_mask",
    "simulate_missing",
]

#: The released code's case index ``k`` → missing modalities, for (text, audio, vision).
REFERENCE_CASES = {
    0: ("text",),
    1: ("audio",),
    2: ("vision",),
    3: ("text", "audio"),
    4: ("text", "vision"),
    5: ("audio", "vision"),
    6: (),
}


def all_cases(num_modalities: int, *, include_complete: bool = True) -> list[int]:
    """Every valid case bitmask (at least one modality present), in increasing order."""
    if num_modalities < 1:
        raise ValueError(f"need at least one modality, got {num_modalities}.")
    full = (1 << num_modalities) - 1
    return [c for c in range(1, full + 1) if include_complete or c != full]


def presence_from_case(cases: Tensor | int, num_modalities: int) -> Tensor:
    """Bool ``[B, M]`` presence (``True`` = present) of case bitmasks ``[B]`` (or one int)."""
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, int):
        raise TypeError(
            f"num_modalities must be an int (len(modalities)), got {type(num_modalities).__name__}."
        )
    cases = torch.as_tensor(cases).reshape(-1)
    if cases.dtype == torch.bool or cases.is_floating_point() or cases.is_complex():
        raise ValueError(
            f"missing cases must be integer bitmasks (e.g. torch.long), got {cases.dtype}; "
            "for a bool presence matrix [B, M] use case_from_presence."
        )
    full = (1 << num_modalities) - 1
    if ((cases < 1) | (cases > full)).any():
        bad = cases[(cases < 1) | (cases > full)].tolist()
        raise ValueError(
            f"invalid missing cases {bad}: with {num_modalities} modalities a case is a bitmask "
            f"in 1..{full} (0 would mean every modality missing)."
        )
    bits = torch.arange(num_modalities, device=cases.device)
    return (cases[:, None] >> bits) & 1 == 1


def case_from_presence(
    presence: Tensor | ModalityBatch, modalities: Sequence[str] | None = None
) -> Tensor:
    """Case bitmasks ``[B]`` of a bool presence matrix ``[B, M]``, or of a batch's samples.

    For a :class:`~mmcore.ModalityBatch`, bit ``i`` is ``modalities[i]`` (default: the batch's
    own order; pass ``model.modalities`` for a model's cases), present where the batch's
    presence mask says so; a modality the batch lacks is missing from every sample.
    """
    if isinstance(presence, ModalityBatch):
        order = list(presence.modalities if modalities is None else modalities)
        presence = torch.stack(
            [
                presence.is_present(m)
                if m in presence
                else torch.zeros(presence.batch_size, dtype=torch.bool, device=presence.device)
                for m in order
            ],
            dim=1,
        )
    elif modalities is not None:
        raise TypeError("modalities= goes with a ModalityBatch, not a presence matrix.")
    if not isinstance(presence, Tensor):
        raise TypeError(
            "case_from_presence takes a bool presence matrix [B, M] or a ModalityBatch, got "
            f"{type(presence).__name__}."
        )
    if presence.dtype != torch.bool or presence.ndim != 2:
        raise ValueError(
            f"presence must be a bool [B, M] tensor, got {presence.dtype} {tuple(presence.shape)}."
        )
    if (~presence).all(dim=1).any():
        rows = torch.nonzero((~presence).all(dim=1)).reshape(-1).tolist()
        raise ValueError(
            f"samples {rows} have every modality missing; at least one must be present."
        )
    weights = 1 << torch.arange(presence.shape[1], device=presence.device)
    return (presence.long() * weights).sum(dim=1)


def case_name(case: int, modalities: Sequence[str]) -> str:
    """``"{text, audio}"``: the present modalities of ``case``."""
    present = presence_from_case(case, len(modalities))[0]
    return "{" + ", ".join(m for m, p in zip(modalities, present.tolist(), strict=True) if p) + "}"


def reference_case_to_mask(k: int, modalities: Sequence[str] = ("text", "audio", "vision")) -> int:
    """The bitmask of the released code's case ``k`` (0…6)."""
    if k not in REFERENCE_CASES:
        raise ValueError(f"reference cases are 0..6, got {k}.")
    return sum(1 << i for i, m in enumerate(modalities) if m not in REFERENCE_CASES[k])


def apply_case(
    batch: ModalityBatch, cases: Tensor | int, *, fill: float | None = 0.0
) -> ModalityBatch:
    """Mark modalities missing per sample according to case bitmasks (order: ``batch.modalities``).

    A modality already missing in ``batch`` stays missing; a sample left with no modality
    present is an error. ``fill`` is written into the dropped features (``None`` keeps them;
    models that read the presence masks ignore them either way).
    """
    batch = require_modality_batch(batch, "apply_case")
    cases = torch.as_tensor(cases)
    if cases.ndim == 0:
        cases = cases.expand(batch.batch_size)
    if cases.shape != (batch.batch_size,):
        raise ValueError(f"cases: expected shape ({batch.batch_size},), got {tuple(cases.shape)}.")
    presence = presence_from_case(cases, len(batch.modalities)).to(batch.device)
    empty = ~(presence & _presence(batch)).any(dim=1)
    if empty.any():
        rows = torch.nonzero(empty).reshape(-1).tolist()
        raise ValueError(
            f"apply_case: samples {rows[:10]} would have no modality present (the case keeps "
            "only modalities these samples already lack)."
        )
    for i, m in enumerate(batch.modalities):
        if not presence[:, i].all():
            batch = batch.with_missing(m, ~presence[:, i], fill=fill)
    return batch


def simulate_missing(
    batch: ModalityBatch,
    rate: float,
    *,
    generator: torch.Generator | None = None,
    fill: float | None = 0.0,
) -> tuple[ModalityBatch, Tensor]:
    """With probability ``rate`` a sample gets an incomplete case drawn uniformly, else complete.

    This is the released protocol (``drop_rate``): at ``rate = 0.7`` with three modalities every
    incomplete case has probability 0.7 / 6. A sample that already lacks modalities gets, with
    probability ``rate``, one of the non-empty proper subsets of the modalities it has, drawn
    uniformly (none when it has one). Returns the batch with presence masks set and each
    sample's case ``[B]``: the modalities present in the returned batch.
    """
    batch = require_modality_batch(batch, "simulate_missing")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}.")
    m = len(batch.modalities)
    if m < 2:
        raise ValueError("simulating missing modalities needs >= 2 modalities.")
    b, full = batch.batch_size, (1 << m) - 1
    present = case_from_presence(_presence(batch).cpu())
    drop = torch.rand(b, generator=generator) < rate
    if bool((present == full).all()):
        incomplete = torch.tensor(all_cases(m, include_complete=False))
        pick = incomplete[torch.randint(len(incomplete), (b,), generator=generator)]
    else:
        pick = _proper_subsets(present, m, generator)
    cases = torch.where(drop, pick, present)
    return apply_case(batch, cases, fill=fill), cases


def _presence(batch: ModalityBatch) -> Tensor:
    """Bool ``[B, M]``: which modalities each sample of ``batch`` has."""
    return torch.stack([batch.is_present(m) for m in batch.modalities], dim=1)


def _proper_subsets(cases: Tensor, m: int, generator: torch.Generator | None) -> Tensor:
    """Per sample, a non-empty proper subset of ``cases`` ``[B]`` drawn uniformly.

    A single-modality case has none and is returned as it is.
    """
    candidates = torch.arange(1, 1 << m)  # [C]
    inside = (candidates[None] & ~cases[:, None]) == 0
    valid = inside & (candidates[None] != cases[:, None])  # [B, C]
    count = valid.sum(dim=1)
    u = torch.rand(len(cases), generator=generator)
    k = (u * count).long().clamp_max((count - 1).clamp_min(0))  # the k-th valid candidate
    position = (valid.cumsum(dim=1) == (k + 1)[:, None]) & valid
    chosen = candidates[position.long().argmax(dim=1)]
    return torch.where(count > 0, chosen, cases)
