import math

import pytest
import torch
import torch.nn.functional as F

from casp import nt_xent, pseudo_labels, select_samples, stability_scores
from casp.functional import gather_with_grad


def nt_xent_loop(z1, z2, tau):
    """The reference's per-sample loop, written out."""
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for j in range(2 * n):
        pos = (j + n) % (2 * n)
        denom = sum(math.exp(float(u[j] @ u[k]) / tau) for k in range(2 * n) if k != j)
        total += -math.log(math.exp(float(u[j] @ u[pos]) / tau) / denom)
    return total / (2 * n)


def test_nt_xent_matches_the_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(nt_xent_loop(z1, z2, 0.5), rel=1e-5)
    assert nt_xent(z1, z2).item() == nt_xent(z1, z2, 0.5).item()  # the paper's τ by default
    # identical views of orthogonal samples: the positive dominates, the loss is small
    eye = torch.eye(4) * 10
    assert nt_xent(eye, eye, 0.1).item() < 0.01
    with pytest.raises(ValueError, match="both be"):
        nt_xent(torch.randn(3, 2), torch.randn(4, 2))


def test_gather_is_the_identity_outside_a_process_group():
    """``nt_xent(gather=True)`` in a single process (no process group) works as without it."""
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    assert gather_with_grad(z1) is z1
    assert nt_xent(z1, z2, gather=True).item() == nt_xent(z1, z2).item()


def test_stability_selection_on_a_hand_built_case():
    # 4 samples, 3 snapshots: sample 2 never moves, sample 0 moves a little, 1 and 3 a lot
    snaps = torch.tensor([[0.0, 1.0, 2.0, -1.0], [0.1, 2.0, 2.0, 1.0], [0.1, 0.0, 2.0, -2.0]])
    scores = stability_scores(snaps)
    torch.testing.assert_close(scores, torch.tensor([0.05, 1.5, 0.0, 2.5]))
    torch.testing.assert_close(pseudo_labels(snaps), torch.tensor([0.2 / 3, 1.0, 2.0, -2 / 3]))
    assert select_samples(scores, 0.5).tolist() == [0, 2]  # the two most stable
    assert select_samples(scores, 0.25).tolist() == [2]
    assert select_samples(scores, 0.5, "least_stable").tolist() == [1, 3]  # the reference bug
    assert select_samples(scores, 0.01).tolist() == [2]  # at least one sample


def test_classification_stability_uses_probabilities():
    snaps = torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.9, 0.1], [0.1, 0.9]]])
    torch.testing.assert_close(stability_scores(snaps), torch.tensor([0.0, 0.4]))
    with pytest.raises(ValueError, match=">= 2 snapshots"):
        stability_scores(torch.zeros(1, 3))
