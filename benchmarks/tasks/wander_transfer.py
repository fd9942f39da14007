"""Wander beside its baselines: transfer a frozen multimodal backbone to a new task.

Two tasks, each with the same methods on the same pretrained backbone per seed: head-only,
full fine-tuning, LoRA (the real ``peft`` library, on the encoders' linear layers), a Houlsby
bottleneck adapter after every encoder, and Wander (fused tokens added to the fusion output;
adapter + head trained) in the variants each task's settings list.

* ``wander-uci-transfer`` (real data): the late-fusion MLP backbone pretrained on UCI mfeat digits
  0–4 (all six modalities), adapted to digits 5–9 with a few labels per class.
* ``wander-mosi-interaction`` (generated MOSI-format pickles): a MulT-style transformer backbone
  pretrained on data whose label is additive in the modalities, adapted to data of the same
  feature distribution whose label also holds a cross-modal product (the structure Wander's
  outer-product fusion is built for); MSA metrics.

Step time is reported as a ratio to head-only: after training, fresh copies of every method take
training steps on one batch in interleaved rounds (median), so each method's time is measured
under the same machine load.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.backbones import LateFusionModel
from benchmarks.baselines.peft import add_houlsby_adapters, apply_lora, freeze_all_but
from benchmarks.data.generators import PlantedStructure, write_mult_pickle
from benchmarks.data.pickles import load_mult_pickle
from benchmarks.memory import StepMemory, step_memory
from benchmarks.registry import Reference, RunContext, Target, Task, register_task
from benchmarks.report import pyplot, save_figure, summarise
from benchmarks.tasks.common import FOOD101_DIR, count_progress, real_data, uci_splits
from benchmarks.training import (
    accuracy,
    add_ratio_column,
    count_parameters,
    fit,
    make_optimizer,
    median_times,
    predict,
    train_step,
)
from mmcore import ModalityBatch
from mmcore.metrics import classification_metrics, msa_regression_metrics
from wander import Wander


def methods(settings: dict) -> tuple[str, ...]:
    """Head-only, full fine-tuning, the task's LoRA ranks, Houlsby, then its Wander variants."""
    return (
        "head-only",
        "full fine-tuning",
        *settings["lora_ranks"],
        "Houlsby adapter",
        *settings["wander_variants"],
    )


def select_classes(
    batch: ModalityBatch, classes: range, shots: int | None = None, seed: int = 0
) -> ModalityBatch:
    """Samples of ``classes`` (relabelled from 0), optionally ``shots`` per class."""
    generator = torch.Generator().manual_seed(seed)
    keep, labels = [], batch.require_target()
    for c in classes:
        idx = torch.nonzero(labels == c).squeeze(1)
        if shots is not None:
            idx = idx[torch.randperm(len(idx), generator=generator)[:shots]]
        keep.append(idx)
    subset = batch.select(torch.cat(keep))
    return subset.replace(target=subset.require_target() - classes.start)


def build_method(
    method: str, base: LateFusionModel, example: ModalityBatch, settings: dict, seed: int
) -> nn.Module:
    """A fresh copy of the pretrained ``base`` prepared for ``method`` (head re-initialised)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    for module in model.head.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    if method == "head-only":
        return freeze_all_but(model, ["head"])
    if method == "full fine-tuning":
        return model.requires_grad_(True)
    if method in settings.get("lora_ranks", {}):
        rank = settings["lora_ranks"][method]
        return apply_lora(model, rank, target_prefix=settings["lora_prefix"])
    if method == "Houlsby adapter":
        dims = {m: settings["width"] for m in model.encoders}
        return add_houlsby_adapters(model, dims, settings["houlsby_bottleneck"])
    if method in settings.get("wander_variants", {}):
        options = {**settings.get("wander_options", {}), **settings["wander_variants"][method]}
        if "target_layer" in options:  # tap each encoder's inner layer instead of its output
            layer = options.pop("target_layer")
            options["target_modules"] = {m: f"encoders.{m}.{layer}" for m in model.encoders}
        ranks = options.pop("ranks", settings["wander_ranks"])
        return Wander(model, ranks, example_input=example, **options)
    raise ValueError(f"unknown method {method!r}; known: {methods(settings)}")


def compare_methods(
    ctx: RunContext,
    base: LateFusionModel,
    train: ModalityBatch,
    valid: ModalityBatch,
    test: ModalityBatch,
    *,
    dataset: str,
    settings: dict,
    loss_fn: Callable,
    score_fn: Callable,
    metrics_fn: Callable,
    time_steps: bool = True,
) -> list[dict]:
    """Fit every method from the same pretrained ``base``; one record per method.

    ``time_steps``: add each method's step time (:func:`step_times`) and its ratio to
    head-only's to its record.
    """
    backbone_params = count_parameters(base)
    records: list[dict[str, Any]] = []
    for method in methods(settings):
        ctx.progress(f"{dataset}: {method}")
        model = build_method(method, base, train, settings, ctx.seed)
        result = fit(
            model,
            train,
            valid,
            loss_fn=loss_fn,
            score_fn=score_fn,
            epochs=settings["epochs"],
            lr=settings["lr"][method],
            batch_size=settings["batch_size"],
            seed=ctx.seed,
        )
        trainable = count_parameters(model, trainable_only=True)
        records.append(
            {
                "method": method,
                "dataset": dataset,
                "metrics": {
                    **metrics_fn(predict(model, test), test.target),
                    "valid_score": score_fn(predict(model, valid), valid.target),
                    "trainable_params": trainable,
                    "trainable_pct_of_backbone": 100 * trainable / backbone_params,
                },
                "config": {
                    "best_epoch": result.best_epoch,
                    "lr": settings["lr"][method],
                    **{k: v for k, v in settings.items() if k != "lr"},
                },
            }
        )
    if not time_steps:
        return records
    ctx.progress(f"{dataset}: step times")
    seconds = step_times(base, train, settings, loss_fn, ctx.seed)
    for record in records:
        record["metrics"]["ms_per_step"] = 1000 * seconds[record["method"]]
    return add_ratio_column(records, "head-only", "ms_per_step", "step_time_vs_head_only")


def step_times(
    base: LateFusionModel,
    train: ModalityBatch,
    settings: dict,
    loss_fn: Callable,
    seed: int,
    calls: int = 10,
    *,
    only: Sequence[str] | None = None,
    compiled: bool = False,
    adapter_compiled: bool = False,
) -> dict[str, float]:
    """Seconds per training step of every method: fresh copies, one batch, interleaved rounds.

    ``calls`` steps per method and round (median over 7 rounds). ``only``: these methods
    instead of all. ``compiled``: each model through ``torch.compile`` (inductor; compiled in
    the warm-up, which is not timed). ``adapter_compiled``: only a Wander model's adapter
    module through it (``model.adapter.compile()``), the base model and every other method
    eager.
    """
    batch = next(iter(train.split(settings["batch_size"])))
    steps = {}
    for method in only or methods(settings):
        model = build_method(method, base, train, settings, seed).train()
        optimiser = make_optimizer(model, lr=settings["lr"][method])
        if adapter_compiled and isinstance(model, Wander):
            model.adapter.compile()
        forward = torch.compile(model) if compiled else model
        steps[method] = functools.partial(train_step, forward, optimiser, batch, loss_fn)
    return median_times(steps, rounds=7, calls=calls)


def step_memories(
    base: LateFusionModel, train: ModalityBatch, settings: dict, loss_fn: Callable, seed: int
) -> dict[str, StepMemory]:
    """What one training step of each method holds (:mod:`benchmarks.memory`).

    On the batch that :func:`step_times` times, from fresh copies of ``base``.
    """
    batch = next(iter(train.split(settings["batch_size"])))
    memories = {}
    for method in methods(settings):
        model = build_method(method, base, train, settings, seed).train()
        optimiser = make_optimizer(model, lr=settings["lr"][method])
        beside = functools.partial(_kept_copies, model) if isinstance(model, Wander) else None
        memories[method] = step_memory(model, optimiser, batch, loss_fn, held_beside=beside)
    return memories


def _kept_copies(wander: Wander) -> list[tuple[nn.Module, None]]:
    """Wander's frozen copies of its ``modules_to_save``, held outside the model's modules."""
    return [(module, None) for module in wander.original_modules.values()]


UCI_DATASET = "uci-mfeat 0-4 → 5-9"
#: the Wander variant under 5% of the backbone, which the issue's targets are about
SUB_5_PERCENT = "Wander (r=4, tiled)"
#: ``wander-step-overhead``'s hand-written forwards of :data:`SUB_5_PERCENT` (name → centred)
BY_HAND_CENTRED = f"{SUB_5_PERCENT}, written by hand"
BY_HAND_UNCENTRED = f"{BY_HAND_CENTRED}, no frozen copy (not the base model at init)"
BY_HAND = {BY_HAND_CENTRED: True, BY_HAND_UNCENTRED: False}


def step_table(width: int, hidden: int, batch_size: int, what: str = "") -> str:
    """The name of ``wander-step-overhead``'s table at one size (``what``: which one there)."""
    return f"uci-mfeat 5-9, width {width}, hidden {hidden}, batch {batch_size}" + (
        f", {what}" if what else ""
    )


UCI_SETTINGS: dict[str, Any] = {
    "shots": 5,
    # few-shot draws per seed (episode 0 uses the seed itself): with 25 labelled samples the
    # draw moves accuracy by about a point, so each seed's figure is the mean over episodes
    "episodes": {"quick": 4, "full": 10},
    "width": 32,
    "hidden": 256,
    "pretrain_epochs": {"quick": 20, "full": 60},
    "epochs": 60,
    "batch_size": 32,
    "lora_ranks": {"LoRA (peft)": 2, "LoRA (peft, r=4)": 4},
    "lora_prefix": "encoders",
    "houlsby_bottleneck": 16,
    "wander_ranks": {"bottleneck": 6, "feature": 1, "token": 1},
    "wander_options": {"num_fused_tokens": 1, "bias_augment": True},
    # the encoders' last linear layer squeezes 256 hidden features into 32 tuned to digits
    # 0-4; Wander reads the hidden layer (the output of each encoder's GELU) or the output
    "wander_variants": {
        "Wander": {"target_layer": "net.2"},
        "Wander (no constant channel)": {"target_layer": "net.2", "bias_augment": False},
        "Wander (encoder outputs)": {},
        # under 5 % of the backbone: bottleneck 4, and one 96-feature fused token tiled over
        # the head's 192-feature input (twice) instead of a 192-feature one. Chosen among the
        # 11 sub-5 % shapes of the wander-uci-shapes task by validation accuracy on seeds
        # 10-12 (2 draws each), seeds the report does not use
        "Wander (r=4, tiled)": {
            "target_layer": "net.2",
            "ranks": {"bottleneck": 4, "feature": 1, "token": 1},
            "fused_dim": 96,
            # ε of the 1 + ε init: 0.1, not the default 0.3, chosen among 0.03-0.3 (and output
            # scales 0.1-3, where the default 0.1 stayed best) by validation accuracy in the
            # wander-uci-init task on seeds 10-15, which the report does not use
            "interaction_init": 0.1,
        },
    },
    # each by validation accuracy in the wander-uci-lr task on seeds 10-12, which the report
    # does not use (run 20261124-172939-quick; head-only ties at 3e-3 to 3e-2; LoRA r=4 takes
    # r=2's rate, Wander's variants Wander's)
    "lr": {
        "head-only": 1e-2,
        "full fine-tuning": 1e-3,
        "LoRA (peft)": 1e-3,
        "LoRA (peft, r=4)": 1e-3,
        "Houlsby adapter": 1e-2,
        "Wander": 3e-3,
        "Wander (no constant channel)": 3e-3,
        "Wander (encoder outputs)": 3e-3,
        "Wander (r=4, tiled)": 3e-3,
    },
}

#: ``wander-step-overhead``'s first size: this task's backbone and its 5 × 5 labelled samples
STEP_SIZE = (UCI_SETTINGS["width"], UCI_SETTINGS["hidden"], 5 * UCI_SETTINGS["shots"])
#: the table of :data:`BY_HAND` beside head-only and the library, there
BY_HAND_WHAT = "Wander's forward written by hand"
BY_HAND_TABLE = step_table(*STEP_SIZE, BY_HAND_WHAT)
#: there, every model through ``torch.compile``; and only Wander's adapter (head-only eager)
COMPILED_WHAT = "every method through torch.compile"
COMPILED_TABLE = step_table(*STEP_SIZE, COMPILED_WHAT)
ADAPTER_COMPILED_WHAT = "only Wander's adapter through torch.compile"
ADAPTER_COMPILED_TABLE = step_table(*STEP_SIZE, ADAPTER_COMPILED_WHAT)


def run_uci(ctx: RunContext) -> list[dict]:
    """Pretrain on digits 0–4, adapt to digits 5–9 with a few labels per class."""
    s = UCI_SETTINGS
    return transfer_uci(ctx, s, s["episodes"][ctx.profile], time_steps=True)


def pretrain_uci(ctx: RunContext, s: dict) -> LateFusionModel:
    """The late-fusion backbone of ``s``'s size, trained on digits 0–4 (seeded by ``ctx``)."""
    splits = uci_splits(ctx)
    source = range(0, 5)
    src_train = select_classes(splits["train"], source)
    ctx.progress("pretraining on digits 0-4")
    torch.manual_seed(ctx.seed)
    base = LateFusionModel.from_batch(
        src_train, 5, width=s["width"], hidden=s["hidden"], head="linear"
    )
    fit(
        base,
        src_train,
        select_classes(splits["valid"], source),
        loss_fn=F.cross_entropy,
        score_fn=accuracy,
        epochs=s["pretrain_epochs"][ctx.profile],
        seed=ctx.seed,
    )
    return base


def transfer_uci(
    ctx: RunContext,
    s: dict,
    episodes: int,
    *,
    time_steps: bool,
    base: LateFusionModel | None = None,
) -> list[dict]:
    """``s``'s methods from a backbone pretrained on digits 0–4, adapted to digits 5–9.

    Each method's metrics, and its step time (``time_steps``: timed on each draw's batch, so
    a burst of load on this shared machine moves one of ``episodes`` timings), are averaged
    over ``episodes`` draws of the labelled samples. ``base``: the :func:`pretrain_uci`
    backbone when the caller already has it (it is copied, never changed).
    """
    splits = uci_splits(ctx)
    target = range(5, 10)
    valid = select_classes(splits["valid"], target)
    test = select_classes(splits["test"], target)
    if base is None:
        base = pretrain_uci(ctx, s)
    settings = {**s, "pretrain_epochs": s["pretrain_epochs"][ctx.profile], "episodes": episodes}
    results = []
    for episode in range(episodes):
        episode_ctx = dataclasses.replace(ctx, seed=ctx.seed + 1000 * episode)
        train = select_classes(splits["train"], target, shots=s["shots"], seed=episode_ctx.seed)
        results.append(
            compare_methods(
                episode_ctx,
                base,
                train,
                valid,
                test,
                dataset=UCI_DATASET,
                settings=settings,
                loss_fn=F.cross_entropy,
                score_fn=accuracy,
                metrics_fn=classification_metrics,
                time_steps=time_steps,
            )
        )
    return average_episodes(results)


def average_episodes(episodes: list[list[dict]]) -> list[dict]:
    """One record per method: its metrics averaged over the episodes (same method order)."""
    averaged = []
    for records in zip(*episodes, strict=True):
        metrics = {
            k: sum(r["metrics"][k] for r in records) / len(records) for k in records[0]["metrics"]
        }
        config = {
            **records[0]["config"],
            "best_epochs": [r["config"]["best_epoch"] for r in records],
        }
        config.pop("best_epoch")
        averaged.append({**records[0], "metrics": metrics, "config": config})
    return averaged


MOSI_SETTINGS: dict[str, Any] = {
    "n_pretrain": {"quick": (600, 150, 150), "full": (2000, 400, 400)},
    "n_target": {"quick": (200, 150, 300), "full": (400, 400, 686)},
    "seq_len": 20,
    "interaction": 1.5,
    "width": 16,
    "pretrain_epochs": {"quick": 15, "full": 40},
    "epochs": 30,
    "batch_size": 32,
    "lora_ranks": {"LoRA (peft)": 2},
    "lora_prefix": "encoders",
    "houlsby_bottleneck": 8,
    "wander_ranks": {"bottleneck": 8, "feature": 2, "token": 2},
    "wander_options": {"num_fused_tokens": 4, "bias_augment": True},
    "wander_variants": {"Wander": {}, "Wander (gate init)": {"init": "gate"}},
    "lr": {
        "head-only": 3e-3,
        "full fine-tuning": 1e-3,
        "LoRA (peft)": 3e-3,
        "Houlsby adapter": 3e-3,
        "Wander": 3e-3,
        "Wander (gate init)": 3e-3,
    },
}


def _neg_mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    return -float((pred.squeeze(-1) - target).abs().mean())


def _l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred.squeeze(-1), target)


def _msa(pred: torch.Tensor, target: torch.Tensor) -> dict:
    return msa_regression_metrics(pred.squeeze(-1), target)


def run_mosi(ctx: RunContext) -> list[dict]:
    """Pretrain on additive labels, adapt to labels with a planted cross-modal product."""
    s = MOSI_SETTINGS
    lens = dict.fromkeys(("text", "audio", "vision"), s["seq_len"])
    ctx.progress("writing MOSI-format pickles")
    additive = write_mult_pickle(
        ctx.work_dir / f"mosi_additive_seed{ctx.seed}.pkl",
        "mosi",
        n=s["n_pretrain"][ctx.profile],
        seq_lens=lens,
        seed=ctx.seed,
        structure=PlantedStructure(interaction=0.0),
    )
    product = write_mult_pickle(
        ctx.work_dir / f"mosi_interaction_seed{ctx.seed}.pkl",
        "mosi",
        n=s["n_target"][ctx.profile],
        seq_lens=lens,
        seed=ctx.seed + 100,
        structure=PlantedStructure(interaction=s["interaction"]),
    )
    source, target = load_mult_pickle(additive), load_mult_pickle(product)
    records = []
    for head, dataset in _MOSI_HEADS.items():
        ctx.progress(f"pretraining on additive labels ({head} head)")
        torch.manual_seed(ctx.seed)
        base = LateFusionModel.from_batch(
            source["train"], 1, width=s["width"], num_layers=1, num_heads=2, head=head
        )
        fit(
            base,
            source["train"],
            source["valid"],
            loss_fn=_l1,
            score_fn=_neg_mae,
            epochs=s["pretrain_epochs"][ctx.profile],
            seed=ctx.seed,
        )
        settings = {
            **s,
            "head": head,
            "pretrain_epochs": s["pretrain_epochs"][ctx.profile],
            "n_pretrain": s["n_pretrain"][ctx.profile],
            "n_target": s["n_target"][ctx.profile],
        }
        records += compare_methods(
            ctx,
            base,
            target["train"],
            target["valid"],
            target["test"],
            dataset=dataset,
            settings=settings,
            loss_fn=_l1,
            score_fn=_neg_mae,
            metrics_fn=_msa,
        )
    return records


# the MLP head can learn the planted product itself, so every method may fit it; with a linear
# head the backbone is additive across modalities (per-modality encoders, concatenation, one
# linear map) and no per-modality adaptation (LoRA, Houlsby, full fine-tuning of the encoders)
# can represent z_a * z_b: only a cross-modal fusion adapter can
_MOSI_HEADS: dict[str, Any] = {
    "mlp": "MOSI-format, planted interaction",
    "linear": "MOSI-format, planted interaction, additive backbone (linear head)",
}


_COLUMNS = (
    "trainable_params",
    "trainable_pct_of_backbone",
    "ms_per_step",
    "step_time_vs_head_only",
)


def plot_tradeoff(
    records: list[dict], plot_dir: Path, task: str = "wander-uci-transfer"
) -> list[tuple[str, Path]]:
    """Test accuracy against the share of the backbone trained, one point per method.

    ``records``: ``task``'s records (a task's ``plots`` gets its own).
    """
    if not records:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    markers = iter("osD^vP*Xhp<>")
    for method in dict.fromkeys(r["method"] for r in records):
        mean, std, _ = summarise(
            [r["metrics"]["accuracy"] for r in records if r["method"] == method]
        )
        pct = next(
            r["metrics"]["trainable_pct_of_backbone"] for r in records if r["method"] == method
        )
        ax.errorbar(
            pct,
            100 * mean,
            yerr=100 * std,
            fmt=next(markers, "o"),
            color="#C44E52" if method.startswith("Wander") else "#4C72B0",
            capsize=3,
            label=method,
        )
    ax.axvline(5, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("% of the backbone's parameters trained (log scale; dotted: 5%)")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(f"{task}: accuracy against parameters trained")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = plot_dir / f"{task}--tradeoff.png"
    save_figure(fig, path)
    return [("Accuracy against the share of the backbone trained", path)]


register_task(
    Task(
        name="wander-uci-transfer",
        description=(
            "Wander vs. head-only, full fine-tuning, LoRA (peft) and a Houlsby adapter: "
            "late-fusion backbone pretrained on UCI mfeat digits 0-4, adapted to digits 5-9 "
            "with 5 labels per class; test accuracy on digits 5-9, each seed's figure the mean "
            "over 4 draws of the labelled samples (10 in the full profile)."
        ),
        run=run_uci,
        plots=plot_tradeoff,
        primary_metric="accuracy",
        metrics=("accuracy", "f1_macro", *_COLUMNS),
        targets=(
            Target(
                "trains at most 5% of the backbone",
                UCI_DATASET,
                SUB_5_PERCENT,
                "trainable_pct_of_backbone",
                "<=",
                5.0,
            ),
            Target(
                "within 1 point of full fine-tuning",
                UCI_DATASET,
                SUB_5_PERCENT,
                "accuracy",
                ">=",
                -0.01,
                versus="full fine-tuning",
            ),
            Target(
                "above head-only",
                UCI_DATASET,
                SUB_5_PERCENT,
                "accuracy",
                ">",
                0.0,
                versus="head-only",
            ),
            Target(
                "at least as accurate as LoRA of a similar size (r=2)",
                UCI_DATASET,
                SUB_5_PERCENT,
                "accuracy",
                ">=",
                0.0,
                versus="LoRA (peft)",
            ),
            Target(
                "step time at most 1.5x head-only",
                UCI_DATASET,
                SUB_5_PERCENT,
                "step_time_vs_head_only",
                "<=",
                1.5,
                references=tuple(
                    Reference(
                        label, table, name, "step_time_vs_head_only", task="wander-step-overhead"
                    )
                    for label, table, name in (
                        ("the same forward written by hand", BY_HAND_TABLE, BY_HAND_CENTRED),
                        ("written by hand, no frozen copy", BY_HAND_TABLE, BY_HAND_UNCENTRED),
                        ("both through torch.compile", COMPILED_TABLE, SUB_5_PERCENT),
                        ("its adapter alone compiled", ADAPTER_COMPILED_TABLE, SUB_5_PERCENT),
                    )
                ),
            ),
        ),
    )
)
register_task(
    Task(
        name="wander-mosi-interaction",
        description=(
            "Same five methods on generated MOSI-format data: a MulT-style transformer backbone "
            "pretrained on additive labels, adapted to labels with a planted cross-modal product "
            f"({MOSI_SETTINGS['n_target']['quick'][0]} labelled samples, "
            f"{MOSI_SETTINGS['n_target']['full'][0]} in the full profile); MSA metrics (MAE lower "
            "is better). Twice: with MulT's "
            "residual MLP head (which can learn the product itself) and with a linear head, "
            "where the backbone is additive across modalities and only a cross-modal fusion "
            "adapter can represent the product."
        ),
        run=run_mosi,
        primary_metric="mae",
        higher_is_better=False,
        metrics=("mae", "corr", "acc2_has0", "acc2_non0", "f1_non0", "acc7", *_COLUMNS),
    )
)


FOOD_SETTINGS: dict[str, Any] = {
    "classes": ("apple_pie", "breakfast_burrito", "caesar_salad", "donuts"),
    "n_per_class": {"quick": (12, 6), "full": (40, 20)},
    "max_text_len": 16,
    "width": 16,
    "pretrain_epochs": 10,
    "epochs": 15,
    "batch_size": 16,
    "wander_ranks": {"bottleneck": 4, "feature": 2, "token": 2},
    "wander_options": {"num_fused_tokens": 2},
    "wander_variants": {"Wander": {}},
}


def food101_features(ctx: RunContext) -> dict[str, ModalityBatch]:
    """Token features of the train and test splits.

    ``--data-root/UPMC-Food101`` with ``--data-root/encoders/{vit,bert}`` when present; otherwise
    a generated copy with tiny random encoders (this proves the path only). Real data keeps
    the profile's number of images per class (``n_per_class``), drawn with the run's seed: every
    token of every image is kept, and the whole release's would not fit in memory.
    """
    from transformers.utils import logging as hf_logging

    from benchmarks.data.food101 import (
        extract_food101_features,
        load_food101,
        write_food101,
        write_tiny_encoders,
    )

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    s = FOOD_SETTINGS
    real = real_data(ctx, FOOD101_DIR)
    per_class: tuple[int | None, int | None] = (None, None)
    if real is not None:
        root, encoders = real, real.parent / "encoders"
        image_enc, text_enc = encoders / "vit", encoders / "bert"
        per_class = s["n_per_class"][ctx.profile]
    else:
        root = write_food101(
            ctx.work_dir / f"food101_seed{ctx.seed}",
            s["classes"],
            n_per_class=s["n_per_class"][ctx.profile],
            seed=ctx.seed,
        )
        words = tuple(c.replace("_", " ") for c in s["classes"])
        image_enc, text_enc = write_tiny_encoders(ctx.work_dir / "encoders", words, seed=ctx.seed)
    features = {}
    for split, k in zip(("train", "test"), per_class, strict=True):
        data = load_food101(root, split, max_per_class=k, seed=ctx.seed)
        features[split] = extract_food101_features(
            data,
            image_enc,
            text_enc,
            max_text_len=s["max_text_len"],
            progress=count_progress(ctx, f"{split} features"),
        )
    return features


def run_food(ctx: RunContext) -> list[dict]:
    """Frozen ViT + BERT token features → fusion backbone → head-only vs. Wander."""
    s = FOOD_SETTINGS
    ctx.progress("extracting features")
    feats = food101_features(ctx)
    train_all, test = feats["train"], feats["test"]
    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(ctx.seed))
    cut = max(len(order) // 5, 1)  # no official valid split: hold out 20% of train
    train, valid = train_all.select(order[cut:]), train_all.select(order[:cut])
    n_classes = int(train_all.require_target().max()) + 1
    torch.manual_seed(ctx.seed)
    base = LateFusionModel.from_batch(train, n_classes, width=s["width"], num_layers=1, num_heads=2)
    ctx.progress("training the fusion backbone")
    fit(
        base,
        train,
        valid,
        loss_fn=F.cross_entropy,
        score_fn=accuracy,
        epochs=s["pretrain_epochs"],
        seed=ctx.seed,
    )
    records = []
    for method in ("head-only", "Wander"):
        ctx.progress(method)
        model = build_method(method, base, train, s, ctx.seed)
        result = fit(
            model,
            train,
            valid,
            loss_fn=F.cross_entropy,
            score_fn=accuracy,
            epochs=s["epochs"],
            lr=3e-3,
            batch_size=s["batch_size"],
            seed=ctx.seed,
        )
        trainable = count_parameters(model, trainable_only=True)
        records.append(
            {
                "method": method,
                "dataset": "UPMC-Food101"
                if real_data(ctx, FOOD101_DIR)
                else "UPMC-Food101 layout (generated, tiny random encoders)",
                "metrics": {
                    **classification_metrics(predict(model, test), test.require_target()),
                    "trainable_params": trainable,
                    "ms_per_step": 1000 * result.seconds_per_step,
                },
                "config": {"best_epoch": result.best_epoch, **s},
            }
        )
    return records


register_task(
    Task(
        name="wander-food101-path",
        description=(
            "UPMC-Food101 release layout → frozen ViT/BERT token features (transformers, local "
            "paths) → fusion backbone → Wander. Without --data-root it runs on a generated copy "
            "with tiny random encoders: this proves the path, not accuracy."
        ),
        run=run_food,
        primary_metric="accuracy",
        metrics=("accuracy", "f1_macro", "trainable_params", "ms_per_step"),
    )
)
