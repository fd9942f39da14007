"""Data choices shared by the tasks: real data under ``--data-root`` when present, else ours."""

from __future__ import annotations

from pathlib import Path

from benchmarks.data.pickles import load_mult_pickle
from benchmarks.data.uci import load_uci_mfeat
from benchmarks.registry import RunContext
from mmcore import ModalityBatch

__all__ = ["REAL_DATA", "describe_data_root", "real_mult_pickle", "uci_splits"]

#: what ``--data-root`` may hold (path under it) → the tasks that read it instead of their own
REAL_DATA = {
    "uci-mfeat/mfeat.npz": "every UCI mfeat task (else the embedded copy)",
    "mosi_data.pkl": "cggm-mosi-imbalance, mplmm-mosi-missing",
    "UPMC-Food101": "wander-food101-path (with encoders/vit and encoders/bert)",
    "BraTS2021": "cggm-brats-seg",
}


def describe_data_root(root: Path) -> str:
    """Which real data sets ``root`` holds, and which tasks fall back to their own data."""
    lines = [f"--data-root {root}:"]
    for path, tasks in REAL_DATA.items():
        found = (root / path).exists()
        use = "used by" if found else "not found; generated or embedded data for"
        lines.append(f"  {path}: {use} {tasks}")
    return "\n".join(lines)


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
