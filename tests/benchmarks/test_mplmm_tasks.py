"""The MPLMM benchmark tasks run end to end (tiny budgets) and record every method."""

import pytest

from benchmarks.report import write_report
from benchmarks.runner import run_tasks
from benchmarks.tasks import mplmm_missing as mt


@pytest.fixture
def tiny(monkeypatch):
    for settings in (mt.MOSI_SETTINGS, mt.UCI_SETTINGS):
        monkeypatch.setitem(settings, "pretrain_epochs", {"quick": 1})
        monkeypatch.setitem(settings, "epochs", {"quick": 1})
    monkeypatch.setitem(mt.MOSI_SETTINGS, "n", {"quick": (30, 10, 14)})
    monkeypatch.setitem(mt.MOSI_SETTINGS, "seq_len", 5)
    monkeypatch.setitem(mt.MOSI_SETTINGS, "test_rates", (0.0, 0.5))


def test_mplmm_tasks_record_every_method(tmp_path, tiny):
    results = run_tasks(
        ["mplmm-mosi-missing", "mplmm-uci-missing"], profile="quick", seeds=[0], out_dir=tmp_path
    )
    assert not results["failures"], results["failures"]
    mosi = [r for r in results["records"] if r["task"] == "mplmm-mosi-missing"]
    assert len({r["dataset"] for r in mosi}) == 8  # 7 cases + their average
    average = {r["method"]: r["metrics"] for r in mosi if "average" in r["dataset"]}
    assert list(average) == [*mt.METHODS, mt.CASE_MODELS]
    assert "sweep_acc2_non0@0.5" in average["lower bound"]
    assert 0 < average["MPLMM"]["trainable_pct_of_backbone"] < 100
    # the reference: one model per case, each evaluated on its own case only
    case_rows = [r for r in mosi if r["method"] == mt.CASE_MODELS and "present" in r["dataset"]]
    assert len(case_rows) == 7
    assert {r["config"]["case"] for r in case_rows} == set(range(1, 8))
    assert "sweep_acc2_non0@0.5" not in average[mt.CASE_MODELS]
    uci = [r for r in results["records"] if r["task"] == "mplmm-uci-missing"]
    assert {"accuracy_all_cases", "accuracy_single_modality"} <= set(uci[0]["metrics"])
    report = write_report(tmp_path).read_text()
    assert "rate-sweep.png" in report
    assert (tmp_path / "plots" / "mplmm-mosi-missing--rate-sweep.png").is_file()
    assert (tmp_path / "plots" / "mplmm-mosi-missing--cases.png").is_file()
