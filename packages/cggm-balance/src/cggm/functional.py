"""CGGM's maths as pure functions: scores, coefficients ``B_m`` and the direction term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "batch_score_counts",
    "direction_loss",
    "direction_loss_from_target",
    "direction_target",
    "magnitude_coefficients",
]


def batch_score_counts(
    task: str,
    pred: Tensor,
    target: Tensor,
    regression_score: str = "sign",
    *,
    stacked: bool = False,
    weights: Tensor | None = None,
    labelled: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(total, count)`` of a classifier's score on one batch, so ranks can all-reduce them.

    The score is ``total / count``: accuracy (classification; one logit per sample reads as
    class 1 where it is positive), sign accuracy (of each output, averaged) with zero labels
    negative, as the released code (regression, ``"sign"``), minus the MAE (``"neg_mae"``), the
    mean foreground Dice over the batch (segmentation; ``count`` is 1 per sample), or label
    accuracy (multilabel: the share of a sample's ``K`` labels, targets ``[B, K]`` in ``[0, 1]``
    read as on above 0.5, whose logit is positive exactly where the label is on).
    ``stacked=True`` takes every modality's predictions at once, ``[M, B, C]`` (classification),
    ``[M, B, K]`` (regression, multilabel) or ``[M, B, C, *spatial]`` (segmentation), and
    returns ``[M]`` totals and counts. ``weights`` (``[B]``, or ``[M, B]`` stacked; 1 = counted,
    0 = not, e.g. a sample that lacks the modality): only the weighted samples are scored and
    counted. ``labelled`` (classification, segmentation, multilabel; the target's shape, bool):
    the targets that carry a label. Samples without one are not scored; pixels without one
    count in no class's Dice, labels without one in no label accuracy, and a sample with none
    is not scored.
    """
    with torch.no_grad():
        if not stacked:  # one classifier: a stack of one
            pred = pred.unsqueeze(0)
            weights = None if weights is None else weights.unsqueeze(0)
        if labelled is not None:
            if task == "regression":
                raise ValueError("labelled takes class targets or labels; regression has none.")
            target = target.masked_fill(~labelled, 0)
            has_label = labelled.reshape(labelled.shape[0], -1).any(dim=1)  # [B]
            weights = has_label.float() if weights is None else weights * has_label
            weights = weights.expand(pred.shape[0], -1)
        per_sample = _per_sample_scores(task, pred, target, regression_score, labelled)
        if weights is None:
            total = per_sample.sum(dim=1)
            count = torch.full_like(total, float(target.shape[0]))
        else:
            w = weights.to(per_sample.dtype)
            total, count = (per_sample * w).sum(dim=1), w.sum(dim=1)
        return (total, count) if stacked else (total[0], count[0])


def _per_sample_scores(
    task: str,
    pred: Tensor,
    target: Tensor,
    regression_score: str,
    labelled: Tensor | None = None,
) -> Tensor:
    """Each classifier's score on each sample, ``[M, B]``, from stacked predictions.

    ``labelled``: segmentation predictions at unlabelled pixels are read as background, where
    the caller has set their targets, so that they count in no foreground class; multilabel
    accuracy is over a sample's labelled labels.
    """
    m, n = pred.shape[0], target.shape[0]
    if task == "classification":
        if pred.shape[-1] == 1:  # one binary logit: class 1 where it is positive
            return ((pred[..., 0] > 0).long() == target).float()
        return (pred.argmax(dim=-1) == target).float()
    if task == "regression":  # each output scored, then averaged over a sample's outputs
        p = pred.reshape(m, n, -1)
        t = target.reshape(1, n, -1).to(pred.dtype)
        if t.shape[2] != p.shape[2]:
            raise ValueError(
                f"regression targets of shape {tuple(target.shape)} for {p.shape[2]} outputs "
                "per sample."
            )
        if regression_score == "sign":
            return ((p > 0) == (t > 0)).float().mean(dim=-1)
        return -(p - t).abs().mean(dim=-1)
    if task == "multilabel":  # each label's logit sign right or wrong, averaged over the labels
        p = pred.reshape(m, n, -1) > 0
        right = (p == (target.reshape(1, n, -1) > 0.5)).float()
        if labelled is None:
            return right.mean(dim=-1)
        keep = labelled.reshape(1, n, -1).to(right.dtype)
        return (right * keep).sum(dim=-1) / keep.sum(dim=-1).clamp_min(1)
    if task == "segmentation":
        # max().indices, not argmax(): the same first-maximum index, but argmax over a
        # non-last axis is ~20x slower on CPU (it dominated the segmentation step)
        logits = pred.flatten(0, 1)
        if logits.shape[1] == 1:  # one binary logit per pixel: foreground where it is positive
            labels, classes = (logits[:, 0] > 0).long(), 2
        else:
            labels, classes = logits.max(dim=1).indices, logits.shape[1]
        repeated = target.repeat(m, *([1] * (target.ndim - 1)))
        if labelled is not None:
            labels = labels.masked_fill(~labelled.repeat(m, *([1] * (target.ndim - 1))), 0)
        return segmentation_dice(labels, repeated, classes).view(m, -1)
    raise ValueError(f"unknown task {task!r}")


def segmentation_dice(labels: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Per-sample mean Dice of the foreground classes ``1..C-1``, shape ``[B]``.

    A class absent from both prediction and target counts 1.
    """
    dims = tuple(range(1, labels.ndim))
    scores = []
    for c in range(1, num_classes):
        p, g = labels == c, target == c
        inter = (p & g).sum(dims).float()
        total = p.sum(dims).float() + g.sum(dims).float()
        scores.append(
            torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
        )
    return torch.stack(scores, dim=1).mean(dim=1)


def magnitude_coefficients(deltas: Tensor, mode: str = "default", eps: float = 1e-3) -> Tensor:
    """``B_m`` from the improvements ``Δ_m`` (``[M]``) of the modalities' classifiers.

    * ``"reference"``: ``B_m = (S − Δ_m) / S`` with ``S = Σ_k Δ_k + 1e-8``, as the released code:
      ``Σ_m B_m = M − 1``, but unbounded (negative, or huge when ``S ≈ 0``).
    * ``"default"``: the same formula on ``Δ'_m = Δ_m − min(min_k Δ_k, 0) + eps``: shifted only
      as far as a negative improvement needs, so whenever every ``Δ_m ≥ 0`` it is the paper's
      ``B`` (up to ``eps``), and otherwise the most negative ``Δ`` counts as ``0``. Every ``B_m``
      lies in ``[0, 1)``, ``Σ_m B_m = M − 1`` still holds, the least-improving modality still
      gets the largest share, and equal improvements give ``(M − 1) / M`` each.
    """
    if deltas.ndim != 1 or deltas.numel() < 2:
        raise ValueError(
            f"need one improvement per modality (>= 2), got shape {tuple(deltas.shape)}."
        )
    if mode == "reference":
        s = deltas.sum() + 1e-8
        return (s - deltas) / s
    if mode != "default":
        raise ValueError(f"mode must be 'default' or 'reference', got {mode!r}.")
    deltas = torch.nan_to_num(deltas, nan=0.0, posinf=0.0, neginf=0.0)
    shifted = deltas - deltas.min().clamp(max=0) + eps
    s = shifted.sum()
    return (s - shifted) / s


def direction_loss(
    coefficients: Tensor, classifier_heads: Sequence[Tensor] | Tensor, fusion_head: Tensor
) -> Tensor:
    """``L_gm = (1/M) [Σ_m |B_m| − Σ_m B_m cos(vec W_m, vec W^Ω)]`` (``B`` taken as constants).

    ``classifier_heads[m]`` (``W_m``) and ``fusion_head`` (``W^Ω``) are the final weights of each
    modality's classifier and of the model's head, of the same shape; ``classifier_heads`` may
    be one stacked tensor ``[M, *W^Ω.shape]``. Minimising it pulls the
    head's weights towards the classifiers', most strongly towards the least-improving ones.
    """
    b = coefficients.detach()
    if isinstance(classifier_heads, Tensor):
        heads = classifier_heads.reshape(len(classifier_heads), -1)
    else:
        heads = torch.stack([h.reshape(-1) for h in classifier_heads])  # [M, n]: one cosine call
    cos = F.cosine_similarity(heads.to(fusion_head.dtype), fusion_head.reshape(1, -1), dim=1)
    return (b.abs().sum() - (b * cos).sum()) / len(classifier_heads)


def direction_target(coefficients: Tensor, classifier_heads: Sequence[Tensor] | Tensor) -> Tensor:
    """``v = Σ_m B_m vec W_m / ‖W_m‖``: the part of :func:`direction_loss` that is constant.

    ``Σ_m B_m cos(vec W_m, vec W^Ω) = ⟨v, vec W^Ω⟩ / ‖W^Ω‖``, so with ``v`` computed once per
    step (after the classifiers' update), :func:`direction_loss_from_target` needs one dot
    product and one norm of the head weight instead of ``M`` cosines and their backward.
    """
    with torch.no_grad():
        if isinstance(classifier_heads, Tensor):
            heads = classifier_heads.reshape(len(classifier_heads), -1)
        else:
            heads = torch.stack([h.reshape(-1) for h in classifier_heads])
        # the same floor as F.cosine_similarity's eps
        scale = coefficients.to(heads) / heads.norm(dim=1).clamp_min(1e-8)
        return scale @ heads


def direction_loss_from_target(coefficients: Tensor, target: Tensor, fusion_head: Tensor) -> Tensor:
    """:func:`direction_loss` from ``target`` = :func:`direction_target` ``(B, heads)``."""
    w = fusion_head.reshape(-1)
    aligned = torch.dot(target.to(w.dtype), w) / w.norm().clamp_min(1e-8)
    return (coefficients.detach().abs().sum() - aligned) / len(coefficients)
