"""Small, explicit training and evaluation loops shared by the benchmark tasks."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmcore import ModalityBatch

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class FitResult:
    """What :func:`fit` returns: the best validation score, its epoch and the time per step."""

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
    score_fn: Callable[[Tensor, Tensor], float],
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train with AdamW; keep the weights of the epoch with the best validation score.

    Only parameters with ``requires_grad`` are optimised. ``score_fn(outputs, targets)`` is
    higher-is-better (negate an error). The model ends in eval mode with the best weights.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit(): the model has no trainable parameters.")
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best = (-float("inf"), -1, copy.deepcopy(model.state_dict()))
    steps, train_seconds = 0, 0.0
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for batch in train.split(batch_size, shuffle=True, generator=generator):
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch), batch.target)
            loss.backward()
            optimiser.step()
            steps += 1
        train_seconds += time.perf_counter() - start
        score = score_fn(predict(model, valid), valid.target)
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
        if on_epoch is not None:
            on_epoch(epoch, score)
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(best[0], best[1], train_seconds / max(steps, 1), steps)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
