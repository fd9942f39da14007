"""Benchmark tasks; importing this package registers them in :data:`benchmarks.registry.TASKS`.

The import order is the order tasks run and appear in the report: the shared UCI task first.
"""

from benchmarks.tasks import uci_modalities  # noqa: I001  (order matters)
from benchmarks.tasks import wander_transfer
from benchmarks.tasks import wander_speed
from benchmarks.tasks import wander_overhead
from benchmarks.tasks import wander_shapes
from benchmarks.tasks import cggm_balance
from benchmarks.tasks import cggm_overhead
from benchmarks.tasks import cggm_lambda
from benchmarks.tasks import casp_tta
from benchmarks.tasks import mplmm_missing
from benchmarks.tasks import mplmm_lr

__all__ = [
    "casp_tta",
    "cggm_balance",
    "cggm_lambda",
    "cggm_overhead",
    "mplmm_lr",
    "mplmm_missing",
    "uci_modalities",
    "wander_overhead",
    "wander_shapes",
    "wander_speed",
    "wander_transfer",
]
