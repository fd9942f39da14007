"""The CGGM benchmark tasks run end to end (tiny budgets) and record every method."""

import pytest

from benchmarks.runner import run_tasks
from benchmarks.tasks import cggm_balance as cb


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(cb.UCI_SETTINGS, "epochs", {"quick": 1})
    monkeypatch.setitem(cb.MOSI_SETTINGS, "n", {"quick": (40, 10, 20)})
    monkeypatch.setitem(cb.MOSI_SETTINGS, "seq_len", 6)
    monkeypatch.setitem(cb.MOSI_SETTINGS, "epochs", {"quick": 1})
    monkeypatch.setitem(cb.BRATS_SETTINGS, "cases", {"quick": (3, 1)})
    monkeypatch.setitem(cb.BRATS_SETTINGS, "shape", (16, 16, 6))
    monkeypatch.setitem(cb.BRATS_SETTINGS, "epochs", {"quick": 1})


def test_cggm_tasks_record_every_method(tmp_path, tiny):
    tasks = ["cggm-uci-balance", "cggm-mosi-imbalance", "cggm-brats-seg"]
    results = run_tasks(tasks, profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    by_task = {}
    for r in results["records"]:
        by_task.setdefault(r["task"], []).append(r)
    uci = by_task["cggm-uci-balance"]
    assert [r["method"] for r in uci] == list(cb.UCI_SETTINGS["methods"])
    assert {f"probe_{m}" for m in ("fou", "fac", "kar", "pix", "zer", "mor")} <= set(
        uci[0]["metrics"]
    )
    assert {"mae", "corr"} <= set(by_task["cggm-mosi-imbalance"][1]["metrics"])
    brats = {r["method"]: r["metrics"] for r in by_task["cggm-brats-seg"]}
    assert set(brats) == {"joint", "CGGM"}
    assert 0 <= brats["CGGM"]["dice_mean"] <= 1


def test_real_mosi_pickle_under_data_root_is_used(tmp_path, tiny):
    from benchmarks.data.generators import write_mult_pickle

    root = tmp_path / "data"
    lens = dict.fromkeys(("text", "audio", "vision"), 5)
    write_mult_pickle(root / "mosi_data.pkl", "mosi", n=(24, 8, 8), seq_lens=lens)
    results = run_tasks(
        ["cggm-mosi-imbalance"],
        profile="quick",
        seeds=[0],
        out_dir=tmp_path / "run",
        data_root=root,
    )
    assert not results["failures"], results["failures"]
    assert {r["dataset"] for r in results["records"]} == {"CMU-MOSI (--data-root)"}


def test_step_overhead_task_times_every_method_at_every_size(tmp_path, monkeypatch):
    from benchmarks.tasks import cggm_overhead

    monkeypatch.setattr(cggm_overhead, "SIZES", ((4, 8, 8), (8, 16, 16)))
    results = run_tasks(["cggm-step-overhead"], profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    records = results["records"]
    assert len({r["dataset"] for r in records}) == 2
    for r in records:
        m = r["metrics"]
        assert m["ms_per_step"] > 0
        assert m["step_time_vs_joint"] == pytest.approx(
            m["ms_per_step"] / (m["ms_per_step"] - m["overhead_ms_vs_joint"])
        )
    assert {r["method"] for r in records} == {
        "joint",
        "OGM-GE",
        "CGGM",
        "CGGM (λ=0, 64-unit classifiers)",
    }
