"""Every loader reads what its generator wrote; bad files raise clear errors."""

import pickle

import numpy as np
import pytest
import torch

from benchmarks.data import load_mmsa_pickle, load_mult_pickle, write_mmsa_pickle, write_mult_pickle
from benchmarks.data.generators import MMSA_SPECS, MULT_SPECS
from benchmarks.data.pickles import DataFormatError

N = (12, 4, 4)
SMALL = {"text": 16}  # keep the 300/768-d text small; the other sizes are the real ones


def raw(path):
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("dataset", sorted(MULT_SPECS))
@pytest.mark.parametrize("aligned", [True, False])
def test_mult_round_trip(tmp_path, dataset, aligned):
    path = write_mult_pickle(tmp_path / "d.pkl", dataset, aligned=aligned, n=N, dims=SMALL)
    data = raw(path)
    spec = MULT_SPECS[dataset]
    assert set(data) == {"train", "valid", "test"}
    part = data["train"]
    expected_keys = {"text", "audio", "vision", "labels"} | ({"id"} if spec.has_ids else set())
    assert set(part) == expected_keys
    lens = (spec.aligned_len,) * 3 if aligned else spec.unaligned_lens
    dims = (16, *spec.dims[1:])
    for m, t, d in zip(("text", "audio", "vision"), lens, dims, strict=True):
        assert part[m].shape == (12, t, d) and part[m].dtype == np.float32
    assert np.isneginf(part["audio"]).any()  # as in the real files
    if dataset == "iemocap":
        assert part["labels"].shape == (12, 4, 2)
        assert (part["labels"].sum(axis=2) == 1).all() and (
            part["labels"][:, :, 1].sum(1) == 1
        ).all()
    else:
        assert part["labels"].shape == (12, 1, 1)
        assert part["labels"].min() >= -3 and part["labels"].max() <= 3
        assert isinstance(part["id"][0], bytes | np.bytes_)

    splits = load_mult_pickle(path)
    batch = splits["train"]
    assert batch.modalities == ("text", "audio", "vision")
    assert torch.isfinite(batch["audio"]).all()  # -inf set to 0
    assert batch["vision"].shape == (12, lens[2], dims[2])
    if dataset == "iemocap":
        assert batch.target.shape == (12, 4) and batch.target.dtype == torch.long
        torch.testing.assert_close(batch.target, torch.from_numpy(part["labels"].argmax(2)))
    else:
        torch.testing.assert_close(batch.target, torch.from_numpy(part["labels"].reshape(-1)))
        assert batch.sample_ids[0] == part["id"][0].decode()
    assert len(splits["test"]) == 4


@pytest.mark.parametrize(
    ("dataset", "aligned"), [("mosi", True), ("mosei", False), ("sims", False)]
)
def test_mmsa_round_trip(tmp_path, dataset, aligned):
    path = write_mmsa_pickle(tmp_path / "d.pkl", dataset, aligned=aligned, n=N, dims={"text": 24})
    part = raw(path)["train"]
    spec = MMSA_SPECS[dataset]
    for key in (
        "raw_text",
        "id",
        "text",
        "text_bert",
        "audio",
        "vision",
        "annotations",
        "classification_labels",
        "regression_labels",
    ):
        assert key in part
    assert ("audio_lengths" in part) == (not aligned)
    t_text = spec.aligned_len
    assert part["text_bert"].shape == (12, 3, t_text)
    assert "$_$" in part["id"][0]
    bound = 1.0 if dataset == "sims" else 3.0
    assert np.abs(part["regression_labels"]).max() <= bound
    if dataset == "sims":
        assert {"regression_labels_T", "regression_labels_A", "regression_labels_V"} <= set(part)
        assert part["vision"].shape[2] == 709 and part["audio"].shape[2] == 33

    batch = load_mmsa_pickle(path)["train"]
    assert batch["text"].shape == (12, t_text, 24)
    assert (
        batch.padding_mask("text").sum(1).tolist()
        == (t_text - part["text_bert"][:, 1].sum(1)).astype(int).tolist()
    )
    if not aligned:
        lengths = torch.tensor(part["audio_lengths"])
        assert ((~batch.padding_mask("audio")).sum(1) == lengths).all()
        # padded positions hold zeros
        assert batch["audio"][batch.padding_mask("audio")].abs().sum() == 0
    else:
        assert batch.padding_mask("audio") is None
    torch.testing.assert_close(batch.target, torch.from_numpy(part["regression_labels"]))


def test_loaders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl"):
        load_mult_pickle(tmp_path / "nope.pkl")
    path = write_mult_pickle(tmp_path / "m.pkl", n=N, dims=SMALL)
    data = raw(path)

    def dump(d, name):
        p = tmp_path / name
        with open(p, "wb") as f:
            pickle.dump(d, f)
        return p

    no_split = dump({"train": data["train"]}, "a.pkl")
    with pytest.raises(DataFormatError, match=r"a.pkl: expected a dict with splits"):
        load_mult_pickle(no_split)
    bad = {k: dict(v) for k, v in data.items()}
    del bad["valid"]["vision"]
    with pytest.raises(DataFormatError, match=r"b.pkl, split 'valid': missing key 'vision'"):
        load_mult_pickle(dump(bad, "b.pkl"))
    bad = {k: dict(v) for k, v in data.items()}
    bad["test"]["audio"] = bad["test"]["audio"][:3]
    with pytest.raises(
        DataFormatError, match=r"split 'test', key 'audio': expected shape \(4, T, D\)"
    ):
        load_mult_pickle(dump(bad, "c.pkl"))
    bad = {k: dict(v) for k, v in data.items()}
    bad["train"]["labels"] = np.zeros((12, 3, 3))
    with pytest.raises(DataFormatError, match="IEMOCAP labels"):
        load_mult_pickle(dump(bad, "d.pkl"))

    mmsa = raw(write_mmsa_pickle(tmp_path / "s.pkl", "sims", aligned=False, n=N, dims={"text": 8}))
    mmsa["train"]["audio_lengths"] = [10_000] * 12
    with pytest.raises(
        DataFormatError, match=r"'audio_lengths': expected 12 lengths in \[0, 400\]"
    ):
        load_mmsa_pickle(dump(mmsa, "e.pkl"))
    with pytest.raises(DataFormatError, match="regression_labels"):
        load_mmsa_pickle(path)  # a MulT file is not an MMSA file
    not_a_dict = {**data, "valid": [1, 2, 3]}
    with pytest.raises(
        DataFormatError, match=r"split 'valid': expected a dict, found <class 'list'>"
    ):
        load_mult_pickle(dump(not_a_dict, "f.pkl"))
    mmsa = raw(write_mmsa_pickle(tmp_path / "t.pkl", "mosi", n=N, dims={"text": 8}))
    labels = {**mmsa, "test": {**mmsa["test"], "regression_labels": np.zeros((4, 2))}}
    with pytest.raises(
        DataFormatError, match=r"'regression_labels': expected shape \(N,\), found \(4, 2\)"
    ):
        load_mmsa_pickle(dump(labels, "g.pkl"))
    t = mmsa["train"]["text"].shape[1]
    bert = {**mmsa, "train": {**mmsa["train"], "text_bert": np.zeros((12, 2, t))}}
    with pytest.raises(DataFormatError, match=rf"'text_bert': expected shape \(12, 3, {t}\)"):
        load_mmsa_pickle(dump(bert, "h.pkl"))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_cannot_run_code(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train": Evil(), "valid": {}, "test": {}}, f)
    with pytest.raises(DataFormatError, match=r"refusing to load global 'builtins.print'"):
        load_mult_pickle(path)


def test_generator_rejects_bad_configuration(tmp_path):
    with pytest.raises(ValueError, match="unknown MulT data set"):
        write_mult_pickle(tmp_path / "x.pkl", "food")
    with pytest.raises(ValueError, match="only released unaligned"):
        write_mmsa_pickle(tmp_path / "x.pkl", "sims")
    with pytest.raises(ValueError, match="one sequence length"):
        write_mult_pickle(tmp_path / "x.pkl", seq_lens={"audio": 10})
    with pytest.raises(ValueError, match="unknown MMSA data set 'food'"):
        write_mmsa_pickle(tmp_path / "x.pkl", "food")
    with pytest.raises(ValueError, match=r"unknown modalities \['speech'\]"):
        write_mult_pickle(tmp_path / "x.pkl", dims={"speech": 4})
    with pytest.raises(ValueError, match=r"n must be >= 2 per split .* got \(10, 1, 4\)"):
        write_mult_pickle(tmp_path / "x.pkl", n=(10, 1, 4))
