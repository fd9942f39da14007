"""Data choices shared by the tasks: real data under ``--data-root`` when present, else ours."""

from __future__ import annotations

from benchmarks.data.pickles import load_mult_pickle
from benchmarks.data.uci import load_uci_mfeat
from benchmarks.registry import RunContext
from mmcore import ModalityBatch

__all__ = ["real_mult_pickle", "uci_splits"]


def uci_splits(ctx: RunContext) -> dict[str, ModalityBatch]:
    """Mfeat splits from ``--data-root/uci-mfeat`` when present, else the embedded copy."""
    if ctx.data_root is not None and (ctx.data_root / "uci-mfeat" / "mfeat.npz").is_file():
        return load_uci_mfeat(ctx.data_root / "uci-mfeat")
    return load_uci_mfeat()


def real_mult_pickle(
    ctx: RunContext, name: str = "mosi_data.pkl"
) -> dict[str, ModalityBatch] | None:
    """A user's MulT pickle (e.g. ``--data-root/mosi_data.pkl``), or ``None`` without one."""
    if ctx.data_root is None or not (ctx.data_root / name).is_file():
        return None
    return load_mult_pickle(ctx.data_root / name)
