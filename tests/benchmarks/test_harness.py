import json

import pytest

import benchmarks.tasks  # noqa: F401
from benchmarks import cli
from benchmarks.compare import compare_runs, format_comparison, is_timing
from benchmarks.registry import TASKS, Reference, Target, Task, register_task
from benchmarks.report import summarise, write_report
from benchmarks.runner import run_tasks
from mmcore import atomic_write


@pytest.fixture
def fake_tasks(monkeypatch):
    def good(ctx):
        ctx.progress("working")
        return [
            {
                "method": "a",
                "dataset": "toy",
                "metrics": {"acc": 0.5 + 0.1 * ctx.seed, "n": 10},
                "config": {"lr": 0.1},
            },
            {"method": "b", "dataset": "toy", "metrics": {"acc": 0.25, "n": 10}},
        ]

    def bad(ctx):
        raise RuntimeError("planted failure")

    for name, fn in (("toy-good", good), ("toy-bad", bad)):
        monkeypatch.setitem(TASKS, name, Task(name, f"{name} description", fn, "acc"))


def test_run_records_everything_and_survives_a_failing_task(tmp_path, fake_tasks):
    results = run_tasks(["toy-bad", "toy-good"], profile="quick", seeds=[0, 1], out_dir=tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["records"] == results["records"]
    assert len(results["records"]) == 4
    rec = results["records"][0]
    assert rec == {
        "task": "toy-good",
        "method": "a",
        "dataset": "toy",
        "seed": 0,
        "metrics": {"acc": 0.5, "n": 10},
        "config": {"lr": 0.1},
    }
    assert [(f["task"], f["seed"]) for f in results["failures"]] == [("toy-bad", 0), ("toy-bad", 1)]
    assert "planted failure" in results["failures"][0]["error"]
    assert "Traceback" in results["failures"][0]["traceback"]

    report = write_report(tmp_path).read_text()
    assert "| a | 2 | 0.5500 ± 0.0707 |" in report
    assert "| b | 2 | 0.2500 ± 0.0000 |" in report
    # paired per seed: b − a = −0.25 (seed 0), −0.35 (seed 1)
    assert "Δ acc vs a (paired) |" in report
    assert "| a | 2 | 0.5500 ± 0.0707 | 10 | — |" in report
    assert "| b | 2 | 0.2500 ± 0.0000 | 10 | -0.3000 ± 0.0707 |" in report
    assert "## Failed" in report and "planted failure" in report
    assert (tmp_path / "plots" / "toy-good--toy.png").stat().st_size > 1000


def test_malformed_records_fail_their_seed_and_values_are_made_json_safe(tmp_path, monkeypatch):
    """A task's records are checked before any is kept; tensors, numpy scalars and other
    objects become JSON values, NaN and inf become null."""
    import numpy as np
    import torch

    def records(ctx):
        good = {"method": "a", "dataset": "toy", "metrics": {"acc": 0.5}}
        if ctx.seed == 0:
            return [good, "not a record"]
        if ctx.seed == 1:
            return [good, {"method": "b", "metrics": {"acc": 0.1}}]
        if ctx.seed == 2:
            return [{"method": "a", "dataset": "toy", "metrics": {}}]
        metrics = {
            "tensor": torch.tensor(0.25),
            "numpy": np.float32(0.5),
            "nan": float("nan"),
            "inf": torch.tensor(float("inf")),
            "list": (np.int64(3), 4),
        }
        return [{**good, "metrics": metrics, "config": {"path": tmp_path, 7: "int key"}}]

    monkeypatch.setitem(TASKS, "toy-records", Task("toy-records", "", records, "tensor"))
    results = run_tasks(["toy-records"], profile="quick", seeds=[0, 1, 2, 3], out_dir=tmp_path)
    errors = [f["error"] for f in results["failures"]]
    assert errors == [
        "TypeError: task 'toy-records' returned a str, not a dict record.",
        "ValueError: task 'toy-records': a record lacks ['dataset']: "
        "{'method': 'b', 'metrics': {'acc': 0.1}}",
        "ValueError: task 'toy-records': record 'metrics' must be a non-empty dict.",
    ]
    (record,) = results["records"]  # seeds 0 and 1 kept none of their records, good or not
    assert record["seed"] == 3
    assert record["metrics"] == {
        "tensor": 0.25,
        "numpy": 0.5,
        "nan": None,
        "inf": None,
        "list": [3, 4],
    }
    assert record["config"] == {"path": str(tmp_path), "7": "int key"}
    assert json.loads((tmp_path / "results.json").read_text())["records"] == [record]


def test_report_checks_each_tasks_targets(tmp_path, monkeypatch):
    """Seed 0: a = 0.5, b = 0.25; seed 1: a = 0.6, b = 0.25 (a − b: 0.25 and 0.35)."""

    def run(ctx):
        return [
            {"method": "a", "dataset": "toy", "metrics": {"acc": 0.5 + 0.1 * ctx.seed}},
            {"method": "b", "dataset": "toy", "metrics": {"acc": 0.25}},
        ]

    targets = (
        Target("a clears 0.4", "toy", "a", "acc", ">=", 0.4),
        Target("a clears 0.5", "toy", "a", "acc", ">=", 0.5),
        Target("a beats b by 0.4", "toy", "a", "acc", ">=", 0.4, versus="b"),
        Target("a beats b by 0.32", "toy", "a", "acc", ">=", 0.32, versus="b"),
        Target("b at most 0.2", ("real", "toy"), "b", "acc", "<=", 0.2),
        Target("c exists", "toy", "c", "acc", ">", 0.0),
    )
    monkeypatch.setitem(TASKS, "toy-targets", Task("toy-targets", "d", run, "acc", targets=targets))
    run_tasks(["toy-targets"], profile="quick", seeds=[0, 1], out_dir=tmp_path)
    report = write_report(tmp_path).read_text()
    assert "## Targets" in report
    assert "| a clears 0.4 | a: acc | 0.5500 ± 0.0707 | >= 0.4 | met |" in report
    assert "| >= 0.5 | met (the bound is within one std) |" in report
    assert "| a beats b by 0.4 | a − b: acc | 0.3000 ± 0.0707 | >= 0.4 | **not met** |" in report
    assert "0.3000 ± 0.0707 | >= 0.32 | **not met** (the bound is within one std) |" in report
    assert "| b at most 0.2 | b: acc | 0.2500 ± 0.0000 | <= 0.2 | **not met** |" in report
    assert "| c exists | c: acc | — | > 0 | not measured |" in report
    with pytest.raises(ValueError, match="op must be"):
        Target("bad", "toy", "a", "acc", "==", 0.0)


def test_target_bounds_strict_and_not():
    for op, below, at, above in (
        (">=", False, True, True),
        (">", False, False, True),
        ("<=", True, True, False),
        ("<", True, False, False),
    ):
        target = Target("t", "toy", "a", "acc", op, 0.5)
        assert [target.met(v) for v in (0.4, 0.5, 0.6)] == [below, at, above], op


def test_targets_show_the_references_measured_in_the_same_run(tmp_path, monkeypatch):
    """A target's references are read like it, from its own task or another task of the run;
    one the run does not hold says so."""

    def run_a(ctx):
        return [
            {"method": "a", "dataset": "toy", "metrics": {"acc": 0.5 + 0.1 * ctx.seed}},
            {"method": "ceiling", "dataset": "toy", "metrics": {"acc": 0.6}},
        ]

    def run_b(ctx):
        return [{"method": "by hand", "dataset": "timing", "metrics": {"ratio": 1.2 + ctx.seed}}]

    references = (
        Reference("ceiling − a", "toy", "ceiling", "acc", versus="a"),
        Reference("by hand", ("other", "timing"), "by hand", "ratio", task="toy-b"),
        Reference("not run", "toy", "nobody", "acc"),
    )
    target = Target("a clears 0.7", "toy", "a", "acc", ">=", 0.7, references=references)
    plain = Target("a clears 0.1", "toy", "a", "acc", ">=", 0.1)
    monkeypatch.setitem(TASKS, "toy-a", Task("toy-a", "d", run_a, "acc", targets=(target, plain)))
    monkeypatch.setitem(TASKS, "toy-b", Task("toy-b", "d", run_b, "ratio"))
    run_tasks(["toy-a", "toy-b"], profile="quick", seeds=[0, 1], out_dir=tmp_path)
    report = write_report(tmp_path).read_text()
    assert "| verdict | beside it in this run |" in report
    # ceiling − a per seed: 0.1, 0.0; by hand: 1.2, 2.2
    beside = "ceiling − a: 0.0500 ± 0.0707; by hand: 1.7000 ± 0.7071; not run: not in this run"
    assert f"| **not met** | {beside} |" in report
    assert "| a clears 0.1 | a: acc | 0.5500 ± 0.0707 | >= 0.1 | met | — |" in report


def test_cli_list_run_report(tmp_path, fake_tasks, capsys):
    assert cli.main(["list"]) == 0
    assert "uci-modalities" in capsys.readouterr().out
    code = cli.main(["run", "--task", "toy-good", "--seeds", "0,1", "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "report.md").is_file()
    assert cli.main(["run", "--task", "toy-bad", "--seeds", "0", "--out", str(tmp_path / "b")]) == 1
    assert cli.main(["report", str(tmp_path)]) == 0
    with pytest.raises(SystemExit, match=r"unknown task .toy-god.\. Did you mean toy-good"):
        cli.main(["run", "--task", "toy-god"])
    with pytest.raises(SystemExit, match=r"results\.json not found: is .* a benchmark run"):
        cli.main(["report", str(tmp_path / "nowhere")])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"records": [', "not valid JSON"),
        ("[]", "holds a JSON list, expected an object"),
        ('{"records": []}', "not a benchmark run's"),
    ],
)
def test_a_damaged_results_file_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "results.json").write_text(text)
    for command in (["report", str(tmp_path)], ["run", "--resume", str(tmp_path)]):
        with pytest.raises(SystemExit, match=match):
            cli.main(command)
    with pytest.raises(SystemExit, match=match):
        cli.main(["compare", str(tmp_path), str(tmp_path)])


def test_seed_parsing_and_summary():
    assert cli.parse_seeds("3") == [3]
    assert cli.parse_seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(Exception, match="comma-separated"):
        cli.parse_seeds("x")
    assert summarise([1.0, None, 3.0]) == (2.0, pytest.approx(2**0.5), 2)


def test_report_cells_say_when_a_seed_was_not_finite(tmp_path, monkeypatch):
    def diverging(ctx):  # seed 2 diverges: its metrics are NaN (saved as null)
        acc = float("nan") if ctx.seed == 2 else 0.5 + 0.1 * ctx.seed
        return [
            {"method": "a", "dataset": "toy", "metrics": {"acc": 0.5}},
            {"method": "b", "dataset": "toy", "metrics": {"acc": acc, "ms": 1.0}},
            {"method": "c", "dataset": "toy", "metrics": {"acc": float("nan")}},
        ]

    monkeypatch.setitem(TASKS, "toy-nan", Task("toy-nan", "", diverging, "acc"))
    run_tasks(["toy-nan"], profile="quick", seeds=[0, 1, 2], out_dir=tmp_path)
    report = write_report(tmp_path).read_text()
    finite, paired = "0.5500 ± 0.0707 (n=2; 1 not finite)", "0.0500 ± 0.0707 (n=2; 1 not finite)"
    assert f"| b | 3 | {finite} | 1.0000 ± 0.0000 | {paired} |" in report
    assert "| c | 3 | not finite (3) | — | not finite (3) |" in report


def test_registry_rejects_duplicates_and_bad_profiles():
    task = TASKS["uci-modalities"]
    with pytest.raises(ValueError, match="already registered"):
        register_task(task)
    with pytest.raises(ValueError, match="unknown profiles"):
        register_task(Task("x", "", task.run, "acc", profiles=("fast",)))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_uci_task_runs_end_to_end(tmp_path, monkeypatch):
    from benchmarks.tasks import uci_modalities

    monkeypatch.setattr(uci_modalities, "EPOCHS", {"quick": 2, "full": 2})
    results = run_tasks(["uci-modalities"], profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"]
    methods = [r["method"] for r in results["records"]]
    assert methods == ["all six"] + [
        f"{m} only" for m in ("fou", "fac", "kar", "pix", "zer", "mor")
    ]
    accs = {r["method"]: r["metrics"]["accuracy"] for r in results["records"]}
    assert accs["all six"] > 0.8  # two epochs already learn the digits from all six views
    report = write_report(tmp_path).read_text()
    assert "### uci-mfeat" in report and "| mor only | 1 |" in report


def test_an_interrupted_run_resumes_with_only_what_it_lacks(tmp_path, monkeypatch):
    calls = []
    state = {"interrupt": True, "fail": True}

    def steady(ctx):
        calls.append(("steady", ctx.seed))
        return [{"method": "a", "dataset": "toy", "metrics": {"acc": 0.5 + 0.1 * ctx.seed}}]

    def flaky(ctx):  # fails on seed 1 in the first run only
        calls.append(("flaky", ctx.seed))
        if ctx.seed == 1 and state["fail"]:
            raise RuntimeError("transient")
        return [{"method": "a", "dataset": "toy", "metrics": {"acc": 0.1}}]

    def killed(ctx):  # the run is interrupted here (Ctrl-C, the machine going away)
        calls.append(("killed", ctx.seed))
        if ctx.seed == 1 and state["interrupt"]:
            raise KeyboardInterrupt
        return [{"method": "a", "dataset": "toy", "metrics": {"acc": 0.2}}]

    for name, fn in (("toy-steady", steady), ("toy-flaky", flaky), ("toy-killed", killed)):
        monkeypatch.setitem(TASKS, name, Task(name, "d", fn, "acc"))
    names = ["toy-steady", "toy-flaky", "toy-killed", "toy-later"]
    monkeypatch.setitem(TASKS, "toy-later", Task("toy-later", "d", steady, "acc"))
    with pytest.raises(KeyboardInterrupt):
        run_tasks(names, profile="quick", seeds=[0, 1], out_dir=tmp_path)
    first = json.loads((tmp_path / "results.json").read_text())
    assert sorted(map(tuple, first["meta"]["completed"])) == [
        ("toy-flaky", 0),
        ("toy-killed", 0),
        ("toy-steady", 0),
        ("toy-steady", 1),
    ]
    assert [(f["task"], f["seed"]) for f in first["failures"]] == [("toy-flaky", 1)]

    calls.clear()
    state.update(interrupt=False, fail=False)
    assert cli.main(["run", "--resume", str(tmp_path)]) == 0
    assert calls == [("flaky", 1), ("killed", 1), ("steady", 0), ("steady", 1)]  # toy-later
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failures"] == []
    pairs = [(r["task"], r["seed"]) for r in results["records"]]
    assert sorted(pairs) == sorted({(t, s) for t in names for s in (0, 1)})  # each once
    assert len(results["meta"]["resumed"]) == 1 and "finished" in results["meta"]
    assert (
        results["meta"]["task_seconds"]["toy-steady"] == first["meta"]["task_seconds"]["toy-steady"]
    )
    assert "| a | 2 |" in (tmp_path / "report.md").read_text()

    calls.clear()  # a finished run has nothing left to do
    assert cli.main(["run", "--resume", str(tmp_path)]) == 0
    assert calls == []


def test_resume_refuses_other_settings_and_folders_without_a_run(tmp_path, fake_tasks):
    run_tasks(["toy-good"], profile="quick", seeds=[0], out_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot resume a run of profile 'quick'"):
        run_tasks(["toy-good"], profile="full", seeds=[0], out_dir=tmp_path, resume=True)
    with pytest.raises(SystemExit, match=r"drop \['--seeds'\]"):
        cli.main(["run", "--resume", str(tmp_path), "--seeds", "0,1"])
    with pytest.raises(SystemExit, match=r"results\.json not found"):
        cli.main(["run", "--resume", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match=r"--data-root .*nowhere is not a folder"):
        cli.main(["run", "--task", "toy-good", "--data-root", str(tmp_path / "nowhere")])
    results = json.loads((tmp_path / "results.json").read_text())
    results["meta"]["tasks"] = ["toy-good", "toy-renamed"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"the run's tasks \['toy-renamed'\] are no longer"):
        cli.main(["run", "--resume", str(tmp_path)])


def test_resume_reads_runs_written_before_completed_pairs_were_kept(tmp_path, fake_tasks):
    run_tasks(["toy-good"], profile="quick", seeds=[0, 1], out_dir=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    del results["meta"]["completed"]
    results["records"] = [r for r in results["records"] if r["seed"] == 0]
    with atomic_write(tmp_path / "results.json") as f:
        json.dump(results, f)
    resumed = run_tasks(["toy-good"], profile="quick", seeds=[0, 1], out_dir=tmp_path, resume=True)
    assert [r["seed"] for r in resumed["records"]] == [0, 0, 1, 1]


def _results(records):
    return {"records": [{"task": "t", "dataset": "d", **r} for r in records]}


def test_compare_runs_finds_changed_figures_and_ignores_timings():
    a = _results(
        [
            {"method": "m", "seed": 0, "metrics": {"acc": 0.5, "ms_per_step": 1.0, "f1": None}},
            {"method": "m", "seed": 1, "metrics": {"acc": 0.7, "step_time_vs_x": 2.0}},
            {"method": "gone", "seed": 0, "metrics": {"acc": 0.1}},
        ]
    )
    b = _results(
        [
            {"method": "m", "seed": 0, "metrics": {"acc": 0.5, "ms_per_step": 9.0, "f1": None}},
            {"method": "m", "seed": 1, "metrics": {"acc": 0.7 + 1e-9, "step_time_vs_x": 3.0}},
        ]
    )
    exact = compare_runs(a, b)
    assert exact.compared == {"t": 3}  # acc twice and f1; the timings are not compared
    assert exact.differing == [(("t", "d", "m", 1), "acc", 0.7, 0.7 + 1e-9)]
    assert exact.only_a == [("t", "d", "gone", 0)] and exact.only_b == []
    assert not exact.equal
    assert compare_runs(a, b, tolerance=1e-6).equal
    text = format_comparison(exact)
    assert "t: 3 figures compared, 1 differ" in text and "seed 1: acc 0.7 ->" in text
    assert "1 records only in the first run" in text
    assert is_timing("adapt_samples_per_s") and is_timing("speedup_vs_per_sample_loop")
    assert not is_timing("accuracy") and not is_timing("trainable_pct_of_backbone")
    with pytest.raises(ValueError, match="tolerance"):
        compare_runs(a, b, tolerance=-1.0)
    many = _results([{"method": "m", "seed": k, "metrics": {"acc": 0.1 * k}} for k in range(5)])
    shifted = _results([{"method": "m", "seed": k, "metrics": {"acc": 1 + k}} for k in range(5)])
    listed = format_comparison(compare_runs(many, shifted), limit=2)
    assert "seed 1: acc 0.1 -> 2" in listed and "seed 2" not in listed
    assert "... and 3 more" in listed


def test_cli_compare_exit_codes(tmp_path, fake_tasks, capsys):
    for name in ("a", "b"):
        run_tasks(["toy-good"], profile="quick", seeds=[0, 1], out_dir=tmp_path / name)
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "in all: 8 figures compared (timings excluded), 0 differ" in capsys.readouterr().out
    changed = json.loads((tmp_path / "b" / "results.json").read_text())
    changed["records"][0]["metrics"]["acc"] = 0.0
    (tmp_path / "b" / "results.json").write_text(json.dumps(changed))
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")])


def test_the_cli_says_which_real_data_a_data_root_holds(tmp_path, fake_tasks, capsys):
    root = tmp_path / "data"
    (root / "BraTS2021").mkdir(parents=True)
    (root / "mosi_data.pkl").write_bytes(b"")
    out = tmp_path / "run"
    assert cli.main(["run", "--task", "toy-good", "--seeds", "0", "--out", str(out)]) == 0
    assert "--data-root" not in capsys.readouterr().err
    args = ["run", "--task", "toy-good", "--seeds", "0", "--out", str(out / "b")]
    assert cli.main([*args, "--data-root", str(root)]) == 0
    err = capsys.readouterr().err
    assert "BraTS2021: used by cggm-brats-seg" in err
    assert "mosi_data.pkl: used by" in err
    assert "UPMC-Food101: not found; generated or embedded data for wander-food101-path" in err


def test_every_reference_of_the_registered_targets_names_a_registered_task():

    references = [
        (task.name, ref)
        for task in TASKS.values()
        for target in task.targets
        for ref in target.references
    ]
    assert len(references) >= 6
    assert all((ref.task or name) in TASKS for name, ref in references)
