"""BraTS region Dice (whole tumour, tumour core, enhancing tumour) from any label style.

Regions (MONAI's ``ConvertToMultiChannelBasedOnBratsClasses``): TC = {NCR, ET}, WT = {NCR, ED,
ET}, ET = {ET}, with NCR = 1 and ED = 2. ET is 4 in the BraTS 2021 files (``label_format="brats"``)
and 3 after the common 4→3 remap (``label_format="remapped"``, CGGM's layout). Multi-channel
``[B, 3, ...]`` masks in MONAI's ``[TC, WT, ET]`` order are ``label_format="channels"``.

A label map whose values do not fit the declared format is an error, not a silent empty region:
the BraTS 2023 files and MSD Task01 use 3 for a tumour class, and a {1, 2, 4} reader would
otherwise report an empty ET.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mmcore.metrics.base import CumulativeMetric

__all__ = ["BRATS_REGIONS", "BratsDiceMetric", "brats_dice", "brats_region_masks"]

LabelFormat = Literal["brats", "remapped", "channels"]
#: Region order of the returned channels and dice columns (MONAI's).
BRATS_REGIONS = ("tc", "wt", "et")
_ALLOWED = {"brats": {0, 1, 2, 4}, "remapped": {0, 1, 2, 3}}


def brats_region_masks(labels: Tensor, label_format: LabelFormat = "brats") -> Tensor:
    """Bool ``[B, 3, ...]`` region masks in ``[TC, WT, ET]`` order.

    Args:
        labels: label map ``[B, *spatial]`` (``"brats"`` / ``"remapped"``; integer, or floating
            with whole values, as MONAI's ``LoadImage`` gives them; MONAI's channel-first
            ``[B, 1, H, W]`` or ``[B, 1, H, W, D]`` is read as ``[B, H, W(, D)]``), or
            ``[B, 3, *spatial]`` binary channel masks (``"channels"``).
        label_format: ``"brats"`` ({0,1,2,4}), ``"remapped"`` ({0,1,2,3}) or ``"channels"``.
    """
    if label_format == "channels":
        if labels.ndim < 3 or labels.shape[1] != 3:
            raise ValueError(
                f"label_format='channels' expects [B, 3, ...] masks in [TC, WT, ET] order, "
                f"found shape {tuple(labels.shape)}."
            )
        values = torch.unique(labels)
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError(
                "label_format='channels' expects binary masks (0/1 or bool); threshold "
                f"probabilities first. Found values {values[:8].tolist()}."
            )
        return labels.bool()
    if label_format not in _ALLOWED:
        raise ValueError(
            f"label_format must be 'brats', 'remapped' or 'channels', found {label_format!r}."
        )
    if labels.ndim >= 4 and labels.shape[1] == 1:  # MONAI's channel-first label map
        labels = labels[:, 0]
    if labels.is_floating_point():
        # MONAI's LoadImage and nibabel give label maps as floats: whole numbers are labels,
        # anything else is logits or probabilities
        if not bool((labels == labels.round()).all()):
            raise TypeError(
                "label maps must hold whole numbers; these look like logits or probabilities: "
                "take the argmax over the class dimension before computing Dice."
            )
        labels = labels.long()
    found = set(torch.unique(labels).tolist())
    unexpected = found - _ALLOWED[label_format]
    if unexpected:
        other = "remapped" if label_format == "brats" else "brats"
        raise ValueError(
            f"label map holds values {sorted(unexpected)}, outside "
            f"{sorted(_ALLOWED[label_format])} of label_format='{label_format}'. BraTS 2021 "
            f"uses ET = 4, the 4→3 remap (and BraTS 2023) ET = 3, MSD Task01 another order "
            f"entirely: check the source, or pass label_format='{other}'."
        )
    et_value = 4 if label_format == "brats" else 3
    et = labels == et_value
    tc = (labels == 1) | et
    wt = tc | (labels == 2)
    return torch.stack([tc, wt, et], dim=1)


def brats_dice(
    y_pred: Tensor,
    y: Tensor,
    label_format: LabelFormat = "brats",
    *,
    pred_format: LabelFormat | None = None,
    ignore_empty: bool = True,
) -> dict[str, float]:
    """Mean Dice of the TC, WT and ET regions and their mean, over the batch.

    Args:
        y_pred: predicted label map ``[B, ...]`` or ``[B, 3, ...]`` binary channel masks.
        y: reference in ``label_format``.
        label_format: format of ``y`` (``"brats"``, ``"remapped"`` or ``"channels"``).
        pred_format: format of ``y_pred``; defaults to ``label_format``.
        ignore_empty: MONAI's convention: a sample whose reference region is empty is left out of
            that region's mean (``True``), or scores 1 if the prediction is empty too, else 0.

    Returns:
        ``dice_tc, dice_wt, dice_et, dice_mean`` (``dice_mean`` averages the three regions).
    """
    return _summarise(per_sample_brats_dice(y_pred, y, label_format, pred_format, ignore_empty))


def per_sample_brats_dice(
    y_pred: Tensor,
    y: Tensor,
    label_format: LabelFormat = "brats",
    pred_format: LabelFormat | None = None,
    ignore_empty: bool = True,
) -> Tensor:
    """Dice ``[B, 3]`` per sample and region (``[TC, WT, ET]``), NaN where ignored."""
    try:
        from monai.metrics import compute_dice
    except ImportError as err:
        raise ImportError(
            "BraTS Dice needs MONAI: pip install 'mmcore[segmentation]' (or monai)."
        ) from err

    pred = brats_region_masks(y_pred, pred_format or label_format)
    ref = brats_region_masks(y, label_format)
    if pred.shape != ref.shape:
        raise ValueError(
            f"brats_dice: prediction regions have shape {tuple(pred.shape)}, reference regions "
            f"{tuple(ref.shape)}; the spatial sizes must match."
        )
    return compute_dice(
        pred.float(), ref.float(), include_background=True, ignore_empty=ignore_empty
    )


def _summarise(dice: Tensor) -> dict[str, float]:
    d = dice.double().cpu().numpy()
    with np.errstate(all="ignore"):
        region = {
            r: float(np.nanmean(d[:, i])) if np.isfinite(d[:, i]).any() else float("nan")
            for i, r in enumerate(BRATS_REGIONS)
        }
    out = {f"dice_{r}": region[r] for r in ("tc", "wt", "et")}
    out["dice_mean"] = float(np.mean([region[r] for r in ("tc", "wt", "et")]))
    return out


class BratsDiceMetric(CumulativeMetric):
    """Cumulative :func:`brats_dice`: buffers per-sample Dice, so volumes are not kept."""

    def __init__(
        self,
        label_format: LabelFormat = "brats",
        pred_format: LabelFormat | None = None,
        ignore_empty: bool = True,
    ) -> None:
        super().__init__()
        self.label_format = label_format
        self.pred_format = pred_format
        self.ignore_empty = ignore_empty

    def _check(self, y_pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        dice = per_sample_brats_dice(
            y_pred, y, self.label_format, self.pred_format, self.ignore_empty
        )
        return dice, torch.zeros(dice.shape[0])

    def _compute(self, y_pred: Tensor, y: Tensor) -> dict[str, float]:
        return _summarise(y_pred)
