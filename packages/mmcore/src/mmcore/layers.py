"""Layers shared by the packages' backbones: MulT's input projection, a faster CPU dropout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcore.utils import is_compiling

__all__ = ["FastDropout", "PointwiseConv1d", "dropout_fast"]


class PointwiseConv1d(nn.Conv1d):
    """A 1×1 ``nn.Conv1d`` (MulT's input projection) computed as a matrix product.

    Same parameters, state-dict layout (``weight`` ``[out, in, 1]``), initialisation and call
    convention as ``nn.Conv1d(in_channels, out_channels, kernel_size=1)``: input ``[B, in, T]``
    (or ``[in, T]``), output ``[B, out, T]``. Only the kernel differs: on CPU, oneDNN's
    convolution takes about 6× the time of ``F.linear`` for this shape (forward and backward,
    ``[64, 300, 20]`` → 16 channels), and MulT-style models call it once per modality and step.
    The result is the same up to floating-point rounding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size=1, bias=bias, device=device, dtype=dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, in, T]`` or ``[in, T]`` → ``[B, out, T]`` or ``[out, T]``."""
        if x.ndim not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(
                f"PointwiseConv1d: expected [B, {self.in_channels}, T] or "
                f"[{self.in_channels}, T], got {tuple(x.shape)}."
            )
        return F.linear(x.transpose(-1, -2), self.weight.squeeze(-1), self.bias).transpose(-1, -2)


# 15 random bits per element: the drop probability is rounded to a multiple of 2^-15
_MASK_BITS = 15


def dropout_fast(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``, with a faster mask on CPU.

    PyTorch draws a CPU dropout mask with one call of its serial Mersenne Twister per element
    (``bernoulli_``; pytorch/pytorch#138199), which took a third of a training step of a
    MOSI-sized MulT. Here each 64-bit draw of the same generator gives four elements 15
    random bits each (keep when they are at least ``round(p · 2^15)``), so ``p`` is rounded to
    a multiple of 2^-15 (0.1 → 0.100006) and the kept values are scaled by exactly
    ``1 / (1 − p_rounded)``: the expectation is ``x``. ``torch.manual_seed`` and
    ``torch.random.fork_rng`` govern it as they do ``F.dropout``. Other devices, and code
    being compiled (``torch.compile`` draws its own masks), use ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0 or is_compiling():
        return F.dropout(x, p, training)
    threshold = round(p * (1 << _MASK_BITS))
    if threshold == 0:
        return x
    scale = (1 << _MASK_BITS) / ((1 << _MASK_BITS) - threshold)
    keep = _random_bits(x.shape, x.device) >= threshold
    return x * (keep.to(x.dtype) * scale)  # one mask, reused by the backward


def _random_bits(shape: torch.Size, device: torch.device) -> Tensor:
    """``int16`` ``shape`` of uniform values in ``[0, 2^15)``: four per 64-bit draw."""
    n = math.prod(shape)
    # random_() on int64 fills [0, 2^63): every 16-bit chunk is uniform once its top bit
    # (always 0 in the highest chunk) is masked off
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
    return words.view(torch.int16)[:n].view(shape).bitwise_and_((1 << _MASK_BITS) - 1)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` drawing its masks with :func:`dropout_fast` (same ``p``, same state).

    A drop-in replacement, e.g. for the ``dropout*`` modules of ``nn.TransformerEncoderLayer``
    (whose attention dropout runs inside ``nn.MultiheadAttention`` and is not a module).
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        if inplace:
            raise ValueError("FastDropout: inplace=True is not supported.")
        super().__init__(p)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` with elements dropped at rate ``p`` in training (any shape)."""
        return dropout_fast(x, self.p, self.training)
