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
    tasks = ["mplmm-mosi-missing", "mplmm-uci-missing", "mplmm-throughput"]
    results = run_tasks(tasks, profile="quick", seeds=[0], out_dir=tmp_path)
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
    steps = {
        r["method"]: r["metrics"] for r in results["records"] if r["dataset"] == mt.TRAINING_STEP
    }
    assert list(steps) == [
        mt.SHIPPED,
        mt.TORCH_DROPOUT,
        mt.CONV1D_PROJECTIONS,
        mt.EVERY_MEMORY_STEP,
    ]
    assert steps[mt.SHIPPED]["step_time_vs_shipped"] == 1.0
    assert all(m["ms_per_step"] > 0 for m in steps.values())
    readout = {
        r["method"]: r["metrics"] for r in results["records"] if r["dataset"] == mt.READOUT_FORWARD
    }
    assert len(readout) == 2
    assert readout["MPLMM (vectorised, every step)"]["time_vs_every_step"] == 1.0
    assert all(m["samples_per_s"] > 0 for m in readout.values())
    whole = {
        r["method"]: r["metrics"] for r in results["records"] if r["dataset"] == "whole forward"
    }
    assert list(whole) == [
        "MPLMM (vectorised)",
        "per-sample loop",
        mt.TRANSFORMERS_ALONE,
        mt.RELEASED_STRUCTURE,
    ]
    assert whole[mt.RELEASED_STRUCTURE]["speedup_vs_released_structure"] == 1.0
    assert whole["MPLMM (vectorised)"]["speedup_vs_released_structure"] > 0
    assert whole[mt.TRANSFORMERS_ALONE]["speedup_vs_released_structure"] > 0
    memory = {
        r["method"]: r["metrics"] for r in results["records"] if r["dataset"] == mt.TRAINING_MEMORY
    }
    assert list(memory) == ["modality dropout", "missing-aware prompts", "MPLMM"]
    assert memory["modality dropout"]["memory_vs_modality_dropout"] == 1.0
    # a frozen backbone: gradients and Adam moments for the prompts, projections and head only
    dropout_state = memory["modality dropout"]["grad_and_optimiser_mib"]
    assert memory["MPLMM"]["grad_and_optimiser_mib"] < dropout_state / 4
    uci = [r for r in results["records"] if r["task"] == "mplmm-uci-missing"]
    assert {"accuracy_all_cases", "accuracy_single_modality"} <= set(uci[0]["metrics"])
    report = write_report(tmp_path).read_text()
    assert "rate-sweep.png" in report
    # every target names a table and methods the task records
    assert sum(report.count(f"| {t} |") for t in tasks) == 8 and "not measured" not in report
    assert (tmp_path / "plots" / "mplmm-mosi-missing--rate-sweep.png").is_file()
    assert (tmp_path / "plots" / "mplmm-mosi-missing--cases.png").is_file()


def test_case_models_see_only_their_case_and_reuse_the_complete_one(tmp_path, tiny):
    import torch

    from benchmarks.data.generators import write_mult_pickle
    from benchmarks.data.pickles import load_mult_pickle
    from benchmarks.registry import RunContext
    from mm_prompts import MulTBackbone, apply_case

    lens = dict.fromkeys(("text", "audio", "vision"), 4)
    data = load_mult_pickle(write_mult_pickle(tmp_path / "m.pkl", n=(12, 4, 6), seq_lens=lens))
    ctx = RunContext(seed=0, profile="quick", data_root=None, work_dir=tmp_path)
    complete = object()  # never trained or called: only handed back for the complete case
    models = mt.train_case_models(
        ctx, data, 1, mt.MOSI_SETTINGS, mt._l1, mt._neg_mae, complete=complete
    )
    assert sorted(models) == list(range(1, 8)) and models[7] is complete
    text_only = models[0b001]  # bit i = modality i present; text is modality 0
    assert isinstance(text_only, MulTBackbone)
    test = data["test"]
    noisy = test.replace(
        inputs={m: x + (torch.randn_like(x) if m != "text" else 0) for m, x in test.inputs.items()}
    )
    text_only.eval()
    with torch.no_grad():
        torch.testing.assert_close(text_only(apply_case(test, 1)), text_only(apply_case(noisy, 1)))


def test_learning_rate_sweep_runs_only_when_named_and_trains_each_method_at_each_rate(
    tmp_path, tiny, monkeypatch
):
    from benchmarks.cli import _resolve_tasks
    from benchmarks.tasks import mplmm_lr

    assert "mplmm-lr" not in _resolve_tasks(None, "quick") + _resolve_tasks(None, "full")
    # the rates the report's tables use are among those the sweep tries
    for settings in (mt.MOSI_SETTINGS, mt.UCI_SETTINGS):
        assert set(settings["lr"]) == set(mt.TRAINED)
        assert set(settings["lr"].values()) <= set(mplmm_lr.RATES)
    monkeypatch.setattr(mplmm_lr, "RATES", (1e-3, 1e-2))
    results = run_tasks(["mplmm-lr"], profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    tables: dict[str, list[str]] = {}
    for r in results["records"]:
        tables.setdefault(r["dataset"], []).append(r["method"])
        metric = "acc2_non0" if r["dataset"].startswith("MOSI") else "accuracy_all_cases"
        assert {"valid_score", metric} <= set(r["metrics"])
    assert list(tables.values()) == [["lr 0.001", "lr 0.01"]] * 6
    assert [t.split(": ")[1] for t in tables] == list(mt.TRAINED) * 2
    # the rate reaches the optimiser: each method's two rates train differently
    for table in tables:
        scores = {r["metrics"]["valid_score"] for r in results["records"] if r["dataset"] == table}
        assert len(scores) == 2, table
    assert "mplmm-lr" in write_report(tmp_path).read_text()


def test_each_trained_method_draws_from_its_own_seed_not_the_backbones():
    # reseeded with the run's seed, a method replays the stream that initialised the backbone
    for seed in (0, 1, 12):
        seeds = [mt.method_seed(seed, method) for method in mt.TRAINED]
        assert len(set(seeds)) == len(mt.TRAINED) and seed not in seeds
        others = {mt.method_seed(other, m) for other in range(20) for m in mt.TRAINED}
        assert seed not in others  # nor another run's
    with pytest.raises(ValueError):
        mt.method_seed(0, "lower bound")  # not trained: no seed of its own


def test_a_real_mosi_pickle_under_data_root_is_used(tmp_path, tiny):
    """``--data-root`` with a CMU-MOSI MulT pickle (the released sizes: 300-d text, 74-d
    audio holding -inf, 35-d vision) replaces the generated data."""
    from benchmarks.data.generators import write_mult_pickle

    root = tmp_path / "data"
    lens = dict.fromkeys(("text", "audio", "vision"), 5)
    write_mult_pickle(root / "mosi_data.pkl", "mosi", n=(30, 10, 14), seq_lens=lens, seed=3)
    results = run_tasks(
        ["mplmm-mosi-missing"], profile="quick", seeds=[0], out_dir=tmp_path / "run", data_root=root
    )
    assert not results["failures"], results["failures"]
    datasets = {r["dataset"] for r in results["records"]}
    assert len(datasets) == 8 and all(d.startswith("CMU-MOSI, ") for d in datasets), datasets
    assert not list((tmp_path / "run" / "work" / "mplmm-mosi-missing").glob("*.pkl"))
