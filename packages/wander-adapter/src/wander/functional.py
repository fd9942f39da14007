"""The maths of Wander's fusion as pure functions: a fast batched path and a slow dense reference.

Notation (per modality ``m``): ``H_m`` ``[B, T_m, r]`` bottleneck features, token factors
``Q_m`` ``[R_t, T_m, T']``, feature factors ``P_m`` ``[R_d, r, D]``, CP weights ``λ``
``[R_t, R_d]``. Each modality is mapped to ``Z_m^{jk} = Q_m^{j ᵀ} H_m P_m^k`` ``[B, T', D]`` and

* ``cp_mode="true"``:      ``F = Σ_{j,k} λ_{jk} ⊙_m Z_m^{jk}``  (rank-one terms summed *after* the
  cross-modal product: a CP decomposition of rank ``R_t · R_d`` of the full token-level weight);
* ``cp_mode="reference"``: ``F = ⊙_m (Σ_j Q_m^j)ᵀ H_m (Σ_k P_m^k)``  (the released code: factors
  summed *before* the product, an effective CP rank of 1).

Elementwise, ``F[u, d] = Σ W[(t_1, i_1), …, (t_M, i_M), (u, d)] Π_m H_m[t_m, i_m]``: a
multilinear map of the outer product ``⊗_m vec(H_m)``. :func:`dense_fusion` builds that full
weight tensor ``W`` with tensorly's ``cp_to_tensor`` and contracts it, for tests on tiny shapes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["dense_fusion", "fusion_product", "fusion_product_sets", "fusion_product_stacked"]


def fusion_product(
    hs: Sequence[Tensor],
    token_factors: Sequence[Tensor],
    feature_factors: Sequence[Tensor],
    weights: Tensor | None,
    cp_mode: Literal["true", "reference"] = "true",
) -> Tensor:
    """Fused tokens ``F`` ``[B, T', D]`` (the fast path: batched matmuls, no loop over samples).

    Args:
        hs: per modality ``[B, T_m, r]`` (padded rows already zeroed).
        token_factors: per modality ``[R_t, T_m, T']``.
        feature_factors: per modality ``[R_d, r, D]``.
        weights: CP weights ``[R_t, R_d]`` (``cp_mode="true"``; ignored for ``"reference"``).
        cp_mode: ``"true"`` or ``"reference"`` (see the module docstring).
    """
    return fusion_product_sets(
        [hs],
        [token_factors],
        [feature_factors],
        [weights] if weights is not None else None,
        cp_mode,
    )[0]


def fusion_product_sets(
    hs: Sequence[Sequence[Tensor]],
    token_factors: Sequence[Sequence[Tensor]],
    feature_factors: Sequence[Sequence[Tensor]],
    weights: Sequence[Tensor] | None,
    cp_mode: Literal["true", "reference"] = "true",
) -> Tensor:
    """:func:`fusion_product` for ``S`` parameter sets at once: ``[S, B, T', D]``.

    Each argument holds one entry per set (e.g. the adapter's current weights and its frozen
    initial copy, whose difference is the centred output): the sets share every kernel call,
    so ``S`` sets cost about the kernel launches of one.
    """
    n_sets = len(hs)
    n_mod = len(hs[0]) if n_sets else 0
    if not (
        n_sets >= 1
        and len(token_factors) == len(feature_factors) == n_sets
        and all(len(x) == n_mod for group in (hs, token_factors, feature_factors) for x in group)
        and n_mod >= 2
    ):
        raise ValueError(
            f"fusion needs >= 2 modalities with one token and one feature factor each; got "
            f"{n_mod} inputs, {[len(q) for q in token_factors]} token and "
            f"{[len(p) for p in feature_factors]} feature factors."
        )
    # one batched call for all sets and modalities: pad the token axis to the longest sequence
    # (the padded rows of H and Q are zero, so they add nothing) and stack on (set, modality)
    t_max = max(x.shape[1] for group in hs for x in group)
    h = torch.stack([_pad_stack(group, t_max) for group in hs])  # [S, M, B, T, r]
    q = torch.stack([_pad_stack(group, t_max) for group in token_factors])  # [S, M, R_t, T, T']
    p = torch.stack([torch.stack(list(group)) for group in feature_factors])  # [S, M, R_d, r, D]
    w = (
        torch.stack(list(weights))
        if weights is not None and all(w is not None for w in weights)
        else None
    )
    return fusion_product_stacked(h, q, p, w, cp_mode)


def fusion_product_stacked(
    h: Tensor,
    q: Tensor,
    p: Tensor,
    weights: Tensor | None,
    cp_mode: Literal["true", "reference"] = "true",
    *,
    trainable_sets: int | None = None,
) -> Tensor:
    """The fusion on inputs already stacked over (set, modality): ``[S, B, T', D]``.

    Args:
        h: ``[S, M, B, T, r]`` bottleneck features (rows past a modality's length zero).
        q: ``[S, M, R_t, T, T']`` token factors (rows past a modality's length zero).
        p: ``[S, M, R_d, r, D]`` feature factors.
        weights: ``[S, R_t, R_d]`` CP weights (``cp_mode="true"``).
        cp_mode: ``"true"`` or ``"reference"``.
        trainable_sets: when given, only the first ``trainable_sets`` sets get gradients; the
            others get zeros, and the backward skips their work. Pass it only when the later
            sets' slices of every input are constants, as for a frozen copy of the weights
            applied to inputs that need no gradient (the adapter's centred init).
    """
    if cp_mode not in ("true", "reference"):
        raise ValueError(f"cp_mode must be 'true' or 'reference', got {cp_mode!r}.")
    if not (
        h.ndim == q.ndim == p.ndim == 5
        and h.shape[:2] == q.shape[:2] == p.shape[:2]
        and h.shape[3] == q.shape[3]
        and h.shape[4] == p.shape[3]
    ):
        raise ValueError(
            "fusion_product_stacked expects h [S, M, B, T, r], q [S, M, R_t, T, T'] and "
            f"p [S, M, R_d, r, D]; got {tuple(h.shape)}, {tuple(q.shape)}, {tuple(p.shape)}."
        )
    if cp_mode == "reference":
        # factors summed before the product: the rank-one case of the same computation
        q, p = q.sum(2, keepdim=True), p.sum(2, keepdim=True)
        weights = h.new_ones(h.shape[0], 1, 1)
    elif weights is None:
        raise ValueError("cp_mode='true' needs the CP weights [R_t, R_d].")
    elif weights.shape != (h.shape[0], q.shape[2], p.shape[2]):
        raise ValueError(
            f"fusion_product_stacked expects weights [S, R_t, R_d] = "
            f"{[h.shape[0], q.shape[2], p.shape[2]]}; got {list(weights.shape)}."
        )
    # one dtype throughout, autocast off: under AMP the bottleneck features arrive in half
    # precision and the factors in float32; the product over modalities runs in float32 then
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in (h, q, p, weights)))
    n_sets = h.shape[0]
    if trainable_sets is not None and not 1 <= trainable_sets <= n_sets:
        raise ValueError(f"trainable_sets must be in [1, {n_sets}], got {trainable_sets}.")
    with _autocast_off(h.device.type):
        return _CPFusion.apply(
            h.to(dtype), q.to(dtype), p.to(dtype), weights.to(dtype), trainable_sets or n_sets
        )


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not support: it cannot be on there
        return contextlib.nullcontext()


#: the most values of the per-modality projections (every set's) that the forward pass saves
#: for the backward; above, the backward recomputes them (1 MiB of float32 at 2^18)
_SAVED_PROJECTIONS_MAX = 1 << 18


def recompute_projections(z: Tensor) -> bool:
    """Whether a backward recomputes the projections ``z`` rather than the forward saving them."""
    return z.numel() > _SAVED_PROJECTIONS_MAX


class _CPFusion(torch.autograd.Function):
    """``F = Σ_{jk} λ_jk ⊙_m Q_m^{jᵀ} H_m P_m^k`` with a hand-written backward.

    Autograd through einsums and an ``M``-step product recorded ~10 nodes per modality; on the
    small shapes of an adapter their launch overhead cost more than the arithmetic. Here the
    forward is 2 batched matmuls (token axis first, on the narrow ``H``), one ``prod`` and one
    weighted sum; the backward takes each modality's share of the product from prefix and
    suffix products (exact with zeros, no division) and runs 4 batched matmuls.
    Second derivatives (``create_graph=True``, e.g. a gradient penalty) recompute the forward
    from the inputs inside the backward, so the backward's own graph reaches them.
    ``gradcheck`` and ``gradgradcheck`` test both against finite differences.
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, q: Tensor, p: Tensor, w: Tensor, trainable: int) -> Tensor:
        h_t, q_flat, p_flat, g, z, prod, out = _fusion_parts(h, q, p, w)
        # the backward needs the trainable sets' slices only (views, no copies); the
        # intermediates flattened over (set, modality) hold them in their first n rows. The
        # inputs are saved whole: sliced in the backward, they keep their graph for
        # second derivatives. The per-modality projections z [.., B, R_d, D] and their
        # product are M + 1 times the output's size, the largest activations by far (every
        # set's storage behind a slice): above _SAVED_PROJECTIONS_MAX values, the backward
        # recomputes them from g (one batched matmul and M - 1 multiplies) instead; below,
        # those few kernel calls would cost more than the memory is worth
        k, n = trainable, trainable * h.shape[1]
        saved = [h, q, p, w, h_t[:n], q_flat[:n], p_flat[:n], g[:n]]
        ctx.recompute = recompute_projections(z)
        ctx.save_for_backward(*saved, *(() if ctx.recompute else (z[:k], prod[:k])))
        ctx.trainable = trainable
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        h, q, p, w, *parts = ctx.saved_tensors
        n_sets, k = h.shape[0], ctx.trainable
        h, q, p, w = h[:k], q[:k], p[:k], w[:k]
        if torch.is_grad_enabled():  # create_graph: intermediates with a graph to the inputs
            parts = _fusion_parts(h, q, p, w)[:-1]
        elif ctx.recompute:
            parts = [*parts, *_projections(parts[3], parts[2], h.shape, q.shape, p.shape)]
        needs = tuple(ctx.needs_input_grad[:4])
        grads = fusion_input_grads(needs, grad_out[:k], h.shape, q, p, w, parts)
        if k < n_sets:  # the constant sets get zeros: one fill per input
            grads = [
                None if x is None else torch.cat([x, x.new_zeros(n_sets - k, *x.shape[1:])])
                for x in grads
            ]
        return *grads, None


def fusion_input_grads(
    needs: Sequence[bool],
    grad_out: Tensor,
    h_shape: torch.Size,
    q: Tensor,
    p: Tensor,
    w: Tensor,
    parts: Sequence[Tensor],
) -> list[Tensor | None]:
    """Gradients of ``h, q, p, w`` (those ``needs`` asks for) from the forward's ``parts``.

    For the sets that ``grad_out`` ``[S, B, T', D]``, ``q``, ``p``, ``w`` and the intermediates
    ``parts`` (``h_t, q_flat, p_flat, g, z, prod`` of :func:`_fusion_parts`) hold;
    ``h_shape`` is ``h``'s shape for those sets.
    """
    h_t, q_flat, p_flat, g, z, prod = parts
    s, m, b, t, r = h_shape
    rt, t_out, rd, d = q.shape[2], q.shape[4], p.shape[2], p.shape[4]
    n, a, kd = s * m, rt * t_out, rd * d
    grad = grad_out.to(z.dtype).transpose(1, 2).reshape(s, 1, t_out, b, 1, d)
    grad_w = (grad * prod).sum(dim=(2, 3, 5)) if needs[3] else None
    grad_prod = grad * w.view(s, rt, 1, 1, rd, 1)  # [S, R_t, T', B, R_d, D]
    grad_z = torch.stack(_products_of_the_others(z.unbind(1), grad_prod), dim=1)
    grad_z = grad_z.view(n, a * b, kd)
    grad_p = grad_q = grad_h = None
    if needs[2]:
        dp = torch.bmm(g.transpose(1, 2), grad_z)  # [N, r, (k d)]
        grad_p = dp.view(s, m, r, rd, d).transpose(2, 3)
    if needs[0] or needs[1]:
        grad_g = torch.bmm(grad_z, p_flat.transpose(1, 2)).view(n, a, b * r)
        if needs[1]:
            dq = torch.bmm(grad_g, h_t.transpose(1, 2))  # [N, (j u), T]
            grad_q = dq.view(s, m, rt, t_out, t).transpose(3, 4)
        if needs[0]:
            dh = torch.bmm(q_flat.transpose(1, 2), grad_g)  # [N, T, B r]
            grad_h = dh.view(n, t, b, r).transpose(1, 2).reshape(s, m, b, t, r)
    return [grad_h, grad_q, grad_p, grad_w]


def _fusion_parts(h: Tensor, q: Tensor, p: Tensor, w: Tensor) -> tuple[Tensor, ...]:
    """The forward of :class:`_CPFusion`: its intermediates, then the output ``[S, B, T', D]``."""
    s, m, b, t, r = h.shape
    rt, t_out, rd, d = q.shape[2], q.shape[4], p.shape[2], p.shape[4]
    n = s * m
    h_t = h.reshape(n, b, t, r).transpose(1, 2).reshape(n, t, b * r)  # [N, T, B r]
    q_flat = q.transpose(3, 4).reshape(n, rt * t_out, t)  # [N, (j u), T]
    p_flat = p.permute(0, 1, 3, 2, 4).reshape(n, r, rd * d)  # [N, r, (k d)]
    g = torch.bmm(q_flat, h_t).view(n, rt * t_out * b, r)  # Σ_t Q H: [N, (j u b), r]
    z, prod = _projections(g, p_flat, h.shape, q.shape, p.shape)
    out = (prod * w.view(s, rt, 1, 1, rd, 1)).sum(dim=(1, 4))  # [S, T', B, D]
    return h_t, q_flat, p_flat, g, z, prod, out.transpose(1, 2)


def _projections(
    g: Tensor, p_flat: Tensor, h_shape: torch.Size, q_shape: torch.Size, p_shape: torch.Size
) -> tuple[Tensor, Tensor]:
    """``z = G P`` per (set, modality) and its product over the modalities.

    For the sets ``g`` holds: ``z`` ``[S, M, R_t, T', B, R_d, D]``, the product
    ``[S, R_t, T', B, R_d, D]``.
    """
    m, b = h_shape[1], h_shape[2]
    rt, t_out, rd, d = q_shape[2], q_shape[4], p_shape[2], p_shape[4]
    # the set count spelled out: with an empty batch, -1 would be ambiguous
    z = torch.bmm(g, p_flat).view(g.shape[0] // m, m, rt, t_out, b, rd, d)
    return z, z.prod(dim=1)


def _products_of_the_others(factors: Sequence[Tensor], scale: Tensor) -> list[Tensor]:
    """``scale · Π_{k≠m} factors[k]`` for every ``m``.

    Prefix and suffix products: exact with zeros (no division), ``3M − 4`` multiplies in all.
    """
    m = len(factors)
    prefix = [scale]  # prefix[i] = scale · Π_{k<i} factors[k]
    for factor in factors[:-1]:
        prefix.append(prefix[-1] * factor)
    out, suffix = [prefix[-1]], None  # suffix = Π_{k>i} factors[k]
    for i in range(m - 2, -1, -1):
        suffix = factors[i + 1] if suffix is None else suffix * factors[i + 1]
        out.append(prefix[i] * suffix)
    return out[::-1]


def _stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.stack``, or a free view for a single tensor."""
    return tensors[0].unsqueeze(dim) if len(tensors) == 1 else torch.stack(list(tensors), dim)


def pad_tokens(x: Tensor, length: int, dim: int) -> Tensor:
    """``x`` zero-padded along ``dim`` to ``length`` (itself when it is that long already)."""
    dim %= x.ndim
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:dim], extra, *x.shape[dim + 1 :])], dim=dim)


def _pad_stack(tensors: Sequence[Tensor], t_max: int) -> Tensor:
    """Stack per-modality tensors whose token axis is ``-2``, zero-padded to ``t_max``."""
    return torch.stack([pad_tokens(x, t_max, dim=-2) for x in tensors])


def dense_fusion(
    hs: Sequence[Tensor],
    token_factors: Sequence[Tensor],
    feature_factors: Sequence[Tensor],
    weights: Tensor | None,
    cp_mode: Literal["true", "reference"] = "true",
) -> Tensor:
    """The slow dense reference of :func:`fusion_product` (float64, tiny shapes only).

    Reconstructs the full weight ``W`` of shape ``(T_1 r, …, T_M r, T' D)`` from its CP
    factors with ``tensorly.cp_to_tensor`` and contracts it with every sample's ``vec(H_m)``.
    The work runs in float64 on the CPU; the result comes back on the inputs' device, in their
    dtype.
    """
    import tensorly as tl

    qs = [q.detach().double().cpu().numpy() for q in token_factors]
    ps = [p.detach().double().cpu().numpy() for p in feature_factors]
    if cp_mode == "reference":
        qs = [q.sum(0, keepdims=True) for q in qs]
        ps = [p.sum(0, keepdims=True) for p in ps]
        lam = np.ones((1, 1))
    elif weights is None:
        raise ValueError("cp_mode='true' needs the CP weights [R_t, R_d].")
    else:
        lam = weights.detach().double().cpu().numpy()
    r_t, r_d = lam.shape
    t_out, d_out = qs[0].shape[2], ps[0].shape[2]
    # rank-one terms indexed by (j, k, u, d): modality factor Q[j, t, u] P[k, i, d] on (t, i),
    # output factor the unit vector of (u, d), weight λ[j, k]
    factors = []
    for q, p in zip(qs, ps, strict=True):
        t_m, r = q.shape[1], p.shape[1]
        f = np.einsum("jtu,kid->tijkud", q, p).reshape(t_m * r, r_t * r_d * t_out * d_out)
        factors.append(f)
    eye = np.eye(t_out * d_out).reshape(t_out * d_out, 1, 1, t_out, d_out)
    out_factor = np.broadcast_to(eye, (t_out * d_out, r_t, r_d, t_out, d_out))
    factors.append(out_factor.reshape(t_out * d_out, -1))
    cp_weights = np.broadcast_to(lam[:, :, None, None], (r_t, r_d, t_out, d_out)).reshape(-1)
    w = tl.cp_to_tensor((cp_weights, factors))  # (T_1 r, ..., T_M r, T' D)
    result = []
    for b in range(hs[0].shape[0]):
        acc = w
        for h in hs:
            acc = np.tensordot(h[b].detach().double().cpu().numpy().reshape(-1), acc, axes=(0, 0))
        result.append(acc.reshape(t_out, d_out))
    return torch.from_numpy(np.stack(result)).to(device=hs[0].device, dtype=hs[0].dtype)
