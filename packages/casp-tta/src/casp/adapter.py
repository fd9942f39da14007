"""``CASP``: contrastive adaptation and stable pseudo-labels, Tent-shaped."""

from __future__ import annotations

import contextlib
import copy
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from casp.config import CASPConfig
from casp.distributed import (
    average_buffers_over_ranks,
    average_grads_over_ranks,
    check_equal_shards,
    mean_over_ranks,
)
from casp.functional import nt_xent, pseudo_labels, select_samples, stability_scores
from casp.norms import norm_parameters
from casp.optim import Float32MasterAdam
from casp.outputs import (
    class_logits,
    describe_kind,
    label_logits,
    model_predictions,
    regression_scores,
)
from mmcore import (
    ModalityBatch,
    ModulePathError,
    encoder_features,
    held_module,
    make_config,
    modes_kept,
    require_modality_batch,
    resolve_module,
    trainable_dtype,
)

__all__ = ["CASP", "AdaptationReport"]


@dataclass
class AdaptationReport:
    """What :meth:`CASP.adapt` did.

    ``kept_indices`` ``[K]``: the samples kept for stage 2 (the most stable by default);
    ``pseudo_labels``: their pseudo-labels, the mean of the stage-1 prediction snapshots
    (``[K]`` for regression, ``[K, num_outputs]`` for several regressed values, ``[K, C]``
    probabilities for classification, ``[K, num_outputs]`` label probabilities for multilabel).
    ``collapsed``: a
    stage stopped early and rolled back (a collapsed or non-finite representation in stage 1, a
    non-finite pseudo-label loss in stage 2); ``message`` says which.
    """

    contrastive_losses: list[float] = field(default_factory=list)
    snapshot_epochs: list[int] = field(default_factory=list)
    kept_indices: Tensor | None = None
    pseudo_labels: Tensor | None = None
    pseudo_label_losses: list[float] = field(default_factory=list)
    collapsed: bool = False
    message: str = ""


class CASP:
    """Test-time adaptation by contrastive adaptation and stable pseudo-labels.

    Paper: Guo et al., "Bridging the Gap for Test-Time Multimodal Sentiment Analysis", AAAI 2025
    (arXiv 2412.07121). Stage 1 adapts the normalisation layers with an NT-Xent loss between each
    unlabeled target batch and a copy with one modality dropped, taking prediction snapshots on
    the way; the mean of the snapshots is a pseudo-label whose stability is how little the
    sample's prediction moved; stage 2 trains on the most stable fraction.

    Args:
        model: the source model, called as ``model(batch)``, returning its predictions (a
            Tensor, or an output with ``logits`` as ``transformers`` models return); it must
            follow the mmcore contract (its ``fusion`` output is the representation) unless
            ``representation_fn`` or ``representation_module`` says where the representation is.
        config: a :class:`CASPConfig` (or give its fields as keyword arguments).
        representation_fn: ``fn(model, batch) -> (prediction, representation [B, d])``. Every
            forward pass then goes through it (the predictions too), so it may call a model
            that takes no ``ModalityBatch``, e.g. ``lambda m, b: m(b["text"], b["audio"])``.
        representation_module: dotted path of the module whose output is the representation.
        inplace: adapt ``model`` itself; by default a deep copy is adapted and the caller's
            weights are never modified. Either way the model's ``requires_grad`` flags and
            train/eval modes are changed only while CASP adapts, and restored after. A
            ``torch.compile`` d model is adapted through the module it wraps (the same
            parameters), eagerly: dynamo does not re-trace a compiled graph for the hooks CASP
            adds.
        distributed: :meth:`adapt` on this rank's shard of the target set, in step with every
            rank of the default process group: the NT-Xent negatives come from every rank
            (with gradient), the gradients are averaged over the ranks before clipping (and
            BatchNorm's running statistics after each step), and the collapse guard reads the
            ranks' mean variance, so every rank ends with the same weights. Each rank keeps
            the stablest ``keep_ratio`` of its own shard; every rank must hold the same number
            of samples (``DistributedSampler`` pads to that). Online :meth:`forward` and
            ``select_by="target_validation"`` stay single-process. By default CASP never
            communicates, even inside a process group: each process adapts on what it holds
            (e.g. rank 0 alone).

    Like Tent: :meth:`adapt` (offline, the paper's protocol), :meth:`forward` (online /
    episodic: adapt on each incoming batch, then predict), :meth:`predict`, :meth:`reset`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CASPConfig | None = None,
        *,
        representation_fn: Callable[[nn.Module, ModalityBatch], tuple[Tensor, Tensor]]
        | None = None,
        representation_module: str | None = None,
        inplace: bool = False,
        distributed: bool = False,
        **config_kwargs: Any,
    ) -> None:
        if config is not None and config_kwargs:
            raise ValueError("pass either config= or its fields as keyword arguments, not both.")
        self.config = config or make_config(CASPConfig, "CASP", **config_kwargs)
        if distributed and self.config.select_by == "target_validation":
            raise ValueError(
                "CASP(distributed=True) does not support select_by='target_validation': each "
                "rank would restore the epoch its own validation data prefers."
            )
        self.distributed = distributed
        # adapt what a torch.compile or DDP (DataParallel) wrapper holds, nested either way;
        # CASP averages over the ranks itself
        model = held_module(model)
        self.model = model if inplace else copy.deepcopy(model)
        self._representation_fn = representation_fn
        if representation_fn is None:
            path = self._repr_path = representation_module or "fusion"
            try:
                self._repr_module = resolve_module(self.model, path)
            except ModulePathError as err:
                raise ModulePathError(
                    f"CASP needs the model's representation: {err} Pass representation_module= "
                    "or representation_fn=."
                ) from None
        self.params = self._select_parameters()
        # BatchNorm normalises over the batch: its two views must keep separate statistics, so
        # only models without it run both views in one forward pass; nor can it train on one sample
        self._batch_norm = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        )
        self._joint_views = not self._batch_norm
        self._source_state = self.snapshot()
        self._online_opt: torch.optim.Optimizer | Float32MasterAdam | None = None
        self.report = AdaptationReport()

    # ------------------------------------------------------------------ set-up
    def _select_parameters(self) -> list[nn.Parameter]:
        if self.config.trainable == "all":
            params = list(self.model.parameters())
        else:
            params = norm_parameters(self.model)
            if not params:
                raise ValueError(
                    f"{type(self.model).__name__} has no normalisation layer (LayerNorm, "
                    "RMSNorm, BatchNorm, GroupNorm, InstanceNorm, or a class named *Norm) with "
                    "affine parameters to adapt; pass "
                    "trainable='all' or add normalisation layers."
                )
        return params

    @contextlib.contextmanager
    def _adapting(self) -> Iterator[None]:
        """Only the adapted parameters require gradients while CASP adapts.

        The model's own ``requires_grad`` flags and train/eval modes (module by module) come
        back after, so a model adapted in place is left as the caller set it up. Gradients are
        on inside, as in Tent: test-time adaptation is often called from an evaluation loop
        under ``torch.no_grad()``.
        """
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        try:
            with modes_kept(self.model), torch.enable_grad():
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def snapshot(self) -> dict[str, Tensor]:
        """Copies of what adaptation can change: the adapted parameters and every buffer.

        The rest of the model is frozen, so :meth:`restore` of a snapshot returns the model to
        that moment exactly, at the memory cost of the normalisation layers (and buffers such as
        BatchNorm's running statistics), not of the whole model.
        """
        adapted = {id(p) for p in self.params}
        return {
            name: t.detach().clone()
            for name, t in self.model.state_dict(keep_vars=True).items()
            if not isinstance(t, nn.Parameter) or id(t) in adapted
        }

    @torch.no_grad()
    def restore(self, snapshot: dict[str, Tensor]) -> None:
        """Copy a :meth:`snapshot` back into the model, in place."""
        current = self.model.state_dict(keep_vars=True)
        for name, value in snapshot.items():
            current[name].copy_(value)

    def _predictions(self, batch: ModalityBatch) -> Tensor:
        """The model's predictions on ``batch``.

        The first item ``representation_fn`` returns where one is given (it may call a model
        that takes no ``ModalityBatch``), else the model's output.
        """
        if self._representation_fn is not None:
            return model_predictions(self._forward(batch)[0])
        return model_predictions(self.model(batch))

    def _forward(self, batch: ModalityBatch) -> tuple[Tensor, Tensor]:
        if self._representation_fn is not None:
            out = self._representation_fn(self.model, batch)
            if not (isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[1], Tensor)):
                raise TypeError(
                    "CASP: representation_fn(model, batch) must return (prediction, "
                    "representation [B, d]) with the representation a Tensor; got "
                    f"{describe_kind(out)}."
                )
            pred, rep = out
            return pred, rep.flatten(1) if rep.ndim > 2 else rep
        captured: list[Any] = []
        handle = self._repr_module.register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            pred = self.model(batch)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"CASP: the representation module '{self._repr_path}' did not run in the model's "
                "forward pass; name one that does (representation_module=) or pass "
                "representation_fn=."
            )
        try:  # a tensor, a transformers output's last_hidden_state, a tuple's first item
            rep = encoder_features(captured[-1])
        except TypeError as err:
            raise RuntimeError(f"CASP: the representation module's output: {err}") from None
        return pred, rep.flatten(1) if rep.ndim > 2 else rep

    @property
    def device(self) -> torch.device:
        """Device of the adapted model's parameters (each batch is moved there)."""
        return next(iter(self.model.parameters()), torch.empty(0)).device

    def _optimizer(self) -> torch.optim.Optimizer | Float32MasterAdam:
        if any(trainable_dtype(p.dtype) != p.dtype for p in self.params):
            return Float32MasterAdam(self.params, lr=self.config.lr)
        return torch.optim.Adam(self.params, lr=self.config.lr)

    def _step(self, optimizer: torch.optim.Optimizer | Float32MasterAdam, loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        if not loss.requires_grad:
            raise RuntimeError(
                "CASP: the adaptation loss does not depend on any adapted parameter: the model "
                "ran the layers CASP adapts without gradients (under torch.no_grad() inside its "
                "forward, or under activation checkpointing with use_reentrant=True whose inputs "
                "need no gradient: use use_reentrant=False)."
            )
        loss.backward()
        if self.distributed:
            average_grads_over_ranks(self.params)
        stepped = (
            optimizer.masters_with_grads()
            if isinstance(optimizer, Float32MasterAdam)
            else self.params
        )
        if self.config.clip is not None:
            torch.nn.utils.clip_grad_norm_(stepped, self.config.clip)
        optimizer.step()
        if self.distributed and self._batch_norm:
            average_buffers_over_ranks(self.model)

    # ------------------------------------------------------------------ pieces
    def contrastive_loss(self, batch: ModalityBatch, modality: str) -> tuple[Tensor, Tensor]:
        """NT-Xent between ``batch`` and ``batch`` with ``modality`` dropped.

        Also returns the original view's representation (for the collapse guard).
        """
        dropped = batch.with_missing(modality)
        if self._joint_views:  # one forward over both views: half the kernel launches
            _, z = self._forward(ModalityBatch.concat([batch, dropped]))
            z1, z2 = z[: len(batch)], z[len(batch) :]
        else:
            _, z1 = self._forward(batch)
            _, z2 = self._forward(dropped)
        return nt_xent(z1, z2, self.config.tau, gather=self.distributed), z1

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` on any rank (this process's own without ``distributed``)."""
        if not self.distributed:
            return flag
        found = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found.item())

    def _check_source_predictions(self, predictions: Tensor) -> None:
        """Refuse data on which the model predicts NaN or inf before it has been changed.

        Their pseudo-labels and stability scores would be NaN (a NaN sample could even rank
        as the most stable), and the stages would then stop as if adaptation had diverged.
        """
        bad = ~torch.isfinite(predictions.reshape(len(predictions), -1)).all(dim=1)
        if not self._any_rank(bool(bad.any())):
            return
        where = (
            f"{int(bad.sum())} of the {len(bad)} samples (the first at index "
            f"{int(bad.nonzero()[0])})"
            if bad.any()
            else "samples of another rank's shard"
        )
        raise ValueError(
            f"CASP.adapt: the model's predictions for {where} are NaN or infinite before any "
            "adaptation, so they can give no pseudo-label. Check those inputs (NaN or "
            "infinite features, such as padding that holds -inf without a padding mask), or "
            "leave those samples out."
        )

    def _mean_variance(self, rep: Tensor) -> float:
        """Mean per-feature variance of the normalised representation (over the ranks too)."""
        variance = F.normalize(rep.detach(), dim=1).var(dim=0).mean()
        if self.distributed:  # every rank takes the same collapse decision
            (variance,) = mean_over_ranks([variance])
        return variance.item()

    @torch.no_grad()
    def predict(
        self, data: ModalityBatch | Iterable[ModalityBatch], batch_size: int = 256
    ) -> Tensor:
        """Predictions on ``data`` (eval mode): regression scores, or ``[N, C]`` probabilities.

        Scores are ``[N]``, or ``[N, K]`` with ``num_outputs=K``; under ``task="multilabel"``
        each label's probability, ``[N, K]``.

        ``data`` may live on another device than the model (e.g. a large unlabeled set in CPU
        memory): each batch is moved to the model's, and the predictions come back on ``data``'s.
        An iterable of batches (a ``DataLoader``) is concatenated first, in its order.
        """
        data = _in_memory(data, "CASP.predict")
        if data.batch_size == 0:
            raise ValueError("CASP.predict got no sample to predict (an empty batch).")
        with modes_kept(self.model):
            self.model.eval()
            outs = [self._predictions(b.to(self.device)) for b in data.split(batch_size)]
        out = torch.cat(outs).to(data.device)
        if self.config.task == "classification":
            return class_logits(out).softmax(dim=-1)
        if self.config.task == "multilabel":
            return label_logits(out, self.config.num_outputs).sigmoid()
        return regression_scores(out, self.config.num_outputs)

    def reset(self) -> None:
        """Restore the source weights exactly and forget the online optimiser's state.

        After ``reset()``, :meth:`forward` behaves as on a freshly built ``CASP``.
        """
        self.restore(self._source_state)
        self._online_opt = None
        self.report = AdaptationReport()

    # ------------------------------------------------------------------ the protocols
    def adapt(
        self,
        data: ModalityBatch | Iterable[ModalityBatch],
        *,
        validation: ModalityBatch | None = None,
        score_fn: Callable[[Tensor, Tensor], float] | None = None,
        progress: bool = False,
    ) -> AdaptationReport:
        """The paper's offline protocol on unlabeled target data; returns a report.

        ``data``: the unlabeled target set, as one ``ModalityBatch`` or an iterable of them (a
        ``DataLoader`` with ``collate_modalities``), concatenated in memory once: the
        pseudo-labels and stability scores follow each sample over the epochs, so the order must
        stay fixed (``report.kept_indices`` index the concatenation). ``data.target`` is never
        read (it is dropped first). ``validation`` (labelled target data) and
        ``score_fn(predictions, labels)`` (higher is better: accuracy, or the negative MAE for
        regression) are used only with ``select_by="target_validation"``, the released code's
        label-leaking epoch selection.
        ``progress``: a progress bar over the epochs of both stages, with the last loss.

        A second call continues from the weights the first left (as online calls do); call
        :meth:`reset` first to adapt from the source model again.
        """
        cfg = self.config
        _check_not_inference_mode("CASP.adapt")
        data = _in_memory(data, "CASP.adapt")
        if len(data.modalities) < 2:
            raise ValueError(
                f"CASP drops one modality per batch for its second view; need >= 2, got "
                f"{list(data.modalities)}."
            )
        if data.batch_size < 2:
            raise ValueError(
                "CASP.adapt needs at least 2 unlabeled target samples (NT-Xent contrasts each "
                f"sample with the others of its batch), got {data.batch_size}."
            )
        if cfg.select_by == "target_validation":
            _Best.check(validation, score_fn)
        if self.distributed:
            check_equal_shards(data.batch_size)
        data = data.replace(target=None)  # no target label is read
        with self._adapting():
            return self._run_stages(data, validation, score_fn, progress)

    def _run_stages(
        self,
        data: ModalityBatch,
        validation: ModalityBatch | None,
        score_fn: Callable[[Tensor, Tensor], float] | None,
        progress: bool,
    ) -> AdaptationReport:
        cfg = self.config
        report = self.report = AdaptationReport()
        rng = random.Random(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        snapshots = [self.predict(data)]
        self._check_source_predictions(snapshots[0])
        report.snapshot_epochs.append(0)
        optimizer = self._optimizer()
        best = _Best(self, validation, score_fn) if cfg.select_by == "target_validation" else None
        healthy = self.snapshot()
        self.model.train()
        bar = tqdm(
            total=cfg.epochs_ca + cfg.epochs_pl, desc="CASP", unit="epoch", disable=not progress
        )
        bar.set_postfix_str("stage 1: contrastive adaptation")
        for epoch in range(1, cfg.epochs_ca + 1):
            losses = []
            for batch in data.split(cfg.batch_size, shuffle=True, generator=generator):
                if len(batch) < 2:
                    continue
                batch = batch.to(self.device)
                loss, rep = self.contrastive_loss(batch, rng.choice(data.modalities))
                variance = self._mean_variance(rep)
                if not variance >= cfg.collapse_threshold:  # NaN too: a diverged model
                    self.restore(healthy)
                    report.collapsed = True
                    what = (
                        f"collapsed (mean variance {variance:.2e} < {cfg.collapse_threshold:.0e})"
                        if math.isfinite(variance)
                        else "became NaN or infinite (diverged: try a smaller lr)"
                    )
                    report.message = (
                        f"representation {what} in stage 1, epoch {epoch}; rolled back to the "
                        "last healthy epoch and stopped."
                    )
                    warnings.warn(f"CASP: {report.message}", stacklevel=2)
                    break
                self._step(optimizer, loss)
                losses.append(loss.item())
            if report.collapsed:
                break
            report.contrastive_losses.append(sum(losses) / max(len(losses), 1))
            bar.update()
            bar.set_postfix(stage=1, nt_xent=f"{report.contrastive_losses[-1]:.4f}")
            healthy = self.snapshot()
            if epoch % cfg.snapshot_every == 0:
                snapshots.append(self.predict(data))
                report.snapshot_epochs.append(epoch)
            if best is not None:
                best.update()
        if best is not None:
            best.restore()
        if len(snapshots) < 2:
            snapshots.append(self.predict(data))
            report.snapshot_epochs.append(-1)
        stacked = torch.stack(snapshots)
        kept = select_samples(stability_scores(stacked), cfg.keep_ratio, cfg.keep)
        report.kept_indices = kept
        report.pseudo_labels = pseudo_labels(stacked)[kept]
        bar.update(cfg.epochs_ca - bar.n)  # a collapse ends stage 1 early
        self._pseudo_label_stage(data.select(kept), report.pseudo_labels, validation, score_fn, bar)
        bar.close()
        return report

    def _pseudo_label_stage(
        self,
        data: ModalityBatch,
        labels: Tensor,
        validation: ModalityBatch | None,
        score_fn: Callable[[Tensor, Tensor], float] | None,
        bar: tqdm[Any],
    ) -> None:
        cfg = self.config
        if cfg.epochs_pl == 0:
            return
        optimizer = self._optimizer()
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        labelled = data.replace(target=labels)
        best = _Best(self, validation, score_fn) if cfg.select_by == "target_validation" else None
        self.model.train()
        start = self.snapshot()
        for epoch in range(1, cfg.epochs_pl + 1):
            losses = []
            for batch in labelled.split(cfg.batch_size, shuffle=True, generator=generator):
                if len(batch) < 2 and self._batch_norm:
                    continue  # a trailing one-sample batch: BatchNorm has no variance to use
                batch = batch.to(self.device)
                pred, target = self._predictions(batch), batch.require_target()
                if cfg.task == "classification":
                    # soft targets: mean probabilities
                    loss = F.cross_entropy(class_logits(pred), target)
                elif cfg.task == "multilabel":  # soft targets: each label's mean probability
                    logits = label_logits(pred, cfg.num_outputs)
                    loss = F.binary_cross_entropy_with_logits(logits, target)
                else:
                    loss = F.l1_loss(regression_scores(pred, cfg.num_outputs), target)
                value = loss.item()  # the one host sync per step, for the check and the log
                if self._any_rank(not math.isfinite(value)):
                    self.restore(start)
                    message = (
                        f"the pseudo-label loss became NaN or infinite in stage 2, epoch {epoch} "
                        "(diverged: try a smaller lr); rolled back to the end of stage 1 and "
                        "stopped."
                    )
                    self.report.collapsed = True
                    self.report.message = " ".join(filter(None, [self.report.message, message]))
                    warnings.warn(f"CASP: {message}", stacklevel=3)
                    return
                self._step(optimizer, loss)
                losses.append(value)
            self.report.pseudo_label_losses.append(sum(losses) / max(len(losses), 1))
            bar.update()
            bar.set_postfix(stage=2, pseudo_label_loss=f"{self.report.pseudo_label_losses[-1]:.4f}")
            if best is not None:
                best.update()
        if best is not None:
            best.restore()

    def forward(self, batch: ModalityBatch, *, steps: int = 1, episodic: bool = False) -> Tensor:
        """Online TTA: ``steps`` contrastive updates on this batch, then its predictions.

        ``episodic=True`` resets to the source weights first (each batch adapted on its own).
        The batch's ``target`` is never read. A one-sample batch is predicted without an update
        (NT-Xent needs another sample as its negative). Single-process only.
        """
        batch = require_modality_batch(batch, "CASP.forward")
        _check_not_inference_mode("CASP.forward")
        if len(batch) == 0:
            raise ValueError("CASP.forward got no sample (an empty batch).")
        if self.distributed:
            raise RuntimeError(
                "CASP.forward (online TTA) is single-process; build the CASP with "
                "distributed=False on the process that adapts."
            )
        if episodic:
            self.restore(self._source_state)
        batch = batch.replace(target=None)
        on_model = batch.to(self.device)
        optimizer = self._online_optimizer(episodic)
        offset = 0 if episodic else len(self.report.contrastive_losses)
        rng = random.Random(self.config.seed + offset)
        with self._adapting():
            self.model.train()
            for _ in range(steps):
                if len(batch) < 2:
                    break
                loss, _ = self.contrastive_loss(on_model, rng.choice(batch.modalities))
                value = loss.item()
                if not math.isfinite(value):  # a NaN update would spoil every later batch
                    warnings.warn(
                        "CASP.forward: the contrastive loss is NaN or infinite on this batch; "
                        "the model was not updated.",
                        stacklevel=2,
                    )
                    break
                self._step(optimizer, loss)
                self.report.contrastive_losses.append(value)
        return self.predict(batch)

    __call__ = forward

    def _online_optimizer(self, episodic: bool) -> torch.optim.Optimizer | Float32MasterAdam:
        if episodic or self._online_opt is None:
            self._online_opt = self._optimizer()
        return self._online_opt


class _Best:
    """The released code's epoch selection by labelled target-validation score (opt-in only)."""

    def __init__(
        self,
        casp: CASP,
        validation: ModalityBatch | None,
        score_fn: Callable[[Tensor, Tensor], float] | None,
    ) -> None:
        self.validation, self.score_fn = self.check(validation, score_fn)
        self.casp, self.target = casp, self.validation.require_target()
        self.best, self.state = -float("inf"), casp.snapshot()
        self.update()

    @staticmethod
    def check(
        validation: ModalityBatch | None, score_fn: Callable[[Tensor, Tensor], float] | None
    ) -> tuple[ModalityBatch, Callable[[Tensor, Tensor], float]]:
        """``validation`` and ``score_fn``, or a clear error when either is missing."""
        if validation is None or score_fn is None or validation.target is None:
            raise ValueError(
                "select_by='target_validation' needs validation= (a labelled target batch, with "
                "its target set) and score_fn=."
            )
        return validation, score_fn

    def update(self) -> None:
        score = self.score_fn(self.casp.predict(self.validation), self.target)
        if score > self.best:
            self.best, self.state = score, self.casp.snapshot()
        self.casp.model.train()

    def restore(self) -> None:
        self.casp.restore(self.state)


#: CASP drops modalities by name, so its data are ModalityBatches even for a model that is not
#: called with one
_OTHER_INPUTS = (
    "For a model called with other inputs, put them in a ModalityBatch (one entry per "
    "modality, padding masks beside them) and pass representation_fn(model, batch) -> "
    "(prediction, representation), which calls the model on the batch's tensors."
)


def _in_memory(data: ModalityBatch | Iterable[ModalityBatch], caller: str) -> ModalityBatch:
    """``data``, or the batches an iterable of them (e.g. a ``DataLoader``) yields, concatenated.

    Sequences of different lengths are padded to the longest (``ModalityBatch.concat``).
    """
    if isinstance(data, ModalityBatch):
        return data
    if isinstance(data, Iterable) and not isinstance(data, Tensor | str | bytes | dict):
        batches = list(data)
        if batches and all(isinstance(b, ModalityBatch) for b in batches):
            return ModalityBatch.concat(batches)
        found = "nothing" if not batches else f"items of type {type(batches[0]).__name__}"
        raise TypeError(
            f"{caller}: the iterable yielded {found}; expected ModalityBatch items. {_OTHER_INPUTS}"
        )
    raise TypeError(
        f"{caller} takes a ModalityBatch or an iterable of them (e.g. a DataLoader with "
        f"collate_fn=collate_modalities), got {type(data).__name__}. {_OTHER_INPUTS}"
    )


def _check_not_inference_mode(caller: str) -> None:
    """Adaptation needs autograd, which ``torch.inference_mode`` turns off for good."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{caller} updates the model with gradients, which torch.inference_mode() forbids; "
            "call it outside inference_mode (under torch.no_grad() it turns gradients on for "
            "its own updates, as Tent does)."
        )
