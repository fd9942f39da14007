"""``cggm-uci-lambda``: the weight ``λ`` of CGGM's direction term, for each of its cosines.

The released code's ``λ`` (0.05 to 0.2) was set for its cosine of weights; the paper's cosine
of gradients (``direction="gradients"``) has other magnitudes, so it needs its own. This sweep
trains CGGM on ``cggm-uci-balance``'s problem with both cosines at each ``λ`` of
:data:`LAMBDAS` and reports validation and test accuracy, one table per cosine. It is in no
profile: run it on seeds the report does not use and choose ``λ`` by validation accuracy.
"""

from __future__ import annotations

from benchmarks.registry import RunContext, Task, register_task
from benchmarks.tasks.cggm_balance import (
    CGGM_VARIANTS,
    UCI_SETTINGS,
    held_out_metrics,
    train_each_method,
    uci_problem,
)
from benchmarks.training import predict

#: the weights of the direction term tried, for each cosine
LAMBDAS = (0.2, 0.5, 1.0, 2.0)
DIRECTIONS = ("weights", "gradients")


def run(ctx: RunContext) -> list[dict]:
    """Joint training, then CGGM at every ``λ`` with each cosine (``dataset``: the cosine)."""
    variants = {
        f"CGGM, {direction}, λ={lam:g}": {"direction": direction, "lam": lam}
        for direction in DIRECTIONS
        for lam in LAMBDAS
    }
    settings = {
        **UCI_SETTINGS,
        "methods": ("joint", *variants),
        "cggm_variants": {**CGGM_VARIANTS, **variants},
    }
    splits, train, make_model, problem = uci_problem(ctx, settings)
    test = splits["test"]
    records = train_each_method(
        ctx,
        problem,
        make_model,
        train,
        splits["valid"],
        lambda model: held_out_metrics(predict(model, test), test.require_target()),
        dataset="",
        config={"train_size": len(train)},
    )
    out = []
    for record in records:
        if record["method"] == "joint":  # the reference row of both tables
            out += [{**record, "dataset": f"cosine of {d}"} for d in DIRECTIONS]
            continue
        direction = variants[record["method"]]["direction"]
        lam = variants[record["method"]]["lam"]
        out.append({**record, "dataset": f"cosine of {direction}", "method": f"λ {lam:g}"})
    return out


register_task(
    Task(
        name="cggm-uci-lambda",
        description=(
            "CGGM on cggm-uci-balance's problem with the direction term's cosine of weights "
            "(the released code's) and of gradients (the paper's) at λ = 0.2 to 2, beside joint "
            "training: validation and test accuracy, one table per cosine. In no profile: run "
            "it on seeds the report does not use, and pick λ by validation accuracy."
        ),
        run=run,
        primary_metric="valid_score",
        profiles=(),
        metrics=("valid_score", "accuracy"),
    )
)
