"""Benchmark tasks; importing this package registers them in :data:`benchmarks.registry.TASKS`."""

from benchmarks.tasks import cggm_balance, uci_modalities, wander_transfer

__all__ = ["cggm_balance", "uci_modalities", "wander_transfer"]
