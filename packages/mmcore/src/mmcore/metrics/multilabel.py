"""Multi-label metrics: ``K`` independent yes/no labels per sample (e.g. CMU-MOSEI's emotions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from torch import Tensor

from mmcore.metrics.base import CumulativeMetric, to_numpy

__all__ = ["MultiLabelMetric", "multilabel_metrics"]


def _scores(y_pred: np.ndarray, name: str) -> np.ndarray:
    if y_pred.ndim != 2:
        raise ValueError(f"{name}: y_pred must be [N, K] scores, found shape {y_pred.shape}.")
    if not np.isfinite(y_pred).all():
        raise ValueError(f"{name}: y_pred holds NaN or infinite values.")
    return y_pred


def _binary_labels(y: np.ndarray, name: str) -> np.ndarray:
    if y.ndim != 2:
        raise ValueError(f"{name}: y must be [N, K] labels (0 or 1), found shape {y.shape}.")
    if not np.isin(y, (0, 1)).all():
        found = np.unique(y[~np.isin(y, (0, 1))])[:3].tolist()
        raise ValueError(f"{name}: y must hold labels 0 or 1, found values such as {found}.")
    return y.astype(np.int64)


def _label_names(names: Sequence[str] | None, k: int, name: str) -> list[str]:
    if names is None:
        return [f"label{i}" for i in range(k)]
    if len(names) != k or len(set(names)) != k:
        raise ValueError(f"{name}: names must be {k} distinct label names, got {list(names)}.")
    return list(names)


def _weighted_accuracy(p: np.ndarray, t: np.ndarray) -> float:
    """``(TPR + TNR) / 2`` of one label (the mean of the defined rate where a class is absent)."""
    rates = [float((p[t == c] == c).mean()) for c in (1, 0) if (t == c).any()]
    return float(np.mean(rates))


def multilabel_metrics(
    y_pred: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    *,
    threshold: float = 0.0,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per-label and averaged scores of ``K`` independent binary labels.

    Args:
        y_pred: ``[N, K]`` scores; a label is predicted on where its score is above
            ``threshold`` (logits: 0, the default; probabilities or 0/1 labels: pass 0.5).
        y: ``[N, K]`` labels, 0 or 1 (bool, integer or whole floats).
        threshold: the decision threshold on ``y_pred``.
        names: the ``K`` label names used in the keys (default ``label0``, ``label1``, ...).

    Returns:
        Per label ``<name>_acc`` (accuracy), ``<name>_wacc`` (weighted accuracy
        ``(TPR + TNR) / 2``, as emotion recognition on CMU-MOSEI reports it) and ``<name>_f1``
        (weighted F1, as :func:`iemocap_metrics`); their means ``mean_acc``, ``mean_wacc``,
        ``mean_f1``; ``micro_f1`` and ``macro_f1`` of the positive class over all labels; and
        ``subset_acc``, the share of samples with every label right.
    """
    name = "multilabel_metrics"
    scores = _scores(to_numpy(y_pred), name)
    t = _binary_labels(to_numpy(y), name)
    if scores.shape != t.shape:
        raise ValueError(f"{name}: y_pred is {scores.shape} but y is {t.shape}.")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: needs at least 1 sample, found 0.")
    p = (scores > threshold).astype(np.int64)
    labels = _label_names(names, t.shape[1], name)
    out: dict[str, float] = {}
    for i, label in enumerate(labels):
        out[f"{label}_acc"] = float(accuracy_score(t[:, i], p[:, i]))
        out[f"{label}_wacc"] = _weighted_accuracy(p[:, i], t[:, i])
        out[f"{label}_f1"] = float(f1_score(t[:, i], p[:, i], average="weighted", zero_division=0))
    for stat in ("acc", "wacc", "f1"):
        out[f"mean_{stat}"] = float(np.mean([out[f"{label}_{stat}"] for label in labels]))
    out["micro_f1"] = float(f1_score(t, p, average="micro", zero_division=0))
    out["macro_f1"] = float(f1_score(t, p, average="macro", zero_division=0))
    out["subset_acc"] = float(accuracy_score(t, p))
    return out


class MultiLabelMetric(CumulativeMetric):
    """Cumulative :func:`multilabel_metrics` (``threshold`` and ``names`` as there)."""

    def __init__(self, *, threshold: float = 0.0, names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.threshold, self.names = threshold, None if names is None else list(names)

    def _check(self, y_pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        name = "MultiLabelMetric"
        if y_pred.ndim != 2 or y.shape != y_pred.shape:
            raise ValueError(
                f"{name}: expected y_pred and y both [N, K], found {tuple(y_pred.shape)} and "
                f"{tuple(y.shape)}."
            )
        if self._preds and y_pred.shape[1] != self._preds[0].shape[1]:
            raise ValueError(
                f"{name}: this batch has {y_pred.shape[1]} labels, earlier batches "
                f"{self._preds[0].shape[1]}."
            )
        _binary_labels(to_numpy(y), name)
        return y_pred.float(), y.long()

    def _compute(self, y_pred: Tensor, y: Tensor) -> dict[str, float]:
        return multilabel_metrics(y_pred, y, threshold=self.threshold, names=self.names)
