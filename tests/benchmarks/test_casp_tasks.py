"""The CASP benchmark tasks run end to end (tiny budgets) and record every method."""

import pytest
import torch

from benchmarks.data.uci import load_uci_mfeat
from benchmarks.registry import TASKS
from benchmarks.runner import run_tasks
from benchmarks.tasks import casp_tta as ct

AVERAGES = (ct.MOSI_AVERAGE, ct.UCI_AVERAGE)


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
    averages = {k: datasets.pop(k) for k in list(datasets) if k[1] in AVERAGES}
    assert len(datasets) == 4 and len(memory) == 2 and len(averages) == 2
    for (task, _), records in averages.items():  # one shifted setting: its own figures
        shifted = ct.mosi_table(1.0) if task == "casp-mosi-shift" else ct.uci_table(3)
        assert [r["method"] for r in records] == list(ct.METHODS)
        for average, setting in zip(records, datasets[(task, shifted)], strict=True):
            metrics = ct.MOSI_METRICS if task == "casp-mosi-shift" else ct.UCI_METRICS
            assert average["metrics"] == {m: setting["metrics"][m] for m in metrics}
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


def test_settings_are_averaged_per_method_and_must_all_be_there():
    records = [
        {"method": "a", "dataset": "s1", "metrics": {"acc": 0.5, "speed": 1.0}},
        {"method": "b", "dataset": "s1", "metrics": {"acc": 0.25}},
        {"method": "a", "dataset": "s2", "metrics": {"acc": 0.75, "speed": 3.0}},
        {"method": "b", "dataset": "s2", "metrics": {"acc": 0.5}},
        {"method": "a", "dataset": "control", "metrics": {"acc": 1.0}},
    ]
    averaged = ct.average_over_settings(records, ["s1", "s2"], "avg", ("acc",))
    assert averaged == [
        {"method": "a", "dataset": "avg", "metrics": {"acc": 0.625}},
        {"method": "b", "dataset": "avg", "metrics": {"acc": 0.375}},
    ]
    with pytest.raises(ValueError, match="1 of the 2 settings"):
        ct.average_over_settings(records[:3], ["s1", "s2"], "avg", ("acc",))


@pytest.mark.parametrize(
    ("task", "tables", "average"),
    [
        ("casp-mosi-shift", [ct.mosi_table(x) for x in (0.0, 0.5, 1.0, 2.0)], ct.MOSI_AVERAGE),
        ("casp-uci-corruption", [ct.uci_table(x) for x in (0, 1, 2, 3)], ct.UCI_AVERAGE),
    ],
)
def test_targets_are_the_issues_on_the_tables_the_task_writes(task, tables, average):
    """Better than source-only on each shifted table, than both Tent-style baselines on the
    average, and at most 0.5 point below source-only on the control."""
    targets = TASKS[task].targets
    read = [(t.dataset, t.versus, t.op, t.threshold) for t in targets]
    better = "<" if task == "casp-mosi-shift" else ">"
    assert read == [
        *((table, "source-only", better, 0.0) for table in tables[1:]),
        (average, "Tent", better, 0.0),
        (average, "self-training", better, 0.0),
        (tables[0], "source-only", ">=", -0.005),
    ]
    assert all(t.method == "CASP" for t in targets)
