"""Classification metrics: accuracy, weighted and macro F1; IEMOCAP's four binary emotion tasks."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from torch import Tensor

from mmcore.metrics.base import CumulativeMetric, to_numpy

__all__ = [
    "IEMOCAP_EMOTIONS",
    "ClassificationMetric",
    "IEMOCAPMetric",
    "classification_metrics",
    "iemocap_metrics",
]

#: Order of the four binary tasks in the MulT IEMOCAP pickles (labels ``[N, 4, 2]``).
IEMOCAP_EMOTIONS = ("neutral", "happy", "sad", "angry")


def _labels(y_pred: np.ndarray, n: int, name: str) -> np.ndarray:
    if y_pred.ndim == 2:
        if not np.isfinite(y_pred).all():
            raise ValueError(f"{name}: y_pred holds NaN or infinite values.")
        return y_pred.argmax(axis=1)
    if y_pred.ndim == 1:
        return _non_negative(_integer_labels(y_pred, name, "y_pred"), name, "y_pred")
    raise ValueError(
        f"{name}: y_pred must be logits/probabilities [N, C] or labels [N], found shape "
        f"{y_pred.shape} (N = {n})."
    )


def _check_label_shape(y: Tensor | np.ndarray, name: str) -> None:
    """``y`` holds one label per sample: ``[N]`` or ``[N, 1]``, not one-hot rows ``[N, C]``."""
    shape = tuple(np.shape(y))
    if len(shape) > 1 and int(np.prod(shape[1:])) > 1:
        raise ValueError(
            f"{name}: y must hold one class index per sample ([N] or [N, 1]), found shape "
            f"{shape}; for one-hot or soft targets [N, C] pass y.argmax(dim=1)."
        )


def _integer_labels(x: np.ndarray, name: str, what: str) -> np.ndarray:
    """``x`` as int64 class labels; floats must hold whole numbers (``1.0``, not ``0.7``)."""
    if x.dtype.kind not in "iub" and not (np.isfinite(x).all() and (x == np.round(x)).all()):
        raise ValueError(
            f"{name}: {what} must hold integer class labels, found values such as "
            f"{x[~(np.isfinite(x) & (x == np.round(x)))][:3].tolist()}."
        )
    return x.astype(np.int64)


def _non_negative(x: np.ndarray, name: str, what: str) -> np.ndarray:
    """``x`` if no label is negative (whole-number logits would otherwise pass for labels)."""
    if x.size and x.min() < 0:
        hint = (
            "; for one binary logit per sample pass (y_pred > 0).long()" if what == "y_pred" else ""
        )
        found = sorted(set(x[x < 0].tolist()))[:3]
        raise ValueError(f"{name}: {what} must hold class labels >= 0, found {found}{hint}.")
    return x


def classification_metrics(y_pred: Tensor | np.ndarray, y: Tensor | np.ndarray) -> dict[str, float]:
    """Accuracy, weighted F1 and macro F1.

    Args:
        y_pred: logits or probabilities ``[N, C]`` (argmax is taken), or labels ``[N]``.
        y: integer labels ``[N]`` (in ``[0, C)`` when ``y_pred`` is ``[N, C]``).

    Raises:
        ValueError: sizes disagree, logits hold NaN or infinite values, labels are not whole
            numbers or are negative (whole-number logits of one binary class would otherwise
            pass for labels), or a label has no column in ``y_pred``.
    """
    name = "classification_metrics"
    _check_label_shape(y, name)
    p, t = to_numpy(y_pred), to_numpy(y).reshape(-1)
    if p.shape[0] != t.shape[0]:
        raise ValueError(
            f"{name}: y_pred has {p.shape[0]} samples (shape {p.shape}), "
            f"y has {t.shape[0]} (shape {np.shape(y)})."
        )
    if t.size == 0:
        raise ValueError(f"{name}: needs at least 1 sample, found 0.")
    t = _integer_labels(t, name, "y")
    if p.ndim == 2 and t.size and (t.min() < 0 or t.max() >= p.shape[1]):
        bad = t[(t < 0) | (t >= p.shape[1])]
        one = (
            " (one column: for one binary logit pass (y_pred > 0).long())"
            if p.shape[1] == 1
            else ""
        )
        raise ValueError(
            f"{name}: y holds labels {sorted(set(bad.tolist()))[:5]} but y_pred has "
            f"{p.shape[1]} classes (labels 0..{p.shape[1] - 1}){one}."
        )
    p = _labels(p, t.shape[0], name)
    _non_negative(t, name, "y")
    return {
        "accuracy": float(accuracy_score(t, p)),
        "f1_weighted": float(f1_score(t, p, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(t, p, average="macro", zero_division=0)),
    }


def _iemocap_labels(x: np.ndarray, what: str) -> np.ndarray:
    n = x.shape[0]
    if x.ndim == 2 and x.shape[1] == 8:
        x = x.reshape(n, 4, 2)
    if x.ndim == 3 and x.shape[1:] == (4, 2):
        if not np.isfinite(x).all():
            raise ValueError(f"iemocap_metrics: {what} holds NaN or infinite values.")
        return x.argmax(axis=2)
    if x.ndim == 2 and x.shape[1] == 4:
        if not np.isin(x, (0, 1)).all():
            raise ValueError(
                f"iemocap_metrics: {what} as [N, 4] must hold binary labels (0 or 1), found "
                f"values such as {np.unique(x[~np.isin(x, (0, 1))])[:3].tolist()}."
            )
        return x.astype(np.int64)
    raise ValueError(
        f"iemocap_metrics: {what} must be [N, 4, 2] (logits or one-hot), [N, 8] logits or "
        f"[N, 4] binary labels in the order {IEMOCAP_EMOTIONS}; found shape {x.shape}."
    )


def iemocap_metrics(y_pred: Tensor | np.ndarray, y: Tensor | np.ndarray) -> dict[str, float]:
    """IEMOCAP's four binary emotion tasks, as MulT reports them.

    Args:
        y_pred: ``[N, 4, 2]`` or ``[N, 8]`` logits, or ``[N, 4]`` binary labels.
        y: ``[N, 4, 2]`` one-hot (the pickle's layout) or ``[N, 4]`` binary labels.

    Returns:
        ``<emotion>_acc`` and ``<emotion>_f1`` (weighted F1) for neutral, happy, sad, angry, plus
        their means ``mean_acc`` and ``mean_f1``.
    """
    p = _iemocap_labels(to_numpy(y_pred), "y_pred")
    t = _iemocap_labels(to_numpy(y), "y")
    if p.shape != t.shape:
        raise ValueError(f"iemocap_metrics: {p.shape[0]} predictions but {t.shape[0]} labels.")
    if t.shape[0] == 0:
        raise ValueError("iemocap_metrics: needs at least 1 sample, found 0.")
    out: dict[str, float] = {}
    for i, emotion in enumerate(IEMOCAP_EMOTIONS):
        out[f"{emotion}_acc"] = float(accuracy_score(t[:, i], p[:, i]))
        f1 = f1_score(t[:, i], p[:, i], average="weighted", zero_division=0)
        out[f"{emotion}_f1"] = float(f1)
    out["mean_acc"] = float(np.mean([out[f"{e}_acc"] for e in IEMOCAP_EMOTIONS]))
    out["mean_f1"] = float(np.mean([out[f"{e}_f1"] for e in IEMOCAP_EMOTIONS]))
    return out


class ClassificationMetric(CumulativeMetric):
    """Cumulative :func:`classification_metrics`."""

    def _check(self, y_pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        _check_label_shape(y, "ClassificationMetric")
        y = y.reshape(-1)
        if y_pred.ndim not in (1, 2) or y_pred.shape[0] != y.shape[0]:
            raise ValueError(
                f"ClassificationMetric: expected y_pred [N, C] or [N] with N = {y.shape[0]}, "
                f"found shape {tuple(y_pred.shape)}."
            )
        if y_pred.ndim == 2 and self._preds and self._preds[0].ndim == 2:
            width = self._preds[0].shape[1]
            if y_pred.shape[1] != width:
                raise ValueError(
                    f"ClassificationMetric: this batch has {y_pred.shape[1]} classes, earlier "
                    f"batches {width}."
                )
        if self._preds and y_pred.ndim != self._preds[0].ndim:
            raise ValueError(
                "ClassificationMetric: this batch gives "
                f"{'logits [N, C]' if y_pred.ndim == 2 else 'labels [N]'}, earlier batches the "
                "other; give one kind."
            )
        return y_pred.float() if y_pred.ndim == 2 else y_pred, y

    def _compute(self, y_pred: Tensor, y: Tensor) -> dict[str, float]:
        return classification_metrics(y_pred, y)


class IEMOCAPMetric(CumulativeMetric):
    """Cumulative :func:`iemocap_metrics`."""

    def _check(self, y_pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        p = _iemocap_labels(to_numpy(y_pred), "y_pred")
        t = _iemocap_labels(to_numpy(y), "y")
        if p.shape[0] != t.shape[0]:
            raise ValueError(f"IEMOCAPMetric: {p.shape[0]} predictions but {t.shape[0]} labels.")
        return Tensor(p).long(), Tensor(t).long()

    def _compute(self, y_pred: Tensor, y: Tensor) -> dict[str, float]:
        return iemocap_metrics(y_pred, y)
