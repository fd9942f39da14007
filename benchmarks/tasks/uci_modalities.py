"""UCI mfeat (real data): the late-fusion backbone on all six modalities and on each one alone.

The unimodal rows show how unequal the six views are (the imbalance CGGM targets); the
all-modality row is the reference every method package compares against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.backbones import LateFusionModel
from benchmarks.data.uci import UCI_MODALITIES
from benchmarks.registry import RunContext, Task, register_task
from benchmarks.tasks.common import uci_splits
from benchmarks.training import accuracy, count_parameters, fit, predict
from mmcore.metrics import classification_metrics

EPOCHS = {"quick": 25, "full": 100}
WIDTH, HIDDEN = 32, 64


def run(ctx: RunContext) -> list[dict]:
    """Train one backbone per modality set and report test metrics."""
    splits = uci_splits(ctx)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    settings = [("all six", UCI_MODALITIES)] + [(f"{m} only", (m,)) for m in UCI_MODALITIES]
    records = []
    for method, modalities in settings:
        ctx.progress(method)
        torch.manual_seed(ctx.seed)
        model = LateFusionModel.from_batch(
            train, out_dim=10, modalities=modalities, width=WIDTH, hidden=HIDDEN
        )
        result = fit(
            model,
            train,
            valid,
            loss_fn=F.cross_entropy,
            score_fn=accuracy,
            epochs=EPOCHS[ctx.profile],
            seed=ctx.seed,
        )
        metrics = classification_metrics(predict(model, test), test.require_target())
        records.append(
            {
                "method": method,
                "dataset": "uci-mfeat",
                "metrics": {
                    **metrics,
                    "valid_accuracy": result.best_score,
                    "parameters": count_parameters(model),
                    "ms_per_step": 1000 * result.seconds_per_step,
                },
                "config": {
                    "modalities": list(modalities),
                    "epochs": EPOCHS[ctx.profile],
                    "best_epoch": result.best_epoch,
                    "width": WIDTH,
                    "hidden": HIDDEN,
                    "optimiser": "AdamW(lr=1e-3, wd=1e-4), batch 64",
                    "splits": {k: len(v) for k, v in splits.items()},
                },
            }
        )
    return records


register_task(
    Task(
        name="uci-modalities",
        description=(
            "UCI mfeat (real, 6 modalities, 10 digits): late-fusion MLP backbone on all six "
            "modalities and on each one alone; test accuracy and F1 (fixed 60/20/20 split, epoch "
            "picked on valid)."
        ),
        run=run,
        primary_metric="accuracy",
        metrics=(
            "accuracy",
            "f1_macro",
            "f1_weighted",
            "valid_accuracy",
            "parameters",
            "ms_per_step",
        ),
    )
)
