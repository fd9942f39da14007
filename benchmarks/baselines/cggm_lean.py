"""CGGM's step written by hand for one case: how much of its overhead is the implementation's.

``cggm.CGGM`` serves any task, feature layout, device, dtype, AMP, gradient accumulation and
DDP, with the checks and bookkeeping that takes. On a tiny network the fixed cost of those calls
could be a large part of its overhead. :class:`LeanCGGM` computes the same step (default mode,
no smoothing) for classification on vector features only, with none of the checks: the stacked
classifiers' backward written out (four batched matmuls), gradients handed to a fused Adam, the
scores, ``B`` and the encoder-gradient scaling in a handful of calls. What it still costs is
the arithmetic of the method itself. A test checks it trains exactly as ``cggm.CGGM`` does;
``cggm-step-overhead`` times it beside it.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from cggm import ModalityClassifier, StackedClassifiers
from mmcore import fused_optimizer

__all__ = ["LeanCGGM"]


class LeanCGGM:
    """``cggm.CGGM``'s default-mode step for a contract model's vector features, by hand.

    Same classifiers (built on the first step, with the same initialisation draws), same Adam,
    same ``B`` and the same direction term; no smoothing, checks, padding, devices or DDP.
    """

    def __init__(
        self, model: nn.Module, *, num_outputs: int, rho: float, lam: float, cls_lr: float
    ) -> None:
        encoders, head = cast(nn.ModuleDict, model.encoders), cast(nn.Module, model.head)
        self.modalities = tuple(encoders)
        self.rho, self.lam, self.cls_lr, self.num_outputs = rho, lam, cls_lr, num_outputs
        self.head_weight = [m for m in head.modules() if isinstance(m, nn.Linear)][-1].weight
        self._encoder_params = {m: list(encoders[m].parameters()) for m in self.modalities}
        self._captured: dict[str, Tensor] = {}
        self.params: list[Tensor] = []  # [W1 (M, F, d), b1 (M, F), W2 (M, C, F), b2]
        self.prev_scores = torch.zeros(len(self.modalities))
        self.coefficients: Tensor | None = None
        self._direction = self.head_weight.new_zeros(self.head_weight.numel())
        for m in self.modalities:
            encoders[m].register_forward_hook(self._capture_hook(m))

    def _capture_hook(self, modality: str) -> Any:
        def capture(_module: nn.Module, _args: tuple, output: Tensor) -> None:
            self._captured[modality] = output.detach()

        return capture

    def _build(self, in_dim: int) -> None:
        hidden = self.head_weight.shape[1]
        stacked = StackedClassifiers.from_classifiers(
            {m: ModalityClassifier((in_dim,), hidden, self.num_outputs) for m in self.modalities},
            self.modalities,
        )
        self.params = [p.detach().clone() for p in stacked.parameters()]
        self.optimizer = fused_optimizer(torch.optim.Adam, self.params, lr=self.cls_lr)

    def direction_loss(self, _task_loss: Tensor | None = None) -> Tensor:
        """``λ · L_gm`` from the head's current weight and the last ``B`` (the weights proxy)."""
        if self.coefficients is None or self.lam == 0:
            return self.head_weight.new_zeros(())
        w = self.head_weight.reshape(-1)
        aligned = torch.dot(self._direction, w) / w.norm().clamp_min(1e-8)
        return self.lam * (self.coefficients.sum() - aligned) / len(self.modalities)

    @torch.no_grad()
    def step(self, target: Tensor) -> None:
        """Train the classifiers on the captured features, update ``B``, scale the gradients."""
        x = torch.stack([self._captured[m] for m in self.modalities])  # [M, B, d]
        if x.ndim != 3:
            raise ValueError(
                f"LeanCGGM handles vector features [B, d] only; got {tuple(x.shape[1:])}."
            )
        if not self.params:
            self._build(x.shape[2])
        w1, b1, w2, b2 = self.params
        pre = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))  # [M, B, F]
        hidden = pre.relu()
        logits = torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))  # [M, B, C]
        correct = (logits.argmax(dim=-1) == target).sum(dim=1)
        # d(Σ_m mean cross-entropy)/d logits = (softmax − one-hot) / B
        grad_logits = logits.softmax(dim=-1)
        grad_logits[:, torch.arange(len(target)), target] -= 1
        grad_logits /= len(target)
        grad_pre = torch.bmm(grad_logits, w2).mul_(pre > 0)
        grads = (
            torch.bmm(grad_pre.transpose(1, 2), x),
            grad_pre.sum(dim=1),
            torch.bmm(grad_logits.transpose(1, 2), hidden),
            grad_logits.sum(dim=1),
        )
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.optimizer.step()

        scores = correct.float() / len(target)
        deltas, self.prev_scores = scores - self.prev_scores, scores
        shifted = deltas - deltas.min().clamp(max=0) + 1e-3
        b = (shifted.sum() - shifted) / shifted.sum()
        self.coefficients = b
        heads = w2.reshape(len(b), -1)
        self._direction = (b / heads.norm(dim=1).clamp_min(1e-8)) @ heads
        encoder_grads, factors = [], []
        # 0-dim tensors: CPU _foreach_mul_ wraps Python scalars in new tensors one by one
        for m, factor in zip(self.modalities, (self.rho * b).unbind(), strict=True):
            for p in self._encoder_params[m]:
                if p.grad is not None:
                    encoder_grads.append(p.grad)
                    factors.append(factor)
        torch._foreach_mul_(encoder_grads, factors)
