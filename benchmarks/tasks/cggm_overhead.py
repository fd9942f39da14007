"""CGGM's step-time overhead as the model grows: fixed cost or proportional?

``cggm-uci-balance`` times a small network (width 16, hidden 64, batch 32) whose whole joint
step takes about 2 ms on two CPU cores. There, CGGM's per-step work is a few dozen small kernel
calls: the six classifiers' forward, backward and Adam step, the scores, the gradient scaling
and the direction term. Their fixed cost is a large part of the step. This task times the same
methods on the same real UCI features with wider encoders and larger batches, and reports the
overhead in milliseconds beside the ratio to joint training.

It also shows the cost that grows: each default classifier is ``Linear(d, F) → ReLU →
Linear(F, C)``, where ``F`` is the width of the model head's input, because the direction term
compares the classifiers' final weights with the head's. With concatenation fusion
``F = M · d``, so the classifiers cost ``M · d · F`` multiply-adds per sample, about as much
as the model itself at large widths. One row drops the direction term (``lam=0``), which
lets the classifiers be small (``classifier_hidden=64``).

Two rows measure the implementation: CGGM with its stacked classifiers' backward through
autograd (``hand_backward = False``; the shipped step writes it by hand), and CGGM's whole step
written by hand for this case (:class:`benchmarks.baselines.cggm_lean.LeanCGGM`:
classification on vector features, no checks; tested to train exactly as ``cggm.CGGM``), what
is left once the implementation's own calls are gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.backbones import LateFusionModel
from benchmarks.memory import StepMemory, memory_records, step_memory
from benchmarks.registry import RunContext, Task, register_task
from benchmarks.tasks.cggm_balance import (
    AUTOGRAD_CGGM,
    LEAN_CGGM,
    STEP_SIZE,
    UCI_SETTINGS,
    method_step_times,
    modulation,
    step_table,
)
from benchmarks.tasks.common import uci_splits
from benchmarks.training import (
    make_optimizer,
    step_time_records,
    steps_per_round,
)
from cggm import CGGM
from mmcore import ModalityBatch

#: the methods whose memory is counted: the two implementation rows hold what CGGM holds
MEMORY_METHODS = ("joint", "OGM-GE", "CGGM", "CGGM (λ=0, 64-unit classifiers)")

#: (encoder width, encoder hidden size, batch size); the first is ``cggm-uci-balance``'s.
SIZES = (STEP_SIZE, (64, 256, 128), (256, 1024, 256))


def step_memories(
    make_model: Callable[[], nn.Module], batch: ModalityBatch, settings: dict
) -> dict[str, StepMemory]:
    """What one training step of each of :data:`MEMORY_METHODS` holds.

    Counted by :mod:`benchmarks.memory`, CGGM's classifiers and their optimiser included.
    """
    memories = {}
    for method in MEMORY_METHODS:
        model = make_model().train()
        modulator, extra_loss, after_backward = modulation(
            model, method, task="classification", num_outputs=10, cggm_options=settings["cggm"]
        )
        optimiser = make_optimizer(
            model, settings["optimizer"], lr=settings["lr"], weight_decay=0.0
        )

        def beside(modulator: object = modulator) -> list[tuple[nn.Module, Any]]:
            if isinstance(modulator, CGGM) and modulator.classifiers is not None:
                return [(modulator.classifiers, modulator.optimizer)]
            return []

        memories[method] = step_memory(
            model, optimiser, batch, F.cross_entropy, extra_loss, after_backward, beside
        )
        if isinstance(modulator, CGGM):
            modulator.remove()
    return memories


def run(ctx: RunContext) -> list[dict]:
    """Joint training, OGM-GE and CGGM: time per training step at each size."""
    train = uci_splits(ctx)["train"]
    settings = {
        **UCI_SETTINGS,
        "methods": (
            "joint",
            "OGM-GE",
            "CGGM",
            AUTOGRAD_CGGM,
            "CGGM (λ=0, 64-unit classifiers)",
            LEAN_CGGM,
        ),
    }
    records = []
    for width, hidden, batch_size in SIZES:
        name = f"width {width}, hidden {hidden}, batch {batch_size}"
        ctx.progress(name)
        batch = next(iter(train.split(batch_size)))

        def make_model(width: int = width, hidden: int = hidden) -> LateFusionModel:
            torch.manual_seed(ctx.seed)
            return LateFusionModel.from_batch(train, 10, width=width, hidden=hidden, head="linear")

        seconds = method_step_times(
            make_model,
            batch,
            settings,
            loss_fn=F.cross_entropy,
            task="classification",
            num_outputs=10,
            rounds=7 if ctx.profile == "quick" else 15,
            calls=steps_per_round(batch_size, SIZES[0][2]),
        )
        config = {"width": width, "hidden": hidden, "batch_size": batch_size}
        records += step_time_records(
            seconds, "joint", dataset=step_table(width, hidden, batch_size), config=config
        )
        memories = step_memories(make_model, batch, settings)
        records += memory_records(
            memories,
            "joint",
            dataset=f"{step_table(width, hidden, batch_size)}, memory",
            config=config,
        )
    return records


register_task(
    Task(
        name="cggm-step-overhead",
        description=(
            "Step time of joint training, OGM-GE, CGGM, CGGM with its classifiers' backward "
            "through autograd, CGGM without its direction term (small classifiers) and CGGM's "
            "step written by hand for this case (the same maths, no checks) on real UCI mfeat "
            "features as the late-fusion network widens and the batch grows (the first size is "
            "cggm-uci-balance's): ratio to joint training and overhead in ms, median over "
            "interleaved rounds."
        ),
        run=run,
        primary_metric="step_time_vs_joint",
        higher_is_better=False,
        metrics=(
            "ms_per_step",
            "overhead_ms_vs_joint",
            "step_time_vs_joint",
            "memory_vs_joint",
            "total_mib",
            "grad_and_optimiser_mib",
            "activation_mib",
        ),
    )
)
