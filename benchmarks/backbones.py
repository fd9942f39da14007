"""Reference backbones that follow the mmcore contract: per-modality encoders → fusion → head.

* :class:`SequenceEncoder`: MulT-style — a 1×1 ``Conv1d`` projection, sinusoidal positions and a
  pre-LN transformer encoder, for ``[B, T, D]`` feature sequences (padding masks respected).
* :class:`VectorEncoder`: an MLP with LayerNorm for ``[B, D]`` feature vectors (LayerNorm so that
  normalisation-based test-time adaptation applies to it too).
* :class:`ConcatPoolFusion`: masked mean over time of each modality, concatenated.
* :class:`ResidualMLPHead`: MulT's head, ``out(x + proj2(dropout(relu(proj1(x)))))``.

:class:`LateFusionModel` ties them together; :meth:`LateFusionModel.from_batch` takes every size
from the data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmcore import (
    FastDropout,
    ModalityBatch,
    PointwiseConv1d,
    masked_mean,
    run_encoder,
    sinusoidal_positions,
)

__all__ = [
    "ConcatPoolFusion",
    "LateFusionModel",
    "MultiEncoderSegNet",
    "ResidualMLPHead",
    "SequenceEncoder",
    "VectorEncoder",
]


class SequenceEncoder(nn.Module):
    """``[B, T, in_dim]`` → ``[B, T, d_model]``: Conv1d(1×1) projection + pre-LN transformer.

    Args:
        in_dim: input feature size.
        d_model: model width.
        num_layers: transformer layers.
        num_heads: attention heads (must divide ``d_model``).
        dropout: dropout in the transformer layers.
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int = 32,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}.")
        self.proj = PointwiseConv1d(in_dim, d_model, bias=False)
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            dim_feedforward=4 * d_model,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        # the layer's three dropout modules draw their masks four per 64-bit draw on CPU
        # (attention dropout runs inside nn.MultiheadAttention, with torch's masks)
        for name in ("dropout", "dropout1", "dropout2"):
            setattr(layer, name, FastDropout(dropout))
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.scale = math.sqrt(d_model)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Encode ``x`` ``[B, T, in_dim]``; ``padding_mask`` ``[B, T]`` is True on padding.

        Padded steps may hold anything (MOSI's audio holds ``-inf``): they are zeroed first, since
        a masked key's weight is 0 but ``0 · inf`` in the attention's weighted sum is NaN.
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        h = self.proj(x.transpose(1, 2)).transpose(1, 2)  # [B, T, d_model]
        h = h * self.scale + sinusoidal_positions(h.shape[1], h.shape[2], h.device, h.dtype)
        h = self.transformer(h, src_key_padding_mask=padding_mask)
        return self.norm(h)


class VectorEncoder(nn.Module):
    """``[B, in_dim]`` → ``[B, out_dim]``: Linear → LayerNorm → GELU → Dropout → Linear."""

    def __init__(self, in_dim: int, hidden: int = 64, out_dim: int = 32, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Encode ``x`` ``[B, in_dim]``."""
        return self.net(x)


class ConcatPoolFusion(nn.Module):
    """Masked mean over time of each modality's features, concatenated in a fixed order.

    ``features[m]`` is ``[B, T_m, d_m]`` or ``[B, d_m]``; the output is ``[B, Σ d_m]``.
    """

    def __init__(self, modalities: tuple[str, ...]) -> None:
        super().__init__()
        self.modalities = tuple(modalities)

    def forward(self, features: Mapping[str, Tensor], batch: ModalityBatch) -> Tensor:
        """Pool and concatenate ``features`` (padding masks taken from ``batch``)."""
        pooled = [masked_mean(features[m], batch.padding_mask(m)) for m in self.modalities]
        return torch.cat(pooled, dim=-1)


class ResidualMLPHead(nn.Module):
    """MulT's output head: ``out(x + proj2(dropout(relu(proj1(x)))))``."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj1 = nn.Linear(in_dim, in_dim)
        self.proj2 = nn.Linear(in_dim, in_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map the fused representation ``[B, in_dim]`` to ``[B, out_dim]``."""
        return self.out(x + self.proj2(self.dropout(torch.relu(self.proj1(x)))))


class LateFusionModel(nn.Module):
    """Per-modality encoders → fusion → head (the mmcore contract).

    ``model(batch)`` returns the head's output ``[B, out_dim]``; :meth:`encode` the per-modality
    features and :meth:`fused` the fused representation (the head's input).
    """

    def __init__(self, encoders: nn.ModuleDict, fusion: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoders = encoders
        self.fusion = fusion
        self.head = head

    def encode(self, batch: ModalityBatch) -> dict[str, Tensor]:
        """Per-modality encoder features."""
        missing = [m for m in self.encoders if m not in batch]
        if missing:
            raise ValueError(
                f"batch lacks modalities {missing} that the model encodes "
                f"(batch has {list(batch.modalities)})."
            )
        return {
            m: run_encoder(enc, batch[m], batch.padding_mask(m)) for m, enc in self.encoders.items()
        }

    def fused(self, batch: ModalityBatch) -> Tensor:
        """The fused representation ``[B, F]`` that the head reads."""
        return self.fusion(self.encode(batch), batch)

    def forward(self, batch: ModalityBatch) -> Tensor:
        """Head output ``[B, out_dim]``."""
        return self.head(self.fused(batch))

    @classmethod
    def from_batch(
        cls,
        batch: ModalityBatch,
        out_dim: int,
        *,
        modalities: tuple[str, ...] | None = None,
        width: int = 32,
        hidden: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.1,
        head: str = "mlp",
    ) -> LateFusionModel:
        """Build a model whose sizes come from ``batch``.

        Sequences get a :class:`SequenceEncoder`, vectors a :class:`VectorEncoder`; every encoder
        outputs ``width`` features.

        Args:
            batch: a batch of the data (only shapes are read).
            out_dim: head output size (1 for regression, number of classes otherwise).
            modalities: subset of the batch's modalities to use (default: all).
            width: per-modality feature size.
            hidden: hidden size of vector encoders.
            num_layers: transformer layers of sequence encoders.
            num_heads: attention heads of sequence encoders.
            dropout: dropout everywhere.
            head: ``"mlp"`` (MulT's residual MLP head) or ``"linear"`` (one linear layer).
        """
        if head not in ("mlp", "linear"):
            raise ValueError(f"head must be 'mlp' or 'linear', got {head!r}.")
        names = tuple(modalities or batch.modalities)
        encoders = nn.ModuleDict()
        for m in names:
            kind = batch.kind(m)
            if kind == "sequence":
                encoders[m] = SequenceEncoder(
                    batch[m].shape[-1], width, num_layers, num_heads, dropout
                )
            elif kind == "vector":
                encoders[m] = VectorEncoder(batch[m].shape[-1], hidden, width, dropout)
            else:
                raise ValueError(
                    f"modality '{m}' is a {kind} input; the reference backbones take feature "
                    "sequences [B, T, D] and vectors [B, D]."
                )
        fused = width * len(names)
        head_module = (
            ResidualMLPHead(fused, out_dim, dropout) if head == "mlp" else nn.Linear(fused, out_dim)
        )
        return cls(encoders, ConcatPoolFusion(names), head_module)


class MultiEncoderSegNet(nn.Module):
    """Per-modality 2-D encoders from MONAI blocks → channel concat → 1×1 conv head.

    Follows the mmcore contract (``encoders``, ``fusion``, ``head``). Each encoder is a MONAI
    ``Convolution`` followed by a ``ResidualUnit`` (``[B, 1, H, W]`` → ``[B, channels, H, W]``);
    the head a MONAI ``Convolution`` and a final ``Conv2d(…, num_classes, 1)``.
    """

    def __init__(self, modalities: tuple[str, ...], num_classes: int, channels: int = 8) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit

        self.encoders = nn.ModuleDict(
            {
                m: nn.Sequential(
                    Convolution(2, 1, channels, kernel_size=3, norm="instance", act="prelu"),
                    ResidualUnit(2, channels, channels, subunits=2, norm="instance", act="prelu"),
                )
                for m in modalities
            }
        )
        self.fusion = nn.Identity()
        fused = channels * len(modalities)
        self.head = nn.Sequential(
            Convolution(2, fused, fused, kernel_size=3, norm="instance", act="prelu"),
            nn.Conv2d(fused, num_classes, 1),
        )

    def forward(self, batch: ModalityBatch) -> Tensor:
        """Logits ``[B, num_classes, H, W]``."""
        feats = [self.encoders[m](batch[m]) for m in self.encoders]
        return self.head(self.fusion(torch.cat(feats, dim=1)))
