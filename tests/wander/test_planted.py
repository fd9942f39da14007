"""Wander does what its paper builds it for: it adds cross-modal interactions to a frozen model."""

import torch
from torch import nn

from benchmarks.backbones import ConcatPoolFusion, LateFusionModel
from mmcore import ModalityBatch
from wander import Wander

MODALITIES = ("text", "audio", "vision")


def planted_product(n: int, seed: int) -> ModalityBatch:
    """Three vector modalities; the label is the product of one feature of text and of audio."""
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(n, 4, generator=g) for m in MODALITIES}
    target = inputs["text"][:, 0] * inputs["audio"][:, 0]
    return ModalityBatch(inputs, target=target)


def additive_model() -> LateFusionModel:
    """Late fusion with a linear head: its output is a sum of per-modality terms."""
    torch.manual_seed(0)
    encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(4, 8), nn.Tanh()) for m in MODALITIES})
    return LateFusionModel(encoders, ConcatPoolFusion(MODALITIES), nn.Linear(24, 1))


def fit_r2(model: nn.Module, train: ModalityBatch, test: ModalityBatch, steps: int = 300) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        (model(train).squeeze(-1) - train.target).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        residual = (model(test).squeeze(-1) - test.target).pow(2).mean()
    return float(1 - residual / test.target.var())


def test_wander_learns_a_cross_modal_product_that_the_frozen_additive_model_cannot():
    train, test = planted_product(512, seed=0), planted_product(512, seed=1)

    head_only = additive_model()
    head_only.encoders.requires_grad_(False)
    r2_head = fit_r2(head_only, train, test)

    wander = Wander(
        additive_model(),
        {"bottleneck": 4, "feature": 1, "token": 1},
        example_input=train,
        bias_augment=True,
        output_scale=1.0,
    )
    r2_wander = fit_r2(wander, train, test)

    assert r2_head < 0.1  # a sum of per-modality terms cannot hold text × audio
    assert r2_wander > 0.6, (r2_head, r2_wander)
