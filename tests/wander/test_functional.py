import pytest
import torch

import wander.functional
from wander import dense_fusion, fusion_product
from wander.functional import fusion_product_sets, fusion_product_stacked


def factors(m, r=2, t_out=2, d=3, rt=2, rd=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = [1, 3, 2, 2, 1][:m]
    hs = [torch.randn(2, t, r, generator=g, dtype=torch.float64) for t in lens]
    qs = [torch.randn(rt, t, t_out, generator=g, dtype=torch.float64) for t in lens]
    ps = [torch.randn(rd, r, d, generator=g, dtype=torch.float64) for _ in lens]
    lam = torch.randn(rt, rd, generator=g, dtype=torch.float64)
    return hs, qs, ps, lam


@pytest.mark.parametrize("cp_mode", ["true", "reference"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_fast_path_equals_dense_cp_reconstruction(cp_mode, m):
    hs, qs, ps, lam = factors(m)
    fast = fusion_product(hs, qs, ps, lam, cp_mode)
    dense = dense_fusion(hs, qs, ps, lam, cp_mode)
    assert fast.shape == (2, 2, 3)
    torch.testing.assert_close(fast, dense)


@pytest.mark.parametrize("cp_mode", ["true", "reference"])
def test_parameter_sets_share_calls_and_equal_separate_calls(cp_mode):
    sets = [factors(3, seed=s) for s in (0, 1, 2)]
    together = fusion_product_sets(
        [x[0] for x in sets],
        [x[1] for x in sets],
        [x[2] for x in sets],
        [x[3] for x in sets],
        cp_mode,
    )
    assert together.shape == (3, 2, 2, 3)
    for i, (hs, qs, ps, lam) in enumerate(sets):
        torch.testing.assert_close(together[i], dense_fusion(hs, qs, ps, lam, cp_mode))


def test_true_and_reference_agree_at_rank_one():
    hs, qs, ps, _ = factors(3, rt=1, rd=1)
    torch.testing.assert_close(
        fusion_product(hs, qs, ps, torch.ones(1, 1, dtype=torch.float64), "true"),
        fusion_product(hs, qs, ps, None, "reference"),
    )


def test_reference_mode_is_rank_one_true_mode_is_not():
    """Summing factor stacks first is one rank-one term: true CP with R > 1 is richer."""
    hs, qs, ps, lam = factors(2, rt=2, rd=2)
    collapsed = fusion_product(
        hs,
        [q.sum(0, keepdim=True) for q in qs],
        [p.sum(0, keepdim=True) for p in ps],
        torch.ones(1, 1, dtype=torch.float64),
        "true",
    )
    torch.testing.assert_close(collapsed, fusion_product(hs, qs, ps, None, "reference"))
    assert not torch.allclose(fusion_product(hs, qs, ps, lam, "true"), collapsed)


def test_bad_arguments():
    hs, qs, ps, lam = factors(2)
    with pytest.raises(ValueError, match=">= 2 modalities"):
        fusion_product(hs[:1], qs[:1], ps[:1], lam)
    with pytest.raises(ValueError, match="cp_mode"):
        fusion_product(hs, qs, ps, lam, "paper")
    with pytest.raises(ValueError, match="CP weights"):
        fusion_product(hs, qs, ps, None, "true")
    h = torch.zeros(1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"expects h \[S, M, B, T, r\]"):
        fusion_product_stacked(
            h, torch.zeros(1, 2, 1, 4, 2), torch.zeros(1, 2, 1, 6, 3), None, "reference"
        )
    q, p = torch.zeros(1, 2, 2, 4, 2), torch.zeros(1, 2, 3, 5, 3)
    with pytest.raises(ValueError, match=r"weights \[S, R_t, R_d\] = \[1, 2, 3\]"):
        fusion_product_stacked(h, q, p, torch.zeros(1, 3, 2))


@pytest.mark.parametrize("cp_mode", ["true", "reference"])
@pytest.mark.parametrize("lens", [(2, 1), (1, 1, 1), (3, 2, 1, 2)])
def test_hand_written_backward_matches_finite_differences(cp_mode, lens, projections):
    """gradcheck of the fused kernel, with zero rows (padding) so some products are exactly 0."""
    g = torch.Generator().manual_seed(0)
    s, m, b, t, r, rt, t_out, rd, d = 2, len(lens), 3, max(lens), 2, 2, 2, 3, 2

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    h, q = leaf(s, m, b, t, r), leaf(s, m, rt, t, t_out)
    with torch.no_grad():  # rows past each modality's length are zero, as the layer feeds them
        for i, length in enumerate(lens):
            h[:, i, :, length:] = 0
            q[:, i, :, length:] = 0
    p, w = leaf(s, m, rd, r, d), leaf(s, rt, rd)
    args = (h, q, p, w if cp_mode == "true" else None)

    def fn(*xs):
        return fusion_product_stacked(*xs, cp_mode=cp_mode)

    assert torch.autograd.gradcheck(fn, args)
    # one input requiring grad at a time (a frozen factor, say): the others' gradients are
    # skipped, that one's is still exact
    inputs = [x for x in args if x is not None]
    expected = torch.autograd.grad(fn(*args).square().sum(), inputs)
    for i, want in enumerate(expected):
        alone = [x.detach().requires_grad_(j == i) for j, x in enumerate(inputs)]
        out = fn(*alone) if cp_mode == "true" else fn(*alone, None)
        (got,) = torch.autograd.grad(out.square().sum(), alone[i])
        torch.testing.assert_close(got, want)


def test_second_derivatives_match_finite_differences(projections):
    """A gradient penalty differentiates the hand-written backward: it must be exact too."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    args = (leaf(2, 3, 2, 2, 2), leaf(2, 3, 2, 2, 2), leaf(2, 3, 2, 2, 3), leaf(2, 2, 2))
    assert torch.autograd.gradgradcheck(fusion_product_stacked, args)


def test_constant_sets_skip_the_backward_with_exact_gradients_of_the_others(projections):
    """``trainable_sets=1``: set 0 differentiates exactly (first and second order), the
    constant set 1 (the centred init's frozen copy) gets zeros."""
    g = torch.Generator().manual_seed(0)
    shapes = ((3, 2, 2, 2), (3, 2, 2, 2), (3, 2, 2, 3), (2, 2))
    variables = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    constants = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]

    def fn(*xs, trainable_sets=1):
        stacked = [torch.stack([x, c]) for x, c in zip(xs, constants, strict=True)]
        return fusion_product_stacked(*stacked, trainable_sets=trainable_sets)

    assert torch.autograd.gradcheck(fn, variables)
    assert torch.autograd.gradgradcheck(fn, variables)
    loss = fn(*variables).square().sum()
    expected = torch.autograd.grad(fn(*variables, trainable_sets=None).square().sum(), variables)
    for got, want in zip(torch.autograd.grad(loss, variables), expected, strict=True):
        torch.testing.assert_close(got, want)
    stacked = [
        torch.stack([x, c]).detach().requires_grad_()
        for x, c in zip(variables, constants, strict=True)
    ]
    fusion_product_stacked(*stacked, trainable_sets=1).sum().backward()
    assert all(not x.grad[1].any() for x in stacked)
    with pytest.raises(ValueError, match=r"trainable_sets must be in \[1, 2\]"):
        fusion_product_stacked(*stacked, trainable_sets=3)


def test_large_projections_are_recomputed_not_saved():
    """Above ``_SAVED_PROJECTIONS_MAX`` values, the forward saves neither the per-modality
    projections nor their product (M + 1 times the output's size) and the backward recomputes
    them: the same gradients, bit for bit, from a fraction of the saved bytes."""
    g = torch.Generator().manual_seed(0)
    s_, m, b, t, r, rt, t_out, rd, d = 2, 3, 128, 1, 4, 1, 1, 1, 512
    shapes = ((s_, m, b, t, r), (s_, m, rt, t, t_out), (s_, m, rd, r, d), (s_, rt, rd))
    inputs = [torch.randn(*x, generator=g).requires_grad_() for x in shapes]

    def run():
        saved = []

        def pack(x):
            saved.append(x.untyped_storage().nbytes())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fusion_product_stacked(*inputs, trainable_sets=1)
        grads = torch.autograd.grad(out.square().sum(), inputs)
        return sum(saved), grads

    z_values = s_ * m * b * d
    assert z_values > wander.functional._SAVED_PROJECTIONS_MAX
    recomputed_bytes, recomputed = run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wander.functional, "_SAVED_PROJECTIONS_MAX", z_values)
        saved_bytes, saved = run()
    for a, b_ in zip(recomputed, saved, strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    # z and its product, each saved as a slice of a storage that holds every set
    assert saved_bytes - recomputed_bytes == 4 * (m + 1) * s_ * b * d
