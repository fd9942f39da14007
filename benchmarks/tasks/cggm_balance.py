"""CGGM beside joint training and OGM-GE: accuracy, and how much each modality's encoder learned.

* ``cggm-uci-balance`` (real data): the late-fusion backbone trained from scratch on a small
  fraction of UCI mfeat (six modalities of very different strength). Besides test accuracy, each
  modality's linear-probe accuracy on its frozen encoder after training shows the imbalance CGGM
  exists to fix; the last rows train each modality's encoder alone on the same data (the
  probes' ceiling) and fit a linear head on those encoders together (the unimodal ensemble:
  what balanced encoders could give). CGGM rows also report what its gradient factors ``ρ B_m`` did
  (:func:`scale_summary`), and a control scales every encoder's gradients by their mean.
* ``cggm-mosi-imbalance`` (generated MOSI-format pickles): regression with one dominant modality
  (imbalance knob), joint training vs. CGGM; MSA metrics (OGM-GE is classification-only).

Step time is reported as a ratio to joint training: after training, fresh models of every method
take training steps on one batch in interleaved rounds (median), so each method's time is
measured under the same machine load.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from benchmarks.backbones import LateFusionModel
from benchmarks.baselines.cggm_lean import LeanCGGM
from benchmarks.baselines.ogm import OGMGE
from benchmarks.data.generators import PlantedStructure, write_mult_pickle
from benchmarks.data.pickles import DataFormatError, load_mult_pickle
from benchmarks.registry import Reference, RunContext, Target, Task, register_task
from benchmarks.report import pyplot, save_figure, summarise
from benchmarks.tasks.common import (
    BRATS_DIR,
    count_progress,
    real_data,
    real_mult_pickle,
    uci_splits,
)
from benchmarks.training import (
    accuracy,
    add_ratio_column,
    fit,
    make_optimizer,
    median_times,
    predict,
    train_step,
)
from cggm import CGGM
from mmcore import ModalityBatch, masked_mean
from mmcore.metrics import classification_metrics, msa_regression_metrics

#: Method names beyond "joint", "OGM-GE" and "CGGM", with the CGGM options they override.
CGGM_VARIANTS: dict[str, Any] = {
    "CGGM (reference mode)": {"mode": "reference"},
    # the direction term needs classifiers as wide as the head's input; without it they can be
    # small, which is most of CGGM's cost on wide models (cggm-step-overhead)
    "CGGM (λ=0, 64-unit classifiers)": {"lam": 0.0, "classifier_hidden": 64},
    "CGGM (ρ=3, smoothing 0.8)": {"rho": 3.0, "smoothing": 0.8},
    # the paper's cosine of gradients instead of the released code's weights proxy; its λ by
    # validation accuracy in the cggm-uci-lambda task on seeds 10-12, which the report does not
    # use (2026-12-07: λ = 2 led 0.2, 0.5 and 1 by 0.25 to 0.42 points, 1 to 2 of 400 samples)
    "CGGM (gradient directions, λ=2)": {"direction": "gradients", "lam": 2.0},
}

#: Controls for CGGM's magnitude modulation: joint training with every encoder's gradients
#: multiplied by one constant, ``ρ (M − 1) / M``. Since ``Σ_m B_m = M − 1``, that is the mean
#: of CGGM's factors ``ρ B_m``: what is left of the modulation when ``B`` does not tell the
#: modalities apart (the row next to "CGGM (ρ=3, ...)" separates balancing from scaling).
ENCODER_SCALE_CONTROLS = {"joint, encoder grads × ρ(M−1)/M (ρ=3)": 3.0}

#: CGGM's step written by hand for classification on vector features (the same maths, tested):
#: what its overhead would cost without autograd, the optimiser wrapper's and the checks' calls.
LEAN_CGGM = "CGGM, hand-written lean step"
#: CGGM with its classifiers' backward through autograd (``hand_backward = False``): what the
#: hand-written backward of the stacked classifiers saves
AUTOGRAD_CGGM = "CGGM (classifiers through autograd)"

#: The probe-reference row: each modality's encoder trained alone on the same data.
UNIMODAL_REFERENCE = "unimodal encoders (probe reference)"
#: Those encoders together: a linear head on their concatenated frozen features, fitted on the
#: same training data (close to the uni-modal ensemble of Du et al., ICML 2023, which averages
#: the unimodal models' predictions). What every encoder at its best alone gives, without the
#: joint training that CGGM balances.
UNIMODAL_ENSEMBLE = "unimodal encoders + linear head (ensemble reference)"


def modulation(
    model: torch.nn.Module,
    method: str,
    *,
    task: str,
    num_outputs: int,
    cggm_options: dict,
    variants: dict[str, Any] | None = None,
) -> tuple[CGGM | OGMGE | LeanCGGM | None, Callable | None, Callable | None]:
    """The modulator of ``method`` on ``model``, with :func:`fit`'s two hooks for it.

    ``method``: ``"joint"``, ``"OGM-GE"``, ``"CGGM"``, :data:`AUTOGRAD_CGGM`, :data:`LEAN_CGGM`,
    a key of ``variants`` (default :data:`CGGM_VARIANTS`) or of
    :data:`ENCODER_SCALE_CONTROLS`; returns
    ``(modulator, extra_loss, after_backward)`` (all ``None`` for joint training; only
    ``after_backward`` for the controls).
    """
    if method == "joint":
        return None, None, None
    if method in ENCODER_SCALE_CONTROLS:
        encoders = cast(nn.ModuleDict, model.encoders)
        params = list(encoders.parameters())
        n_mod = len(encoders)
        scale = ENCODER_SCALE_CONTROLS[method] * (n_mod - 1) / n_mod

        def scale_encoder_grads(_batch: ModalityBatch) -> None:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, scale)

        return None, None, scale_encoder_grads
    if method == "OGM-GE":
        modulator = OGMGE(model)
        return modulator, None, lambda batch: modulator.step(batch.require_target())
    if method == LEAN_CGGM:
        lean = LeanCGGM(
            model,
            num_outputs=num_outputs,
            **{k: cggm_options[k] for k in ("rho", "lam", "cls_lr")},
        )
        return lean, lean.direction_loss, lambda batch: lean.step(batch.require_target())
    variants = CGGM_VARIANTS if variants is None else variants
    if method not in ("CGGM", AUTOGRAD_CGGM) and method not in variants:
        raise ValueError(f"unknown method {method!r}.")
    options = {**cggm_options, **variants.get(method, {})}
    cggm = CGGM(model, task=task, num_outputs=num_outputs, **options)
    cggm.hand_backward = method != AUTOGRAD_CGGM
    return cggm, cggm.direction_loss, lambda batch: cggm.step(batch.require_target())


@dataclass(frozen=True)
class Problem:
    """What one task trains its methods on: the ``*_SETTINGS`` dict, the loss and the score.

    ``settings`` holds ``epochs`` (per profile), ``lr``, ``batch_size``, ``optimizer``,
    ``cggm`` (the CGGM options) and ``methods`` (and optionally ``cggm_variants``, the
    variants' options, :data:`CGGM_VARIANTS` by default); ``score_fn(pred, target)`` picks the
    epoch on validation data (higher is better); ``task`` and ``num_outputs`` are CGGM's.
    """

    settings: dict[str, Any]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    score_fn: Callable[[Tensor, Tensor], float]
    task: str
    num_outputs: int


def train_modulated(
    model: torch.nn.Module,
    train: ModalityBatch,
    valid: ModalityBatch,
    *,
    method: str,
    problem: Problem,
    ctx: RunContext,
) -> tuple[int, dict[str, float]]:
    """Train with ``method`` (see :func:`modulation`); keeps the best-validation weights.

    Returns the best epoch and metrics: ``valid_score``, the best validation score (the one
    that picked the epoch: settings such as λ are compared on it, not on the test split), and,
    for CGGM with magnitude modulation, what its gradient factors ``ρ B_m`` did over training
    (:func:`scale_summary`).
    """
    s = problem.settings
    task, num_outputs, batch_size = problem.task, problem.num_outputs, s["batch_size"]
    modulator, extra_loss, after_backward = modulation(
        model,
        method,
        task=task,
        num_outputs=num_outputs,
        cggm_options=s["cggm"],
        variants=s.get("cggm_variants"),
    )
    coefficients: list[list[float]] = []
    cggm = modulator if isinstance(modulator, CGGM) else None
    if cggm is not None and cggm.config.rho is not None:

        def after_backward(batch: ModalityBatch) -> None:
            factors = cggm.step(batch.require_target())  # B_m: fit syncs every step
            if factors is not None:
                coefficients.append(list(factors.values()))

    result = fit(
        model,
        train,
        valid,
        loss_fn=problem.loss_fn,
        score_fn=problem.score_fn,
        epochs=s["epochs"][ctx.profile],
        lr=s["lr"],
        weight_decay=0.0,
        batch_size=batch_size,
        seed=ctx.seed,
        extra_loss=extra_loss,
        after_backward=after_backward,
        optimizer=s["optimizer"],
    )
    if cggm is not None:
        cggm.remove()
    chosen = {"valid_score": result.best_score}
    if cggm is None or cggm.config.rho is None or not coefficients:
        return result.best_epoch, chosen
    factors = cggm.config.rho * torch.tensor(coefficients)
    steps_per_epoch = -(-len(train) // batch_size)
    return result.best_epoch, {**chosen, **scale_summary(factors, cggm.modalities, steps_per_epoch)}


def scale_summary(
    factors: Tensor, modalities: tuple[str, ...], steps_per_epoch: int
) -> dict[str, float]:
    """What CGGM's per-step encoder-gradient factors ``ρ B_m`` (``[steps, M]``) amounted to.

    * ``grad_scale_mean``: their mean, ``ρ (M − 1) / M`` since ``Σ_m B_m = M − 1``;
    * ``grad_scale_step_range``: the mean over steps of ``max_m − min_m``, how far one step's
      factors spread (mostly the noise of per-batch scores);
    * ``grad_scale_modality_range``: ``max_m − min_m`` of each modality's factor averaged over
      training, the lasting difference between modalities that balancing needs;
    * ``grad_scale_first_epoch_range`` and ``grad_scale_first_epoch_<m>``: the same over the
      first epoch, while the modalities still learn at different speeds, and each modality's
      mean factor there.
    """
    first = factors[:steps_per_epoch].mean(0)
    return {
        "grad_scale_mean": float(factors.mean()),
        "grad_scale_step_range": float((factors.amax(1) - factors.amin(1)).mean()),
        "grad_scale_modality_range": float(factors.mean(0).amax() - factors.mean(0).amin()),
        "grad_scale_first_epoch_range": float(first.amax() - first.amin()),
        **{f"grad_scale_first_epoch_{m}": float(v) for m, v in zip(modalities, first, strict=True)},
    }


def method_step_times(
    make_model: Callable[[], torch.nn.Module],
    batch: ModalityBatch,
    settings: dict,
    *,
    loss_fn: Callable,
    task: str,
    num_outputs: int,
    calls: int = 10,
    rounds: int = 7,
) -> dict[str, float]:
    """Seconds per training step of each of ``settings["methods"]`` on ``batch``.

    Fresh models take training steps in interleaved rounds (median over rounds): timings
    taken one method after another move with the machine's load, interleaved rounds put every
    method under the same load.
    """
    steps, modulators = {}, []
    for method in settings["methods"]:
        model = make_model().train()
        modulator, extra_loss, after_backward = modulation(
            model, method, task=task, num_outputs=num_outputs, cggm_options=settings["cggm"]
        )
        modulators.append(modulator)
        optimiser = make_optimizer(
            model, settings["optimizer"], lr=settings["lr"], weight_decay=0.0
        )
        steps[method] = functools.partial(
            train_step, model, optimiser, batch, loss_fn, extra_loss, after_backward
        )
    seconds = median_times(steps, rounds=rounds, calls=calls)
    for modulator in modulators:
        if isinstance(modulator, CGGM):
            modulator.remove()
    return seconds


def train_each_method(
    ctx: RunContext,
    problem: Problem,
    make_model: Callable[[], torch.nn.Module],
    train: ModalityBatch,
    valid: ModalityBatch,
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    *,
    dataset: str,
    config: dict[str, Any],
) -> list[dict]:
    """A record per method of ``problem``: a fresh model trained, then ``evaluate(model)``.

    Each record's config is the best epoch and ``config``; CGGM's rows add what its gradient
    factors did (:func:`scale_summary`).
    """
    records = []
    for method in problem.settings["methods"]:
        ctx.progress(method)
        model = make_model()
        best_epoch, scales = train_modulated(
            model, train, valid, method=method, problem=problem, ctx=ctx
        )
        records.append(
            {
                "method": method,
                "dataset": dataset,
                "metrics": {**evaluate(model), **scales},
                "config": {"best_epoch": best_epoch, **config},
            }
        )
    return records


def add_step_times(
    records: list[dict],
    make_model: Callable[[], torch.nn.Module],
    train: ModalityBatch,
    problem: Problem,
    *,
    calls: int = 10,
) -> list[dict]:
    """Add each method's ``ms_per_step`` and its ratio to joint training's to ``records``.

    Timed by :func:`method_step_times` on the first training batch.
    """
    batch = next(iter(train.split(problem.settings["batch_size"])))
    seconds = method_step_times(
        make_model,
        batch,
        problem.settings,
        loss_fn=problem.loss_fn,
        task=problem.task,
        num_outputs=problem.num_outputs,
        calls=calls,
    )
    for record in records:
        record["metrics"]["ms_per_step"] = 1000 * seconds[record["method"]]
    return add_ratio_column(records, "joint", "ms_per_step", "step_time_vs_joint")


def _standardised(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Features standardised with the training set's mean and std."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    return [(x - mean) / std for x in (train, *others)]


def ensemble_metrics(
    encoders: dict[str, LateFusionModel], train: ModalityBatch, test: ModalityBatch
) -> dict[str, float]:
    """Test metrics of a linear head on the concatenated frozen features of ``encoders``.

    ``encoders`` maps each modality to its model trained alone; the head is a logistic
    regression fitted on ``train``.
    """
    feats = {}
    for name, split in (("train", train), ("test", test)):
        parts = []
        for m, model in encoders.items():
            model.eval()
            with torch.no_grad():
                parts.append(masked_mean(model.encode(split)[m], split.padding_mask(m)).numpy())
        feats[name] = np.concatenate(parts, axis=1)
    x_tr, x_te = _standardised(feats["train"], feats["test"])
    clf = LogisticRegression(max_iter=3000).fit(x_tr, train.require_target().numpy())
    return classification_metrics(torch.from_numpy(clf.predict(x_te)), test.require_target())


def held_out_metrics(logits: Tensor, target: Tensor) -> dict[str, float]:
    """Classification metrics of ``logits``, or NaN for a run that diverged.

    Non-finite logits (reference mode's unbounded B) have no honest accuracy; NaN lets the
    report count the seeds that did not diverge (its ``n``).
    """
    if not torch.isfinite(logits).all():
        return dict.fromkeys(("accuracy", "f1_weighted", "f1_macro"), float("nan"))
    return classification_metrics(logits, target)


@torch.no_grad()
def probe_accuracies(model: LateFusionModel, train: ModalityBatch, test: ModalityBatch) -> dict:
    """Linear-probe test accuracy of each modality's frozen encoder features."""
    model.eval()
    out = {}
    tr, te = model.encode(train), model.encode(test)
    for m in model.encoders:
        x_tr = masked_mean(tr[m], train.padding_mask(m)).numpy()
        x_te = masked_mean(te[m], test.padding_mask(m)).numpy()
        if not (np.isfinite(x_tr).all() and np.isfinite(x_te).all()):
            out[f"probe_{m}"] = float("nan")  # the run diverged (reference mode's unbounded B)
            continue
        x_tr, x_te = _standardised(x_tr, x_te)
        clf = LogisticRegression(max_iter=2000).fit(x_tr, train.require_target().numpy())
        out[f"probe_{m}"] = float(clf.score(x_te, test.require_target().numpy()))
    return out


UCI_SETTINGS: dict[str, Any] = {
    "train_fraction": 0.2,
    "width": 16,
    "hidden": 64,
    "epochs": {"quick": 60, "full": 150},
    "batch_size": 32,
    # SGD with momentum for every method: gradient modulation (OGM-GE, CGGM's rho * B_m) scales
    # gradients, and Adam divides each gradient by its running RMS, which undoes a constant scale
    "optimizer": "sgd",
    "lr": 3e-2,
    "cggm": {"rho": 1.3, "lam": 0.2, "cls_lr": 5e-4},
    "methods": (
        "joint",
        "OGM-GE",
        "CGGM",
        "CGGM (reference mode)",
        "CGGM (λ=0, 64-unit classifiers)",
        "CGGM (ρ=3, smoothing 0.8)",
        "CGGM (gradient directions, λ=2)",
        "joint, encoder grads × ρ(M−1)/M (ρ=3)",
    ),
}
UCI_DATASET = f"uci-mfeat ({int(100 * UCI_SETTINGS['train_fraction'])}% of train)"
#: ``cggm-step-overhead``'s first table: this task's network and batch size
STEP_SIZE = (UCI_SETTINGS["width"], UCI_SETTINGS["hidden"], UCI_SETTINGS["batch_size"])


def step_table(width: int, hidden: int, batch_size: int) -> str:
    """The name of ``cggm-step-overhead``'s step-time table at one size."""
    return f"uci-mfeat, width {width}, hidden {hidden}, batch {batch_size}"


STEP_TABLE = step_table(*STEP_SIZE)


def _subsample(batch: ModalityBatch, fraction: float, seed: int) -> ModalityBatch:
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in batch.require_target().unique():
        idx = torch.nonzero(batch.target == c).squeeze(1)
        keep.append(
            idx[torch.randperm(len(idx), generator=generator)[: max(1, int(fraction * len(idx)))]]
        )
    return batch.select(torch.cat(keep))


def uci_problem(
    ctx: RunContext, settings: dict[str, Any] | None = None
) -> tuple[dict[str, ModalityBatch], ModalityBatch, Callable[[], LateFusionModel], Problem]:
    """``cggm-uci-balance``'s set-up: the splits, its training fraction, the model, the problem.

    ``settings``: :data:`UCI_SETTINGS` by default.
    """
    s = UCI_SETTINGS if settings is None else settings
    splits = uci_splits(ctx)
    train = _subsample(splits["train"], s["train_fraction"], ctx.seed)

    def make_model() -> LateFusionModel:
        torch.manual_seed(ctx.seed)
        return LateFusionModel.from_batch(
            train, 10, width=s["width"], hidden=s["hidden"], head="linear"
        )

    return splits, train, make_model, Problem(s, F.cross_entropy, accuracy, "classification", 10)


def run_uci(ctx: RunContext) -> list[dict]:
    """Joint, OGM-GE and CGGM from scratch on a small stratified fraction of mfeat."""
    s = UCI_SETTINGS
    splits, train, make_model, problem = uci_problem(ctx)
    test = splits["test"]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        metrics = held_out_metrics(predict(model, test), test.require_target())
        return {**metrics, **probe_accuracies(cast(LateFusionModel, model), splits["train"], test)}

    dataset = UCI_DATASET
    config = {
        "train_size": len(train),
        **{k: v for k, v in s.items() if k != "epochs"},
        "epochs": s["epochs"][ctx.profile],
    }
    records = train_each_method(
        ctx, problem, make_model, train, splits["valid"], evaluate, dataset=dataset, config=config
    )
    ctx.progress("step times")
    records = add_step_times(records, make_model, train, problem)
    # what each encoder learns with no other modality to compete with: the probes' ceiling
    probes: dict[str, float] = {}
    alone: dict[str, LateFusionModel] = {}
    for m in train.modalities:
        ctx.progress(f"{m} alone")
        torch.manual_seed(ctx.seed)
        model = LateFusionModel.from_batch(
            train, 10, modalities=(m,), width=s["width"], hidden=s["hidden"], head="linear"
        )
        train_modulated(model, train, splits["valid"], method="joint", problem=problem, ctx=ctx)
        probes |= probe_accuracies(model, splits["train"], splits["test"])
        alone[m] = model
    records.append({"method": UNIMODAL_REFERENCE, "dataset": dataset, "metrics": probes})
    # and together: the same training data fit a linear head on their features
    ensemble = ensemble_metrics(alone, train, splits["test"])
    records.append({"method": UNIMODAL_ENSEMBLE, "dataset": dataset, "metrics": ensemble})
    return records


#: Rows of the probe plot: joint training, CGGM, the scale that helps and its control, the ceiling.
PROBE_PLOT_METHODS = (
    "joint",
    "CGGM",
    "CGGM (ρ=3, smoothing 0.8)",
    "joint, encoder grads × ρ(M−1)/M (ρ=3)",
    UNIMODAL_REFERENCE,
)


def plot_probes(records: list[dict], plot_dir: Path) -> list[tuple[str, Path]]:
    """Each modality's linear-probe accuracy, grouped by modality, one bar per method."""
    plt = pyplot()

    rows = [r for r in records if r["method"] in PROBE_PLOT_METHODS and "probe_fou" in r["metrics"]]
    if not rows:
        return []
    modalities = [k.removeprefix("probe_") for k in rows[0]["metrics"] if k.startswith("probe_")]
    methods = [m for m in PROBE_PLOT_METHODS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(methods)
    x = np.arange(len(modalities))
    for i, method in enumerate(methods):
        stats = [
            summarise([r["metrics"][f"probe_{m}"] for r in rows if r["method"] == method])
            for m in modalities
        ]
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width,
            [100 * mean for mean, _, _ in stats],
            width,
            yerr=[100 * std for _, std, _ in stats],
            capsize=2,
            label=method,
        )
    ax.set_xticks(x, modalities)
    ax.set_ylim(0, 100)
    ax.set_ylabel("linear-probe accuracy, % (mean ± std over seeds)")
    ax.set_title("cggm-uci-balance: what each modality's encoder learned")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    path = plot_dir / "cggm-uci-balance--probes.png"
    save_figure(fig, path)
    return [("Linear-probe accuracy of each modality's encoder", path)]


MOSI_SETTINGS: dict[str, Any] = {
    "n": {"quick": (400, 100, 200), "full": (1284, 229, 686)},
    "seq_len": 20,
    "imbalance": 4.0,
    "dominant": "text",
    "width": 16,
    "epochs": {"quick": 15, "full": 40},
    "batch_size": 32,
    "optimizer": "adamw",
    "lr": 1e-3,
    "cggm": {"rho": 1.3, "lam": 0.2, "cls_lr": 5e-4},
    "methods": ("joint", "CGGM"),
}


def run_mosi(ctx: RunContext) -> list[dict]:
    """Regression with a dominant modality: joint training vs. CGGM."""
    s = MOSI_SETTINGS
    data = real_mult_pickle(ctx)
    dataset = "CMU-MOSI (--data-root)"
    if data is None:
        lens = dict.fromkeys(("text", "audio", "vision"), s["seq_len"])
        path = write_mult_pickle(
            ctx.work_dir / f"mosi_imbalance_seed{ctx.seed}.pkl",
            "mosi",
            n=s["n"][ctx.profile],
            seq_lens=lens,
            seed=ctx.seed,
            structure=PlantedStructure(imbalance=s["imbalance"], dominant=s["dominant"]),
        )
        data = load_mult_pickle(path)
        dataset = f"MOSI-format, {s['dominant']} dominant (imbalance {s['imbalance']})"

    def l1(pred: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(pred.squeeze(-1), target)

    def neg_mae(pred: Tensor, target: Tensor) -> float:
        return -float((pred.squeeze(-1) - target).abs().mean())

    def make_model() -> LateFusionModel:
        torch.manual_seed(ctx.seed)
        return LateFusionModel.from_batch(
            data["train"], 1, width=s["width"], num_layers=1, num_heads=2, head="linear"
        )

    problem = Problem(s, l1, neg_mae, "regression", 1)
    test = data["test"]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return msa_regression_metrics(predict(model, test).squeeze(-1), test.require_target())

    config = {k: v for k, v in s.items() if k not in ("n", "epochs")}
    records = train_each_method(
        ctx,
        problem,
        make_model,
        data["train"],
        data["valid"],
        evaluate,
        dataset=dataset,
        config=config,
    )
    ctx.progress("step times")
    return add_step_times(records, make_model, data["train"], problem)


register_task(
    Task(
        name="cggm-uci-balance",
        description=(
            "UCI mfeat (real, 6 modalities of very different strength) from scratch on 20% of "
            "the training split: joint training vs. OGM-GE (generalised to M modalities) vs. CGGM; "
            "test accuracy and each modality's linear-probe accuracy on its frozen encoder, beside "
            "the probes of encoders trained alone on the same data (the ceiling) and a linear "
            "head fitted on those encoders together (the unimodal ensemble). grad_scale_*: "
            "CGGM's encoder-gradient factors rho*B_m, their mean, their spread within a step "
            "and the spread of their per-modality averages over training and over the first "
            "epoch; the 'joint, encoder "
            "grads x' row scales every encoder by that mean, without balancing."
        ),
        run=run_uci,
        plots=plot_probes,
        primary_metric="accuracy",
        targets=(
            Target(
                "at least 1 point above joint training",
                UCI_DATASET,
                "CGGM",
                "accuracy",
                ">=",
                0.01,
                versus="joint",
                references=(
                    Reference(
                        "six encoders trained alone under one linear head − joint",
                        UCI_DATASET,
                        UNIMODAL_ENSEMBLE,
                        "accuracy",
                        versus="joint",
                    ),
                ),
            ),
            Target(
                "above OGM-GE",
                UCI_DATASET,
                "CGGM",
                "accuracy",
                ">",
                0.0,
                versus="OGM-GE",
                references=(
                    Reference("OGM-GE − joint", UCI_DATASET, "OGM-GE", "accuracy", versus="joint"),
                ),
            ),
            # the two weakest modalities by the probes of encoders trained alone
            Target(
                "higher probe accuracy on a weak modality (fou)",
                UCI_DATASET,
                "CGGM",
                "probe_fou",
                ">",
                0.0,
                versus="joint",
                references=(
                    Reference(
                        "fou's encoder trained alone − joint",
                        UCI_DATASET,
                        UNIMODAL_REFERENCE,
                        "probe_fou",
                        versus="joint",
                    ),
                ),
            ),
            Target(
                "higher probe accuracy on a weak modality (mor)",
                UCI_DATASET,
                "CGGM",
                "probe_mor",
                ">",
                0.0,
                versus="joint",
                references=(
                    Reference(
                        "mor's encoder trained alone − joint",
                        UCI_DATASET,
                        UNIMODAL_REFERENCE,
                        "probe_mor",
                        versus="joint",
                    ),
                ),
            ),
            Target(
                "step time at most 1.3x joint training",
                UCI_DATASET,
                "CGGM",
                "step_time_vs_joint",
                "<=",
                1.3,
                references=(
                    Reference(
                        "the same step written by hand",
                        STEP_TABLE,
                        LEAN_CGGM,
                        "step_time_vs_joint",
                        task="cggm-step-overhead",
                    ),
                    Reference(
                        "CGGM without the direction term (λ=0, 64-unit classifiers)",
                        UCI_DATASET,
                        "CGGM (λ=0, 64-unit classifiers)",
                        "step_time_vs_joint",
                    ),
                ),
            ),
        ),
        metrics=(
            "accuracy",
            "f1_macro",
            "probe_fou",
            "probe_fac",
            "probe_kar",
            "probe_pix",
            "probe_zer",
            "probe_mor",
            "grad_scale_mean",
            "grad_scale_step_range",
            "grad_scale_modality_range",
            "grad_scale_first_epoch_range",
            "ms_per_step",
            "step_time_vs_joint",
        ),
    )
)
register_task(
    Task(
        name="cggm-mosi-imbalance",
        description=(
            "Generated MOSI-format regression whose text modality dominates (imbalance 4): joint "
            "training vs. CGGM; MSA metrics (MAE lower is better)."
        ),
        run=run_mosi,
        primary_metric="mae",
        higher_is_better=False,
        metrics=(
            "mae",
            "corr",
            "acc2_has0",
            "acc2_non0",
            "f1_non0",
            "acc7",
            "ms_per_step",
            "step_time_vs_joint",
        ),
    )
)


BRATS_SETTINGS: dict[str, Any] = {
    "cases": {"quick": (10, 4), "full": (40, 12)},
    "shape": (32, 32, 12),
    "slices_per_case": 4,
    "channels": 8,
    "epochs": {"quick": 25, "full": 60},
    "batch_size": 8,
    "optimizer": "adamw",
    "lr": 3e-3,
    "cggm": {"rho": 1.0, "lam": 0.1, "cls_lr": 6e-3},
    "methods": ("joint", "CGGM"),
}


def brats_splits(ctx: RunContext) -> tuple[ModalityBatch, ModalityBatch, str]:
    """Slices of ``--data-root/BraTS2021`` when present, else of generated cases.

    Either way the profile's numbers of train and test cases are read (``cases``): on real data
    the first ``n_test`` case folders in name order are the test set and the next ``n_train``
    the training set, the same for every seed (the release's 1,251 cases would take an hour to
    read, and their slices hours to train on, on a CPU).
    """
    from benchmarks.data.brats import find_brats_cases, load_brats_slices, write_brats_case

    s = BRATS_SETTINGS
    n_train, n_test = s["cases"][ctx.profile]
    real = real_data(ctx, BRATS_DIR)
    if real is not None:
        cases = find_brats_cases(real)
        if len(cases) < 2:
            raise DataFormatError(
                f"{real}: {len(cases)} BraTS case folder(s); a train and a test case are needed."
            )
        n_test = min(n_test, max(1, len(cases) // 5))
        test_cases, train_cases = cases[:n_test], cases[n_test : n_test + n_train]
        name = "BraTS 2021"
    else:
        root = ctx.work_dir / f"brats_seed{ctx.seed}"
        for i in range(n_train + n_test):
            if not (root / f"BraTS2021_{i:05d}").is_dir():
                write_brats_case(root, i, shape=s["shape"], seed=ctx.seed)
        cases = find_brats_cases(root)
        train_cases, test_cases = cases[:n_train], cases[n_train:]
        name = "BraTS 2021 layout (generated)"

    train, test = (
        load_brats_slices(
            cases,
            slices_per_case=s["slices_per_case"],
            progress=count_progress(ctx, f"reading {split} cases"),
        )
        for split, cases in (("train", train_cases), ("test", test_cases))
    )
    return train, test, name


def run_brats(ctx: RunContext) -> list[dict]:
    """Segmentation with one encoder per MRI sequence: joint training vs. CGGM; region Dice."""
    from benchmarks.backbones import MultiEncoderSegNet
    from mmcore.metrics import brats_dice

    s = BRATS_SETTINGS
    ctx.progress("loading cases")
    train_all, test, name = brats_splits(ctx)
    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(ctx.seed))
    cut = max(1, len(order) // 5)
    train, valid = train_all.select(order[cut:]), train_all.select(order[:cut])

    def mean_dice(logits: Tensor, target: Tensor) -> float:
        return brats_dice(logits.max(dim=1).indices, target, "remapped", ignore_empty=False)[
            "dice_mean"
        ]

    def make_model() -> MultiEncoderSegNet:
        torch.manual_seed(ctx.seed)
        return MultiEncoderSegNet(train.modalities, 4, channels=s["channels"])

    problem = Problem(s, F.cross_entropy, mean_dice, "segmentation", 4)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        pred = predict(model, test, batch_size=16).max(dim=1).indices
        return brats_dice(pred, test.require_target(), "remapped", ignore_empty=False)

    config = {
        "train_slices": len(train),
        "test_slices": len(test),
        **{k: v for k, v in s.items() if k not in ("cases", "epochs")},
    }
    records = train_each_method(
        ctx, problem, make_model, train, valid, evaluate, dataset=name, config=config
    )
    ctx.progress("step times")
    return add_step_times(records, make_model, train, problem, calls=3)


register_task(
    Task(
        name="cggm-brats-seg",
        description=(
            "BraTS 2021 case folders (NIfTI, MONAI transforms; generated cases without "
            "--data-root) → axial tumour slices → one MONAI encoder per MRI sequence: joint "
            "training vs. CGGM; WT/TC/ET Dice (empty regions count 1 when predicted empty)."
        ),
        run=run_brats,
        primary_metric="dice_mean",
        metrics=("dice_wt", "dice_tc", "dice_et", "dice_mean", "ms_per_step", "step_time_vs_joint"),
    )
)
