import contextlib
import copy

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from benchmarks.backbones import LateFusionModel
from casp import CASP, CASPConfig, is_norm_layer, norm_parameters
from mmcore import ModalityBatch, collate_modalities

FAST = {"epochs_ca": 2, "snapshot_every": 1, "epochs_pl": 1, "keep_ratio": 0.5, "batch_size": 8}


def data(n=24, seed=0, classes=None):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "a": torch.randn(n, 5, generator=g),
        "b": torch.randn(n, 4, generator=g),
        "c": torch.randn(n, 3, 2, generator=g),
    }
    target = (
        torch.randint(0, classes, (n,), generator=g) if classes else torch.randn(n, generator=g)
    )
    return ModalityBatch(inputs, target)


def model(out_dim=1, seed=0):
    torch.manual_seed(seed)
    return LateFusionModel.from_batch(
        data(), out_dim, width=6, hidden=8, num_heads=2, num_layers=1
    ).eval()


class _VectorLateFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(d, 6), nn.LayerNorm(6)) for m, d in (("a", 5), ("b", 4))}
        )
        self.fusion = nn.Identity()
        self.head = nn.Linear(12, 1)

    def forward(self, batch):
        feats = torch.cat([self.encoders[m](batch[m]) for m in self.encoders], dim=-1)
        return self.head(self.fusion(feats))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_adapts_models_of_any_floating_dtype(dtype):
    torch.manual_seed(0)
    net = _VectorLateFusion().to(dtype)
    before = [p.clone() for p in norm_parameters(net)]
    target = ModalityBatch({m: data()[m].to(dtype) for m in ("a", "b")})
    casp = CASP(net, **FAST)
    report = casp.adapt(target)
    assert not report.collapsed and len(report.pseudo_labels) > 0
    assert casp.predict(target).dtype == dtype
    after = norm_parameters(casp.model)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_adapts_as_the_float32_one_does(dtype, recwarn):
    """Norm scales sit near 1, where bfloat16 values are 2^-7 apart: Adam's steps of about lr
    (1e-3) rounded away, so the scales of a bfloat16 model never moved (only biases near 0 did),
    and in float16 Adam's eps (1e-8) is 0, so its first step was NaN and adaptation rolled
    back. With float32 master copies both follow the float32 model's adaptation."""
    try:
        nn.functional.layer_norm(torch.ones(1, 2, dtype=dtype), (2,))
    except RuntimeError:  # torch < 2.3 has no float16 LayerNorm on the CPU
        pytest.skip(f"this torch has no {dtype} LayerNorm on the CPU")
    torch.manual_seed(0)
    source = _VectorLateFusion()
    target = ModalityBatch({m: data(n=48)[m] + 1.0 for m in ("a", "b")})
    options = {**FAST, "epochs_ca": 8}
    full = CASP(source, **options)
    full.adapt(target)
    half = CASP(copy.deepcopy(source).to(dtype), **options)
    report = half.adapt(target.to(dtype=dtype))
    assert not report.collapsed and not recwarn.list
    start = [p.detach() for p in norm_parameters(source)]
    for p0, p32, p16 in zip(
        start, norm_parameters(full.model), norm_parameters(half.model), strict=True
    ):
        assert p16.dtype == dtype
        moved = (p32 - p0).abs().max()
        assert moved > 0.01
        # the half-precision model follows, to within a fraction of how far it moved
        assert (p16.float() - p32).abs().max() < 0.3 * moved


def test_only_normalisation_parameters_change_and_caller_weights_are_safe():
    source = model()
    before = {k: v.clone() for k, v in source.state_dict().items()}
    casp = CASP(source, **FAST)
    casp.adapt(data())
    for k, v in source.state_dict().items():
        assert torch.equal(v, before[k]), k  # the caller's model is untouched (copy by default)
    norm_ids = {id(p) for p in norm_parameters(casp.model)}
    changed = [n for n, p in casp.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(id(dict(casp.model.named_parameters())[n]) in norm_ids for n in changed)


def test_inplace_flag_adapts_the_callers_model():
    source = model()
    casp = CASP(source, inplace=True, **FAST)
    assert casp.model is source
    w = source.encoders["a"].net[1].weight.clone()
    casp.adapt(data())
    assert not torch.equal(source.encoders["a"].net[1].weight, w)


class _DropoutBatchNormFusion(nn.Module):
    """Encoders with BatchNorm and dropout (what train mode changes), a frozen text embedding."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, 6), nn.BatchNorm1d(6), nn.Dropout(0.3))
                for m, d in (("a", 5), ("b", 4))
            }
        )
        self.fusion = nn.Identity()
        self.head = nn.Linear(12, 1)

    def forward(self, batch):
        feats = torch.cat([self.encoders[m](batch[m]) for m in self.encoders], dim=-1)
        return self.head(self.fusion(feats))


@pytest.mark.parametrize("mode", ["eval", "mixed"])
def test_inplace_adaptation_leaves_the_models_flags_and_modes_as_they_were(mode):
    """CASP freezes all but the normalisation layers and switches to train mode only while it
    adapts: after adapt() and online calls, a model adapted in place trains as its owner set
    it up (it used to keep 4 of 10 parameters trainable), and predicts in its own mode (online
    calls left it in train mode: dropout on, BatchNorm updating its statistics)."""
    torch.manual_seed(0)
    net = _DropoutBatchNormFusion().eval()
    net.encoders["b"][0].weight.requires_grad_(False)  # the owner's own choice
    if mode == "mixed":  # training, with one BatchNorm kept in eval mode on purpose
        net.train()
        net.encoders["a"][1].eval()
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    modes = {n: m.training for n, m in net.named_modules()}
    target = ModalityBatch({m: data(n=32)[m] for m in ("a", "b")})
    norm_before = [p.clone() for p in norm_parameters(net)]
    casp = CASP(net, inplace=True, **FAST)
    for step in (lambda: casp.adapt(target), lambda: casp(target.select(slice(0, 8)))):
        step()
        assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
        assert {n: m.training for n, m in net.named_modules()} == modes
    after = norm_parameters(net)
    assert not all(torch.equal(a, b) for a, b in zip(norm_before, after, strict=True))


def test_a_data_parallel_wrapper_is_adapted_through_the_module_it_holds():
    """DDP and DataParallel call the module they hold (CASP averages over ranks itself, with
    ``distributed=True``): adapting the wrapper equals adapting that module. (DataParallel on
    a machine without GPUs runs its module directly; DDP is unwrapped by the same rule.)"""
    target = data(seed=3)
    plain, wrapped = CASP(model(), **FAST), CASP(nn.DataParallel(model()), **FAST)
    assert not isinstance(wrapped.model, nn.DataParallel)
    torch.manual_seed(1)  # the same dropout draws
    report = plain.adapt(target)
    torch.manual_seed(1)
    report_wrapped = wrapped.adapt(target)
    assert torch.equal(report.kept_indices, report_wrapped.kept_indices)
    torch.testing.assert_close(wrapped.predict(target), plain.predict(target), rtol=0, atol=0)
    inner = model()  # DDP around a compiled model: the module inside both
    assert CASP(nn.DataParallel(torch.compile(inner)), inplace=True, **FAST).model is inner


def test_reset_restores_source_outputs_exactly():
    source = model()
    target = data(seed=3)
    with torch.no_grad():
        expected = source(target).squeeze(-1)
    casp = CASP(source, **FAST)
    casp.adapt(target)
    assert not torch.equal(casp.predict(target), expected)
    casp.reset()
    assert torch.equal(casp.predict(target), expected)


def test_snapshots_hold_only_what_adaptation_changes():
    """The source and per-epoch snapshots copy the adapted parameters and the buffers, not the
    frozen weights (for a large model, a copy of it each epoch)."""
    casp = CASP(model(), **FAST)
    adapted = {id(p) for p in norm_parameters(casp.model)}
    norm = {n for n, p in casp.model.named_parameters() if id(p) in adapted}
    buffers = {n for n, _ in casp.model.named_buffers()}
    assert set(casp.snapshot()) == norm | buffers
    assert norm and len(norm) < len(list(casp.model.parameters()))
    state = casp.snapshot()
    casp.adapt(data(seed=2))
    casp.restore(state)
    for name, value in casp.model.state_dict().items():
        if name in state:
            assert torch.equal(value, state[name]), name


def test_reset_also_forgets_the_online_optimiser():
    """After reset(), online adaptation repeats a fresh CASP's exactly (no stale Adam moments)."""
    batch = data(12, seed=6)
    casp = CASP(model(), **FAST)
    torch.manual_seed(1)  # the model's dropout
    first = [casp(batch, steps=2) for _ in range(2)]
    casp.reset()
    torch.manual_seed(1)
    again = [casp(batch, steps=2) for _ in range(2)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_progress_bar_shows_both_stages_and_changes_nothing(capsys):
    target = data(seed=5)
    quiet = CASP(model(), **FAST)
    quiet.adapt(target)
    assert capsys.readouterr().err == ""
    shown = CASP(model(), **FAST)
    shown.adapt(target, progress=True)
    err = capsys.readouterr().err
    assert "CASP" in err and "3/3" in err and "pseudo_label_loss" in err  # 2 + 1 epochs
    assert torch.equal(shown.predict(target), quiet.predict(target))


def test_no_target_label_is_read():
    target = data(seed=4)
    runs = []
    for poison in (0, 1):
        g = torch.Generator().manual_seed(100 + poison)
        poisoned = target.replace(target=torch.randn(len(target), generator=g) * 1e6)
        casp = CASP(model(), **FAST)
        casp.adapt(poisoned)
        runs.append((casp.predict(target), casp.report.kept_indices))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_reference_flags_reproduce_the_released_behaviour():
    target = data(seed=5)
    most = CASP(model(), **FAST)
    most.adapt(target)
    least = CASP(model(), **{**FAST, "keep": "least_stable"})
    least.adapt(target)
    assert not set(most.report.kept_indices.tolist()) & set(least.report.kept_indices.tolist())
    seen = []

    def score(pred, labels):
        seen.append(labels)
        return -float((pred - labels).abs().mean())

    leak = CASP(model(), **{**FAST, "select_by": "target_validation"})
    with pytest.raises(ValueError, match="needs validation="):
        leak.adapt(target)
    with pytest.raises(ValueError, match="with its target set"):
        leak.adapt(target, validation=data(seed=6).replace(target=None), score_fn=score)
    leak.adapt(target, validation=data(seed=6), score_fn=score)
    assert seen and torch.equal(seen[0], data(seed=6).target)  # it reads labels: opt-in only
    # a score that is never a number keeps the weights each stage started from
    nan = CASP(model(), **{**FAST, "select_by": "target_validation"})
    before = copy.deepcopy(nan.model.state_dict())
    nan.adapt(target, validation=data(seed=6), score_fn=lambda _p, _t: float("nan"))
    assert all(torch.equal(before[k], v) for k, v in nan.model.state_dict().items())


def test_collapse_guard_stops_and_reports():
    source = model()
    source.fusion.register_forward_hook(lambda _m, _a, out: out * 0 + 1.0)  # constant repr.
    casp = CASP(source, **FAST)
    with pytest.warns(UserWarning, match="collapsed"):
        report = casp.adapt(data())
    assert report.collapsed and "rolled back" in report.message
    assert report.kept_indices is not None  # the pseudo-label stage still had snapshots


def _diverging_after(calls):
    """A fusion hook whose output turns NaN from its ``calls``-th call on (a diverged model)."""
    seen = [0]

    def hook(_module, _args, out):
        seen[0] += 1
        return out * float("nan") if seen[0] > calls else out

    return hook


def test_a_diverged_representation_is_caught_and_rolled_back():
    """NaN compares False with the collapse threshold: it used to pass as healthy."""
    source = model()
    casp = CASP(source, **FAST)
    handle = casp.model.fusion.register_forward_hook(_diverging_after(6))
    with pytest.warns(UserWarning, match="became NaN or infinite .* stage 1"):
        report = casp.adapt(data())
    handle.remove()
    assert report.collapsed and "rolled back" in report.message
    assert all(torch.isfinite(p).all() for p in norm_parameters(casp.model))


def test_a_diverged_pseudo_label_stage_is_rolled_back_to_stage_one():
    source = model()
    casp = CASP(source, **{**FAST, "epochs_pl": 2})
    # stage 1: 2 epochs x (3 batches, one forward each) + 3 snapshots x 1 predict batch = 9 calls
    handle = casp.model.head.register_forward_hook(_diverging_after(9))
    with pytest.warns(UserWarning, match="pseudo-label loss became NaN .* stage 2, epoch 1"):
        report = casp.adapt(data())
    handle.remove()
    assert report.collapsed and report.pseudo_label_losses == []
    assert all(torch.isfinite(p).all() for p in norm_parameters(casp.model))


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_samples_the_source_model_predicts_nan_for_are_refused(task):
    """Their pseudo-labels would be NaN, and the stages would stop as if they had diverged."""
    target = data(classes=3 if task == "classification" else None)
    bad = target["a"].index_fill(0, torch.tensor([3, 7]), float("nan"))
    casp = CASP(model(3 if task == "classification" else 1), task=task, **FAST)
    before = copy.deepcopy(casp.model.state_dict())
    with pytest.raises(ValueError, match=r"2 of the 24 samples \(the first at index 3\)"):
        casp.adapt(target.replace(inputs={**target.inputs, "a": bad}))
    assert all(torch.equal(before[k], v) for k, v in casp.model.state_dict().items())
    casp.adapt(target)  # the same data without them adapts


def test_online_adaptation_skips_a_non_finite_update():
    casp = CASP(model(), **FAST)
    before = [p.clone() for p in norm_parameters(casp.model)]
    nan_input = data(8).replace(inputs={**data(8).inputs, "a": torch.full((8, 5), float("nan"))})
    with pytest.warns(UserWarning, match="model was not updated"):
        casp(nan_input, steps=2)
    after = norm_parameters(casp.model)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    casp(data(8), steps=1)  # a finite batch still adapts
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_multilabel_adapts_as_one_binary_logit_repeated():
    """``task="multilabel"``: a model whose two labels are one binary logit twice keeps the
    samples, and ends with the norm weights, of that one-logit model under
    ``task="classification"``, whose softmax over ``[0, z]`` is the sigmoid (soft cross-entropy
    on it is binary cross-entropy)."""
    one = model(out_dim=1)
    two = model(out_dim=1)
    head = two.head.out
    with torch.no_grad():
        doubled = nn.Linear(head.in_features, 2)
        doubled.weight.copy_(head.weight.repeat(2, 1))
        doubled.bias.copy_(head.bias.repeat(2))
    _replace_module(two, head, doubled)
    target = data(n=32)
    binary = CASP(one, task="classification", **FAST)
    labels = CASP(two, task="multilabel", num_outputs=2, **FAST)
    torch.manual_seed(0)  # the same dropout masks for both
    r1 = binary.adapt(target)
    torch.manual_seed(0)
    r2 = labels.adapt(target)
    assert r2.kept_indices.tolist() == r1.kept_indices.tolist()
    torch.testing.assert_close(r2.pseudo_labels, r1.pseudo_labels[:, 1:].repeat(1, 2))
    for a, b in zip(norm_parameters(binary.model), norm_parameters(labels.model), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(labels.predict(target), binary.predict(target)[:, 1:].repeat(1, 2))
    with pytest.raises(ValueError, match=r"num_outputs=3 needs one logit per label.*\(32, 2\)"):
        CASP(two, task="multilabel", num_outputs=3, **FAST).adapt(target)


def test_regression_with_several_outputs_adapts_as_one_output_repeated():
    """``num_outputs=2``: a model whose two outputs are one output twice (its head's row
    repeated) keeps the same samples, with that output's pseudo-labels in both columns, and
    ends with the norm weights the one-output model ends with."""
    one = model(out_dim=1)
    two = model(out_dim=1)
    head = two.head.out  # MulT's residual head: its last linear layer
    with torch.no_grad():
        doubled = nn.Linear(head.in_features, 2)
        doubled.weight.copy_(head.weight.repeat(2, 1))
        doubled.bias.copy_(head.bias.repeat(2))
    _replace_module(two, head, doubled)
    target = data(n=32)
    first = CASP(one, **FAST)
    second = CASP(two, num_outputs=2, **FAST)
    torch.manual_seed(0)  # the same dropout masks for both
    r1 = first.adapt(target)
    torch.manual_seed(0)
    r2 = second.adapt(target)
    assert second.predict(target).shape == (32, 2)
    assert r2.kept_indices.tolist() == r1.kept_indices.tolist()
    torch.testing.assert_close(r2.pseudo_labels, r1.pseudo_labels[:, None].repeat(1, 2))
    for a, b in zip(norm_parameters(first.model), norm_parameters(second.model), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"num_outputs=1 needs one score per sample.*\(32, 2\)"):
        CASP(two, **FAST).adapt(target)
    with pytest.raises(ValueError, match=r"num_outputs=3 needs \[N, 3\].*\(32, 2\)"):
        CASP(two, num_outputs=3, **FAST).adapt(target)
    with pytest.raises(ValueError, match=r"regressed values .* or of labels"):
        CASPConfig(task="classification", num_outputs=2)


def _replace_module(root, old, new):
    for module in root.modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return
    raise LookupError("module not found")


def test_classification_and_online_episodic_mode():
    target = data(seed=7, classes=3)
    casp = CASP(model(out_dim=3), task="classification", **FAST)
    report = casp.adapt(target)
    probs = casp.predict(target)
    assert probs.shape == (24, 3) and torch.allclose(probs.sum(1), torch.ones(24))
    assert len(report.pseudo_label_losses) == 1
    online = CASP(model(out_dim=3), task="classification", **FAST)
    torch.manual_seed(0)  # dropout draws
    first = online(target.select(slice(0, 8)), episodic=True)
    torch.manual_seed(0)
    again = online(target.select(slice(0, 8)), episodic=True)
    torch.testing.assert_close(first, again)  # episodic: every batch starts from the source
    continual = online(target.select(slice(0, 8)))
    assert not torch.allclose(continual, online(target.select(slice(0, 8))))


def test_the_representation_may_come_from_a_module_returning_a_tuple():
    """A recurrent encoder returns ``(output, hidden)``: its first item is the representation,
    as for the other packages' encoder features."""

    class WithGRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(5)  # what CASP adapts, before the representation
            self.gru = nn.GRU(5, 6, batch_first=True)
            self.b = nn.Linear(4, 6)
            self.head = nn.Linear(12, 1)

        def forward(self, batch):
            seq, _ = self.gru(self.norm(batch["a"])[:, None])
            return self.head(torch.cat([seq[:, -1], self.b(batch["b"])], dim=-1))

    torch.manual_seed(0)
    target = ModalityBatch({"a": data()["a"], "b": data()["b"]})
    report = CASP(WithGRU(), representation_module="gru", **FAST).adapt(target)
    assert not report.collapsed and len(report.contrastive_losses) == 2


class _Outputs(nn.Module):
    """A classifier that returns its logits inside a ``transformers`` output, a dict or a
    tuple."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.inner = kind, model(out_dim=3)
        self.fusion = self.inner.fusion

    def forward(self, batch):
        logits = self.inner(batch)
        if self.kind == "transformers":
            return SequenceClassifierOutput(logits=logits)
        return {"logits": logits} if self.kind == "dict" else (logits, None)


@pytest.mark.parametrize("kind", ["transformers", "dict"])
def test_predictions_may_be_the_logits_of_a_model_output(kind):
    target = data(seed=7, classes=3)
    casp = CASP(_Outputs(kind), task="classification", **FAST)
    casp.adapt(target)
    plain = CASP(model(out_dim=3), task="classification", **FAST)
    plain.adapt(target)
    torch.testing.assert_close(casp.predict(target), plain.predict(target))


def test_bad_input_raises_clear_errors():
    no_norm = nn.Sequential(nn.Linear(2, 1))
    no_norm.fusion = nn.Identity()
    with pytest.raises(ValueError, match="no normalisation layer"):
        CASP(no_norm)
    with pytest.raises(Exception, match="representation_module"):
        CASP(nn.Sequential(nn.LayerNorm(2)))
    casp = CASP(model(), **FAST)
    with pytest.raises(TypeError, match="ModalityBatch or an iterable of them"):
        casp.adapt(torch.randn(3, 2))
    with pytest.raises(TypeError, match=r"yielded items of type Tensor.*pass representation_fn"):
        casp.adapt([torch.randn(3, 2)])
    with pytest.raises(TypeError, match="the iterable yielded nothing"):
        casp.predict([])
    with pytest.raises(TypeError, match=r"CASP\.forward takes a ModalityBatch, got a dict"):
        casp(dict(data().inputs))
    with pytest.raises(ValueError, match=">= 2"):
        casp.adapt(ModalityBatch({"a": torch.randn(4, 5)}))
    for n in (0, 1):  # no negative for NT-Xent: stage 1 would log losses of 0 and never step
        with pytest.raises(ValueError, match=f"at least 2 unlabeled target samples.*got {n}"):
            casp.adapt(data().select(torch.arange(n)))
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        CASPConfig(batch_size=1)
    with pytest.raises(ValueError, match="keep must be one of"):
        CASPConfig(keep="stable")
    with pytest.raises(ValueError, match="no snapshot"):
        CASPConfig(epochs_ca=2, snapshot_every=3)
    with pytest.raises(ValueError, match="either config= or"):
        CASP(model(), CASPConfig(), tau=0.1)
    with pytest.raises(ValueError, match=r"one score per sample .* outputs \(24, 3\)"):
        CASP(model(out_dim=3), **FAST).adapt(data())  # class logits under task='regression'
    with pytest.raises(TypeError, match=r"must be a Tensor .* or carry one as `logits`.*tuple"):
        CASP(_Outputs("tuple"), task="classification", **FAST).predict(data())


def test_a_dataloader_of_batches_is_adapted_as_their_concatenation():
    target = data()
    loader = torch.utils.data.DataLoader(
        [target.select([i]) for i in range(len(target))],
        batch_size=5,
        collate_fn=collate_modalities,
    )
    batches = list(loader)  # iterating a DataLoader draws from the global RNG: do it once here
    torch.manual_seed(0)
    from_batches = CASP(model(), **FAST)
    report = from_batches.adapt(batches)
    torch.manual_seed(0)
    whole = CASP(model(), **FAST)
    expected = whole.adapt(target)
    assert torch.equal(report.kept_indices, expected.kept_indices)
    assert torch.equal(report.pseudo_labels, expected.pseudo_labels)
    assert torch.equal(from_batches.predict(loader), whole.predict(target))
    assert len(CASP(model(), **FAST).adapt(loader).kept_indices) == len(expected.kept_indices)


def test_both_views_in_one_forward_equal_two_forwards():
    """Without BatchNorm both views share one forward pass; the loss and gradients match."""
    torch.manual_seed(0)
    net = LateFusionModel.from_batch(
        data(), 1, width=6, hidden=8, num_heads=2, num_layers=1, dropout=0.0
    )
    casp = CASP(net, **FAST)
    assert casp._joint_views
    batch = data(8)
    results = []
    for joint in (True, False):
        casp._joint_views = joint
        casp.model.zero_grad()
        loss, rep = casp.contrastive_loss(batch, "b")
        loss.backward()
        results.append((loss.detach(), rep.detach(), [p.grad.clone() for p in casp.params]))
    (l1, r1, g1), (l2, r2, g2) = results
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(r1, r2)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_batchnorm_models_keep_separate_views():
    class WithBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoders = nn.ModuleDict({m: nn.LazyLinear(4) for m in ("a", "b")})
            self.fusion = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 1)

        def forward(self, batch):
            return self.head(self.fusion(torch.cat([self.encoders[m](batch[m]) for m in "ab"], 1)))

    net = WithBatchNorm()
    g = torch.Generator().manual_seed(0)
    target = ModalityBatch(
        {"a": torch.randn(17, 5, generator=g), "b": torch.randn(17, 3, generator=g)}
    )
    net(target)
    casp = CASP(net.eval(), **FAST)
    assert not casp._joint_views
    # 17 samples, batches of 8 and keep_ratio 0.5 -> 9 kept: stage 2 ends on a one-sample batch,
    # on which BatchNorm cannot train; it is skipped (as in stage 1), not a crash
    report = casp.adapt(target)
    assert len(report.kept_indices) == 9 and len(report.pseudo_label_losses) == 1


def test_predicting_nothing_is_a_clear_error():
    with pytest.raises(ValueError, match="no sample to predict"):
        CASP(model(), **FAST).predict(data().select(torch.arange(0)))


def _fused_and_prediction(net, batch):
    z = net.fused(batch)
    return net.head(z), z


def _fused_as_tokens(net, batch):
    prediction, z = _fused_and_prediction(net, batch)
    return prediction, z.unflatten(1, (2, -1))  # [B, 2, d/2]: flattened back to [B, d]


@pytest.mark.parametrize("fn", [_fused_and_prediction, _fused_as_tokens])
def test_representation_fn_equals_the_fusion_hook(fn):
    """``representation_fn`` returning the fusion output adapts as the default hook on
    ``fusion`` does; a representation with more than two dimensions is flattened as the hook's
    is."""
    target = data(seed=3)
    hooked = CASP(model(), **FAST)
    hooked.adapt(target)
    given = CASP(model(), representation_fn=fn, **FAST)
    given.adapt(target)
    assert given.report.contrastive_losses == pytest.approx(hooked.report.contrastive_losses)
    torch.testing.assert_close(given.predict(target), hooked.predict(target))


def test_a_representation_that_is_missing_or_malformed_is_a_clear_error():
    with pytest.raises(TypeError, match=r"must return \(prediction, representation .*a Tensor"):
        CASP(model(), representation_fn=lambda net, batch: net(batch), **FAST).adapt(data())
    with pytest.raises(TypeError, match=r"got a tuple of \(Tensor, NoneType\)"):
        CASP(model(), representation_fn=lambda net, batch: (net(batch), None), **FAST).adapt(data())
    unused = model()
    unused.spare = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="representation module 'spare' did not run"):
        CASP(unused, representation_module="spare", **FAST).adapt(data())
    boxed = model()
    boxed.fusion.register_forward_hook(lambda _m, _args, out: {"features": out})
    boxed.head = _FromDict(boxed.head)  # the fusion module's output is a dict
    with pytest.raises(RuntimeError, match=r"the representation module's output: cannot find"):
        CASP(boxed, **FAST).adapt(data())


class _FromDict(nn.Module):
    """``head(d["features"])``."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, d):
        return self.head(d["features"])


def test_class_logits_of_more_than_two_dimensions_are_a_clear_error():
    class PerStep(nn.Module):  # [B, T, C]: one prediction per step, not per sample
        def __init__(self):
            super().__init__()
            self.inner = model(out_dim=3)
            self.fusion = self.inner.fusion

        def forward(self, batch):
            return self.inner(batch).unsqueeze(1).expand(-1, 2, -1)

    with pytest.raises(ValueError, match=r"needs class logits \[N, C\].*outputs \(\d+, 2, 3\)"):
        CASP(PerStep(), task="classification", **FAST).adapt(data(classes=3))


def test_trainable_all_adapts_every_parameter():
    target = data(seed=4)
    casp = CASP(model(), trainable="all", **FAST)
    before = {n: p.clone() for n, p in casp.model.named_parameters()}
    casp.adapt(target)
    norm_ids = {id(p) for p in norm_parameters(casp.model)}
    changed = {id(p) for n, p in casp.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed - norm_ids  # more than the normalisation layers moved
    assert len(casp.params) == len(list(casp.model.parameters()))


def test_online_batches_too_small_to_contrast():
    """One sample has no negative for NT-Xent: it is predicted without an update. No sample is
    a clear error that names the call."""
    casp = CASP(model(), **FAST)
    one = data().select(torch.tensor([0]))
    torch.testing.assert_close(casp(one), CASP(model(), **FAST).predict(one))
    assert casp.report.contrastive_losses == []
    with pytest.raises(ValueError, match=r"CASP.forward got no sample"):
        casp(data().select(torch.arange(0)))


@pytest.mark.parametrize("inplace", [False, True])
def test_a_compiled_model_is_adapted_through_the_module_it_wraps(inplace):
    """Adapting a ``torch.compile`` d model that already ran (its graph traced without CASP's
    hook) adapts the wrapped module eagerly, as CASP on the plain model does; in place, the
    compiled model then predicts with the adapted weights."""
    target = ModalityBatch({m: data(seed=5)[m] for m in ("a", "b")})
    torch.manual_seed(0)
    plain = _VectorLateFusion()
    expected = CASP(copy.deepcopy(plain), **FAST)
    expected.adapt(target)
    compiled = torch.compile(plain, backend="aot_eager")
    compiled(target)  # traced before CASP exists
    casp = CASP(compiled, inplace=inplace, **FAST)
    casp.adapt(target)
    assert casp.report.contrastive_losses == pytest.approx(expected.report.contrastive_losses)
    torch.testing.assert_close(casp.predict(target), expected.predict(target))
    with torch.no_grad():
        seen_by_compiled = compiled(target).squeeze(-1)
    after = expected.predict(target) if inplace else CASP(plain, **FAST).predict(target)
    torch.testing.assert_close(seen_by_compiled, after)


class _TwoLogits(nn.Module):
    """A single-logit binary model made explicit: logits ``[0, z]``."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.fusion = inner, inner.fusion

    def forward(self, batch):
        z = self.inner(batch)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def test_a_single_logit_binary_model_is_adapted_as_its_sigmoid_says():
    """One logit ``z`` per sample (a binary-cross-entropy model) reads as the probabilities
    ``(1 − σ(z), σ(z))``: the same run as the model returning ``[0, z]``. Before, the softmax
    of one class made every probability 1 and the pseudo-labels meaningless."""
    target = data(seed=6, classes=2)
    single = CASP(model(out_dim=1), task="classification", **FAST)
    single.adapt(target)
    explicit = CASP(_TwoLogits(model(out_dim=1)), task="classification", **FAST)
    explicit.adapt(target)
    probabilities = single.predict(target)
    torch.testing.assert_close(probabilities, explicit.predict(target))
    torch.testing.assert_close(single.report.pseudo_labels, explicit.report.pseudo_labels)
    assert single.report.pseudo_label_losses == pytest.approx(explicit.report.pseudo_label_losses)
    z = single.model.eval()(target).squeeze(-1)
    torch.testing.assert_close(probabilities[:, 1], torch.sigmoid(z))


def _adapt_bert_model(folder, pad_id):
    from tests.wander.conftest import bert_text_model

    torch.manual_seed(0)
    net, batch = bert_text_model(folder)
    ids = batch["text"].masked_fill(batch.padding_mask("text"), pad_id)
    target = ModalityBatch.concat([batch.replace(inputs={**batch.inputs, "text": ids})] * 4)
    casp = CASP(net, **FAST)
    report = casp.adapt(target)
    return casp, report, casp.predict(target)


def test_a_transformers_text_encoder_with_padded_token_ids(tmp_path):
    """Its LayerNorms are among the adapted parameters, and what the padded positions hold
    changes nothing (the same kept samples and predictions)."""
    casp, report, predictions = _adapt_bert_model(tmp_path, pad_id=0)
    bert_norms = {id(p) for p in norm_parameters(casp.model.encoders["text"])}
    assert bert_norms and bert_norms <= {id(p) for p in casp.params}
    _, other, other_predictions = _adapt_bert_model(tmp_path, pad_id=17)
    assert torch.equal(report.kept_indices, other.kept_indices)
    torch.testing.assert_close(other_predictions, predictions)


def test_a_second_adapt_continues_and_reset_starts_again_from_the_source():
    target = data(seed=3)
    casp = CASP(model(), **FAST)
    runs = []
    for before in (lambda: None, lambda: None, casp.reset):
        before()
        torch.manual_seed(1)  # the same dropout draws
        casp.adapt(target)
        runs.append(casp.predict(target))
    assert not torch.equal(runs[1], runs[0])  # continued from the first run's weights
    torch.testing.assert_close(runs[2], runs[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("epochs", "every", "taken"), [(3, 1, [0, 1, 2, 3]), (4, 2, [0, 2, 4]), (1, 1, [0, 1])]
)
def test_snapshots_are_taken_every_snapshot_every_epochs_and_at_least_twice(epochs, every, taken):
    casp = CASP(model(), **{**FAST, "epochs_ca": epochs, "snapshot_every": every})
    # 0: the source model's predictions (a collapse that stops stage 1 early adds one, -1)
    assert casp.adapt(data()).snapshot_epochs == taken


def test_a_target_set_of_two_samples_is_adapted_on():
    # the smallest batch NT-Xent can use (each sample is the other's negative)
    casp = CASP(model(), **{**FAST, "epochs_pl": 0})
    before = [p.clone() for p in norm_parameters(casp.model)]
    report = casp.adapt(data(n=2))
    assert len(report.contrastive_losses) == 2 and all(x > 0 for x in report.contrastive_losses)
    assert any(
        not torch.equal(a, b) for a, b in zip(norm_parameters(casp.model), before, strict=True)
    )


class _RMSNormLateFusion(_VectorLateFusion):
    def __init__(self):
        super().__init__()
        for encoder in self.encoders.values():
            encoder[1] = nn.RMSNorm(6)


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm needs torch >= 2.4")
def test_rmsnorm_layers_are_adapted():
    """torch's RMSNorm is a normalisation layer like LayerNorm (a model with only RMSNorms
    was an error: 'no normalisation layer')."""
    torch.manual_seed(0)
    net = _RMSNormLateFusion()
    casp = CASP(net, **FAST)
    rms = [m.weight for m in casp.model.modules() if isinstance(m, nn.RMSNorm)]
    assert {id(p) for p in casp.params} == {id(p) for p in rms}
    before = [p.clone() for p in rms]
    casp.adapt(ModalityBatch({m: data()[m] for m in ("a", "b")}))
    assert all(not torch.equal(a, b) for a, b in zip(rms, before, strict=True))


class ScaleNorm(nn.Module):  # a hand-written norm that subclasses none of torch's
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class LateFusionWithNorm(nn.Module):  # a whole model whose name ends in "Norm"
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.scale = ScaleNorm(3)
        self.shared = nn.LayerNorm(3)
        self.again = self.shared  # one layer under two names


def test_norm_layers_are_torch_norms_or_leaf_modules_named_norm():
    net = LateFusionWithNorm()
    assert is_norm_layer(net.scale) and is_norm_layer(net.shared)
    assert not is_norm_layer(net)  # has submodules: not a norm, its weight not adapted
    assert not is_norm_layer(nn.Linear(2, 2))
    expected = [net.scale.weight, net.shared.weight, net.shared.bias]
    assert [id(p) for p in norm_parameters(net)] == [id(p) for p in expected]


def test_a_transformers_encoder_with_its_own_norm_class(tmp_path):
    """T5's norms (``T5LayerNorm``, a plain ``nn.Module``) are adapted beside the model's
    LayerNorms; they were skipped silently."""
    from tests.helpers import tiny_t5_encoder

    torch.manual_seed(0)
    t5 = tiny_t5_encoder(tmp_path, vocab_size=30, hidden=8)
    norms = [m.weight for m in t5.modules() if type(m).__name__ == "T5LayerNorm"]
    assert len(norms) == 3 and not any(isinstance(m, _TORCH_NORMS) for m in t5.modules())
    ids = torch.randint(0, 30, (24, 6))
    target = ModalityBatch({"text": ids, "audio": torch.randn(24, 4, 3)})
    net = LateFusionModel.from_batch(
        ModalityBatch({"audio": target["audio"]}), 1, width=8, num_heads=2, dropout=0.0
    )
    net.encoders["text"] = t5
    net.fusion.modalities = ("text", "audio")
    net.head = nn.Linear(16, 1)
    casp = CASP(net.eval(), **FAST)
    adapted = casp.model.encoders["text"]
    t5_norms = [m.weight for m in adapted.modules() if type(m).__name__ == "T5LayerNorm"]
    assert {id(p) for p in t5_norms} <= {id(p) for p in casp.params}
    casp.adapt(target)
    assert all(not torch.equal(a, b) for a, b in zip(t5_norms, norms, strict=True))


_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def test_adapts_when_called_under_no_grad_as_from_an_evaluation_loop():
    """Under ``torch.no_grad()`` ``adapt`` and online calls adapt as they do without it (as in
    Tent; they failed with "element 0 of tensors does not require grad"). Under
    ``torch.inference_mode()``, which autograd cannot leave, it is a clear error, and
    ``predict`` still runs there."""
    target = data(seed=3)
    results = []
    for context in (contextlib.nullcontext, torch.no_grad):
        casp = CASP(model(), **FAST)
        torch.manual_seed(1)  # the same dropout draws
        with context():
            report = casp.adapt(target)
            online = casp(target.select(slice(0, 8)))
        results.append((report.kept_indices, casp.predict(target), online))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    casp = CASP(model(), **FAST)
    with torch.inference_mode():
        for call in (casp.adapt, casp):
            with pytest.raises(RuntimeError, match=r"outside inference_mode"):
                call(target)
        assert casp.predict(target).shape == (len(target),)


class _CheckpointedVectorLateFusion(_VectorLateFusion):
    """Each encoder under activation checkpointing (as large models train)."""

    use_reentrant = False

    def forward(self, batch):
        from torch.utils.checkpoint import checkpoint

        feats = [
            checkpoint(enc, batch[m], use_reentrant=self.use_reentrant)
            for m, enc in self.encoders.items()
        ]
        return self.head(self.fusion(torch.cat(feats, dim=-1)))


def test_checkpointed_encoders_adapt_as_without_checkpointing():
    """Non-reentrant checkpointing re-runs the encoders in the backward: same adaptation.
    Reentrant checkpointing of encoders whose inputs need no gradient leaves their norms
    without one (torch's own pitfall): a clear error, not autograd's."""
    target = ModalityBatch({m: data()[m] + 1.0 for m in ("a", "b")})
    torch.manual_seed(0)
    plain, checkpointed = _VectorLateFusion(), _CheckpointedVectorLateFusion()
    checkpointed.load_state_dict(plain.state_dict())
    casps = [CASP(net, **FAST) for net in (plain, checkpointed)]
    reports = [casp.adapt(target) for casp in casps]
    assert torch.equal(reports[0].kept_indices, reports[1].kept_indices)
    adapted = casps[0].predict(target)
    torch.testing.assert_close(casps[1].predict(target), adapted)
    assert not torch.equal(adapted, CASP(plain, **FAST).predict(target))  # it did adapt

    checkpointed.use_reentrant = True
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="use_reentrant=False"):
        CASP(checkpointed, **FAST).adapt(target)


class _PositionalModel(nn.Module):
    """A model that takes no ModalityBatch: ``model(a, b) -> (prediction, representation)``."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(d, 6), nn.LayerNorm(6)) for m, d in (("a", 5), ("b", 4))}
        )
        self.head = nn.Linear(12, 1)

    def forward(self, a, b):
        z = torch.cat([self.encoders["a"](a), self.encoders["b"](b)], dim=-1)
        return self.head(z), z


class _BatchCalling(nn.Module):
    """The same model behind the mmcore call, its representation at ``fusion``."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.fusion = inner, nn.Identity()

    def forward(self, batch):
        pred, z = self.inner(batch["a"], batch["b"])
        self.fusion(z)
        return pred


def test_representation_fn_also_gives_the_predictions():
    """With ``representation_fn``, every forward pass (stage 1, the snapshots, stage 2,
    ``predict``) goes through it, so a model that takes no ModalityBatch adapts, exactly as
    the same model behind the mmcore call."""
    target = ModalityBatch({m: data()[m] + 1.0 for m in ("a", "b")})
    torch.manual_seed(0)
    positional = _PositionalModel()
    through_fn = CASP(positional, representation_fn=lambda m, b: m(b["a"], b["b"]), **FAST)
    through_hook = CASP(_BatchCalling(copy.deepcopy(positional)), **FAST)
    reports = [casp.adapt(target) for casp in (through_fn, through_hook)]
    assert torch.equal(reports[0].kept_indices, reports[1].kept_indices)
    assert reports[0].contrastive_losses == reports[1].contrastive_losses
    torch.testing.assert_close(through_fn.predict(target), through_hook.predict(target))
    source = positional(target["a"], target["b"])[0].squeeze(-1).detach()
    assert not torch.allclose(through_fn.predict(target), source)  # it did adapt
