"""The CASP benchmark tasks run end to end (tiny budgets) and record every method."""

import pytest
import torch

from benchmarks.data.uci import load_uci_mfeat
from benchmarks.runner import run_tasks
from benchmarks.tasks import casp_tta as ct


@pytest.fixture
def tiny(monkeypatch):
    for settings in (ct.MOSI_SETTINGS, ct.UCI_SETTINGS):
        monkeypatch.setitem(settings, "source_epochs", {"quick": 1})
        monkeypatch.setitem(settings, "epochs_ca", 1)
        monkeypatch.setitem(settings, "snapshot_every", 1)
        monkeypatch.setitem(settings, "epochs_pl", 1)
    monkeypatch.setitem(ct.MOSI_SETTINGS, "n", {"quick": (40, 10, 20)})
    monkeypatch.setitem(ct.MOSI_SETTINGS, "seq_len", 6)
    monkeypatch.setitem(ct.MOSI_SETTINGS, "shifts", (0.0, 1.0))
    monkeypatch.setitem(ct.UCI_SETTINGS, "severities", (0, 3))


def test_casp_tasks_record_every_method(tmp_path, tiny):
    results = run_tasks(
        ["casp-mosi-shift", "casp-uci-corruption"], profile="quick", seeds=[0], out_dir=tmp_path
    )
    assert not results["failures"], results["failures"]
    datasets = {}
    for r in results["records"]:
        datasets.setdefault((r["task"], r["dataset"]), []).append(r)
    memory = {k: datasets.pop(k) for k in list(datasets) if k[1].endswith("step memory")}
    assert len(datasets) == 4 and len(memory) == 2
    for (task, _), records in memory.items():
        assert [r["method"] for r in records] == list(ct.MEMORY_ROWS)
        tent, self_training, casp = (r["metrics"] for r in records)
        assert tent["memory_vs_tent"] == 1.0
        # the same normalisation parameters adapted by each, with Adam
        assert tent["grad_and_optimiser_mib"] == casp["grad_and_optimiser_mib"] > 0
        assert self_training["grad_and_optimiser_mib"] == tent["grad_and_optimiser_mib"]
        # CASP's stage 1 saves two views; Tent's entropy one, its regression surrogate two
        assert casp["activation_mib"] > self_training["activation_mib"]
        if task == "casp-uci-corruption":
            assert casp["activation_mib"] > 1.5 * tent["activation_mib"]
        else:
            assert tent["activation_mib"] > 1.5 * self_training["activation_mib"]
    for records in datasets.values():
        assert [r["method"] for r in records] == list(ct.METHODS)
        tent = records[ct.METHODS.index("Tent")]["metrics"]
        assert tent["throughput_vs_tent"] == 1.0
        source_only = records[0]["metrics"]  # adapts nothing: no throughput, no ratio
        assert "adapt_samples_per_s" not in source_only
        assert "throughput_vs_tent" not in source_only
        for r in records:  # CASP's kept pseudo-labels, scored against the held-back labels
            quality = {k: v for k, v in r["metrics"].items() if k.startswith("pseudo_label_")}
            if r["method"].startswith("CASP"):
                ((name, value),) = quality.items()
                assert name in ("pseudo_label_accuracy_kept", "pseudo_label_mae_kept")
                assert value >= 0 and (value <= 1 or name.endswith("mae_kept"))
            else:
                assert not quality


def test_corruption_is_what_it_says():
    test = load_uci_mfeat()["test"]
    assert ct.corrupt(test, 0, 0) is test
    bad = ct.corrupt(test, 2, 0)
    assert (bad["fac"] == 0).all() and not bad.is_present("fac").any()
    torch.testing.assert_close(bad["pix"], test["pix"] * 1.5 + 0.5)
    assert (bad["fou"] - test["fou"]).std() == pytest.approx(1.0, rel=0.05)
    torch.testing.assert_close(bad["mor"], test["mor"])
