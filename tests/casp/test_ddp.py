"""With gather=True the NT-Xent negatives are gathered from every rank, with gradient."""

import torch

from casp import nt_xent
from tests.distributed import run_ranks

G = torch.Generator().manual_seed(0)
Z1, Z2 = torch.randn(8, 3, generator=G), torch.randn(8, 3, generator=G)


def _local(rank, world):
    rows = slice(4 * rank, 4 * rank + 4)
    z1 = Z1[rows].clone().requires_grad_(True)
    z2 = Z2[rows].clone().requires_grad_(True)
    loss = nt_xent(z1, z2, 0.5, gather=True)
    loss.backward()
    return loss.item(), z1.grad, nt_xent(Z1[rows], Z2[rows], 0.5).item()


def test_negatives_are_gathered_with_gradient():
    z1, z2 = Z1.clone().requires_grad_(True), Z2.clone().requires_grad_(True)
    full = nt_xent(z1, z2, 0.5, gather=False)
    full.backward()
    results = run_ranks(_local)
    for rank, (loss, grad, default) in enumerate(results):
        assert abs(loss - full.item()) < 1e-6  # every rank saw all 16 embeddings
        rows = slice(4 * rank, 4 * rank + 4)  # by default, only this rank's 8 (no collective)
        assert default == nt_xent(Z1[rows], Z2[rows], 0.5).item() != loss
        # every rank computes the same loss; all_gather's backward sums them: world x the grad
        torch.testing.assert_close(grad, 2 * z1.grad[4 * rank : 4 * rank + 4])
