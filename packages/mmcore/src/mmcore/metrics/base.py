"""Cumulative metrics in MONAI's shape: call per batch, ``aggregate()`` at the end, ``reset()``.

Non-decomposable metrics (correlation, F1, binned accuracies) buffer the raw predictions and
targets and compute everything in :meth:`CumulativeMetric.aggregate` from the gathered buffers,
through a pure functional twin. Under ``torch.distributed`` the buffers of every rank are gathered
first, so correlation and F1 are computed on all predictions, never averaged per rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from mmcore.utils import collective_device

__all__ = ["CumulativeMetric", "all_gather_cat", "first_occurrences", "to_numpy"]


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def to_numpy(x: Tensor | np.ndarray | list[Any] | float) -> np.ndarray:
    """A detached CPU numpy copy of a tensor, array or list.

    Floating dtypes numpy lacks (``bfloat16``, the float8 types) come as float32.
    """
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in _NUMPY_FLOATS:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` (``[n_rank, ...]``, ``n_rank`` may differ per rank) from every rank.

    Returns ``x`` unchanged when ``torch.distributed`` is not initialised. The exchange runs on
    the device the group's backend serves (:func:`mmcore.collective_device`: the GPU under
    NCCL); the result comes back on ``x``'s device.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    device = collective_device()
    n = torch.tensor([x.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = x.new_zeros((longest, *x.shape[1:]), device=device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    out = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])
    return out.to(x.device)


def _identity(x: Tensor) -> Tensor:
    return x


def first_occurrences(index: Tensor) -> Tensor:
    """Positions ``[U]`` (increasing) of the first occurrence of each value in ``index`` ``[N]``."""
    _, inverse = torch.unique(index, return_inverse=True)
    n = index.shape[0]
    first = torch.full((int(inverse.max()) + 1 if n else 0,), n, dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(n), reduce="amin")
    return first.sort().values


class CumulativeMetric(ABC):
    """Buffers ``(y_pred, y)`` pairs batch by batch; :meth:`aggregate` computes the metrics.

    Subclasses implement :meth:`_check` (validate/reshape one batch) and :meth:`_compute`
    (the functional twin applied to the concatenated buffers).

    Under DDP, a ``DistributedSampler`` pads the evaluation set with repeated samples so that
    every rank gets as many; pass each sample's dataset index (``index=``) and
    :meth:`aggregate` counts every sample once.
    """

    def __init__(self) -> None:
        self._preds: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._indices: list[Tensor] = []

    def __call__(self, y_pred: Tensor, y: Tensor, *, index: Tensor | None = None) -> None:
        """Buffer one batch of predictions and targets (detached, moved to the CPU).

        ``index``: optional integer ``[N]``, each sample's index in the evaluation set; samples
        seen more than once (the padding of a ``DistributedSampler``) are counted once. Give it
        with every batch or with none.
        """
        if not isinstance(y_pred, Tensor) or not isinstance(y, Tensor):
            raise TypeError(
                f"{type(self).__name__}: y_pred and y must be tensors, found "
                f"{type(y_pred).__name__} and {type(y).__name__}."
            )
        if self._preds and (index is None) != (not self._indices):
            raise ValueError(
                f"{type(self).__name__}: give index= with every batch or with none (this batch "
                f"{'has none' if index is None else 'has one'}, earlier batches the opposite)."
            )
        y_pred, y = self._check(y_pred.detach(), y.detach())
        if index is not None:
            index = torch.as_tensor(index).detach().reshape(-1)
            if index.is_floating_point() or index.dtype == torch.bool:
                raise TypeError(
                    f"{type(self).__name__}: index must hold integer sample indices, found "
                    f"{index.dtype}."
                )
            if index.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{type(self).__name__}: index has {index.shape[0]} entries for "
                    f"{y.shape[0]} samples."
                )
            self._indices.append(index.long().cpu())
        self._preds.append(y_pred.cpu())
        self._targets.append(y.cpu())

    def reset(self) -> None:
        """Drop every buffered batch."""
        self._preds.clear()
        self._targets.clear()
        self._indices.clear()

    def __len__(self) -> int:
        return sum(p.shape[0] for p in self._preds)

    def aggregate(self, *, sync: bool = True) -> dict[str, float]:
        """The metrics over every buffered batch, of every rank under torch.distributed.

        Under torch.distributed every rank must call it (the buffers are gathered); ``sync=False``
        computes them on this process's batches alone (e.g. rank 0 evaluating by itself).
        """
        if not self._preds:
            raise RuntimeError(f"{type(self).__name__}.aggregate() called with nothing buffered.")
        gather = all_gather_cat if sync else _identity
        y_pred = gather(torch.cat(self._preds))
        y = gather(torch.cat(self._targets))
        if self._indices:
            keep = first_occurrences(gather(torch.cat(self._indices)))
            y_pred, y = y_pred[keep], y[keep]
        return self._compute(y_pred, y)

    def _check(self, y_pred: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return y_pred, y

    @abstractmethod
    def _compute(self, y_pred: Tensor, y: Tensor) -> dict[str, float]: ...
