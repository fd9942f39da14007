import nibabel as nib
import numpy as np
import pytest

from benchmarks.data.brats import (
    BRATS_MODALITIES,
    find_brats_cases,
    load_brats_slices,
    write_brats_case,
)
from benchmarks.data.pickles import DataFormatError


def test_loader_reads_what_the_generator_wrote(tmp_path):
    for i in range(2):
        write_brats_case(tmp_path, i, shape=(24, 24, 8))
    cases = find_brats_cases(tmp_path)
    assert [c.name for c in cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    seg = np.asarray(nib.load(cases[0] / "BraTS2021_00000_seg.nii.gz").dataobj)
    assert set(np.unique(seg)) == {0, 1, 2, 4} and seg.shape == (24, 24, 8)
    batch = load_brats_slices(cases, slices_per_case=3)
    assert batch.modalities == BRATS_MODALITIES
    assert batch["flair"].shape == (6, 1, 24, 24) and batch.target.shape == (6, 24, 24)
    assert set(batch.target.unique().tolist()) == {0, 1, 2, 3}  # ET remapped 4 -> 3
    brain = batch["t1"] != 0
    assert abs(batch["t1"][brain].mean().item()) < 0.5  # z-scored on the brain (nonzero)
    # each sequence shows the regions differently: T1ce is brightest on ET, FLAIR on oedema
    t = batch.target
    assert batch["t1ce"][:, 0][t == 3].mean() > batch["t1ce"][:, 0][t == 2].mean()
    assert batch["flair"][:, 0][t == 2].mean() > batch["flair"][:, 0][t == 3].mean()
    assert batch.sample_ids[0].startswith("BraTS2021_00000:z")


def test_label_traps_are_detected(tmp_path):
    write_brats_case(tmp_path / "y2023", 0, shape=(16, 16, 6), style="brats2023")
    with pytest.raises(DataFormatError, match="BraTS 2023 file names"):
        find_brats_cases(tmp_path / "y2023")
    (tmp_path / "msd" / "imagesTr").mkdir(parents=True)
    (tmp_path / "msd" / "labelsTr").mkdir()
    with pytest.raises(DataFormatError, match="MSD Task01"):
        find_brats_cases(tmp_path / "msd")
    case = write_brats_case(tmp_path / "relabelled", 0, shape=(16, 16, 6))
    seg_path = case / f"{case.name}_seg.nii.gz"
    seg = np.asarray(nib.load(seg_path).dataobj)
    nib.save(nib.Nifti1Image(np.where(seg == 4, 3, seg).astype(np.uint8), np.eye(4)), seg_path)
    with pytest.raises(DataFormatError, match=r"labels \[0, 1, 2, 3\]"):
        load_brats_slices(find_brats_cases(tmp_path / "relabelled"))
    (case / f"{case.name}_t2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"_t2\.nii\.gz"):
        find_brats_cases(tmp_path / "relabelled")
    with pytest.raises(FileNotFoundError):
        find_brats_cases(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"no case folders \(expected BraTS2021_XXXXX/\)"):
        find_brats_cases(tmp_path / "empty")
    healthy = write_brats_case(tmp_path / "healthy", 0, shape=(16, 16, 6))
    seg_path = healthy / f"{healthy.name}_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), dtype=np.uint8), np.eye(4)), seg_path)
    with pytest.raises(DataFormatError, match="no slice with tumour"):
        load_brats_slices(find_brats_cases(tmp_path / "healthy"))


def test_uncompressed_files_and_hidden_folders(tmp_path):
    case = write_brats_case(tmp_path, 0, shape=(16, 16, 6))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    for path in list(case.iterdir()):
        nib.save(nib.load(path), case / path.stem)  # BraTS2021_00000_flair.nii
        path.unlink()
    cases = find_brats_cases(tmp_path)
    assert [c.name for c in cases] == ["BraTS2021_00000"]
    assert load_brats_slices(cases, slices_per_case=2)["t1ce"].shape == (2, 1, 16, 16)


def test_interpolated_labels_and_mismatched_shapes_are_detected(tmp_path):
    case = write_brats_case(tmp_path / "float", 0, shape=(16, 16, 6))
    seg_path = case / f"{case.name}_seg.nii.gz"
    seg = np.asarray(nib.load(seg_path).dataobj).astype(np.float32)
    seg[8, 8, 3] = 3.5  # a label map resampled with linear interpolation
    nib.save(nib.Nifti1Image(seg, np.eye(4)), seg_path)
    with pytest.raises(DataFormatError, match=r"non-integer values \(e\.g\. 3\.5\)"):
        load_brats_slices(find_brats_cases(tmp_path / "float"))
    case = write_brats_case(tmp_path / "shape", 0, shape=(16, 16, 6))
    flair = case / f"{case.name}_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 5), np.float32), np.eye(4)), flair)
    with pytest.raises(DataFormatError, match="differ in shape"):
        load_brats_slices(find_brats_cases(tmp_path / "shape"))
