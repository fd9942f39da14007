"""What the examples share: UCI mfeat as ``ModalityBatch`` splits, a late-fusion model, a loop.

UCI Multiple Features (CC BY 4.0, shipped in ``shared/uci-mfeat/``): 2,000 handwritten digits,
each described by six feature sets of very different strength (the modalities). Replace
:func:`load_mfeat` with your own data and :class:`LateFusion` with your own model.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcore import ModalityBatch

MFEAT = Path(__file__).resolve().parents[1] / "shared" / "uci-mfeat" / "mfeat.npz"
MODALITIES = ("fou", "fac", "kar", "pix", "zer", "mor")


def load_mfeat(seed: int = 0, path: Path = MFEAT) -> dict[str, ModalityBatch]:
    """Splits ``{"train", "valid", "test"}``, 60/20/20 per digit.

    Six ``[N, D_m]`` float modalities, standardised with the training split's statistics, and
    the digit ``[N]`` as target.
    """
    with np.load(path) as data:
        labels = torch.from_numpy(data["labels"].astype(np.int64))
        views = {m: torch.from_numpy(data[m].astype(np.float32)) for m in MODALITIES}
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {"train": [], "valid": [], "test": []}
    for digit in range(10):
        rows = torch.nonzero(labels == digit).squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        n_train, n_valid = int(0.6 * len(rows)), int(0.2 * len(rows))
        parts["train"].append(rows[:n_train])
        parts["valid"].append(rows[n_train : n_train + n_valid])
        parts["test"].append(rows[n_train + n_valid :])
    index = {k: torch.cat(v).sort().values for k, v in parts.items()}
    train = index["train"]
    stats = {m: (x[train].mean(0), x[train].std(0).clamp_min(1e-6)) for m, x in views.items()}
    return {
        split: ModalityBatch(
            {m: (x[rows] - stats[m][0]) / stats[m][1] for m, x in views.items()}, labels[rows]
        )
        for split, rows in index.items()
    }


class LateFusion(nn.Module):
    """Per-modality MLP encoders → concatenation → linear head (the mmcore model contract)."""

    def __init__(self, dims: dict[str, int], classes: int, width: int = 32) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, 128), nn.GELU(), nn.Linear(128, width))
                for m, d in dims.items()
            }
        )
        self.norms = nn.ModuleDict({m: nn.LayerNorm(width) for m in dims})
        self.fusion = nn.Identity()
        self.head = nn.Linear(width * len(dims), classes)

    def forward(self, batch: ModalityBatch) -> Tensor:
        """Logits ``[B, classes]``."""
        feats = [self.norms[m](self.encoders[m](batch[m])) for m in self.encoders]
        return self.head(self.fusion(torch.cat(feats, dim=-1)))


def fit(
    model: nn.Module,
    data: ModalityBatch,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    prepare: Callable[[ModalityBatch], ModalityBatch] = lambda batch: batch,
) -> None:
    """AdamW on the parameters that require grad, cross-entropy, shuffled mini-batches.

    ``prepare`` changes each mini-batch first (say, drops modalities at random).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in data.split(batch_size, shuffle=True):
            batch = prepare(batch)
            optimizer.zero_grad()
            F.cross_entropy(model(batch), batch.require_target()).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: ModalityBatch) -> float:
    """Top-1 accuracy in eval mode, in percent."""
    model.eval()
    return 100 * float((model(data).argmax(dim=-1) == data.require_target()).float().mean())


def dims_of(batch: ModalityBatch) -> dict[str, int]:
    """Each modality's feature size."""
    return {m: batch[m].shape[-1] for m in batch.modalities}


def parse_args(doc: str | None) -> argparse.Namespace:
    """An example's options: ``--seed`` and ``--quick`` (a few epochs, a smoke test)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few epochs (a smoke test)")
    return parser.parse_args()
