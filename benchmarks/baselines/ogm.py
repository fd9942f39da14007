"""OGM-GE (Peng et al., CVPR 2022) generalised from 2 to M modalities.

The original: late fusion ``logits = W^a φ^a + W^v φ^v + b``; per modality the batch score
``s^u = Σ_i softmax(W^u φ^u_i + b/2)_{y_i}``; ``ρ^a = s^a / s^v``; the dominant modality (``ρ > 1``)
gets its encoder gradients scaled by ``1 − tanh(α ρ)``, the other keeps 1; GE adds Gaussian noise
``N(0, std(g)²)``, ``g`` the gradient before that scaling, to the encoders' weight gradients.

Generalisation used here: ``b/2`` becomes ``b/M``, and each modality's ratio is its score over
the mean score of the others, ``ρ_m = s_m / mean_{k≠m} s_k`` (for M = 2 this is the original).
Every modality with ``ρ_m > 1`` is damped by ``1 − tanh(α ρ_m)``. The released code scales and
perturbs the encoders' convolution kernels only (4-D gradients; biases and normalisation
parameters keep theirs); our encoders are MLPs, so here the scaling and the noise go to every
weight matrix or kernel (``ndim >= 2``) of the encoders.
Classification only (the scores are softmax probabilities). Adam largely cancels a constant
per-tensor gradient scale (OGM-GE issue #26); the noise term is what survives it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from mmcore import ModalityBatch, encoder_features, find_modality_batch, masked_mean

__all__ = ["OGMGE"]


class OGMGE:
    """On-the-fly gradient modulation for a contract model with a linear head over concat."""

    def __init__(self, model: nn.Module, alpha: float = 0.5, noise: bool = True) -> None:
        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise TypeError("OGM-GE needs a linear head over the concatenated modality features.")
        self.model, self.alpha, self.noise = model, alpha, noise
        self.head = cast(nn.Linear, model.head)  # checked above
        self.encoders = cast(nn.ModuleDict, model.encoders)
        self.modalities = tuple(self.encoders)
        self._captured: dict[str, Tensor] = {}
        self._batch: ModalityBatch | None = None
        self.coefficients: dict[str, float] = {}
        model.register_forward_pre_hook(self._on_call, with_kwargs=True)
        for m in self.modalities:
            self.encoders[m].register_forward_hook(self._capture(m))

    def _on_call(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._batch = find_modality_batch(args, kwargs)

    def _capture(self, m: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(_module: nn.Module, _args: tuple, out: Any) -> None:
            self._captured[m] = encoder_features(out).detach()

        return hook

    @torch.no_grad()
    def step(self, target: Tensor) -> dict[str, float]:
        """Scale (and perturb) the encoders' gradients; call after backward, before the step."""
        head = self.head
        pooled = [
            masked_mean(self._captured[m], self._batch.padding_mask(m) if self._batch else None)
            for m in self.modalities
        ]
        scores, start = [], 0
        for feats in pooled:
            block = head.weight[:, start : start + feats.shape[1]]
            start += feats.shape[1]
            logits = feats @ block.T + head.bias / len(pooled)
            scores.append(torch.softmax(logits, dim=1).gather(1, target[:, None]).sum())
        s = torch.stack(scores)
        for i, m in enumerate(self.modalities):
            others = (s.sum() - s[i]) / (len(s) - 1)
            ratio = float(s[i] / others.clamp_min(1e-8))
            coeff = 1 - math.tanh(self.alpha * ratio) if ratio > 1 else 1.0
            self.coefficients[m] = coeff
            for p in self.encoders[m].parameters():
                if p.grad is None or p.grad.ndim < 2:  # biases, norms: left as they are
                    continue
                # GE: noise with the std of the gradient before the scaling (the released
                # code's ``g * k + normal(0, g.std())``)
                std = p.grad.std() if self.noise else None
                p.grad.mul_(coeff)
                if std is not None:
                    p.grad.add_(torch.randn_like(p.grad) * (std + 1e-8))
        self._captured = {}
        return dict(self.coefficients)
