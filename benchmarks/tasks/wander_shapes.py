"""Choices behind ``wander-uci-transfer``, made on seeds its report does not use.

``wander-uci-shapes``: which Wander shape it reports under 5 % of the backbone.
``wander-uci-lr``: each method's learning rate.

Wander's parameters are mostly its down-projections (``hidden × r`` per modality) and its
feature factors (``(r + 1) × D`` per modality), so under 5 % of the backbone the bottleneck
``r`` and the fused token's size ``D`` trade against each other. This task trains each
sub-5 % shape beside head-only, full fine-tuning, LoRA (r=2) and Houlsby on the transfer task
(2 draws of the labelled samples per seed) and reports validation and test accuracy.

It is in no profile: run it explicitly on seeds the report does not use, and pick by
validation accuracy, so the choice is not tuned on the reported test figures::

    python -m benchmarks run --task wander-uci-shapes --seeds 10,11,12
"""

from __future__ import annotations

import functools
from typing import Any

from benchmarks.registry import RunContext, Task, register_task
from benchmarks.tasks.wander_transfer import (
    UCI_SETTINGS,
    plot_tradeoff,
    pretrain_uci,
    transfer_uci,
)


def _ranks(bottleneck: int, feature: int = 1) -> dict[str, int]:
    return {"bottleneck": bottleneck, "feature": feature, "token": 1}


_HIDDEN = {"target_layer": "net.2"}  # read each encoder's hidden layer, as "Wander" does

#: Every shape under 5 % of the backbone (head included). "tiled D": one D-feature fused token
#: tiled over the head's 192-feature input; otherwise the token has 192 features. "residual":
#: the other output mode, a cross-modal residual added to each encoder's 32-feature output.
SHAPES: dict[str, Any] = {
    "Wander (r=2)": {**_HIDDEN, "ranks": _ranks(2)},
    "Wander (r=2, R_d=2)": {**_HIDDEN, "ranks": _ranks(2, feature=2)},
    "Wander (r=3)": {**_HIDDEN, "ranks": _ranks(3)},
    "Wander (r=3, tiled 96)": {**_HIDDEN, "ranks": _ranks(3), "fused_dim": 96},
    "Wander (r=4, tiled 64)": {**_HIDDEN, "ranks": _ranks(4), "fused_dim": 64},
    "Wander (r=4, tiled 96)": {**_HIDDEN, "ranks": _ranks(4), "fused_dim": 96},
    "Wander (r=5, tiled 32)": {**_HIDDEN, "ranks": _ranks(5), "fused_dim": 32},
    "Wander (r=5, tiled 64)": {**_HIDDEN, "ranks": _ranks(5), "fused_dim": 64},
    "Wander (encoder outputs)": {},
    "Wander (encoder outputs, r=8, tiled 96)": {"ranks": _ranks(8), "fused_dim": 96},
    "Wander (encoder outputs, r=16, tiled 32)": {"ranks": _ranks(16), "fused_dim": 32},
    "Wander (residual, r=4)": {"output": "residual", "ranks": _ranks(4)},
    "Wander (residual, r=8)": {"output": "residual", "ranks": _ranks(8)},
    "Wander (residual, r=16)": {"output": "residual", "ranks": _ranks(16)},
}

SETTINGS: dict[str, Any] = {
    **UCI_SETTINGS,
    "lora_ranks": {"LoRA (peft)": 2},
    "wander_variants": SHAPES,
    "lr": {**UCI_SETTINGS["lr"], **dict.fromkeys(SHAPES, 3e-3)},
}

DRAWS = 2


def run(ctx: RunContext) -> list[dict]:
    """The baselines and every sub-5 % shape, averaged over :data:`DRAWS` draws."""
    return transfer_uci(ctx, SETTINGS, DRAWS, time_steps=False)


register_task(
    Task(
        name="wander-uci-shapes",
        description=(
            "Wander's shapes under 5% of the backbone on wander-uci-transfer (2 draws per "
            "seed), beside head-only, full fine-tuning, LoRA r=2 and Houlsby: validation and "
            "test accuracy. In no profile: run it on seeds the report does not use."
        ),
        run=run,
        plots=functools.partial(plot_tradeoff, task="wander-uci-shapes"),
        primary_metric="valid_score",
        profiles=(),
        metrics=("valid_score", "accuracy", "trainable_params", "trainable_pct_of_backbone"),
    )
)


#: the learning rates ``wander-uci-lr`` tries for every method
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
#: the methods it tunes: the baselines, LoRA at r=2, and the two Wander rows the targets are
#: about
LR_METHODS = {"lora_ranks": ("LoRA (peft)",), "wander_variants": ("Wander", "Wander (r=4, tiled)")}


def run_lr(ctx: RunContext) -> list[dict]:
    """Every method at every rate in :data:`LEARNING_RATES`: one table per method.

    Each table's rows are the rates (``dataset``: the method, ``method``: ``"lr …"``), so the
    report's paired column compares a method's rates on the same draws.
    """
    chosen = {key: {k: UCI_SETTINGS[key][k] for k in names} for key, names in LR_METHODS.items()}
    base = pretrain_uci(ctx, UCI_SETTINGS)  # the rates share one pretrained backbone
    records = []
    for lr in LEARNING_RATES:
        settings = {**UCI_SETTINGS, **chosen, "lr": dict.fromkeys(UCI_SETTINGS["lr"], lr)}
        for record in transfer_uci(ctx, settings, DRAWS, time_steps=False, base=base):
            records.append({**record, "dataset": record["method"], "method": f"lr {lr:g}"})
    return records


register_task(
    Task(
        name="wander-uci-lr",
        description=(
            "Each method of wander-uci-transfer (LoRA at r=2, Wander and its sub-5% shape) at "
            "learning rates 1e-3 to 3e-2 (2 draws per seed): validation and test accuracy, one "
            "table per method. In no profile: run it on seeds the report does not use, and "
            "pick each method's rate by validation accuracy."
        ),
        run=run_lr,
        primary_metric="valid_score",
        profiles=(),
        metrics=("valid_score", "accuracy"),
    )
)


#: the output scales and interaction inits ``wander-uci-init`` tries on the sub-5 % shape
OUTPUT_SCALES = (0.1, 0.3, 1.0, 3.0)
INTERACTION_INITS = (0.03, 0.1, 0.3)


def init_variants() -> dict[str, Any]:
    """The sub-5 % Wander at every (output scale, interaction init) pair, by name."""
    tiled = UCI_SETTINGS["wander_variants"]["Wander (r=4, tiled)"]
    return {
        f"scale {scale:g}, ε {eps:g}": {**tiled, "output_scale": scale, "interaction_init": eps}
        for scale in OUTPUT_SCALES
        for eps in INTERACTION_INITS
    }


def run_init(ctx: RunContext) -> list[dict]:
    """The sub-5 % Wander at every pair of :func:`init_variants` beside LoRA r=2 (one table).

    The default pair (0.1, 0.3) is among them, so the rows compare with the reported shape.
    """
    variants = init_variants()
    settings = {
        **UCI_SETTINGS,
        "lora_ranks": {"LoRA (peft)": 2},
        "wander_variants": variants,
        "lr": {**UCI_SETTINGS["lr"], **dict.fromkeys(variants, UCI_SETTINGS["lr"]["Wander"])},
    }
    records = transfer_uci(ctx, settings, DRAWS, time_steps=False)
    kept = ("LoRA (peft)", *variants)
    return [r for r in records if r["method"] in kept]


register_task(
    Task(
        name="wander-uci-init",
        description=(
            "The sub-5% Wander of wander-uci-transfer at output scales "
            f"{', '.join(f'{v:g}' for v in OUTPUT_SCALES)} and interaction inits "
            f"{', '.join(f'{v:g}' for v in INTERACTION_INITS)} (2 draws per seed), beside LoRA "
            "r=2: validation and test accuracy. In no profile: run it on seeds the report does "
            "not use."
        ),
        run=run_init,
        primary_metric="valid_score",
        profiles=(),
        metrics=("valid_score", "accuracy"),
    )
)
