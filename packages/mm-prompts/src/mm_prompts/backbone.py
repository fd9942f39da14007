"""A MulT-style backbone for any number of modalities (Tsai et al., ACL 2019).

Per modality a bias-free 1×1 ``Conv1d`` (computed as a matrix product:
:class:`mmcore.PointwiseConv1d`) projects the input to ``d``. For every ordered pair
(branch ``b``, source ``s``) a cross-modal transformer lets ``b`` attend to ``s``; each branch's
``M − 1`` cross-modal outputs are concatenated on the feature axis (width ``(M − 1) d``) and run
through the branch's self-attention "memory" transformer, whose last position is read out. The
``M`` readouts are concatenated and go through MulT's residual MLP head. Attention is
``nn.MultiheadAttention``'s (fused ``scaled_dot_product_attention`` kernels where no dropout is
drawn); padding masks are respected; there is no causal mask.

The ``M (M − 1)`` cross-modal transformers are stored as one stack, and the ``M`` memory
transformers as another: each parameter is one tensor with a leading axis over the transformers
(the state dict still lists every transformer under its own name, ``cross.text_from_audio.…``,
and loads that layout). When every modality's sequence has the same length (aligned data,
vectors) and the calls are small (``batched="auto"``: at most 2,048 tokens per transformer),
each stack runs as one batched computation, every layer a handful of batched calls; otherwise
the transformers run one after the other on their slices of the stack. Tested equal, values
and gradients, to each other and to transformers of ``nn.MultiheadAttention`` layers.

In training on CPU, dropout masks are drawn four elements per 64-bit draw of torch's generator
(:func:`mmcore.layers.dropout_fast`); torch's ``bernoulli_`` masks took a third of a
training step.
``backbone.fast_dropout = False`` restores them (and the fused kernel's attention dropout).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm_prompts.io import read_pretrained, saved_dtype, write_pretrained
from mmcore import (
    ModalityBatch,
    PointwiseConv1d,
    check_module_names,
    dropout_fast,
    is_compiling,
    require_modality_batch,
    sinusoidal_positions,
)

__all__ = ["MulTBackbone", "MulTConfig", "zero_padding"]


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
        check_module_names(self.input_dims, "MulTConfig")
        bad = {m: v for m, v in self.input_dims.items() if not _positive_int(v)}
        if bad:
            raise ValueError(f"input_dims must be positive integers, got {bad}.")
        for name in ("out_dim", "d", "num_heads", "cross_layers", "memory_layers"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.d % self.num_heads:
            raise ValueError(f"d={self.d} must be divisible by num_heads={self.num_heads}.")
        self.input_dims = {m: int(v) for m, v in self.input_dims.items()}  # JSON-ready


def _positive_int(value: object) -> bool:
    """An integer (Python's or numpy's, not a ``bool``) of at least 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1


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
    """A (cross-)attention transformer of ``nn.MultiheadAttention`` blocks.

    The layout of one member of a :class:`_TransformerStack` (which runs the same maths
    batched); as a module, the reference that tests hold the stack to.
    """

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
        x = x * self.scale + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        if src is None:
            src_padding = x_padding
        else:
            src = src * self.scale + sinusoidal_positions(
                src.shape[1], src.shape[2], src.device, src.dtype
            )
        for block in self.blocks:
            x = block(x, x if src is None else src, src_padding)
        return self.norm(x)


class _TransformerStack(nn.Module):
    """``P`` identically shaped transformers whose parameters are stored stacked, ``[P, ...]``.

    ``stack`` is a :class:`_Transformer` whose every parameter has a leading axis over the
    members (in ``names`` order): :func:`_batched_transformer` runs all members in one set of
    batched calls, and :meth:`run_one` runs one of them. One tensor per parameter name instead
    of one per member: the optimiser, the gradient accumulation and the per-step stacking of
    ``P`` separate modules cost more than the arithmetic on small models. The state dict keeps
    one entry per member (``<name>.blocks.0.attn.in_proj_weight``), as separate modules have.
    """

    def __init__(self, names: Sequence[str], dim: int, heads: int, layers: int, dropout: float):
        super().__init__()
        self.names = tuple(names)
        members = [_Transformer(dim, heads, layers, dropout) for _ in self.names]
        self.stack = members[0]
        for path, _ in list(self.stack.named_parameters()):
            owner, leaf = _owner(self.stack, path)
            value = torch.stack([m.get_parameter(path).detach() for m in members])
            setattr(owner, leaf, nn.Parameter(value))
        self.register_state_dict_post_hook(_unstack_state)
        self.register_load_state_dict_pre_hook(_stack_state)

    def parameters_by_name(self) -> dict[str, Tensor]:
        """Stacked parameters, ``[P, ...]``, by their name inside one transformer."""
        return dict(self.stack.named_parameters())

    def run_all(
        self,
        x: Tensor,
        src: Tensor | None,
        key_padding: Tensor | None,
        *,
        fast_dropout: bool = True,
        last_only: bool = False,
    ) -> Tensor:
        """Every member at once (:func:`_batched_transformer`): ``[P, B, T, d]``.

        ``last_only``: the last unpadded step only, ``[P, B, d]`` (self-attention).
        """
        return _batched_transformer(
            self.stack, self.parameters_by_name(), x, src, key_padding, fast_dropout, last_only
        )

    def run_one(
        self,
        name: str,
        x: Tensor,
        src: Tensor | None,
        key_padding: Tensor | None,
        *,
        fast_dropout: bool = True,
        last_only: bool = False,
    ) -> Tensor:
        """Member ``name`` on ``x`` ``[B, T, d]`` (``src`` ``[B, S, d]``, padding ``[B, S]``).

        ``last_only``: the last unpadded step only, ``[B, d]`` (self-attention).
        """
        i = self.names.index(name)
        params = {k: v[i : i + 1] for k, v in self.parameters_by_name().items()}
        return _batched_transformer(
            self.stack,
            params,
            x.unsqueeze(0),
            None if src is None else src.unsqueeze(0),
            None if key_padding is None else key_padding.unsqueeze(0),
            fast_dropout,
            last_only,
        ).squeeze(0)

    @torch.no_grad()
    def member(self, name: str) -> _Transformer:
        """A standalone :class:`_Transformer` (``nn.MultiheadAttention``), ``name``'s weights."""
        block = cast(_Block, self.stack.blocks[0])
        out = _Transformer(
            block.ln_q.normalized_shape[0],
            block.attn.num_heads,
            len(self.stack.blocks),
            block.attn.dropout,
        )
        out.to(self.stack.norm.weight)  # the stack's device and dtype
        out.load_state_dict(
            {k: v[self.names.index(name)] for k, v in self.parameters_by_name().items()}
        )
        return out.train(self.training)


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding the parameter at dotted ``path``, and its attribute name."""
    owner_path, _, leaf = path.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), leaf


def _unstack_state(
    module: _TransformerStack, state: dict[str, Any], prefix: str, _metadata: Any
) -> None:
    """State-dict post-hook: ``stack.<param>`` ``[P, ...]`` → one ``<name>.<param>`` per member.

    Member by member, as a ``ModuleDict`` of separate transformers lists them.
    """
    stacked = {
        key[len(prefix + "stack.") :]: state.pop(key)
        for key in [k for k in state if k.startswith(prefix + "stack.")]
    }
    for i, name in enumerate(module.names):
        for param, value in stacked.items():
            state[f"{prefix}{name}.{param}"] = value[i]


def _stack_state(
    module: _TransformerStack,
    state: dict[str, Any],
    prefix: str,
    _metadata: Any,
    _strict: bool,
    missing_keys: list[str],
    *_args: Any,
) -> None:
    """Load-state-dict pre-hook: every member's ``<name>.<param>`` → ``stack.<param>``.

    A member missing from ``state`` keeps its current weights and is reported by its own key,
    as with separate modules.
    """
    for param, current in module.parameters_by_name().items():
        keys = [f"{prefix}{name}.{param}" for name in module.names]
        if not any(k in state for k in keys):
            continue  # reported missing by the standard loading, under the stacked name
        values = []
        for i, key in enumerate(keys):
            if key in state:
                values.append(state.pop(key))
            else:
                missing_keys.append(key)
                values.append(current[i].detach())
        given = next(
            state_value
            for key, state_value in zip(keys, values, strict=True)
            if key not in missing_keys
        )
        state[f"{prefix}stack.{param}"] = torch.stack([v.to(given) for v in values])


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm of ``x`` ``[P, B, T, d]`` with per-transformer affine ``[P, d]``."""
    if x.shape[0] == 1:  # one transformer: the fused affine
        return F.layer_norm(x, x.shape[-1:], weight[0], bias[0])
    return F.layer_norm(x, x.shape[-1:]) * weight[:, None, None] + bias[:, None, None]


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x`` ``[P, B, T, i]`` through per-transformer weights ``[P, o, i]``, biases ``[P, o]``."""
    if x.shape[0] == 1:  # one transformer: a plain linear layer
        return F.linear(x, weight[0], bias[0])
    p, b, t, _ = x.shape
    out = torch.baddbmm(bias.unsqueeze(1), x.reshape(p, b * t, x.shape[-1]), weight.transpose(1, 2))
    return out.view(p, b, t, out.shape[-1])  # sizes named: B may be 0


def _batched_transformer(
    template: _Transformer,
    params: Mapping[str, Tensor],
    x: Tensor,
    src: Tensor | None,
    key_padding: Tensor | None,
    fast_dropout: bool = True,
    last_only: bool = False,
) -> Tensor:
    """``P`` transformers shaped like ``template`` at once: ``x`` ``[P, B, T, d]`` → same shape.

    ``src`` ``[P, B, S, d]`` (``None``: self-attention on the current ``x``); ``key_padding``
    ``[P, B, S]``, ``True`` on padding. ``fast_dropout``: :func:`dropout_fast` (else
    ``F.dropout`` and the fused kernel's own dropout).

    ``last_only`` (self-attention only): return the last unpadded step, ``[P, B, d]``, which is
    all MulT reads out of a memory transformer. The last block then computes its query,
    attention output and feed-forward for that one step (its keys and values still come from
    every step): the same values and gradients (tested) for about 1/L less arithmetic in an
    ``L``-layer transformer. With dropout, fewer masks are drawn, so the random stream differs.
    """
    if last_only and src is not None:
        raise ValueError("last_only reads out a self-attention transformer; src must be None.")
    drop = dropout_fast if fast_dropout else F.dropout
    n, b, t, d = x.shape
    x = x * template.scale + sinusoidal_positions(t, d, x.device, x.dtype)
    if src is not None:
        src = src * template.scale + sinusoidal_positions(src.shape[2], d, src.device, src.dtype)
    keep = None if key_padding is None else ~key_padding.reshape(n * b, 1, 1, key_padding.shape[-1])
    training = template.training
    blocks = cast(Sequence[_Block], template.blocks)
    for i, block in enumerate(blocks):
        w = {k[len(f"blocks.{i}.") :]: v for k, v in params.items() if k.startswith(f"blocks.{i}.")}
        heads, dropout = block.attn.num_heads, block.attn.dropout if training else 0.0
        kv = _layer_norm(x if src is None else src, w["ln_kv.weight"], w["ln_kv.bias"])
        if last_only and i == len(blocks) - 1:  # the one query the readout needs
            x = _last_step(x, key_padding).unsqueeze(2)  # [P, B, 1, d]
            t = 1
        q = _layer_norm(x, w["ln_q.weight"], w["ln_q.bias"])
        in_w, in_b = w["attn.in_proj_weight"].split(d, 1), w["attn.in_proj_bias"].split(d, 1)
        q, k, v = (
            _linear(inp, wt, bs).reshape(n * b, inp.shape[2], heads, d // heads).transpose(1, 2)
            for inp, wt, bs in zip((q, kv, kv), in_w, in_b, strict=True)
        )
        attn = _attention(q, k, v, keep, dropout, fast_dropout)
        attn = attn.transpose(1, 2).reshape(n, b, t, d)
        x = x + _linear(attn, w["attn.out_proj.weight"], w["attn.out_proj.bias"])
        h = _linear(
            _layer_norm(x, w["ln_ff.weight"], w["ln_ff.bias"]), w["ff.0.weight"], w["ff.0.bias"]
        )
        relu_dropout, out_dropout = (cast(nn.Dropout, block.ff[j]).p for j in (2, 4))
        h = drop(torch.relu(h), relu_dropout, training)
        h = drop(_linear(h, w["ff.3.weight"], w["ff.3.bias"]), out_dropout, training)
        x = x + h
    out = _layer_norm(x, params["norm.weight"], params["norm.bias"])
    return out.squeeze(2) if last_only else out


def _attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, dropout: float, fast_dropout: bool = True
) -> Tensor:
    """Scaled dot-product attention of ``[N, H, T, d]`` queries on ``[N, H, S, d]`` keys/values.

    ``keep`` ``[N, 1, 1, S]``: ``False`` on padded keys (a row with no key left gives 0, as
    ``F.scaled_dot_product_attention`` does). With dropout on CPU (and ``fast_dropout``) the
    attention weights go through :func:`dropout_fast` (the fused kernel would draw them with
    ``bernoulli_``); otherwise the fused kernel runs.
    """
    fused = dropout == 0.0 or q.device.type != "cpu" or not fast_dropout
    if fused or is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = scores.softmax(dim=-1)
    if keep is not None:  # no key at all: -inf everywhere gives NaN, the fused kernel 0
        weights = weights.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    return dropout_fast(weights, dropout) @ v


def zero_padding(x: Tensor, padding: Tensor | None) -> Tensor:
    """``x`` ``[B, T, D]`` with its padded steps (``padding`` ``[B, T]``, True) set to 0.

    Padding may hold anything (MOSI's audio holds ``-inf``): attention gives a masked key a
    weight of exactly 0, but ``0 · inf`` is NaN, so padded values must be finite before they
    reach a transformer.
    """
    return x if padding is None else x.masked_fill(padding.unsqueeze(-1), 0.0)


def _append_tokens(
    h: Tensor, pad: Tensor | None, extra: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``extra`` ``[..., L, D]`` appended to ``h`` ``[..., T, D]``, never padding."""
    if extra is None:
        return h, pad
    if pad is not None:
        pad = torch.cat([pad, pad.new_zeros(extra.shape[:-1])], dim=-1)
    return torch.cat([h, extra], dim=-2), pad


def _last_step(out: Tensor, pad: Tensor | None) -> Tensor:
    """The last unpadded step of ``out`` ``[..., T, D]`` (``pad`` ``[..., T]``, True = padding)."""
    if pad is None:
        return out[..., -1, :]
    last = ((~pad).sum(dim=-1) - 1).clamp_min(0)  # [...]
    index = last[..., None, None].expand(*last.shape, 1, out.shape[-1])
    return out.gather(-2, index).squeeze(-2)


# above this many tokens per transformer call (B·T) the loop's separate GEMMs beat the batched
# ones on CPU (measured, batched / loop time: 0.45 of a training step at 64 tokens, 0.91 at
# 1,280, 1.04 at 3,200; 1.11 in eval at 3,200)
_BATCHED_MAX_TOKENS = 2048


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
            {k: PointwiseConv1d(dim, d, bias=False) for k, dim in c.input_dims.items()}
        )
        # branch b attends to source s: "b_from_s", in branch order (the order of the
        # batched path's stack)
        pairs = [f"{b}_from_{s}" for b in self.modalities for s in self.modalities if s != b]
        self.cross = _TransformerStack(pairs, d, c.num_heads, c.cross_layers, c.dropout)
        memory_dim = (m - 1) * d  # num_heads divides d (MulTConfig checks), so this too
        self.memory = _TransformerStack(
            self.modalities, memory_dim, c.num_heads, c.memory_layers, c.dropout
        )
        fused = m * memory_dim
        self.proj1, self.proj2 = nn.Linear(fused, fused), nn.Linear(fused, fused)
        self.dropout = nn.Dropout(c.dropout)
        self.out = nn.Linear(fused, c.out_dim)
        # sequences of one length: "auto" batches the transformers while their calls are small
        # (B·T <= _BATCHED_MAX_TOKENS), True always, False never (the per-module loop)
        self.batched: bool | str = "auto"
        # dropout masks drawn four per 64-bit draw on CPU (dropout_fast); False: torch's own
        self.fast_dropout = True
        # the memory transformers' last layer computes the readout step only; False: every
        # step, then the readout taken from the whole output (the same values)
        self.readout_only = True

    def project(self, batch: ModalityBatch) -> dict[str, Tensor]:
        """Input projections: modality → ``[B, T_m, d]``."""
        batch = require_modality_batch(batch, "MulTBackbone")
        missing = [k for k in self.modalities if k not in batch]
        if missing:
            raise ValueError(f"batch lacks modalities {missing} (has {list(batch.modalities)}).")
        for k in self.modalities:
            x, dim = batch[k], self.config.input_dims[k]
            if x.ndim != 3 or x.shape[2] != dim:
                raise ValueError(
                    f"MulTBackbone: modality '{k}' must be [B, T, {dim}] sequences, got "
                    f"{tuple(x.shape)}."
                )
            dtype = self.proj[k].weight.dtype
            if x.dtype != dtype and not _autocasting(x.device.type):
                raise TypeError(
                    f"MulTBackbone: modality '{k}' is {x.dtype} but the model's weights are "
                    f"{dtype}; cast one to the other (batch.to({dtype}) or model.to(...))."
                )
        return {
            k: self.proj[k](
                zero_padding(batch[k], batch.padding_mask(k)).transpose(1, 2)
            ).transpose(1, 2)
            for k in self.modalities
        }

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
        if self.batched not in (True, False, "auto"):
            raise ValueError(f"batched must be True, False or 'auto', got {self.batched!r}.")
        padding = dict(padding or {})
        lengths = {z[m].shape[1] for m in self.modalities}
        tokens = z[self.modalities[0]].shape[0] * max(lengths)
        batched = self.batched is True or (self.batched == "auto" and tokens <= _BATCHED_MAX_TOKENS)
        if batched and len(lengths) == 1:
            return self._forward_batched(z, padding, extra_tokens)
        readouts = []
        for b in self.modalities:
            parts = [
                self.cross.run_one(
                    f"{b}_from_{s}", z[b], z[s], padding.get(s), fast_dropout=self.fast_dropout
                )
                for s in self.modalities
                if s != b
            ]
            h = torch.cat(parts, dim=-1)  # [B, T_b, (M-1) d]
            h, pad = _append_tokens(
                h, padding.get(b), None if extra_tokens is None else extra_tokens[b]
            )
            readouts.append(self._readout(self.memory.run_one, b, h, pad))
        return self._head(torch.cat(readouts, dim=-1))

    def _forward_batched(
        self,
        z: Mapping[str, Tensor],
        padding: Mapping[str, Tensor | None],
        extra_tokens: Mapping[str, Tensor] | None,
    ) -> Tensor:
        """:meth:`forward_projected` with the transformers batched (sequences of one length)."""
        mods, m = self.modalities, len(self.modalities)
        first = z[mods[0]]
        batch, length = first.shape[:2]
        no_pad = torch.zeros(batch, length, dtype=torch.bool, device=first.device)
        pads = [p if (p := padding.get(k)) is not None else no_pad for k in mods]
        padded = any(padding.get(k) is not None for k in mods)
        pairs = [(b, s) for b in range(m) for s in range(m) if s != b]  # the stack's order
        out = self.cross.run_all(
            torch.stack([z[mods[b]] for b, _ in pairs]),
            torch.stack([z[mods[s]] for _, s in pairs]),
            torch.stack([pads[s] for _, s in pairs]) if padded else None,
            fast_dropout=self.fast_dropout,
        )  # [M (M-1), B, T, d]
        h = out.view(m, m - 1, batch, length, out.shape[-1]).permute(0, 2, 3, 1, 4).flatten(3)
        extra = None if extra_tokens is None else torch.stack([extra_tokens[k] for k in mods])
        h, pad = _append_tokens(h, torch.stack(pads) if padded else None, extra)  # [M, B, T', ·]
        readouts = self._readout(self.memory.run_all, None, h, pad)  # [M, B, (M-1) d]
        return self._head(readouts.transpose(0, 1).flatten(1))  # branches in order

    def _readout(
        self, run: Callable[..., Tensor], name: str | None, h: Tensor, pad: Tensor | None
    ) -> Tensor:
        """The memory transformer(s)' last unpadded step: ``run_one`` (``name``) or ``run_all``."""
        args = (h, None, pad) if name is None else (name, h, None, pad)
        if self.readout_only:
            return run(*args, fast_dropout=self.fast_dropout, last_only=True)
        return _last_step(run(*args, fast_dropout=self.fast_dropout), pad)

    def _head(self, x: Tensor) -> Tensor:
        """MulT's residual MLP head on the concatenated readouts ``[B, M (M − 1) d]``."""
        drop = dropout_fast if self.fast_dropout else F.dropout
        h = drop(torch.relu(self.proj1(x)), self.dropout.p, self.training)
        return self.out(x + self.proj2(h))

    def forward(self, batch: ModalityBatch) -> Tensor:
        """``[B, out_dim]`` from complete inputs (missing ones are used as they are)."""
        return self.forward_projected(
            self.project(batch), {k: batch.padding_mask(k) for k in self.modalities}
        )

    def config_dict(self) -> dict[str, Any]:
        """JSON-ready config."""
        return asdict(self.config)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """``config.json`` + ``model.safetensors`` (state dict, never a pickled module).

        The pretraining stage's output: :meth:`from_pretrained` rebuilds it, and ``MPLMM`` wraps
        it for the missing-modality stage.
        """
        write_pretrained(
            directory,
            self.state_dict(),
            {"backbone": self.config_dict()},
            "MulTBackbone.save_pretrained",
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], dtype: torch.dtype | None = None
    ) -> MulTBackbone:
        """Rebuild a backbone saved with :meth:`save_pretrained`, on the CPU.

        A folder ``MPLMM.save_pretrained`` wrote gives the backbone inside that model.
        ``dtype``: the parameters' dtype; ``None`` keeps the one they were saved in.
        """
        config, state = read_pretrained(directory, "MulTBackbone.from_pretrained")
        backbone = cls(MulTConfig(**config["backbone"])).to(
            saved_dtype(state, dtype, "MulTBackbone.from_pretrained")
        )
        if "seq_lens" in config:  # an MPLMM folder: its backbone's entries
            state = {
                k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")
            }
        backbone.load_state_dict(state)
        return backbone


def _autocasting(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (it then casts mixed dtypes)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())
