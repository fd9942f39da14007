"""Configuration of CASP test-time adaptation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CASPConfig"]

_CHOICES = {
    "task": ("regression", "classification", "multilabel"),
    "keep": ("most_stable", "least_stable"),
    "select_by": ("last", "target_validation"),
    "trainable": ("norm", "all"),
}


@dataclass
class CASPConfig:
    """Hyper-parameters of CASP (Guo et al., AAAI 2025, arXiv 2412.07121).

    Args:
        task: ``"regression"`` (pseudo-labels are mean predictions, L1 in stage 2),
            ``"classification"`` (pseudo-labels are mean probabilities, soft cross-entropy) or
            ``"multilabel"`` (``K`` independent yes/no labels, one logit each: pseudo-labels
            are mean sigmoid probabilities ``[N, K]``, binary cross-entropy in stage 2).
        num_outputs: regressed values per sample (``task="regression"``): 1 for a model that
            returns ``[N]`` or ``[N, 1]``, ``K`` for ``[N, K]`` (valence and arousal, say; a
            sample's stability is then its mean change over the ``K`` values). Declared, so that
            class logits under the default task stay an error rather than pass for ``K`` scores.
            Under ``task="multilabel"``, the number of labels ``K``.
        tau: NT-Xent temperature.
        epochs_ca: stage-1 (contrastive adaptation) epochs over the unlabeled target data.
        snapshot_every: a prediction snapshot of all target samples every this many epochs (and
            one before adapting, from the source model).
        keep_ratio: fraction of samples kept as pseudo-labelled in stage 2.
        keep: ``"most_stable"`` (default, the method's intent) or ``"least_stable"`` (the released
            code's inverted quantile rule, kept only to reproduce it).
        epochs_pl: stage-2 (pseudo-label training) epochs.
        lr: Adam learning rate of both stages.
        clip: gradient-norm clipping (``None``: off).
        batch_size: mini-batch size of both stages (>= 2: NT-Xent's negatives are the other
            samples of a batch).
        trainable: ``"norm"`` (affine parameters of LayerNorm / RMSNorm / BatchNorm / GroupNorm /
            InstanceNorm layers, and of library norms such as ``transformers``' ``LlamaRMSNorm``
            or ``T5LayerNorm``: :func:`casp.is_norm_layer`) or ``"all"``.
        select_by: ``"last"`` (default: the last epoch of each stage; no target label is read)
            or ``"target_validation"`` (the released code: the epoch with the best accuracy on
            labelled target validation data — label leakage, only for comparison).
        collapse_threshold: stage 1 stops, rolls back to the last healthy weights and reports,
            when the mean per-feature variance of the (normalised) representation over a batch
            falls below this.
        seed: seed of the per-batch modality draw and the shuffling.
    """

    task: Literal["regression", "classification", "multilabel"] = "regression"
    num_outputs: int = 1
    tau: float = 0.5
    epochs_ca: int = 15
    snapshot_every: int = 3
    keep_ratio: float = 0.05
    keep: Literal["most_stable", "least_stable"] = "most_stable"
    epochs_pl: int = 5
    lr: float = 1e-3
    clip: float | None = 0.8
    batch_size: int = 24
    trainable: Literal["norm", "all"] = "norm"
    select_by: Literal["last", "target_validation"] = "last"
    collapse_threshold: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if not _is_int(self.num_outputs) or self.num_outputs < 1:
            raise ValueError(f"num_outputs must be a positive integer, got {self.num_outputs!r}.")
        if self.task == "classification" and self.num_outputs != 1:
            raise ValueError(
                "num_outputs is the number of regressed values (task='regression') or of labels "
                "(task='multilabel'); task='classification' reads the classes from the model's "
                "logits."
            )
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}.")
        for name in ("epochs_ca", "snapshot_every", "batch_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.batch_size < 2:
            raise ValueError(
                "batch_size must be >= 2: NT-Xent takes each sample's negatives from the other "
                "samples of its batch, so one-sample batches would never update the model."
            )
        if not _is_int(self.epochs_pl) or self.epochs_pl < 0:
            raise ValueError(f"epochs_pl must be an integer >= 0, got {self.epochs_pl!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}.")
        if self.snapshot_every > self.epochs_ca:
            raise ValueError(
                f"snapshot_every={self.snapshot_every} > epochs_ca={self.epochs_ca}: stage 1 would "
                "take no snapshot after the source model's, so no stability can be measured."
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(
                f"clip must be > 0 or None (no clipping), got {self.clip}: a norm of 0 would "
                "zero every gradient."
            )
        if not self.collapse_threshold >= 0:
            raise ValueError(f"collapse_threshold must be >= 0, got {self.collapse_threshold}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def _is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` would pass as 1 otherwise)."""
    return isinstance(value, int) and not isinstance(value, bool)
