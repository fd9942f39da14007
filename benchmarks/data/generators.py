"""Generators that write small files in exactly the MulT and MMSA pickle formats.

The files have the real keys, dtypes, shapes and label ranges (sizes and lengths configurable),
and carry planted, controllable structure (:class:`PlantedStructure`) so that the methods'
effects are measurable:

* each modality ``m`` observes its own latent ``z_m ~ N(0, 1)`` through a noisy per-sample
  reading ``z_m + obs_noise · ν``, spread over its tokens along a fixed random direction, plus
  token-level noise;
* the label is ``Σ_m w_m z_m + interaction · z_a z_b`` (``a``, ``b`` the first two modalities),
  with ``w`` normalised to unit norm and ``w_dominant / w_other = imbalance``: every modality
  holds unique information, the dominant one the most;
* the ``target`` domain applies a fixed per-feature scale/offset drift of strength ``shift`` to
  the features (the label mapping is unchanged): a covariate shift between a source/target pair.

Everything that defines the "world" (directions, drifts, weights) comes from ``world_seed``, so
splits, and the two files of a source/target pair, share it; samples come from ``seed``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmcore import atomic_write

__all__ = [
    "MMSA_SPECS",
    "MULT_SPECS",
    "PlantedStructure",
    "sample_planted",
    "write_mmsa_pickle",
    "write_mult_pickle",
    "write_shift_pair",
]

MODALITIES = ("text", "audio", "vision")


@dataclass(frozen=True)
class DatasetSpec:
    """Real sizes of one data set in one file format."""

    dims: tuple[int, int, int]  # text, audio, vision feature sizes
    aligned_len: int
    unaligned_lens: tuple[int, int, int]
    label: Literal["sentiment", "sims", "iemocap"] = "sentiment"
    has_ids: bool = True


MULT_SPECS = {
    "mosi": DatasetSpec((300, 5, 20), 50, (50, 375, 500)),
    "mosei": DatasetSpec((300, 74, 35), 50, (50, 500, 500)),
    "iemocap": DatasetSpec((300, 74, 35), 20, (20, 400, 500), "iemocap", has_ids=False),
}
MMSA_SPECS = {
    "mosi": DatasetSpec((768, 5, 20), 50, (50, 375, 500)),
    "mosei": DatasetSpec((768, 74, 35), 50, (50, 500, 500)),
    "sims": DatasetSpec((768, 33, 709), 39, (39, 400, 55), "sims"),
}


@dataclass(frozen=True)
class PlantedStructure:
    """Knobs of the structure planted in generated data.

    Attributes:
        interaction: weight of the cross-modal product ``z_a z_b`` in the label (0 = additive).
        imbalance: ``w_dominant / w_other`` (>= 1; 1 = all modalities equally informative).
        dominant: the dominant modality (default: the first).
        shift: strength of the feature drift applied in the ``target`` domain.
        shared: correlation between the modalities' latents (0 = independent, each modality
            carries its own part of the label; towards 1 = redundant, as in real sentiment data
            where every modality reflects the same sentiment, so a missing modality can be
            partly inferred from the others).
        feature_mean: std of a fixed per-feature mean added to every modality's features
            (0 = zero-mean features). Real extracted features (GloVe/BERT, COVAREP, Facet) are
            not zero-mean, so a zero-filled missing modality is out of distribution for them.
        obs_noise: std of each modality's per-sample reading noise of its latent.
        token_noise: std of the per-token feature noise.
        world_seed: seed of the fixed directions, drifts and weights.
    """

    interaction: float = 0.0
    imbalance: float = 1.0
    dominant: str | None = None
    shift: float = 0.0
    shared: float = 0.0
    feature_mean: float = 0.0
    obs_noise: float = 0.3
    token_noise: float = 1.0
    world_seed: int = 1234

    def __post_init__(self) -> None:
        if self.imbalance < 1:
            raise ValueError(
                f"imbalance must be >= 1 (w_dominant / w_other), got {self.imbalance}."
            )
        if not 0.0 <= self.shared < 1.0:
            raise ValueError(f"shared must be in [0, 1), got {self.shared}.")
        for name in ("shift", "feature_mean", "obs_noise", "token_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")

    def label_weights(self, modalities: tuple[str, ...]) -> np.ndarray:
        """Unit-norm weights ``w_m`` of the latents in the label."""
        dominant = self.dominant or modalities[0]
        if dominant not in modalities:
            raise ValueError(f"dominant modality '{dominant}' not in {modalities}.")
        w = np.array([self.imbalance if m == dominant else 1.0 for m in modalities])
        return w / np.linalg.norm(w)


@dataclass
class PlantedSample:
    """Output of :func:`sample_planted`: features ``[N, T_m, D_m]``, latents, raw label."""

    features: dict[str, np.ndarray]
    latents: np.ndarray  # [N, M]
    score: np.ndarray  # [N] raw label before format-specific scaling
    contributions: np.ndarray = field(repr=False)  # [N, M] per-modality label terms


def sample_planted(
    n: int,
    shapes: Mapping[str, tuple[int, int]],
    structure: PlantedStructure,
    *,
    domain: Literal["source", "target"] = "source",
    seed: int = 0,
) -> PlantedSample:
    """Draw ``n`` samples with the planted structure.

    Args:
        n: number of samples.
        shapes: modality → ``(T_m, D_m)``.
        structure: the planted knobs.
        domain: ``"target"`` applies the feature drift of strength ``structure.shift``.
        seed: seed of the samples (the world comes from ``structure.world_seed``).
    """
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target', got {domain!r}.")
    names = tuple(shapes)
    world = np.random.default_rng(structure.world_seed)
    rng = np.random.default_rng(seed)
    weights = structure.label_weights(names)
    z = rng.standard_normal((n, len(names)))
    if structure.shared:  # unit-variance latents with pairwise correlation `shared`
        common = rng.standard_normal((n, 1))
        z = np.sqrt(structure.shared) * common + np.sqrt(1.0 - structure.shared) * z
    contributions = z * weights
    score = contributions.sum(axis=1)
    if len(names) >= 2 and structure.interaction:
        score = score + structure.interaction * z[:, 0] * z[:, 1]
    features = {}
    means = np.random.default_rng(structure.world_seed + 1)  # own stream: the world is unchanged
    for i, m in enumerate(names):
        t, d = shapes[m]
        direction = world.standard_normal(d)
        direction *= np.sqrt(d) / np.linalg.norm(direction)  # unit scale per feature
        envelope = 1.0 + 0.5 * np.sin(np.linspace(0, np.pi * world.uniform(1, 3), t))
        scale = 1.0 + structure.shift * world.uniform(-0.5, 0.5, d)
        offset = structure.shift * world.standard_normal(d)
        reading = z[:, i] + structure.obs_noise * rng.standard_normal(n)
        x = reading[:, None, None] * envelope[None, :, None] * direction[None, None, :]
        x = x + structure.token_noise * rng.standard_normal((n, t, d))
        if structure.feature_mean:
            x = x + structure.feature_mean * means.standard_normal(d)
        if domain == "target":
            x = x * scale + offset
        features[m] = x.astype(np.float32)
    return PlantedSample(features, z, score, contributions)


def _quantise(x: np.ndarray, scale: float, bound: float) -> np.ndarray:
    # "+ 0.0" turns -0.0 into 0.0, as the real files store neutral labels
    return (np.clip(np.round(x * scale * 5) / 5, -bound, bound) + 0.0).astype(np.float32)


def _resolve_shapes(
    spec: DatasetSpec,
    aligned: bool,
    seq_lens: Mapping[str, int] | None,
    dims: Mapping[str, int] | None,
) -> dict[str, tuple[int, int]]:
    lens = (
        dict.fromkeys(MODALITIES, spec.aligned_len)
        if aligned
        else dict(zip(MODALITIES, spec.unaligned_lens, strict=True))
    )
    lens.update(seq_lens or {})
    size = dict(zip(MODALITIES, spec.dims, strict=True))
    size.update(dims or {})
    unknown = set(lens) - set(MODALITIES) | set(size) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modalities {sorted(unknown)}; the formats have {MODALITIES}.")
    if aligned and len({lens[m] for m in MODALITIES}) > 1:
        raise ValueError(f"aligned files need one sequence length for all modalities, got {lens}.")
    return {m: (int(lens[m]), int(size[m])) for m in MODALITIES}


def _split_sizes(n: int | tuple[int, int, int]) -> dict[str, int]:
    sizes = (n, max(n // 4, 2), max(n // 4, 2)) if isinstance(n, int) else tuple(n)
    if len(sizes) != 3 or min(sizes) < 2:
        raise ValueError(f"n must be >= 2 per split (train, valid, test), got {n}.")
    return dict(zip(("train", "valid", "test"), sizes, strict=True))


def _write(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


def write_mult_pickle(
    path: str | os.PathLike,
    dataset: Literal["mosi", "mosei", "iemocap"] = "mosi",
    *,
    aligned: bool = True,
    n: int | tuple[int, int, int] = (64, 16, 16),
    seq_lens: Mapping[str, int] | None = None,
    dims: Mapping[str, int] | None = None,
    structure: PlantedStructure | None = None,
    domain: Literal["source", "target"] = "source",
    seed: int = 0,
) -> Path:
    """Write a MulT / CMU pickle (``{mosi,mosei_senti,iemocap}_data[_noalign].pkl`` layout).

    Layout: ``d[split]`` with ``text``, ``audio``, ``vision`` float32 ``[N, T, D]`` (audio holds
    a few ``-inf``, as the real files do), ``labels`` float32 ``[N, 1, 1]`` in ``[-3, 3]`` (MOSI,
    MOSEI) or ``[N, 4, 2]`` one-hot (IEMOCAP: neutral, happy, sad, angry), and ``id`` (bytes,
    MOSI/MOSEI only). Unaligned files have per-modality lengths and zero right-padding.
    """
    if dataset not in MULT_SPECS:
        raise ValueError(f"unknown MulT data set {dataset!r}; choose from {sorted(MULT_SPECS)}.")
    spec = MULT_SPECS[dataset]
    structure = structure or PlantedStructure()
    shapes = _resolve_shapes(spec, aligned, seq_lens, dims)
    data = {}
    for k, (split, size) in enumerate(_split_sizes(n).items()):
        s = sample_planted(size, shapes, structure, domain=domain, seed=seed * 1000 + k)
        rng = np.random.default_rng(seed * 1000 + k + 500)
        feats = s.features
        if not aligned:
            _zero_pad_tails(feats, rng)
        feats["audio"][rng.random(feats["audio"].shape) < 0.002] = -np.inf
        part = {m: feats[m] for m in MODALITIES}
        if spec.label == "iemocap":
            part["labels"] = _iemocap_labels(s, structure, rng)
        else:
            part["labels"] = _quantise(s.score, 1.5, 3.0).reshape(size, 1, 1)
        if spec.has_ids:
            part["id"] = np.array([f"{split}_video{i // 4}_{i % 4}".encode() for i in range(size)])
        data[split] = part
    return _write(path, data)


def _zero_pad_tails(
    feats: dict[str, np.ndarray], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    lengths = {}
    for m, x in feats.items():
        n, t, _ = x.shape
        lengths[m] = rng.integers(max(1, t // 2), t + 1, size=n)
        x[np.arange(t)[None, :] >= lengths[m][:, None]] = 0.0
    return lengths


def _iemocap_labels(
    s: PlantedSample, structure: PlantedStructure, rng: np.random.Generator
) -> np.ndarray:
    world = np.random.default_rng(structure.world_seed + 1)
    proj = world.standard_normal((s.latents.shape[1], 4))
    logits = s.contributions @ proj * 3
    if structure.interaction:
        logits[:, 0] += structure.interaction * 3 * s.latents[:, 0] * s.latents[:, 1]
    emotion = (logits + 0.3 * rng.gumbel(size=logits.shape)).argmax(axis=1)
    onehot = np.zeros((len(emotion), 4, 2), dtype=np.float32)
    onehot[:, :, 0] = 1.0
    onehot[np.arange(len(emotion)), emotion] = (0.0, 1.0)
    return onehot


def write_mmsa_pickle(
    path: str | os.PathLike,
    dataset: Literal["mosi", "mosei", "sims"] = "mosi",
    *,
    aligned: bool = True,
    n: int | tuple[int, int, int] = (64, 16, 16),
    seq_lens: Mapping[str, int] | None = None,
    dims: Mapping[str, int] | None = None,
    structure: PlantedStructure | None = None,
    domain: Literal["source", "target"] = "source",
    seed: int = 0,
) -> Path:
    """Write an MMSA pickle (``aligned_50.pkl`` / ``unaligned_50.pkl`` / CH-SIMS ``unaligned_39``).

    Layout: ``d[split]`` with ``raw_text``, ``id`` (``"video$_$clip"``), ``text`` float32
    ``[N, T, 768]``, ``text_bert`` float32 ``[N, 3, T]`` (token ids, attention mask, segment ids),
    ``audio``, ``vision``, ``audio_lengths`` / ``vision_lengths`` (unaligned only),
    ``annotations``, ``classification_labels`` and ``regression_labels`` ``[N]`` (``[-3, 3]``,
    CH-SIMS ``[-1, 1]`` plus ``regression_labels_{T,A,V}``). CH-SIMS is only unaligned.
    """
    if dataset not in MMSA_SPECS:
        raise ValueError(f"unknown MMSA data set {dataset!r}; choose from {sorted(MMSA_SPECS)}.")
    if dataset == "sims" and aligned:
        raise ValueError(
            "CH-SIMS is only released unaligned (unaligned_39.pkl); pass aligned=False."
        )
    spec = MMSA_SPECS[dataset]
    structure = structure or PlantedStructure()
    shapes = _resolve_shapes(spec, aligned, seq_lens, dims)
    sims = spec.label == "sims"
    data = {}
    for k, (split, size) in enumerate(_split_sizes(n).items()):
        s = sample_planted(size, shapes, structure, domain=domain, seed=seed * 1000 + k)
        rng = np.random.default_rng(seed * 1000 + k + 500)
        feats = s.features
        t_text = shapes["text"][0]
        text_len = rng.integers(max(1, t_text // 2), t_text + 1, size=size)
        feats["text"][np.arange(t_text)[None, :] >= text_len[:, None]] = 0.0
        lengths = (
            _zero_pad_tails({m: feats[m] for m in ("audio", "vision")}, rng) if not aligned else {}
        )
        mask = (np.arange(t_text)[None, :] < text_len[:, None]).astype(np.float32)
        ids = rng.integers(100, 20000, size=(size, t_text)).astype(np.float32) * mask
        labels = _quantise(s.score, 0.5 if sims else 1.5, 1.0 if sims else 3.0)
        part = {
            "raw_text": [f"synthetic utterance {i}" for i in range(size)],
            "id": [f"{split}video{i // 4}$_${i % 4}" for i in range(size)],
            "text": feats["text"],
            "text_bert": np.stack([ids, mask, np.zeros_like(mask)], axis=1),
            "audio": feats["audio"],
            "vision": feats["vision"],
            "annotations": [
                "Positive" if v > 0 else "Negative" if v < 0 else "Neutral" for v in labels
            ],
            "classification_labels": np.sign(labels).astype(np.float32) + 1,
            "regression_labels": labels,
        }
        for m in ("audio", "vision"):
            if m in lengths:
                part[f"{m}_lengths"] = [int(v) for v in lengths[m]]
        if sims:
            for i, key in enumerate("TAV"):
                part[f"regression_labels_{key}"] = _quantise(
                    s.contributions[:, i] / max(abs(s.contributions[:, i]).max(), 1e-6), 1.0, 1.0
                )
        data[split] = part
    return _write(path, data)


def write_shift_pair(
    folder: str | os.PathLike,
    dataset: str = "mosi",
    *,
    fmt: Literal["mult", "mmsa"] = "mult",
    shift: float = 1.0,
    structure: PlantedStructure | None = None,
    **kwargs: Any,
) -> tuple[Path, Path]:
    """Write a source/target pair with the same feature dimensions and label mapping.

    The target file's features drift by ``shift`` (see :class:`PlantedStructure`). Returns the
    ``(source, target)`` paths, ``folder/source/<file>`` and ``folder/target/<file>``.
    """
    base = structure or PlantedStructure()
    structure = PlantedStructure(**{**base.__dict__, "shift": shift})
    writer: Callable[..., Path] = write_mult_pickle if fmt == "mult" else write_mmsa_pickle
    name = f"{dataset}_data.pkl" if fmt == "mult" else "aligned_50.pkl"
    if fmt == "mmsa" and not kwargs.get("aligned", True):
        name = "unaligned_50.pkl" if dataset != "sims" else "unaligned_39.pkl"
    folder = Path(folder)
    seed = kwargs.pop("seed", 0)
    src = writer(
        folder / "source" / name, dataset, structure=structure, domain="source", seed=seed, **kwargs
    )
    tgt = writer(
        folder / "target" / name,
        dataset,
        structure=structure,
        domain="target",
        seed=seed + 1,
        **kwargs,
    )
    return src, tgt
