"""Reading predictions from a model's output, as each task takes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "class_logits",
    "describe_kind",
    "label_logits",
    "model_predictions",
    "regression_scores",
]


def model_predictions(out: Any) -> Tensor:
    """The model's predictions: its output, or its ``logits`` field.

    A ``transformers`` output or a dict carries them as ``logits``; anything else is an error.
    """
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"CASP reads the model's predictions from its output, which must be a Tensor (class "
        f"logits [N, C], or scores [N] / [N, 1]) or carry one as `logits` (a transformers "
        f"output or a dict); got {type(out).__name__}. Wrap the model so that its forward "
        "returns the predictions."
    )


def describe_kind(value: Any) -> str:
    """``value``'s type, and for a tuple or list the types of its items."""
    if isinstance(value, tuple | list):
        return f"a {type(value).__name__} of ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def class_logits(out: Tensor) -> Tensor:
    """Class logits ``[N, C]``; a single-logit binary model's ``[N]`` or ``[N, 1]`` as ``[0, z]``.

    The softmax of ``[0, z]`` is ``(1 − σ(z), σ(z))``: the probabilities of the sigmoid model,
    so its pseudo-labels and soft cross-entropy are those of binary cross-entropy.
    """
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        z = out.reshape(-1, 1)
        return torch.cat([torch.zeros_like(z), z], dim=1)
    if out.ndim != 2:
        raise ValueError(
            f"CASP task='classification' needs class logits [N, C] (or one binary logit [N] / "
            f"[N, 1]), but the model outputs {tuple(out.shape)}."
        )
    return out


def label_logits(out: Tensor, num_labels: int) -> Tensor:
    """A multi-label model's logits ``[N, K]`` (one label: ``[N]`` too).

    Any other shape is an error.
    """
    if num_labels == 1 and out.ndim == 1:
        return out.reshape(-1, 1)
    if out.ndim == 2 and out.shape[1] == num_labels:
        return out
    raise ValueError(
        f"CASP task='multilabel' with num_outputs={num_labels} needs one logit per label, "
        f"[N, {num_labels}], but the model outputs {tuple(out.shape)}."
    )


def regression_scores(out: Tensor, num_outputs: int = 1) -> Tensor:
    """A regression model's output: ``[N]`` or ``[N, 1]`` as ``[N]``, or ``[N, K]`` as it is.

    Any other shape (class logits under the default task, say) is an error.
    """
    if num_outputs == 1 and (out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1)):
        return out.reshape(-1)
    if num_outputs > 1 and out.ndim == 2 and out.shape[1] == num_outputs:
        return out
    expected = "one score per sample ([N] or [N, 1])" if num_outputs == 1 else f"[N, {num_outputs}]"
    raise ValueError(
        f"CASP task='regression' with num_outputs={num_outputs} needs {expected}, but the model "
        f"outputs {tuple(out.shape)}; for class logits use task='classification', for K "
        "regressed values num_outputs=K."
    )
