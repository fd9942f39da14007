"""``python -m benchmarks compare RUN_A RUN_B``: the figures two runs share, and which differ.

Records are matched by task, data set, method and seed, and every metric both records hold is
compared, but timings (they move with the machine's load: :func:`is_timing`). The same code on
the same machine gives bitwise equal figures otherwise, so the default tolerance is 0: a
difference then means the computation changed (or the machine's floating-point kernels did).
NaN equals NaN (``results.json`` stores both as null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Comparison", "compare_runs", "format_comparison", "is_timing"]

#: metric names holding any of these are timings or ratios of timings
TIMING_MARKERS = (
    "ms_per_step",
    "overhead_ms",
    "samples_per_s",
    "speedup",
    "step_time",
    "throughput",
    "us_per",
)

Key = tuple[str, str, str, Any]  # task, data set, method, seed


def is_timing(metric: str) -> bool:
    """Whether ``metric`` is a timing (or a ratio of timings), which no two runs share."""
    return any(marker in metric for marker in TIMING_MARKERS)


@dataclass
class Comparison:
    """What :func:`compare_runs` found.

    Attributes:
        compared: task → number of figures both runs hold.
        differing: ``(key, metric, value in A, value in B)`` for each figure that differs.
        only_a / only_b: records (task, data set, method, seed) one run has and the other not.
    """

    compared: dict[str, int] = field(default_factory=dict)
    differing: list[tuple[Key, str, Any, Any]] = field(default_factory=list)
    only_a: list[Key] = field(default_factory=list)
    only_b: list[Key] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """No shared figure differs."""
        return not self.differing


def _index(results: dict) -> dict[Key, dict[str, Any]]:
    return {
        (r["task"], r["dataset"], r["method"], r.get("seed")): r["metrics"]
        for r in results.get("records", [])
    }


def _same(a: Any, b: Any, tolerance: float) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if tolerance == 0:
        return bool(a == b)
    return abs(a - b) <= tolerance


def compare_runs(a: dict, b: dict, tolerance: float = 0.0) -> Comparison:
    """Compare the non-timing figures of two loaded ``results.json`` (absolute ``tolerance``)."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
    index_a, index_b = _index(a), _index(b)
    out = Comparison(
        only_a=sorted(index_a.keys() - index_b.keys(), key=str),
        only_b=sorted(index_b.keys() - index_a.keys(), key=str),
    )
    for key in sorted(index_a.keys() & index_b.keys(), key=str):
        metrics_a, metrics_b = index_a[key], index_b[key]
        for metric in sorted(metrics_a.keys() & metrics_b.keys()):
            if is_timing(metric):
                continue
            out.compared[key[0]] = out.compared.get(key[0], 0) + 1
            if not _same(metrics_a[metric], metrics_b[metric], tolerance):
                out.differing.append((key, metric, metrics_a[metric], metrics_b[metric]))
    return out


def format_comparison(comparison: Comparison, limit: int = 20) -> str:
    """A plain-text summary: per task, figures compared and differing; the first differences."""
    lines = []
    for task, n in comparison.compared.items():
        k = sum(1 for key, *_ in comparison.differing if key[0] == task)
        lines.append(f"{task}: {n} figures compared, {k} differ")
    total = sum(comparison.compared.values())
    lines.append(
        f"in all: {total} figures compared (timings excluded), {len(comparison.differing)} differ"
    )
    for key, metric, va, vb in comparison.differing[:limit]:
        task, dataset, method, seed = key
        lines.append(f"  {task} / {dataset} / {method} / seed {seed}: {metric} {va!r} -> {vb!r}")
    if len(comparison.differing) > limit:
        lines.append(f"  ... and {len(comparison.differing) - limit} more")
    for name, only in (("first", comparison.only_a), ("second", comparison.only_b)):
        if only:
            lines.append(f"{len(only)} records only in the {name} run, e.g. {only[0]}")
    return "\n".join(lines)
