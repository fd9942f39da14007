"""A MulT-style backbone for any number of modalities (Tsai et al., ACL 2019).

Per modality a bias-free 1×1 ``Conv1d`` projects the input to ``d``. For every ordered pair
(branch ``b``, source ``s``) a cross-modal transformer lets ``b`` attend to ``s``; each branch's
``M − 1`` cross-modal outputs are concatenated on the feature axis (width ``(M − 1) d``) and run
through the branch's self-attention "memory" transformer, whose last position is read out. The
``M`` readouts are concatenated and go through MulT's residual MLP head. Attention is PyTorch's
``nn.MultiheadAttention`` (fused ``scaled_dot_product_attention`` kernels); padding masks are
respected; there is no causal mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from mmcore import ModalityBatch, sinusoidal_positions

__all__ = ["MulTBackbone", "MulTConfig"]


@dataclass
class MulTConfig:
    """Sizes of :class:`MulTBackbone`.

    Args:
        input_dims: modality → input feature size ``D_m`` (the order is the modality order).
        out_dim: output size (1 for regression).
        d: projection width.
        num_heads: attention heads (divide ``d`` and ``(M − 1) d``).
        cross_layers: layers of each cross-modal transformer.
        memory_layers: layers of each memory transformer.
        dropout: dropout in attention, feed-forward and head.
    """

    input_dims: dict[str, int]
    out_dim: int = 1
    d: int = 30
    num_heads: int = 5
    cross_layers: int = 2
    memory_layers: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if len(self.input_dims) < 2:
            raise ValueError(f"MulT needs >= 2 modalities, got {list(self.input_dims)}.")
        if self.d % self.num_heads:
            raise ValueError(f"d={self.d} must be divisible by num_heads={self.num_heads}.")
        self.input_dims = dict(self.input_dims)


class _Block(nn.Module):
    """Pre-LN (cross-)attention block: ``x + attn(LN x, LN src)``, then ``+ FFN``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_q, self.ln_kv, self.ln_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(
            nn.Linear(dim, 4 * dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4 * dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, src: Tensor, src_padding: Tensor | None) -> Tensor:
        kv = self.ln_kv(src)
        x = x + self.attn(self.ln_q(x), kv, kv, key_padding_mask=src_padding, need_weights=False)[0]
        return x + self.ff(self.ln_ff(x))


class _Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.scale = math.sqrt(dim)

    def forward(
        self,
        x: Tensor,
        src: Tensor | None = None,
        src_padding: Tensor | None = None,
        x_padding: Tensor | None = None,
    ) -> Tensor:
        x = x * self.scale + sinusoidal_positions(x.shape[1], x.shape[2], x.device)
        if src is None:
            src_padding = x_padding
        else:
            src = src * self.scale + sinusoidal_positions(src.shape[1], src.shape[2], src.device)
        for block in self.blocks:
            x = block(x, x if src is None else src, src_padding)
        return self.norm(x)


class MulTBackbone(nn.Module):
    """MulT for ``M >= 2`` modalities; ``model(batch)`` returns ``[B, out_dim]``.

    :meth:`forward_projected` runs everything after the input projections, optionally with extra
    tokens appended to each branch before its memory transformer (MPLMM's missing-type prompts).
    """

    def __init__(self, config: MulTConfig) -> None:
        super().__init__()
        self.config = config
        self.modalities = tuple(config.input_dims)
        m, d, c = len(self.modalities), config.d, config
        self.proj = nn.ModuleDict(
            {k: nn.Conv1d(dim, d, kernel_size=1, bias=False) for k, dim in c.input_dims.items()}
        )
        self.cross = nn.ModuleDict(
            {
                f"{b}_from_{s}": _Transformer(d, c.num_heads, c.cross_layers, c.dropout)
                for b in self.modalities
                for s in self.modalities
                if s != b
            }
        )
        memory_dim = (m - 1) * d
        heads = c.num_heads if memory_dim % c.num_heads == 0 else 1
        self.memory = nn.ModuleDict(
            {
                b: _Transformer(memory_dim, heads, c.memory_layers, c.dropout)
                for b in self.modalities
            }
        )
        fused = m * memory_dim
        self.proj1, self.proj2 = nn.Linear(fused, fused), nn.Linear(fused, fused)
        self.dropout = nn.Dropout(c.dropout)
        self.out = nn.Linear(fused, c.out_dim)

    def project(self, batch: ModalityBatch) -> dict[str, Tensor]:
        """Input projections: modality → ``[B, T_m, d]``."""
        missing = [k for k in self.modalities if k not in batch]
        if missing:
            raise ValueError(f"batch lacks modalities {missing} (has {list(batch.modalities)}).")
        return {k: self.proj[k](batch[k].transpose(1, 2)).transpose(1, 2) for k in self.modalities}

    def forward_projected(
        self,
        z: Mapping[str, Tensor],
        padding: Mapping[str, Tensor | None] | None = None,
        extra_tokens: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Output from projected sequences ``z[m]`` ``[B, T_m, d]``.

        ``extra_tokens[b]`` ``[B, L, (M − 1) d]`` are appended to branch ``b`` before its memory
        transformer, and the readout is then their last token; otherwise it is the branch's last
        unpadded step.
        """
        padding = dict(padding or {})
        readouts = []
        for b in self.modalities:
            parts = [
                self.cross[f"{b}_from_{s}"](z[b], z[s], padding.get(s))
                for s in self.modalities
                if s != b
            ]
            h = torch.cat(parts, dim=-1)  # [B, T_b, (M-1) d]
            pad = padding.get(b)
            if extra_tokens is not None:
                extra = extra_tokens[b]
                h = torch.cat([h, extra], dim=1)
                if pad is not None:
                    pad = torch.cat([pad, pad.new_zeros(pad.shape[0], extra.shape[1])], dim=1)
                readouts.append(self.memory[b](h, x_padding=pad)[:, -1])
            else:
                out = self.memory[b](h, x_padding=pad)
                if pad is None:
                    readouts.append(out[:, -1])
                else:
                    last = ((~pad).sum(dim=1) - 1).clamp_min(0)
                    readouts.append(out[torch.arange(out.shape[0]), last])
        x = torch.cat(readouts, dim=-1)
        return self.out(x + self.proj2(self.dropout(torch.relu(self.proj1(x)))))

    def forward(self, batch: ModalityBatch) -> Tensor:
        """``[B, out_dim]`` from complete inputs (missing ones are used as they are)."""
        return self.forward_projected(
            self.project(batch), {k: batch.padding_mask(k) for k in self.modalities}
        )

    def config_dict(self) -> dict:
        """JSON-ready config."""
        return asdict(self.config)
