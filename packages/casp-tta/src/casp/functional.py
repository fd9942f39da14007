"""CASP's maths as pure functions: NT-Xent, stability scores, pseudo-labels and selection."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_with_grad", "nt_xent", "pseudo_labels", "select_samples", "stability_scores"]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` ``[n, d]`` from every rank, with gradient (identity outside DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


def nt_xent(z1: Tensor, z2: Tensor, tau: float = 0.5, gather: bool = False) -> Tensor:
    """SimCLR's NT-Xent between two views ``z1``, ``z2`` ``[N, d]`` (vectorised).

    ``u = normalise([z1; z2])``; for each of the ``2N`` embeddings the positive is the other view
    of the same sample and the negatives are the other ``2N − 2``:
    ``L = (1/2N) Σ_j −log softmax_{k≠j}(u_j·u_k / τ)[pos(j)]``. ``gather=True`` inside a
    process group: the negatives come from every rank, with gradient (every rank must call
    it). The default never communicates, so one rank may call it alone.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"nt_xent: views must both be [N, d], got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2]), dim=1)  # [2N, d]
    logits = u @ u.T / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=u.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(u.device)
    return F.cross_entropy(logits, positives)


def stability_scores(snapshots: Tensor) -> Tensor:
    """Mean absolute change between consecutive snapshots, per sample (lower = more stable).

    Args:
        snapshots: ``[K, N]`` predictions (regression), or ``[K, N, C]`` probabilities
            (classification) or values (regression with ``C`` outputs); the change is then the
            mean over the last axis.
    """
    if snapshots.ndim not in (2, 3) or snapshots.shape[0] < 2:
        raise ValueError(
            f"need >= 2 snapshots as [K, N] or [K, N, C], got shape {tuple(snapshots.shape)}."
        )
    change = (snapshots[1:] - snapshots[:-1]).abs()
    if change.ndim == 3:
        change = change.mean(dim=2)
    return change.mean(dim=0)


def pseudo_labels(snapshots: Tensor) -> Tensor:
    """Mean over snapshots: ``[N]`` predictions, or ``[N, C]`` probabilities or values."""
    return snapshots.mean(dim=0)


def select_samples(scores: Tensor, keep_ratio: float, keep: str = "most_stable") -> Tensor:
    """Indices of the kept samples (at least one), sorted.

    ``"most_stable"`` keeps the ``ceil(keep_ratio · N)`` lowest scores; ``"least_stable"`` keeps
    the highest, as the released code's ``s > quantile(s, 1 − keep_ratio)`` rule does.
    """
    if keep not in ("most_stable", "least_stable"):
        raise ValueError(f"keep must be 'most_stable' or 'least_stable', got {keep!r}.")
    n = scores.shape[0]
    k = max(1, int(torch.tensor(keep_ratio * n).ceil().item()))
    order = torch.argsort(scores, descending=(keep == "least_stable"), stable=True)
    return torch.sort(order[:k]).values
