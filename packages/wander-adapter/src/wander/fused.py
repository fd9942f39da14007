"""The adapter's whole forward for stacked parameters as one autograd Function.

:class:`~wander.layer.WanderFusion` computes, per modality, ``H_m = GELU(X_m A_mᵀ + a_m)``
(with a constant channel appended under ``bias_augment``), then the CP fusion of
:func:`wander.functional.fusion_product_stacked`, then (centred init) the difference from the
same computation at the frozen initial weights. Recorded by autograd that is about 20 graph
nodes (stacks of the parameters with their anchors, the bottleneck's linear map, GELU, the
constant channel, the fusion, the difference) whose fixed cost, on an adapter's small shapes,
exceeds their arithmetic. :func:`bottleneck_fusion` runs the same kernels as one node with a
hand-written backward that computes the trainable weights' gradients only (the anchors are
constants) and goes back through the bottleneck to the inputs where they need a gradient.

It serves the common case: every modality's parameters stacked (one hidden size and one
length), no padding or missing samples, ``cp_mode="true"``, no gate. The layer takes its
general path otherwise; tests check that both give the same outputs and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from wander.functional import (
    _fusion_parts,
    _projections,
    _stack,
    fusion_input_grads,
    fusion_product_stacked,
    recompute_projections,
)

__all__ = ["bottleneck_fusion", "bottleneck_fusion_reference"]

#: the adapter's per-modality parameters, in the order both functions take them
PARAMETERS = ("down_weight", "down_bias", "token_factors", "feature_factors", "cp_weights")


def bottleneck_fusion(
    x: Tensor,
    params: Sequence[Tensor],
    anchors: Sequence[Tensor] | None = None,
    *,
    bias_augment: bool = True,
    scale: float = 1.0,
    difference: bool = True,
) -> Tensor:
    """The adapter's output ``[B, T', D]`` as one autograd node.

    ``scale · (F(x; params) − F(x; anchors))``, or ``scale · F(x; params)`` without anchors;
    with ``difference=False``, every set's ``scale · F`` ``[S, B, T', D]`` (``S = 2`` with
    anchors, 1 without), for a caller that maps each set further (the residual output).

    Args:
        x: ``[M, B, T, D_in]`` the (normalised) inputs of every modality.
        params: in :data:`PARAMETERS` order, ``down_weight`` ``[M, r, D_in]``, ``down_bias``
            ``[M, r]``, ``token_factors`` ``[M, R_t, T, T']``, ``feature_factors``
            ``[M, R_d, r(+1), D]`` (``+1``: the constant channel of ``bias_augment``) and
            ``cp_weights`` ``[R_t, R_d]``.
        anchors: the same five tensors at the frozen initial weights (no gradient), or
            ``None``.
        bias_augment: append the constant channel to each bottleneck.
        scale: the output scale.
        difference: return the difference of the sets (else each set's output).

    The backward returns no gradient for ``anchors``; with ``create_graph=True`` it
    differentiates :func:`bottleneck_fusion_reference` instead, so second derivatives work.
    """
    if len(params) != len(PARAMETERS) or (anchors is not None and len(anchors) != len(params)):
        raise ValueError(f"bottleneck_fusion takes the tensors {PARAMETERS} (and their anchors).")
    weight, token_factors = params[0], params[2]
    if not (
        x.ndim == 4
        and weight.ndim == 3
        and weight.shape[0] == x.shape[0]
        and weight.shape[2] == x.shape[3]
        and token_factors.ndim == 4
        and token_factors.shape[2] == x.shape[2]
    ):
        raise ValueError(
            "bottleneck_fusion expects x [M, B, T, D_in], down_weight [M, r, D_in] and "
            f"token_factors [M, R_t, T, T']; got {tuple(x.shape)}, {tuple(weight.shape)} and "
            f"{tuple(token_factors.shape)}."
        )
    # decided here, not from ctx.needs_input_grad inside forward, which torch.compile cannot
    # trace on torch 2.2
    inputs_need_grad = torch.is_grad_enabled() and x.requires_grad
    return _BottleneckFusion.apply(
        x,
        bias_augment,
        scale,
        difference,
        inputs_need_grad,
        len(anchors or ()),
        *params,
        *anchors or (),
    )


def bottleneck_fusion_reference(
    x: Tensor,
    params: Sequence[Tensor],
    anchors: Sequence[Tensor] | None = None,
    *,
    bias_augment: bool = True,
    scale: float = 1.0,
    difference: bool = True,
) -> Tensor:
    """:func:`bottleneck_fusion` through autograd, op by op (the reference tests compare)."""
    sets = [params, *([anchors] if anchors is not None else [])]
    hs = []
    for weight, bias, *_ in sets:
        h = F.gelu(torch.baddbmm(bias.unsqueeze(1), x.flatten(1, 2), weight.transpose(1, 2)))
        h = h.view(*x.shape[:3], -1)
        if bias_augment:
            h = torch.cat([h, torch.ones_like(h[..., :1])], dim=-1)
        hs.append(h)
    out = fusion_product_stacked(
        torch.stack(hs),
        torch.stack([s[2] for s in sets]),
        torch.stack([s[3] for s in sets]),
        torch.stack([s[4] for s in sets]),
    )
    if not difference:
        return scale * out
    return scale * (out[0] - out[1] if len(sets) > 1 else out[0])


class _BottleneckFusion(torch.autograd.Function):
    """:func:`bottleneck_fusion`: the forward of :func:`bottleneck_fusion_reference` in one node.

    The backward runs the fusion's hand-written backward (:func:`fusion_input_grads`) for the
    trainable set (and the anchors' set when the inputs need a gradient), then GELU's and the
    down-projection's by hand.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        bias_augment: bool,
        scale: float,
        difference: bool,
        inputs_need_grad: bool,
        n_anchors: int,
        *tensors: Tensor,
    ) -> Tensor:
        params, anchors = tensors[:5], tensors[5:]
        sets = [params, anchors] if n_anchors else [params]
        n_sets = len(sets)
        m, b, t, d_in = x.shape
        r = params[0].shape[1]
        # every set's down-projection in one batched call: [M, B T, S r]
        weight = _cat([s[0] for s in sets], dim=1)
        bias = _cat([s[1] for s in sets], dim=1)
        pre = torch.baddbmm(bias.unsqueeze(1), x.reshape(m, b * t, d_in), weight.transpose(1, 2))
        h = F.gelu(pre).view(m, b, t, n_sets, r)
        if bias_augment:
            h = torch.cat([h, h.new_ones(m, b, t, n_sets, 1)], dim=-1)
        h = h.permute(3, 0, 1, 2, 4)  # [S, M, B, T, r(+1)]
        q, p, w = (_stack([s[i] for s in sets]) for i in (2, 3, 4))
        h_t, q_flat, p_flat, g, z, prod, out = _fusion_parts(h, q, p, w)
        result = (out[0] - out[1] if n_sets > 1 else out[0]) if difference else out
        if scale != 1.0:
            result = result * scale
        # the backward needs the trainable set's intermediates, and the anchors' too when the
        # inputs need a gradient (the anchor half depends on them): the first k sets, the
        # first k M rows of the intermediates flattened over (set, modality). z and its
        # product are recomputed in the backward when large, as _CPFusion does
        k = n_sets if inputs_need_grad else 1
        ctx.recompute = recompute_projections(z)
        ctx.save_for_backward(
            x,
            weight if inputs_need_grad else None,  # for the inputs' gradient
            *tensors,
            pre.view(m, b * t, n_sets, r)[:, :, :k],
            h_t[: k * m],
            q_flat[: k * m],
            p_flat[: k * m],
            g[: k * m],
            *(() if ctx.recompute else (z[:k], prod[:k])),
        )
        ctx.bias_augment, ctx.scale, ctx.n_anchors, ctx.k = bias_augment, scale, n_anchors, k
        ctx.difference = difference
        ctx.h_shape = torch.Size((k, m, b, t, h.shape[-1]))
        return result

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        n_tensors = 5 + ctx.n_anchors
        x, weight, *tensors = ctx.saved_tensors[: 2 + n_tensors]
        pre, *parts = ctx.saved_tensors[2 + n_tensors :]
        params, anchors = tensors[:5], tensors[5:]
        if torch.is_grad_enabled():  # create_graph: differentiate the op-by-op computation
            grads = _BottleneckFusion._differentiable_backward(ctx, grad, x, params, anchors)
            return (grads[0], *(None,) * 5, *grads[1:], *(None,) * ctx.n_anchors)
        needs_x, needs = ctx.needs_input_grad[0], ctx.needs_input_grad[6:11]
        k, (_, m, b, t, _) = ctx.k, ctx.h_shape
        r = params[0].shape[1]
        sets = [params, anchors][:k]
        q, p, w = (_stack([s[i] for s in sets]) for i in (2, 3, 4))
        if ctx.recompute:
            parts = [*parts, *_projections(parts[3], parts[2], ctx.h_shape, q.shape, p.shape)]
        grad = grad * ctx.scale
        if not ctx.difference:  # each set's own: those of the first k sets
            grad_out = grad[:k]
        else:
            grad_out = torch.stack([grad, -grad]) if k > 1 else grad.unsqueeze(0)
        grad_h, grad_q, grad_p, grad_w = fusion_input_grads(
            (needs_x or needs[0] or needs[1], needs[2], needs[3], needs[4]),
            grad_out,
            ctx.h_shape,
            q,
            p,
            w,
            parts,
        )
        grad_x = grad_weight = grad_bias = None
        if grad_h is not None:
            # [k, M, B, T, r(+1)] → [M, B T, k r]: the bottleneck channels, set-major per row
            grad_h = grad_h[..., :r].permute(1, 2, 3, 0, 4).reshape(m, b * t, k * r)
            grad_pre = torch.ops.aten.gelu_backward(grad_h, pre.reshape(m, b * t, k * r))
            first = grad_pre[..., :r]  # the trainable set's
            if needs[0]:
                grad_weight = torch.bmm(first.transpose(1, 2), x.reshape(m, b * t, -1))
            if needs[1]:
                grad_bias = first.sum(1)
            if needs_x:
                grad_x = torch.bmm(grad_pre, weight[:, : k * r]).view(x.shape)
        param_grads = [
            grad_weight,
            grad_bias,
            *(None if gr is None else gr[0] for gr in (grad_q, grad_p, grad_w)),
        ]
        return (grad_x, *(None,) * 5, *param_grads, *(None,) * ctx.n_anchors)

    @staticmethod
    def _differentiable_backward(
        ctx: Any, grad: Tensor, x: Tensor, params: Sequence[Tensor], anchors: Sequence[Tensor]
    ) -> list[Tensor | None]:
        """The gradients of ``x`` and ``params`` as functions of them (``create_graph``)."""
        inputs = [x, *params]
        flags = (ctx.needs_input_grad[0], *ctx.needs_input_grad[6:11])
        needed = [i for i, flag in enumerate(flags) if flag]
        with torch.enable_grad():
            out = bottleneck_fusion_reference(
                x,
                params,
                anchors or None,
                bias_augment=ctx.bias_augment,
                scale=ctx.scale,
                difference=ctx.difference,
            )
        found = torch.autograd.grad(
            out, [inputs[i] for i in needed], grad, create_graph=True, allow_unused=True
        )
        grads: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(needed, found, strict=True):
            grads[i] = g
        return grads


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)
