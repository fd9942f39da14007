import copy

import numpy as np
import pytest
import torch
from torch import nn

from mm_prompts import MPLMM, MulTBackbone, MulTConfig, all_cases, apply_case, simulate_missing
from mmcore import ModalityBatch


def build(m=3, init="default", seed=0, same_length=False):
    names = ("text", "audio", "vision", "depth")[:m]
    dims = {k: 4 + i for i, k in enumerate(names)}
    lens = {k: 3 + (0 if same_length else i) for i, k in enumerate(names)}
    torch.manual_seed(seed)
    backbone = MulTBackbone(
        MulTConfig(dims, d=8, num_heads=2, cross_layers=1, memory_layers=1, dropout=0.0)
    )
    model = MPLMM(backbone, lens, prompt_length=4, init=init)
    g = torch.Generator().manual_seed(seed)
    cases = torch.tensor(all_cases(m))
    data = ModalityBatch(
        {k: torch.randn(len(cases), lens[k], d, generator=g) for k, d in dims.items()},
        target=torch.randn(len(cases), generator=g),
    )
    return model, apply_case(data, cases)


@torch.no_grad()
def perturb(model, seed=1):
    """Move every parameter off its initial value: the missing-type prompts start at zero,
    which would hide a wrong missing-type term from a comparison of two paths or inputs."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("m", [3, 4])
def test_every_case_in_one_mixed_batch_matches_a_per_sample_loop(m):
    model, data = build(m)
    model.eval()
    perturb(model)
    with torch.no_grad():
        fast = model(data)
        slow = model.forward_per_sample(data)
    assert fast.shape == (2**m - 1, 1)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_prompts_take_the_backbones_dtype(dtype):
    model, data = build()
    model.eval()
    with torch.no_grad():
        expected = model(data)
    state = model.state_dict()
    model = MPLMM(copy.deepcopy(model.backbone).to(dtype), model.seq_lens, prompt_length=4)
    assert {p.dtype for p in model.parameters()} == {dtype}
    model.load_state_dict(state)  # the same weights, cast
    model.eval()
    out = model(data.to(dtype))  # half precision: every step stays in it (positions included)
    assert out.dtype == dtype
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
    out.pow(2).mean().backward()
    assert model.type_prompts["text"].grad.abs().sum() > 0


def test_missing_type_prompts_learn_and_the_reference_init_is_dead():
    model, data = build()
    model(data).pow(2).mean().backward()
    for b in model.modalities:
        assert model.type_prompts[b].grad.abs().sum() > 0
    ref, data = build(init="reference")
    opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        ref(data).pow(2).mean().backward()
        for b in ref.modalities:
            assert ref.type_prompts[b].grad.abs().sum() == 0
            assert ref.type_coupling[b].grad.abs().sum() == 0
        opt.step()
    assert all(ref.type_prompts[b].abs().sum() == 0 for b in ref.modalities)


def test_generated_features_depend_on_the_available_modalities():
    model, data = build()
    one = data.select([0, 0])  # case 1: only text present
    present = one.is_present("text")
    assert present.all() and not one.is_present("audio").any()
    altered = one.replace(
        inputs={**one.inputs, "text": one["text"] + torch.randn_like(one["text"])}
    )
    gen_a = model.generate(one, model.presence(one))["audio"]
    gen_b = model.generate(altered, model.presence(altered))["audio"]
    assert not torch.allclose(gen_a, gen_b)  # the generated audio follows the text
    garbage = one.replace(inputs={**one.inputs, "audio": torch.full_like(one["audio"], 1e3)})
    with torch.no_grad():
        torch.testing.assert_close(model(one), model(garbage))  # missing raw audio is ignored


def test_backbone_inputs_are_what_the_forward_hands_the_transformers():
    """Present modalities: their projection plus the present-signal prompt; missing ones: the
    generated sequence plus the missing-signal prompt; then each branch's type tokens."""
    model, data = build()
    perturb(model)
    sequences, padding, tokens = model.backbone_inputs(data)
    with torch.no_grad():
        torch.testing.assert_close(
            model.backbone.forward_projected(sequences, padding, tokens), model(data)
        )
    presence = model.presence(data)
    projected = model.backbone.project(data)
    generated = model.generate(data, presence)
    for i, m in enumerate(model.modalities):
        here = presence[:, i]
        torch.testing.assert_close(sequences[m][here], (projected[m] + model.signal_avail[m])[here])
        torch.testing.assert_close(
            sequences[m][~here], (generated[m] + model.signal_miss[m])[~here]
        )
    assert set(tokens) == set(model.modalities)


def test_frozen_backbone_and_parameter_budget():
    model, data = build()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(
        n.startswith(("backbone.cross", "backbone.memory", "backbone.proj1")) for n in trainable
    )
    assert any(n.startswith("backbone.proj.") for n in trainable)
    assert "backbone.out.weight" in trainable
    model(data).sum().backward()
    assert all(p.grad is None for p in model.backbone.cross.parameters())


def test_generator_grows_linearly_in_modalities():
    counts = []
    for m in (2, 3, 4):
        model, _ = build(m)
        counts.append(
            sum(
                p.numel()
                for n, p in model.named_parameters()
                if n.startswith(("gen_", "generative"))
            )
        )
    # same per-modality sizes would give equal increments; ours differ only by sizes, never
    # by a factor 2^M: check the per-modality cost stays bounded
    assert counts[2] - counts[1] < 2 * (counts[1] - counts[0]) + 200


def test_save_load_round_trip(tmp_path):
    model, data = build()
    model.eval()
    with torch.no_grad():
        expected = model(data)
    (tmp_path / "a file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"MPLMM\.save_pretrained: cannot save into"):
        model.save_pretrained(tmp_path / "a file")
    model.save_pretrained(tmp_path)
    loaded = MPLMM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(data), expected)
    with pytest.raises(FileNotFoundError, match="config"):
        MPLMM.from_pretrained(tmp_path / "nope")
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # cut short
    with pytest.raises(
        ValueError, match=r"MPLMM.from_pretrained: cannot read .*model\.safetensors"
    ):
        MPLMM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('["not", "a", "config"]')
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list, expected an object"):
        MPLMM.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_loads_back_in_the_dtype_it_was_saved_in(tmp_path, dtype):
    """``dtype=None`` keeps the saved dtype (backbone and prompts alike, bit-exact); a dtype
    given casts."""
    model, data = build()
    model = model.to(dtype).eval()
    model.save_pretrained(tmp_path / "mplmm")
    model.backbone.save_pretrained(tmp_path / "backbone")
    loaded = MPLMM.from_pretrained(tmp_path / "mplmm").eval()
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(data.to(dtype)), model(data.to(dtype)), rtol=0, atol=0)
    backbone = MulTBackbone.from_pretrained(tmp_path / "backbone")
    assert {p.dtype for p in backbone.parameters()} == {dtype}
    cast = MPLMM.from_pretrained(tmp_path / "mplmm", dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}
    inner = MulTBackbone.from_pretrained(tmp_path / "mplmm", torch.float32)
    assert {p.dtype for p in inner.parameters()} == {torch.float32}
    with pytest.raises(
        TypeError, match=r"MPLMM.from_pretrained: dtype must be a floating torch\.dtype"
    ):
        MPLMM.from_pretrained(tmp_path / "mplmm", dtype="bfloat16")


def test_a_loaded_model_trains_the_same_parameters(tmp_path):
    for freeze in (True, False):
        backbone = MulTBackbone(MulTConfig({"text": 4, "audio": 5}, d=8, num_heads=2))
        model = MPLMM(backbone, {"text": 3, "audio": 4}, prompt_length=4, freeze_backbone=freeze)
        model.save_pretrained(tmp_path / str(freeze))
        loaded = MPLMM.from_pretrained(tmp_path / str(freeze))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
        assert ("backbone.cross.stack.blocks.0.attn.in_proj_weight" in trainable) != freeze


def test_backbone_round_trip_and_the_two_stages(tmp_path):
    """Pretrain and save a backbone; wrap the loaded one; save the model; the backbone inside
    the model's folder loads on its own."""
    model, data = build()
    backbone = model.backbone.eval()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))  # as if pretrained
        expected = backbone(data)
    backbone.save_pretrained(tmp_path / "backbone")
    loaded = MulTBackbone.from_pretrained(tmp_path / "backbone").eval()
    assert loaded.config == backbone.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(data), expected, rtol=0, atol=0)
    wrapped = MPLMM(loaded, model.seq_lens, prompt_length=4)
    wrapped.save_pretrained(tmp_path / "mplmm")
    inner = MulTBackbone.from_pretrained(tmp_path / "mplmm").eval()
    for (name, a), b in zip(
        inner.state_dict().items(), backbone.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="holds a MulTBackbone, not an MPLMM model"):
        MPLMM.from_pretrained(tmp_path / "backbone")
    with pytest.raises(FileNotFoundError, match=r"MulTBackbone.from_pretrained: .*config.json"):
        MulTBackbone.from_pretrained(tmp_path / "nope")


def test_bad_input_raises():
    model, data = build()
    all_missing = data.with_missing("text").with_missing("audio").with_missing("vision")
    with pytest.raises(ValueError, match="every modality missing"):
        model(all_missing)
    long = data.replace(inputs={**data.inputs, "text": torch.cat([data["text"]] * 2, dim=1)})
    with pytest.raises(ValueError, match=r"'text' must be \[B, T <= 3, D\]"):
        model(long)
    wide = data.replace(inputs={**data.inputs, "audio": torch.randn(7, 4, 6)})
    with pytest.raises(ValueError, match=r"'audio' must be \[B, T, 5\]"):
        model(wide)
    with pytest.raises(TypeError, match=r"'text' is torch.float64 but the model's weights are"):
        model(data.to(torch.float64))
    half = copy.deepcopy(model).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float32: no error there
        assert half(data).shape == (7, 1)
    with pytest.raises(ValueError, match="init must be"):
        MPLMM(model.backbone, model.seq_lens, init="zeros")
    with pytest.raises(ValueError, match="seq_lens must name"):
        MPLMM(model.backbone, {"text": 3})
    with pytest.raises(ValueError, match=r"MulTConfig: the modality names \['a.b'\]"):
        MulTConfig({"a.b": 2, "c": 3}, d=4, num_heads=2)
    with pytest.raises(ValueError, match="divisible"):
        MulTConfig({"a": 2, "b": 3}, d=7, num_heads=2)
    with pytest.raises(ValueError, match=r"MulT needs >= 2 modalities, got \['a'\]"):
        MulTConfig({"a": 2}, d=4, num_heads=2)
    with pytest.raises(ValueError, match=r"batch lacks modalities \['vision'\]"):
        model.backbone(ModalityBatch({m: data[m] for m in ("text", "audio")}))
    for options, message in (
        ({"input_dims": {"a": 2, "b": 3.5}}, r"input_dims must be positive integers.*'b': 3.5"),
        ({"input_dims": {"a": 0, "b": 3}}, r"input_dims must be positive integers.*'a': 0"),
        ({"out_dim": 0}, "out_dim must be a positive integer"),
        ({"cross_layers": 0}, "cross_layers must be a positive integer"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            MulTConfig(**{"input_dims": {"a": 2, "b": 3}, "d": 4, "num_heads": 2, **options})
    assert MulTConfig({"a": np.int64(2), "b": 3}, d=4, num_heads=2).input_dims == {"a": 2, "b": 3}
    with pytest.raises(ValueError, match="prompt_length must be a positive integer, got 0"):
        MPLMM(model.backbone, model.seq_lens, prompt_length=0)
    with pytest.raises(ValueError, match=r"seq_lens must be positive integers.*'audio': 0"):
        MPLMM(model.backbone, {**model.seq_lens, "audio": 0})
    for backbone, hint in (
        (nn.Linear(2, 2), r"got Linear\.$"),
        (nn.DataParallel(model.backbone), r"got DataParallel \(a DataParallel around one: pass"),
    ):
        with pytest.raises(TypeError, match=r"builds its prompts into a MulTBackbone.*" + hint):
            MPLMM(backbone, model.seq_lens)


def test_a_plain_dict_for_a_batch_is_a_clear_error():
    model, data = build()
    for name, call in (
        ("MPLMM", model),
        ("MPLMM", model.forward_per_sample),
        ("MulTBackbone", model.backbone),
        ("simulate_missing", lambda d: simulate_missing(d, 0.5)),
        ("apply_case", lambda d: apply_case(d, 7)),
    ):
        with pytest.raises(TypeError, match=f"{name} takes a ModalityBatch, got a dict; wrap it"):
            call(dict(data.inputs))


def padded_copy(data, fill):
    """``data`` with its last text step and last two vision steps marked as padding, holding
    ``fill`` (a value, or ``None`` for zeros)."""
    inputs, masks = dict(data.inputs), {}
    for m, steps in (("text", 1), ("vision", 2)):
        x = inputs[m].clone()
        x[:, -steps:] = 0.0 if fill is None else fill
        inputs[m] = x
        masks[m] = torch.zeros(x.shape[:2], dtype=torch.bool)
        masks[m][:, -steps:] = True
    return data.replace(inputs=inputs, padding_masks=masks)


def test_padding_changes_nothing_in_any_case_and_may_hold_inf():
    """Padded steps reach neither the output nor the generated modalities, even as -inf (as in
    MOSI's audio): every case, batched and per-sample paths."""
    model, data = build()
    perturb(model)
    model.eval()
    with torch.no_grad():
        zeros = model(padded_copy(data, None))
        for fill in (1e3, float("-inf")):
            batch = padded_copy(data, fill)
            torch.testing.assert_close(model(batch), zeros)
            torch.testing.assert_close(model.forward_per_sample(batch), zeros, rtol=1e-4, atol=1e-5)


def test_shorter_sequences_equal_the_padded_ones():
    model, data = build()
    perturb(model)
    model.eval()
    padded = padded_copy(data, None)
    short = data.replace(
        inputs={**data.inputs, "text": data["text"][:, :-1], "vision": data["vision"][:, :-2]}
    )
    with torch.no_grad():
        torch.testing.assert_close(model(short), model(padded))
        torch.testing.assert_close(model.forward_per_sample(short), model(padded))


def test_a_modality_the_batch_lacks_is_missing_for_every_sample():
    model, data = build()
    perturb(model)
    model.eval()
    without = ModalityBatch(
        {m: data[m] for m in ("text", "vision")},
        data.target,
        presence={m: data.presence[m] for m in ("text", "vision") if m in data.presence},
    )
    marked = data.with_missing("audio")
    keep = data.is_present("text") | data.is_present("vision")  # cases with something left
    with torch.no_grad():
        expected = model(marked.select(keep))
        torch.testing.assert_close(model(without.select(keep)), expected)
        torch.testing.assert_close(model.forward_per_sample(without.select(keep)), expected)
    with pytest.raises(ValueError, match="none of the modalities"):
        model(ModalityBatch({"depth": data["text"]}))


def test_a_misnamed_modality_is_not_taken_for_a_missing_one():
    """A key the model does not know, where one of its modalities is lacking, is an error (a
    misnamed modality would pass as missing for every sample); beside every modality the model
    knows, an extra one is ignored."""
    model, data = build()
    perturb(model)
    model.eval()
    renamed = {("audios" if m == "audio" else m): x for m, x in data.inputs.items()}
    for call in (model, model.forward_per_sample):
        with pytest.raises(ValueError, match=r"lacks \['audio'\] and has \['audios'\].*Did you "):
            call(ModalityBatch(renamed, data.target))
    extra = data.replace(inputs={**data.inputs, "depth": data["text"]})
    with torch.no_grad():
        torch.testing.assert_close(model(extra), model(data))


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("extra", [False, True])
def test_batched_transformers_equal_the_per_module_loop(m, extra):
    """Sequences of one length: every cross-modal (and memory) transformer in one batched call."""
    names = ("text", "audio", "vision", "depth")[:m]
    dims = {k: 3 + i for i, k in enumerate(names)}
    torch.manual_seed(0)
    config = MulTConfig(dims, d=8, num_heads=2, cross_layers=2, memory_layers=1, dropout=0.0)
    backbone = MulTBackbone(config)
    perturb(backbone)  # every member's own weights: norms start alike (ones, zeros)
    g = torch.Generator().manual_seed(1)
    z = {k: torch.randn(5, 4, 8, generator=g, requires_grad=True) for k in names}
    padding = {names[0]: torch.tensor([[False] * 4] * 3 + [[False, False, True, True]] * 2)}
    tokens = (
        {k: torch.randn(5, 2, (m - 1) * 8, generator=g, requires_grad=True) for k in names}
        if extra
        else None
    )
    used = [p for n, p in backbone.named_parameters() if not n.startswith("proj.")]
    leaves = [*z.values(), *(tokens or {}).values(), *used]

    def run(batched: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        backbone.batched = batched  # forced either way
        out = backbone.forward_projected(z, padding, tokens)
        return out, torch.autograd.grad(out.square().sum(), leaves)

    (fast, fast_grads), (slow, slow_grads) = run(True), run(False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_each_stacked_transformer_equals_a_standalone_multihead_attention_module():
    """A member of a stack, run alone, equals a transformer of ``nn.MultiheadAttention`` layers
    holding its weights: values and input gradients, padded source of another length."""
    names = ("text", "audio", "vision")
    torch.manual_seed(0)
    config = MulTConfig(dict.fromkeys(names, 3), d=8, num_heads=2, cross_layers=2, dropout=0.0)
    backbone = MulTBackbone(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 8, generator=g, requires_grad=True)
    src = torch.randn(5, 6, 8, generator=g, requires_grad=True)
    pad = torch.zeros(5, 6, dtype=torch.bool)
    pad[3:, 4:] = True
    h = torch.randn(5, 4, 16, generator=g, requires_grad=True)
    h_pad = torch.zeros(5, 4, dtype=torch.bool)
    h_pad[:2, 3:] = True
    cases = [(backbone.cross, n, x, src, pad) for n in backbone.cross.names]
    cases += [(backbone.memory, n, h, None, h_pad) for n in names]
    for stack, name, inp, source, padding in cases:
        ours = stack.run_one(name, inp, source, padding)
        module = stack.member(name)
        ref = module(inp, source, padding) if source is not None else module(inp, x_padding=padding)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        leaves = [inp] if source is None else [inp, source]
        for a, b in zip(
            torch.autograd.grad(ours.square().sum(), leaves),
            torch.autograd.grad(ref.square().sum(), leaves),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_last_only_readout_equals_the_last_step_of_the_whole_output(layers):
    """``last_only`` computes the last block for the readout step alone: the same values and
    gradients as the last unpadded step of every step's output, batched and one by one."""
    from mm_prompts.backbone import _last_step

    torch.manual_seed(0)
    names = ("text", "audio", "vision")
    config = MulTConfig(dict.fromkeys(names, 3), d=8, num_heads=2, memory_layers=layers)
    backbone = MulTBackbone(config).eval()  # dropout draws would differ in number
    perturb(backbone)
    stack = backbone.memory
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 5, 6, 16, generator=g, requires_grad=True)
    pad = torch.zeros(3, 5, 6, dtype=torch.bool)
    pad[0, 1, 4:] = True  # readout at step 3
    pad[2, 3, 1:] = True  # readout at step 0
    leaves = [h, *stack.parameters()]
    for padding in (pad, None):
        full = _last_step(stack.run_all(h, None, padding), padding)
        last = stack.run_all(h, None, padding, last_only=True)
        assert last.shape == (3, 5, 16)
        torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)
        weights = torch.randn(last.shape, generator=g)
        for a, b in zip(
            torch.autograd.grad((last * weights).sum(), leaves),
            torch.autograd.grad((full * weights).sum(), leaves),
            strict=True,
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for i, name in enumerate(names):
            one_pad = None if padding is None else padding[i]
            torch.testing.assert_close(
                stack.run_one(name, h[i], None, one_pad, last_only=True),
                _last_step(stack.member(name)(h[i], x_padding=one_pad), one_pad),
                rtol=1e-5,
                atol=1e-5,
            )
    with pytest.raises(ValueError, match="last_only reads out a self-attention"):
        backbone.cross.run_all(h[:, :, :, :8], h[:, :, :, :8], None, last_only=True)


@pytest.mark.parametrize("batched", [True, False])
def test_backbone_readout_only_equals_every_step_computed(batched):
    """``backbone.readout_only = False`` computes every step of the memory transformers and
    reads the readout from the whole output: the same outputs and gradients, padded or not."""
    model, data = build(same_length=batched)  # the batched path needs one length
    perturb(model)
    model.eval()  # dropout draws would differ in number
    model.backbone.batched = batched
    pad = torch.zeros(data["audio"].shape[:2], dtype=torch.bool)
    pad[::2, -1] = True
    padded = data.replace(padding_masks={"audio": pad})
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in (data, padded):
        results = []
        for readout_only in (True, False):
            model.backbone.readout_only = readout_only
            out = model(batch)
            results.append((out, torch.autograd.grad(out.square().sum(), params)))
        (fast, fast_grads), (whole, whole_grads) = results
        torch.testing.assert_close(fast, whole, rtol=1e-5, atol=1e-5)
        for a, b in zip(fast_grads, whole_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_stacked_parameters_keep_one_state_dict_entry_per_transformer():
    model, data = build()
    backbone = model.backbone
    state = backbone.state_dict()
    assert not any(".stack." in k for k in state)
    assert state["cross.text_from_audio.blocks.0.attn.in_proj_weight"].shape == (24, 8)
    assert state["memory.vision.norm.weight"].shape == (16,)
    # one tensor per parameter name of a transformer, not one per transformer and name
    per_transformer = len(list(backbone.cross.member("audio_from_text").parameters()))
    assert len(list(backbone.cross.parameters())) == per_transformer
    assert len([k for k in state if k.startswith("cross.")]) == 6 * per_transformer
    fresh = MulTBackbone(
        MulTConfig(
            backbone.config.input_dims,
            d=8,
            num_heads=2,
            cross_layers=1,
            memory_layers=1,
            dropout=0.0,
        )
    )
    fresh.load_state_dict(state)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(data), backbone(data))
    partial = {k: v for k, v in state.items() if k != "cross.audio_from_text.norm.bias"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*cross\.audio_from_text\.norm\.bias"):
        fresh.load_state_dict(partial)
    before = fresh.cross.member("audio_from_text").norm.bias.clone()
    report = fresh.load_state_dict(
        {
            **partial,
            "cross.audio_from_text.norm.weight": state["cross.audio_from_text.norm.weight"] * 2,
        },
        strict=False,
    )
    assert report.missing_keys == ["cross.audio_from_text.norm.bias"]
    assert torch.equal(fresh.cross.member("audio_from_text").norm.bias, before)
    assert torch.equal(
        fresh.cross.member("audio_from_text").norm.weight,
        2 * state["cross.audio_from_text.norm.weight"],
    )


def test_auto_batches_only_small_calls_of_one_length(monkeypatch):
    from mm_prompts import backbone as module

    torch.manual_seed(0)
    model = MulTBackbone(MulTConfig({"a": 3, "b": 4}, d=8, num_heads=2, dropout=0.0))
    calls = []
    original = MulTBackbone._forward_batched
    monkeypatch.setattr(
        MulTBackbone, "_forward_batched", lambda *a: calls.append(1) or original(*a)
    )
    z = {"a": torch.randn(4, 5, 8), "b": torch.randn(4, 5, 8)}
    model.forward_projected(z)  # 20 tokens per call: batched
    monkeypatch.setattr(module, "_BATCHED_MAX_TOKENS", 19)
    model.forward_projected(z)  # over the limit: the loop
    monkeypatch.setattr(module, "_BATCHED_MAX_TOKENS", 2048)
    model.forward_projected({"a": z["a"], "b": z["b"][:, :3]})  # lengths differ: the loop
    assert calls == [1]
    model.batched = "always"
    with pytest.raises(ValueError, match="batched must be True, False or 'auto'"):
        model.forward_projected(z)


def test_what_a_missing_modality_holds_is_never_read():
    """The vectorised path computes on every sample and selects by presence; a missing
    modality's values are zeroed first, so NaN there (NaN × 0 is NaN) reaches neither the
    outputs nor the gradients: both equal those of the zero-filled batch."""
    model, data = build()
    nan_filled = data.replace(
        inputs={
            m: torch.where(data.is_present(m)[:, None, None], data[m], float("nan"))
            for m in data.modalities
        }
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    runs = []
    for batch in (data, nan_filled):
        out = model(batch)
        runs.append((out, torch.autograd.grad(out.square().sum(), trainable)))
    (zeros, zero_grads), (nans, nan_grads) = runs
    torch.testing.assert_close(nans, zeros)
    for a, b in zip(nan_grads, zero_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("same_length", [True, False], ids=["batched", "one-by-one"])
def test_an_empty_batch_gives_an_empty_output(same_length):
    """A per-case evaluation selects the samples of one case, and a case no sample has leaves
    an empty batch: its output is ``[0, out]`` on the batched transformers, the one-by-one ones
    and the per-sample loop, and a loss on it backpropagates (it used to fail in a reshape)."""
    model, data = build(same_length=same_length)
    empty = data.select(torch.zeros(data.batch_size, dtype=torch.bool))
    out = model(empty)
    assert out.shape == (0, 1)
    assert model.forward_per_sample(empty).shape == (0, 1)
    out.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and not p.grad.any() for p in trainable)
