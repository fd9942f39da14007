"""``ignore_index``: samples, pixels and labels without one neither train nor score a classifier."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cggm import CGGM, CGGMConfig
from cggm.functional import batch_score_counts
from mmcore import ModalityBatch
from tests.cggm.test_modulator import (
    PATHS,
    SegModel,
    _assert_same_runs,
    _missing_first,
    _modulated_sgd,
    _multilabel_batch,
    _per_modality_loop,
    _segmentation_batch,
    make_model,
    vector_batch,
)

IGNORE = -100


def _masked_binary_loss(pred, target):
    """BCE over the labelled entries of a one-logit model (``target == IGNORE`` dropped)."""
    keep = target != IGNORE
    return F.binary_cross_entropy_with_logits(pred[:, 0][keep], target[keep].float())


def _classification_run(batch, binary, configure, steps=3):
    """Modulated steps on ``batch`` with the model held still (lr 0): ``(cggm, B history,
    classifiers' state per modality, model state)``, as ``_train_three_steps`` returns."""
    out = 1 if binary else 3
    model = make_model(batch, out)
    cggm = CGGM(
        model, task="classification", num_outputs=out, rho=1.3, lam=0.1, ignore_index=IGNORE
    )
    configure(cggm)
    loss_fn = _masked_binary_loss if binary else F.cross_entropy  # ignore_index=-100
    return _run(cggm, _modulated_sgd(model, cggm, batch, loss_fn, lr=0.0, steps=steps), model)


def _run(cggm, history, model):
    """``(cggm, B history, classifiers' state per modality, model state)``."""
    per_modality = {
        f"{m}.{k}": v for m in cggm.modalities for k, v in cggm.classifier(m).state_dict().items()
    }
    return cggm, history, per_modality, model.state_dict()


@pytest.mark.parametrize("missing", [False, True], ids=["complete", "a modality missing"])
@pytest.mark.parametrize("binary", [False, True], ids=["classes", "binary"])
@pytest.mark.parametrize("path", list(PATHS))
def test_ignored_samples_train_and_score_as_if_they_were_not_in_the_batch(path, binary, missing):
    """Samples labelled ``ignore_index`` change nothing: the classifiers train, score and set
    B exactly as on the batch without them (every classifier path, with presence masks)."""
    batch = vector_batch(4, classes=2 if binary else 3)
    if missing:
        batch = _missing_first(batch)
    ignored = torch.zeros(batch.batch_size, dtype=torch.bool)
    ignored[[1, 4, 5, 11]] = True
    with_ignored = batch.replace(target=batch.target.masked_fill(ignored, IGNORE))
    configure = PATHS[path]
    run = _classification_run(with_ignored, binary, configure)
    _assert_same_runs(run, _classification_run(batch.select(~ignored), binary, configure))
    if path == "by hand":
        assert run[0]._stacked and run[0].hand_backward  # the path under test ran


def _seg_reference(classifier, feats, target, labelled, classes):
    """Loss and per-sample mean foreground Dice of one classifier, by hand."""
    logits = classifier(feats)
    loss = F.cross_entropy(logits, target.masked_fill(~labelled, IGNORE), ignore_index=IGNORE)
    pred = logits.argmax(dim=1)
    dice = []
    for b in range(target.shape[0]):
        keep = labelled[b]
        if not keep.any():
            continue
        per_class = []
        for c in range(1, classes):
            p, g = (pred[b] == c) & keep, (target[b] == c) & keep
            total = p.sum() + g.sum()
            per_class.append(1.0 if total == 0 else float(2 * (p & g).sum() / total))
        dice.append(sum(per_class) / len(per_class))
    return loss, sum(dice) / len(dice)


@pytest.mark.parametrize("missing", [False, True], ids=["complete", "flair missing once"])
def test_ignored_pixels_train_and_score_as_cross_entropys_ignore_index(missing):
    """A segmentation classifier's gradient is that of ``F.cross_entropy(...,
    ignore_index=)`` over the samples that have its modality, and its score the Dice of the
    labelled pixels; a sample with no labelled pixel is not scored."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 8, 8), generator=g)
    target[0, :3] = 255  # three rows of the first sample
    target[1] = 255  # the whole second sample: no score from it
    target[2, :, :1] = 255  # a column of the third: the loss is a mean over pixels
    batch = ModalityBatch(
        {m: torch.randn(4, 1, 8, 8, generator=g) for m in ("flair", "t1", "t2")}, target=target
    )
    present = torch.ones(4, dtype=torch.bool)
    if missing:
        present[3] = False
        batch = batch.with_missing("flair", ~present, fill=None)
    labelled = target != 255
    model = SegModel()
    cggm = CGGM(model, task="segmentation", num_outputs=3, lam=0.0, ignore_index=255)
    _per_modality_loop(cggm)
    for step in range(2):
        model.zero_grad()
        F.cross_entropy(model(batch), batch.target, ignore_index=255).backward()
        if step == 1:  # the classifiers before this step's update
            before = {m: copy.deepcopy(cggm.classifier(m)) for m in cggm.modalities}
        cggm.step(batch.target)
    for i, m in enumerate(cggm.modalities):
        keep = present if m == "flair" else torch.ones(4, dtype=torch.bool)
        feats = model.encoders[m](batch[m][keep]).detach()
        loss, dice = _seg_reference(before[m], feats, target[keep], labelled[keep], 3)
        expected = torch.autograd.grad(loss, list(before[m].parameters()))
        for got, want in zip(cggm.classifier(m).parameters(), expected, strict=True):
            torch.testing.assert_close(got.grad, want)
        assert float(cggm.last_scores[i]) == pytest.approx(dice, abs=1e-6)


@pytest.mark.parametrize("binary", [False, True], ids=["classes", "binary"])
def test_stacked_segmentation_classifiers_with_ignored_pixels_equal_the_loop(binary):
    batch = _segmentation_batch(classes=2 if binary else 3)
    target = batch.target.clone()
    target[:, 2:5, 1:6] = 255
    batch = batch.replace(target=target)
    out = 1 if binary else 3

    def run(configure):
        torch.manual_seed(0)
        model = SegModel(stride=2, classes=out)  # logits resized to the label map
        cggm = CGGM(model, task="segmentation", num_outputs=out, lam=0.1, ignore_index=255)
        configure(cggm)
        return _run(cggm, _modulated_sgd(model, cggm, batch, loss_fn, lr=0.1), model)

    def loss_fn(logits, target):
        keep = target != 255
        if binary:
            return F.binary_cross_entropy_with_logits(logits[:, 0][keep], target[keep].float())
        return F.cross_entropy(logits, target, ignore_index=255)

    stacked = run(lambda cggm: None)
    assert stacked[0]._stacked
    _assert_same_runs(stacked, run(_per_modality_loop))


def test_a_batch_without_any_label_keeps_the_scores():
    """Every sample ignored: no classifier is scored, B stays finite and the scores stay."""
    batch = vector_batch(3)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3, ignore_index=IGNORE)
    F.cross_entropy(model(batch), batch.target).backward()
    cggm.step(batch.target)
    scores = cggm.prev_scores.clone()
    model.zero_grad()
    (F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()).backward()
    b = cggm.step(torch.full_like(batch.target, IGNORE))
    assert all(0 <= v < 1 for v in b.values())
    torch.testing.assert_close(cggm.last_scores, scores)


def test_ignore_labels_without_ignore_index_name_the_option():
    batch = vector_batch(2)
    model = make_model(batch)
    cggm = CGGM(model, task="classification", num_outputs=3)
    F.cross_entropy(model(batch), batch.target).backward()
    with pytest.raises(ValueError, match=r"CGGM\(\.\.\., ignore_index=<that value>\)"):
        cggm.step(batch.target.masked_fill(torch.arange(16) < 3, IGNORE))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "regression", "num_outputs": 1, "ignore_index": -100}, "has neither"),
        ({"ignore_index": True}, "must be an integer or None"),
        ({"ignore_index": 255.0}, "must be an integer or None"),
    ],
)
def test_bad_ignore_index_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CGGMConfig(**kwargs)


def test_score_counts_of_labelled_targets_only():
    """``batch_score_counts(labelled=)``: accuracy over the labelled samples; a label map's
    unlabelled pixels count in no class's Dice."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])  # predicts 0, 1, 0
    target = torch.tensor([0, 0, 1])
    labelled = torch.tensor([True, False, True])
    total, count = batch_score_counts("classification", logits, target, labelled=labelled)
    assert (float(total), float(count)) == (1.0, 2.0)
    seg = torch.zeros(1, 2, 1, 4)
    seg[0, 1, 0, :2] = 1.0  # class 1 predicted on the first two pixels
    seg_target = torch.tensor([[[1, 0, 0, 0]]])
    seg_labelled = torch.tensor([[[True, False, True, True]]])
    total, count = batch_score_counts("segmentation", seg, seg_target, labelled=seg_labelled)
    assert (float(total), float(count)) == (1.0, 1.0)  # the wrong pixel is unlabelled
    with pytest.raises(ValueError, match="regression has none"):
        batch_score_counts("regression", logits[:, :1], target.float(), labelled=labelled)


def _partly_labelled_multilabel_batch():
    """16 samples, 3 yes/no labels each; some labels unannotated (-1), one sample none."""
    batch = _multilabel_batch(4)
    target = batch.target.clone()
    g = torch.Generator().manual_seed(2)
    target[torch.rand(target.shape, generator=g) < 0.3] = -1.0
    target[5] = -1.0
    return batch.replace(target=target)


def _masked_bce(pred, target):
    keep = target != -1
    return F.binary_cross_entropy_with_logits(pred[keep], target[keep])


def _multilabel_run(configure, batch, steps=3, lr=0.1):
    model = make_model(batch, 3)
    cggm = CGGM(model, task="multilabel", num_outputs=3, rho=1.3, lam=0.1, ignore_index=-1)
    configure(cggm)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    history, before = [], None
    for step in range(steps):
        opt.zero_grad()
        (_masked_bce(model(batch), batch.target) + cggm.direction_loss()).backward()
        if step == steps - 1:  # the classifiers before the last step's update
            before = {m: copy.deepcopy(cggm.classifier(m)) for m in cggm.modalities}
        history.append(cggm.step(batch.target))
        opt.step()
    return _run(cggm, history, model), before


def test_unannotated_labels_of_multilabel_targets_neither_train_nor_score():
    """Multilabel targets with ``ignore_index`` labels: each classifier's gradient is that of
    the BCE over the labelled labels, its score the label accuracy over them (a sample with
    none is not scored), and the three classifier paths train alike."""
    batch = _partly_labelled_multilabel_batch()
    target = batch.target
    labelled = target != -1
    run, before = _multilabel_run(_per_modality_loop, batch, lr=0.0)
    cggm = run[0]
    model = make_model(batch, 3)
    for i, m in enumerate(cggm.modalities):
        logits = before[m](model.encoders[m](batch[m]).detach())
        loss = _masked_bce(logits, target)
        expected = torch.autograd.grad(loss, list(before[m].parameters()))
        for got, want in zip(cggm.classifier(m).parameters(), expected, strict=True):
            torch.testing.assert_close(got.grad, want)
        right = ((logits > 0) == (target > 0.5)) & labelled
        keep = labelled.any(dim=1)
        accuracy = (right.sum(1) / labelled.sum(1).clamp_min(1))[keep].mean()
        assert float(cggm.last_scores[i]) == pytest.approx(float(accuracy), abs=1e-6)
    loop = _multilabel_run(_per_modality_loop, batch)[0]
    by_hand = _multilabel_run(PATHS["by hand"], batch)[0]
    assert by_hand[0]._stacked and by_hand[0].hand_backward
    _assert_same_runs(by_hand, loop)
    _assert_same_runs(_multilabel_run(PATHS["autograd"], batch)[0], loop)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_regression_targets_that_are_not_finite_are_a_clear_error(bad):
    """Without the check, NaN targets turned the neg_mae scores NaN and left B uniform."""
    batch = vector_batch(3)
    model = make_model(batch, 1)
    cggm = CGGM(model, task="regression", num_outputs=1, regression_score="neg_mae")
    target = torch.randn(16)
    F.l1_loss(model(batch).squeeze(-1), target).backward()
    target[[2, 7]] = bad
    with pytest.raises(ValueError, match="2 of the 16 regression targets are NaN or infinite"):
        cggm.step(target)


def test_multilabel_targets_holding_nan_name_ignore_index():
    batch = _multilabel_batch(3)
    model = make_model(batch, 3)
    cggm = CGGM(model, task="multilabel", num_outputs=3)
    F.binary_cross_entropy_with_logits(model(batch), batch.target).backward()
    target = batch.target.clone()
    target[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"targets hold NaN.*ignore_index=-1"):
        cggm.step(target)
