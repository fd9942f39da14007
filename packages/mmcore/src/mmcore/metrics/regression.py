"""Multimodal sentiment regression metrics, in the conventions of MulT and MMSA.

CMU-MOSI / CMU-MOSEI labels lie in ``[-3, 3]``:

* ``mae``, ``corr`` (Pearson);
* ``acc2_has0`` / ``f1_has0``: binary ``>= 0`` vs ``< 0`` on every sample (MMSA ``Has0_acc_2``);
* ``acc2_non0`` / ``f1_non0``: samples with label 0 dropped, then ``> 0`` vs ``< 0``
  (MMSA ``Non0_acc_2``, MulT's ``exclude_zero=True``);
* ``acc2_gt0`` / ``f1_gt0``: binary ``> 0`` vs ``<= 0`` on every sample, so label 0 counts as
  negative (MulT's ``exclude_zero=False``, the Acc-2 of the released CASP code): for comparison
  with numbers reported that way;
* ``acc5`` / ``acc7``: predictions and labels clipped to ``[-2, 2]`` / ``[-3, 3]`` and rounded
  (numpy's round-half-to-even, as both reference codes do), then compared.

F1 scores are weighted F1 (scikit-learn ``average="weighted"``). CH-SIMS labels lie in
``[-1, 1]`` (:func:`sims_regression_metrics`): values are clipped to ``[-1, 1]`` and binned by the
MMSA edges: 2 classes split at 0 (``(-1, 0]`` vs ``(0, 1]``), 3 at ``±0.1``, 5 at ``±0.1`` and
``±0.7``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from torch import Tensor

from mmcore.metrics.base import CumulativeMetric, to_numpy

__all__ = ["MSAMetric", "SIMSMetric", "msa_regression_metrics", "sims_regression_metrics"]

_SIMS_EDGES = {
    2: [-1.01, 0.0, 1.01],
    3: [-1.01, -0.1, 0.1, 1.01],
    5: [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01],
}


def _check_one_score_per_sample(name: str, **arrays: Tensor | np.ndarray) -> None:
    """Each array holds one score per sample: ``[N]``, ``[N, 1]`` or MulT's ``[N, 1, 1]``.

    Flattening ``[N, K]`` scores would pool K regressed values into one metric, and pair them
    with a ``[N K]`` target in whatever order each was laid out.
    """
    for arg, x in arrays.items():
        shape = tuple(np.shape(x))
        if sum(size != 1 for size in shape) > 1:
            raise ValueError(
                f"{name}: {arg} has shape {shape}; expected one score per sample ([N], [N, 1] or "
                "[N, 1, 1]). For several regressed values per sample (e.g. valence and "
                "arousal), compute the metrics once per column."
            )


def _flat_pair(
    y_pred: Tensor | np.ndarray, y: Tensor | np.ndarray, name: str
) -> tuple[np.ndarray, np.ndarray]:
    _check_one_score_per_sample(name, y_pred=y_pred, y=y)
    p = to_numpy(y_pred).astype(np.float64).reshape(-1)
    t = to_numpy(y).astype(np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(
            f"{name}: y_pred has {p.size} values (shape {np.shape(y_pred)}) but y has {t.size} "
            f"(shape {np.shape(y)}); expected one score per sample."
        )
    if p.size < 2:
        raise ValueError(f"{name}: needs at least 2 samples, found {p.size}.")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError(f"{name}: y_pred or y holds NaN or infinite values.")
    return p, t


def _pearson(p: np.ndarray, t: np.ndarray) -> float:
    if p.std() == 0 or t.std() == 0:
        return float("nan")  # undefined for a constant vector
    return float(np.corrcoef(p, t)[0, 1])


def _binary(p_bool: np.ndarray, t_bool: np.ndarray) -> tuple[float, float]:
    if t_bool.size == 0:
        return float("nan"), float("nan")
    acc = accuracy_score(t_bool, p_bool)
    f1 = f1_score(t_bool, p_bool, average="weighted", zero_division=0)
    return float(acc), float(f1)


def msa_regression_metrics(y_pred: Tensor | np.ndarray, y: Tensor | np.ndarray) -> dict[str, float]:
    """MOSI/MOSEI regression metrics on gathered predictions.

    Args:
        y_pred: predicted sentiment, ``[N]`` (or ``[N, 1]``, ``[N, 1, 1]``: one score per
            sample; ``[N, K]`` raises a ``ValueError``).
        y: true sentiment in ``[-3, 3]``, ``N`` scores likewise.

    Returns:
        ``mae, corr, acc2_has0, f1_has0, acc2_non0, f1_non0, acc2_gt0, f1_gt0, acc5, acc7``
        (accuracies in [0, 1]).
    """
    p, t = _flat_pair(y_pred, y, "msa_regression_metrics")
    acc2_has0, f1_has0 = _binary(p >= 0, t >= 0)
    nz = t != 0
    acc2_non0, f1_non0 = _binary(p[nz] > 0, t[nz] > 0)
    acc2_gt0, f1_gt0 = _binary(p > 0, t > 0)
    return {
        "mae": float(np.abs(p - t).mean()),
        "corr": _pearson(p, t),
        "acc2_has0": acc2_has0,
        "f1_has0": f1_has0,
        "acc2_non0": acc2_non0,
        "f1_non0": f1_non0,
        "acc2_gt0": acc2_gt0,
        "f1_gt0": f1_gt0,
        "acc5": float(np.mean(np.round(np.clip(p, -2, 2)) == np.round(np.clip(t, -2, 2)))),
        "acc7": float(np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(t, -3, 3)))),
    }


def _sims_bins(x: np.ndarray, classes: int) -> np.ndarray:
    edges = _SIMS_EDGES[classes]
    out = np.zeros(x.shape, dtype=np.int64)
    for i in range(classes):
        out[(x > edges[i]) & (x <= edges[i + 1])] = i
    return out


def sims_regression_metrics(
    y_pred: Tensor | np.ndarray, y: Tensor | np.ndarray
) -> dict[str, float]:
    """CH-SIMS regression metrics (labels in ``[-1, 1]``), MMSA's binning.

    Returns:
        ``mae, corr, acc2, f1, acc3, acc5``; ``f1`` is the weighted F1 of the 2-class bins.
    """
    p, t = _flat_pair(y_pred, y, "sims_regression_metrics")
    p, t = np.clip(p, -1, 1), np.clip(t, -1, 1)
    p2, t2 = _sims_bins(p, 2), _sims_bins(t, 2)
    return {
        "mae": float(np.abs(p - t).mean()),
        "corr": _pearson(p, t),
        "acc2": float(np.mean(p2 == t2)),
        "f1": float(f1_score(t2, p2, average="weighted", zero_division=0)),
        "acc3": float(np.mean(_sims_bins(p, 3) == _sims_bins(t, 3))),
        "acc5": float(np.mean(_sims_bins(p, 5) == _sims_bins(t, 5))),
    }


class _ScoreMetric(CumulativeMetric):
    def _check(self, y_pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        _check_one_score_per_sample(type(self).__name__, y_pred=y_pred, y=y)
        if y_pred.numel() != y.numel():
            raise ValueError(
                f"{type(self).__name__}: y_pred shape {tuple(y_pred.shape)} and y shape "
                f"{tuple(y.shape)} hold different numbers of scores."
            )
        return y_pred.reshape(-1).float(), y.reshape(-1).float()


class MSAMetric(_ScoreMetric):
    """Cumulative :func:`msa_regression_metrics` (MOSI / MOSEI)."""

    def _compute(self, y_pred: Tensor, y: Tensor) -> dict[str, float]:
        return msa_regression_metrics(y_pred, y)


class SIMSMetric(_ScoreMetric):
    """Cumulative :func:`sims_regression_metrics` (CH-SIMS)."""

    def _compute(self, y_pred: Tensor, y: Tensor) -> dict[str, float]:
        return sims_regression_metrics(y_pred, y)
