import pytest
import torch

from tests.helpers import adapter_grads
from wander import WanderConfig, WanderFusion


def build(m=3, init="centered", output="fused", cp_mode="true", dims=None, lens=None, **kw):
    dims = dims or {f"m{i}": 4 + i for i in range(m)}
    lens = lens or {f"m{i}": 2 + i % 3 for i in range(m)}
    cfg = WanderConfig(
        bottleneck_dim=4,
        feature_rank=2,
        token_rank=3,
        num_fused_tokens=2,
        init=init,
        output=output,
        cp_mode=cp_mode,
        **kw,
    )
    torch.manual_seed(0)
    layer = WanderFusion(dims, lens, out_dim=5, config=cfg)
    g = torch.Generator().manual_seed(1)
    xs = {k: torch.randn(6, lens[k], d, generator=g) for k, d in dims.items()}
    return layer, xs


def nonzero_grads(layer):
    """Whether each parameter's gradient is non-zero (each modality's, for a stacked one)."""
    return {n: g is not None and bool(g.abs().sum() > 0) for n, g in adapter_grads(layer).items()}


@pytest.mark.parametrize("m", range(2, 8))
@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("one_shape", [False, True])
def test_centered_init_is_identity_with_live_gradients(m, output, one_shape):
    names = [f"m{i}" for i in range(m)]
    shapes = {"dims": dict.fromkeys(names, 4), "lens": dict.fromkeys(names, 3)}
    layer, xs = build(m, output=output, **(shapes if one_shape else {}))
    # all stacked, or only the feature factors: every modality's slice is checked below
    assert ("token_factors" in layer.stacked_kinds) == one_shape
    out = layer(xs)
    values = out.values() if isinstance(out, dict) else [out]
    assert all(v.abs().max() == 0 for v in values)
    if output == "residual":
        assert {k: v.shape for k, v in out.items()} == {k: x.shape for k, x in xs.items()}
    sum(v.pow(2).sum() + v.sum() for v in values).backward()
    grads = nonzero_grads(layer)
    assert all(grads.values()), [n for n, ok in grads.items() if not ok]


def test_gate_init_identity_then_every_parameter_trains():
    layer, xs = build(init="gate")
    out = layer(xs)
    assert out.abs().max() == 0
    out.sum().backward()
    grads = nonzero_grads(layer)
    assert grads["gate"] and not any(v for n, v in grads.items() if n != "gate")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    layer(xs).sum().backward()
    assert all(nonzero_grads(layer).values())


def test_reference_init_is_dead():
    """The released init (all token factors zero) gives exactly zero gradients, forever."""
    layer, xs = build(init="reference", cp_mode="reference")
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    for _ in range(3):
        out = layer(xs)
        assert out.abs().max() == 0
        (out - 1).pow(2).sum().backward()
        assert not any(nonzero_grads(layer).values())
        opt.step()
        opt.zero_grad()
    for n, p in layer.named_parameters():
        assert torch.equal(p, before[n]), n  # nothing ever moves


@pytest.mark.parametrize("m", [2, 4, 7])
@pytest.mark.parametrize("cp_mode", ["true", "reference"])
def test_scale_neither_explodes_nor_vanishes(m, cp_mode):
    layer, _ = build(m, cp_mode=cp_mode)
    g = torch.Generator().manual_seed(0)
    xs = {
        k: 10 * torch.randn(512, t, layer.hidden_dims[k], generator=g)
        for k, t in layer.seq_lens.items()
    }
    std = layer.raw_output(xs).std().item()
    # unit variance in expectation; one draw of small random factors spreads it (log-normally)
    assert 0.05 < std < 20


def test_padding_changes_nothing_and_short_sequences_are_padding():
    for output in ("fused", "residual"):
        layer, xs = build(output=output)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))  # move away from the zero-output init
        k = "m1"  # length 3
        mask = torch.zeros(6, 3, dtype=torch.bool)
        mask[:, 2] = True
        garbage = dict(xs)
        garbage[k] = xs[k].clone()
        garbage[k][:, 2] = 1e4
        a = layer(xs, {k: mask})
        b = layer(garbage, {k: mask})
        short = dict(xs)
        short[k] = xs[k][:, :2]
        c = layer(short)
        if output == "fused":
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(a, c)
        else:
            for name in a:
                torch.testing.assert_close(a[name], b[name])
            assert a[k][:, 2].abs().max() == 0  # no residual on padded positions
            torch.testing.assert_close(a[k][:, :2], c[k])


@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("bias_augment", [False, True])
@pytest.mark.parametrize("shared_size", [False, True])
def test_missing_modalities_are_never_read(output, bias_augment, shared_size):
    dims = dict.fromkeys(("m0", "m1", "m2"), 4) if shared_size else None
    layer, xs = build(output=output, bias_augment=bias_augment, dims=dims)
    assert layer.stack_modalities == shared_size  # both bottleneck paths run
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))  # move away from the zero-output init
    present = {"m1": torch.tensor([False, True, True, False, True, True])}
    garbage = {**xs, "m1": xs["m1"].clone()}
    garbage["m1"][[0, 3]] = 1e4
    a, b, full = layer(xs, presence=present), layer(garbage, presence=present), layer(xs)
    raw = layer.raw_output(xs, presence=present)
    if output == "residual":
        for m in a:
            torch.testing.assert_close(a[m], b[m])
            torch.testing.assert_close(a[m][1:3], full[m][1:3])  # present samples unchanged
        assert a["m1"][[0, 3]].abs().max() == 0  # no residual for a modality it lacks
        return
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[[1, 2, 4, 5]], full[[1, 2, 4, 5]])
    if not bias_augment:  # the product over modalities vanishes: the adapter adds nothing
        assert raw[[0, 3]].abs().max() == 0
        return
    # the constant channel keeps the other modalities' terms: they still move the output
    other = {**xs, "m0": torch.randn_like(xs["m0"])}
    assert not torch.allclose(layer(other, presence=present)[0], a[0])


def test_parameter_count_matches_the_formula():
    layer, _ = build(m=3, cp_mode="true", init="gate")
    r, rd, rt, t_out, d = 4, 2, 3, 2, 5
    dims, lens = [4, 5, 6], [2, 3, 4]
    expected = (
        sum((dm + 1) * r for dm in dims) + rt * t_out * sum(lens) + 3 * rd * r * d + rt * rd + d
    )
    assert sum(p.numel() for p in layer.parameters()) == expected


def test_bad_input_raises_clear_errors():
    layer, xs = build()
    too_long = dict(xs)
    too_long["m0"] = torch.randn(6, 9, 4)
    with pytest.raises(ValueError, match=r"'m0' has sequence length 9 .* at most 2"):
        layer(too_long)
    wrong = dict(xs)
    wrong["m0"] = torch.randn(6, 2, 7)
    with pytest.raises(ValueError, match=r"'m0' expected \[B, T, 4\]"):
        layer(wrong)
    with pytest.raises(ValueError, match=r"no features for modalities \['m2'\]"):
        layer({k: v for k, v in xs.items() if k != "m2"})
    with pytest.raises(ValueError, match=r"presence mask of modality 'm1' must be bool \(6,\)"):
        layer(xs, presence={"m1": torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match=">= 2 modalities"):
        WanderFusion({"a": 3}, {"a": 2}, 4, WanderConfig())
    with pytest.raises(ValueError, match="cp_mode must be one of"):
        WanderConfig(cp_mode="paper")
    with pytest.raises(ValueError, match="bottleneck_dim must be a positive integer"):
        WanderConfig(bottleneck_dim=0)
    with pytest.raises(ValueError, match="dropout"):
        WanderConfig(dropout=1.5)


@pytest.mark.parametrize("m", [2, 4, 7])
@pytest.mark.parametrize("cp_mode", ["true", "reference"])
def test_bias_augment_starts_near_the_first_order_expansion(m, cp_mode):
    """With the constant channel, each Z_m starts at 1 + ε_m: the product is ≈ 1 + Σ ε_m."""
    layer, _ = build(m, cp_mode=cp_mode, bias_augment=True, interaction_init=0.1)
    g = torch.Generator().manual_seed(0)
    xs = {
        k: torch.randn(512, t, layer.hidden_dims[k], generator=g) for k, t in layer.seq_lens.items()
    }
    out = layer.raw_output(xs)
    # ε_m has a non-zero mean (GELU features are positive on average): near 1, not exactly 1
    assert 0.7 < out.mean().item() < 1.5
    # the fluctuation grows like sqrt(M) · ε, not exponentially in M
    assert 0.02 < out.std().item() < 0.6


def test_bias_augment_init_is_identity_with_live_gradients():
    layer, xs = build(5, bias_augment=True)
    out = layer(xs)
    assert out.abs().max() == 0
    (out.pow(2).sum() + out.sum()).backward()
    assert all(nonzero_grads(layer).values())


def test_interaction_init_zero_is_purely_additive_at_init():
    """ε = 0 exactly: every projection is the constant 1, whatever the input."""
    layer, xs = build(3, bias_augment=True, interaction_init=0.0)
    assert torch.allclose(layer.raw_output(xs), torch.ones(1))


@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("cp_mode", ["true", "reference"])
@pytest.mark.parametrize("bias_augment", [False, True])
def test_shared_hidden_size_runs_one_batched_call_equal_to_the_per_modality_path(
    output, cp_mode, bias_augment
):
    dims, lens = dict.fromkeys(("a", "b", "c"), 6), {"a": 2, "b": 4, "c": 3}
    layer, _ = build(
        output=output, cp_mode=cp_mode, dims=dims, lens=lens, bias_augment=bias_augment
    )
    assert layer.stack_modalities
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    xs = {k: torch.randn(4, lens[k], 6, generator=g) for k in dims}
    xs["b"] = xs["b"][:, :3]  # shorter than built for: treated as padding
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1:, 2] = True
    xs["c"][1:, 2] = float("inf")  # padding may hold anything
    masks = {"c": mask}

    def run(stacked):
        layer.stack_modalities = stacked
        layer.zero_grad()
        out = layer(xs, masks)
        values = list(out.values()) if isinstance(out, dict) else [out]
        sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in values).backward()
        return values, {n: p.grad.clone() for n, p in layer.named_parameters()}

    fast, fast_grads = run(True)
    slow, slow_grads = run(False)
    assert all(torch.isfinite(v).all() for v in fast)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b)
    for name in slow_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name])


@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("init", ["centered", "gate"])
def test_fast_parameter_lookup_lists_exactly_the_named_parameters(output, init):
    layer, _ = build(output=output, init=init)
    current = layer._current()
    named = dict(layer.named_parameters())
    assert sorted(current) == sorted(named)
    assert all(current[k] is named[k] for k in named)


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_runs_under_autocast_with_gradients_close_to_float32(output):
    """Under AMP the bottleneck arrives in bfloat16 and the factors in float32: no dtype clash."""
    layer, xs = build(output=output, bias_augment=True)

    def grads(autocast: bool) -> dict[str, torch.Tensor]:
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(xs)
        values = out.values() if isinstance(out, dict) else [out]
        sum(v.float().square().sum() for v in values).backward()
        return {n: p.grad.clone() for n, p in layer.named_parameters()}

    reference, mixed = grads(False), grads(True)
    for name, g in mixed.items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, reference[name], rtol=0.1, atol=0.05 * g.abs().max())


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_frozen_inputs_skip_the_anchor_backward_with_the_same_gradients(output):
    """Inputs that need no gradient (a frozen backbone) let the centred init's backward skip
    its frozen copy; inputs that need one take the full path. Both give the same gradients."""
    layer, xs = build(4, output=output)
    with torch.no_grad():  # move off the init so the adapter's output is not zero
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def grads(inputs):
        layer.zero_grad()
        out = layer(inputs)
        values = out.values() if isinstance(out, dict) else [out]
        sum(v.pow(2).sum() for v in values).backward()
        return {n: p.grad.clone() for n, p in layer.named_parameters()}

    frozen = grads(xs)
    live_inputs = {k: x.clone().requires_grad_() for k, x in xs.items()}
    full = grads(live_inputs)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in live_inputs.values())
    for name, g in frozen.items():
        torch.testing.assert_close(g, full[name], msg=name)


@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("cp_mode", ["true", "reference"])
@pytest.mark.parametrize("same_dims", [False, True])
def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(output, cp_mode, same_dims):
    # a sampler or a filter can leave no sample; the fused kernel's reshapes must not guess B
    dims = {f"m{i}": 4 for i in range(3)} if same_dims else None
    layer, xs = build(output=output, cp_mode=cp_mode, dims=dims, init="gate")
    empty = {k: x[:0] for k, x in xs.items()}
    out = layer(empty)
    values = list(out.values()) if isinstance(out, dict) else [out]
    if output == "residual":
        assert {k: v.shape for k, v in out.items()} == {k: x.shape for k, x in empty.items()}
    else:
        assert out.shape == (0, 2, 5)
    sum(v.sum() for v in values).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layer.parameters())


def layouts(output, init="centered", dims=None, lens=None):
    """The same adapter (same seed, so the same initial values) in both parameter layouts."""
    dims = dims or dict.fromkeys(("a", "b", "c"), 6)
    lens = lens or dict.fromkeys(dims, 3)
    (stacked, xs), (per_modality, _) = (
        build(init=init, output=output, dims=dims, lens=lens, stack_parameters=stack)
        for stack in (True, False)
    )
    return stacked, per_modality, xs


def outputs_and_grads(layer, xs, masks=None):
    layer.zero_grad()
    out = layer(xs, masks)
    values = list(out.values()) if isinstance(out, dict) else [out]
    sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in values).backward()
    return values, {k: v.grad.clone() for k, v in layer.named_parameters()}


@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("init", ["centered", "gate", "reference"])
def test_stacked_parameters_are_few_and_their_state_dict_is_per_modality(output, init):
    stacked, per_modality, _ = layouts(output, init)
    # one tensor per kind instead of one per modality and kind
    assert stacked.stacked_kinds == (
        ("down_weight", "down_bias", "token_factors", "feature_factors")
        + (("up_tokens", "up_features") if output == "residual" else ())
    )
    assert per_modality.stacked_kinds == ()
    n_kinds = len(stacked.stacked_kinds)
    assert len(list(per_modality.parameters())) - len(list(stacked.parameters())) == 2 * n_kinds
    # the checkpoint format does not depend on the layout: the same keys, shapes and values
    a, b = stacked.state_dict(), per_modality.state_dict()
    assert sorted(a) == sorted(b)
    assert "down.a.weight" in a and "token_factors.c" in a and "feature_factors.b" in a
    if init == "centered":
        assert "anchor__down__a__weight" in a and "anchor__feature_factors__c" in a
    for key in b:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("inputs", ["full", "padded", "shorter and padded"])
def test_both_layouts_compute_the_same_and_load_each_others_state(output, inputs):
    stacked, per_modality, xs = layouts(output)
    masks = None
    if inputs != "full":  # padding (and one input shorter than built for): the stacked token
        masks = {"c": torch.tensor([[False, False, True]] * 6)}  # factors are read past
    if inputs == "shorter and padded":  # those lengths, on zero features
        xs = {**xs, "b": xs["b"][:, :2]}
    with torch.no_grad():
        for p in stacked.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the zero-output init
    per_modality.load_state_dict(stacked.state_dict())
    out_a, grads_a = outputs_and_grads(stacked, xs, masks)
    out_b, grads_b = outputs_and_grads(per_modality, xs, masks)
    for a, b in zip(out_a, out_b, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)
    # a stacked parameter's gradient holds each modality's, in the state dict's order
    assert len(stacked.stacked_kinds) >= 4
    for kind in stacked.stacked_kinds:
        for i, m in enumerate(stacked.modalities):
            key = f"down.{m}.{kind[5:]}" if kind.startswith("down_") else f"{kind}.{m}"
            torch.testing.assert_close(grads_a[kind][i], grads_b[key])
    fresh, _, _ = layouts(output)
    fresh.load_state_dict(per_modality.state_dict())  # and back
    for a, b in zip(outputs_and_grads(fresh, xs, masks)[0], out_a, strict=True):
        torch.testing.assert_close(a, b)


def test_state_dict_entries_of_stacked_parameters_are_live_views():
    stacked, _, _ = layouts("fused")
    state = stacked.state_dict()
    with torch.no_grad():
        state["token_factors.b"].fill_(3.0)
    assert (stacked.token_factors[1] == 3.0).all() and not (stacked.token_factors[0] == 3.0).any()


def test_loading_reports_a_missing_or_misshapen_modality_entry_by_its_own_name():
    stacked, _, _ = layouts("fused")
    before = stacked.feature_factors.detach().clone()
    state = stacked.state_dict()
    state = {k: v.clone() + 1 for k, v in state.items()}
    del state["feature_factors.b"]
    state["down.c.weight"] = torch.zeros(4, 7)
    with pytest.raises(RuntimeError) as err:
        stacked.load_state_dict(state)
    message = str(err.value)
    assert 'Missing key(s) in state_dict: "feature_factors.b"' in message
    assert "size mismatch for down.c.weight" in message
    result = stacked.load_state_dict(
        {k: v for k, v in state.items() if k != "down.c.weight"}, False
    )
    assert result.missing_keys == ["down.c.weight", "feature_factors.b"]
    assert not result.unexpected_keys
    # the missing modality keeps its value; the others are loaded
    torch.testing.assert_close(stacked.feature_factors[1], before[1], rtol=0, atol=0)
    torch.testing.assert_close(stacked.feature_factors[0], before[0] + 1)


def test_modalities_of_different_shapes_keep_one_tensor_each_where_they_differ():
    dims, lens = {"a": 6, "b": 6, "c": 5}, {"a": 3, "b": 2, "c": 3}
    stacked, per_modality, xs = layouts("residual", dims=dims, lens=lens)
    # the hidden sizes differ (down, up_features) and so do the lengths (token factors,
    # up_tokens): only the feature factors share one shape
    assert stacked.stacked_kinds == ("feature_factors",)
    assert sorted(stacked.state_dict()) == sorted(per_modality.state_dict())
    out_a, out_b = outputs_and_grads(stacked, xs)[0], outputs_and_grads(per_modality, xs)[0]
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b)


def test_state_dict_of_stacked_parameters_round_trips_through_a_safetensors_file(tmp_path):
    """The per-modality entries are views of one tensor; safetensors writes them all the same."""
    from safetensors.torch import load_file, save_file

    stacked, _, xs = layouts("residual")
    with torch.no_grad():
        for p in stacked.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_file(stacked.state_dict(), tmp_path / "adapter.safetensors")
    fresh, per_modality, _ = layouts("residual")
    for layer in (fresh, per_modality):
        layer.load_state_dict(load_file(tmp_path / "adapter.safetensors"))
        for a, b in zip(layer(xs).values(), stacked(xs).values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_print_shows_the_ranks_and_modes():
    layer, _ = build(2, cp_mode="reference")
    assert (
        "modalities=['m0', 'm1'], r=4, R_d=2, R_t=3, T'=2, D=5, cp_mode=reference, "
        "init=centered, output=fused"
    ) in repr(layer)
