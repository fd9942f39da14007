"""Wander's training-step time beside its baselines as the backbone grows.

``wander-uci-transfer`` times every method on its small backbone (encoder width 32, hidden 256,
25 samples per batch), whose head-only step takes about 1.3 ms on two CPU cores; there, each
adapter's few dozen kernel calls and its optimiser's per-tensor work are a fixed cost as large
as the frozen backbone's whole forward pass. This task takes the same methods (untrained: step
time does not depend on the weights) on the same real UCI features with wider backbones and
larger batches, and reports each step as a ratio to head-only, so the report shows how the
ratio changes as the backbone's own work grows. At the first size, head-only, Houlsby and
Wander are timed again with every model through ``torch.compile`` (inductor), which fuses
most of those small calls: the same ratio when the fixed cost is compiled away. Then once more
with only Wander's adapter compiled (``wander.adapter.compile()``) beside eager head-only: what
a user gets by compiling the adapter alone, leaving their own model as it is. And at the first
size, eager, the sub-5 % Wander beside the same forward written by hand for this backbone
(:class:`benchmarks.baselines.wander_lean.LeanWander`: no hooks, checks or general paths), with
and without the frozen copy that the centred init subtracts: how much of the ratio is the
library's and how much the method's own arithmetic.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.backbones import LateFusionModel
from benchmarks.baselines.wander_lean import LeanWander
from benchmarks.memory import memory_records
from benchmarks.registry import RunContext, Task, register_task
from benchmarks.report import pyplot, save_figure, summarise
from benchmarks.tasks.common import uci_splits
from benchmarks.tasks.wander_transfer import (
    ADAPTER_COMPILED_WHAT,
    BY_HAND,
    BY_HAND_WHAT,
    COMPILED_WHAT,
    STEP_SIZE,
    SUB_5_PERCENT,
    UCI_SETTINGS,
    build_method,
    select_classes,
    step_memories,
    step_table,
    step_times,
)
from benchmarks.training import (
    make_optimizer,
    median_times,
    step_time_records,
    steps_per_round,
    train_step,
)
from mmcore import ModalityBatch
from wander import Wander

#: (encoder width, encoder hidden size, batch size); the first is ``wander-uci-transfer``'s.
SIZES = (STEP_SIZE, (128, 1024, 128), (256, 2048, 256))
#: timed again through ``torch.compile`` at the first size, where the step is fixed cost
COMPILED = ("head-only", "Houlsby adapter", "Wander", "Wander (r=4, tiled)")
#: timed again at the first size with only Wander's adapter compiled, beside eager head-only
ADAPTER_COMPILED = ("head-only", "Wander", "Wander (r=4, tiled)")


def sized_settings(width: int, hidden: int, batch_size: int) -> dict:
    """``wander-uci-transfer``'s methods at another size (Wander's tiled token: ``3 · width``)."""
    variants = UCI_SETTINGS["wander_variants"]
    return {
        **UCI_SETTINGS,
        "width": width,
        "hidden": hidden,
        "batch_size": batch_size,
        "wander_variants": {
            "Wander": variants["Wander"],
            "Wander (r=4, tiled)": {**variants["Wander (r=4, tiled)"], "fused_dim": 3 * width},
        },
    }


def run(ctx: RunContext) -> list[dict]:
    """Every method's time per training step at each size, as a ratio to head-only."""
    train = select_classes(uci_splits(ctx)["train"], range(5, 10))
    records = []
    for width, hidden, batch_size in SIZES:
        name = f"width {width}, hidden {hidden}, batch {batch_size}"
        size = (width, hidden, batch_size)
        ctx.progress(name)
        settings = sized_settings(width, hidden, batch_size)
        torch.manual_seed(ctx.seed)
        base = LateFusionModel.from_batch(train, 5, width=width, hidden=hidden, head="linear")
        calls = steps_per_round(batch_size, SIZES[0][2])
        seconds = step_times(base, train, settings, F.cross_entropy, ctx.seed, calls=calls)
        config = {"width": width, "hidden": hidden, "batch_size": batch_size}
        records += step_time_records(seconds, "head-only", dataset=step_table(*size), config=config)
        memories = step_memories(base, train, settings, F.cross_entropy, ctx.seed)
        records += memory_records(
            memories, "full fine-tuning", dataset=step_table(*size, "memory"), config=config
        )
        if (width, hidden, batch_size) == SIZES[0]:
            ctx.progress(f"{name}, written by hand")
            seconds = by_hand_step_times(base, train, settings, ctx.seed, calls)
            records += step_time_records(
                seconds,
                "head-only",
                dataset=step_table(*size, BY_HAND_WHAT),
                config={**config, "by_hand": True},
            )
        if (width, hidden, batch_size) == SIZES[0] and COMPILED:
            ctx.progress(f"{name}, torch.compile")
            try:
                seconds = step_times(
                    base, train, settings, F.cross_entropy, ctx.seed, only=COMPILED, compiled=True
                )
            except Exception as err:  # inductor needs a C++ compiler; the eager rows stand
                warnings.warn(f"torch.compile rows skipped: {err}", stacklevel=1)
                continue
            records += step_time_records(
                seconds,
                "head-only",
                dataset=step_table(*size, COMPILED_WHAT),
                config={**config, "compiled": True},
            )
            ctx.progress(f"{name}, Wander's adapter through torch.compile")
            seconds = step_times(
                base,
                train,
                settings,
                F.cross_entropy,
                ctx.seed,
                only=ADAPTER_COMPILED,
                adapter_compiled=True,
            )
            records += step_time_records(
                seconds,
                "head-only",
                dataset=step_table(*size, ADAPTER_COMPILED_WHAT),
                config={**config, "adapter_compiled": True},
            )
    return records


def by_hand_step_times(
    base: LateFusionModel, train: ModalityBatch, settings: dict, seed: int, calls: int
) -> dict[str, float]:
    """Seconds per step of head-only, the sub-5 % Wander and its :data:`BY_HAND` forwards.

    Fresh copies of ``base``, one batch, interleaved rounds (as :func:`step_times`); every
    Wander variant trains the same tensors at the same learning rate.
    """
    batch = next(iter(train.split(settings["batch_size"])))
    models: dict[str, torch.nn.Module] = {
        "head-only": build_method("head-only", base, train, settings, seed),
        SUB_5_PERCENT: build_method(SUB_5_PERCENT, base, train, settings, seed),
    }
    for name, centred in BY_HAND.items():
        wander = build_method(SUB_5_PERCENT, base, train, settings, seed)
        models[name] = LeanWander(cast(Wander, wander), centred=centred)
    steps = {}
    for name, model in models.items():
        lr = settings["lr"]["head-only" if name == "head-only" else SUB_5_PERCENT]
        optimiser = make_optimizer(model.train(), lr=lr)
        steps[name] = functools.partial(train_step, model, optimiser, batch, F.cross_entropy)
    return median_times(steps, rounds=7, calls=calls)


def plot_memory(records: list[dict], plot_dir: Path) -> list[tuple[str, Path]]:
    """What a training step holds per method, split by kind, one panel per backbone size."""
    plt = pyplot()

    rows = [r for r in records if r["dataset"].endswith(", memory")]
    if not rows:
        return []
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    kinds = (
        ("parameters (frozen and trained)", "#8C8C8C"),
        ("gradients + optimiser state", "#4C72B0"),
        ("activations saved for the backward", "#DD8452"),
    )
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(4.2 * len(datasets), 0.35 * len(methods) + 1.8), sharey=True
    )
    for ax, dataset in zip(np.atleast_1d(axes), datasets, strict=True):
        # deterministic counts: every seed gives the same figure, so the mean is the value
        mean = {
            (method, key): summarise(
                [
                    r["metrics"][key]
                    for r in rows
                    if r["dataset"] == dataset and r["method"] == method
                ]
            )[0]
            for method in methods
            for key in ("total_mib", "grad_and_optimiser_mib", "activation_mib")
        }
        parts = [
            [
                mean[m, "total_mib"] - mean[m, "grad_and_optimiser_mib"] - mean[m, "activation_mib"]
                for m in methods
            ],
            [mean[m, "grad_and_optimiser_mib"] for m in methods],
            [mean[m, "activation_mib"] for m in methods],
        ]
        left = np.zeros(len(methods))
        for values, (label, colour) in zip(parts, kinds, strict=True):
            ax.barh(methods, values, left=left, color=colour, label=label)
            left += np.array(values)
        ax.set_title(dataset.removeprefix("uci-mfeat 5-9, ").removesuffix(", memory"), fontsize=9)
        ax.set_xlabel("MiB per training step")
        ax.grid(axis="x", alpha=0.3)
    first = np.atleast_1d(axes)[0]
    first.invert_yaxis()
    first.legend(loc="lower right", fontsize=7)
    path = plot_dir / "wander-step-overhead--memory.png"
    save_figure(fig, path)
    return [("Memory one training step holds, by kind (counted tensor by tensor)", path)]


register_task(
    Task(
        name="wander-step-overhead",
        description=(
            "Training-step time of head-only, full fine-tuning, LoRA (peft), Houlsby and Wander "
            "on real UCI mfeat features as the late-fusion backbone widens and the batch grows "
            "(the first size is wander-uci-transfer's): ratio to head-only and overhead in ms, "
            "median over interleaved rounds; at the first size also head-only, Houlsby and "
            "Wander all through torch.compile (ratio to compiled head-only), and Wander with only "
            "its adapter compiled (ratio to eager head-only), and the sub-5% Wander beside its "
            "forward written by hand for this backbone (no hooks, checks or general paths), "
            "with and without the frozen copy the centred init subtracts."
        ),
        run=run,
        plots=plot_memory,
        primary_metric="step_time_vs_head_only",
        higher_is_better=False,
        metrics=(
            "ms_per_step",
            "overhead_ms_vs_head_only",
            "step_time_vs_head_only",
            "memory_vs_full_fine_tuning",
            "total_mib",
            "grad_and_optimiser_mib",
            "activation_mib",
        ),
    )
)
