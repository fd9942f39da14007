"""Which Wander shape ``wander-uci-transfer`` reports under 5 % of the backbone.

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

from benchmarks.registry import RunContext, Task, register_task
from benchmarks.tasks.wander_transfer import UCI_SETTINGS, plot_tradeoff, transfer_uci


def _ranks(bottleneck: int, feature: int = 1) -> dict[str, int]:
    return {"bottleneck": bottleneck, "feature": feature, "token": 1}


_HIDDEN = {"target_layer": "net.2"}  # read each encoder's hidden layer, as "Wander" does

#: Every shape under 5 % of the backbone (head included). "tiled D": one D-feature fused token
#: tiled over the head's 192-feature input; otherwise the token has 192 features.
SHAPES = {
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
}

SETTINGS = {
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
