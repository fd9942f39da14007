"""``WanderFusion``: the module that owns Wander's parameters and computes its output."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcore import check_module_names
from wander.config import WanderConfig
from wander.functional import fusion_product_stacked, pad_tokens

__all__ = ["WanderFusion"]

# E[gelu(z)^2] for z ~ N(0, 1): the second moment of a bottleneck feature at init
_GELU_SECOND_MOMENT = 0.4252


class WanderFusion(nn.Module):
    """Token-level low-rank multimodal fusion (Wander) over any number of modalities.

    Per modality ``m``: ``H_m = GELU(norm(X_m) A_m + a_m)`` ``[B, T_m, r]`` (padded rows set to 0),
    then the CP-factorised outer-product fusion of :func:`wander.functional.fusion_product`
    gives ``F`` ``[B, T', D]``. In ``"fused"`` output mode the module returns ``F``; in
    ``"residual"`` mode it returns, per modality, ``U_m F V_m`` ``[B, T_m, D_m]``, a residual of
    the encoder output's own shape.

    Args:
        hidden_dims: modality → feature size ``D_m`` of its sequence.
        seq_lens: modality → maximum sequence length ``T_m`` (vectors: 1). Shorter sequences
            are accepted and treated as right-padded; longer ones raise a ``ValueError``.
        out_dim: ``D``, the feature size of the fused tokens.
        config: ranks, modes and init (see :class:`~wander.config.WanderConfig`).

    Shapes:
        ``forward(xs, padding_masks, presence)`` takes ``xs[m]`` ``[B, T, D_m]`` (or
        ``[B, D_m]``), optional bool ``[B, T]`` masks (``True`` = padding) and optional bool
        ``[B]`` presence masks (``False`` = the sample lacks the modality). Returns
        ``[B, T', D]`` (fused) or a dict of per-modality residuals shaped like ``xs[m]``
        (residual).

    Missing modalities: a sample's missing modality has zero bottleneck features ``H_m`` (its
    filled-in values are never read). With ``bias_augment`` its constant channel stays, so the
    product keeps the other modalities' terms and the missing one contributes only its learned
    constant factor (as TFN treats a missing modality); without it the product, and so the
    adapter's output for that sample, is zero. Its residual (``"residual"`` mode) is zero.
    """

    def __init__(
        self,
        hidden_dims: Mapping[str, int],
        seq_lens: Mapping[str, int],
        out_dim: int,
        config: WanderConfig,
    ) -> None:
        super().__init__()
        if set(hidden_dims) != set(seq_lens):
            raise ValueError(
                f"hidden_dims and seq_lens name different modalities: {sorted(hidden_dims)} vs "
                f"{sorted(seq_lens)}."
            )
        if len(hidden_dims) < 2:
            raise ValueError(f"Wander fuses >= 2 modalities, got {list(hidden_dims)}.")
        check_module_names(hidden_dims, "Wander")
        self.config = config
        self.modalities = tuple(hidden_dims)
        self.hidden_dims = dict(hidden_dims)
        self.seq_lens = {m: int(seq_lens[m]) for m in self.modalities}
        self.out_dim = out_dim
        r, rt, rd, t_out = (
            config.bottleneck_dim,
            config.token_rank,
            config.feature_rank,
            config.fused_tokens,
        )
        r_in = r + int(config.bias_augment)
        self.down = nn.ModuleDict({m: nn.Linear(hidden_dims[m], r) for m in self.modalities})
        self.token_factors = nn.ParameterDict(
            {m: nn.Parameter(torch.empty(rt, self.seq_lens[m], t_out)) for m in self.modalities}
        )
        self.feature_factors = nn.ParameterDict(
            {m: nn.Parameter(torch.empty(rd, r_in, out_dim)) for m in self.modalities}
        )
        self.cp_weights = nn.Parameter(torch.empty(rt, rd)) if config.cp_mode == "true" else None
        self.gate = nn.Parameter(torch.zeros(out_dim)) if config.init == "gate" else None
        self.residual = config.output == "residual"
        if self.residual:
            self.up_tokens = nn.ParameterDict(
                {m: nn.Parameter(torch.empty(self.seq_lens[m], t_out)) for m in self.modalities}
            )
            self.up_features = nn.ParameterDict(
                {m: nn.Parameter(torch.empty(out_dim, hidden_dims[m])) for m in self.modalities}
            )
        self.output_dropout = nn.Dropout(config.dropout)
        # modalities of one hidden size (as in a transformer) share every bottleneck kernel call
        self.stack_modalities = len(set(self.hidden_dims.values())) == 1
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the factors (see ``WanderConfig.init``) and refresh the centering anchor.

        The scales follow tltorch's ``CPTensor.normal_`` rule: each modality's ``Z_m`` has unit
        variance for unit-variance inputs, and the CP weights ``1/√(R_t R_d)`` keep the sum of
        rank-one terms at unit variance, so products over 2–7 modalities neither explode nor
        vanish.
        """
        cfg = self.config
        rt, rd = cfg.token_rank, cfg.feature_rank
        r_in = cfg.bottleneck_dim + int(cfg.bias_augment)
        # "reference" cp_mode sums R factors before use: shrink each by 1/sqrt(R) to compensate
        t_sum = rt if cfg.cp_mode == "reference" else 1
        d_sum = rd if cfg.cp_mode == "reference" else 1
        for m in self.modalities:
            if cfg.init == "reference":
                # the released code: default Linear init, P ~ N(0, 1), Q = 0 (dead, see docs)
                cast(nn.Linear, self.down[m]).reset_parameters()
                nn.init.normal_(self.feature_factors[m], 0.0, 1.0)
                nn.init.zeros_(self.token_factors[m])
            else:
                d_m, t_m = self.hidden_dims[m], self.seq_lens[m]
                down = cast(nn.Linear, self.down[m])
                nn.init.normal_(down.weight, 0.0, 1.0 / math.sqrt(d_m))
                nn.init.zeros_(down.bias)
                t_std = 1.0 / math.sqrt(t_m * t_sum)
                d_std = 1.0 / math.sqrt(r_in * _GELU_SECOND_MOMENT * d_sum)
                if cfg.bias_augment:
                    # Z_m = 1 + ε_m: token factors average the tokens, the constant channel
                    # maps to 1 (divided by the factors summed in "reference" cp_mode)
                    eps = cfg.interaction_init
                    nn.init.normal_(self.token_factors[m], 0.0, eps * t_std)
                    self.token_factors[m].add_(1.0 / (t_m * t_sum))
                    nn.init.normal_(self.feature_factors[m], 0.0, eps * d_std)
                    self.feature_factors[m][:, -1].fill_(1.0 / d_sum)
                else:
                    nn.init.normal_(self.token_factors[m], 0.0, t_std)
                    nn.init.normal_(self.feature_factors[m], 0.0, d_std)
            if self.residual:
                nn.init.normal_(self.up_tokens[m], 0.0, 1.0 / math.sqrt(cfg.fused_tokens))
                nn.init.normal_(self.up_features[m], 0.0, 1.0 / math.sqrt(self.out_dim))
        if self.cp_weights is not None:
            # unit variance for a sum of R_t R_d independent terms; a mean when each term is
            # 1 + ε (bias_augment), so the sum is 1 + ε too
            lam = 1.0 / (rt * rd) if cfg.bias_augment else 1.0 / math.sqrt(rt * rd)
            nn.init.constant_(self.cp_weights, lam)
        if self.gate is not None:
            nn.init.zeros_(self.gate)
        if cfg.init == "centered":
            # a frozen copy of the initial weights: forward() subtracts the adapter's output at
            # these weights, so it starts at exactly 0 with non-zero gradients everywhere
            for name, p in self.named_parameters():
                self.register_buffer(_anchor_name(name), p.detach().clone(), persistent=True)

    def _current(self) -> dict[str, Tensor]:
        """Every parameter by its ``named_parameters`` name, read directly.

        Walking the module tree on each call cost more than the adapter's kernels on small models.
        """
        params: dict[str, Tensor] = {}
        for m in self.modalities:
            down = cast(nn.Linear, self.down[m])
            params[f"down.{m}.weight"], params[f"down.{m}.bias"] = down.weight, down.bias
            params[f"token_factors.{m}"] = self.token_factors[m]
            params[f"feature_factors.{m}"] = self.feature_factors[m]
            if self.residual:
                params[f"up_tokens.{m}"] = self.up_tokens[m]
                params[f"up_features.{m}"] = self.up_features[m]
        if self.cp_weights is not None:
            params["cp_weights"] = self.cp_weights
        if self.gate is not None:
            params["gate"] = self.gate
        return params

    def _anchors(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The frozen initial copy of each named parameter."""
        return {name: cast(Tensor, self._buffers[_anchor_name(name)]) for name in names}

    # ------------------------------------------------------------------ forward
    def _checked(self, m: str, x: Tensor, device: torch.device) -> Tensor:
        """``x`` as ``[B, T, D_m]``, after checking its size, length and device."""
        if x.ndim == 2:
            x = x.unsqueeze(1)
        if x.ndim != 3 or x.shape[-1] != self.hidden_dims[m]:
            raise ValueError(
                f"Wander: modality '{m}' expected [B, T, {self.hidden_dims[m]}] features, "
                f"found shape {tuple(x.shape)}."
            )
        if x.shape[1] > self.seq_lens[m]:
            raise ValueError(
                f"Wander: modality '{m}' has sequence length {x.shape[1]} but the adapter was "
                f"built for at most {self.seq_lens[m]} (token factors are per position); pad or "
                "truncate, or rebuild the adapter with a longer example."
            )
        if x.device != device:
            # typically the base model was moved without its wrapper: the adapter is not one of
            # the base model's submodules, so base_model.to() leaves it where it was
            raise RuntimeError(
                f"Wander: modality '{m}' features are on {x.device} but the adapter is on "
                f"{device}. Move the wrapper (wander.to(device)), not the base model alone; an "
                "adapter added with inject_wander moves with its model."
            )
        return x

    def _bottlenecks(
        self,
        xs: Sequence[Tensor],
        masks: Sequence[Tensor | None],
        param_sets: list[Mapping[str, Tensor]],
        absent: Tensor | None = None,
    ) -> Tensor:
        """``H`` ``[S, M, B, T_max, r(+1)]`` for every parameter set and modality.

        Rows past a modality's length or marked as padding are zero. ``absent`` ``[M, B]``
        (``True`` where a sample lacks the modality) zeroes that sample's features, but for the
        constant channel. One linear call per modality, or a single batched call when the
        modalities share a hidden size.
        """
        t_max = max(x.shape[1] for x in xs)
        n_sets, r = len(param_sets), self.config.bottleneck_dim
        # [M, B, T]: False on padding and past each modality's length. Padded inputs are zeroed
        # before the linear too: padding may hold inf, and inf * 0 in the backward is NaN
        ragged = any(x.shape[1] != t_max for x in xs) or any(mk is not None for mk in masks)
        keep = (
            torch.stack([_keep_rows(x, mk, t_max) for x, mk in zip(xs, masks, strict=True)])
            if ragged
            else None
        )
        if self.stack_modalities:
            x = torch.stack([pad_tokens(x, t_max, dim=1) for x in xs])  # [M, B, T, D]
            if keep is not None:
                x = x.masked_fill(~keep.unsqueeze(-1), 0.0)
            if self.config.normalize_inputs:
                x = F.layer_norm(x, (x.shape[-1],))
            n_mod, b, d = x.shape[0], x.shape[1], x.shape[-1]
            # one stack over (modality, set): [M S, r, D] viewed as [M, S r, D]
            weight = _stack(
                [p[f"down.{m}.weight"] for m in self.modalities for p in param_sets]
            ).view(n_mod, n_sets * r, d)
            bias = _stack([p[f"down.{m}.bias"] for m in self.modalities for p in param_sets]).view(
                n_mod, 1, n_sets * r
            )
            h = torch.baddbmm(bias, x.flatten(1, 2), weight.transpose(1, 2))  # [M, B T, S r]
            h = F.gelu(h).view(n_mod, b, t_max, n_sets, r)
        else:
            parts = []
            for i, (m, x) in enumerate(zip(self.modalities, xs, strict=True)):
                if keep is not None:
                    x = x.masked_fill(~keep[i, :, : x.shape[1], None], 0.0)
                if self.config.normalize_inputs:
                    x = F.layer_norm(x, (x.shape[-1],))
                weight = torch.cat([p[f"down.{m}.weight"] for p in param_sets])  # [S r, D_m]
                bias = torch.cat([p[f"down.{m}.bias"] for p in param_sets])
                part = F.gelu(F.linear(x, weight, bias)).unflatten(-1, (n_sets, r))
                parts.append(pad_tokens(part, t_max, dim=1))
            h = torch.stack(parts)  # [M, B, T, S, r]
        if absent is not None:
            h = h.masked_fill(absent[:, :, None, None, None], 0.0)
        if self.config.bias_augment:
            h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
        if keep is not None:
            h = h.masked_fill(~keep[..., None, None], 0.0)
        return h.permute(3, 0, 1, 2, 4)

    def _core(
        self,
        xs: Mapping[str, Tensor],
        masks: Mapping[str, Tensor | None],
        param_sets: list[Mapping[str, Tensor]],
        trainable_sets: int | None = None,
        presence: Mapping[str, Tensor | None] | None = None,
    ) -> list[Tensor | dict[str, Tensor]]:
        """The adapter as a pure function of its parameters, for each set ``p`` (name → tensor).

        All sets go through the same kernel calls (the centred init evaluates the current and
        the initial weights together). ``trainable_sets``: see
        :func:`~wander.functional.fusion_product_stacked`.
        """
        first = self.feature_factors[self.modalities[0]]
        inputs = [self._checked(m, xs[m], first.device).to(first.dtype) for m in self.modalities]
        t_lens = [x.shape[1] for x in inputs]
        t_max = max(t_lens)
        absent = _absent(self.modalities, presence or {}, inputs[0].shape[0], first.device)
        h = self._bottlenecks(inputs, [masks.get(m) for m in self.modalities], param_sets, absent)
        sets_by_modality = (len(param_sets), len(self.modalities))
        q = _stack(  # [S, M, R_t, T_max, T']: rows past each modality's length zero
            [
                pad_tokens(_first_tokens(p[f"token_factors.{m}"], t), t_max, dim=1)
                for p in param_sets
                for m, t in zip(self.modalities, t_lens, strict=True)
            ]
        ).unflatten(0, sets_by_modality)
        f = _stack(
            [p[f"feature_factors.{m}"] for p in param_sets for m in self.modalities]
        ).unflatten(0, sets_by_modality)
        weights = (
            _stack([p["cp_weights"] for p in param_sets]) if self.cp_weights is not None else None
        )
        fused_sets = fusion_product_stacked(  # [S, B, T', D]
            h, q, f, weights, self.config.cp_mode, trainable_sets=trainable_sets
        )
        outs: list[Tensor | dict[str, Tensor]] = []
        for p, fused in zip(param_sets, fused_sets, strict=True):
            if self.gate is not None:
                fused = fused * p["gate"]
            if not self.residual:
                outs.append(fused)
                continue
            out = {}
            for i, (m, t) in enumerate(zip(self.modalities, t_lens, strict=True)):
                u = p[f"up_tokens.{m}"][:t]  # [T, T']
                delta = torch.einsum("bud,tu,de->bte", fused, u, p[f"up_features.{m}"])
                mask = masks.get(m)
                if mask is not None:
                    delta = delta.masked_fill(mask.unsqueeze(-1), 0.0)
                if absent is not None:
                    delta = delta.masked_fill(absent[i, :, None, None], 0.0)
                out[m] = delta if xs[m].ndim == 3 else delta.squeeze(1)
            outs.append(out)
        return outs

    def forward(
        self,
        xs: Mapping[str, Tensor],
        padding_masks: Mapping[str, Tensor | None] | None = None,
        presence: Mapping[str, Tensor | None] | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """The adapter's output (see the class docstring for shapes)."""
        missing = [m for m in self.modalities if m not in xs]
        if missing:
            raise ValueError(f"Wander: no features for modalities {missing}.")
        masks = dict(padding_masks or {})
        scale = self.config.output_scale
        params = self._current()
        if self.config.init != "centered":
            (out,) = self._core(xs, masks, [params], presence=presence)
            return _apply(out, lambda v: self.output_dropout(scale * v))
        # the initial weights are buffers: the anchor half carries no gradient to any parameter,
        # nor to the inputs when they need none (a frozen backbone), and the fusion's backward
        # then skips it
        inputs_need_grad = torch.is_grad_enabled() and any(
            xs[m].requires_grad for m in self.modalities
        )
        out, anchor = self._core(
            xs,
            masks,
            [params, self._anchors(params)],
            None if inputs_need_grad else 1,
            presence,
        )
        if isinstance(out, dict):
            anchors = cast(dict[str, Tensor], anchor)
            return {m: self.output_dropout(scale * (out[m] - anchors[m])) for m in out}
        return self.output_dropout(scale * (out - cast(Tensor, anchor)))

    def raw_output(
        self,
        xs: Mapping[str, Tensor],
        padding_masks: Mapping[str, Tensor | None] | None = None,
        presence: Mapping[str, Tensor | None] | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """The uncentred, undropped adapter output at the current weights (for diagnostics)."""
        return self._core(xs, dict(padding_masks or {}), [self._current()], presence=presence)[0]

    def extra_repr(self) -> str:
        """Ranks and modes, shown by ``print(module)``."""
        c = self.config
        return (
            f"modalities={list(self.modalities)}, r={c.bottleneck_dim}, R_d={c.feature_rank}, "
            f"R_t={c.token_rank}, T'={c.fused_tokens}, D={self.out_dim}, cp_mode={c.cp_mode}, "
            f"init={c.init}, output={c.output}"
        )


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack``, or a free view for a single tensor."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _first_tokens(factor: Tensor, length: int) -> Tensor:
    """``factor[:, :length]`` (the factor itself when it is that long: no slice in the graph)."""
    return factor if factor.shape[1] == length else factor[:, :length]


def _absent(
    modalities: Sequence[str],
    presence: Mapping[str, Tensor | None],
    batch_size: int,
    device: torch.device,
) -> Tensor | None:
    """``[M, B]`` bool, ``True`` where a sample lacks the modality; ``None`` when none does."""
    if all(presence.get(m) is None for m in modalities):
        return None
    rows = []
    for m in modalities:
        present = presence.get(m)
        if present is None:
            present = torch.ones(batch_size, dtype=torch.bool, device=device)
        elif present.dtype != torch.bool or tuple(present.shape) != (batch_size,):
            raise ValueError(
                f"Wander: the presence mask of modality '{m}' must be bool ({batch_size},), "
                f"found {present.dtype} {tuple(present.shape)}."
            )
        rows.append(~present.to(device))
    return torch.stack(rows)


def _keep_rows(x: Tensor, mask: Tensor | None, t_max: int) -> Tensor:
    """``[B, t_max]`` bool: the real (unpadded) rows of ``x`` ``[B, T, D]``."""
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask is not None:
        keep = ~mask
    return F.pad(keep, (0, t_max - x.shape[1]), value=False)


def _anchor_name(param_name: str) -> str:
    return "anchor__" + param_name.replace(".", "__")


def _apply(
    out: Tensor | dict[str, Tensor], fn: Callable[[Tensor], Tensor]
) -> Tensor | dict[str, Tensor]:
    return {m: fn(v) for m, v in out.items()} if isinstance(out, dict) else fn(out)
