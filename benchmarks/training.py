"""Small, explicit training and evaluation loops shared by the benchmark tasks."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mmcore import ModalityBatch, fused_optimizer

LossFn = Callable[[Tensor, Tensor], Tensor]
#: validation score of predictions against targets, higher is better
ScoreFn = Callable[[Tensor, Tensor], float]


@dataclass
class FitResult:
    """What :func:`fit` returns: the best validation score, its epoch and the time per step.

    ``seconds_per_step`` is the median over epochs of each epoch's mean step time: one epoch
    slowed by another process on a shared machine does not move it.
    """

    best_score: float
    best_epoch: int
    seconds_per_step: float
    steps: int


@torch.no_grad()
def predict(model: nn.Module, data: ModalityBatch, batch_size: int = 256) -> Tensor:
    """Model outputs on ``data`` in eval mode, concatenated ``[N, ...]``."""
    was_training = model.training
    model.eval()
    outputs = [model(batch) for batch in data.split(batch_size)]
    model.train(was_training)
    return torch.cat(outputs)


def fit(
    model: nn.Module,
    train: ModalityBatch,
    valid: ModalityBatch,
    *,
    loss_fn: LossFn,
    score_fn: ScoreFn,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    extra_loss: Callable[[Tensor], Tensor] | None = None,
    after_backward: Callable[[ModalityBatch], Any] | None = None,
    optimizer: str = "adamw",
) -> FitResult:
    """Train with AdamW (or SGD); keep the weights of the epoch with the best validation score.

    Only parameters with ``requires_grad`` are optimised. ``score_fn(outputs, targets)`` is
    higher-is-better (negate an error). The model ends in eval mode with the best weights.
    ``extra_loss(task_loss)`` is added to every step's loss and ``after_backward(batch)`` runs
    between ``backward()`` and the optimiser step (where gradient modulators such as CGGM act).
    ``optimizer="sgd"`` (momentum 0.9) for such modulators: Adam divides each gradient by its
    running RMS, which undoes any constant scaling of an encoder's gradients.
    """
    optimiser = make_optimizer(model, optimizer, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best = (-float("inf"), -1, copy.deepcopy(model.state_dict()))
    steps, epoch_step_seconds = 0, []
    for epoch in range(epochs):
        model.train()
        start, epoch_steps = time.perf_counter(), 0
        for batch in train.split(batch_size, shuffle=True, generator=generator):
            train_step(model, optimiser, batch, loss_fn, extra_loss, after_backward)
            epoch_steps += 1
        if epoch_steps:
            epoch_step_seconds.append((time.perf_counter() - start) / epoch_steps)
        steps += epoch_steps
        score = score_fn(predict(model, valid), valid.require_target())
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    step_seconds = float(np.median(epoch_step_seconds)) if epoch_step_seconds else 0.0
    return FitResult(best[0], best[1], step_seconds, steps)


def make_optimizer(
    model: nn.Module, optimizer: str = "adamw", *, lr: float, weight_decay: float = 1e-4
) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9) over the parameters that require grad, fused where possible."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to optimise.")
    # fused: one kernel for every parameter (CPU and CUDA); the per-tensor loop costs more
    # than a tiny model's forward pass
    if optimizer == "adamw":
        return fused_optimizer(torch.optim.AdamW, params, lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return fused_optimizer(
            torch.optim.SGD, params, lr=lr, momentum=0.9, weight_decay=weight_decay
        )
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")


def train_step(
    model: nn.Module | Callable[[ModalityBatch], Tensor],
    optimiser: torch.optim.Optimizer,
    batch: ModalityBatch,
    loss_fn: LossFn,
    extra_loss: Callable[[Tensor], Tensor] | None = None,
    after_backward: Callable[[ModalityBatch], Any] | None = None,
) -> None:
    """One step of :func:`fit`: forward, loss (+ ``extra_loss(loss)``), backward, hook, update."""
    optimiser.zero_grad(set_to_none=True)
    loss = loss_fn(model(batch), batch.require_target())
    if extra_loss is not None:
        loss = loss + extra_loss(loss)
    loss.backward()
    if after_backward is not None:
        after_backward(batch)
    optimiser.step()


def median_times(fns: Mapping[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, float]:
    """Seconds per call of each function: the median over ``rounds`` interleaved rounds.

    Interleaving puts every function under the same machine load, round by round, so their
    ratios hold on a noisy shared machine where timings taken one method after another do not.
    """
    for fn in fns.values():  # warm-up
        for _ in range(max(1, calls // 2)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: float(np.median(values)) for name, values in samples.items()}


def steps_per_round(batch_size: int, first_batch_size: int, calls: int = 10) -> int:
    """Steps per timing round at ``batch_size`` for a task that takes ``calls`` at its first size.

    Steps grow with the batch, so the calls shrink in proportion, down to 4: a round of wide
    steps still lasts tens of milliseconds, and its median stays steady at a fraction of the time.
    """
    return max(4, calls * first_batch_size // batch_size)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def accuracy(logits: Tensor, target: Tensor) -> float:
    """Top-1 accuracy of ``[N, C]`` logits (a ``score_fn`` for :func:`fit`)."""
    return float((logits.argmax(dim=1) == target).float().mean())


def step_time_records(
    seconds: Mapping[str, float], reference: str, *, dataset: str, config: dict
) -> list[dict]:
    """One record per method of ``seconds`` (per training step, timed in one run).

    Metrics: ``ms_per_step``, ``overhead_ms_vs_<reference>`` and ``step_time_vs_<reference>``
    (``reference`` lower-cased, spaces and dashes as underscores).
    """
    key = reference.lower().replace("-", "_").replace(" ", "_")
    base = seconds[reference]
    return [
        {
            "method": method,
            "dataset": dataset,
            "metrics": {
                "ms_per_step": 1000 * value,
                f"overhead_ms_vs_{key}": 1000 * (value - base),
                f"step_time_vs_{key}": value / base,
            },
            "config": dict(config),
        }
        for method, value in seconds.items()
    ]


def add_ratio_column(
    records: list[dict], reference_method: str, metric: str, column: str
) -> list[dict]:
    """Add ``column = metric / (metric of reference_method)`` to every record.

    Both sides come from the same run, so the machine's noise cancels as far as it can. A
    record without ``metric`` (a method it does not apply to), or every record when the
    reference lacks it, gets no ``column``: the report prints "—" there, and keeps "not
    finite" for a figure that was measured and came out NaN or infinite.
    """
    base = next(r["metrics"].get(metric) for r in records if r["method"] == reference_method)
    for r in records:
        value = r["metrics"].get(metric)
        if value is not None and base:
            r["metrics"][column] = value / base
    return records
