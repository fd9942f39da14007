"""Configuration of the CGGM modulator."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CGGMConfig"]

Task = Literal["classification", "regression", "segmentation", "multilabel"]
Mode = Literal["default", "reference"]
Direction = Literal["weights", "gradients"]

_CHOICES = {
    "task": ("classification", "regression", "segmentation", "multilabel"),
    "mode": ("default", "reference"),
    "regression_score": ("sign", "neg_mae"),
    "direction": ("weights", "gradients"),
}


@dataclass
class CGGMConfig:
    """Hyper-parameters of classifier-guided gradient modulation.

    Paper: Guo, Jin, Chen, Zhao, "Classifier-guided Gradient Modulation for Enhanced Multimodal
    Learning", NeurIPS 2024 (arXiv 2411.01409).

    Args:
        task: ``"classification"`` (accuracy), ``"regression"`` (``regression_score``),
            ``"segmentation"`` (mean foreground Dice) or ``"multilabel"`` (several independent
            yes/no labels per sample, one logit each, trained with
            ``binary_cross_entropy_with_logits``; label accuracy: the share of a sample's labels
            whose logit sign is right) — the score each modality's classifier is judged by.
        num_outputs: classes (classification, segmentation), or 1 for a binary model with one
            logit per sample (or pixel) trained with ``binary_cross_entropy_with_logits``;
            the number of regressed values for regression (1, or e.g. 2 for valence and
            arousal); the number of labels for multilabel (e.g. CMU-MOSEI's 6 emotions).
        rho: ``ρ``, the magnitude of the gradient scaling ``ρ · B_m``; ``None`` turns the
            magnitude modulation off (direction term only).
        lam: ``λ``, the weight of the direction term ``L_gm`` (0 turns it off).
        cls_lr: learning rate of the classifiers' own Adam optimiser.
        cls_weight_decay: its weight decay.
        mode: ``"default"`` follows the paper with a user's safeguards; ``"reference"``
            reproduces the released code (see the package README for every difference).
        smoothing: default mode only: EMA factor of the per-batch scores before improvements are
            taken (0 = none, the paper's per-batch scores). At small batches (e.g. 32) a
            per-batch improvement is mostly sampling noise and ``B`` swings from step to step;
            0.8 made the lagging modality's larger share show on every seed of a planted test
            (see the package README).
        regression_score: ``"sign"`` (binary sign accuracy, the released code's choice) or
            ``"neg_mae"`` (minus the mean absolute error).
        eps: default mode: added to each improvement once a negative one is shifted to 0
            (:func:`cggm.magnitude_coefficients`); it keeps ``B`` finite and in ``[0, 1)``.
        classifier_hidden: hidden units of the default classifiers. ``None``: the width ``F``
            of the head's input, so the classifiers' final weights have the head's shape, as
            the direction term needs. Their cost is ``d · F`` multiply-adds per sample and
            modality (``F = M · d`` for concatenation fusion), about the model's own cost at
            large widths. A smaller width makes them cheaper; it needs ``lam=0``.
        direction: what the direction term's cosine compares. ``"weights"``: each classifier's
            final weight with the head's (the proxy the released code uses and the author
            confirmed). ``"gradients"`` (default mode only): as the paper writes it, the
            gradient of the task loss w.r.t. the head's final weight (pass the loss:
            ``cggm.direction_loss(loss)``; differentiated, so the term reaches the encoders)
            with each classifier's final-weight gradient of its last step.
        ignore_index: classification, segmentation and multilabel: the target value of samples,
            pixels or labels that carry no label (``-100`` as ``F.cross_entropy``'s default,
            ``255`` in many segmentation data sets, say ``-1`` for an unannotated label). They
            neither train nor score any classifier: each classifier's loss is
            ``F.cross_entropy(..., ignore_index=)``'s, the mean over the labelled samples
            (pixels, labels); accuracy, Dice and label accuracy count those only, and a sample
            with none is left out of the scores. ``None``: every target must be a label.
    """

    task: Task = "classification"
    num_outputs: int = 2
    rho: float | None = 1.3
    lam: float = 0.2
    cls_lr: float = 5e-4
    cls_weight_decay: float = 0.0
    mode: Mode = "default"
    smoothing: float = 0.0
    regression_score: Literal["sign", "neg_mae"] = "sign"
    eps: float = 1e-3
    classifier_hidden: int | None = None
    direction: Direction = "weights"
    ignore_index: int | None = None

    @property
    def binary(self) -> bool:
        """One logit per sample (or pixel) for two classes: the classifiers use BCE."""
        return self.task in ("classification", "segmentation") and self.num_outputs == 1

    @property
    def class_indices(self) -> bool:
        """Targets are class indices (classification, segmentation)."""
        return self.task in ("classification", "segmentation")

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if not _is_int(self.num_outputs) or self.num_outputs < 1:
            raise ValueError(f"num_outputs must be a positive integer, got {self.num_outputs!r}.")
        if self.rho is not None and not self.rho > 0:
            raise ValueError(f"rho must be > 0 or None, got {self.rho}.")
        if not self.lam >= 0:  # NaN fails too
            raise ValueError(f"lam must be >= 0, got {self.lam}.")
        if not self.cls_lr > 0:
            raise ValueError(f"cls_lr must be > 0, got {self.cls_lr}.")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}.")
        if self.mode == "reference" and self.smoothing:
            raise ValueError("smoothing is a default-mode safeguard; mode='reference' has none.")
        if self.mode == "reference" and self.direction != "weights":
            raise ValueError(
                "direction='gradients' is a default-mode option; mode='reference' compares "
                "weights, as the released code does."
            )
        if self.classifier_hidden is not None and (
            not _is_int(self.classifier_hidden) or self.classifier_hidden < 1
        ):
            raise ValueError(
                f"classifier_hidden must be a positive integer or None, got "
                f"{self.classifier_hidden!r}."
            )
        if self.ignore_index is not None:
            if not _is_int(self.ignore_index):
                raise ValueError(
                    f"ignore_index must be an integer or None, got {self.ignore_index!r}."
                )
            if self.task == "regression":
                raise ValueError(
                    "ignore_index marks unlabelled class targets or labels; task='regression' "
                    "has neither (leave it None)."
                )
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


def _is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` would pass as 1 otherwise)."""
    return isinstance(value, int) and not isinstance(value, bool)
