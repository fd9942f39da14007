"""Test-time adaptation baselines, on the same normalisation parameters CASP adapts.

* **Tent** (Wang et al., ICLR 2021), classification: minimise the mean prediction entropy of each
  unlabeled target batch, one pass, normalisation affine parameters only.
* **Tent-style regression surrogate**: regression has no entropy, so the surrogate minimises the
  disagreement between the prediction and the prediction with one modality dropped,
  ``mean (f(x) − f(x̃))²`` (the modality drawn per batch, as CASP's second view): a
  consistency objective on the same parameters, one pass.
* **Naive self-training**: pseudo-labels are the source model's predictions on *all* target
  samples (no stability selection), then CASP's stage-2 training on them. In regression the
  source weights are a fixed point of that L1 loss (zero residuals, zero gradients): the model
  moves only as far as train mode changes its predictions (dropout, BatchNorm's batch
  statistics), so this row stays close to source-only by construction.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from casp import norm_parameters
from mmcore import ModalityBatch

__all__ = ["SelfTraining", "Tent"]


class Tent:
    """Entropy (classification) or dropped-modality consistency (regression) minimisation."""

    def __init__(
        self,
        model: nn.Module,
        task: str,
        lr: float = 1e-3,
        batch_size: int = 64,
        epochs: int = 1,
        seed: int = 0,
    ) -> None:
        self.model = copy.deepcopy(model)
        self.task, self.batch_size, self.epochs, self.seed = task, batch_size, epochs, seed
        self.params = norm_parameters(self.model)
        if not self.params:
            raise ValueError("Tent needs normalisation layers to adapt.")
        self.model.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)

    def objective(self, batch: ModalityBatch, rng: random.Random) -> Tensor:
        """The unsupervised loss of one batch."""
        out = self.model(batch)
        if self.task == "classification":
            p = out.softmax(dim=-1)
            return -(p * p.clamp_min(1e-8).log()).sum(dim=-1).mean()
        dropped = self.model(batch.with_missing(rng.choice(batch.modalities)))
        return F.mse_loss(out, dropped)

    def adapt(self, data: ModalityBatch) -> None:
        """One (or ``epochs``) pass over the unlabeled target data; labels never read."""
        self._train(data.replace(target=None))

    def _train(self, data: ModalityBatch) -> None:
        rng = random.Random(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.model.train()
        for _ in range(self.epochs):
            for batch in data.split(self.batch_size, shuffle=True, generator=generator):
                self.optimizer.zero_grad(set_to_none=True)
                self.objective(batch, rng).backward()
                self.optimizer.step()
        self.model.eval()


class SelfTraining(Tent):
    """Source-model pseudo-labels on every target sample, then supervised training (3 epochs)."""

    def __init__(
        self,
        model: nn.Module,
        task: str,
        lr: float = 1e-3,
        batch_size: int = 64,
        epochs: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__(model, task, lr, batch_size, epochs, seed)

    def objective(self, batch: ModalityBatch, rng: random.Random) -> Tensor:
        """Supervised loss on the pseudo-labels carried in ``batch.target``."""
        out = self.model(batch)
        if self.task == "classification":
            return F.cross_entropy(out, batch.require_target())
        return F.l1_loss(out.reshape(-1), batch.require_target())

    def pseudo_labels(self, data: ModalityBatch) -> Tensor:
        """The model's predictions on ``data`` (eval mode): probabilities, or scores ``[N]``."""
        self.model.eval()
        with torch.no_grad():
            out = torch.cat([self.model(b) for b in data.split(256)])
        return out.softmax(dim=-1) if self.task == "classification" else out.reshape(-1)

    def adapt(self, data: ModalityBatch) -> None:
        """Label every target sample with the source model's prediction, then train on them."""
        self._train(data.replace(target=self.pseudo_labels(data)))
