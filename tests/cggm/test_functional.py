import math

import pytest
import torch

from cggm import (
    batch_score_counts,
    direction_loss,
    direction_loss_from_target,
    direction_target,
    magnitude_coefficients,
    segmentation_dice,
)


def test_reference_coefficients_by_hand():
    b = magnitude_coefficients(torch.tensor([0.2, 0.1, 0.3]), "reference")
    # S = 0.6: B = (S - Δ) / S
    torch.testing.assert_close(b, torch.tensor([0.4 / 0.6, 0.5 / 0.6, 0.3 / 0.6]))
    assert b.sum().item() == pytest.approx(2.0)  # M - 1
    two = magnitude_coefficients(torch.tensor([0.3, 0.1]), "reference")
    torch.testing.assert_close(two, torch.tensor([0.25, 0.75]))  # B_1 = Δ_2 / (Δ_1 + Δ_2)


def test_reference_coefficients_blow_up_where_default_stays_bounded():
    degenerate = torch.tensor([0.1, -0.1 + 1e-9])
    ref = magnitude_coefficients(degenerate, "reference")
    assert ref.abs().max() > 1e3  # the released code's instability when ΣΔ ≈ 0
    for deltas in (
        degenerate,
        torch.zeros(4),
        torch.tensor([0.5, -0.7, 0.0]),
        torch.tensor([float("nan"), 0.1, 0.2]),
    ):
        b = magnitude_coefficients(deltas, "default")
        assert torch.isfinite(b).all() and (b >= 0).all() and (b < 1).all()
        assert b.sum().item() == pytest.approx(len(deltas) - 1, rel=1e-5)
    assert magnitude_coefficients(torch.zeros(4)).tolist() == pytest.approx([0.75] * 4)
    b = magnitude_coefficients(torch.tensor([0.3, -0.2, 0.1]))
    assert b.argmax().item() == 1 and b.argmin().item() == 0  # least improving gets the most


def test_default_coefficients_are_the_papers_when_every_modality_improves():
    deltas = torch.tensor([0.30, 0.36, 0.30], dtype=torch.float64)
    paper = magnitude_coefficients(deltas, "reference")  # (S - Δ) / S: 0.69, 0.625, 0.69
    torch.testing.assert_close(magnitude_coefficients(deltas), paper, atol=2e-3, rtol=0)
    # the safeguard shifts only as far as a negative improvement needs: the most negative
    # counts as 0, the others keep their distances
    shifted = magnitude_coefficients(torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64))
    by_hand = magnitude_coefficients(torch.tensor([0.3, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(shifted, by_hand)
    torch.testing.assert_close(
        by_hand, torch.tensor([0.502 / 0.803, 0.802 / 0.803, 0.302 / 0.803], dtype=torch.float64)
    )


def test_direction_loss_by_hand():
    w = torch.randn(3, 4, requires_grad=True)
    b = torch.tensor([0.5, 1.0])
    loss = direction_loss(b, [w.detach().clone(), -w.detach().clone()], w)
    # cos = [1, -1]: (|0.5| + |1.0| - (0.5 - 1.0)) / 2 = 1.0
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    assert w.grad is not None  # it steers the head weight


def test_scores():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    total, count = batch_score_counts("classification", logits, torch.tensor([0, 1, 1]))
    assert (total / count).item() == pytest.approx(2 / 3)
    pred, y = torch.tensor([0.5, -0.2, 0.1, -1.0]), torch.tensor([1.0, 0.0, -2.0, -0.5])
    # sign accuracy, zero labels negative: [T, T(0 counts negative), F, T]
    total, count = batch_score_counts("regression", pred, y)
    assert (total / count).item() == pytest.approx(3 / 4)
    total, count = batch_score_counts("regression", pred, y, "neg_mae")
    assert (total / count).item() == pytest.approx(-(0.5 + 0.2 + 2.1 + 0.5) / 4)
    labels = torch.tensor([[[0, 1], [1, 2]]])
    target = torch.tensor([[[0, 1], [2, 2]]])
    # class 1: P={01,10} G={01} -> 2/3; class 2: P={11} G={10,11} -> 2/3
    assert segmentation_dice(labels, target, 3).item() == pytest.approx(2 / 3)
    seg_logits = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    total, count = batch_score_counts("segmentation", seg_logits, target)
    assert (total / count).item() == pytest.approx(2 / 3)
    assert (
        segmentation_dice(
            torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), 3
        ).item()
        == 1.0
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match=">= 2"):
        magnitude_coefficients(torch.tensor([0.1]))
    with pytest.raises(ValueError, match="mode"):
        magnitude_coefficients(torch.tensor([0.1, 0.2]), "paper")
    assert not math.isnan(magnitude_coefficients(torch.tensor([0.1, 0.2]), "reference")[0])


@pytest.mark.parametrize("stacked", [False, True])
def test_direction_loss_from_its_target_equals_the_cosine_form(stacked):
    g = torch.Generator().manual_seed(0)
    b = torch.tensor([0.7, 0.2, 0.1])
    heads = [torch.randn(4, 5, generator=g) for _ in range(3)]
    w = torch.randn(4, 5, generator=g, requires_grad=True)
    w_copy = w.detach().clone().requires_grad_()
    expected = direction_loss(b, torch.stack(heads) if stacked else heads, w)
    expected.backward()
    target = direction_target(b, torch.stack(heads) if stacked else heads)
    got = direction_loss_from_target(b, target, w_copy)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(w_copy.grad, w.grad)
    assert not target.requires_grad


def test_sign_score_thresholds_at_zero_not_at_the_unit():
    pred, y = torch.tensor([0.3, 0.6, -0.2, 0.1]), torch.tensor([0.4, 0.9, 0.0, -2.0])
    # signs (> 0): pred [+, +, -, +], y [+, +, - (zero counts negative), -]
    total, count = batch_score_counts("regression", pred, y)
    assert (total.item(), count.item()) == (3.0, 4.0)


def test_weighted_scores_count_only_the_weighted_samples():
    logits = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]],  # modality 0 predicts [0, 1, 0]
            [[0.0, 2.0], [0.0, 1.0], [0.0, 1.0]],  # modality 1 predicts [1, 1, 1]
        ]
    )
    target = torch.tensor([0, 1, 1])
    weights = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # 0: the sample lacks it
    total, count = batch_score_counts(
        "classification", logits, target, stacked=True, weights=weights
    )
    assert total.tolist() == [1.0, 2.0] and count.tolist() == [2.0, 2.0]
    one = batch_score_counts("classification", logits[0], target, weights=weights[0])
    assert [x.item() for x in one] == [1.0, 2.0]


def test_reference_coefficients_at_an_exactly_zero_sum_keep_the_released_sign():
    # S = 0 + 1e-8: B = (S - Δ) / S, about -2.5e7 and +2.5e7, not a division by zero
    b = magnitude_coefficients(torch.tensor([0.25, -0.25], dtype=torch.float64), "reference")
    assert b[0].item() == pytest.approx((1e-8 - 0.25) / 1e-8)
    assert b[1].item() == pytest.approx((1e-8 + 0.25) / 1e-8)


def test_non_finite_improvements_count_as_no_improvement():
    clean = magnitude_coefficients(torch.tensor([0.0, 0.1, 0.2, 0.0]))
    nan_inf = torch.tensor([float("nan"), 0.1, 0.2, float("inf")])
    torch.testing.assert_close(magnitude_coefficients(nan_inf), clean)


def test_a_zero_classifier_head_adds_nothing_to_the_direction_target():
    heads = torch.stack([torch.zeros(2, 3), torch.full((2, 3), 2.0)])
    target = direction_target(torch.tensor([0.5, 0.4]), heads)
    # the zero head has no direction; the other's unit vector (all 1/sqrt(6)) scaled by 0.4
    torch.testing.assert_close(target, torch.full((6,), 0.4 / math.sqrt(6)))
