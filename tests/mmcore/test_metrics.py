"""Every metric against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from mmcore.metrics import (
    BratsDiceMetric,
    ClassificationMetric,
    IEMOCAPMetric,
    MSAMetric,
    MultiLabelMetric,
    SIMSMetric,
    brats_dice,
    brats_region_masks,
    classification_metrics,
    iemocap_metrics,
    msa_regression_metrics,
    multilabel_metrics,
    sims_regression_metrics,
)


def weighted_f1_by_hand(t, p):
    total = 0.0
    for c in sorted(set(t)):
        tp = sum(1 for a, b in zip(t, p, strict=True) if a == c and b == c)
        fp = sum(1 for a, b in zip(t, p, strict=True) if a != c and b == c)
        fn = sum(1 for a, b in zip(t, p, strict=True) if a == c and b != c)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        total += f1 * sum(1 for a in t if a == c)
    return total / len(t)


PRED = [2.6, -0.4, 0.3, -2.5, 0.0, 1.5]
TRUE = [3.0, 0.0, -0.2, -2.0, 0.4, 2.5]


def test_msa_metrics_by_hand():
    m = msa_regression_metrics(torch.tensor(PRED, dtype=torch.float64), torch.tensor(TRUE))
    assert m["mae"] == pytest.approx((0.4 + 0.4 + 0.5 + 0.5 + 0.4 + 1.0) / 6)
    p, t = np.array(PRED), np.array(TRUE)
    r = ((p - p.mean()) * (t - t.mean())).sum() / math.sqrt(
        ((p - p.mean()) ** 2).sum() * ((t - t.mean()) ** 2).sum()
    )
    assert m["corr"] == pytest.approx(r)
    # has-0: pred>=0 [T,F,T,F,T,T]; true>=0 [T,T,F,F,T,T] -> 4/6 right
    assert m["acc2_has0"] == pytest.approx(4 / 6)
    assert m["f1_has0"] == pytest.approx(
        weighted_f1_by_hand([1, 1, 0, 0, 1, 1], [1, 0, 1, 0, 1, 1])
    )
    # non-0 drops the label-0 sample (index 1): pred>0 [T,T,F,F,T]; true>0 [T,F,F,T,T] -> 3/5
    assert m["acc2_non0"] == pytest.approx(3 / 5)
    assert m["f1_non0"] == pytest.approx(weighted_f1_by_hand([1, 0, 0, 1, 1], [1, 1, 0, 0, 1]))
    # gt-0 (MulT's exclude_zero=False): pred>0 [T,F,T,F,F,T]; true>0 [T,F,F,F,T,T] -> 4/6
    assert m["acc2_gt0"] == pytest.approx(4 / 6)
    assert m["f1_gt0"] == pytest.approx(weighted_f1_by_hand([1, 0, 0, 0, 1, 1], [1, 0, 1, 0, 0, 1]))
    # acc7: round(clip(.,-3,3)): pred [3,-0,0,-2,0,2] (2.5 rounds half to even: -2.5 -> -2)
    #       true [3,0,-0,-2,0,2] (2.5 -> 2) -> all six equal
    assert m["acc7"] == pytest.approx(6 / 6)
    # acc5: clip to [-2,2] first: pred [2,-0,0,-2,0,2]; true [2,0,-0,-2,0,2] -> 6/6
    assert m["acc5"] == pytest.approx(1.0)
    m2 = msa_regression_metrics(np.array([1.4, -0.6]), np.array([1.6, -0.6]))
    assert m2["acc7"] == 0.5  # 1.4 -> 1, 1.6 -> 2
    # beyond the scale: clipped to ±3 (acc7) and ±2 (acc5) before rounding, both sides
    out = msa_regression_metrics(np.array([3.6, -3.6, 3.0, -3.0]), np.array([3.0, -3.0, 3.6, -3.6]))
    assert (out["acc7"], out["acc5"]) == (1.0, 1.0)
    # the sign splits sit at 0, not at the unit: 0.5 is positive on both sides
    out = msa_regression_metrics(np.array([0.5, -0.5]), np.array([0.5, -0.5]))
    assert out["acc2_has0"] == out["acc2_non0"] == out["acc2_gt0"] == 1.0


def test_sims_metrics_by_hand():
    pred = [0.5, -0.2, 0.05, 0.0, -0.8, 1.3]
    true = [0.8, -0.6, 0.0, 0.2, -0.75, 0.9]
    m = sims_regression_metrics(pred, true)
    # clip pred to 1.0 at the end: |0.3|+|0.4|+|0.05|+|0.2|+|0.05|+|0.1|
    assert m["mae"] == pytest.approx((0.3 + 0.4 + 0.05 + 0.2 + 0.05 + 0.1) / 6)
    # 2 bins split at 0 (0 goes to the negative bin): pred [1,0,1,0,0,1]; true [1,0,0,1,0,1]
    assert m["acc2"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(weighted_f1_by_hand([1, 0, 0, 1, 0, 1], [1, 0, 1, 0, 0, 1]))
    # 3 bins at ±0.1: pred [2,0,1,1,0,2]; true [2,0,1,2,0,2]
    assert m["acc3"] == pytest.approx(5 / 6)
    # 5 bins at ±0.1, ±0.7: pred [3,1,2,2,0,4]; true [4,1,2,3,0,4]
    assert m["acc5"] == pytest.approx(4 / 6)
    # labels are clipped to [-1, 1] too
    out = sims_regression_metrics(np.array([1.0, -1.0]), np.array([1.4, -1.4]))
    assert out["mae"] == 0.0


def test_regression_metrics_reject_bad_input():
    with pytest.raises(ValueError, match=r"y_pred has 3 values .* y has 2"):
        msa_regression_metrics(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        msa_regression_metrics(torch.tensor([0.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="at least 2"):
        sims_regression_metrics(torch.zeros(1), torch.zeros(1))


def test_regression_metrics_take_one_score_per_sample():
    pred, true = torch.tensor(PRED, dtype=torch.float64), torch.tensor(TRUE, dtype=torch.float64)
    flat = msa_regression_metrics(pred, true)
    # a model's [N, 1] output beside a MulT pickle's [N, 1, 1] labels: the same N scores
    assert msa_regression_metrics(pred[:, None], true[:, None, None]) == flat
    two_columns = torch.stack([pred, -pred], dim=1)  # [N, 2]: valence and arousal, say
    for metric in (msa_regression_metrics, sims_regression_metrics):
        with pytest.raises(ValueError, match=r"y_pred has shape \(\d+, 2\); expected one score"):
            metric(two_columns, torch.cat([true, -true]))
    with pytest.raises(ValueError, match=r"MSAMetric: y has shape \(2, 2\)"):
        MSAMetric()(torch.zeros(4), torch.zeros(2, 2))


def test_constant_prediction_gives_nan_correlation():
    assert math.isnan(msa_regression_metrics(np.zeros(4), np.arange(4.0))["corr"])


def test_classification_metrics_by_hand():
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 1.0, 0.5], [0.0, 1.0, 0.2], [0.3, 0.0, 0.9]])
    y = torch.tensor([0, 1, 2, 2])  # predictions [0, 1, 1, 2] -> 3/4
    m = classification_metrics(logits, y)
    assert m["accuracy"] == 0.75
    # per class F1: c0 = 1, c1 = 2/3 (p=1/2, r=1), c2 = 2/3 (p=1, r=1/2)
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["f1_weighted"] == pytest.approx((1 * 1 + 2 / 3 * 1 + 2 / 3 * 2) / 4)
    assert classification_metrics(torch.tensor([0, 1, 1, 2]), y) == m
    with pytest.raises(ValueError, match="y_pred has 2 samples"):
        classification_metrics(logits[:2], y)

    # whole-number float labels are labels; anything else is a clear error, not a silent guess
    assert classification_metrics(logits, y.float()) == m
    assert classification_metrics(logits, y[:, None]) == m  # [N, 1]: one label per sample
    with pytest.raises(ValueError, match=r"integer class labels, found values such as \[0.5\]"):
        classification_metrics(logits, torch.tensor([0.0, 0.5, 2.0, 2.0]))
    with pytest.raises(ValueError, match=r"labels \[-1, 3\] but y_pred has 3 classes"):
        classification_metrics(logits, torch.tensor([0, -1, 3, 2]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        classification_metrics(logits.masked_fill(logits == 1.0, math.nan), y)
    # whole-number logits of one binary class would pass for labels: negative ones cannot
    binary_logits, binary_y = torch.tensor([-2.0, 3.0, 1.0, -1.0]), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"y_pred must hold class labels >= 0.*\(y_pred > 0\)"):
        classification_metrics(binary_logits, binary_y)
    with pytest.raises(ValueError, match=r"1 classes.*one binary logit pass \(y_pred > 0\)"):
        classification_metrics(binary_logits[:, None], binary_y)
    assert classification_metrics((binary_logits > 0).long(), binary_y)["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"y must hold class labels >= 0, found \[-100\]\.$"):
        classification_metrics(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, -100, 0]))
    with pytest.raises(ValueError, match="needs at least 1 sample, found 0"):
        classification_metrics(logits[:0], y[:0])
    metric = ClassificationMetric()
    metric(logits, y)
    with pytest.raises(ValueError, match="this batch has 4 classes, earlier batches 3"):
        metric(torch.zeros(2, 4), y[:2])
    with pytest.raises(ValueError, match="give one kind"):
        metric(torch.tensor([0, 1]), y[:2])
    assert metric.aggregate() == m  # the rejected batches were not buffered
    one_hot = torch.nn.functional.one_hot(y, 3)
    for call in (lambda: classification_metrics(logits, one_hot), lambda: metric(logits, one_hot)):
        with pytest.raises(ValueError, match=r"found shape \(4, 3\); for one-hot .*argmax"):
            call()


def test_predictions_of_a_bfloat16_model_are_read_as_float32():
    """numpy has no bfloat16: the metrics took such predictions to an unsupported-type error."""
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(12, generator=g), torch.randn(12, generator=g)
    half = scores.bfloat16()
    assert msa_regression_metrics(half, labels) == msa_regression_metrics(half.float(), labels)
    assert sims_regression_metrics(half / 3, labels / 3) == sims_regression_metrics(
        (half / 3).float(), labels / 3
    )
    logits, classes = torch.randn(12, 3, generator=g).bfloat16(), torch.arange(12) % 3
    expected = classification_metrics(logits.float(), classes)
    assert classification_metrics(logits, classes) == expected
    for metric, args in (
        (ClassificationMetric(), (logits, classes)),
        (MSAMetric(), (half, labels)),
    ):
        metric(*args)
        assert metric.aggregate() == (
            expected
            if isinstance(metric, ClassificationMetric)
            else msa_regression_metrics(half.float(), labels)
        )


def test_iemocap_metrics_by_hand():
    labels = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]])
    one_hot = torch.nn.functional.one_hot(labels, 2)  # the pickle's [N, 4, 2]
    preds = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0], [1, 0, 1, 1]])
    logits = torch.nn.functional.one_hot(preds, 2).float().reshape(3, 8)
    m = iemocap_metrics(logits, one_hot)
    assert m["neutral_acc"] == pytest.approx(2 / 3)
    assert m["happy_acc"] == pytest.approx(1.0)
    assert m["sad_acc"] == pytest.approx(2 / 3)
    assert m["angry_acc"] == pytest.approx(2 / 3)
    assert m["neutral_f1"] == pytest.approx(weighted_f1_by_hand([0, 1, 0], [0, 1, 1]))
    assert m["mean_acc"] == pytest.approx((2 / 3 * 3 + 1) / 4)
    assert iemocap_metrics(preds, labels) == m
    with pytest.raises(ValueError, match=r"\[N, 4, 2\]"):
        iemocap_metrics(torch.zeros(3, 5), labels)
    with pytest.raises(ValueError, match="y_pred holds NaN"):
        iemocap_metrics(logits.masked_fill(logits == 1, math.nan), labels)
    with pytest.raises(ValueError, match=r"y as \[N, 4\] must hold binary labels .* \[2\]"):
        iemocap_metrics(preds, labels + labels)
    with pytest.raises(ValueError, match="needs at least 1 sample, found 0"):
        iemocap_metrics(preds[:0], labels[:0])
    # an emotion never predicted positive: its F1 counts 0 for that class, with no warning
    never = iemocap_metrics(torch.zeros_like(labels), labels)
    assert never["happy_f1"] == pytest.approx(weighted_f1_by_hand([1, 0, 0], [0, 0, 0]))


def test_multilabel_metrics_by_hand():
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 1]])
    logits = torch.tensor([[2.0, -1.0, 0.5], [1.0, -2.0, -0.5], [-1.0, 0.5, 1.0], [-3.0, -1, 2]])
    m = multilabel_metrics(logits, labels, names=("happy", "sad", "angry"))
    # happy: predicted [1, 1, 0, 0] for [1, 0, 1, 0]: TPR 1/2, TNR 1/2
    assert m["happy_acc"] == pytest.approx(2 / 4)
    assert m["happy_wacc"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["happy_f1"] == pytest.approx(weighted_f1_by_hand([1, 0, 1, 0], [1, 1, 0, 0]))
    # sad: predicted [0, 0, 1, 0] for [0, 0, 1, 0]: all right
    assert m["sad_acc"] == m["sad_wacc"] == m["sad_f1"] == pytest.approx(1.0)
    # angry: every label on, one predicted off: TNR undefined, so the weighted accuracy is TPR
    assert m["angry_acc"] == pytest.approx(3 / 4) and m["angry_wacc"] == pytest.approx(3 / 4)
    assert m["mean_acc"] == pytest.approx((2 / 4 + 1 + 3 / 4) / 3)
    # positive class over all labels: TP 5 (happy 1, sad 1, angry 3), FP 1, FN 2
    assert m["micro_f1"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 2))
    assert m["subset_acc"] == pytest.approx(2 / 4)  # samples 0 and 3 have all three right
    probabilities = multilabel_metrics(logits.sigmoid(), labels.bool(), threshold=0.5)
    assert probabilities["label0_acc"] == m["happy_acc"] and set(probabilities) != set(m)
    with pytest.raises(ValueError, match=r"y must hold labels 0 or 1, found values such as \[2\]"):
        multilabel_metrics(logits, labels * 2)
    with pytest.raises(ValueError, match=r"y_pred is \(4, 2\) but y is \(4, 3\)"):
        multilabel_metrics(logits[:, :2], labels)
    with pytest.raises(ValueError, match="names must be 3 distinct label names"):
        multilabel_metrics(logits, labels, names=("a", "a", "b"))
    with pytest.raises(ValueError, match="y_pred holds NaN"):
        multilabel_metrics(logits.masked_fill(logits > 1, math.nan), labels)


def test_cumulative_metrics_equal_functional_twins():
    g = torch.Generator().manual_seed(0)
    pred, true = torch.randn(50, 1, generator=g) * 2, torch.randn(50, generator=g) * 2
    metric = MSAMetric()
    for i in range(0, 50, 16):
        metric(pred[i : i + 16], true[i : i + 16])
    assert len(metric) == 50
    assert metric.aggregate() == pytest.approx(msa_regression_metrics(pred, true), nan_ok=True)
    metric.reset()
    with pytest.raises(RuntimeError, match="nothing buffered"):
        metric.aggregate()

    sims = SIMSMetric()
    sims(pred.clamp(-1, 1), true.clamp(-1, 1))
    assert sims.aggregate() == sims_regression_metrics(pred.clamp(-1, 1), true.clamp(-1, 1))

    logits, y = torch.randn(30, 4, generator=g), torch.randint(0, 4, (30,), generator=g)
    cls = ClassificationMetric()
    cls(logits[:10], y[:10])
    cls(logits[10:], y[10:])
    assert cls.aggregate() == classification_metrics(logits, y)
    with pytest.raises(ValueError, match="expected y_pred"):
        cls(torch.randn(3, 4), torch.zeros(2))

    iem = IEMOCAPMetric()
    lab = torch.randint(0, 2, (10, 4), generator=g)
    iem(torch.randn(10, 4, 2, generator=g), lab)
    assert set(iem.aggregate()) >= {"happy_f1", "mean_acc"}

    multi = MultiLabelMetric(names=("a", "b", "c"))
    scores, on = torch.randn(20, 3, generator=g), torch.randint(0, 2, (20, 3), generator=g)
    multi(scores[:7], on[:7])
    multi(scores[7:], on[7:])
    assert multi.aggregate() == multilabel_metrics(scores, on, names=("a", "b", "c"))
    with pytest.raises(ValueError, match="this batch has 2 labels, earlier batches 3"):
        multi(scores[:, :2], on[:, :2])


def test_brats_regions_from_each_label_style():
    labels = torch.tensor([[0, 1, 2, 4]])
    regions = brats_region_masks(labels)  # [TC, WT, ET]
    assert regions[0].int().tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    remapped = brats_region_masks(torch.tensor([[0, 1, 2, 3]]), "remapped")
    assert torch.equal(regions, remapped)
    assert torch.equal(brats_region_masks(regions.int(), "channels"), regions)


def test_brats_dice_by_hand():
    ref = torch.tensor([[0, 1, 2, 2, 4, 4, 0, 0]])
    pred = torch.tensor([[0, 1, 2, 0, 4, 1, 2, 0]])
    # TC ref {1,4,5} pred {1,4,5}: 1.0
    # WT ref {1,2,3,4,5} pred {1,2,4,5,6}: 2*4/(5+5) = 0.8
    # ET ref {4,5} pred {4}: 2*1/(2+1) = 2/3
    d = brats_dice(pred, ref)
    assert d["dice_tc"] == pytest.approx(1.0)
    assert d["dice_wt"] == pytest.approx(0.8)
    assert d["dice_et"] == pytest.approx(2 / 3)
    assert d["dice_mean"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    # the same volumes as remapped labels and as channel masks give the same numbers
    assert (
        brats_dice(torch.where(pred == 4, 3, pred), torch.where(ref == 4, 3, ref), "remapped") == d
    )
    assert brats_dice(brats_region_masks(pred).int(), ref, pred_format="channels") == d
    # label maps as MONAI's LoadImage and nibabel give them: floats holding whole numbers
    assert brats_dice(pred.float(), ref.to(torch.float64)) == d
    # and channel-first [B, 1, H, W], as MONAI's transforms leave them
    pred2d, ref2d = pred.view(1, 2, 4), ref.view(1, 2, 4)
    assert brats_dice(pred2d[:, None].float(), ref2d[:, None]) == brats_dice(pred2d, ref2d) == d


def test_brats_dice_empty_reference_conventions():
    ref = torch.tensor([[0, 1, 2, 2], [0, 1, 2, 0]])  # no ET anywhere
    pred = torch.tensor([[0, 1, 2, 2], [0, 1, 2, 4]])
    assert math.isnan(brats_dice(pred, ref)["dice_et"])  # ignored, MONAI's default
    # counted: sample 0 empty/empty -> 1, sample 1 predicts ET where there is none -> 0
    assert brats_dice(pred, ref, ignore_empty=False)["dice_et"] == pytest.approx(0.5)


def test_brats_label_traps_are_detected():
    with pytest.raises(ValueError, match=r"values \[3\].*label_format='remapped'"):
        brats_dice(torch.tensor([[0, 3]]), torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match=r"values \[4\]"):
        brats_dice(torch.tensor([[0, 4]]), torch.tensor([[0, 4]]), "remapped")
    with pytest.raises(TypeError, match="argmax"):
        brats_region_masks(torch.rand(1, 4))
    with pytest.raises(ValueError, match="binary masks"):
        brats_region_masks(torch.rand(1, 3, 4), "channels")
    with pytest.raises(ValueError, match="spatial sizes"):
        brats_dice(torch.tensor([[0, 1]]), torch.tensor([[0, 1, 2]]))


def test_cumulative_brats_dice():
    ref = torch.tensor([[0, 1, 2, 2, 4, 4, 0, 0]])
    pred = torch.tensor([[0, 1, 2, 0, 4, 1, 2, 0]])
    metric = BratsDiceMetric()
    metric(pred, ref)
    metric(ref, ref)
    out = metric.aggregate()
    assert out["dice_wt"] == pytest.approx((0.8 + 1.0) / 2)
    assert out["dice_et"] == pytest.approx((2 / 3 + 1.0) / 2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: classification_metrics(torch.randn(4, 3, 2), torch.tensor([0, 1, 2, 0])),
            r"must be logits/probabilities \[N, C\] or labels \[N\], found shape \(4, 3, 2\)",
        ),
        (
            lambda: iemocap_metrics(torch.randn(4, 4, 2), torch.zeros(3, 4, 2)),
            "iemocap_metrics: 4 predictions but 3 labels",
        ),
        (
            lambda: IEMOCAPMetric()(torch.randn(4, 4, 2), torch.zeros(3, 4, 2)),
            "IEMOCAPMetric: 4 predictions but 3 labels",
        ),
        (
            lambda: multilabel_metrics(torch.randn(4), torch.zeros(4, 2)),
            r"y_pred must be \[N, K\] scores, found shape \(4,\)",
        ),
        (
            lambda: multilabel_metrics(torch.randn(4, 2), torch.zeros(4)),
            r"y must be \[N, K\] labels \(0 or 1\), found shape \(4,\)",
        ),
        (
            lambda: multilabel_metrics(torch.randn(0, 2), torch.zeros(0, 2)),
            "needs at least 1 sample, found 0",
        ),
        (
            lambda: MultiLabelMetric()(torch.randn(4, 2), torch.zeros(4, 3)),
            r"both \[N, K\], found \(4, 2\) and \(4, 3\)",
        ),
        (
            lambda: MSAMetric()(torch.randn(4), torch.zeros(5)),
            r"y_pred shape \(4,\) and y shape \(5,\) hold different numbers of scores",
        ),
        (
            lambda: brats_region_masks(torch.zeros(2, 2, 4, 4), "channels"),
            r"expects \[B, 3, ...\] masks in \[TC, WT, ET\] order, found shape \(2, 2, 4, 4\)",
        ),
        (
            lambda: brats_region_masks(torch.zeros(2, 4, 4), "weird"),
            "label_format must be 'brats', 'remapped' or 'channels', found 'weird'",
        ),
    ],
)
def test_misshapen_inputs_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
