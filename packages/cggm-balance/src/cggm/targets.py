"""What CGGM's classifiers train on: the targets as each task takes them, and the task losses."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cggm.config import CGGMConfig
from mmcore import ModalityBatch

__all__ = [
    "check_target",
    "class_targets",
    "is_one_hot",
    "label_weights",
    "per_sample_loss",
    "resize_to_target",
    "target_tensor",
    "task_loss",
]


def target_tensor(target: Any) -> Tensor:
    """``step``'s targets: a tensor as it is, a ``ModalityBatch``'s ``target``."""
    if isinstance(target, ModalityBatch):
        return target.require_target()
    if not isinstance(target, Tensor):
        raise TypeError(
            f"CGGM.step takes the batch's targets as a tensor (or the ModalityBatch), got "
            f"{type(target).__name__}; convert them with torch.as_tensor."
        )
    return target


def class_targets(target: Tensor, config: CGGMConfig, spatial_dims: int) -> Tensor:
    """Class targets as indices: ``[B]`` (classification) or ``[B, *spatial]`` (segmentation).

    Also taken, as data pipelines (MONAI's among them) give them: a channel axis of one
    (``[B, 1, …]``), whole-number floats (``LoadImage``'s labels) and one-hot targets
    ``[B, C, …]``. Soft or overlapping targets (mixup, MONAI's ``[TC, WT, ET]`` masks) are a
    clear error: the classifiers score mutually exclusive classes.
    """
    task, classes = config.task, config.num_outputs
    classes = 2 if config.binary else classes  # one logit, two classes one-hot
    layout = "[B, *spatial]" if task == "segmentation" else "[B]"
    if target.ndim == spatial_dims + 2:  # a channel axis
        if target.shape[1] == 1:
            target = target[:, 0]
        elif target.shape[1] == classes and is_one_hot(target):
            target = target.max(dim=1).indices
        else:
            regions = (
                " Overlapping region masks (MONAI's [TC, WT, ET] for BraTS) need exclusive "
                "classes first: for BraTS, label 3 where ET, else 1 where TC, else 2 where "
                "WT, else 0."
                if task == "segmentation"
                else ""
            )
            raise ValueError(
                f"CGGM.step: task='{task}' takes class indices {layout} (or one-hot "
                f"[B, {classes}{', *spatial' if spatial_dims else ''}]); got shape "
                f"{tuple(target.shape)}, not one-hot.{regions}"
            )
    if target.dtype == torch.bool:
        target = target.long()
    elif target.is_floating_point() and bool((target == target.round()).all()):
        target = target.long()  # else the integer check of check_target says more
    return target


def check_target(target: Tensor, batch_size: int, config: CGGMConfig) -> None:
    """Refuse targets that do not fit the batch or the task, with what they should be."""
    if batch_size == 0:
        raise ValueError(
            "CGGM.step: the forward pass saw an empty batch (0 samples): no score can "
            "improve on it; skip the step (a DataLoader filter or a sampler left no sample)."
        )
    if target.ndim == 0 or target.shape[0] != batch_size:
        raise ValueError(
            f"CGGM.step: target has shape {tuple(target.shape)} but the forward pass saw "
            f"{batch_size} samples; pass this batch's targets."
        )
    if config.class_indices and target.is_floating_point():
        raise ValueError(
            f"CGGM.step: task='{config.task}' needs class indices, got {target.dtype} "
            "values that are not whole numbers (use task='regression' for real-valued "
            "targets)."
        )
    k = config.num_outputs
    if not config.class_indices and target.numel() != batch_size * k:
        what = "label" if config.task == "multilabel" else "target value"
        raise ValueError(
            f"CGGM.step: task='{config.task}' with num_outputs={k} needs {k} {what}(s) "
            f"per sample ([B] or [B, {k}]); got shape {tuple(target.shape)}."
        )
    if not target.numel():
        return
    if config.task == "regression":
        if not bool(torch.isfinite(target).all()):
            bad = int((~torch.isfinite(target)).sum())
            raise ValueError(
                f"CGGM.step: {bad} of the {target.numel()} regression targets are NaN or "
                "infinite: the classifiers' scores would count them (under "
                "regression_score='neg_mae' they turn NaN, and B no longer tells the modalities "
                "apart). Leave the samples without a label out of the batch given to the model "
                "and to step."
            )
        return
    # one device-to-host copy for both bounds (NaN in either when the targets hold one)
    low, high = torch.stack(torch.aminmax(target)).tolist()
    if config.task == "multilabel":
        if math.isnan(low) or math.isnan(high):
            raise ValueError(
                "CGGM.step: task='multilabel' targets hold NaN. Mark labels without an "
                "annotation with a number (say -1) and pass CGGM(..., ignore_index=-1)."
            )
        if low < 0 or high > 1:
            raise ValueError(
                "CGGM.step: task='multilabel' takes each label as 0 or 1 (or a probability in "
                f"[0, 1]); got values from {low} to {high}."
            )
        return
    if config.binary and (low < 0 or high > 1):
        raise ValueError(
            f"CGGM.step: num_outputs=1 is a binary model (one logit); its targets must "
            f"be 0 or 1, got values from {low} to {high}. For more classes give the "
            "head one output per class and pass num_outputs=<classes>."
        )
    if not config.binary and (low < 0 or high >= k):
        raise ValueError(
            f"CGGM.step: class targets must lie in [0, {k}); got values from {low} to {high}. "
            "Samples or pixels without a label (-100, 255) need CGGM(..., ignore_index=<that "
            "value>), so that the classifiers neither train on them nor score them."
        )


def split_ignored(target: Tensor, config: CGGMConfig) -> tuple[Tensor, Tensor | None]:
    """Targets without ``config.ignore_index``, and where they carry a label.

    ``(target, labelled)``: the ignored entries set to 0 (a class, or a label that is off),
    and the bool mask of the labelled ones (``None`` when every entry is labelled, or no
    ``ignore_index`` is set).
    """
    if config.ignore_index is None:
        return target, None
    ignored = target == config.ignore_index
    if not bool(ignored.any()):
        return target, None
    return target.masked_fill(ignored, 0), ~ignored


def label_weights(weights: Tensor | None, labelled: Tensor | None, n_mod: int) -> Tensor | None:
    """Each sample's weight ``[M, B]`` in the classifiers' losses.

    ``weights`` (presence, ``[M, B]`` or ``None``) times the sample's count of labelled entries
    (1 or 0 for a class target, its labelled pixels for a label map, its labelled labels for
    multilabel targets), so that the weighted mean of per-sample means over the labelled
    entries is the mean over every labelled entry, as ``F.cross_entropy(..., ignore_index=)``
    takes it.
    """
    if labelled is None:
        return weights
    counts = labelled.reshape(labelled.shape[0], -1).sum(dim=1)  # [B]
    if weights is None:
        return counts.float().expand(n_mod, -1)
    return weights * counts.to(weights.dtype)


def is_one_hot(target: Tensor) -> bool:
    """Whether ``[B, C, *spatial]`` holds exactly one 1 per position (and 0 elsewhere)."""
    binary = bool(((target == 0) | (target == 1)).all())
    return binary and bool((target.sum(dim=1) == 1).all())


def task_loss(pred: Tensor, target: Tensor, config: CGGMConfig) -> Tensor:
    """The task loss a classifier trains on, averaged over the batch."""
    if config.task == "regression":
        return F.l1_loss(pred.reshape(-1), target.reshape(-1).to(pred.dtype))
    if config.task == "multilabel":  # the mean over samples and labels
        return F.binary_cross_entropy_with_logits(pred, target.reshape(pred.shape).to(pred.dtype))
    if config.binary:
        return F.binary_cross_entropy_with_logits(pred[:, 0], target.to(pred.dtype))
    return F.cross_entropy(pred, target)


def per_sample_loss(
    pred: Tensor, target: Tensor, config: CGGMConfig, labelled: Tensor | None = None
) -> Tensor:
    """The task loss of each sample ``[N]`` (averaged over its outputs or pixels).

    ``labelled`` (the target's shape, bool): the mean over the labelled pixels only (0 for a
    sample that has none).
    """
    n = target.shape[0]
    if config.task == "regression":
        diff = F.l1_loss(
            pred.reshape(n, -1), target.reshape(n, -1).to(pred.dtype), reduction="none"
        )
        return diff.mean(dim=1)
    if config.task == "multilabel":
        loss = F.binary_cross_entropy_with_logits(
            pred, target.reshape(pred.shape).to(pred.dtype), reduction="none"
        )
    elif config.binary:
        loss = F.binary_cross_entropy_with_logits(
            pred[:, 0], target.to(pred.dtype), reduction="none"
        )
    else:
        loss = F.cross_entropy(pred, target, reduction="none")
    loss = loss.reshape(n, -1)
    if labelled is None:
        return loss.mean(dim=1)
    keep = labelled.reshape(n, -1).to(loss.dtype)
    return (loss * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)


def resize_to_target(pred: Tensor, target: Tensor) -> Tensor:
    """Segmentation logits ``[N, C, *s]`` resized to the label map's spatial shape."""
    return F.interpolate(
        pred,
        size=target.shape[1:],
        mode="bilinear" if pred.ndim == 4 else "trilinear",
        align_corners=False,
    )
