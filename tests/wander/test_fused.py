"""The adapter's one-node forward (``wander.fused``) against the op-by-op computation."""

import pytest
import torch

import wander.functional
import wander.fused
from tests.wander.test_layer import build
from wander.fused import bottleneck_fusion, bottleneck_fusion_reference


def tensors(m=3, b=4, t=2, d=5, r=3, rt=2, rd=2, t_out=2, out=4, bias_augment=True, seed=0):
    """Inputs ``[M, B, T, D]``, parameters (leaves) and anchors, in float64."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((m, r, d), (m, r), (m, rt, t, t_out), (m, rd, r + int(bias_augment), out), (rt, rd))

    def draw(shape):
        return 0.7 * torch.randn(*shape, generator=g, dtype=torch.float64)

    x = draw((m, b, t, d))
    return x, [draw(s).requires_grad_() for s in shapes], [draw(s) for s in shapes]


@pytest.mark.parametrize("bias_augment", [True, False])
@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("inputs_need_grad", [True, False])
@pytest.mark.parametrize("sizes", [{}, {"t": 1, "t_out": 1, "rt": 1, "rd": 1}, {"m": 7, "b": 1}])
def test_one_node_equals_the_op_by_op_computation(
    bias_augment, centred, inputs_need_grad, sizes, projections
):
    x, params, anchors = tensors(bias_augment=bias_augment, **sizes)
    x.requires_grad_(inputs_need_grad)
    kw = {"bias_augment": bias_augment, "scale": 0.3}
    anchors = anchors if centred else None
    fast = bottleneck_fusion(x, params, anchors, **kw)
    slow = bottleneck_fusion_reference(x, params, anchors, **kw)
    torch.testing.assert_close(fast, slow)
    weights = torch.randn_like(fast)
    leaves = [*params, x] if inputs_need_grad else params
    for got, want in zip(
        torch.autograd.grad((fast * weights).sum(), leaves),
        torch.autograd.grad((slow * weights).sum(), leaves),
        strict=True,
    ):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("centred", [True, False])
def test_first_and_second_derivatives_match_finite_differences(centred, projections):
    """gradcheck and gradgradcheck (a gradient penalty differentiates the backward)."""
    x, params, anchors = tensors(m=2, b=2, d=3, r=2)
    x.requires_grad_()

    def fn(x, *ps):
        return bottleneck_fusion(x, ps, anchors if centred else None, scale=0.5)

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("inputs_need_grad", [True, False])
def test_each_sets_output_without_the_difference(inputs_need_grad, projections):
    """``difference=False``: ``[S, B, T', D]``, each set's own gradient path (a caller maps
    the sets further, differently from one another, as the residual output does)."""
    x, params, anchors = tensors(m=2, b=2, d=3, r=2)
    x.requires_grad_(inputs_need_grad)
    fast = bottleneck_fusion(x, params, anchors, scale=0.5, difference=False)
    slow = bottleneck_fusion_reference(x, params, anchors, scale=0.5, difference=False)
    assert fast.shape == (2, 2, 2, 4)
    torch.testing.assert_close(fast, slow)
    weights = torch.randn_like(fast)  # the sets weighted differently: no cancellation
    leaves = [*params, x] if inputs_need_grad else params
    for got, want in zip(
        torch.autograd.grad((fast * weights).sum(), leaves),
        torch.autograd.grad((slow * weights).sum(), leaves),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
    if inputs_need_grad:

        def fn(x, *ps):
            return bottleneck_fusion(x, ps, anchors, difference=False)

        assert torch.autograd.gradcheck(fn, (x, *params))
        assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_frozen_parameters_and_anchors_get_no_gradient():
    """Only what needs a gradient gets one; the anchors are constants."""
    x, params, anchors = tensors()
    anchors = [a.requires_grad_() for a in anchors]
    frozen = [p.detach() if i in (0, 3) else p for i, p in enumerate(params)]
    bottleneck_fusion(x, frozen, anchors).square().sum().backward()
    assert [p.grad is not None for p in frozen] == [False, True, True, False, True]
    assert all(a.grad is None for a in anchors)


def test_wrong_tensors_are_a_clear_error():
    x, params, anchors = tensors()
    with pytest.raises(ValueError, match="takes the tensors"):
        bottleneck_fusion(x, params[:4])
    with pytest.raises(ValueError, match="takes the tensors"):
        bottleneck_fusion(x, params, anchors[:3])
    with pytest.raises(ValueError, match=r"expects x \[M, B, T, D_in\].*got \(3, 4, 2\)"):
        bottleneck_fusion(x[..., 0], params)
    with pytest.raises(ValueError, match=r"down_weight \[M, r, D_in\]"):
        bottleneck_fusion(x[:2], params)  # two modalities' inputs, three modalities' weights


def layer_and_inputs(init="centered", **kw):
    """A layer of one hidden size and length (stacked), moved off its init."""
    layer, _ = build(
        4, init=init, dims=dict.fromkeys("abcd", 6), lens=dict.fromkeys("abcd", 3), **kw
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    return layer, {m: torch.randn(5, 3, 6, generator=g) for m in "abcd"}


def outputs_and_grads(layer, xs, **kw):
    """The output (stacked over modalities in residual mode) and every parameter's gradient."""
    layer.zero_grad()
    out = layer(xs, **kw)
    if isinstance(out, dict):
        out = torch.stack(list(out.values()))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, {n: p.grad.clone() for n, p in layer.named_parameters()}


VARIANTS = {
    "centred": {},
    "no constant channel": {"bias_augment": False},
    "reference init": {"init": "reference"},
    "gate": {"init": "gate"},
    "residual": {"output": "residual"},
    "residual, reference init": {"output": "residual", "init": "reference"},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("inputs_need_grad", [True, False])
def test_the_layer_takes_the_one_node_path_with_the_general_paths_results(
    variant, inputs_need_grad, monkeypatch
):
    """Fused output without a gate: the whole output in the node; a gate or the residual
    output: every parameter set's fused tokens from the node, mapped further op by op."""
    layer, xs = layer_and_inputs(**VARIANTS[variant])
    calls = []
    real = wander.fused.bottleneck_fusion
    monkeypatch.setattr(
        "wander.layer.bottleneck_fusion", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    xs = {m: x.requires_grad_(inputs_need_grad) for m, x in xs.items()}
    fast, fast_grads = outputs_and_grads(layer, xs)
    fast_input_grads = [x.grad.clone() for x in xs.values()] if inputs_need_grad else []
    assert calls == [1]
    layer.one_node = False
    for x in xs.values():
        x.grad = None
    slow, slow_grads = outputs_and_grads(layer, xs)
    assert calls == [1]
    torch.testing.assert_close(fast, slow)
    for name, g in slow_grads.items():
        torch.testing.assert_close(fast_grads[name], g, msg=name)
    if inputs_need_grad:
        for got, x in zip(fast_input_grads, xs.values(), strict=True):
            assert got.abs().sum() > 0
            torch.testing.assert_close(got, x.grad)


@pytest.mark.parametrize(
    "case", ["padding", "presence", "shorter", "cp reference", "not stacked", "residual padding"]
)
def test_the_layer_takes_the_general_path_where_the_one_node_path_does_not_apply(case, monkeypatch):
    options = {
        "cp reference": {"cp_mode": "reference"},
        "not stacked": {"stack_parameters": False},
        "residual padding": {"output": "residual"},
    }
    layer, xs = layer_and_inputs(**options.get(case, {}))
    kwargs = {}
    if case in ("padding", "residual padding"):
        kwargs["padding_masks"] = {"a": torch.zeros(5, 3, dtype=torch.bool)}
    if case == "presence":
        kwargs["presence"] = {"b": torch.tensor([True, False, True, True, True])}
    if case == "shorter":
        xs["c"] = xs["c"][:, :2]
    monkeypatch.setattr("wander.layer.bottleneck_fusion", None)  # fails if called
    out = layer(xs, **kwargs)
    assert all(torch.isfinite(v).all() for v in (out.values() if isinstance(out, dict) else [out]))


def test_inputs_shorter_than_built_for_take_the_one_node_path_alike():
    """Every modality shorter by the same amount: the token factors' first rows, one node."""
    layer, xs = layer_and_inputs()
    short = {m: x[:, :2] for m, x in xs.items()}
    fast, fast_grads = outputs_and_grads(layer, short)
    layer.one_node = False
    slow, slow_grads = outputs_and_grads(layer, short)
    torch.testing.assert_close(fast, slow)
    for name, g in slow_grads.items():
        torch.testing.assert_close(fast_grads[name], g, msg=name)


def test_the_one_node_path_traces_under_torch_compile():
    """Dynamo traces the Function, forward and hand-written backward, into one graph (from
    torch 2.4; torch 2.2's dynamo cannot read ``ctx.needs_input_grad`` and runs it eagerly
    between two graphs): the compiled layer gives eager's values and gradients."""
    layer, xs = layer_and_inputs()
    eager, eager_grads = outputs_and_grads(layer, xs)
    one_graph = torch.__version__ >= "2.4"
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=one_graph)
    out, grads = outputs_and_grads(compiled, xs)
    torch.testing.assert_close(out, eager)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[f"_orig_mod.{name}"], g, msg=name)
