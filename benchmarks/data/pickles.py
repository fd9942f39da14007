"""Loaders for the MulT / CMU pickles and the MMSA pickles.

* MulT (``mosi_data.pkl``, ``mosei_senti_data.pkl``, ``iemocap_data.pkl`` and their
  ``*_noalign.pkl`` variants): ``d[split]`` holds ``text``, ``audio``, ``vision`` ``[N, T, D]``,
  ``labels`` (``[N, 1, 1]`` sentiment, or ``[N, 4, 2]`` IEMOCAP one-hot) and, for MOSI/MOSEI,
  ``id``. Non-finite values (the ``-inf`` in audio) are set to 0. The files carry no lengths, so
  no padding masks are made.
* MMSA (``aligned_50.pkl``, ``unaligned_50.pkl``, CH-SIMS ``unaligned_39.pkl``): ``d[split]``
  holds BERT ``text`` features ``[N, T, 768]``, ``audio``, ``vision``, ``regression_labels``
  ``[N]``, ``id``, optionally ``text_bert`` ``[N, 3, T]`` (its attention mask gives the text
  padding) and ``audio_lengths`` / ``vision_lengths`` (unaligned files; they give padding masks).

Dimensions are always read from the arrays. Pickles are read with an allow-list unpickler that
only rebuilds numpy arrays and plain Python containers, so a file cannot run code on load.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcore import ModalityBatch

__all__ = ["DataFormatError", "load_mmsa_pickle", "load_mult_pickle"]

SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "audio", "vision")

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("_codecs", "encode"),
}


class DataFormatError(ValueError):
    """A data file does not have the layout its format promises; the message says where."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (
            module.startswith(("numpy.dtypes", "numpy.dtype")) and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': only numpy arrays and plain containers "
            "are allowed in data pickles."
        )


def _read(path: str | os.PathLike, fmt: str) -> tuple[Path, dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{fmt} pickle not found: {path}")
    try:
        with path.open("rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise DataFormatError(f"{path}: cannot read it as a {fmt} pickle ({err}).") from err
    if not isinstance(data, dict) or not all(s in data for s in SPLITS):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataFormatError(f"{path}: expected a dict with splits {list(SPLITS)}, found {found}.")
    return path, data


def _get(path: Path, split: str, part: dict, key: str) -> Any:
    if not isinstance(part, dict):
        raise DataFormatError(f"{path}, split '{split}': expected a dict, found {type(part)}.")
    if key not in part:
        raise DataFormatError(
            f"{path}, split '{split}': missing key '{key}' (found {sorted(part)})."
        )
    return part[key]


def _features(path: Path, split: str, key: str, value: Any, n: int | None) -> torch.Tensor:
    x = np.asarray(value)
    if x.ndim != 3 or (n is not None and x.shape[0] != n) or not np.issubdtype(x.dtype, np.number):
        expected = f"({n if n is not None else 'N'}, T, D) numeric"
        raise DataFormatError(
            f"{path}, split '{split}', key '{key}': expected shape {expected}, "
            f"found {x.shape} {x.dtype}."
        )
    x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.from_numpy(x)


def _ids(value: Any, n: int) -> list[str] | None:
    if value is None:
        return None
    ids = []
    for item in np.asarray(value, dtype=object).reshape(n, -1):
        parts = [p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in item]
        ids.append("$_$".join(parts))
    return ids


def load_mult_pickle(path: str | os.PathLike) -> dict[str, ModalityBatch]:
    """Load a MulT / CMU pickle (MOSI, MOSEI, IEMOCAP; aligned or unaligned).

    Returns:
        ``{"train", "valid", "test"}`` → batches with ``text``, ``audio``, ``vision`` sequences.
        Sentiment files give ``target`` float32 ``[N]`` in ``[-3, 3]``; IEMOCAP files give int64
        ``[N, 4]`` binary labels (argmax of the one-hot pairs, emotions in the order neutral,
        happy, sad, angry).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: a split, key or shape is not what the format promises.
    """
    path, data = _read(path, "MulT")
    out = {}
    for split in SPLITS:
        part = data[split]
        labels = np.asarray(_get(path, split, part, "labels"))
        n = labels.shape[0] if labels.ndim else 0
        if labels.ndim == 3 and labels.shape[1:] == (4, 2):
            target = torch.from_numpy(labels.argmax(axis=2).astype(np.int64))
        elif labels.ndim >= 1 and labels.size == n and n > 0:
            target = torch.from_numpy(labels.reshape(n).astype(np.float32))
        else:
            raise DataFormatError(
                f"{path}, split '{split}', key 'labels': expected (N, 1, 1) sentiment or "
                f"(N, 4, 2) IEMOCAP labels, found {labels.shape}."
            )
        inputs = {m: _features(path, split, m, _get(path, split, part, m), n) for m in MODALITIES}
        out[split] = ModalityBatch(inputs, target, sample_ids=_ids(part.get("id"), n))
    return out


def _lengths_mask(path: Path, split: str, key: str, value: Any, n: int, t: int) -> torch.Tensor:
    lengths = np.asarray(value).reshape(-1)
    if lengths.shape != (n,) or (lengths < 0).any() or (lengths > t).any():
        raise DataFormatError(
            f"{path}, split '{split}', key '{key}': expected {n} lengths in [0, {t}], "
            f"found shape {lengths.shape}, range [{lengths.min(initial=0)}, "
            f"{lengths.max(initial=0)}]."
        )
    return torch.arange(t)[None, :] >= torch.from_numpy(lengths.astype(np.int64))[:, None]


def load_mmsa_pickle(path: str | os.PathLike) -> dict[str, ModalityBatch]:
    """Load an MMSA pickle (MOSI / MOSEI ``aligned_50`` / ``unaligned_50``, CH-SIMS).

    Returns:
        ``{"train", "valid", "test"}`` → batches with ``text`` (BERT features), ``audio``,
        ``vision`` sequences, ``target`` float32 ``[N]`` (``regression_labels``: ``[-3, 3]``, or
        ``[-1, 1]`` for CH-SIMS), padding masks from ``text_bert`` and the ``*_lengths`` arrays
        when the file has them, ``sample_ids`` from ``id``. CH-SIMS audio and vision are
        unnormalised in the files and are returned as they are.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: a split, key, shape or length is not what the format promises.
    """
    path, data = _read(path, "MMSA")
    out = {}
    for split in SPLITS:
        part = data[split]
        labels = np.asarray(_get(path, split, part, "regression_labels"), dtype=np.float32)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or labels.size == 0:
            raise DataFormatError(
                f"{path}, split '{split}', key 'regression_labels': expected shape (N,), "
                f"found {labels.shape}."
            )
        n = labels.shape[0]
        inputs = {m: _features(path, split, m, _get(path, split, part, m), n) for m in MODALITIES}
        padding = {}
        if "text_bert" in part:
            bert = np.asarray(part["text_bert"])
            t = inputs["text"].shape[1]
            if bert.shape != (n, 3, t):
                raise DataFormatError(
                    f"{path}, split '{split}', key 'text_bert': expected shape ({n}, 3, {t}) "
                    f"(token ids, attention mask, segment ids), found {bert.shape}."
                )
            padding["text"] = torch.from_numpy(bert[:, 1, :] == 0)
        for m in ("audio", "vision"):
            if f"{m}_lengths" in part:
                padding[m] = _lengths_mask(
                    path, split, f"{m}_lengths", part[f"{m}_lengths"], n, inputs[m].shape[1]
                )
        out[split] = ModalityBatch(
            inputs,
            torch.from_numpy(labels),
            padding_masks=padding,
            sample_ids=_ids(part.get("id"), n),
        )
    return out
