"""BraTS 2021 case folders (NIfTI via nibabel and MONAI transforms) and a generator of them.

Layout: ``<root>/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz`` (or uncompressed
``.nii``; hidden folders under ``<root>`` are skipped); ``seg`` holds
{0, 1, 2, 4}: 1 = necrotic / non-enhancing core (NCR), 2 = oedema (ED), 4 = enhancing tumour (ET).

Label traps (ecosystem notes §3.4) are detected, never silently mis-read: BraTS 2023 folders
(``t1n``/``t1c``/``t2w``/``t2f`` files, ET = 3) and MSD Task01 (one 4-D ``imagesTr`` file per
case, 1 = oedema, 2 = non-enhancing, 3 = enhancing) raise an error saying what was found, as
does a BraTS 2021 ``seg`` holding a 3.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.data.pickles import DataFormatError
from mmcore import ModalityBatch

__all__ = ["BRATS_MODALITIES", "find_brats_cases", "load_brats_slices", "write_brats_case"]

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
_BRATS2023 = ("t1n", "t1c", "t2w", "t2f")


def find_brats_cases(root: str | os.PathLike) -> list[Path]:
    """Case folders under ``root`` (sorted), after checking each has the BraTS 2021 files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS root not found: {root}")
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        raise DataFormatError(
            f"{root} looks like MSD Task01 (imagesTr/labelsTr, 4-D images, labels 1 = oedema, "
            "2 = non-enhancing, 3 = enhancing), not BraTS 2021 case folders; convert it first."
        )
    # hidden folders (.ipynb_checkpoints, .cache) are not cases
    cases = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise DataFormatError(f"{root}: no case folders (expected BraTS2021_XXXXX/).")
    for case in cases:
        _case_files(case)
    return cases


def _case_files(case: Path) -> dict[str, Path]:
    files = {}
    for key in (*BRATS_MODALITIES, "seg"):
        path = case / f"{case.name}_{key}.nii.gz"
        if not path.is_file() and (case / path.stem).is_file():
            path = case / path.stem  # an uncompressed copy: .nii
        if not path.is_file():
            if any((case / f"{case.name}-{k}.nii.gz").is_file() for k in _BRATS2023):
                raise DataFormatError(
                    f"{case}: BraTS 2023 file names (t1n/t1c/t2w/t2f, ET = 3), not BraTS 2021 "
                    "(flair/t1/t1ce/t2, ET = 4); rename and relabel, or a {1,2,4} reader reports "
                    "an empty ET."
                )
            raise FileNotFoundError(f"{case}: missing {path.name}.")
        files[key] = path
    return files


def _load_case(case: Path) -> dict[str, np.ndarray]:
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
    )

    keys = (*BRATS_MODALITIES, "seg")
    transform = Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            NormalizeIntensityd(keys=list(BRATS_MODALITIES), nonzero=True, channel_wise=True),
        ]
    )
    data = transform({k: str(v) for k, v in _case_files(case).items()})
    out = {k: np.asarray(data[k])[0] for k in keys}
    shapes = {k: v.shape for k, v in out.items()}
    if len(set(shapes.values())) > 1:
        raise DataFormatError(f"{case}: the volumes differ in shape: {shapes}.")
    found = np.unique(out["seg"])
    if not np.array_equal(found, np.round(found)):
        raise DataFormatError(
            f"{case}: seg holds non-integer values (e.g. {found[found != np.round(found)][0]}); "
            "a label map resampled with interpolation cannot be read; resample it with "
            "nearest-neighbour."
        )
    values = set(found.astype(int).tolist())
    if not values <= {0, 1, 2, 4}:
        raise DataFormatError(
            f"{case}: seg holds labels {sorted(values)}; BraTS 2021 uses {{0, 1, 2, 4}} (ET = 4). "
            "A 3 means BraTS 2023 or MSD labels, which a 2021 reader would mis-read."
        )
    return out


def load_brats_slices(
    cases: list[Path],
    *,
    slices_per_case: int = 4,
    min_tumour_voxels: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> ModalityBatch:
    """Axial 2-D slices with tumour from each case, as a batch.

    Returns modalities ``flair``, ``t1``, ``t1ce``, ``t2`` of shape ``[N, 1, H, W]`` (z-scored on
    the brain, MONAI ``NormalizeIntensityd(nonzero=True)``) and ``target`` ``[N, H, W]`` int64 in
    {0, 1, 2, 3} (ET remapped 4 → 3). The slices with the most tumour are taken, so the
    selection is deterministic. ``progress``, when given, is called with ``(cases read, total)``
    after each case (a real case takes a second or two to decompress).
    """
    images: dict[str, list[torch.Tensor]] = {m: [] for m in BRATS_MODALITIES}
    labels, ids = [], []
    for done, case in enumerate(cases, start=1):
        data = _load_case(case)
        seg = data["seg"]
        tumour = (seg > 0).reshape(-1, seg.shape[-1]).sum(axis=0)  # voxels per axial slice
        order = [
            int(z) for z in np.argsort(-tumour, kind="stable") if tumour[z] >= min_tumour_voxels
        ]
        for z in sorted(order[:slices_per_case]):
            for m in BRATS_MODALITIES:
                images[m].append(torch.from_numpy(data[m][..., z].astype(np.float32))[None])
            labels.append(
                torch.from_numpy(np.where(seg[..., z] == 4, 3, seg[..., z]).astype(np.int64))
            )
            ids.append(f"{case.name}:z{z}")
        if progress is not None:
            progress(done, len(cases))
    if not labels:
        raise DataFormatError("no slice with tumour in the given BraTS cases.")
    return ModalityBatch(
        {m: torch.stack(v) for m, v in images.items()}, torch.stack(labels), sample_ids=ids
    )


def write_brats_case(
    root: str | os.PathLike,
    case_id: int,
    *,
    shape: tuple[int, int, int] = (32, 32, 12),
    seed: int = 0,
    style: str = "brats2021",
    noise: float = 0.6,
) -> Path:
    """Write one synthetic case whose four sequences show the tumour sub-regions differently.

    A spherical tumour: an enhancing rim (ET), a necrotic core inside it (NCR) and oedema around
    it (ED). FLAIR and T2 show oedema bright (FLAIR the clearest), T1ce shows the enhancing rim,
    T1 shows the core dark: each modality carries different information about the regions.
    ``noise`` is the std of the voxel noise (the contrasts are about 1). ``style="brats2023"``
    writes the 2023 names and ET = 3 (to test that it is detected).
    """
    import nibabel as nib

    rng = np.random.default_rng(seed * 1000 + case_id)
    name = f"BraTS2021_{case_id:05d}"
    case = Path(root) / name
    case.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    centre = np.array([rng.uniform(0.35, 0.65) * s for s in shape])
    scale = np.array([1.0, 1.0, shape[0] / shape[2] / 1.5])
    dist = np.linalg.norm((grid - centre) * scale, axis=-1)
    r = rng.uniform(0.12, 0.2) * shape[0]
    seg = np.zeros(shape, dtype=np.uint8)
    seg[dist < 2.0 * r] = 2  # oedema
    seg[dist < r] = 4  # enhancing rim
    seg[dist < 0.55 * r] = 1  # necrotic core
    brain = np.linalg.norm((grid - np.array(shape) / 2) / (np.array(shape) / 2.2), axis=-1) < 1
    base = {m: 1.0 + noise * rng.standard_normal(shape) for m in BRATS_MODALITIES}
    contrast = {  # (NCR, ED, ET) intensity offsets per sequence
        "flair": (0.3, 1.2, 0.5),
        "t1": (-0.8, -0.1, 0.0),
        "t1ce": (-0.3, 0.0, 1.5),
        "t2": (0.9, 0.8, 0.3),
    }
    names = dict(zip(BRATS_MODALITIES, ("t2f", "t1n", "t1c", "t2w"), strict=True))
    affine = np.eye(4)
    for m in BRATS_MODALITIES:
        img = base[m]
        for label, offset in zip((1, 2, 4), contrast[m], strict=True):
            img = img + offset * (seg == label)
        volume = np.where(brain, img, 0.0).astype(np.float32) * 100
        fname = f"{name}_{m}.nii.gz" if style == "brats2021" else f"{name}-{names[m]}.nii.gz"
        nib.save(nib.Nifti1Image(volume, affine), case / fname)
    if style == "brats2023":
        seg = np.where(seg == 4, 3, seg).astype(np.uint8)
        nib.save(nib.Nifti1Image(seg, affine), case / f"{name}-seg.nii.gz")
    else:
        nib.save(nib.Nifti1Image(seg, affine), case / f"{name}_seg.nii.gz")
    return case
