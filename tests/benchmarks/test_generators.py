"""The planted structure is really there and measurable with simple probes."""

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression

from benchmarks.data.generators import PlantedStructure, sample_planted

SHAPES = {"text": (4, 8), "audio": (6, 5), "vision": (5, 6)}


def readings(sample):
    """Each modality's 1-d reading: first principal component of its time-pooled features."""
    return np.stack(
        [PCA(1).fit_transform(x.mean(axis=1))[:, 0] for x in sample.features.values()], axis=1
    )


def r2(x, y):
    return LinearRegression().fit(x, y).score(x, y)


def test_interaction_knob_plants_a_cross_modal_product():
    s = sample_planted(3000, SHAPES, PlantedStructure(interaction=1.0), seed=0)
    p = readings(s)
    linear = r2(p, s.score)
    with_product = r2(np.column_stack([p, p[:, 0] * p[:, 1]]), s.score)
    assert linear < 0.6 and with_product > linear + 0.3
    additive = sample_planted(3000, SHAPES, PlantedStructure(interaction=0.0), seed=0)
    p = readings(additive)
    assert r2(p, additive.score) > 0.85


def test_imbalance_knob_makes_one_modality_dominant():
    s = sample_planted(3000, SHAPES, PlantedStructure(imbalance=4.0, dominant="audio"), seed=1)
    p = readings(s)
    per_modality = {m: r2(p[:, [i]], s.score) for i, m in enumerate(SHAPES)}
    assert per_modality["audio"] > 0.75
    assert per_modality["text"] < 0.1 and per_modality["vision"] < 0.1
    balanced = sample_planted(3000, SHAPES, PlantedStructure(imbalance=1.0), seed=1)
    p = readings(balanced)
    scores = [r2(p[:, [i]], balanced.score) for i in range(3)]
    assert max(scores) - min(scores) < 0.1


def test_shared_knob_makes_a_missing_modality_predictable_from_the_others():
    s = sample_planted(3000, SHAPES, PlantedStructure(shared=0.7), seed=4)
    assert np.allclose(np.corrcoef(s.latents.T)[np.triu_indices(3, 1)], 0.7, atol=0.05)
    p = readings(s)
    # the label's text part is recoverable from audio + vision only when latents are shared
    assert r2(p[:, 1:], s.contributions[:, 0]) > 0.4
    independent = sample_planted(3000, SHAPES, PlantedStructure(shared=0.0), seed=4)
    assert r2(readings(independent)[:, 1:], independent.contributions[:, 0]) < 0.02


@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_shift_knob_moves_features_not_the_label_mapping(shift):
    structure = PlantedStructure(shift=shift)
    src = sample_planted(2000, SHAPES, structure, domain="source", seed=2)
    tgt = sample_planted(2000, SHAPES, structure, domain="target", seed=3)
    pooled = {
        d: np.concatenate([x.mean(1) for x in s.features.values()], 1)
        for d, s in (("src", src), ("tgt", tgt))
    }
    mean_gap = np.abs(pooled["src"].mean(0) - pooled["tgt"].mean(0)).mean()
    model = LinearRegression().fit(pooled["src"], src.score)
    drop = model.score(pooled["src"], src.score) - model.score(pooled["tgt"], tgt.score)
    if shift == 0:
        assert mean_gap < 0.1 and drop < 0.05
    else:
        assert mean_gap > 0.5 * shift and drop > 0.1


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        PlantedStructure(imbalance=0.5)
    with pytest.raises(ValueError, match=r"shared must be in \[0, 1\)"):
        PlantedStructure(shared=1.0)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        PlantedStructure(shift=-1)
    with pytest.raises(ValueError, match="dominant modality 'x'"):
        sample_planted(10, SHAPES, PlantedStructure(dominant="x"))
    with pytest.raises(ValueError, match="domain"):
        sample_planted(10, SHAPES, PlantedStructure(), domain="other")


def test_interaction_knob_reaches_iemocap_emotions():
    """IEMOCAP files carry the product as well: with the knob on, samples whose latents'
    product is large are labelled with the first emotion (neutral) far more often."""
    from benchmarks.data.generators import _iemocap_labels

    emotions, latents = {}, {}
    for weight in (0.0, 2.0):
        structure = PlantedStructure(interaction=weight)
        s = sample_planted(3000, SHAPES, structure, seed=0)
        onehot = _iemocap_labels(s, structure, np.random.default_rng(0))
        assert onehot.shape == (3000, 4, 2) and (onehot.sum(axis=2) == 1).all()
        assert (onehot[:, :, 1].sum(axis=1) == 1).all()  # exactly one emotion per sample
        emotions[weight], latents[weight] = onehot[:, :, 1].argmax(axis=1), s.latents
    np.testing.assert_array_equal(latents[0.0], latents[2.0])  # the same samples, relabelled
    product = latents[0.0][:, 0] * latents[0.0][:, 1]
    top = product > np.quantile(product, 0.9)
    assert (emotions[2.0][top] == 0).mean() > (emotions[0.0][top] == 0).mean() + 0.3
