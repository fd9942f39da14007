"""MPLMM does what its paper builds it for: a frozen backbone stays usable with missing inputs."""

import copy

import torch

from mm_prompts import MPLMM, MulTBackbone, MulTConfig, apply_case, simulate_missing
from mmcore import ModalityBatch

NAMES = ("text", "audio", "vision")
DIMS = {"text": 6, "audio": 4, "vision": 5}
LENGTH = 4


def redundant(n: int, seed: int) -> ModalityBatch:
    """One latent behind all three modalities (non-zero-mean features); the label is the latent."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g)
    inputs = {}
    for m, d in DIMS.items():
        loading = torch.randn(d, generator=torch.Generator().manual_seed(len(m)))
        noise = 0.3 * torch.randn(n, LENGTH, d, generator=g)
        inputs[m] = 1.0 + z[:, None, None] * loading + noise
    return ModalityBatch(inputs, target=z)


def train(model: torch.nn.Module, data: ModalityBatch, steps: int, rate: float = 0.0) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch, _ = simulate_missing(data, rate, generator=g) if rate else (data, None)
        opt.zero_grad()
        (model(batch).squeeze(-1) - batch.target).pow(2).mean().backward()
        opt.step()
    model.eval()


def mse(model: torch.nn.Module, data: ModalityBatch) -> float:
    with torch.no_grad():
        return float((model(data).squeeze(-1) - data.target).pow(2).mean())


def test_prompts_recover_what_zero_filling_loses_on_a_frozen_backbone():
    train_set, test_set = redundant(128, seed=0), redundant(128, seed=1)
    torch.manual_seed(0)
    config = MulTConfig(DIMS, d=8, num_heads=2, cross_layers=1, memory_layers=1, dropout=0.0)
    backbone = MulTBackbone(config)
    train(backbone, train_set, steps=100)  # pretrained on complete data only
    backbone_copy = copy.deepcopy(backbone)  # the lower bound: zero-filled inputs, as trained
    model = MPLMM(backbone, dict.fromkeys(NAMES, LENGTH), prompt_length=4)
    complete_before = mse(backbone, test_set)
    train(model, train_set, steps=100, rate=0.7)  # the paper's trainable parts only

    text_only = apply_case(test_set, 0b001)  # audio and vision missing (zero-filled)
    assert complete_before < 0.2  # the backbone learned the task on complete data
    lower_bound = mse(backbone_copy, text_only)
    prompted = mse(model, text_only)
    assert prompted < 0.5 * lower_bound, (lower_bound, prompted)
