"""The CGGM benchmark tasks run end to end (tiny budgets) and record every method."""

import pytest
import torch

from benchmarks.backbones import LateFusionModel
from benchmarks.cli import _resolve_tasks
from benchmarks.report import write_report
from benchmarks.runner import run_tasks
from benchmarks.tasks import cggm_balance as cb
from benchmarks.tasks import cggm_lambda
from mmcore import ModalityBatch


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
    assert [r["method"] for r in uci] == [
        *cb.UCI_SETTINGS["methods"],
        cb.UNIMODAL_REFERENCE,
        cb.UNIMODAL_ENSEMBLE,
    ]
    probes = {f"probe_{m}" for m in ("fou", "fac", "kar", "pix", "zer", "mor")}
    assert probes <= set(uci[0]["metrics"])
    assert set(uci[-2]["metrics"]) == probes  # the reference row has nothing but probes
    assert set(uci[-1]["metrics"]) == {"accuracy", "f1_weighted", "f1_macro"}
    cggm = next(r["metrics"] for r in uci if r["method"] == "CGGM")
    # six modalities: the factors rho * B_m average rho * 5 / 6
    assert cggm["grad_scale_mean"] == pytest.approx(cb.UCI_SETTINGS["cggm"]["rho"] * 5 / 6)
    assert "grad_scale_mean" not in uci[0]["metrics"]
    report = write_report(tmp_path).read_text()
    assert "cggm-uci-balance--probes.png" in report
    # every target names a table and methods the task records
    assert report.count("| cggm-uci-balance |") == 5 and "not measured" not in report
    assert (tmp_path / "plots" / "cggm-uci-balance--probes.png").is_file()
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
    memory = [r for r in records if r["dataset"].endswith(", memory")]
    records = [r for r in records if r not in memory]
    assert len({r["dataset"] for r in records}) == len({r["dataset"] for r in memory}) == 2
    for dataset in {r["dataset"] for r in memory}:
        counted = {r["method"]: r["metrics"] for r in memory if r["dataset"] == dataset}
        assert set(counted) == set(cggm_overhead.MEMORY_METHODS)
        # OGM-GE keeps nothing; CGGM keeps its classifiers, their gradients and Adam moments
        assert counted["OGM-GE"] == counted["joint"]
        assert counted["joint"]["memory_vs_joint"] == 1.0
        assert counted["CGGM"]["memory_vs_joint"] > 1.0
        assert (
            counted["CGGM"]["grad_and_optimiser_mib"] > counted["joint"]["grad_and_optimiser_mib"]
        )
        assert len({m["activation_mib"] for m in counted.values()}) == 1
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
        cb.AUTOGRAD_CGGM,
        "CGGM (λ=0, 64-unit classifiers)",
        cb.LEAN_CGGM,
    }


def test_encoder_scale_control_multiplies_only_encoder_grads_by_the_mean_cggm_factor():
    import torch

    from benchmarks.backbones import LateFusionModel
    from mmcore import ModalityBatch

    batch = ModalityBatch({m: torch.randn(8, 5) for m in "abcd"}, torch.randint(0, 3, (8,)))
    model = LateFusionModel.from_batch(batch, 3, width=4, hidden=6, head="linear")
    torch.nn.functional.cross_entropy(model(batch), batch.target).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    (method,) = cb.ENCODER_SCALE_CONTROLS
    _, extra_loss, after_backward = cb.modulation(
        model, method, task="classification", num_outputs=3, cggm_options={}
    )
    assert extra_loss is None
    after_backward(batch)
    scale = cb.ENCODER_SCALE_CONTROLS[method] * 3 / 4  # rho (M - 1) / M with M = 4
    for name, p in model.named_parameters():
        expected = scale if name.startswith("encoders.") else 1.0
        torch.testing.assert_close(p.grad, expected * before[name])


def test_scale_summary_separates_step_noise_from_a_lasting_difference():
    import torch

    # two modalities swap the larger factor every step: wide per step, equal on average
    swapping = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 5)
    summary = cb.scale_summary(swapping, ("a", "b"), steps_per_epoch=2)
    assert summary == pytest.approx(
        {
            "grad_scale_mean": 0.5,
            "grad_scale_step_range": 1.0,
            "grad_scale_modality_range": 0.0,
            "grad_scale_first_epoch_range": 0.0,
            "grad_scale_first_epoch_a": 0.5,
            "grad_scale_first_epoch_b": 0.5,
        }
    )
    lasting = torch.tensor([[0.8, 0.2]] * 10)
    assert cb.scale_summary(lasting, ("a", "b"), 2)["grad_scale_modality_range"] == pytest.approx(
        0.6
    )
    # a difference in the first epoch only, washed out over training
    early = torch.tensor([[0.9, 0.1]] * 2 + [[0.5, 0.5]] * 18)
    summary = cb.scale_summary(early, ("a", "b"), steps_per_epoch=2)
    assert summary["grad_scale_first_epoch_range"] == pytest.approx(0.8)
    assert summary["grad_scale_modality_range"] == pytest.approx(0.08)


def test_the_ensemble_reference_combines_what_each_encoder_knows():
    """Each modality carries one bit of a 4-class label: either encoder alone can reach about
    half the test samples, the linear head on both nearly all."""
    g = torch.Generator().manual_seed(0)
    n = 400
    bits = torch.randint(0, 2, (n, 2), generator=g)
    inputs = {
        m: (2.0 * bits[:, i : i + 1] - 1) + 0.3 * torch.randn(n, 3, generator=g)
        for i, m in enumerate(("a", "b"))
    }
    data = ModalityBatch(inputs, target=2 * bits[:, 0] + bits[:, 1])
    train, test = data.select(slice(0, 300)), data.select(slice(300, n))
    torch.manual_seed(0)
    encoders = {  # untrained: random features that keep each modality's bit
        m: LateFusionModel.from_batch(train, 4, modalities=(m,), width=16, head="linear")
        for m in ("a", "b")
    }
    both = cb.ensemble_metrics(encoders, train, test)["accuracy"]
    alone = [cb.ensemble_metrics({m: e}, train, test)["accuracy"] for m, e in encoders.items()]
    assert both > 0.95 and max(alone) < 0.6


def test_a_diverged_run_scores_nan_so_the_report_counts_only_the_others():
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    from mmcore.metrics import classification_metrics

    assert cb.held_out_metrics(logits, target) == classification_metrics(logits, target)
    logits[2, 1] = float("nan")
    metrics = cb.held_out_metrics(logits, target)
    assert set(metrics) == {"accuracy", "f1_weighted", "f1_macro"}
    assert all(v != v for v in metrics.values())  # NaN


def test_real_brats_cases_are_capped_at_the_profiles_counts(tmp_path, tiny):
    from benchmarks.data.brats import write_brats_case
    from benchmarks.data.pickles import DataFormatError
    from benchmarks.registry import RunContext

    root = tmp_path / "data" / "BraTS2021"
    for i in range(7):
        write_brats_case(root, i, shape=(16, 16, 6), seed=i)
    status = []
    ctx = RunContext(0, "quick", tmp_path / "data", tmp_path / "work", progress=status.append)
    train, test, name = cb.brats_splits(ctx)  # the profile asks for 3 train and 1 test case
    assert name == "BraTS 2021"
    assert {i.split(":")[0] for i in test.sample_ids} == {"BraTS2021_00000"}
    assert {i.split(":")[0] for i in train.sample_ids} == {f"BraTS2021_0000{i}" for i in (1, 2, 3)}
    assert status[-4:] == [
        *(f"reading train cases {i}/3" for i in (1, 2, 3)),
        "reading test cases 1/1",
    ]
    assert not (tmp_path / "work").exists()  # nothing generated
    for case in sorted(root.iterdir())[1:]:
        for f in case.iterdir():
            f.unlink()
        case.rmdir()
    with pytest.raises(DataFormatError, match="1 BraTS case folder"):
        cb.brats_splits(ctx)


def test_lambda_sweep_runs_only_when_named_and_gives_one_table_per_cosine(
    tmp_path, tiny, monkeypatch
):
    assert "cggm-uci-lambda" not in _resolve_tasks(None, "quick") + _resolve_tasks(None, "full")
    # the report's variant takes a λ the sweep tries
    assert cb.CGGM_VARIANTS["CGGM (gradient directions, λ=2)"]["lam"] in cggm_lambda.LAMBDAS
    monkeypatch.setattr(cggm_lambda, "LAMBDAS", (0.5, 2.0))
    variants_before = dict(cb.CGGM_VARIANTS)
    results = run_tasks(["cggm-uci-lambda"], profile="quick", seeds=[0], out_dir=tmp_path)
    assert not results["failures"], results["failures"]
    tables = {}
    for r in results["records"]:
        tables.setdefault(r["dataset"], []).append(r["method"])
        assert {"valid_score", "accuracy"} <= set(r["metrics"])
    assert tables == {
        "cosine of weights": ["joint", "λ 0.5", "λ 2"],
        "cosine of gradients": ["joint", "λ 0.5", "λ 2"],
    }
    assert variants_before == cb.CGGM_VARIANTS  # the sweep's options stay its own
