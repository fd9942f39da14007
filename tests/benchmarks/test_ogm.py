"""The OGM-GE baseline (generalised to M modalities) against hand-computed coefficients."""

import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.backbones import LateFusionModel
from benchmarks.baselines.ogm import OGMGE
from mmcore import ModalityBatch


def setup(dims, noise, seed=0, n=32, classes=3):
    g = torch.Generator().manual_seed(seed)
    batch = ModalityBatch(
        {m: torch.randn(n, d, generator=g) for m, d in dims.items()},
        target=torch.randint(0, classes, (n,), generator=g),
    )
    torch.manual_seed(seed)
    model = LateFusionModel.from_batch(
        batch, classes, width=16, hidden=64, dropout=0.0, head="linear"
    )
    ogm = OGMGE(model, alpha=0.5, noise=noise)
    F.cross_entropy(model(batch), batch.target).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, ogm, batch, before


def expected_coefficients(model, batch):
    """Each modality's softmax score from its block of the linear head (bias shared out
    evenly), its ratio to the mean of the others', and ``1 − tanh(α ρ)`` where ``ρ > 1``."""
    with torch.no_grad():
        feats = model.encode(batch)
        weight, bias = model.head.weight, model.head.bias
        scores, start = {}, 0
        for m, f in feats.items():
            logits = f @ weight[:, start : start + f.shape[1]].T + bias / len(feats)
            start += f.shape[1]
            scores[m] = logits.softmax(1)[torch.arange(len(f)), batch.target].sum().item()
    out = {}
    for m, s in scores.items():
        others = [v for k, v in scores.items() if k != m]
        ratio = s / (sum(others) / len(others))
        out[m] = 1 - math.tanh(0.5 * ratio) if ratio > 1 else 1.0
    return out, scores


@pytest.mark.parametrize("dims", [{"a": 6, "v": 9}, {"a": 6, "v": 9, "t": 4, "d": 5}])
def test_coefficients_and_scaling_without_noise(dims):
    model, ogm, batch, before = setup(dims, noise=False)
    coefficients = ogm.step(batch.target)
    expected, scores = expected_coefficients(model, batch)
    assert coefficients == pytest.approx(expected, rel=1e-5)
    if len(dims) == 2:  # the original: only the modality with the larger score is damped
        strong = max(scores, key=scores.get)
        weak = next(m for m in scores if m != strong)
        assert coefficients[strong] < 1 and coefficients[weak] == 1.0
    scaled = 0
    for name, p in model.named_parameters():
        m = name.split(".")[1] if name.startswith("encoders.") else None
        # the head, and the encoders' biases and norms (as the released code's, which scales
        # convolution kernels only), are not modulated
        factor = coefficients[m] if m and p.ndim >= 2 else 1.0
        scaled += factor != 1.0
        torch.testing.assert_close(p.grad, factor * before[name], msg=name)
    assert scaled >= 2


def test_ge_noise_has_the_std_of_the_gradient_before_scaling():
    """The released code computes ``g·k + N(0, std(g))`` from the gradient ``g`` before the
    scaling, for weight matrices only (biases keep their gradients)."""
    model, ogm, batch, before = setup({"a": 40, "v": 50}, noise=True)
    torch.manual_seed(1)
    coefficients = ogm.step(batch.target)
    damped = [m for m, k in coefficients.items() if k < 1]
    assert damped and coefficients[damped[0]] < 0.7  # a scaled std would be clearly smaller
    weights = 0
    for name, p in model.named_parameters():
        if not name.startswith("encoders."):
            continue
        if p.ndim == 1:
            torch.testing.assert_close(p.grad, before[name], msg=name)
            continue
        scaled = coefficients[name.split(".")[1]] * before[name]
        noise = p.grad - scaled
        weights += 1
        assert noise.std().item() == pytest.approx(before[name].std().item(), rel=0.15), name
    assert weights >= 4
