"""Keeping the ranks of a distributed adaptation in step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmcore import collective_device

__all__ = [
    "average_buffers_over_ranks",
    "average_grads_over_ranks",
    "check_equal_shards",
    "mean_over_ranks",
]


def check_equal_shards(size: int) -> None:
    """Every rank of the default group holds ``size`` samples (else a clear error on all)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "CASP(distributed=True) needs an initialised process group "
            "(torch.distributed.init_process_group); without one, use distributed=False."
        )
    device = collective_device()
    sizes = [torch.zeros((), dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(size, device=device))
    found = [int(n) for n in sizes]
    if len(set(found)) > 1:
        raise ValueError(
            f"CASP(distributed=True): the ranks hold {found} samples; each must hold the same "
            "number, so that they take the same number of steps (a DistributedSampler pads)."
        )


def average_buffers_over_ranks(model: nn.Module) -> None:
    """Average the floating buffers (BatchNorm's running statistics) over the ranks.

    Each rank's forward passes update them from its own batches; averaged after every step, the
    ranks keep one model (DDP would broadcast rank 0's instead).
    """
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    for buffer, mean in zip(buffers, mean_over_ranks(buffers), strict=True):
        buffer.copy_(mean)


def average_grads_over_ranks(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks.

    A parameter with no gradient on this rank counts as a zero gradient: another rank may have
    one, and every rank must take part in the same call.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, mean in zip(params, mean_over_ranks(grads), strict=True):
        p.grad = mean


def mean_over_ranks(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor's mean over the ranks, in one all-reduce whatever their dtypes."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    chunks = flat.split([t.numel() for t in tensors])
    return [c.view_as(t).to(t.dtype) for t, c in zip(tensors, chunks, strict=True)]
