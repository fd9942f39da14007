"""``mplmm-lr``: the learning rate of each method trained for missing modalities.

``mplmm-mosi-missing`` and ``mplmm-uci-missing`` train modality dropout (the whole backbone),
missing-aware prompts and MPLMM (prompts and small parts on a frozen backbone) with AdamW. A
method that trains a few new parameters from scratch may want another rate than one that
fine-tunes a pretrained backbone, so each gets its own. This sweep pretrains each task's
backbone once per seed, trains every method at each rate of :data:`RATES` from it and reports
the validation score that picks the epoch (on the validation split with the training missing
rate applied) beside the test figure the report's tables use. It is in no profile: run it on
seeds the report does not use and choose each method's rate by validation score.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from benchmarks.registry import RunContext, Task, register_task
from benchmarks.tasks.mplmm_missing import (
    MOSI_SETTINGS,
    TRAINED,
    UCI_SETTINGS,
    _l1,
    _neg_mae,
    mosi_case_metrics,
    mosi_data,
    train_backbone,
    train_with_missing,
    uci_case_data,
    uci_case_metrics,
)
from benchmarks.training import accuracy

#: AdamW learning rates tried for every trained method
RATES = (3e-4, 1e-3, 3e-3, 1e-2)


def run(ctx: RunContext) -> list[dict]:
    """Both problems: one backbone per seed, then every method at every rate."""
    mosi, name = mosi_data(ctx, MOSI_SETTINGS)
    uci = uci_case_data(ctx)
    problems = (
        (
            f"{name}, Acc-2 (non-0) over the 7 cases",
            mosi,
            MOSI_SETTINGS,
            1,
            (_l1, _neg_mae),
            lambda model: {
                "acc2_non0": mosi_case_metrics("", "", model, mosi["test"])[1]["acc2_non0"]
            },
        ),
        (
            "uci-mfeat, accuracy over the 63 cases",
            uci,
            UCI_SETTINGS,
            10,
            (F.cross_entropy, accuracy),
            lambda model: {
                "accuracy_all_cases": uci_case_metrics(model, uci["test"])["accuracy_all_cases"]
            },
        ),
    )
    records = []
    for problem, data, s, out_dim, (loss_fn, score_fn), test_metrics in problems:
        ctx.progress(f"{problem}: pretraining the backbone")
        backbone = train_backbone(ctx, data, out_dim, s, loss_fn, score_fn)
        for method in TRAINED:
            for lr in RATES:
                ctx.progress(f"{problem}: {method}, lr {lr:g}")
                model, result = train_with_missing(
                    ctx, method, backbone, data, s, loss_fn, score_fn, lr=lr
                )
                metrics: dict[str, Any] = {"valid_score": result.best_score, **test_metrics(model)}
                records.append(
                    {
                        "method": f"lr {lr:g}",
                        "dataset": f"{problem}: {method}",
                        "metrics": metrics,
                        "config": {"lr": lr, "best_epoch": result.best_epoch},
                    }
                )
    return records


register_task(
    Task(
        name="mplmm-lr",
        description=(
            "The AdamW learning rate (3e-4 to 1e-2) of each method that mplmm-mosi-missing and "
            "mplmm-uci-missing train for missing modalities (modality dropout, missing-aware "
            "prompts, MPLMM), from one pretrained backbone per task and seed: the validation "
            "score that picks the epoch (negated MAE on MOSI-format data, accuracy on mfeat; "
            "training missing rate) and the test figure of the report's tables. In no profile: "
            "run it on seeds the report does not use, and pick each rate by validation score."
        ),
        run=run,
        primary_metric="valid_score",
        profiles=(),
        metrics=("valid_score", "acc2_non0", "accuracy_all_cases"),
    )
)
