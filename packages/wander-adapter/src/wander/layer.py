"""``WanderFusion``: the module that owns Wander's parameters and computes its output."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcore import check_module_names
from wander.config import WanderConfig
from wander.functional import _stack, fusion_product_stacked, pad_tokens
from wander.fused import PARAMETERS as _FUSED
from wander.fused import bottleneck_fusion

__all__ = ["WanderFusion"]

# E[gelu(z)^2] for z ~ N(0, 1): the second moment of a bottleneck feature at init
_GELU_SECOND_MOMENT = 0.4252
#: the parameters held per modality (stacked into one ``[M, ...]`` tensor where shapes agree)
_KINDS = (
    "down_weight",
    "down_bias",
    "token_factors",
    "feature_factors",
    "up_tokens",
    "up_features",
)


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
        config: ranks, modes and init (see :class:`~wander.config.WanderConfig`; its
            ``stack_parameters`` chooses the parameter layout).

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
        n_mod = len(self.modalities)
        # modalities of one hidden size (as in a transformer) share every bottleneck kernel call
        self.stack_modalities = len(set(self.hidden_dims.values())) == 1
        if config.stack_parameters and self.stack_modalities:
            d_in = self.hidden_dims[self.modalities[0]]
            self.down_weight = nn.Parameter(torch.empty(n_mod, r, d_in))
            self.down_bias = nn.Parameter(torch.empty(n_mod, r))
            # the draws of nn.Linear's construction, as the per-modality layout makes them:
            # both layouts use the same random numbers, so they initialise alike
            with torch.no_grad():
                for w, b in zip(self.down_weight, self.down_bias, strict=True):
                    _linear_init_(w, b)
        else:
            self.down = nn.ModuleDict({m: nn.Linear(hidden_dims[m], r) for m in self.modalities})
        self.token_factors = self._per_modality(lambda m: (rt, self.seq_lens[m], t_out))
        self.feature_factors = self._per_modality(lambda m: (rd, r_in, out_dim))
        self.cp_weights = nn.Parameter(torch.empty(rt, rd)) if config.cp_mode == "true" else None
        self.gate = nn.Parameter(torch.zeros(out_dim)) if config.init == "gate" else None
        self.residual = config.output == "residual"
        if self.residual:
            self.up_tokens = self._per_modality(lambda m: (self.seq_lens[m], t_out))
            self.up_features = self._per_modality(lambda m: (out_dim, hidden_dims[m]))
        self.output_dropout = nn.Dropout(config.dropout)
        #: the kinds of per-modality parameter held as one ``[M, ...]`` tensor
        self.stacked_kinds = tuple(
            kind for kind in _KINDS if isinstance(self._parameters.get(kind), nn.Parameter)
        )
        #: whether calls without padding or missing samples run the bottleneck and the fusion
        #: as one autograd node (:mod:`wander.fused`; this layout, ``cp_mode="true"``). Set it
        #: to ``False`` for the op-by-op path, which computes the same
        self.one_node = set(_FUSED[:4]) <= set(self.stacked_kinds) and config.cp_mode == "true"
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
        params = self._current()
        for i, m in enumerate(self.modalities):
            # views of one modality's slice where the parameters are stacked
            down_weight, down_bias = (
                self._one(params, "down_weight", i),
                self._one(params, "down_bias", i),
            )
            token_factors = self._one(params, "token_factors", i)
            feature_factors = self._one(params, "feature_factors", i)
            d_m, t_m = self.hidden_dims[m], self.seq_lens[m]
            if cfg.init == "reference":
                # the released code: default Linear init, P ~ N(0, 1), Q = 0 (dead, see docs)
                _linear_init_(down_weight, down_bias)
                nn.init.normal_(feature_factors, 0.0, 1.0)
                nn.init.zeros_(token_factors)
            else:
                nn.init.normal_(down_weight, 0.0, 1.0 / math.sqrt(d_m))
                nn.init.zeros_(down_bias)
                t_std = 1.0 / math.sqrt(t_m * t_sum)
                d_std = 1.0 / math.sqrt(r_in * _GELU_SECOND_MOMENT * d_sum)
                if cfg.bias_augment:
                    # Z_m = 1 + ε_m: token factors average the tokens, the constant channel
                    # maps to 1 (divided by the factors summed in "reference" cp_mode)
                    eps = cfg.interaction_init
                    nn.init.normal_(token_factors, 0.0, eps * t_std)
                    token_factors.add_(1.0 / (t_m * t_sum))
                    nn.init.normal_(feature_factors, 0.0, eps * d_std)
                    feature_factors[:, -1].fill_(1.0 / d_sum)
                else:
                    nn.init.normal_(token_factors, 0.0, t_std)
                    nn.init.normal_(feature_factors, 0.0, d_std)
            if self.residual:
                up_tokens, up_features = (
                    self._one(params, "up_tokens", i),
                    self._one(params, "up_features", i),
                )
                nn.init.normal_(up_tokens, 0.0, 1.0 / math.sqrt(cfg.fused_tokens))
                nn.init.normal_(up_features, 0.0, 1.0 / math.sqrt(self.out_dim))
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

    def _per_modality(
        self, shape_of: Callable[[str], tuple[int, ...]]
    ) -> nn.Parameter | nn.ParameterDict:
        """One parameter per modality: a single ``[M, ...]`` one where the shapes agree."""
        shapes = {m: shape_of(m) for m in self.modalities}
        if self.config.stack_parameters and len(set(shapes.values())) == 1:
            return nn.Parameter(torch.empty(len(shapes), *shapes[self.modalities[0]]))
        return nn.ParameterDict(
            {m: nn.Parameter(torch.empty(shape)) for m, shape in shapes.items()}
        )

    def _current(self) -> dict[str, Tensor]:
        """Every parameter by its ``named_parameters`` name, read directly.

        Walking the module tree on each call cost more than the adapter's kernels on small models.
        """
        params: dict[str, Tensor] = {}
        for kind in _KINDS:
            if kind in self.stacked_kinds:
                params[kind] = self._parameters[kind]  # type: ignore[assignment]
            elif kind == "down_weight":  # nn.Linear per modality: its bias too
                for m in self.modalities:
                    down = cast(nn.Linear, self.down[m])
                    params[f"down.{m}.weight"], params[f"down.{m}.bias"] = down.weight, down.bias
            elif kind in self._modules:
                holder = cast(nn.ParameterDict, self._modules[kind])
                params.update({f"{kind}.{m}": holder[m] for m in self.modalities})
        if self.cp_weights is not None:
            params["cp_weights"] = self.cp_weights
        if self.gate is not None:
            params["gate"] = self.gate
        return params

    def _one(self, params: Mapping[str, Tensor], kind: str, i: int) -> Tensor:
        """Modality ``i``'s tensor of ``kind`` in ``params`` (a view where they are stacked)."""
        if kind in self.stacked_kinds:
            return params[kind][i]
        return params[_modality_key(kind, self.modalities[i])]

    def _all(self, params: Mapping[str, Tensor], kind: str) -> Tensor:
        """``[M, ...]``: every modality's tensor of ``kind`` (all of one shape) in ``params``."""
        if kind in self.stacked_kinds:
            return params[kind]
        return torch.stack([params[_modality_key(kind, m)] for m in self.modalities])

    def _token_factors(self, params: Mapping[str, Tensor], t_lens: Sequence[int]) -> Tensor:
        """``[M, R_t, T_max, T']``: the token factors for inputs of lengths ``t_lens``."""
        t_max = max(t_lens)
        if "token_factors" in self.stacked_kinds:
            return _first_tokens(params["token_factors"], t_max)
        return torch.stack(
            [
                pad_tokens(_first_tokens(self._one(params, "token_factors", i), t), t_max, dim=1)
                for i, t in enumerate(t_lens)
            ]
        )

    def _anchors(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The frozen initial copy of each named parameter."""
        return {name: cast(Tensor, self._buffers[_anchor_name(name)]) for name in names}

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        """As ``nn.Module``'s, with a stacked parameter (and its anchor) as one entry per modality.

        The entries are views of the stacked tensor: live, as ``nn.Module.state_dict``'s are.
        """
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for kind in self.stacked_kinds:
            for stacked_name, key in _stacked_names(kind):
                value = destination.pop(prefix + stacked_name, None)
                if value is not None:  # absent: an anchor of an init without one
                    for m, v in zip(self.modalities, value, strict=True):
                        destination[prefix + key(m)] = v

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """As ``nn.Module``'s, reading a stacked parameter from its per-modality entries.

        A modality's missing entry keeps its current value and is reported missing; one of the
        wrong shape is reported as a size mismatch, as ``nn.Module`` reports them.
        """
        for kind in self.stacked_kinds:
            for stacked_name, key in _stacked_names(kind):
                current = self._parameters.get(stacked_name, self._buffers.get(stacked_name))
                if current is None or prefix + stacked_name in state_dict:
                    continue
                parts = []
                for m, now in zip(self.modalities, current.detach(), strict=True):
                    name = prefix + key(m)
                    value = state_dict.pop(name, None)
                    if value is None:
                        missing_keys.append(name)
                    elif value.shape != now.shape:
                        error_msgs.append(
                            f"size mismatch for {name}: copying a param with shape "
                            f"{value.shape} from checkpoint, the shape in current model is "
                            f"{now.shape}."
                        )
                    else:
                        now = value.to(now.device, now.dtype)
                    parts.append(now)
                state_dict[prefix + stacked_name] = torch.stack(parts)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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
            # [M, S, r, D] viewed as [M, S r, D]
            weight = _stack([self._all(p, "down_weight") for p in param_sets], dim=1)
            weight = weight.view(n_mod, n_sets * r, d)
            bias = _stack([self._all(p, "down_bias") for p in param_sets], dim=1)
            bias = bias.view(n_mod, 1, n_sets * r)
            h = torch.baddbmm(bias, x.flatten(1, 2), weight.transpose(1, 2))  # [M, B T, S r]
            h = F.gelu(h).view(n_mod, b, t_max, n_sets, r)
        else:
            parts = []
            for i, x in enumerate(xs):
                if keep is not None:
                    x = x.masked_fill(~keep[i, :, : x.shape[1], None], 0.0)
                if self.config.normalize_inputs:
                    x = F.layer_norm(x, (x.shape[-1],))
                weight = torch.cat([self._one(p, "down_weight", i) for p in param_sets])
                bias = torch.cat([self._one(p, "down_bias", i) for p in param_sets])  # [S r]
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
        first = self._all(param_sets[0], "feature_factors")
        inputs = [self._checked(m, xs[m], first.device).to(first.dtype) for m in self.modalities]
        t_lens = [x.shape[1] for x in inputs]
        absent = _absent(self.modalities, presence or {}, inputs[0].shape[0], first.device)
        # [S, B, T', D]
        fused_sets = self._through_one_node(inputs, masks, absent, param_sets, difference=False)
        if fused_sets is None:
            masks_in_order = [masks.get(m) for m in self.modalities]
            h = self._bottlenecks(inputs, masks_in_order, param_sets, absent)
            # [S, M, R_t, T_max, T']. Rows past a modality's length add nothing: its features
            # are zero there. Held per modality, each factor is cut to its length and zero-padded
            q = _stack([self._token_factors(p, t_lens) for p in param_sets])
            f = _stack([self._all(p, "feature_factors") for p in param_sets])  # [S, M, R_d, r, D]
            weights = (
                _stack([p["cp_weights"] for p in param_sets])
                if self.cp_weights is not None
                else None
            )
            fused_sets = fusion_product_stacked(
                h, q, f, weights, self.config.cp_mode, trainable_sets=trainable_sets
            )
        outs: list[Tensor | dict[str, Tensor]] = []
        for p, fused in zip(param_sets, fused_sets, strict=True):
            if self.gate is not None:
                fused = fused * p["gate"]
            if not self.residual:
                outs.append(fused)
                continue
            outs.append(self._residuals(p, fused, xs, masks, t_lens, absent))
        return outs

    def _residuals(
        self,
        p: Mapping[str, Tensor],
        fused: Tensor,
        xs: Mapping[str, Tensor],
        masks: Mapping[str, Tensor | None],
        t_lens: Sequence[int],
        absent: Tensor | None,
    ) -> dict[str, Tensor]:
        """Each modality's residual ``U_m F V_m`` ``[B, T_m, D_m]`` (zero where padded or absent).

        One batched contraction when the up-projections are stacked and the inputs share a
        length; one per modality otherwise.
        """
        stacked = {"up_tokens", "up_features"} <= set(self.stacked_kinds)
        if stacked and len(set(t_lens)) == 1:
            u = _first_tokens(p["up_tokens"], t_lens[0])  # [M, T, T']
            deltas = torch.einsum("bud,mtu,mde->mbte", fused, u, p["up_features"]).unbind(0)
        else:
            deltas = tuple(
                torch.einsum(
                    "bud,tu,de->bte",
                    fused,
                    self._one(p, "up_tokens", i)[:t],  # [T, T']
                    self._one(p, "up_features", i),
                )
                for i, t in enumerate(t_lens)
            )
        out = {}
        for i, (m, delta) in enumerate(zip(self.modalities, deltas, strict=True)):
            mask = masks.get(m)
            if mask is not None:
                delta = delta.masked_fill(mask.unsqueeze(-1), 0.0)
            if absent is not None:
                delta = delta.masked_fill(absent[i, :, None, None], 0.0)
            out[m] = delta if xs[m].ndim == 3 else delta.squeeze(1)
        return out

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
        fast = self._fast_output(xs, masks, presence or {}, params)
        if fast is not None:
            return self.output_dropout(fast)
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

    def _through_one_node(
        self,
        inputs: Sequence[Tensor],
        masks: Mapping[str, Tensor | None],
        absent: Tensor | None,
        param_sets: list[Mapping[str, Tensor]],
        *,
        difference: bool,
        scale: float = 1.0,
    ) -> Tensor | None:
        """:func:`~wander.fused.bottleneck_fusion` on ``inputs`` ``[B, T, D]`` (one dtype).

        ``param_sets``: the weights, then optionally their anchors. ``None`` where the node does
        not apply: not ``one_node``, padding or missing samples, inputs of different lengths,
        autocast on, or other sets.
        """
        t = inputs[0].shape[1]
        if (
            not self.one_node
            or absent is not None
            or len(param_sets) > 2
            or any(masks.get(m) is not None for m in self.modalities)
            or any(x.shape[1] != t for x in inputs)
            or _autocast_on(inputs[0].device.type)
        ):
            return None
        x = torch.stack(list(inputs))  # [M, B, T, D]
        if self.config.normalize_inputs:
            x = F.layer_norm(x, (x.shape[-1],))
        sets = [
            [_first_tokens(p[k], t) if k == "token_factors" else p[k] for k in _FUSED]
            for p in param_sets
        ]
        return bottleneck_fusion(
            x,
            sets[0],
            sets[1] if len(sets) > 1 else None,
            bias_augment=self.config.bias_augment,
            scale=scale,
            difference=difference,
        )

    def _fast_output(
        self,
        xs: Mapping[str, Tensor],
        masks: Mapping[str, Tensor | None],
        presence: Mapping[str, Tensor | None],
        params: Mapping[str, Tensor],
    ) -> Tensor | None:
        """The whole output through the one node (:meth:`_through_one_node`), where it applies.

        Fused output without a gate, no missing samples; ``None`` otherwise (:meth:`_core` then
        computes the same, through the node for each parameter set where only the output mode
        or the gate kept it from here).
        """
        if (
            not self.one_node
            or self.residual
            or self.gate is not None
            or any(v is not None for v in presence.values())
        ):
            return None
        first = params["feature_factors"]
        inputs = [self._checked(m, xs[m], first.device).to(first.dtype) for m in self.modalities]
        centred = self.config.init == "centered"
        return self._through_one_node(
            inputs,
            masks,
            None,
            [params, self._anchors(_FUSED)] if centred else [params],
            difference=True,
            scale=self.config.output_scale,
        )

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


def _takes_device_type() -> bool:
    """Whether ``torch.is_autocast_enabled`` takes a device type (torch >= 2.4).

    Asked once, at import: under ``torch.compile`` the call with one raises a dynamo error,
    not a ``TypeError``, on older versions.
    """
    try:
        torch.is_autocast_enabled("cpu")  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return False
    return True


_AUTOCAST_TAKES_DEVICE = _takes_device_type()


def _autocast_on(device_type: str) -> bool:
    if _AUTOCAST_TAKES_DEVICE:
        return torch.is_autocast_enabled(device_type)  # type: ignore[call-arg,unused-ignore]
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled()
    return torch.is_autocast_enabled()


def _first_tokens(factor: Tensor, length: int) -> Tensor:
    """``factor[..., :length, :]`` (itself when it is that long: no slice in the graph)."""
    return factor if factor.shape[-2] == length else factor[..., :length, :]


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


def _linear_init_(weight: Tensor, bias: Tensor) -> None:
    """``nn.Linear``'s default initialisation of ``weight`` ``[out, in]`` and ``bias``."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)


def _anchor_name(param_name: str) -> str:
    return "anchor__" + param_name.replace(".", "__")


def _modality_key(kind: str, m: str) -> str:
    """The state-dict name of modality ``m``'s tensor of ``kind``: ``down.m.weight``, ..."""
    if kind in ("down_weight", "down_bias"):
        return f"down.{m}.{kind[5:]}"
    return f"{kind}.{m}"


def _stacked_names(kind: str) -> tuple[tuple[str, Callable[[str], str]], ...]:
    """The stacked parameter of ``kind`` and its anchor, each with its per-modality names."""
    return (
        (kind, lambda m: _modality_key(kind, m)),
        (_anchor_name(kind), lambda m: _anchor_name(_modality_key(kind, m))),
    )


def _apply(
    out: Tensor | dict[str, Tensor], fn: Callable[[Tensor], Tensor]
) -> Tensor | dict[str, Tensor]:
    return {m: fn(v) for m, v in out.items()} if isinstance(out, dict) else fn(out)
