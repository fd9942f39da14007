"""The Wander benchmark tasks run end to end (tiny budgets) and record every method."""

import pytest
import torch

from benchmarks.backbones import LateFusionModel
from benchmarks.cli import _resolve_tasks
from benchmarks.data.uci import load_uci_mfeat
from benchmarks.report import write_report
from benchmarks.runner import run_tasks
from benchmarks.tasks import wander_shapes as ws
from benchmarks.tasks import wander_transfer as wt
from benchmarks.training import count_parameters


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(wt.UCI_SETTINGS, "pretrain_epochs", {"quick": 1, "full": 1})
    monkeypatch.setitem(wt.UCI_SETTINGS, "epochs", 2)
    monkeypatch.setitem(wt.UCI_SETTINGS, "episodes", {"quick": 2})
    monkeypatch.setitem(wt.MOSI_SETTINGS, "n_pretrain", {"quick": (40, 10, 10)})
    monkeypatch.setitem(wt.MOSI_SETTINGS, "n_target", {"quick": (30, 10, 20)})
    monkeypatch.setitem(wt.MOSI_SETTINGS, "seq_len", 6)
    monkeypatch.setitem(wt.MOSI_SETTINGS, "pretrain_epochs", {"quick": 1})
    monkeypatch.setitem(wt.MOSI_SETTINGS, "epochs", 1)
    monkeypatch.setitem(wt.FOOD_SETTINGS, "n_per_class", {"quick": (5, 2)})
    monkeypatch.setitem(wt.FOOD_SETTINGS, "pretrain_epochs", 1)
    monkeypatch.setitem(wt.FOOD_SETTINGS, "epochs", 1)


def test_wander_tasks_record_every_method(tmp_path, tiny):
    tasks = ["wander-uci-transfer", "wander-mosi-interaction", "wander-food101-path"]
    results = run_tasks(tasks, profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    by_task = {}
    for r in results["records"]:
        by_task.setdefault(r["task"], []).append(r)
    assert [r["method"] for r in by_task["wander-uci-transfer"]] == list(
        wt.methods(wt.UCI_SETTINGS)
    )
    mosi_datasets = {}
    for r in by_task["wander-mosi-interaction"]:
        mosi_datasets.setdefault(r["dataset"], []).append(r["method"])
    assert list(mosi_datasets) == list(wt._MOSI_HEADS.values())  # MLP head, then linear head
    for methods in mosi_datasets.values():
        assert methods == list(wt.methods(wt.MOSI_SETTINGS))
    uci = {r["method"]: r["metrics"] for r in by_task["wander-uci-transfer"]}
    assert uci["head-only"]["step_time_vs_head_only"] == 1.0
    assert uci["full fine-tuning"]["trainable_pct_of_backbone"] == pytest.approx(100.0)
    assert 0 < uci["Wander"]["trainable_pct_of_backbone"] < 10
    assert 0 <= uci["Wander"]["valid_score"] <= 1
    uci_config = by_task["wander-uci-transfer"][0]["config"]
    assert uci_config["episodes"] == 2 and len(uci_config["best_epochs"]) == 2
    report = write_report(tmp_path).read_text()
    assert (tmp_path / "plots" / "wander-uci-transfer--tradeoff.png").is_file()
    # every target names a table and methods the task records
    assert report.count("| wander-uci-transfer |") == 5 and "not measured" not in report
    assert {"mae", "corr", "acc7"} <= set(by_task["wander-mosi-interaction"][0]["metrics"])
    assert [r["method"] for r in by_task["wander-food101-path"]] == ["head-only", "Wander"]


def test_shape_sweep_runs_only_when_named_and_every_shape_is_under_five_percent():
    assert "wander-uci-shapes" not in _resolve_tasks(None, "quick") + _resolve_tasks(None, "full")
    assert _resolve_tasks(["wander-uci-shapes"], "quick") == ["wander-uci-shapes"]
    train = wt.select_classes(load_uci_mfeat()["train"], range(5, 10), shots=5)
    s = wt.UCI_SETTINGS
    base = LateFusionModel.from_batch(train, 5, width=s["width"], hidden=s["hidden"], head="linear")
    backbone = count_parameters(base)
    for name in ws.SHAPES:
        model = wt.build_method(name, base, train, ws.SETTINGS, seed=0)
        assert 100 * count_parameters(model, trainable_only=True) / backbone < 5, name
    chosen = dict(s["wander_variants"]["Wander (r=4, tiled)"])
    chosen.pop("interaction_init")  # chosen afterwards, by wander-uci-init
    assert chosen in ws.SHAPES.values()


def test_init_sweep_runs_only_when_named_and_tries_every_pair_beside_lora(
    tmp_path, tiny, monkeypatch
):
    assert "wander-uci-init" not in _resolve_tasks(None, "quick") + _resolve_tasks(None, "full")
    variants = ws.init_variants()
    assert len(variants) == len(ws.OUTPUT_SCALES) * len(ws.INTERACTION_INITS)
    knobs = {"output_scale", "interaction_init"}
    reported = wt.UCI_SETTINGS["wander_variants"]["Wander (r=4, tiled)"]
    for options in variants.values():  # the reported variant; only the two knobs move
        assert {k: v for k, v in options.items() if k not in knobs} == {
            k: v for k, v in reported.items() if k not in knobs
        }
    monkeypatch.setattr(ws, "OUTPUT_SCALES", (0.1, 1.0))
    monkeypatch.setattr(ws, "INTERACTION_INITS", (0.1,))
    monkeypatch.setattr(ws, "DRAWS", 1)
    results = run_tasks(["wander-uci-init"], profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    rows = [(r["method"], r["dataset"]) for r in results["records"]]
    assert [m for m, _ in rows] == ["LoRA (peft)", "scale 0.1, ε 0.1", "scale 1, ε 0.1"]
    assert len({d for _, d in rows}) == 1  # one table, paired against LoRA


def test_lr_sweep_runs_only_when_named_and_gives_one_table_per_method(tmp_path, tiny, monkeypatch):
    assert "wander-uci-lr" not in _resolve_tasks(None, "quick") + _resolve_tasks(None, "full")
    monkeypatch.setattr(ws, "LEARNING_RATES", (1e-3, 1e-2))
    monkeypatch.setattr(ws, "DRAWS", 1)
    results = run_tasks(["wander-uci-lr"], profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    tables = {}
    for r in results["records"]:
        tables.setdefault(r["dataset"], []).append((r["method"], r["config"]["lr"]))
    expected = ["head-only", "full fine-tuning", "LoRA (peft)", "Houlsby adapter", "Wander"]
    assert list(tables) == [*expected, "Wander (r=4, tiled)"]
    for rows in tables.values():
        assert rows == [("lr 0.001", 1e-3), ("lr 0.01", 1e-2)]


def test_average_episodes_means_each_methods_metrics_over_the_draws():
    def record(method, acc, epoch):
        return {
            "method": method,
            "dataset": "d",
            "metrics": {"accuracy": acc},
            "config": {"best_epoch": epoch},
        }

    episodes = [
        [record("a", 0.9, 3), record("b", 0.5, 1)],
        [record("a", 0.7, 5), record("b", 0.6, 2)],
    ]
    averaged = wt.average_episodes(episodes)
    assert [r["method"] for r in averaged] == ["a", "b"]
    assert averaged[0]["metrics"]["accuracy"] == pytest.approx(0.8)
    assert averaged[1]["metrics"]["accuracy"] == pytest.approx(0.55)
    assert averaged[0]["config"] == {"best_epochs": [3, 5]}


def test_fusion_speed_task_checks_equality_and_times_both_paths(tmp_path, monkeypatch):
    from benchmarks.tasks import wander_speed

    monkeypatch.setattr(wander_speed, "SHAPES", {"tiny": (2, 3, 4, 2, 3, 2, 2, 2, 5)})
    results = run_tasks(["wander-fusion-speed"], profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    by_method = {r["method"]: r["metrics"] for r in results["records"]}
    assert set(by_method) == {"autograd einsums", "fused kernel"}
    assert by_method["autograd einsums"]["speedup_vs_autograd_einsums"] == 1.0
    assert by_method["fused kernel"]["us_per_forward_backward"] > 0


def test_step_overhead_task_times_every_method_at_every_size(tmp_path, monkeypatch):
    from benchmarks.tasks import wander_overhead

    monkeypatch.setattr(wander_overhead, "SIZES", ((8, 16, 8), (16, 32, 16)))
    monkeypatch.setattr(wander_overhead, "COMPILED", ("head-only", "Wander"))
    monkeypatch.setattr(wander_overhead, "ADAPTER_COMPILED", ("head-only", "Wander"))
    compiled_modules = []
    module_compile = torch.nn.Module.compile

    def spy(self, *args, **kwargs):
        compiled_modules.append(type(self).__name__)
        return module_compile(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", spy)
    results = run_tasks(["wander-step-overhead"], profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    records = results["records"]
    compiled = [r for r in records if r["config"].get("compiled")]
    adapter_compiled = [r for r in records if r["config"].get("adapter_compiled")]
    by_hand = [r for r in records if r["config"].get("by_hand")]
    memory = [r for r in records if r["dataset"].endswith(", memory")]
    records = [
        r
        for r in records
        if r not in compiled and r not in adapter_compiled and r not in memory + by_hand
    ]
    assert len({r["dataset"] for r in records}) == len({r["dataset"] for r in memory}) == 2
    # memory per step at each size: full fine-tuning holds the most, head-only the least
    for dataset in {r["dataset"] for r in memory}:
        totals = {r["method"]: r["metrics"]["total_mib"] for r in memory if r["dataset"] == dataset}
        assert set(totals) == set(wt.methods(wander_overhead.sized_settings(8, 16, 8)))
        assert min(totals, key=totals.__getitem__) == "head-only"
        assert max(totals, key=totals.__getitem__) == "full fine-tuning"
        full = next(
            r for r in memory if r["method"] == "full fine-tuning" and r["dataset"] == dataset
        )
        assert full["metrics"]["memory_vs_full_fine_tuning"] == 1.0
    ((caption, path),) = wander_overhead.plot_memory(results["records"], tmp_path)
    assert path.stat().st_size > 0 and "Memory" in caption
    settings = wander_overhead.sized_settings(8, 16, 8)
    assert {r["method"] for r in records} == set(wt.methods(settings))
    # the first size again, every model through torch.compile, its own head-only as reference
    assert [r["method"] for r in compiled] == list(wander_overhead.COMPILED)
    assert all("torch.compile" in r["dataset"] and "width 8," in r["dataset"] for r in compiled)
    # and with only Wander's adapter compiled, beside eager head-only
    assert [r["method"] for r in adapter_compiled] == ["head-only", "Wander"]
    assert compiled_modules == ["WanderFusion"]  # the adapter alone, once
    assert all("only Wander's adapter" in r["dataset"] for r in adapter_compiled)
    # and at the first size, the sub-5 % Wander beside its forward written by hand
    assert [r["method"] for r in by_hand] == [
        "head-only",
        wt.SUB_5_PERCENT,
        *wander_overhead.BY_HAND,
    ]
    assert all("width 8," in r["dataset"] and "by hand" in r["dataset"] for r in by_hand)
    records += compiled + adapter_compiled + by_hand
    for r in records:
        assert r["metrics"]["ms_per_step"] > 0
        if r["method"] == "head-only":
            assert r["metrics"]["step_time_vs_head_only"] == 1.0


def test_food101_task_takes_the_profiles_images_per_class_from_real_data(tmp_path, monkeypatch):
    from benchmarks.data.food101 import write_food101, write_tiny_encoders
    from benchmarks.registry import RunContext

    classes = ("apple_pie", "donuts", "ramen")
    write_food101(tmp_path / "data" / "UPMC-Food101", classes, n_per_class=(5, 3))
    write_tiny_encoders(tmp_path / "data" / "encoders", ("apple pie", "donuts", "ramen"), hidden=8)
    monkeypatch.setitem(wt.FOOD_SETTINGS, "n_per_class", {"quick": (2, 1)})
    status = []
    ctx = RunContext(0, "quick", tmp_path / "data", tmp_path / "work", progress=status.append)
    feats = wt.food101_features(ctx)
    assert feats["train"].require_target().bincount().tolist() == [2, 2, 2]
    assert feats["test"].require_target().bincount().tolist() == [1, 1, 1]
    assert status == ["train features 6/6", "test features 3/3"]
    assert not (tmp_path / "work").exists()  # nothing generated: the real copy was read
