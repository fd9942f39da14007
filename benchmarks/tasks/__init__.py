"""Benchmark tasks; importing this package registers them in :data:`benchmarks.registry.TASKS`."""

from benchmarks.tasks import uci_modalities, wander_transfer

__all__ = ["uci_modalities", "wander_transfer"]
