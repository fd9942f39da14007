"""Adam for half-precision parameters, stepping float32 master copies."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmcore import trainable_dtype

__all__ = ["Float32MasterAdam"]


class Float32MasterAdam:
    """Adam on float32 copies of low-precision parameters, written back rounded after each step.

    A normalisation scale sits near 1, where bfloat16 values are 2^-7 apart (float16: 2^-10):
    Adam's steps of about ``lr`` (1e-3) round away, and adapting a half-precision model in its
    own dtype changes nothing at all. As in mixed-precision training, the updates accumulate in
    the float32 copies instead. A parameter changed from outside since the last step (a
    ``restore``, an ``adapt`` between online calls) re-seeds its copy.
    """

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        self.params = params
        self.masters = [p.detach().to(trainable_dtype(p.dtype), copy=True) for p in params]
        self.optimizer = torch.optim.Adam(self.masters, lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' gradients and the copies'."""
        for p in self.params:
            p.grad = None
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def masters_with_grads(self) -> list[Tensor]:
        """The float32 copies, each holding its parameter's gradient (to clip, then step)."""
        for p, master in zip(self.params, self.masters, strict=True):
            if not torch.equal(master.to(p.dtype), p):
                master.copy_(p)
            master.grad = None if p.grad is None else p.grad.to(master.dtype)
        return self.masters

    @torch.no_grad()
    def step(self) -> None:
        """Step the float32 copies, then write them back to the parameters, rounded."""
        self.optimizer.step()
        for p, master in zip(self.params, self.masters, strict=True):
            p.copy_(master)
