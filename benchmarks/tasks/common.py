"""Data choices shared by the tasks: real data under ``--data-root`` when present, else ours."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from benchmarks.data.pickles import load_mult_pickle
from benchmarks.data.uci import load_uci_mfeat
from benchmarks.registry import RunContext
from mmcore import ModalityBatch

__all__ = [
    "BRATS_DIR",
    "FOOD101_DIR",
    "MOSI_PICKLE",
    "REAL_DATA",
    "UCI_FILE",
    "count_progress",
    "describe_data_root",
    "real_data",
    "real_mult_pickle",
    "uci_splits",
]

#: the real data sets a ``--data-root`` may hold, as paths under it
UCI_FILE, MOSI_PICKLE = "uci-mfeat/mfeat.npz", "mosi_data.pkl"
FOOD101_DIR, BRATS_DIR = "UPMC-Food101", "BraTS2021"  # Food101 beside encoders/{vit,bert}/

#: each of them → the tasks that read it instead of their own data
REAL_DATA = {
    UCI_FILE: "every UCI mfeat task (else the embedded copy)",
    MOSI_PICKLE: "cggm-mosi-imbalance, mplmm-mosi-missing",
    FOOD101_DIR: "wander-food101-path (with encoders/vit and encoders/bert)",
    BRATS_DIR: "cggm-brats-seg",
}


def real_data(ctx: RunContext, path: str) -> Path | None:
    """``--data-root/path`` when the run has a data root holding it, else ``None``."""
    if ctx.data_root is None or not (ctx.data_root / path).exists():
        return None
    return ctx.data_root / path


def count_progress(ctx: RunContext, what: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that shows ``"<what> done/total"`` on the task's progress."""

    def show(done: int, total: int) -> None:
        ctx.progress(f"{what} {done}/{total}")

    return show


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
    return load_uci_mfeat(real_data(ctx, UCI_FILE))


def real_mult_pickle(ctx: RunContext, name: str = MOSI_PICKLE) -> dict[str, ModalityBatch] | None:
    """A user's MulT pickle (e.g. ``--data-root/mosi_data.pkl``), or ``None`` without one."""
    path = real_data(ctx, name)
    return None if path is None else load_mult_pickle(path)
