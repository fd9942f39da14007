"""``CGGM``: the modulator called inside the user's own training loop."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

import cggm
from cggm.classifiers import (
    ModalityClassifier,
    StackedClassifiers,
    as_matrix,
    classify,
    final_weight,
)
from cggm.config import CGGMConfig
from cggm.functional import (
    batch_score_counts,
    direction_loss,
    direction_loss_from_target,
    direction_target,
    magnitude_coefficients,
)
from cggm.targets import (
    check_target,
    class_targets,
    label_weights,
    per_sample_loss,
    resize_to_target,
    split_ignored,
    target_tensor,
    task_loss,
)
from mmcore import (
    ModalityBatch,
    ModulePathError,
    call_padding_mask,
    check_distinct_modules,
    check_module_names,
    compiled_inner,
    contract_encoder_paths,
    encoder_features,
    find_modality_batch,
    fused_optimizer,
    held_module,
    make_config,
    masked_mean,
    modalities_not_in_batch,
    resolve_module,
    stacklevel_outside,
    trainable_dtype,
)

__all__ = ["CGGM"]


def _shared_parameters(encoders: Mapping[str, nn.Module]) -> list[str]:
    """The modalities whose encoders share a parameter with an earlier modality's (and it)."""
    owner: dict[int, str] = {}
    shared: list[str] = []
    for m, enc in encoders.items():
        for p in enc.parameters():
            first = owner.setdefault(id(p), m)
            if first != m:
                shared += [x for x in (first, m) if x not in shared]
    return shared


class CGGM:
    """Classifier-guided gradient modulation (Guo et al., NeurIPS 2024, arXiv 2411.01409).

    Per modality ``m`` an auxiliary classifier ``f_m`` learns the task from the *detached* output
    of encoder ``m`` (its gradients never reach the encoders) with its own optimiser; it is not
    used at inference. Each step, the improvement ``Δ_m`` of ``f_m``'s score on the batch gives
    coefficients ``B_m`` (the least-improving modality gets the largest share), encoder ``m``'s
    gradients are scaled by ``ρ · B_m`` between ``backward()`` and the optimiser step, and the
    direction term ``λ · L_gm`` pulls the model head towards the classifiers.

    Args:
        model: the multimodal model. With no ``encoder_modules`` it must follow the mmcore
            contract (``encoders`` ``ModuleDict``, ``head``). A ``DistributedDataParallel`` (or
            ``DataParallel``) wrapper stands for the module it holds, which the paths name.
        config: a :class:`CGGMConfig` (or give its fields as keyword arguments).
        encoder_modules: modality → dotted path of that modality's encoder.
        head_module: dotted path of the module whose last Linear/Conv weight is ``W^Ω``
            (default ``"head"``).
        classifiers: optional modality → classifier module (default: :class:`ModalityClassifier`
            built on the first step from the captured feature shapes). A module whose
            ``forward`` takes ``padding_mask`` gets the features with the mask; any other gets
            sequences mean-pooled over their real steps. With ``lam > 0`` each must end in a
            Linear/Conv layer of the head's final weight shape.
        feature_fn: ``feature_fn(modality, output)`` turns an encoder module's raw output into
            the features its classifier sees (``[B, d]``, ``[B, T, d]`` or ``[B, C, *spatial]``),
            e.g. a recurrent encoder's last hidden state or a text encoder's first token.
            Default: :func:`mmcore.encoder_features` (the tensor, a ``transformers`` output's
            ``last_hidden_state``, or a tuple's first item). Its output is detached.

    Example (the user's loop; ``CGGM`` is no trainer)::

        cggm = CGGM(model, task="classification", num_outputs=10, rho=1.3, lam=0.2)
        for batch in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()
            loss.backward()
            cggm.step(batch.target)   # trains the classifiers, scales the encoders' gradients
            optimizer.step()

    With AMP, call ``scaler.unscale_(optimizer)`` before ``cggm.step``; with gradient
    accumulation, pass ``sync=False`` on the micro-steps that do not update the weights.
    """

    def __init__(
        self,
        model: nn.Module,
        config: CGGMConfig | None = None,
        *,
        encoder_modules: Mapping[str, str] | None = None,
        head_module: str | None = None,
        classifiers: Mapping[str, nn.Module] | None = None,
        feature_fn: Callable[[str, Any], Tensor] | None = None,
        **config_kwargs: Any,
    ) -> None:
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(
                f"CGGM feature_fn must be callable (modality, encoder output) -> Tensor, got a "
                f"{type(feature_fn).__name__}."
            )
        self.feature_fn = feature_fn
        if config is not None and config_kwargs:
            raise ValueError("pass either config= or its fields as keyword arguments, not both.")
        self.config = config or make_config(CGGMConfig, "CGGM", **config_kwargs)
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            raise TypeError(
                f"CGGM: nn.DataParallel over {len(model.device_ids)} devices runs a replica of "
                "the model on each, and each replica's encoders would report only its slice of "
                "the batch to CGGM's hooks. Use DistributedDataParallel (one process per "
                "device; CGGM all-reduces its statistics), or DataParallel on one device."
            )
        # DDP calls the module it holds: hook that (a compiled one as it is, before its first
        # call, so that dynamo traces the hooks)
        model = held_module(model, compiled=False)
        paths = (
            dict(encoder_modules)
            if encoder_modules is not None
            else contract_encoder_paths(model, "encoder_modules={modality: 'dotted.path'}")
        )
        if len(paths) < 2:
            raise ValueError(f"CGGM balances >= 2 modalities, got {list(paths)}.")
        check_module_names(paths, "CGGM")
        self.modalities = tuple(paths)
        self.encoders = {m: self._resolve(model, p, "encoder_modules") for m, p in paths.items()}
        check_distinct_modules(self.encoders, "CGGM encoder_modules")
        shared = _shared_parameters(self.encoders)
        if shared:
            raise ValueError(
                f"CGGM encoder_modules: {shared} hold parameters in common (one encoder inside "
                "another, or shared weights); each modality's gradients are scaled by its own "
                "factor, so name each modality's own part, without the shared parameters."
            )
        self._encoder_params = {m: list(enc.parameters()) for m, enc in self.encoders.items()}
        self.head_weight = final_weight(self._resolve(model, head_module or "head", "head_module"))
        head_width = self.head_weight.shape[1]
        hidden = self.config.classifier_hidden
        if hidden is not None and hidden != head_width and self.config.lam > 0:
            raise ValueError(
                f"CGGM: classifier_hidden={hidden} differs from the width of the head's input "
                f"({head_width}); the direction term compares the classifiers' final weights "
                "with the head's, so it needs lam=0 (or classifier_hidden=None)."
            )
        #: modality → classifier (an ``nn.ModuleDict``), or the default ones stacked
        #: (:class:`StackedClassifiers`); ``None`` until the first :meth:`step` builds them
        self.classifiers: nn.ModuleDict | StackedClassifiers | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._classifier_heads: Tensor | list[Tensor] = []
        #: the default classifiers of a per-sample task see feature maps globally average-pooled
        self._pool_maps = classifiers is None and self.config.task != "segmentation"
        if classifiers is not None:
            if self.config.classifier_hidden is not None:
                raise ValueError(
                    "CGGM: classifier_hidden sizes the default classifiers; with classifiers= "
                    "given, size them yourself."
                )
            missing = set(self.modalities) - set(classifiers)
            if missing:
                raise ValueError(f"classifiers lacks modalities {sorted(missing)}.")
            self._install_classifiers(nn.ModuleDict({m: classifiers[m] for m in self.modalities}))
        m = len(self.modalities)
        self.prev_scores = torch.zeros(m)  # ε^{t-1}; ε^0 = 0 as in the released code
        self.ema_scores: Tensor | None = None
        self.coefficients: Tensor | None = None  # the last B
        self.last_scores: Tensor | None = None
        self._totals = torch.zeros(m)
        self._counts = torch.zeros(m)
        self._pending: Tensor | None = None  # reference mode: last step's L_gm, graph kept
        self._direction: Tensor | None = None  # default mode: Σ_m B_m W_m/‖W_m‖ of this step
        #: direction_loss() was called since the last step (else, with λ > 0, warn once)
        self._direction_asked = False
        self._direction_warned = False
        self._frozen_checked = False  # encoders without a trainable parameter (warn once)
        #: direction="gradients": the classifiers' final-weight gradients of their last step,
        #: [M, *W^Ω.shape] (W_m's gradient where the weights mode uses W_m)
        self._classifier_head_grads: Tensor | None = None
        #: stacked classifiers of vectors or sequences take their backward by hand
        #: (StackedClassifiers.forward_backward); False: through autograd, the reference
        self.hand_backward = True
        self._captured: dict[str, Tensor] = {}
        self._call_masks: dict[str, Tensor | None] = {}  # padding masks the encoders were given
        self._ran_without_grad: set[str] = set()  # encoders the last forward ran under no_grad
        self._batch: ModalityBatch | None = None
        self._names_checked = False  # the batch's modality names, against ours (warn once)
        self._length_warned: set[str] = set()  # modalities whose features change the length
        #: the modalities some batch has named: a later batch that does not name one lacks it
        #: (any other is named otherwise in the batch, the mismatch the first batch warns of)
        self._named: set[str] = set()
        self._compiled = compiled_inner(model) is not None
        if self._compiled and self.config.direction == "gradients" and self.config.lam > 0:
            raise ValueError(
                "CGGM(direction='gradients') differentiates the head's gradient (a double "
                "backward), which torch.compile does not support; compile the encoders only "
                "(the head's backward then stays eager), or use direction='weights'."
            )
        self._forward_ran = False  # since the last step: the model's own pre-hook fired
        #: the model's last call ran without autograd (an evaluation pass): its encoders' outputs
        #: are not captured, so a validation pass between backward() and step() changes nothing
        self._evaluating = False
        #: model calls in progress: an encoder that runs outside one runs from another of the
        #: model's methods (``model.head(model.fused(batch))``), which the pre-hook does not see
        self._model_calls = 0
        self._handles = [
            model.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
            model.register_forward_hook(self._after_model_call, always_call=True),
        ]
        for name, enc in self.encoders.items():
            # a partial of a bound method, not a closure: a model carrying it can be pickled, and
            # a deep copy of the model binds it to a copy of the modulator
            self._handles.append(
                enc.register_forward_hook(functools.partial(self._capture, name), with_kwargs=True)
            )

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _resolve(model: nn.Module, path: str, field: str) -> nn.Module:
        try:
            return resolve_module(model, path)
        except ModulePathError as err:
            raise ModulePathError(f"CGGM {field}: {err}") from None

    def _install_classifiers(self, classifiers: nn.ModuleDict, *, stack: bool = False) -> None:
        device = self.head_weight.device
        classifiers = classifiers.to(device)
        for m, clf in classifiers.items():
            if not any(p.requires_grad for p in clf.parameters()):
                raise ValueError(
                    f"CGGM: classifier '{m}' has no trainable parameter; its score would never "
                    "improve, and its optimiser would have nothing to step."
                )
        if self.config.lam > 0:
            head = as_matrix(self.head_weight)
            for m, clf in classifiers.items():
                w = final_weight(clf, m)
                if as_matrix(w).shape != head.shape:
                    raise ValueError(
                        f"CGGM: classifier '{m}' ends in a weight of shape {tuple(w.shape)} but "
                        f"the head's is {tuple(self.head_weight.shape)}; the direction term "
                        "compares them, so they must match (or set lam=0)."
                    )
        defaults = {m: c for m, c in classifiers.items() if isinstance(c, ModalityClassifier)}
        self._stacked = stack and len(defaults) == len(classifiers) and self._can_stack(defaults)
        installed: nn.ModuleDict | StackedClassifiers
        if self._stacked:
            installed = StackedClassifiers.from_classifiers(defaults, self.modalities)
            # the classifiers' final weights, [M, C, F]: the direction term needs them each step
            self._classifier_heads = installed.weight2
        else:
            installed = classifiers
            # compared with the head by the direction term alone: any classifier does at λ = 0
            self._classifier_heads = (
                [final_weight(classifiers[m], m) for m in self.modalities]
                if self.config.lam > 0
                else []
            )
        self.classifiers = installed
        if dist.is_available() and dist.is_initialized():
            for p in installed.parameters():  # every rank starts from rank 0's classifiers
                dist.broadcast(p.data, src=0)
        # fused (one kernel for all classifiers) where torch and the device have it: the
        # per-tensor loop dominated the step overhead on small models
        self.optimizer = fused_optimizer(
            torch.optim.Adam,
            installed.parameters(),
            lr=self.config.cls_lr,
            weight_decay=self.config.cls_weight_decay,
        )

    def _can_stack(self, classifiers: Mapping[str, ModalityClassifier]) -> bool:
        """Whether the classifiers can be stored as one batched MLP.

        They can when all are default ones (not subclasses) whose inputs are vectors/sequences
        of one size, or feature maps of one shape.
        """
        clfs = [classifiers[m] for m in self.modalities]
        if any(type(c) is not ModalityClassifier for c in clfs):
            return False
        maps = {len(c.feature_shape) > 2 for c in clfs}
        if len(maps) != 1 or (maps == {True} and len({c.feature_shape for c in clfs}) != 1):
            return False
        shapes = {tuple(layer.weight.shape for layer in c.layers()) for c in clfs}
        biased = all(layer.bias is not None for c in clfs for layer in c.layers())
        return len(shapes) == 1 and biased

    def _installed(self) -> tuple[nn.ModuleDict | StackedClassifiers, torch.optim.Optimizer]:
        """The classifiers and their optimiser (built by the first :meth:`step`)."""
        if self.classifiers is None or self.optimizer is None:
            raise RuntimeError("CGGM: the classifiers are built on the first step() call.")
        return self.classifiers, self.optimizer

    def classifier(self, modality: str) -> nn.Module:
        """``modality``'s auxiliary classifier as a standalone module.

        The default classifiers of one feature size are stored stacked
        (:class:`StackedClassifiers`); for those this is a copy of the current weights.
        """
        classifiers, _ = self._installed()
        if modality not in self.modalities:
            raise KeyError(f"CGGM: no modality {modality!r}; modalities: {list(self.modalities)}.")
        if isinstance(classifiers, StackedClassifiers):
            return classifiers.unstack(modality)
        return classifiers[modality]

    def _stacked_logits(self, stack: StackedClassifiers, feats: Mapping[str, Tensor]) -> Tensor:
        """Every modality's classifier on feature maps as one batched per-pixel MLP.

        Logits ``[M, B, C, *spatial]``.
        """
        x = torch.stack([feats[m] for m in self.modalities])  # [M, B, d, *spatial]
        n_mod, b, d, spatial = x.shape[0], x.shape[1], x.shape[2], x.shape[3:]
        logits = stack(x.movedim(2, -1).reshape(n_mod, -1, d))
        return logits.view(n_mod, b, *spatial, -1).movedim(-1, 2)

    def _stacked_inputs(self, feats: Mapping[str, Tensor]) -> Tensor:
        """Vector features ``[M, B, d]`` (sequences mean-pooled over their real steps)."""
        xs = []
        for m in self.modalities:
            f = feats[m]
            if f.ndim == 3:
                f = masked_mean(f, self._padding_mask(m, f))
            xs.append(f)
        return torch.stack(xs)

    def _logit_grads(
        self,
        target: Tensor,
        logits: Tensor,
        weights: Tensor | None = None,
        labelled: Tensor | None = None,
    ) -> Tensor:
        """Gradient of ``Σ_m`` (classifier ``m``'s mean task loss) w.r.t. logits ``[M, B, C]``.

        ``weights`` ``[M, B]``: each classifier's loss is the mean over its weighted samples.
        ``labelled`` (multilabel ``[B, K]``): each sample's loss is the mean over its labelled
        labels (the weights then count them).
        """
        grad = self._per_sample_logit_grads(target, logits, labelled)
        if weights is None:
            return grad.div_(logits.shape[1])
        scale = weights / weights.sum(dim=1, keepdim=True).clamp_min(1)
        return grad.mul_(scale.unsqueeze(-1).to(grad.dtype))

    def _per_sample_logit_grads(
        self, target: Tensor, logits: Tensor, labelled: Tensor | None = None
    ) -> Tensor:
        """Gradient of each sample's task loss w.r.t. its logits ``[M, B, C]`` (a new tensor)."""
        if self.config.task == "regression":  # L1: sign(prediction − target)
            t = target.reshape(1, logits.shape[1], -1).to(logits.dtype)
            if t.shape[2] != logits.shape[2]:
                raise ValueError(
                    f"CGGM.step: regression targets of shape {tuple(target.shape)} for "
                    f"{logits.shape[2]} outputs per sample."
                )
            # L1's mean runs over every output too
            return torch.sign(logits - t).div_(logits.shape[2])
        if self.config.task == "multilabel":  # BCE averaged over the labels: (sigmoid − t) / K
            t = target.reshape(1, logits.shape[1], -1).to(logits.dtype)
            if labelled is None:
                return (logits.sigmoid() - t).div_(logits.shape[2])
            keep = labelled.reshape(t.shape).to(logits.dtype)
            return (logits.sigmoid() - t).mul_(keep / keep.sum(dim=2, keepdim=True).clamp_min(1))
        if self.config.binary:  # binary cross-entropy with logits: sigmoid − target
            return logits.sigmoid() - target.to(logits.dtype).view(1, -1, 1)
        # cross-entropy: softmax − one-hot (check_target has checked the class range)
        grad = logits.softmax(dim=-1)
        grad[:, torch.arange(len(target), device=target.device), target] -= 1
        return grad

    def _presence_weights(
        self, batch_size: int, device: torch.device, not_run: list[str]
    ) -> Tensor | None:
        """``[M, B]`` float, 0 where a sample lacks the modality (the batch's presence masks).

        A modality whose encoder did not run in the forward pass (``not_run``: a model that
        skips absent modalities), or that the batch does not name though earlier batches did
        (a model that encodes zeros for it), is absent from every sample. ``None`` when no
        modality is missing anywhere (then every path is the plain one), and in reference mode
        (the released code has no missing modalities).
        """
        if self.config.mode == "reference":
            return None
        batch = self._batch
        if batch is not None and batch.batch_size != batch_size:
            batch = None  # not this step's batch
        masks = [None if batch is None else batch.presence.get(m) for m in self.modalities]
        if batch is not None:
            not_run = [*not_run, *(m for m in self._named if m not in batch)]
        if all(mask is None for mask in masks) and not not_run:
            return None
        full = torch.ones(batch_size, dtype=torch.bool, device=device)
        rows = [
            ~full if m in not_run else full if mask is None else mask.to(device)
            for m, mask in zip(self.modalities, masks, strict=True)
        ]
        return torch.stack(rows).float()

    def _check_encoders_that_did_not_run(self, not_run: list[str]) -> None:
        """Encoders the last forward pass skipped: absent modalities, where CGGM can do so."""
        none_seen = len(not_run) == len(self.modalities)
        if self._forward_ran and self._compiled and none_seen:
            raise RuntimeError(
                f"CGGM.step: the model's forward ran but the encoders of {not_run} were not "
                "seen: the model is torch.compile'd and was traced before CGGM added its hooks, "
                "and dynamo does not re-trace for hooks added later. Build CGGM before the "
                "compiled model's first call, or call torch._dynamo.reset() after building it."
            )
        if not self._forward_ran or none_seen:
            evaluated = (
                " (the model's last call ran under torch.no_grad() or inference_mode: an "
                "evaluation pass, which CGGM does not capture)"
                if self._evaluating
                else ""
            )
            raise RuntimeError(
                f"CGGM.step: no encoder output captured for {not_run}; call the model's forward "
                f"on this batch first{evaluated}."
            )
        if self.config.mode == "reference":
            raise RuntimeError(
                f"CGGM.step: the encoders of {not_run} did not run in the last forward pass; "
                "reference mode, as the released code, needs every encoder's features each step "
                "(the default mode counts such a modality as absent from the batch)."
            )
        if self.classifiers is None:
            raise RuntimeError(
                f"CGGM.step: the encoders of {not_run} did not run in the forward pass of the "
                "first step, and CGGM sizes each modality's classifier from its features; make "
                "the first batch hold every modality, or pass classifiers=."
            )

    def _classifier_inputs(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """The captured features as the classifiers take them.

        For classification and regression the default classifiers see feature maps
        ``[B, C, *spatial]`` averaged over their positions (``[B, C]``, a CNN's global pooling):
        one prediction per sample. Segmentation needs maps from every encoder.
        """
        if self._pool_maps:
            return {m: f.flatten(2).mean(dim=2) if f.ndim > 3 else f for m, f in feats.items()}
        if self.config.task == "segmentation":
            flat = {m: tuple(f.shape) for m, f in feats.items() if f.ndim < 4}
            if flat:
                raise ValueError(
                    f"CGGM task='segmentation' predicts per pixel from each encoder's feature "
                    f"maps [B, C, H, W(, D)], but the features of {flat} are not maps; capture "
                    "maps (encoder_modules= / feature_fn=)."
                )
        return feats

    def _padding_mask(self, modality: str, features: Tensor) -> Tensor | None:
        """The padding mask of ``modality`` where it fits ``features`` ``[B, T, d]``.

        The batch's, else the one its encoder was called with (a ``transformers`` encoder's
        ``attention_mask``: a model called as ``model(input_ids, attention_mask)``).
        """
        batch = self._batch
        if features.ndim != 3:
            return None
        mask, source = None, "batch's padding mask"
        if batch is not None and modality in batch:
            mask = batch.padding_mask(modality)
        if mask is None and self._call_masks.get(modality) is not None:
            mask, source = self._call_masks[modality], "padding mask its encoder was given"
        if mask is None or mask.shape == features.shape[:2]:
            return mask
        # an encoder (or feature_fn) that changed the length: the batch's mask no longer fits
        if modality not in self._length_warned:
            self._length_warned.add(modality)
            warnings.warn(
                f"CGGM: the features of '{modality}' have {features.shape[1]} steps but the "
                f"{source} {mask.shape[1]} (the encoder or feature_fn changes the "
                f"length), so the classifier of '{modality}' pools every step, padded ones "
                "included. Return features that keep the length, or pooled ones [B, d], from "
                "feature_fn.",
                stacklevel=stacklevel_outside(cggm),
            )
        return None

    def _build_default_classifiers(self, feature_shapes: Mapping[str, tuple[int, ...]]) -> None:
        w = self.head_weight
        if w.shape[0] != self.config.num_outputs:
            raise ValueError(
                f"CGGM: the head's final weight has {w.shape[0]} outputs but num_outputs="
                f"{self.config.num_outputs}; pass num_outputs={w.shape[0]} (or head_module= "
                "naming the module that produces the task's outputs)."
            )
        hidden = self.config.classifier_hidden or w.shape[1]
        self._feature_shapes = {m: tuple(s) for m, s in feature_shapes.items()}
        dtype = trainable_dtype(w.dtype)  # float32 for a half-precision head
        self._install_classifiers(
            nn.ModuleDict(
                {
                    m: ModalityClassifier(self._feature_shapes[m], hidden, self.config.num_outputs)
                    for m in self.modalities
                }
            ).to(dtype),
            stack=True,
        )

    # ------------------------------------------------------------------ hooks
    def _on_model_call(
        self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._model_calls += 1
        self._evaluating = not torch.is_grad_enabled()
        if self._evaluating:  # no backward can follow this pass: it is not a training step's
            return
        self._captured, self._call_masks = {}, {}
        self._ran_without_grad = set()
        self._forward_ran = True
        self._batch = find_modality_batch(args, kwargs)
        if self._batch is not None and len(self._named) < len(self.modalities):
            self._named.update(m for m in self.modalities if m in self._batch)
        if self._batch is not None and not self._names_checked:
            self._names_checked = True
            unnamed = [m for m in self.modalities if m not in self._named]  # (a resumed run's)
            message = modalities_not_in_batch(unnamed, self._batch, "CGGM: the")
            if message:
                warnings.warn(message, stacklevel=stacklevel_outside(cggm))

    def _after_model_call(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self._model_calls = max(self._model_calls - 1, 0)

    def _is_evaluation_pass(self, modality: str) -> bool:
        """Whether this encoder call belongs to a pass without autograd (validation).

        Inside a model call, the call's own mode decides (an encoder under ``no_grad`` inside a
        training forward is captured, and flagged). Outside one (another method of the model),
        a call without autograd does not replace features captured with it since the last step:
        those are the training pass's, and ``backward()`` may already have used them.
        """
        if self._model_calls:
            return self._evaluating
        return (
            not torch.is_grad_enabled()
            and modality in self._captured
            and modality not in self._ran_without_grad
        )

    def _capture(
        self,
        modality: str,
        module: nn.Module,
        _args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if self._is_evaluation_pass(modality):
            return
        if self.feature_fn is None:
            try:
                features = encoder_features(output)
            except TypeError as err:
                raise TypeError(
                    f"CGGM: the encoder of modality '{modality}': {err} Pass "
                    "feature_fn=lambda modality, output: ... to pick its features."
                ) from None
        else:
            features = self.feature_fn(modality, output)
            if not isinstance(features, Tensor):
                raise TypeError(
                    f"CGGM feature_fn returned a {type(features).__name__} for modality "
                    f"'{modality}'; it must return the features as a Tensor."
                )
        self._captured[modality] = features.detach()
        # model(input_ids, attention_mask=...): no batch to read the mask from
        self._call_masks[modality] = call_padding_mask(module, kwargs, features.shape[0])
        if torch.is_grad_enabled():
            self._ran_without_grad.discard(modality)
        else:
            self._ran_without_grad.add(modality)

    def remove(self) -> None:
        """Remove the hooks from the model; :meth:`step` then refuses to run."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ the two calls per step
    def direction_loss(self, task_loss: Tensor | None = None) -> Tensor:
        """``λ · L_gm`` to add to the task loss before ``backward()`` (0 until the first step).

        Default mode computes it fresh from the head's current weight and the last ``B``; the
        classifiers' side, ``Σ_m B_m W_m / ‖W_m‖``, is computed once per step, as it only
        changes in :meth:`step`. Reference mode returns the previous step's term, whose graph
        was built from copies of the weights one step earlier, as the released code does; that
        graph can be used once, so only the first call after a syncing step returns it (later
        calls return 0).

        ``task_loss``: this step's task loss, which ``direction="gradients"`` needs (and the
        weights proxy ignores): the cosine then compares its gradient w.r.t. the head's final
        weight, taken with ``create_graph=True`` so that the term's own gradient reaches the
        head and, through the features, the encoders (a double backward through the head),
        with each classifier's final-weight gradient of its last step. It returns 0 where the
        loss carries no gradient (an evaluation pass).
        """
        zero = self.head_weight.new_zeros(())
        cfg = self.config
        self._direction_asked = True
        if cfg.lam == 0:
            return zero
        if cfg.direction == "gradients" and task_loss is None:  # from the first call on
            _missing_task_loss()
        if self.classifiers is None or self.coefficients is None:
            return zero
        if cfg.mode == "reference":
            pending, self._pending = self._pending, None
            return zero if pending is None else cfg.lam * pending
        b = self.coefficients.to(self.head_weight.device)
        if cfg.direction == "weights":
            classifier_side, fusion_side = self._classifier_heads, self.head_weight
        else:
            loss = cast(Tensor, task_loss)  # checked above
            if self._classifier_head_grads is None or not (
                torch.is_grad_enabled() and loss.requires_grad
            ):
                return zero
            classifier_side = self._classifier_head_grads
            fusion_side = self._head_gradient(loss)
        if self._direction is None:  # B and the classifiers change only in step()
            self._direction = direction_target(b, classifier_side)
        return cfg.lam * direction_loss_from_target(b, self._direction, fusion_side)

    def _head_gradient(self, task_loss: Tensor) -> Tensor:
        """``∂ task_loss / ∂ W^Ω``, itself differentiable (``create_graph``)."""
        if not self.head_weight.requires_grad:
            raise RuntimeError(
                "CGGM(direction='gradients'): the head's final weight does not require "
                "gradients, so the task loss has no gradient w.r.t. it; train the head, or use "
                "direction='weights'."
            )
        (grad,) = torch.autograd.grad(
            task_loss, self.head_weight, create_graph=True, allow_unused=True
        )
        if grad is None:
            raise RuntimeError(
                "CGGM(direction='gradients'): the loss given to direction_loss() does not "
                "depend on the head's final weight; pass the task loss computed from the "
                "model's output (or name the head that produces it: head_module=)."
            )
        return grad

    def step(self, target: Tensor | ModalityBatch, *, sync: bool = True) -> dict[str, float] | None:
        """Train the classifiers on this batch, update the scores and scale the gradients.

        Call after ``loss.backward()`` and before ``optimizer.step()`` (after
        ``scaler.unscale_`` under AMP, before any gradient clipping). ``target``: this batch's
        targets, or the ``ModalityBatch`` itself (its ``target`` is used). Returns
        ``{modality: B_m}`` on syncing steps, ``None`` on accumulation micro-steps
        (``sync=False``), which only train the classifiers and accumulate their scores, and on
        a step skipped (default mode) because a classifier's outputs were not finite.
        """
        if not self._handles:
            raise RuntimeError(
                "CGGM.step: remove() took this modulator's hooks off the model, so it sees no "
                "encoder output; build a new CGGM (load_state_dict this one's state to resume)."
            )
        if isinstance(target, ModalityBatch) and self._batch is None:
            # no model forward saw a batch (the model trained through another of its methods):
            # the one given here has the presence and padding masks
            self._batch = target
        target = target_tensor(target)
        # encoders the forward pass did not run (a model that skips absent modalities)
        not_run = [m for m in self.modalities if m not in self._captured]
        if not_run:
            self._check_encoders_that_did_not_run(not_run)
        # kept until the classifiers have stepped: a step refused for a mistake (a missed
        # backward, bad targets) may be retried once it is fixed, without a new forward
        feats = self._classifier_inputs(dict(self._captured))
        if self.classifiers is None:
            self._build_default_classifiers({m: tuple(f.shape[1:]) for m, f in feats.items()})
        classifiers, optimizer = self._installed()
        first = next(classifiers.parameters())
        dtype, device = first.dtype, next(iter(feats.values())).device
        if first.device != device:
            raise RuntimeError(
                f"CGGM.step: the encoders' features are on {device} but the classifiers on "
                f"{first.device}: the model moved after CGGM built them. Move the model before "
                "its first modulated step (or build a new CGGM and load_state_dict the old one's)."
            )
        feats = {m: f.to(dtype) if f.is_floating_point() else f for m, f in feats.items()}
        cfg = self.config
        target = target.to(self.head_weight.device)
        if cfg.class_indices:
            maps = next(iter(feats.values())).ndim - 2 if cfg.task == "segmentation" else 0
            target = class_targets(target, cfg, maps)
        # where a target carries a label (ignore_index): [B], [B, K] or [B, *spatial]
        target, labelled = split_ignored(target, cfg)
        check_target(target, next(iter(feats.values())).shape[0], cfg)
        if sync and cfg.rho is not None and self._no_encoder_gradients():
            without_grad = [m for m in self.modalities if m in self._ran_without_grad]
            if without_grad:
                raise RuntimeError(
                    f"CGGM.step: no encoder parameter has a gradient to scale: the encoders "
                    f"{without_grad} ran under torch.no_grad() (or inference_mode) in the "
                    "forward pass, so the backward cannot reach them. CGGM modulates encoders "
                    "that train: run them with gradients (freeze one with requires_grad_(False) "
                    "instead). Under activation checkpointing with use_reentrant=True, an "
                    "encoder whose inputs need no gradient gets none: use use_reentrant=False "
                    "(or make an input require grad)."
                )
            raise RuntimeError(
                "CGGM.step: no encoder parameter has a gradient to scale; call loss.backward() "
                "(and scaler.unscale_ under AMP) before cggm.step()."
            )
        self._check_direction_asked()  # once the step is known to go ahead
        if sync and cfg.rho is not None and not self._frozen_checked:
            self._warn_frozen_encoders()
        weights = self._presence_weights(target.shape[0], target.device, not_run)  # [M, B]
        if not_run and isinstance(classifiers, StackedClassifiers):
            # stacked classifiers share one feature shape; zeros that no loss or score counts
            present = next(iter(feats.values()))
            feats.update({m: torch.zeros_like(present) for m in not_run})
        if weights is not None:  # zeros, not 0 × what they hold: NaN × 0 would still be NaN
            feats = {
                m: _zero_absent(feats[m], weights[i])
                for i, m in enumerate(self.modalities)
                if m in feats
            }
        if isinstance(classifiers, StackedClassifiers):
            loss, total, count, finite = self._stacked_pass(
                classifiers, optimizer, feats, target, weights, labelled
            )
        else:
            loss, total, count, finite = self._per_modality_pass(
                classifiers, optimizer, feats, target, weights, labelled, not_run
            )
        # one copy to the host for the scores and the finiteness check
        host = torch.stack([total.float(), count.float(), finite.all(1).float()]).cpu()
        total, count = host[0], host[1]
        if cfg.mode == "default" and self._skip_non_finite(host[2]):
            return None
        if loss is not None:
            loss.backward()
        if not_run and not isinstance(classifiers, StackedClassifiers):
            # zero gradients, as a batch marking the modality missing everywhere gives (Adam
            # then moves these classifiers by their momentum alone, as the stacked ones move)
            for m in not_run:
                for p in classifiers[m].parameters():
                    if p.requires_grad and p.grad is None:
                        p.grad = torch.zeros_like(p)
        self._batch = None  # its padding masks are used; hold no batch between steps
        self._forward_ran = False
        self._average_classifier_grads()
        if cfg.direction == "gradients" and cfg.lam > 0:
            self._classifier_head_grads = self._final_weight_grads()
        if cfg.mode == "reference" and sync and cfg.lam > 0:
            heads = (
                self._classifier_heads.clone()
                if isinstance(self._classifier_heads, Tensor)
                else [w.clone() for w in self._classifier_heads]
            )
            w_fusion = self.head_weight.clone()
        optimizer.step()
        self._captured, self._call_masks = {}, {}  # used: the next step needs the next forward's
        self._ran_without_grad = set()
        self._direction = None  # the classifiers moved (and B may change below)
        self._direction_asked = False
        self._totals += total
        self._counts += count
        if not sync:
            return None

        b = self._update_coefficients()
        if cfg.mode == "reference" and cfg.lam > 0:
            self._pending = direction_loss(b, heads, w_fusion)
        if cfg.rho is not None:
            self._scale_encoder_gradients(cfg.rho * b)
        return dict(zip(self.modalities, b.tolist(), strict=True))

    def _check_direction_asked(self) -> None:
        """Warn once when ``λ > 0`` but no ``direction_loss()`` was taken since the last step.

        Before the first step the term is 0, so the first step has nothing to miss.
        """
        if (
            self.config.lam > 0
            and self.coefficients is not None
            and not self._direction_asked
            and not self._direction_warned
        ):
            self._direction_warned = True
            warnings.warn(
                f"CGGM: lam={self.config.lam} but direction_loss() was not called since the "
                "last step, so the direction term λ·L_gm is in no loss: add it, loss = "
                "task_loss + cggm.direction_loss(), or pass lam=0 to turn it off. (Warned "
                "once.)",
                stacklevel=stacklevel_outside(cggm),
            )

    def _warn_frozen_encoders(self) -> None:
        """Warn once about encoders without a trainable parameter: nothing of theirs is scaled."""
        self._frozen_checked = True
        frozen = [
            m
            for m, params in self._encoder_params.items()
            if not any(p.requires_grad for p in params)
        ]
        if not frozen:
            return
        every = len(frozen) == len(self.modalities)
        warnings.warn(
            f"CGGM: the encoders of {frozen} have no trainable parameter, so no gradient of "
            "theirs is scaled"
            + (
                ": with every encoder frozen (a frozen backbone, as under a parameter-efficient "
                "adapter) CGGM balances nothing, and only its direction term acts (on the head)."
                if every
                else "; their classifiers still train, and their share of Σ B_m = M − 1 is "
                "scaled onto nothing."
            )
            + " (Warned once.)",
            stacklevel=stacklevel_outside(cggm),
        )

    def _stacked_pass(
        self,
        classifiers: StackedClassifiers,
        optimizer: torch.optim.Optimizer,
        feats: dict[str, Tensor],
        target: Tensor,
        weights: Tensor | None,
        labelled: Tensor | None,
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        """The stacked classifiers on this batch: ``(loss, totals, counts, finite [M, B])``.

        ``weights``: presence ``[M, B]``; ``labelled``: the labelled targets (ignore_index).
        ``loss`` is ``None`` when the backward was taken by hand (the gradients are set).
        """
        cfg = self.config
        loss = None
        maps = len(classifiers.feature_shape) > 2
        n_mod = len(self.modalities)
        loss_weights = label_weights(weights, labelled, n_mod)
        if self.hand_backward and not maps:  # vectors, pooled sequences
            # the sum over modalities of each classifier's mean loss, its backward by hand
            # (it replaces the gradients: no zero_grad needed)
            logits = classifiers.forward_backward(
                self._stacked_inputs(feats),
                functools.partial(
                    self._logit_grads, target, weights=loss_weights, labelled=labelled
                ),
            )
        else:  # autograd (feature maps: through the per-pixel MLP and the resize)
            optimizer.zero_grad(set_to_none=True)
            if maps:
                logits = self._stacked_logits(classifiers, feats)  # [M, B, C, *spatial]
            else:
                logits = classifiers(self._stacked_inputs(feats))  # [M, B, C]
            if maps and logits.shape[3:] != target.shape[1:]:
                logits = resize_to_target(logits.flatten(0, 1), target).unflatten(
                    0, logits.shape[:2]
                )
            repeat = (n_mod, *([1] * (target.ndim - 1)))
            if loss_weights is None:
                loss = n_mod * task_loss(logits.flatten(0, 1), target.repeat(repeat), self.config)
            else:
                per_sample = per_sample_loss(
                    logits.flatten(0, 1),
                    target.repeat(repeat),
                    self.config,
                    None if labelled is None else labelled.repeat(repeat),
                )
                loss = _weighted_means(per_sample.view(n_mod, -1), loss_weights).sum()
            logits = logits.detach()
        total, count = batch_score_counts(
            cfg.task,
            logits,
            target,
            cfg.regression_score,
            stacked=True,
            weights=weights,
            labelled=labelled,
        )
        finite = torch.isfinite(logits).reshape(*logits.shape[:2], -1).all(2)  # [M, B]
        return loss, total, count, finite

    def _per_modality_pass(
        self,
        classifiers: nn.ModuleDict,
        optimizer: torch.optim.Optimizer,
        feats: dict[str, Tensor],
        target: Tensor,
        weights: Tensor | None,
        labelled: Tensor | None,
        not_run: list[str],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each modality's own classifier on this batch: ``(loss, totals, counts, finite)``."""
        cfg = self.config
        loss_weights = label_weights(weights, labelled, len(self.modalities))
        device = next(iter(feats.values())).device
        optimizer.zero_grad(set_to_none=True)
        losses, unit_totals, unit_counts, unit_finite = [], [], [], []
        for i, m in enumerate(self.modalities):
            if m in not_run:  # absent from every sample: no loss, no score
                zero = torch.zeros((), device=target.device)
                unit_totals.append(zero)
                unit_counts.append(zero)
                unit_finite.append(torch.ones(target.shape[0], dtype=torch.bool, device=device))
                continue
            pred = classify(classifiers[m], feats[m], self._padding_mask(m, feats[m]))
            if cfg.task == "segmentation" and pred.shape[2:] != target.shape[1:]:
                pred = resize_to_target(pred, target)
            w = None if weights is None else weights[i]
            if loss_weights is None:
                losses.append(task_loss(pred, target, self.config))
            else:
                per_sample = per_sample_loss(pred, target, self.config, labelled)
                losses.append(_weighted_means(per_sample.unsqueeze(0), loss_weights[i, None])[0])
            t, c = batch_score_counts(
                cfg.task, pred.detach(), target, cfg.regression_score, weights=w, labelled=labelled
            )
            unit_totals.append(t)
            unit_counts.append(c)
            unit_finite.append(torch.isfinite(pred.detach()).reshape(pred.shape[0], -1).all(1))
        loss = torch.stack(losses).sum()
        return loss, torch.stack(unit_totals), torch.stack(unit_counts), torch.stack(unit_finite)

    def _update_coefficients(self) -> Tensor:
        """The magnitude coefficients ``B`` ``[M]`` of a syncing step (kept as ``coefficients``).

        From the scores accumulated since the last sync, summed over the ranks, smoothed, and
        their improvement on the previous sync's.
        """
        cfg = self.config
        totals, counts = self._totals.clone(), self._counts.clone()
        if dist.is_available() and dist.is_initialized():
            stats = torch.stack([totals, counts]).to(self.head_weight.device)
            dist.all_reduce(stats)
            totals, counts = stats[0].cpu(), stats[1].cpu()
        self._totals.zero_()
        self._counts.zero_()
        # a modality no sample had since the last sync: no news, its score stays where it was
        scores = torch.where(counts > 0, totals / counts.clamp_min(1), self.prev_scores)
        self.last_scores = scores
        if cfg.smoothing and self.ema_scores is not None:
            scores = cfg.smoothing * self.ema_scores + (1 - cfg.smoothing) * scores
        self.ema_scores = scores
        deltas = scores - self.prev_scores
        self.prev_scores = scores
        b = magnitude_coefficients(deltas, cfg.mode, cfg.eps)
        self.coefficients = b
        return b

    def _final_weight_grads(self) -> Tensor:
        """The classifiers' final-weight gradients of this step, ``[M, n]`` (0 where none)."""
        heads = self._classifier_heads
        with torch.no_grad():
            if isinstance(heads, Tensor):  # stacked: [M, C, F]
                return torch.zeros_like(heads) if heads.grad is None else heads.grad.clone()
            return torch.stack(
                [
                    torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
                    if w.grad is None
                    else w.grad.reshape(-1).clone()
                    for w in heads
                ]
            )

    def _scale_encoder_gradients(self, factors: Tensor) -> None:
        """Multiply each modality's encoder gradients by its factor ``rho * B_m`` (in place)."""
        grads, owners = [], []
        dense_cpu = factors.is_cpu
        for i, m in enumerate(self.modalities):
            for p in self._encoder_params[m]:
                if p.grad is not None:
                    grads.append(p.grad)
                    owners.append(i)
                    dense_cpu = dense_cpu and p.grad.is_cpu and p.grad.layout == torch.strided
        if not grads:
            return
        # on the CPU, _foreach_mul_ with Python scalars wraps each one in a new tensor of the
        # gradient's dtype (three kernel calls per gradient, and a bfloat16 gradient got its
        # factor rounded to bfloat16); 0-dim factors take one call each, a third of the time
        # for 36 gradients, and multiply as grad.mul_(float(factor)) does. Scalars on CUDA: one
        # fused kernel
        per_modality = factors.unbind() if dense_cpu else factors.tolist()
        torch._foreach_mul_(grads, [per_modality[i] for i in owners])

    def _no_encoder_gradients(self) -> bool:
        """Trainable encoder parameters exist and none holds a gradient (a missed backward)."""
        trainable = False
        for params in self._encoder_params.values():
            for p in params:
                if p.grad is not None:
                    return False
                trainable = trainable or p.requires_grad
        return trainable

    def _skip_non_finite(self, finite: Tensor) -> bool:
        """Skip this step where a classifier's logits are not finite, on any rank.

        Nothing is trained, counted or scaled: one bad batch (an fp16 overflow, say, whose model
        step ``GradScaler`` skips) would otherwise leave the classifiers NaN for good, and with
        them every later direction term and loss.
        """
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:  # every rank skips, or none does
            flags = finite.to(self.head_weight.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            finite = flags.cpu()
        if bool(finite.all()):
            return False
        bad = [m for m, ok in zip(self.modalities, finite.tolist(), strict=True) if not ok]
        self._batch, self._captured, self._call_masks, self._forward_ran = None, {}, {}, False
        self._ran_without_grad = set()
        warnings.warn(
            f"CGGM.step: the classifiers' outputs for {bad} are NaN or infinite on this step's "
            f"batch{' of some rank' if distributed else ''} (non-finite encoder features?); the "
            "step is skipped: no classifier trained, no score counted, no gradient scaled.",
            stacklevel=3,
        )
        return True

    def _average_classifier_grads(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        for p in self._installed()[0].parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: classifiers, their optimiser, the running scores.

        As with ``nn.Module.state_dict``, the classifiers' weights and moments are the live
        tensors, which later steps change in place: save the state (``torch.save``) or
        ``copy.deepcopy`` it before training on, to keep this step's.
        """
        return {
            "config": self.config.to_dict(),
            "modalities": list(self.modalities),
            "feature_shapes": getattr(self, "_feature_shapes", None),
            "classifiers": None if self.classifiers is None else self.classifiers.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "prev_scores": self.prev_scores.clone(),
            "ema_scores": None if self.ema_scores is None else self.ema_scores.clone(),
            "coefficients": None if self.coefficients is None else self.coefficients.clone(),
            "totals": self._totals.clone(),
            "counts": self._counts.clone(),
            "named": sorted(self._named),
            "classifier_head_grads": None
            if self._classifier_head_grads is None
            else self._classifier_head_grads.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a reference-mode pending direction term is not saved).

        The state must come from a CGGM over the same modalities (in the same order) with the
        same ``task``, ``num_outputs``, ``mode`` and ``classifier_hidden``; other settings
        (``rho``, ``lam``, learning rates) are this modulator's own, so a resumed run may change
        them.
        """
        self._check_compatible(state)
        if state["classifiers"] is not None:
            if self.classifiers is None:
                if state.get("feature_shapes") is None:
                    raise ValueError(
                        "CGGM.load_state_dict: the state has classifier weights but no feature "
                        "shapes to build them."
                    )
                self._build_default_classifiers(state["feature_shapes"])
            classifiers, optimizer = self._installed()
            classifiers.load_state_dict(state["classifiers"])
            optimizer.load_state_dict(state["optimizer"])
        self.prev_scores = state["prev_scores"].clone()
        self.ema_scores = None if state["ema_scores"] is None else state["ema_scores"].clone()
        self.coefficients = None if state["coefficients"] is None else state["coefficients"].clone()
        self._direction = None
        self._totals = state["totals"].clone()
        self._counts = state["counts"].clone()
        self._named = set(state.get("named", ()))  # absent from states saved before it was recorded
        grads = state.get("classifier_head_grads")  # likewise; None under direction="weights"
        self._classifier_head_grads = None if grads is None else grads.to(self.head_weight.device)

    def _check_compatible(self, state: Mapping[str, Any]) -> None:
        saved = state.get("modalities")  # absent from states saved before it was recorded
        if saved is not None and list(saved) != list(self.modalities):
            raise ValueError(
                f"CGGM.load_state_dict: the state is for modalities {list(saved)}, this CGGM "
                f"modulates {list(self.modalities)} (same names in the same order needed)."
            )
        if len(state["prev_scores"]) != len(self.modalities):
            raise ValueError(
                f"CGGM.load_state_dict: the state has scores for {len(state['prev_scores'])} "
                f"modalities, this CGGM modulates {len(self.modalities)}."
            )
        mine = self.config.to_dict()
        differ = {
            k: (v, mine[k]) for k, v in state["config"].items() if k in _STRUCTURAL and v != mine[k]
        }
        if differ:
            listed = ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"CGGM.load_state_dict: the state was saved with a different set-up ({listed})."
            )


#: config fields that shape the classifiers or the scores: a state saved under others cannot load
_STRUCTURAL = ("task", "num_outputs", "mode", "classifier_hidden", "regression_score")


def _missing_task_loss() -> NoReturn:
    raise ValueError(
        "CGGM(direction='gradients') compares the task loss's gradient with the classifiers': "
        "pass it, loss = task_loss + cggm.direction_loss(task_loss)."
    )


def _zero_absent(features: Tensor, present: Tensor) -> Tensor:
    """``features`` with the rows of samples that lack the modality (``present == 0``) zeroed."""
    if not features.is_floating_point():
        return features
    absent = (present == 0).view(-1, *([1] * (features.ndim - 1)))
    return features.masked_fill(absent, 0.0)


def _weighted_means(per_sample: Tensor, weights: Tensor) -> Tensor:
    """``[M]``: each row's mean over the samples its weights keep (0 when it keeps none)."""
    w = weights.to(per_sample.dtype)
    return (per_sample * w).sum(dim=1) / w.sum(dim=1).clamp_min(1)
