import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.backbones import LateFusionModel
from cggm import CGGM, CGGMConfig, ModalityClassifier, StackedClassifiers
from mmcore import ModalityBatch, ModulePathError, encoder_features, masked_mean


def vector_batch(m=3, b=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = {f"m{i}": torch.randn(b, 4 + i, generator=g) for i in range(m)}
    return ModalityBatch(inputs, target=torch.randint(0, classes, (b,), generator=g))


def make_model(batch, out_dim=3, seed=0):
    torch.manual_seed(seed)
    return LateFusionModel.from_batch(batch, out_dim, width=6, hidden=8, head="linear", dropout=0.0)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("m", [2, 3, 6])
def test_encoder_gradients_scaled_by_exactly_rho_b(m):
    batch = vector_batch(m)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.0)
    model.zero_grad()
    F.cross_entropy(model(batch), batch.target).backward()
    before = grads(model)
    b = cggm.step(batch.target)
    after = grads(model)
    assert set(b) == set(batch.modalities)
    for name, g in before.items():
        if name.startswith("encoders."):
            modality = name.split(".")[1]
            torch.testing.assert_close(after[name], 1.3 * b[modality] * g)
        else:
            torch.testing.assert_close(after[name], g)  # fusion and head are not scaled


@pytest.mark.parametrize("frozen", [["m1"], ["m0", "m1", "m2"]])
def test_a_frozen_encoder_is_warned_of_once(frozen):
    """Its gradients cannot be scaled; with all of them frozen (a frozen backbone under a
    parameter-efficient adapter, say) CGGM balances nothing. The others are still scaled."""
    batch = vector_batch(3)
    model = make_model(batch)
    for m in frozen:
        model.encoders[m].requires_grad_(False)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.0)
    every = len(frozen) == 3
    match = r"\['m0', 'm1', 'm2'\].*balances nothing" if every else r"\['m1'\].*onto nothing"
    for step in range(2):
        model.zero_grad()
        F.cross_entropy(model(batch), batch.target).backward()
        before = grads(model)
        if step == 0:
            with pytest.warns(UserWarning, match=match):
                b = cggm.step(batch.target)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                b = cggm.step(batch.target)
        for name, g in grads(model).items():
            if name.startswith("encoders."):
                torch.testing.assert_close(g, 1.3 * b[name.split(".")[1]] * before[name])
        assert every or any(n.startswith("encoders.m0") for n in before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_scaling_is_bit_exact(dtype):
    """Each encoder gradient becomes exactly ``grad.mul_(float(rho * B_m))``. CPU gradients
    take their factor as a 0-dim tensor: with a list of Python scalars, ``_foreach_mul_``
    rounded a bfloat16 gradient's factor to bfloat16 first."""
    batch = vector_batch(4)
    batch = batch.replace(inputs={m: x.to(dtype) for m, x in batch.inputs.items()})
    model = make_model(batch).to(dtype)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.0)
    model.zero_grad()
    F.cross_entropy(model(batch).float(), batch.target).backward()
    before = grads(model)
    cggm.step(batch.target)
    factors = (1.3 * cggm.coefficients).tolist()
    assert len(set(factors)) > 1  # the modalities' factors differ, so a mix-up shows
    for name, g in before.items():
        if name.startswith("encoders."):
            i = list(batch.modalities).index(name.split(".")[1])
            assert torch.equal(grads(model)[name], g.mul_(factors[i])), name


@pytest.mark.parametrize(
    ("model_dtype", "classifier_dtype"),
    [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
)
def test_classifiers_follow_the_models_dtype(model_dtype, classifier_dtype):
    """float64 models get float64 classifiers; half-precision ones float32 classifiers fed
    upcast features. The gradient scaling and the direction term work in either."""
    batch = vector_batch()
    batch = batch.replace(inputs={m: x.to(model_dtype) for m, x in batch.inputs.items()})
    model = make_model(batch).to(model_dtype)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.2)
    for _ in range(2):
        model.zero_grad()
        loss = F.cross_entropy(model(batch).float(), batch.target) + cggm.direction_loss()
        loss.backward()
        before = grads(model)
        b = cggm.step(batch.target)
    assert {p.dtype for p in cggm.classifiers.parameters()} == {classifier_dtype}
    assert torch.isfinite(cggm.direction_loss())
    name = next(n for n in before if n.startswith("encoders.m0."))
    torch.testing.assert_close(grads(model)[name], (1.3 * b["m0"] * before[name]).to(model_dtype))


def test_classifiers_are_isolated_from_the_encoders():
    batch = vector_batch()
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=None, lam=0.0)
    model.zero_grad()
    F.cross_entropy(model(batch), batch.target).backward()
    before = grads(model)
    cggm.step(batch.target)
    first = {k: v.clone() for k, v in cggm.classifiers.state_dict().items()}
    for name, g in grads(model).items():  # the classifiers' backward added nothing
        torch.testing.assert_close(g, before[name])
    model(batch)
    cggm.step(batch.target)
    assert any(not torch.equal(v, cggm.classifiers.state_dict()[k]) for k, v in first.items())


def test_reference_mode_matches_its_documented_semantics():
    """Hand-checked toy: ε^0 = 0, Δ = ε_t − ε_{t−1}, B = (S − Δ)/S, L_gm one step late."""
    batch = vector_batch(2, b=8)
    model = make_model(batch)
    # cls_lr ~ 0: the term is built from the classifier weights before their update
    cggm = CGGM(
        model,
        task="classification",
        num_outputs=3,
        rho=1.0,
        lam=0.5,
        mode="reference",
        cls_lr=1e-12,
    )
    assert cggm.direction_loss().item() == 0.0  # nothing before the first step
    F.cross_entropy(model(batch), batch.target).backward()
    b1 = cggm.step(batch.target)
    s1 = cggm.last_scores.clone()
    s = s1.sum() + 1e-8
    assert list(b1.values()) == pytest.approx(((s - s1) / s).tolist())  # Δ = ε_1 − 0
    heads_at_1 = [cggm.classifier(m).net[-1].weight.detach().clone() for m in cggm.modalities]
    w_at_1 = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(
            1.0
        )  # the optimiser moves the head; the pending term must not see it
    lgm = cggm.direction_loss()
    b = torch.tensor(list(b1.values()))
    cos = torch.stack(
        [F.cosine_similarity(h.reshape(-1), w_at_1.reshape(-1), dim=0) for h in heads_at_1]
    )
    expected = 0.5 * (b.abs().sum() - (b * cos).sum()) / 2
    assert lgm.item() == pytest.approx(expected.item(), rel=1e-5)
    assert cggm.direction_loss().item() == 0.0  # consumed: added once, at step t+1
    lgm.backward()  # its graph reaches the (moved) head weight
    assert model.head.weight.grad is not None


def test_default_direction_term_is_fresh_each_step():
    batch = vector_batch(2)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, lam=0.5)
    F.cross_entropy(model(batch), batch.target).backward()
    cggm.step(batch.target)
    a = cggm.direction_loss()
    with torch.no_grad():
        model.head.weight.mul_(-1)
    b = cggm.direction_loss()  # recomputed from the current weights, not carried over
    assert a.item() != pytest.approx(b.item())
    assert a.grad_fn is not None and b.item() == pytest.approx(cggm.direction_loss().item())


def test_b_is_finite_when_scores_stall():
    batch = vector_batch(3)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, cls_lr=1e-12, lam=0.0)
    for _ in range(4):  # classifiers frozen in effect: the scores stop changing, Δ = 0
        model.zero_grad()
        F.cross_entropy(model(batch), batch.target).backward()
        b = cggm.step(batch.target)
        assert all(0 <= v < 1 for v in b.values())
    assert list(b.values()) == pytest.approx([2 / 3] * 3)


def test_regression_on_padded_sequences():
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(8, 5, dtype=torch.bool)
    pad[:2, 3:] = True
    batch = ModalityBatch(
        {"text": torch.randn(8, 5, 4, generator=g), "audio": torch.randn(8, 6, 3, generator=g)},
        target=torch.randn(8, generator=g),
        padding_masks={"text": pad},
    )
    torch.manual_seed(0)
    model = LateFusionModel.from_batch(batch, 1, width=4, num_heads=2, head="linear")
    cggm = CGGM(model, task="regression", num_outputs=1, rho=1.3, lam=0.1)
    for _ in range(3):
        model.zero_grad()
        (F.l1_loss(model(batch).squeeze(-1), batch.target) + cggm.direction_loss()).backward()
        b = cggm.step(batch.target)
    assert set(b) == {"text", "audio"}
    assert cggm.classifier("text")(torch.randn(2, 5, 4), pad[:2]).shape == (2, 1)


def _padded_regression_batch(outputs=1):
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(8, 5, dtype=torch.bool)
    pad[:2, 3:] = True
    return ModalityBatch(
        {"text": torch.randn(8, 5, 4, generator=g), "audio": torch.randn(8, 6, 3, generator=g)},
        target=torch.randn(8, generator=g)
        if outputs == 1
        else torch.randn(8, outputs, generator=g),
        padding_masks={"text": pad},
    )


class _Halving(nn.Module):
    """A text encoder that halves the sequence (a strided convolution over time)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 2, stride=2)

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class _HalvingTextFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"text": _Halving(), "audio": nn.Linear(3, 4)})
        self.head = nn.Linear(8, 1)

    def forward(self, batch):
        feats = [self.encoders[m](batch[m]).mean(dim=1) for m in ("text", "audio")]
        return self.head(torch.cat(feats, dim=-1))


def test_a_padding_mask_the_features_no_longer_fit_is_dropped_with_one_warning():
    batch = _padded_regression_batch()
    torch.manual_seed(0)
    model = _HalvingTextFusion()
    cggm = CGGM(model, task="regression", num_outputs=1, lam=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.zero_grad()
            (F.l1_loss(model(batch).squeeze(-1), batch.target) + cggm.direction_loss()).backward()
            assert set(cggm.step(batch.target)) == {"text", "audio"}
    assert len(caught) == 1  # once, not once per step
    assert "'text' have 2 steps but the batch's padding mask 5" in str(caught[0].message)


def _segmentation_batch(classes=3):
    g = torch.Generator().manual_seed(0)
    return ModalityBatch(
        {m: torch.randn(2, 1, 8, 8, generator=g) for m in ("flair", "t1", "t2")},
        target=torch.randint(0, classes, (2, 8, 8), generator=g),
    )


def _binary_loss(pred, target):
    """A one-logit binary model's loss: BCE on ``[B, 1]`` or ``[B, 1, *spatial]`` logits."""
    return F.binary_cross_entropy_with_logits(pred[:, 0], target.float())


def _multilabel_batch(m=3, labels=3):
    """:func:`vector_batch` with ``labels`` independent 0/1 labels per sample ``[B, labels]``."""
    batch = vector_batch(m)
    g = torch.Generator().manual_seed(1)
    on = torch.randint(0, 2, (batch.batch_size, labels), generator=g)
    return batch.replace(target=on.float())


#: the one-logit binary tasks of :func:`_train_three_steps`, with CGGM's task for each
BINARY_TASKS = {"binary": "classification", "binary segmentation": "segmentation"}


def _modulated_sgd(model, cggm, batch, loss_fn, lr, steps=3):
    """``steps`` modulated SGD steps on one batch; the B of each."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        (loss_fn(model(batch), batch.target) + cggm.direction_loss()).backward()
        history.append(cggm.step(batch.target))
        opt.step()
    return history


def _train_three_steps(task, configure=lambda cggm: None, prepare=None, lr=0.1, classifiers=None):
    """Three modulated SGD steps on a small ``task`` model: ``(B history, classifiers' state
    per modality, model state)``. ``configure(cggm)`` runs before the first step; ``prepare``
    changes the batch; ``classifiers`` are the user's own."""
    if task == "classification":
        batch, out, loss_fn = vector_batch(4), 3, F.cross_entropy
    elif task == "segmentation":
        batch, out, loss_fn = _segmentation_batch(), 3, F.cross_entropy
    elif task == "binary":
        batch, out, loss_fn = vector_batch(4, classes=2), 1, _binary_loss
    elif task == "binary segmentation":
        batch, out, loss_fn = _segmentation_batch(classes=2), 1, _binary_loss
    elif task == "multilabel":  # 3 yes/no labels per sample (emotions, say)
        batch, out, loss_fn = _multilabel_batch(4), 3, F.binary_cross_entropy_with_logits
    else:  # "regression", or "regression, 2 outputs" (valence and arousal, say)
        out = 2 if task.endswith("2 outputs") else 1
        batch = _padded_regression_batch(out)

        def loss_fn(p, y):
            return F.l1_loss(p.reshape(y.shape), y)

    if prepare is not None:
        batch = prepare(batch)
    torch.manual_seed(0)
    if task in ("classification", "binary", "multilabel"):
        model = make_model(batch, out)
    elif task in ("segmentation", "binary segmentation"):
        model = SegModel(stride=2, classes=out)
    else:
        model = LateFusionModel.from_batch(batch, out, width=4, num_heads=2, head="linear")
    cggm_task = BINARY_TASKS.get(task, task.split(",")[0])
    cggm = CGGM(model, task=cggm_task, num_outputs=out, rho=1.3, lam=0.1, classifiers=classifiers)
    configure(cggm)
    history = _modulated_sgd(model, cggm, batch, loss_fn, lr)
    per_modality = {
        f"{m}.{k}": v for m in cggm.modalities for k, v in cggm.classifier(m).state_dict().items()
    }
    return cggm, history, per_modality, model.state_dict()


def _assert_same_runs(first, second):
    (_, h1, c1, m1), (_, h2, c2, m2) = first, second
    for a, b in zip(h1, h2, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    for state1, state2 in ((c1, c2), (m1, m2)):
        for k in state1:
            torch.testing.assert_close(state1[k], state2[k], msg=k)


@pytest.mark.parametrize(
    "task",
    [
        "classification",
        "regression",
        "segmentation",
        "binary",
        "binary segmentation",
        "regression, 2 outputs",
        "multilabel",
    ],
)
def test_batched_classifiers_equal_the_per_modality_loop(task, monkeypatch):
    """The default classifiers run as one batched MLP; a per-modality loop gives the same run.

    Segmentation uses encoders at half resolution, so the classifiers' logits are resized.
    """
    stacked = _train_three_steps(task)
    monkeypatch.setattr(CGGM, "_can_stack", lambda self, classifiers: False)
    loop = _train_three_steps(task)
    assert stacked[0]._stacked and not loop[0]._stacked
    _assert_same_runs(stacked, loop)


def _own_classifiers(task, plain):
    """Classifiers of the default ones' shapes, passed as the user's own: ``ModalityClassifier``
    s, or the same weights as plain modules that take no padding mask (an ``nn.Sequential`` of
    Linear layers; of 1×1 convolutions for feature maps)."""
    shapes = _train_three_steps(task)[0]
    torch.manual_seed(1)
    own = {}
    for m in shapes.modalities:
        inner, outer = shapes.classifier(m).layers()
        own[m] = ModalityClassifier(
            shapes.classifier(m).feature_shape, inner.out_features, outer.out_features
        )
    if not plain:
        return own
    if task != "segmentation":
        return {m: clf.net for m, clf in own.items()}
    as_convs = {}
    for m, clf in own.items():
        convs = [nn.Conv2d(layer.in_features, layer.out_features, 1) for layer in clf.layers()]
        for conv, layer in zip(convs, clf.layers(), strict=True):
            conv.load_state_dict({"weight": layer.weight[..., None, None], "bias": layer.bias})
        as_convs[m] = nn.Sequential(convs[0], nn.ReLU(), convs[1])
    return as_convs


@pytest.mark.parametrize("task", ["classification", "regression", "segmentation"])
def test_the_users_own_classifiers_train_as_the_default_ones(task):
    """``classifiers=``: a module that takes no padding mask gets sequences mean-pooled over
    their real steps (the regression batch is padded), so the run equals the same weights in
    ``ModalityClassifier`` s, B, model and final classifier weights alike."""
    runs = [
        _train_three_steps(task, classifiers=_own_classifiers(task, plain))
        for plain in (False, True)
    ]
    (default, h1, c1, m1), (plain, h2, c2, m2) = runs
    assert not default._stacked
    assert isinstance(plain.classifier(plain.modalities[0]), nn.Sequential)
    for a, b in zip(h1, h2, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], msg=k)
    for m in default.modalities:
        torch.testing.assert_close(
            c1[f"{m}.net.2.weight"], c2[f"{m}.2.weight"].reshape(c1[f"{m}.net.2.weight"].shape)
        )


def test_the_users_own_classifiers_are_checked():
    batch = vector_batch(2)
    model = make_model(batch)
    with pytest.raises(ValueError, match=r"classifiers lacks modalities \['m1'\]"):
        CGGM(model, num_outputs=3, classifiers={"m0": nn.Linear(6, 3)})
    with pytest.raises(ValueError, match="classifier 'm0' has no trainable parameter"):
        CGGM(model, num_outputs=3, lam=0.0, classifiers={"m0": nn.Identity(), "m1": nn.Identity()})
    with pytest.raises(ValueError, match=r"classifier 'm0' ends in a weight of shape \(4, 6\)"):
        CGGM(
            model,
            num_outputs=3,
            lam=0.1,
            classifiers={"m0": nn.Linear(6, 4), "m1": nn.Linear(6, 3)},
        )

    class Raw(nn.Module):  # no Linear/Conv layer: any classifier is fine without the direction term
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(6, 3))

        def forward(self, x):
            return x @ self.weight

    with pytest.raises(TypeError, match="classifier 'm0' \\(Raw\\) has no Linear/Conv layer"):
        CGGM(model, num_outputs=3, lam=0.1, classifiers={"m0": Raw(), "m1": Raw()})
    cggm = CGGM(model, num_outputs=3, lam=0.0, classifiers={"m0": Raw(), "m1": Raw()})
    F.cross_entropy(model(batch), batch.target).backward()
    assert set(cggm.step(batch.target)) == {"m0", "m1"}
    assert cggm.classifier("m0").weight.abs().sum() > 0  # trained
    resumed = CGGM(model, num_outputs=3, lam=0.0, classifiers={"m0": Raw(), "m1": Raw()})
    resumed.load_state_dict(cggm.state_dict())  # the user's classifiers round-trip too
    torch.testing.assert_close(resumed.classifier("m0").weight, cggm.classifier("m0").weight)


class SegModel(nn.Module):
    """Per-modality conv encoders -> concat fusion -> 1x1 conv head (segmentation)."""

    def __init__(self, modalities=("flair", "t1", "t2"), classes=3, stride=1):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {m: nn.Conv2d(1, 4, 3, padding=1, stride=stride) for m in modalities}
        )
        self.fusion = nn.Upsample(scale_factor=stride) if stride > 1 else nn.Identity()
        self.head = nn.Conv2d(4 * len(modalities), classes, 1)

    def forward(self, batch):
        feats = [torch.relu(self.encoders[m](batch[m])) for m in self.encoders]
        return self.head(self.fusion(torch.cat(feats, dim=1)))


def segmentation_steps(device="cpu"):
    """Two modulated segmentation steps on ``device``: ``(model, cggm)`` after checking B."""
    batch = _segmentation_batch().to(device)
    model = SegModel().to(device)
    cggm = CGGM(model, task="segmentation", num_outputs=3, lam=0.1)
    for _ in range(2):
        model.zero_grad()
        (F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()).backward()
        b = cggm.step(batch.target)
    assert len(b) == 3 and all(0 <= v < 1 for v in b.values())
    return model, cggm


def test_segmentation():
    model, cggm = segmentation_steps()
    # a per-pixel MLP: its final [C, F] weight is the 1x1 head conv's [C, F, 1, 1]
    head = model.head.weight
    assert cggm.classifier("t1").net[-1].weight.shape == head.shape[:2]
    assert cggm.classifier("t1")(torch.randn(2, 4, 8, 8)).shape == (2, 3, 8, 8)


def _history_with_targets(model, task, batch, target_of):
    """B over two modulated steps, ``cggm.step`` given ``target_of(batch.target)``; and the
    classifiers' weights after."""
    cggm = CGGM(model, task=task, num_outputs=3, lam=0.1)
    history = []
    for _ in range(2):
        model.zero_grad()
        (F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()).backward()
        history.append(cggm.step(target_of(batch.target)))
    return history, copy.deepcopy(cggm.classifiers.state_dict())


def _segmentation_history(target_of):
    torch.manual_seed(0)
    return _history_with_targets(SegModel(), "segmentation", _segmentation_batch(), target_of)


def test_segmentation_targets_as_monai_pipelines_give_them():
    """A channel axis of one, whole-number floats (LoadImage's labels) and one-hot maps are the
    same label map (they failed inside interpolate, or as 'needs integer class targets ... use
    task=regression'); overlapping region masks and fractional labels are clear errors."""
    expected, weights = _segmentation_history(lambda y: y)
    one_hot = lambda y: F.one_hot(y, 3).movedim(-1, 1)  # noqa: E731
    for form in (
        lambda y: y.float(),
        lambda y: y[:, None],
        lambda y: y[:, None].double(),
        one_hot,
        lambda y: one_hot(y).float(),
        lambda y: one_hot(y).bool(),
    ):
        history, state = _segmentation_history(form)
        assert history == expected
        for k, v in state.items():
            torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    regions = lambda y: torch.stack([y > 0, y > 1, y == 2], dim=1)  # noqa: E731  overlapping
    for form, match in (
        (regions, r"got shape \(2, 3, 8, 8\), not one-hot.*\[TC, WT, ET\]"),
        (lambda y: y.float() + 0.5, "not whole numbers"),
        (lambda y: one_hot(y)[:, :2], r"class indices \[B, \*spatial\] \(or one-hot"),
    ):
        with pytest.raises(ValueError, match=match):
            _segmentation_history(form)


def test_class_targets_as_floats_with_a_channel_axis_or_one_hot():
    """Classification takes the same forms of class targets as segmentation (tested equal)."""

    def history(target_of):
        batch = vector_batch(3)
        return _history_with_targets(make_model(batch), "classification", batch, target_of)[0]

    expected = history(lambda y: y)
    for form in (
        lambda y: y.double(),
        lambda y: y[:, None],
        lambda y: F.one_hot(y, 3),
        lambda y: F.one_hot(y, 3).float(),
    ):
        assert history(form) == expected


def test_gradient_accumulation_modulates_only_on_sync():
    batch = vector_batch(2)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=2.0, lam=0.0)
    model.zero_grad()
    F.cross_entropy(model(batch.select(slice(0, 8))), batch.target[:8]).backward()
    before = grads(model)
    assert cggm.step(batch.target[:8], sync=False) is None
    for n, g in grads(model).items():
        torch.testing.assert_close(g, before[n])  # micro-step: no scaling
    F.cross_entropy(model(batch.select(slice(8, 16))), batch.target[8:]).backward()
    accumulated = grads(model)
    b = cggm.step(batch.target[8:])
    assert cggm._counts.sum() == 0  # the scores of both micro-batches were used and reset
    enc = "encoders.m0.net.0.weight"
    torch.testing.assert_close(grads(model)[enc], 2.0 * b["m0"] * accumulated[enc])


@pytest.mark.skipif(
    not hasattr(torch.amp, "GradScaler"), reason="a CPU GradScaler needs torch>=2.3"
)
def test_amp_grad_scaler_unscale_first():
    batch = vector_batch(2)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    reference = make_model(batch)
    F.cross_entropy(reference(batch), batch.target).backward()
    scaler.scale(F.cross_entropy(model(batch), batch.target)).backward()
    scaler.unscale_(opt)
    b = cggm.step(batch.target)
    enc = "encoders.m1.net.0.weight"
    torch.testing.assert_close(grads(model)[enc], 1.3 * b["m1"] * grads(reference)[enc])
    scaler.step(opt)
    scaler.update()


def test_model_moved_after_the_classifiers_were_built():
    batch = vector_batch(2)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, lam=0.0)
    modulated_steps(cggm, model, [batch])
    cggm._installed()[0].to("meta")  # as if the model alone had moved to another device
    model(batch)
    with pytest.raises(RuntimeError, match="features are on cpu but the classifiers on meta"):
        cggm.step(batch.target)


def modulated_steps(cggm, model, batches):
    """One modulated backward per batch (no optimiser step): the B of each."""
    out = []
    for batch in batches:
        model.zero_grad()
        (F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()).backward()
        out.append(cggm.step(batch.target))
    return out


def test_state_round_trip_resumes_exactly():
    batches = [vector_batch(3, seed=s) for s in range(4)]
    run = modulated_steps
    model = make_model(batches[0])
    cggm = CGGM(model, task="classification", num_outputs=3, smoothing=0.5)
    run(cggm, model, batches[:2])
    buffer = io.BytesIO()  # through a file, as a checkpoint goes: the state holds live tensors
    torch.save(cggm.state_dict(), buffer)
    expected = run(cggm, model, batches[2:])

    model2 = make_model(batches[0])
    resumed = CGGM(model2, task="classification", num_outputs=3, smoothing=0.5)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert run(resumed, model2, batches[2:]) == expected
    # B moves with accuracy alone, which small weight changes leave as it was: compare the
    # classifiers and their optimiser's moments too
    for name, value in cggm.state_dict()["classifiers"].items():
        torch.testing.assert_close(resumed.state_dict()["classifiers"][name], value, rtol=0, atol=0)
    saved, got = cggm.state_dict()["optimizer"], resumed.state_dict()["optimizer"]
    for index, moments in saved["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(got["state"][index][key], value, rtol=0, atol=0)


def test_a_state_for_other_modalities_or_another_set_up_is_refused():
    batches = [vector_batch(3, seed=s) for s in range(2)]
    model = make_model(batches[0])
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3)
    modulated_steps(cggm, model, batches)
    state = cggm.state_dict()
    two = make_model(vector_batch(2))
    with pytest.raises(ValueError, match=r"modalities \['m0', 'm1', 'm2'\], this CGGM .*'m1'\]"):
        CGGM(two, task="classification", num_outputs=3).load_state_dict(state)
    four = make_model(batches[0], out_dim=4)
    with pytest.raises(ValueError, match="num_outputs: saved 3, here 4"):
        CGGM(four, task="classification", num_outputs=4).load_state_dict(state)
    fresh = CGGM(make_model(batches[0]), task="classification", num_outputs=3)
    with pytest.raises(ValueError, match=r"the state has scores for 2 modalities, this CGGM .* 3"):
        fresh.load_state_dict({**state, "prev_scores": state["prev_scores"][:2]})
    with pytest.raises(ValueError, match="classifier weights but no feature shapes"):
        fresh.load_state_dict({**state, "feature_shapes": None})
    # settings that shape nothing saved may change on resume
    CGGM(make_model(batches[0]), task="classification", num_outputs=3, rho=2.0).load_state_dict(
        state
    )


def test_a_modulated_model_can_be_copied_and_pickled():
    """The hooks are picklable objects: ``torch.save(model)`` works, and a deep copy's hooks
    feed a copy of the modulator, never the original."""
    import copy
    import io

    batch = vector_batch()
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3)
    F.cross_entropy(model(batch), batch.target).backward()
    cggm.step(batch.target)
    copied = copy.deepcopy(model)
    copied(batch)
    assert cggm._captured == {}  # the copy's forward reached a copy of the modulator
    with pytest.raises(RuntimeError, match="no encoder output captured"):
        cggm.step(batch.target)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(batch), model(batch))


def test_bad_configuration_raises():
    batch = vector_batch()
    model = make_model(batch)
    with pytest.raises(ValueError, match="task must be one of"):
        CGGMConfig(task="ranking")
    with pytest.raises(ValueError, match="rho must be > 0"):
        CGGMConfig(rho=-1.0)
    with pytest.raises(ValueError, match="smoothing is a default-mode safeguard"):
        CGGMConfig(mode="reference", smoothing=0.5)
    with pytest.raises(ValueError, match="either config= or"):
        CGGM(model, CGGMConfig(), rho=1.0)
    with pytest.raises(ModulePathError, match=r"encoder_modules.*Did you mean"):
        CGGM(model, encoder_modules={"a": "encoders.m9", "b": "encoders.m1"}, num_outputs=3)
    with pytest.raises(ValueError, match=">= 2 modalities"):
        CGGM(model, encoder_modules={"a": "encoders.m0"}, num_outputs=3)
    with pytest.raises(ValueError, match=r"CGGM: the modality names \['a.b'\] key submodules"):
        # the classifiers are keyed by modality: it failed on the first step with a KeyError
        CGGM(model, encoder_modules={"a.b": "encoders.m0", "c": "encoders.m1"}, num_outputs=3)
    with pytest.raises(ValueError, match="'a' and 'b' name the same module"):
        CGGM(model, encoder_modules={"a": "encoders.m0", "b": "encoders.m0"}, num_outputs=3)
    with pytest.raises(ValueError, match=r"\['a', 'b'\] hold parameters in common"):
        CGGM(model, encoder_modules={"a": "encoders.m0", "b": "encoders.m0.net"}, num_outputs=3)
    cggm = CGGM(model, task="classification", num_outputs=4)
    model(batch)
    with pytest.raises(ValueError, match="head's final weight has 3 outputs but num_outputs=4"):
        cggm.step(batch.target)
    fresh = CGGM(make_model(batch), num_outputs=3)
    with pytest.raises(RuntimeError, match="call the model's forward"):
        fresh.step(batch.target)
    for target, message in (
        (batch.target[:8], r"target has shape \(8,\) but the forward pass saw 16 samples"),
        (batch.target.float() / 2, "needs class indices, got torch.float32 values that"),
        (torch.rand(16, 3), r"class indices \[B\] \(or one-hot \[B, 3\]\); got shape"),
    ):
        fresh_model = make_model(batch)
        checked = CGGM(fresh_model, num_outputs=3)
        fresh_model(batch)
        with pytest.raises(ValueError, match=message):
            checked.step(target)
    empty = batch.select(slice(0, 0))
    fresh_model = make_model(batch)
    checked = CGGM(fresh_model, num_outputs=3)
    F.cross_entropy(fresh_model(empty), empty.target, reduction="sum").backward()
    with pytest.raises(ValueError, match=r"empty batch \(0 samples\).*skip the step"):
        checked.step(empty.target)
    forgot = make_model(batch)
    unscaled = CGGM(forgot, num_outputs=3)
    forgot(batch)  # no backward: nothing to scale
    with pytest.raises(RuntimeError, match=r"call loss.backward\(\) .* before cggm.step\(\)"):
        unscaled.step(batch.target)
    assert unscaled.coefficients is None  # no score moved
    F.cross_entropy(forgot(batch), batch.target).backward()
    assert set(unscaled.step(batch.target)) == set(batch.modalities)
    with pytest.raises(ValueError, match="classifier_hidden must be a positive integer"):
        CGGMConfig(classifier_hidden=0)
    with pytest.raises(ValueError, match=r"classifier_hidden=5 differs .* needs lam=0"):
        CGGM(model, num_outputs=3, classifier_hidden=5)
    with pytest.raises(ValueError, match="size them yourself"):
        clfs = {m: ModalityClassifier((4,), 5, 3) for m in batch.modalities}
        CGGM(model, num_outputs=3, lam=0.0, classifier_hidden=5, classifiers=clfs)


def test_smaller_classifiers_without_the_direction_term():
    batch = vector_batch(3)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, lam=0.0, classifier_hidden=5)
    model.zero_grad()
    F.cross_entropy(model(batch), batch.target).backward()
    before = grads(model)
    b = cggm.step(batch.target)
    assert isinstance(cggm.classifiers, StackedClassifiers)
    assert cggm.classifier("m0").net[0].out_features == 5
    assert cggm.direction_loss().item() == 0.0
    for name, g in grads(model).items():
        if name.startswith("encoders."):
            torch.testing.assert_close(g, 1.3 * b[name.split(".")[1]] * before[name])


def test_stacked_classifiers_round_trip_and_lookup_before_the_first_step():
    torch.manual_seed(0)
    singles = {m: ModalityClassifier((5,), 7, 3) for m in ("a", "b", "c")}
    stacked = StackedClassifiers.from_classifiers(singles, ("a", "b", "c"))
    x = torch.randn(3, 4, 5)
    logits = stacked(x)
    for i, m in enumerate(("a", "b", "c")):
        torch.testing.assert_close(logits[i], singles[m](x[i]))
        back = stacked.unstack(m)
        for k, v in singles[m].state_dict().items():
            torch.testing.assert_close(back.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"expects features \[3, N, 5\]"):
        stacked(torch.randn(2, 4, 5))
    batch = vector_batch(2)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3)
    with pytest.raises(RuntimeError, match="first step"):
        cggm.classifier("m0")
    F.cross_entropy(model(batch), batch.target).backward()
    cggm.step(batch.target)
    with pytest.raises(KeyError, match=r"modalities: \['m0', 'm1'\]"):
        cggm.classifier("text")


@pytest.mark.parametrize(
    "task", ["classification", "regression", "binary", "regression, 2 outputs", "multilabel"]
)
def test_stacked_classifiers_hand_written_backward_equals_autograd(task):
    outputs = {"classification": 3, "regression, 2 outputs": 2, "multilabel": 4}.get(task, 1)
    torch.manual_seed(0)
    stacked = StackedClassifiers(("a", "b", "c"), 5, 7, outputs).double()
    for p in stacked.parameters():
        nn.init.normal_(p)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    if task == "classification":
        target = torch.randint(0, 3, (6,))

        def loss_of(logits):
            return sum(F.cross_entropy(logits[i], target) for i in range(3))
    elif task == "binary":
        target = torch.randint(0, 2, (6,))

        def loss_of(logits):
            return sum(_binary_loss(logits[i], target) for i in range(3))
    elif task == "multilabel":
        target = torch.randint(0, 2, (6, outputs)).bool()  # as a boolean mask, say

        def loss_of(logits):
            bce = F.binary_cross_entropy_with_logits
            return sum(bce(logits[i], target.double()) for i in range(3))
    else:
        target = torch.randn(6, outputs, dtype=torch.float64).squeeze(-1)

        def loss_of(logits):
            return sum(F.l1_loss(logits[i].reshape(target.shape), target) for i in range(3))

    loss_of(stacked(x)).backward()
    expected = {n: p.grad.clone() for n, p in stacked.named_parameters()}
    stacked.zero_grad(set_to_none=True)
    cggm = CGGM.__new__(CGGM)  # only _logit_grads is used: it reads the config
    cggm.config = CGGMConfig(task=BINARY_TASKS.get(task, task.split(",")[0]), num_outputs=outputs)
    logits = stacked.forward_backward(x, lambda z: cggm._logit_grads(target, z))
    torch.testing.assert_close(logits, stacked(x))
    for n, p in stacked.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)


@pytest.mark.parametrize(
    "task", ["classification", "regression", "binary", "regression, 2 outputs", "multilabel"]
)
def test_hand_written_classifier_backward_trains_as_autograd_does(task):
    """``hand_backward=False`` (autograd through the stacked MLP) gives the same run."""

    def through_autograd(cggm):
        cggm.hand_backward = False

    by_hand = _train_three_steps(task)
    assert by_hand[0]._stacked and by_hand[0].hand_backward  # the path under test ran
    _assert_same_runs(by_hand, _train_three_steps(task, through_autograd))


def _through_autograd(cggm):
    cggm.hand_backward = False


def _per_modality_loop(cggm):
    cggm._can_stack = lambda classifiers: False


def _missing_first(batch, garbage=False):
    """The first modality missing in every other sample (features kept, or other values)."""
    m = batch.modalities[0]
    missing = torch.arange(batch.batch_size) % 2 == 0
    out = batch.with_missing(m, missing, fill=None)
    if garbage:
        x = out[m].clone()
        x[missing] = 3.0 - 2.0 * x[missing]
        out = out.replace(inputs={**out.inputs, m: x})
    return out


PATHS = {"by hand": lambda cggm: None, "autograd": _through_autograd, "loop": _per_modality_loop}


@pytest.mark.parametrize(
    ("task", "path"),
    [
        (t, p)
        for t in ("classification", "regression", "binary", "regression, 2 outputs", "multilabel")
        for p in PATHS
    ]
    # feature maps always train through autograd: no hand-written path to test there
    + [(t, p) for t in ("segmentation", "binary segmentation") for p in ("autograd", "loop")],
)
def test_samples_lacking_a_modality_neither_train_nor_score_its_classifier(task, path):
    """With the model held still (lr 0), what a missing modality's features hold changes
    nothing: not its classifier's training, not the scores, not B."""
    configure = PATHS[path]
    kept = _train_three_steps(task, configure, prepare=_missing_first, lr=0.0)
    other = _train_three_steps(
        task, configure, prepare=lambda b: _missing_first(b, garbage=True), lr=0.0
    )
    _assert_same_runs(kept, other)
    plain = _train_three_steps(
        task,
        configure,
        prepare=lambda b: _missing_first(b, garbage=True).replace(presence={}),
        lr=0.0,
    )
    assert plain[1] != other[1]  # without the presence mask, the other values are read


def _nan_where_missing(modality, output):
    """The first modality's features NaN for the samples :func:`_missing_first` marks missing
    (what the classifiers see; the model itself is unaffected)."""
    features = encoder_features(output)
    if modality not in ("m0", "text", "flair"):
        return features
    features = features.clone()
    features[::2] = float("nan")
    return features


@pytest.mark.parametrize("task", ["classification", "regression", "segmentation"])
@pytest.mark.parametrize("path", ["by hand", "loop"])
def test_nan_features_of_samples_lacking_the_modality_change_nothing(task, path):
    """Zeroed, not weighted by 0 (NaN × 0 is NaN): NaN in a missing modality's features leaves
    its classifier finite and the run as with the features kept."""

    def configure(cggm):
        PATHS[path](cggm)
        cggm.feature_fn = _nan_where_missing

    kept = _train_three_steps(task, PATHS[path], prepare=_missing_first, lr=0.0)
    nan = _train_three_steps(task, configure, prepare=_missing_first, lr=0.0)
    _assert_same_runs(kept, nan)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_batch_with_non_finite_features_is_skipped(path):
    """One batch whose classifier outputs are not finite (an fp16 overflow, say) is skipped
    with a warning, as ``GradScaler`` skips the model's step: the run then goes on exactly as
    if that batch had never come, instead of its NaN classifiers spoiling every later loss."""

    def run(with_bad_batch):
        batch = vector_batch(3)
        model = make_model(batch)
        cggm = CGGM(model, num_outputs=3, rho=1.3, lam=0.2)
        PATHS[path](cggm)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        history = []
        for seed in (0, 1, 2, 3):
            batch = vector_batch(3, seed=seed)
            if seed == 1:
                if not with_bad_batch:
                    continue
                x = batch["m1"].clone()
                x[0] = float("inf")
                batch = batch.replace(inputs={**batch.inputs, "m1": x})
            opt.zero_grad()
            loss = F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()
            loss.backward()
            if seed == 1:
                with pytest.warns(
                    UserWarning,
                    match=r"outputs for \['m1'\] are NaN or infinite on this step's batch \(",
                ):
                    assert cggm.step(batch.target) is None
                continue  # the model's step skipped too, as GradScaler does
            history.append(cggm.step(batch.target))
            opt.step()
        assert all(torch.isfinite(p).all() for p in cggm.classifiers.parameters())
        return history, cggm.state_dict()["classifiers"], model.state_dict()

    (h1, c1, m1), (h2, c2, m2) = run(True), run(False)
    assert h1 == h2
    for first, second in ((c1, c2), (m1, m2)):
        for k, v in first.items():
            torch.testing.assert_close(v, second[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("task", ["classification", "regression", "segmentation", "multilabel"])
def test_presence_masks_marking_every_sample_present_change_nothing(task):
    def all_present(batch):
        return batch.replace(
            presence={m: torch.ones(batch.batch_size, dtype=torch.bool) for m in batch.modalities}
        )

    _assert_same_runs(_train_three_steps(task), _train_three_steps(task, prepare=all_present))


def test_a_modality_missing_from_every_sample_keeps_its_score():
    batch = vector_batch()
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, smoothing=0.5, lam=0.0)
    for step in range(2):
        b = batch if step == 0 else batch.with_missing("m0", True)
        model.zero_grad()
        F.cross_entropy(model(b), b.target).backward()
        coefficients = cggm.step(b.target)
        if step == 0:
            first = cggm.prev_scores.clone()
    assert cggm.last_scores[0] == first[0]  # no news on m0: its score stays
    assert cggm.prev_scores[0] == first[0]
    assert all(torch.isfinite(torch.tensor(list(coefficients.values()))))


class PresentOnlyFusion(nn.Module):
    """Mean of the encoder features of the modalities each sample has.

    ``lacking``: what the model does with a modality the batch lacks altogether. ``"skip"``:
    its encoder does not run, as many models with missing modalities do (``if m in batch``);
    ``"zeros"``: it encodes zeros, weighted 0 in the mean; ``None``: every modality must be in
    the batch, whose presence masks weight the mean. Image inputs ``[B, 1, H, W]`` get 1x1
    convolutions (segmentation).
    """

    def __init__(self, batch, lacking=None, out_dim=3):
        super().__init__()
        torch.manual_seed(0)
        self.lacking = lacking
        self.input_shapes = {m: batch[m].shape[1:] for m in batch.modalities}
        if batch[batch.modalities[0]].ndim == 4:
            self.encoders = nn.ModuleDict({m: nn.Conv2d(1, 8, 1) for m in batch.modalities})
            self.head = nn.Conv2d(8, out_dim, 1)
        else:
            dims = {m: batch[m].shape[-1] for m in batch.modalities}
            self.encoders = nn.ModuleDict({m: nn.Linear(d, 8) for m, d in dims.items()})
            self.head = nn.Linear(8, out_dim)
        self.fusion = nn.Identity()

    def forward(self, batch):
        feats, weights = [], []
        for m, encoder in self.encoders.items():
            if m in batch or self.lacking is None:
                x, w = batch[m], batch.is_present(m).float()
            elif self.lacking == "skip":
                continue
            else:
                x = torch.zeros(batch.batch_size, *self.input_shapes[m])
                w = torch.zeros(batch.batch_size)
            feats.append(encoder(x))
            weights.append(w)
        stacked = torch.stack(feats)  # [M, B, 8] or [M, B, 8, H, W]
        w = torch.stack(weights).view(*stacked.shape[:2], *[1] * (stacked.ndim - 2))
        fused = (stacked * w).sum(0) / w.sum(0).clamp_min(1)
        return self.head(self.fusion(fused))


@pytest.mark.parametrize(
    ("task", "path"),
    [(t, p) for t in ("classification", "regression") for p in PATHS]
    + [("segmentation", "autograd"), ("segmentation", "loop")],  # maps: autograd either way
)
def test_a_modality_the_batch_lacks_counts_as_absent_from_it(task, path):
    """A model that does not run the encoder of a modality the batch lacks, or encodes zeros
    for it, trains as one that runs it on a batch marking that modality missing in every
    sample: same B, classifiers and weights (the lacking classifier neither trains nor scores;
    its score stays). The first batch named it; a modulator resumed from its state_dict keeps
    knowing the name."""
    loss_fn = F.l1_loss if task == "regression" else F.cross_entropy
    out_dim = 1 if task == "regression" else 3

    def run(lacking, resume_after=None):
        full = _segmentation_batch() if task == "segmentation" else vector_batch(3)
        if task == "regression":
            full = full.replace(target=full.target.float())
        first, *rest = full.modalities

        def modulator(model):
            cggm = CGGM(model, task=task, num_outputs=out_dim, rho=1.3, lam=0.2)
            PATHS[path](cggm)
            return cggm

        model = PresentOnlyFusion(full, lacking, out_dim)
        cggm = modulator(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        history = []
        for step in range(4):
            batch = full
            if step % 2:
                batch = (
                    ModalityBatch({m: full[m] for m in rest}, target=full.target)
                    if lacking
                    else full.with_missing(first, True)
                )
            opt.zero_grad()
            out = model(batch)
            loss = loss_fn(out.squeeze(-1) if task == "regression" else out, batch.target)
            (loss + cggm.direction_loss()).backward()
            history.append(cggm.step(batch.target))
            opt.step()
            if step == resume_after:
                state = cggm.state_dict()
                cggm.remove()
                cggm = modulator(model)
                cggm.load_state_dict(state)
        return history, cggm.state_dict()["classifiers"], model.state_dict()

    expected = run(None)
    for got in (run("skip"), run("zeros"), run("zeros", resume_after=0)):
        assert got[0] == expected[0]
        for first, second in zip(got[1:], expected[1:], strict=True):
            for k, v in first.items():
                torch.testing.assert_close(v, second[k], msg=k)


def test_an_encoder_skipped_where_it_cannot_count_as_absent_is_a_clear_error():
    full = vector_batch(3)
    lacking = ModalityBatch({m: full[m] for m in ("m1", "m2")}, target=full.target)

    def modulated(**options):
        model = PresentOnlyFusion(full, lacking="skip")
        return model, CGGM(model, task="classification", num_outputs=3, **options)

    model, cggm = modulated()
    with pytest.warns(UserWarning, match=r"\['m0'\] are not modalities of the ModalityBatch"):
        F.cross_entropy(model(lacking), lacking.target).backward()
    with pytest.raises(
        RuntimeError, match=r"\['m0'\] did not run in the forward pass of the first"
    ):
        cggm.step(lacking.target)
    model, cggm = modulated(mode="reference", lam=0.0)
    for batch in (full, lacking):
        model.zero_grad()
        F.cross_entropy(model(batch), batch.target).backward()
        if batch is full:
            cggm.step(batch.target)
    with pytest.raises(RuntimeError, match=r"\['m0'\] did not run .* reference mode"):
        cggm.step(lacking.target)


class ImageAndVector(nn.Module):
    """A CNN encoder and an MLP encoder. ``pool_in_encoder``: the CNN's encoder module ends in
    its global average pool (vector features); else it outputs maps and the model pools."""

    def __init__(self, pool_in_encoder, out_dim):
        super().__init__()
        torch.manual_seed(0)
        conv = nn.Conv2d(1, 8, 3, padding=1)
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.encoders = nn.ModuleDict(
            {"img": nn.Sequential(conv, pool) if pool_in_encoder else conv, "vec": nn.Linear(5, 8)}
        )
        self.pool = nn.Identity() if pool_in_encoder else pool
        self.head = nn.Linear(16, out_dim)

    def forward(self, batch):
        img = self.pool(self.encoders["img"](batch["img"]))
        return self.head(torch.cat([img, self.encoders["vec"](batch["vec"])], dim=-1))


@pytest.mark.parametrize(
    ("task", "path"), [(t, p) for t in ("classification", "regression") for p in PATHS]
)
def test_feature_maps_of_a_per_sample_task_are_pooled_for_the_classifiers(task, path):
    """Classification and regression: an encoder that outputs feature maps gets a default
    classifier on their global average (one prediction per sample), so CGGM trains as it does
    when the encoder pools them itself: same B, classifiers and weights."""
    g = torch.Generator().manual_seed(3)
    batch = ModalityBatch(
        {"img": torch.randn(12, 1, 6, 6, generator=g), "vec": torch.randn(12, 5, generator=g)},
        target=torch.randint(0, 3, (12,), generator=g),
    )
    out_dim, loss_fn = 3, F.cross_entropy
    if task == "regression":
        batch = batch.replace(target=torch.randn(12, generator=g))
        out_dim, loss_fn = 1, lambda out, y: F.l1_loss(out.squeeze(-1), y)

    def run(pool_in_encoder):
        model = ImageAndVector(pool_in_encoder, out_dim)
        cggm = CGGM(model, task=task, num_outputs=out_dim, rho=1.3, lam=0.2)
        PATHS[path](cggm)
        history = _modulated_sgd(model, cggm, batch, loss_fn, lr=0.1)
        return history, cggm.state_dict(), model.state_dict()

    (h1, s1, m1), (h2, s2, m2) = run(False), run(True)
    assert h1 == h2
    assert s1["feature_shapes"] == s2["feature_shapes"] == {"img": (8,), "vec": (8,)}
    torch.testing.assert_close(s1["classifiers"], s2["classifiers"])
    for (name, a), b in zip(m1.items(), m2.values(), strict=True):  # the names differ
        torch.testing.assert_close(a, b, msg=name)


class FlattensOneMap(nn.Module):
    """Segmentation whose ``t2`` encoder flattens its map to ``[B, C, H·W]``."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Conv2d(1, 8, 1) for m in ("flair", "t1")})
        self.encoders["t2"] = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Flatten(2))
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, batch):
        maps = [self.encoders[m](batch[m]) for m in ("flair", "t1")]
        return self.head(sum(maps) + self.encoders["t2"](batch["t2"]).view_as(maps[0]))


def test_segmentation_needs_feature_maps_from_every_encoder():
    batch = _segmentation_batch()
    model = FlattensOneMap()
    cggm = CGGM(model, task="segmentation", num_outputs=3)
    F.cross_entropy(model(batch), batch.target).backward()
    with pytest.raises(ValueError, match=r"the features of \{'t2': \(2, 8, 64\)\} are not maps"):
        cggm.step(batch.target)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("bad", [5, -100])
def test_out_of_range_class_targets_are_a_clear_error(task, bad):
    """Both classifier paths (the hand-written backward for vectors, autograd for per-pixel
    classifiers) refuse labels outside the classes, ignore labels included where no
    ignore_index is set."""
    if task == "classification":
        batch = vector_batch(2)
        model = make_model(batch)
    else:
        batch, model = _segmentation_batch(), SegModel()
    cggm = CGGM(model, task=task, num_outputs=3)
    F.cross_entropy(model(batch), batch.target).backward()
    target = batch.target.clone()
    target.view(-1)[1] = bad
    low, high = min(bad, 0), max(bad, 2)
    with pytest.raises(ValueError, match=rf"must lie in \[0, 3\); got values from {low} to {high}"):
        cggm.step(target)


@pytest.mark.parametrize("mistake", ["no backward", "bad targets"])
def test_a_refused_step_can_be_retried_once_the_mistake_is_fixed(mistake):
    """A step refused for a user's mistake keeps the forward's features: fixing the mistake
    and calling step again gives exactly the step a correct first call gives."""
    batch = vector_batch()
    results = []
    for retry in (False, True):
        model = make_model(batch)
        cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.0)
        loss = F.cross_entropy(model(batch), batch.target)
        if retry and mistake == "no backward":
            with pytest.raises(RuntimeError, match=r"call loss\.backward"):
                cggm.step(batch.target)
        loss.backward()
        if retry and mistake == "bad targets":
            with pytest.raises(ValueError, match="must lie in"):
                cggm.step(batch.target + 3)
        b = cggm.step(batch.target)
        results.append((b, grads(model), cggm.classifiers.state_dict()))
    (b0, g0, c0), (b1, g1, c1) = results
    assert b0 == b1
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0)
    for name in c0:
        torch.testing.assert_close(c1[name], c0[name], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="call the model's forward"):
        cggm.step(batch.target)  # a completed step used the features


class RecurrentModel(nn.Module):
    """Not the mmcore contract: a GRU audio encoder (returns ``(outputs, h_n)``), own names."""

    def __init__(self):
        super().__init__()
        self.text_net = nn.Linear(6, 8)
        self.audio_gru = nn.GRU(3, 5, batch_first=True)
        self.classifier = nn.Linear(13, 3)

    def forward(self, batch):
        text = self.text_net(batch["text"])  # [B, 8]
        _, h_n = self.audio_gru(batch["audio"])  # [1, B, 5]
        return self.classifier(torch.cat([text, h_n[-1]], dim=-1))


def _last_state_of_recurrent_encoders(modality, output):
    return output[1][-1] if isinstance(output, tuple) else output


def test_feature_fn_chooses_what_the_classifiers_see():
    g = torch.Generator().manual_seed(0)
    batch = ModalityBatch(
        {"text": torch.randn(8, 6, generator=g), "audio": torch.randn(8, 4, 3, generator=g)},
        target=torch.randint(0, 3, (8,), generator=g),
    )
    paths = {"text": "text_net", "audio": "audio_gru"}
    runs = {}
    for name, fn in (("default", None), ("last state", _last_state_of_recurrent_encoders)):
        torch.manual_seed(0)
        model = RecurrentModel()
        cggm = CGGM(
            model,
            encoder_modules=paths,
            head_module="classifier",
            num_outputs=3,
            lam=0.0,
            classifier_hidden=4,
            feature_fn=fn,
        )
        F.cross_entropy(model(batch), batch.target).backward()
        cggm.step(batch.target)
        runs[name] = {m: cggm.classifier(m) for m in paths}
        assert cggm._captured == {}  # nothing held between steps
    # both see 5 audio features (mean over the GRU's outputs, or its last state)...
    assert runs["last state"]["audio"].feature_shape == (5,)
    # ...but not the same ones: the same initial classifier moved differently
    assert not torch.allclose(
        runs["default"]["audio"].net[0].weight, runs["last state"]["audio"].net[0].weight
    )
    torch.testing.assert_close(
        runs["default"]["text"].net[0].weight, runs["last state"]["text"].net[0].weight
    )
    model = RecurrentModel()
    CGGM(
        model,
        encoder_modules=paths,
        head_module="classifier",
        num_outputs=3,
        lam=0.0,
        feature_fn=lambda m, out: out if m == "text" else None,
    )
    with pytest.raises(TypeError, match="feature_fn returned a NoneType for modality 'audio'"):
        model(batch)
    with pytest.raises(TypeError, match="feature_fn must be callable"):
        CGGM(model, encoder_modules=paths, head_module="classifier", feature_fn="h_n")


def test_encoder_names_unlike_the_batch_warn_once():
    """Padding and presence masks are read from the batch by modality name: a modality the
    model's batch does not hold would never get them, so the first forward pass warns."""
    g = torch.Generator().manual_seed(0)
    batch = ModalityBatch(
        {"txt": torch.randn(8, 6, generator=g), "audio": torch.randn(8, 4, 3, generator=g)},
        target=torch.randint(0, 3, (8,), generator=g),
    )

    class Renamed(RecurrentModel):
        def forward(self, batch):
            return super().forward(
                batch.replace(inputs={"text": batch["txt"], "audio": batch["audio"]})
            )

    model = Renamed()
    paths = {"text": "text_net", "audio": "audio_gru"}
    cggm = CGGM(model, encoder_modules=paths, head_module="classifier", num_outputs=3, lam=0.0)
    with pytest.warns(UserWarning, match=r"modalities \['text'\] are not modalities of") as w:
        F.cross_entropy(model(batch), batch.target).backward()
    assert w[0].filename == __file__  # the user's line, not torch's or the library's
    cggm.step(batch.target)
    F.cross_entropy(model(batch), batch.target).backward()  # once: no second warning
    cggm.step(batch.target)


@pytest.mark.parametrize("order", ["modulate, then compile", "compile, then modulate"])
def test_a_compiled_model_is_modulated_as_the_eager_one(order):
    """Dynamo traces CGGM's hooks (``aot_eager``: graph capture, no C++ compiler needed), with
    the modulator built on the model or on its compiled wrapper."""

    def run(compiled):
        batch = vector_batch(3)
        model = make_model(batch)
        forward = model
        if compiled and order.startswith("compile"):
            forward = torch.compile(model, backend="aot_eager")
        cggm = CGGM(forward, num_outputs=3, rho=1.3, lam=0.2)
        if compiled and order.startswith("modulate"):
            forward = torch.compile(model, backend="aot_eager")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        history = []
        for seed in range(3):
            batch = vector_batch(3, seed=seed)
            opt.zero_grad()
            loss = F.cross_entropy(forward(batch), batch.target) + cggm.direction_loss()
            loss.backward()
            history.append(cggm.step(batch.target))
            opt.step()
        return history, model.state_dict()

    (eager, eager_state), (compiled, compiled_state) = run(False), run(True)
    for a, b in zip(eager, compiled, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    for k, v in eager_state.items():
        torch.testing.assert_close(compiled_state[k], v, msg=k)


def test_a_compiled_model_traced_before_the_modulator_is_a_clear_error():
    """Dynamo does not re-trace for hooks added after a compiled model's first call: the
    encoders' hooks never fire, which ``step`` says, with the way out."""
    # other tests' compiled models may have used up dynamo's recompile budget for this forward,
    # after which it runs eagerly (hooks included) and there is nothing to detect
    torch._dynamo.reset()
    batch = vector_batch(3)
    model = make_model(batch)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(batch)  # traced before CGGM exists
    cggm = CGGM(compiled, num_outputs=3, lam=0.0)
    F.cross_entropy(compiled(batch), batch.target).backward()
    with pytest.raises(RuntimeError, match=r"torch.compile'd and was traced before CGGM"):
        cggm.step(batch.target)
    torch._dynamo.reset()  # the way out the error gives
    model.zero_grad()
    F.cross_entropy(compiled(batch), batch.target).backward()
    assert set(cggm.step(batch.target)) == set(batch.modalities)


def test_remove_takes_the_hooks_off_and_step_says_so():
    batch = vector_batch(3)
    model = make_model(batch)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    cggm = CGGM(model, num_outputs=3, lam=0.0)
    assert any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    cggm.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    F.cross_entropy(model(batch), batch.target).backward()
    with pytest.raises(RuntimeError, match=r"remove\(\) took this modulator's hooks off"):
        cggm.step(batch.target)


def _bert_history(folder, pad_id):
    """B over three modulated steps of a late-fusion model whose text encoder is a tiny random
    ``BertModel`` (saved and loaded from ``folder``), its padded token ids set to ``pad_id``;
    and the text classifier's weights after."""
    from tests.wander.conftest import bert_text_model

    torch.manual_seed(0)
    model, batch = bert_text_model(folder)
    ids = batch["text"].masked_fill(batch.padding_mask("text"), pad_id)
    batch = batch.replace(inputs={**batch.inputs, "text": ids})
    cggm = CGGM(
        model.train(), task="regression", num_outputs=1, lam=0.1, regression_score="neg_mae"
    )
    history = []
    for _ in range(3):
        model.zero_grad()
        (F.l1_loss(model(batch).squeeze(-1), batch.target) + cggm.direction_loss()).backward()
        history.append(cggm.step(batch.target))
    return history, cggm.classifier("text").state_dict()


def test_a_transformers_text_encoder_with_padded_token_ids(tmp_path):
    """A ``BertModel`` encoder returns a ``ModelOutput``: its classifier sees the
    ``last_hidden_state`` pooled over the real tokens, so what the padded positions hold changes
    nothing (the same B and classifier weights)."""
    history, weights = _bert_history(tmp_path, pad_id=0)
    other, other_weights = _bert_history(tmp_path, pad_id=17)
    assert history == other and len(set(history[-1].values())) == 2  # the two modalities differ
    for k, v in weights.items():
        torch.testing.assert_close(other_weights[k], v)


def test_step_takes_the_batch_itself_or_a_clear_error_for_other_targets():
    """``step(batch)`` uses the batch's targets (it failed with "'ModalityBatch' object has no
    attribute 'ndim'"); a list or an array is a TypeError that says what to pass."""
    batch = vector_batch()
    results = []
    for target in (batch.target, batch):
        model = make_model(batch)
        cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.0)
        F.cross_entropy(model(batch), batch.target).backward()
        if target is batch:
            with pytest.raises(TypeError, match=r"as a tensor \(or the ModalityBatch\), got list"):
                cggm.step(batch.target.tolist())
        results.append((cggm.step(target), grads(model)))
    assert results[1][0] == results[0][0]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no target"):
        cggm.step(batch.replace(target=None))


def test_padding_masks_of_a_model_called_with_tokenizer_inputs(tmp_path):
    """A model that takes no ``ModalityBatch`` (``model(input_ids, attention_mask, ...)``): the
    classifiers pool over the real steps the encoders' own masks (BERT's ``attention_mask``, a
    ``TransformerEncoder``'s ``src_key_padding_mask``) name. They pooled padded steps before,
    so what those held changed the classifiers' losses and updates."""
    from tests.helpers import TokenizerInputModel, tokenizer_inputs

    target = torch.tensor([0, 1, 2, 1])
    runs = []
    for pad_id in (0, 17):
        model = TokenizerInputModel(tmp_path / str(pad_id), out_dim=3)
        cggm = CGGM(
            model,
            task="classification",
            num_outputs=3,
            encoder_modules={"text": "text", "audio": "audio"},
            head_module="classifier",
        )
        x = tokenizer_inputs(pad_id=pad_id)
        F.cross_entropy(model(*x), target).backward()
        cggm.step(target)
        runs.append({k: v.clone() for k, v in cggm.classifiers.state_dict().items()})
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=0, atol=1e-6)


def test_an_attention_mask_that_is_no_padding_mask_is_left_alone():
    """An encoder called with a causal ``[T, T]`` ``attention_mask``: the classifiers pool
    every step, and no warning says a padding mask could not be applied (it did)."""
    from tests.helpers import CausalMaskModel

    g = torch.Generator().manual_seed(0)
    batch = ModalityBatch(
        {"a": torch.randn(4, 6, 3, generator=g), "b": torch.randn(4, 5, 2, generator=g)},
        torch.tensor([0, 1, 2, 1]),
    )
    torch.manual_seed(0)
    model = CausalMaskModel({"a": 3, "b": 2}, out_dim=3)
    cggm = CGGM(model, task="classification", num_outputs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(model(batch), batch.target).backward()
        cggm.step(batch.target)


def test_encoders_run_without_gradients_are_named_in_the_error():
    """Encoders the model runs under no_grad get no gradient: the error says so, not 'backward'."""
    batch = vector_batch(3)
    model = make_model(batch)
    cggm = CGGM(model, num_outputs=3)
    encode = model.encode

    def encode_without_gradients(b):  # a model that "freezes" its encoders this way
        with torch.no_grad():
            return encode(b)

    model.encode = encode_without_gradients
    F.cross_entropy(model(batch), batch.target).backward()
    with pytest.raises(RuntimeError, match=r"\['m0', 'm1', 'm2'\] ran under torch.no_grad\(\)"):
        cggm.step(batch.target)
    model.encode = encode  # fixed: the same step now runs
    model.zero_grad()
    F.cross_entropy(model(batch), batch.target).backward()
    assert set(cggm.step(batch.target)) == set(batch.modalities)


@pytest.mark.parametrize("no_autograd", [torch.no_grad, torch.inference_mode])
def test_an_evaluation_pass_between_backward_and_step_changes_nothing(no_autograd):
    """A validation forward under no_grad between ``backward()`` and ``step()`` (same batch
    size, so no check on the target can tell) must not replace the training pass's features:
    the run equals one without it, coefficients, classifiers and weights alike."""
    batch, other = vector_batch(3, seed=0), vector_batch(3, seed=1)
    runs = []
    for validate in (False, True):
        model = make_model(batch)
        cggm = CGGM(model, num_outputs=3, rho=1.0, lam=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        coefficients = []
        for _ in range(3):
            opt.zero_grad()
            (F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()).backward()
            if validate:
                with no_autograd():
                    model(other)
            coefficients.append(cggm.step(batch.target))
            opt.step()
        runs.append((coefficients, model.state_dict(), cggm.state_dict()["classifiers"]))
    assert runs[0][0] == runs[1][0]
    for a, b in ((runs[0][1], runs[1][1]), (runs[0][2], runs[1][2])):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # an evaluation pass alone is no training forward: the error says why nothing was seen
    model = make_model(batch)
    cggm = CGGM(model, num_outputs=3)
    with torch.no_grad():
        model(batch)
    with pytest.raises(RuntimeError, match="evaluation pass, which CGGM does not capture"):
        cggm.step(batch.target)


def test_one_logit_binary_models():
    """``num_outputs=1``: a binary model with one logit (BCE). Each classifier scores the
    accuracy of ``logit > 0``, the encoders' gradients are scaled by exactly ``ρ B_m``, and
    targets other than 0 and 1 are a clear error."""
    batch = vector_batch(3, classes=2)
    model = make_model(batch, out_dim=1)
    cggm = CGGM(model, task="classification", num_outputs=1, rho=1.3, lam=0.1)
    _steps_checking_scores_and_scaling(
        model,
        cggm,
        batch,
        _binary_loss,
        lambda logits: ((logits[:, 0] > 0).long() == batch.target).float().mean(),
        target=batch.target.bool(),  # bool targets read as 0 / 1
    )
    assert cggm.classifier("m0").net[2].out_features == 1
    onehot = F.one_hot(batch.target, 2).float()  # two classes one-hot, as pipelines give them
    model.zero_grad()
    _binary_loss(model(batch), batch.target).backward()
    assert set(cggm.step(onehot)) == set(batch.modalities)
    assert torch.isfinite(cggm.direction_loss())
    model(batch)
    with pytest.raises(ValueError, match=r"num_outputs=1 is a binary model.*from 0 to 2"):
        cggm.step(batch.target * 2)


def test_multilabel_models():
    """``task="multilabel"``: K independent yes/no labels per sample (MOSEI's emotions, say),
    one logit each, BCE. Each classifier scores label accuracy (the share of a sample's labels
    whose logit sign is right), the encoders' gradients are scaled by exactly ``ρ B_m``, and
    targets that are no 0/1 labels of the right count are a clear error."""
    batch = _multilabel_batch(3, labels=4)
    model = make_model(batch, out_dim=4)
    cggm = CGGM(model, task="multilabel", num_outputs=4, rho=1.3, lam=0.1)
    _steps_checking_scores_and_scaling(
        model,
        cggm,
        batch,
        F.binary_cross_entropy_with_logits,
        lambda logits: ((logits > 0) == batch.target.bool()).float().mean(),
        target=batch.target.bool(),  # a boolean mask reads as 0 / 1
    )
    assert cggm.classifier("m0").net[2].out_features == 4
    for bad, match in [
        (batch.target * 2, r"each label as 0 or 1.*from 0.0 to 2.0"),
        (batch.target[:, :3], r"num_outputs=4 needs 4 label\(s\) per sample.*\(16, 3\)"),
    ]:
        model(batch)
        with pytest.raises(ValueError, match=match):
            cggm.step(bad)


class _DictEncoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.Linear(d, 6)

    def forward(self, x):
        return {"features": self.net(x)}


class _DictEncoderModel(nn.Module):
    """Encoders that return a dict: no shape convention says where their features are."""

    def __init__(self, batch):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {m: _DictEncoder(batch[m].shape[-1]) for m in batch.modalities}
        )
        self.fusion = nn.Identity()
        self.head = nn.Linear(6 * len(batch.modalities), 3)

    def forward(self, batch):
        feats = [self.encoders[m](batch[m])["features"] for m in self.encoders]
        return self.head(self.fusion(torch.cat(feats, dim=-1)))


def _features_of_dict(modality, output):
    return output["features"]


def test_an_encoder_output_without_features_names_the_modality_and_feature_fn():
    batch = vector_batch(2)
    torch.manual_seed(0)
    model = _DictEncoderModel(batch)
    cggm = CGGM(model, num_outputs=3)
    with pytest.raises(TypeError, match=r"modality 'm0': cannot find features .* feature_fn="):
        model(batch)
    cggm.remove()
    cggm = CGGM(model, num_outputs=3, feature_fn=_features_of_dict)
    F.cross_entropy(model(batch), batch.target).backward()
    assert set(cggm.step(batch.target)) == {"m0", "m1"}


def test_regression_with_several_outputs():
    """``num_outputs=2`` (valence and arousal): each classifier's score is its sign accuracy on
    each output, averaged; the encoders' gradients are scaled by exactly ``ρ B_m``; targets
    that are not two values per sample are a clear error."""
    batch = _padded_regression_batch(outputs=2)
    torch.manual_seed(0)
    # no dropout: the expected scores come from a second pass, which must see what the first saw
    model = LateFusionModel.from_batch(batch, 2, width=4, num_heads=2, head="linear", dropout=0.0)
    cggm = CGGM(model, task="regression", num_outputs=2, rho=1.3, lam=0.1)
    _steps_checking_scores_and_scaling(
        model,
        cggm,
        batch,
        F.l1_loss,
        lambda outputs: ((outputs > 0) == (batch.target > 0)).float().mean(),
    )
    model(batch)
    with pytest.raises(ValueError, match=r"num_outputs=2 needs 2 target value\(s\) per sample"):
        cggm.step(batch.target[:, 0])


def _steps_checking_scores_and_scaling(model, cggm, batch, loss_fn, score, target=None):
    """Three modulated SGD steps. From the second on (the classifiers exist), CGGM's scores
    must be ``score(outputs)`` of each classifier before its update, and every encoder
    gradient must be scaled by exactly ``ρ B_m``. The expected scores come from a second pass
    under ``no_grad``, which CGGM does not capture: ``model`` must have no dropout."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        (loss_fn(model(batch), batch.target) + cggm.direction_loss()).backward()
        expected = None
        if step:
            with torch.no_grad():
                feats = model.encode(batch)
                expected = torch.stack(
                    [
                        score(cggm.classifier(m)(feats[m], batch.padding_mask(m)))
                        for m in batch.modalities
                    ]
                )
        before = grads(model)
        b = cggm.step(batch.target if target is None else target)
        if expected is not None:
            torch.testing.assert_close(cggm.last_scores, expected)
        for name, g in grads(model).items():
            if name.startswith("encoders."):
                torch.testing.assert_close(
                    g, cggm.config.rho * b[name.split(".")[1]] * before[name]
                )
        opt.step()
    assert torch.isfinite(cggm.direction_loss())


def test_data_parallel_over_several_devices_is_refused():
    """Each replica's hooks would report a slice of the batch: a clear error, not a silent
    modulation on one slice. On one device (or the CPU) DataParallel calls the model itself."""
    batch = vector_batch(2)
    model = make_model(batch)
    single = nn.DataParallel(model)  # no GPU here: it calls the module it holds
    cggm = CGGM(single, num_outputs=3)
    F.cross_entropy(single(batch), batch.target).backward()
    assert set(cggm.step(batch.target)) == {"m0", "m1"}
    cggm.remove()
    several = nn.DataParallel(model)
    several.device_ids = [0, 1]  # as on a machine with two GPUs
    with pytest.raises(TypeError, match=r"DataParallel over 2 devices .* DistributedDataParallel"):
        CGGM(several, num_outputs=3)


class _PoolingFusion(nn.Module):
    """Linear encoders on sequences, pooled over their real steps in ``logits``: the encoders
    never see a padding mask, so only the batch can tell CGGM which steps are padding."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"text": nn.Linear(4, 4), "audio": nn.Linear(3, 4)})
        self.head = nn.Linear(8, 1)

    def logits(self, batch):
        feats = [
            masked_mean(self.encoders[m](batch[m]), batch.padding_mask(m))
            for m in ("text", "audio")
        ]
        return self.head(torch.cat(feats, dim=-1))

    def forward(self, batch):
        return self.logits(batch)


def _pooling_run(batch, call, between=lambda model: None, steps=3):
    torch.manual_seed(0)
    model = _PoolingFusion()
    cggm = CGGM(model, task="regression", num_outputs=1, rho=1.0, lam=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    coefficients = []
    for _ in range(steps):
        opt.zero_grad()
        pred = call(model, batch).squeeze(-1)
        (F.l1_loss(pred, batch.target) + cggm.direction_loss()).backward()
        between(model)
        coefficients.append(cggm.step(batch))
        opt.step()
        between(model)
    return coefficients, model.state_dict(), cggm.state_dict()["classifiers"]


def _assert_bitwise_equal_runs(a, b):
    assert a[0] == b[0]
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_training_through_another_method_reads_the_masks_of_the_batch_given_to_step():
    """A model trained through a method other than ``forward`` (``model.logits(batch)``) fires
    no pre-hook, so CGGM sees no batch there; ``step(batch)`` supplies its presence and padding
    masks, and the run equals one through ``forward``."""
    batch = _padded_regression_batch().with_missing("audio", torch.arange(8) >= 5)
    through_forward = _pooling_run(batch, lambda model, b: model(b))
    through_method = _pooling_run(batch, lambda model, b: model.logits(b))
    _assert_bitwise_equal_runs(through_forward, through_method)
    # the masks matter here: the same run without them differs
    unmasked = _pooling_run(
        batch.replace(presence={}, padding_masks={}), lambda model, b: model.logits(b)
    )
    assert unmasked[0] != through_method[0]


def test_evaluation_passes_leave_training_through_another_method_unchanged():
    """Validation calls under ``no_grad`` (through ``forward`` or the method) between
    ``backward()`` and ``step()`` and between steps change nothing in a run trained through
    ``model.logits``: a ``forward`` call's evaluation mode does not outlive it, and outside a
    model call a pass without autograd does not replace the training pass's features."""
    batch = _padded_regression_batch()
    other = _padded_regression_batch().replace(
        inputs={m: torch.randn_like(batch[m]) for m in batch.modalities}
    )

    def validate(model):
        with torch.no_grad():
            model(other)
            model.logits(other)

    plain = _pooling_run(batch, lambda model, b: model.logits(b))
    validated = _pooling_run(batch, lambda model, b: model.logits(b), between=validate)
    _assert_bitwise_equal_runs(plain, validated)


def _gradient_direction_step(direction, lam, batch, model, classifiers=None):
    """One modulated step, then the next step's loss with its direction term, backward."""
    cggm = CGGM(
        model,
        task="classification",
        num_outputs=3,
        rho=None,
        lam=lam,
        direction=direction,
        classifiers=classifiers,
    )
    loss = F.cross_entropy(model(batch), batch.target)
    (loss + cggm.direction_loss(loss)).backward()
    cggm.step(batch)
    model.zero_grad()
    loss = F.cross_entropy(model(batch), batch.target)
    term = cggm.direction_loss(loss)
    (loss + term).backward()
    return cggm, loss, term, grads(model)


@pytest.mark.parametrize("stacked", [True, False])
def test_gradient_directions_compare_the_heads_loss_gradient_with_the_classifiers(stacked):
    batch = vector_batch(3)
    model = make_model(batch)
    own = None if stacked else {m: ModalityClassifier((6,), 18, 3) for m in batch.modalities}
    cggm, _, term, _ = _gradient_direction_step("gradients", 0.5, batch, model, own)
    # by hand: g_Ω = ∂L/∂W^Ω now; g_m = each classifier's final-weight gradient of the last step
    (g_head,) = torch.autograd.grad(F.cross_entropy(model(batch), batch.target), model.head.weight)
    if stacked:
        g_cls = cggm.classifiers.weight2.grad.flatten(1)  # [M, C · F]
    else:
        g_cls = torch.stack([own[m].layers()[-1].weight.grad.reshape(-1) for m in own])
    b = cggm.coefficients
    cos = F.cosine_similarity(g_cls, g_head.reshape(1, -1), dim=1)
    torch.testing.assert_close(term.detach(), 0.5 * (b.abs().sum() - (b * cos).sum()) / 3)


def test_gradient_directions_reach_the_encoders_where_the_weights_proxy_does_not():
    batch = vector_batch(3)
    runs = {
        (direction, lam): _gradient_direction_step(direction, lam, batch, make_model(batch))[3]
        for direction in ("weights", "gradients")
        for lam in (0.0, 0.5)
    }
    for direction in ("weights", "gradients"):
        with_term, without = runs[(direction, 0.5)], runs[(direction, 0.0)]
        moved = {
            name
            for name in without
            if not torch.allclose(with_term[name], without[name], rtol=0, atol=1e-7)
        }
        if direction == "weights":  # a function of the head's weight alone
            assert moved == {"head.weight"}
        else:  # through the head's gradient, which depends on the features
            assert "head.weight" in moved
            assert any(name.startswith("encoders.") for name in moved), moved


def test_gradient_directions_refuse_a_frozen_head_or_a_loss_that_skips_it():
    """``direction="gradients"`` differentiates the task loss w.r.t. the head's final weight:
    a frozen head, or a loss that never reaches it, is a clear error, not a zero direction."""
    batch = vector_batch(2)
    for frozen_head in (True, False):
        model = make_model(batch)
        model.head.weight.requires_grad_(not frozen_head)
        cggm = CGGM(model, num_outputs=3, direction="gradients", lam=0.5)
        loss = F.cross_entropy(model(batch), batch.target)
        (loss + cggm.direction_loss(loss)).backward()  # the first step has no direction yet
        cggm.step(batch)
        model.zero_grad()
        if frozen_head:
            loss, match = F.cross_entropy(model(batch), batch.target), "does not require gradients"
        else:
            model(batch)
            loss = sum(p.sum() for p in model.encoders.parameters())
            match = "does not depend on the head's final weight"
        with pytest.raises(RuntimeError, match=match):
            cggm.direction_loss(loss)


def test_gradient_directions_need_the_task_loss_and_resume_exactly():
    batches = [vector_batch(3, seed=s) for s in range(4)]
    model = make_model(batches[0])
    cggm = CGGM(model, task="classification", num_outputs=3, direction="gradients", lam=0.5)
    with pytest.raises(ValueError, match=r"pass it, loss = task_loss \+ cggm.direction_loss"):
        cggm.direction_loss()
    with pytest.raises(ValueError, match="direction='gradients' is a default-mode option"):
        CGGMConfig(mode="reference", direction="gradients")
    with pytest.raises(ValueError, match="direction must be one of"):
        CGGMConfig(direction="gradient")
    with pytest.raises(ValueError, match=r"a double backward.*torch.compile does not support"):
        CGGM(torch.compile(make_model(batches[0])), num_outputs=3, direction="gradients")

    def run(modulator, net, data):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        out = []
        for batch in data:
            opt.zero_grad()
            loss = F.cross_entropy(net(batch), batch.target)
            (loss + modulator.direction_loss(loss)).backward()
            out.append(modulator.step(batch))
            opt.step()
        return out, [p.detach().clone() for p in net.parameters()]

    run(cggm, model, batches[:2])
    # evaluation: no gradient, no term (and no error)
    with torch.no_grad():
        assert cggm.direction_loss(F.cross_entropy(model(batches[0]), batches[0].target)) == 0
    state, weights = copy.deepcopy(cggm.state_dict()), copy.deepcopy(model.state_dict())
    assert state["classifier_head_grads"] is not None
    expected = run(cggm, model, batches[2:])
    model2 = make_model(batches[0])
    model2.load_state_dict(weights)
    resumed = CGGM(model2, task="classification", num_outputs=3, direction="gradients", lam=0.5)
    resumed.load_state_dict(state)
    got = run(resumed, model2, batches[2:])
    assert got[0] == expected[0]
    for a, b in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_direction_term_left_out_of_the_loss_warns_once():
    """With λ > 0, a step reached without ``direction_loss()`` since the last one warns, once;
    the first step (where the term is 0) and λ = 0 do not."""
    batch = vector_batch()

    def steps(lam, add_term, n=3):
        model = make_model(batch)
        cggm = CGGM(model, task="classification", num_outputs=3, lam=lam)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                model.zero_grad()
                loss = F.cross_entropy(model(batch), batch.target)
                (loss + cggm.direction_loss() if add_term else loss).backward()
                cggm.step(batch.target)
        return [str(w.message) for w in caught]

    left_out = steps(0.2, add_term=False)
    assert (
        len(left_out) == 1
        and "direction_loss() was not called since the last step" in (left_out[0])
    )
    assert steps(0.2, add_term=False, n=1) == []
    assert steps(0.2, add_term=True) == []
    assert steps(0.0, add_term=False) == []
