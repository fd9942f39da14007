"""Configuration of the Wander adapter."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mmcore import make_config

__all__ = ["WanderConfig", "resolve_config"]

CPMode = Literal["true", "reference"]
InitMode = Literal["centered", "gate", "reference"]
OutputMode = Literal["fused", "residual"]

_CHOICES = {
    "cp_mode": ("true", "reference"),
    "init": ("centered", "gate", "reference"),
    "output": ("fused", "residual"),
}
_RANK_ALIASES = {
    "bottleneck": "bottleneck_dim",
    "rank": "bottleneck_dim",
    "bottleneck_dim": "bottleneck_dim",
    "feature": "feature_rank",
    "drank": "feature_rank",
    "feature_rank": "feature_rank",
    "token": "token_rank",
    "trank": "token_rank",
    "token_rank": "token_rank",
}


@dataclass
class WanderConfig:
    """Everything that defines a Wander adapter (saved as ``adapter_config.json``).

    Paper: Guo, Cheng, Wu, Jin, "A Wander Through the Multimodal Landscape: Efficient Transfer
    Learning via Low-rank Sequence Multimodal Adapter", AAAI 2025 (arXiv 2412.08979).

    Args:
        bottleneck_dim: ``r``, width of each modality's down-projection (the paper's ``rank``).
        feature_rank: ``R_d``, number of feature-axis factors per modality (``drank``).
        token_rank: ``R_t``, number of token-axis factors per modality (``trank``).
        num_fused_tokens: ``T'``, number of fused output tokens (the paper ties it to ``r``;
            ``None`` keeps that choice).
        cp_mode: ``"true"`` sums the ``R_t · R_d`` rank-one terms *after* the cross-modal product
            (a real CP rank); ``"reference"`` sums the factor stacks *before* the product, as the
            released code does (effective CP rank 1, kept for comparison).
        init: ``"centered"`` (default): every factor random, and the adapter's output at its
            initial weights is subtracted (a frozen copy), so the wrapped model equals the base
            model at step 0 while every adapter parameter gets a non-zero gradient from the first
            backward. ``"gate"``: random factors and a zero-initialised per-channel output gate
            (cheaper; only the gate moves on the first step). ``"reference"``: the released
            code's init, all token factors zero, which makes every adapter gradient exactly zero
            for any number of modalities >= 2 (the adapter never trains; kept to show it).
        output: ``"fused"`` adds the fused tokens to the output of the module that consumes the
            encoders (the paper: fused tokens reach the head); ``"residual"`` adds a
            shape-preserving per-modality residual to each encoder output, so an adapter can sit
            after every layer of a large model.
        fused_dim: feature size ``D`` of the fused tokens. ``"residual"`` mode: ``None`` means
            ``bottleneck_dim``. ``"fused"`` mode: ``None`` means the fusion module's output size;
            a divisor of it tiles the fused tokens to that size, as the paper does for a
            late-fusion head reading ``M`` concatenated ``D``-sized features (the feature factors
            then hold ``D`` instead of ``M·D`` columns).
        bias_augment: append a constant 1 to each modality's bottleneck features (the TFN/LMF
            trick), so lower-order interactions are representable, not only M-th order ones.
            With it, the random inits (``"centered"``, ``"gate"``) start every modality's
            projection at ``Z_m = 1 + ε_m`` (constant channel mapped to 1, token factors
            spread evenly over the positions, the rest scaled by ``interaction_init``): the product
            over modalities then starts near its first-order expansion ``1 + Σ_m ε_m``, so each
            modality's gradient is not multiplied by the other modalities' random projections,
            and higher-order terms are learned as the data asks for them.
        interaction_init: with ``bias_augment``, the size of ``ε_m`` at init relative to the
            constant 1 (standard deviation for unit-variance inputs).
        normalize_inputs: parameter-free layer norm on each encoder output before the
            down-projection, so the product over modalities is scale-free.
        dropout: dropout on the adapter's output (after centering, so ``init="centered"`` stays
            an exact identity at step 0 in training mode too).
        output_scale: constant multiplying the adapter's output (as LoRA's ``alpha / r``): with
            Adam, it sets how fast the output moves away from the base model's. 0.1 by default:
            at 1.0 the centred init moved the fused representation too fast in our benchmarks.
        stack_parameters: hold each kind of per-modality parameter (down-projections, token
            and feature factors, residual up-projections) as one ``[M, ...]`` tensor where every
            modality's has the same shape: a few tensors for the optimiser instead of a few per
            modality, and no stacking on each call. ``False`` keeps one tensor per modality
            (e.g. for a learning rate per modality). Results are the same either way, and so is
            the state dict: one entry per modality (``down.<m>.weight``, ``token_factors.<m>``,
            ...), so a checkpoint loads into both layouts.
        target_modules: modality → dotted path of the module whose output is that modality's
            sequence. ``None``: the mmcore contract, ``encoders.<modality>``.
        fusion_module: dotted path of the module that consumes the encoder outputs. ``None``:
            ``"fusion"`` (mmcore contract).
        modules_to_save: base-model modules that stay trainable and are saved with the adapter.
            ``None``: ``["head"]`` when the model has a ``head``, else none.
        hidden_dims: modality → feature size ``D_m`` (filled from the example input).
        seq_lens: modality → maximum sequence length ``T_m`` (filled from the example input).
        out_dim: fused output size in ``"fused"`` mode (filled from the example input).
    """

    bottleneck_dim: int = 16
    feature_rank: int = 8
    token_rank: int = 12
    num_fused_tokens: int | None = None
    cp_mode: CPMode = "true"
    init: InitMode = "centered"
    output: OutputMode = "fused"
    fused_dim: int | None = None
    bias_augment: bool = False
    interaction_init: float = 0.3
    normalize_inputs: bool = True
    dropout: float = 0.0
    output_scale: float = 0.1
    stack_parameters: bool = True
    target_modules: dict[str, str] | None = None
    fusion_module: str | None = None
    modules_to_save: list[str] | None = None
    hidden_dims: dict[str, int] = field(default_factory=dict)
    seq_lens: dict[str, int] = field(default_factory=dict)
    out_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("bottleneck_dim", "feature_rank", "token_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("num_fused_tokens", "fused_dim", "out_dim"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if not isinstance(self.stack_parameters, bool):
            raise ValueError(
                f"stack_parameters must be True or False, got {self.stack_parameters!r}."
            )
        if not self.interaction_init >= 0:
            raise ValueError(f"interaction_init must be >= 0, got {self.interaction_init}.")
        if not self.output_scale > 0:
            raise ValueError(f"output_scale must be > 0, got {self.output_scale}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.target_modules is not None:
            if not isinstance(self.target_modules, Mapping) or len(self.target_modules) < 2:
                raise ValueError(
                    "target_modules must map at least 2 modality names to module paths, "
                    f"got {self.target_modules!r}."
                )
            self.target_modules = dict(self.target_modules)
        if isinstance(self.modules_to_save, str):  # one name, not its characters
            self.modules_to_save = [self.modules_to_save]
        elif self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def fused_tokens(self) -> int:
        """``T'``: ``num_fused_tokens``, or ``bottleneck_dim`` as in the paper."""
        return self.num_fused_tokens or self.bottleneck_dim

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WanderConfig:
        """Build from a dict; unknown keys (from a newer version) are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"WanderConfig: ignoring unknown keys {unknown} (saved by a newer version?).",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_config(
    ranks: WanderConfig | Mapping[str, int] | Sequence[int] | None, **overrides: Any
) -> WanderConfig:
    """A :class:`WanderConfig` from ``ranks`` plus keyword overrides.

    ``ranks`` is a config, a mapping with the three ranks (``bottleneck``/``rank``,
    ``feature``/``drank``, ``token``/``trank``, or the field names), or a sequence
    ``(bottleneck_dim, feature_rank, token_rank)``.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(ranks, WanderConfig):
        return dataclasses.replace(ranks, **overrides) if overrides else ranks
    values: dict[str, Any] = {}
    if isinstance(ranks, Mapping):
        for key, value in ranks.items():
            if key not in _RANK_ALIASES:
                raise ValueError(
                    f"unknown rank name {key!r}; use bottleneck/rank, feature/drank, token/trank."
                )
            values[_RANK_ALIASES[key]] = value
    elif ranks is not None:
        if isinstance(ranks, str) or not isinstance(ranks, Sequence):
            raise TypeError(
                "ranks must be a WanderConfig, a mapping such as {'bottleneck': 16, 'feature': 8, "
                "'token': 12} or a sequence (bottleneck_dim, feature_rank, token_rank); got "
                f"{type(ranks).__name__} {ranks!r}."
            )
        ranks = list(ranks)
        if len(ranks) != 3:
            raise ValueError(
                "ranks as a sequence must be (bottleneck_dim, feature_rank, token_rank), "
                f"got {ranks}."
            )
        values = dict(zip(("bottleneck_dim", "feature_rank", "token_rank"), ranks, strict=True))
    return make_config(WanderConfig, "Wander", **values, **overrides)
