"""Wander's fused CP kernel against plain autograd through einsums: forward + backward time.

``wander.functional.fusion_product_stacked`` runs the fusion as one autograd Function with a
hand-written backward. This task times it against the same maths written as three einsums and
an elementwise product (autograd records every step), on the adapter shapes of the benchmarks,
with the current and the initial weights as two parameter sets (the centred init). Both paths
are checked equal first; timings are the median over interleaved rounds, same process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from benchmarks.registry import RunContext, Task, register_task
from benchmarks.training import median_times
from wander.functional import fusion_product_stacked

# (S sets, M modalities, B batch, T tokens, r bottleneck (+1), R_t, T', R_d, D)
SHAPES: dict[str, Any] = {
    "UCI transfer adapter (M=6, T=1, r=7, R=1, D=192)": (2, 6, 25, 1, 7, 1, 1, 1, 192),
    "MOSI adapter (M=3, T=20, r=9, R=2, T'=4, D=16)": (2, 3, 32, 20, 9, 2, 4, 2, 16),
    "wider (M=3, B=64, T=50, r=17, R=4, T'=8, D=64)": (2, 3, 64, 50, 17, 4, 8, 4, 64),
}


def einsum_fusion(h: Tensor, q: Tensor, p: Tensor, w: Tensor) -> Tensor:
    """The same fusion through autograd: ``[S, B, T', D]`` (the path the kernel replaced)."""
    g = torch.einsum("smbti,smjtu->smbjui", h, q)
    z = torch.einsum("smbjui,smkid->smbjkud", g, p)
    first, *rest = z.unbind(1)
    for factor in rest:
        first = first * factor
    return torch.einsum("sbjkud,sjk->sbud", first, w)


def _step(fusion: Callable[..., Tensor], args: list[Tensor]) -> None:
    """One forward and backward of ``fusion`` on ``args`` (h, q, p, w)."""
    fusion(*args).square().sum().backward()


def run(ctx: RunContext) -> list[dict]:
    """Forward + backward time of both paths on each shape."""
    g = torch.Generator().manual_seed(ctx.seed)
    records = []
    for name, (s, m, b, t, r, rt, t_out, rd, d) in SHAPES.items():
        ctx.progress(name)
        shapes = [(s, m, b, t, r), (s, m, rt, t, t_out), (s, m, rd, r, d), (s, rt, rd)]
        args = [torch.randn(*shape, generator=g).requires_grad_() for shape in shapes]
        exact = [a.detach().double() for a in args]  # float32 sums of this size round apart
        h, q, p, w = exact
        torch.testing.assert_close(fusion_product_stacked(h, q, p, w), einsum_fusion(h, q, p, w))

        times = median_times(
            {
                "autograd einsums": functools.partial(_step, einsum_fusion, args),
                "fused kernel": functools.partial(_step, fusion_product_stacked, args),
            },
            rounds=5 if ctx.profile == "quick" else 15,
            calls=40,
        )
        for method, seconds in times.items():
            records.append(
                {
                    "method": method,
                    "dataset": name,
                    "metrics": {
                        "us_per_forward_backward": 1e6 * seconds,
                        "speedup_vs_autograd_einsums": times["autograd einsums"] / seconds,
                    },
                    "config": {"shape": [s, m, b, t, r, rt, t_out, rd, d]},
                }
            )
    return records


register_task(
    Task(
        name="wander-fusion-speed",
        description=(
            "Wander's fused CP kernel (hand-written backward) vs. the same fusion through "
            "autograd einsums: forward + backward time on the benchmarks' adapter shapes, two "
            "parameter sets (centred init), median over interleaved rounds."
        ),
        run=run,
        primary_metric="speedup_vs_autograd_einsums",
        metrics=("us_per_forward_backward", "speedup_vs_autograd_einsums"),
    )
)
