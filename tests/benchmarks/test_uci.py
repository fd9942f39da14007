import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.data.uci import UCI_MODALITIES, default_uci_path, load_uci_mfeat

DIMS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}


@pytest.fixture(scope="module")
def splits():
    return load_uci_mfeat()


def test_embedded_file_matches_its_checksum():
    path = default_uci_path()
    expected = (path.parent / "SHA256SUMS").read_text().split()[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected
    assert (path.parent / "LICENSE").read_text().count("CC BY 4.0") >= 1


def test_splits_shapes_and_stratification(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 1200, "valid": 400, "test": 400}
    for batch in splits.values():
        assert batch.modalities == UCI_MODALITIES
        for m, d in DIMS.items():
            assert batch[m].shape[1] == d
            assert batch[m].dtype == torch.float32
        assert torch.bincount(batch.target, minlength=10).unique().numel() == 1  # balanced
    ids = [set(b.sample_ids) for b in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 2000


def test_standardisation_uses_train_statistics_only(splits):
    train, test = splits["train"], splits["test"]
    for m in UCI_MODALITIES:
        x = train[m].double()
        varying = x.std(dim=0) > 0
        assert x.mean(dim=0).abs().max() < 1e-5
        torch.testing.assert_close(
            x.std(dim=0, unbiased=False)[varying], torch.ones(int(varying.sum()), dtype=x.dtype)
        )
    # the test split is transformed with train statistics, so its own mean is not exactly 0
    assert test["fou"].mean(dim=0).abs().max() > 1e-3


def test_split_is_fixed_and_values_are_the_original_rows(splits):
    again = load_uci_mfeat(standardize=False)
    assert again["train"].sample_ids == splits["train"].sample_ids
    with np.load(default_uci_path()) as raw:
        row = again["test"].sample_ids[0]
        np.testing.assert_allclose(again["test"]["mor"][0].numpy(), raw["mor"][row], rtol=1e-6)
        assert again["test"].target[0].item() == raw["labels"][row]


def test_bad_input_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="mfeat"):
        load_uci_mfeat(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="unknown mfeat modalities"):
        load_uci_mfeat(modalities=("fou", "xyz"))
    with pytest.raises(ValueError, match="fractions"):
        load_uci_mfeat(fractions=(0.5, 0.5, 0.5))
    np.savez(tmp_path / "mfeat.npz", labels=np.zeros(4), fou=np.zeros((4, 2)))
    with pytest.raises(KeyError, match="missing arrays"):
        load_uci_mfeat(Path(tmp_path))
