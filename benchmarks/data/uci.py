"""UCI Multiple Features (mfeat): six real modalities of 2,000 handwritten digits.

The data ship with the repository (``shared/uci-mfeat/mfeat.npz``, CC BY 4.0). Splits are fixed
and stratified (split seed 0, independent of the training seed); features are standardised with
statistics fitted on the training split only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from mmcore import ModalityBatch

__all__ = ["UCI_MODALITIES", "default_uci_path", "load_uci_mfeat"]

#: The six views, in the order of the data card.
UCI_MODALITIES = ("fou", "fac", "kar", "pix", "zer", "mor")
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_uci_path() -> Path:
    """``shared/uci-mfeat/mfeat.npz`` of this repository."""
    return _REPO_ROOT / "shared" / "uci-mfeat" / "mfeat.npz"


def load_uci_mfeat(
    path: str | os.PathLike | None = None,
    *,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
    modalities: tuple[str, ...] = UCI_MODALITIES,
    standardize: bool = True,
) -> dict[str, ModalityBatch]:
    """Load mfeat as ``{"train", "valid", "test"}`` → :class:`ModalityBatch` of ``[N, D_m]``.

    Args:
        path: the ``.npz`` file (default: the embedded copy, :func:`default_uci_path`). A folder
            holding ``mfeat.npz`` is accepted too.
        fractions: train/valid/test fractions (stratified by digit).
        split_seed: seed of the split, fixed by default so every run sees the same split.
        modalities: subset of :data:`UCI_MODALITIES` to load.
        standardize: z-score each feature with train-split statistics.

    Returns:
        Splits with float32 vector modalities, ``target`` int64 digit ``[N]``, ``sample_ids`` the
        row numbers of the original files.
    """
    path = Path(path) if path is not None else default_uci_path()
    if path.is_dir():
        path = path / "mfeat.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"UCI mfeat file not found: {path}. Expected the npz shipped in shared/uci-mfeat/."
        )
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}.")
    unknown = [m for m in modalities if m not in UCI_MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"unknown mfeat modalities {unknown}; choose from {UCI_MODALITIES}.")
    with np.load(path) as data:
        missing = [k for k in (*modalities, "labels") if k not in data.files]
        if missing:
            raise KeyError(f"{path}: missing arrays {missing} (found {sorted(data.files)}).")
        labels = data["labels"].astype(np.int64)
        views = {m: data[m].astype(np.float64) for m in modalities}
    for m, x in views.items():
        if x.ndim != 2 or x.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{path}: array '{m}' has shape {x.shape}, expected ({labels.shape[0]}, D)."
            )

    rows = np.arange(labels.shape[0])
    train, rest = train_test_split(
        rows, train_size=fractions[0], stratify=labels, random_state=split_seed
    )
    valid, test = train_test_split(
        rest,
        train_size=fractions[1] / (fractions[1] + fractions[2]),
        stratify=labels[rest],
        random_state=split_seed,
    )
    stats = {}
    for m, x in views.items():
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        stats[m] = (mean, np.where(std > 0, std, 1.0)) if standardize else (0.0, 1.0)

    def batch(idx: np.ndarray) -> ModalityBatch:
        idx = np.sort(idx)
        inputs = {
            m: torch.from_numpy(((x[idx] - stats[m][0]) / stats[m][1]).astype(np.float32))
            for m, x in views.items()
        }
        return ModalityBatch(
            inputs, torch.from_numpy(labels[idx]), sample_ids=[int(i) for i in idx]
        )

    return {"train": batch(train), "valid": batch(valid), "test": batch(test)}
