"""The harness's training loop: optimisers, best-epoch restore, step timing."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks.backbones import LateFusionModel
from benchmarks.training import (
    accuracy,
    add_ratio_column,
    fit,
    median_times,
    predict,
    step_time_records,
)
from mmcore import ModalityBatch


def separable(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    signal = (2 * y - 1).float()[:, None]
    inputs = {
        "a": signal + 0.5 * torch.randn(n, 4, generator=g),
        "b": signal + 0.5 * torch.randn(n, 3, generator=g),
    }
    return ModalityBatch(inputs, target=y)


@pytest.mark.parametrize(("optimizer", "lr"), [("adamw", 1e-2), ("sgd", 5e-2)])
def test_fit_learns_and_restores_the_best_epoch(optimizer, lr):
    train, valid = separable(), separable(seed=1)
    torch.manual_seed(0)
    model = LateFusionModel.from_batch(train, 2, width=4, hidden=8, head="linear")
    result = fit(
        model,
        train,
        valid,
        loss_fn=F.cross_entropy,
        score_fn=accuracy,
        epochs=8,
        lr=lr,
        batch_size=32,
        optimizer=optimizer,
    )
    assert result.best_score > 0.9
    assert accuracy(predict(model, valid), valid.target) == pytest.approx(result.best_score)
    assert result.steps == 8 * 3 and result.seconds_per_step > 0
    assert not model.training


def test_fit_rejects_an_unknown_optimizer():
    train = separable(8)
    model = LateFusionModel.from_batch(train, 2, width=4, hidden=8)
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'sgd'"):
        fit(
            model,
            train,
            train,
            loss_fn=F.cross_entropy,
            score_fn=accuracy,
            epochs=1,
            optimizer="lbfgs",
        )


def test_median_times_interleaves_and_ranks_by_cost():
    calls = []

    def short():
        calls.append("short")
        time.sleep(0.001)

    def long():
        calls.append("long")
        time.sleep(0.004)

    times = median_times({"short": short, "long": long}, rounds=3, calls=2)
    assert times["long"] > 2 * times["short"]
    timed = calls[2:]  # after one warm-up call each: short, long, short, long, ... in pairs
    assert timed == ["short", "short", "long", "long"] * 3


def test_step_time_records_give_overhead_and_ratio_to_the_reference():
    records = step_time_records(
        {"head-only": 0.002, "Wander": 0.005}, "head-only", dataset="d", config={"width": 8}
    )
    by_method = {r["method"]: r["metrics"] for r in records}
    assert by_method["Wander"] == pytest.approx(
        {"ms_per_step": 5.0, "overhead_ms_vs_head_only": 3.0, "step_time_vs_head_only": 2.5}
    )
    assert by_method["head-only"]["step_time_vs_head_only"] == 1.0
    assert all(r["dataset"] == "d" and r["config"] == {"width": 8} for r in records)


def test_ratio_column_is_left_out_where_the_figure_does_not_apply():
    records = [
        {"method": "source-only", "metrics": {"acc": 0.9}},  # adapts nothing: no speed
        {"method": "Tent", "metrics": {"acc": 0.9, "speed": 200.0}},
        {"method": "CASP", "metrics": {"acc": 0.9, "speed": 50.0}},
        {"method": "diverged", "metrics": {"acc": 0.9, "speed": float("nan")}},
    ]
    by_method = {r["method"]: r["metrics"] for r in add_ratio_column(records, "Tent", "speed", "r")}
    assert "r" not in by_method["source-only"]  # the report prints "—", not "not finite"
    assert by_method["Tent"]["r"] == 1.0 and by_method["CASP"]["r"] == 0.25
    assert math.isnan(by_method["diverged"]["r"])  # measured and not finite: it stays so
    without = [{"method": "Tent", "metrics": {}}, {"method": "CASP", "metrics": {"speed": 1.0}}]
    assert all("r" not in r["metrics"] for r in add_ratio_column(without, "Tent", "speed", "r"))
