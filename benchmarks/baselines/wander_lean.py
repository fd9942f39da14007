"""Wander's forward written by hand for one case: how much of its step time is the wrapper's.

``wander.Wander`` wraps any model through hooks and serves padding, missing samples, any
lengths, dtypes, devices, output modes and ranks, with the checks that takes. On a tiny backbone
the fixed cost of that machinery could be a large part of its step time. :class:`LeanWander`
computes the same forward (centred init, fused output, vector features) for the late-fusion
backbone of ``wander-uci-transfer`` with none of it: each encoder's ``nn.Sequential`` split at
the target layer, the adapter's maths inline (about ten kernel calls for the trainable weights
through autograd, the frozen copy's under ``no_grad``), the fused token tiled onto the fusion
output. What it still costs is the arithmetic of the method itself. A test checks it computes
and trains exactly as ``wander.Wander`` does; ``wander-step-overhead`` times it beside it.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.backbones import LateFusionModel
from mmcore import ModalityBatch
from wander import Wander

__all__ = ["LeanWander"]

#: the adapter's stacked tensors, in the order :func:`_fusion` takes them
_NAMES = ("down_weight", "down_bias", "token_factors", "feature_factors", "cp_weights")


class LeanWander(nn.Module):
    """A :class:`~wander.Wander` model's forward for vector encoders, by hand.

    Takes over ``wander``'s base model (its hooks removed: ``wander.unwrap()``) and its
    adapter's parameters (shared, not copied), so an optimiser over ``lean.parameters()`` that
    require grad trains the same tensors. Handles one case only: a
    :class:`~benchmarks.backbones.LateFusionModel` whose encoders are ``nn.Sequential`` nets
    (``encoders.<m>.net``) targeted at one of their layers, the centred init with input
    normalisation and the constant channel, one fused token (token rank 1), no adapter
    dropout. Set ``centred=False`` to leave out the frozen copy's half (the output is then not
    the base model's at init): what the identity-at-init guarantee costs.
    """

    def __init__(self, wander: Wander, *, centred: bool = True) -> None:
        super().__init__()
        adapter, cfg = wander.adapter, wander.config
        supported = (
            cfg.init == "centered"
            and cfg.output == "fused"
            and cfg.cp_mode == "true"
            and cfg.normalize_inputs
            and cfg.bias_augment
            and cfg.dropout == 0.0
            and cfg.token_rank == 1
            and cfg.fused_tokens == 1
            and set(adapter.stacked_kinds) >= set(_NAMES[:4])
            and all(t == 1 for t in cfg.seq_lens.values())
        )
        if not supported:
            raise ValueError(
                "LeanWander handles the centred, fused-output, normalised, bias-augmented "
                "adapter with one fused token, token rank 1, stacked parameters and vector "
                f"features only; got {cfg}."
            )
        trainable = {id(p) for p in wander.parameters() if p.requires_grad}
        base = cast(LateFusionModel, wander.unwrap())
        for p in base.parameters():  # unwrap restored the flags: freeze as the wrapper did
            p.requires_grad_(id(p) in trainable)
        self.base, self.adapter, self.centred = base, adapter, centred
        self.modalities = tuple(adapter.modalities)
        self.scale = cfg.output_scale
        self.dim = next(iter(cfg.hidden_dims.values()))
        # each encoder's net split after the target layer: (up to it, the rest)
        self.parts: dict[str, tuple[nn.Module, nn.Module]] = {}
        for m in self.modalities:
            prefix = f"encoders.{m}.net."
            path = (cfg.target_modules or {}).get(m, "")
            if not path.startswith(prefix) or not path[len(prefix) :].isdigit():
                raise ValueError(f"LeanWander needs targets '{prefix}<index>', got '{path}'.")
            net = cast(nn.Sequential, base.encoders[m].net)
            cut = int(path[len(prefix) :]) + 1
            self.parts[m] = (net[:cut], net[cut:])

    def _weights(self, anchors: bool) -> list[Tensor]:
        held = self.adapter._buffers if anchors else self.adapter._parameters
        return [cast(Tensor, held[f"anchor__{n}" if anchors else n]) for n in _NAMES]

    def forward(self, batch: ModalityBatch) -> Tensor:
        """The head's output ``[B, C]``, as ``wander(batch)`` computes it."""
        hidden, features = [], {}
        for m in self.modalities:
            before, after = self.parts[m]
            h = before(batch[m])
            hidden.append(h)
            features[m] = after(h)
        fused = self.base.fusion(features, batch)  # [B, F]
        x = F.layer_norm(torch.stack(hidden), (self.dim,))  # [M, B, D_in]
        out = _fusion(x, *self._weights(anchors=False))
        if self.centred:
            with torch.no_grad():
                anchor = _fusion(x, *self._weights(anchors=True))
            out = out - anchor
        out = self.scale * out  # [B, D]
        d, d_fused = fused.shape[-1], out.shape[-1]
        tiled = fused.unflatten(-1, (d // d_fused, d_fused)) + out.unsqueeze(-2)
        return cast(Tensor, self.base.head(tiled.flatten(-2)))


def _fusion(x: Tensor, weight: Tensor, bias: Tensor, q: Tensor, p: Tensor, w: Tensor) -> Tensor:
    """``[B, D]``: the CP fusion of one token per modality, token rank 1.

    ``x`` ``[M, B, D_in]``, ``weight`` ``[M, r, D_in]``, ``bias`` ``[M, r]``, ``q``
    ``[M, 1, 1, 1]``, ``p`` ``[M, R_d, r + 1, D]``, ``w`` ``[1, R_d]``.
    """
    m, b, _ = x.shape
    rd, r1, d = p.shape[1:]
    h = F.gelu(torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)))  # [M, B, r]
    h = torch.cat([h, h.new_ones(m, b, 1)], dim=-1)  # the constant channel
    factors = p[:, 0] if rd == 1 else p.transpose(1, 2).reshape(m, r1, rd * d)
    z = torch.bmm(h, factors) * q.view(m, 1, 1)  # [M, B, R_d D]
    prod = z.prod(dim=0).view(b, rd, d)
    return prod[:, 0] * w.view(()) if rd == 1 else (prod * w.view(1, rd, 1)).sum(dim=1)
