"""``Wander``: wrap a multimodal model the user already has with a Wander adapter."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

import wander
from mmcore import (
    ModalityBatch,
    ModulePathError,
    atomic_write,
    call_padding_mask,
    check_distinct_modules,
    compiled_inner,
    contract_encoder_paths,
    encoder_features,
    find_modality_batch,
    is_compiling,
    modalities_not_in_batch,
    modes_kept,
    parallel_inner,
    read_json,
    resolve_module,
    save_directory,
    stacklevel_outside,
    trainable_dtype,
)
from wander import __version__
from wander.config import WanderConfig, resolve_config
from wander.layer import WanderFusion

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "Wander", "WanderTargetError"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class WanderTargetError(ModulePathError):
    """A module named in the Wander configuration does not exist in the model."""


class Wander(nn.Module):
    """A multimodal model with a Wander adapter (Guo et al., AAAI 2025, arXiv 2412.08979).

    The base model is frozen except ``modules_to_save`` (its ``head`` by default). Forward hooks
    capture each modality's sequence at the output of its target module; the adapter fuses them
    token by token through a CP-factorised outer product and either adds the fused tokens to the
    output of the module that consumes the encoders (``output="fused"``, the paper), or adds a
    shape-preserving residual to every encoder output before that module sees it
    (``output="residual"``). ``Wander(model)(...)`` takes the base model's arguments and returns
    its output type.

    Args:
        model: the base model. With no ``target_modules`` it must follow the mmcore contract
            (``encoders`` ``ModuleDict`` keyed by modality, ``fusion``, ``head``).
        ranks: the three ranks, as a :class:`WanderConfig`, a mapping
            (``{"bottleneck": 16, "feature": 8, "token": 12}``) or a tuple ``(r, R_d, R_t)``.
        example_input: one input for the base model (a ``ModalityBatch``, a tuple of positional
            arguments or a dict of keyword arguments); a forward pass on it reads every size.
            Not needed when the config already holds the sizes (``from_pretrained``).
        target_modules: modality → dotted path of the module producing that modality's sequence.
        fusion_module: dotted path of the module that consumes the encoder outputs.
        modules_to_save: base modules that stay trainable and are saved with the adapter.
        **config: any other :class:`WanderConfig` field (``cp_mode``, ``init``, ``output``, ...).

    A ``torch.compile`` d model is wrapped through the module it holds (``model._orig_mod``):
    graphs it traced before the adapter existed would not run the adapter. Compile the wrapper
    instead, ``torch.compile(wander)``.

    Example:
        >>> model = LateFusionModel.from_batch(batch, out_dim=1)  # doctest: +SKIP
        >>> wander = Wander(model, ranks=(16, 8, 12), example_input=batch)  # doctest: +SKIP
        >>> wander.print_trainable_parameters()  # doctest: +SKIP
        >>> loss = criterion(wander(batch), batch.target)  # doctest: +SKIP
    """

    #: what :meth:`from_pretrained` found: ``{"missing_keys": [...], "unexpected_keys": [...]}``
    #: (``None`` for an adapter that was not loaded)
    load_report: dict[str, list[str]] | None = None

    def __init__(
        self,
        model: nn.Module,
        ranks: WanderConfig | Mapping[str, int] | Sequence[int] | None = None,
        *,
        example_input: Any = None,
        target_modules: Mapping[str, str] | None = None,
        fusion_module: str | None = None,
        modules_to_save: str | Sequence[str] | None = None,
        **config: Any,
    ) -> None:
        super().__init__()
        if isinstance(model, Wander):
            raise ValueError(
                "Wander: this model is already wrapped by Wander; wrap its base model "
                "(`wander.base_model`, or `wander.unwrap()` to remove the first adapter) instead."
            )
        inner = compiled_inner(model)  # hooks on a compiled wrapper may never run
        model = model if inner is None else inner
        if parallel_inner(model) is not None:
            raise TypeError(
                f"Wander: this model is wrapped in {type(model).__name__}. Wrap the model it "
                "holds (`model.module`) with Wander, then the Wander in DistributedDataParallel: "
                "DDP registers the parameters to synchronise when it is built (here the base's, "
                "which Wander freezes, and not the adapter's)."
            )
        cfg = resolve_config(
            ranks,
            target_modules=dict(target_modules) if target_modules is not None else None,
            fusion_module=fusion_module,
            modules_to_save=modules_to_save,  # WanderConfig copies it (one name may be a str)
            **config,
        )
        self.base_model = model
        targets = cfg.target_modules or self._contract_targets(model)
        self._targets = {
            m: self._resolve(model, path, "target_modules", cfg) for m, path in targets.items()
        }
        check_distinct_modules(self._targets, "Wander target_modules")
        consumer_path = cfg.fusion_module or "fusion"
        self._consumer = self._resolve(model, consumer_path, "fusion_module", cfg)
        _check_fusion_point_free(self._consumer, consumer_path)
        if cfg.modules_to_save is None:
            cfg.modules_to_save = (
                ["head"] if isinstance(getattr(model, "head", None), nn.Module) else []
            )
        for path in cfg.modules_to_save:
            self._resolve(model, path, "modules_to_save", cfg)

        if not (cfg.hidden_dims and cfg.seq_lens and (cfg.out_dim or cfg.output == "residual")):
            if example_input is None:
                raise ValueError(
                    "Wander needs `example_input` (one input for the base model) to read the "
                    "modalities' feature sizes and sequence lengths."
                )
            self._read_sizes(cfg, example_input)
        #: the modalities some batch has named: a later batch that does not name one lacks it
        #: (any other is named otherwise in the batch, the mismatch the example input warns of)
        self._named: set[str] = set()
        if example_input is not None:
            self._check_batch_names(example_input)
        if set(cfg.hidden_dims) != set(self._targets) or set(cfg.seq_lens) != set(self._targets):
            raise ValueError(
                f"Wander: the adapter's sizes are for modalities {sorted(cfg.hidden_dims)} but "
                f"the model's target modules are for {sorted(self._targets)} (an adapter saved "
                "from another model?); name the same modalities in target_modules."
            )
        if cfg.output == "fused":
            if cfg.out_dim is None:
                raise ValueError(
                    "Wander: output='fused' needs out_dim, the fusion module's output size (read "
                    "from example_input when it is given)."
                )
            if cfg.fused_dim is not None and cfg.out_dim % cfg.fused_dim:
                raise ValueError(
                    f"Wander: fused_dim={cfg.fused_dim} must divide the fusion module's output "
                    f"size {cfg.out_dim} (the fused tokens are tiled to it)."
                )
            out_dim = cfg.fused_dim or cfg.out_dim
        else:
            out_dim = cfg.fused_dim or cfg.bottleneck_dim
        ordered = list(self._targets)
        self.config = cfg
        self.adapter = WanderFusion(
            {m: cfg.hidden_dims[m] for m in ordered},
            {m: cfg.seq_lens[m] for m in ordered},
            out_dim,
            cfg,
        )
        self.adapter.to(**_adapter_placement(model))

        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        # adapters already on this model or its submodules (one per layer) keep their saved
        # modules trainable, and their own weights where they were injected into the model
        kept: set[int] = set()
        for other in (a for module in model.modules() for a in adapters_on(module)):
            kept.update(id(p) for p in other.adapter.parameters())
            for path in other.config.modules_to_save or []:
                kept.update(id(p) for p in resolve_module(other.base_model, path).parameters())
        for p in model.parameters():
            if id(p) not in kept:
                p.requires_grad_(False)
        for path in cfg.modules_to_save:
            resolve_module(model, path).requires_grad_(True)

        self._disabled = False
        self._use_originals = True  # disable_adapter(original_modules=...)
        self.adapter_name: str | None = None  # set by inject_wander
        # what each running forward pass has shown the hooks, per thread: concurrent calls
        # (a threaded inference server) each pair their own features and masks
        self._calls: dict[int, _Call] = {}
        self._length_warned: set[str] = set()  # modalities whose encoder changes the length
        self._handles = [
            model.register_forward_pre_hook(self._on_base_call, with_kwargs=True),
            model.register_forward_hook(self._after_base_call, always_call=True),
        ]
        for m, module in self._targets.items():
            # a partial of a bound method, not a closure: a deep copy of the wrapped model binds
            # its hooks to the copy, and torch.save can pickle them
            self._handles.append(
                module.register_forward_hook(functools.partial(self._capture, m), with_kwargs=True)
            )
        if cfg.output == "fused":
            self._handles.append(
                self._consumer.register_forward_hook(self._fuse_output, with_kwargs=True)
            )
        else:
            self._handles.append(
                self._consumer.register_forward_pre_hook(self._add_residuals, with_kwargs=True)
            )
        # a frozen copy of each of the modules_to_save as wrapped (PEFT keeps one too):
        # disable_adapter() runs it in place of the trained module. A plain dict, outside the
        # module tree: not in state_dict() or parameters(), moved where the module is on use
        self._originals = {
            path: _frozen_copy(resolve_module(model, path)) for path in cfg.modules_to_save
        }
        # each part called on its own (a container's, a ModuleDict of encoders, are its
        # members) runs its copy's part while disabled
        for path in cfg.modules_to_save:
            for sub, live in _called_parts(resolve_module(model, path)):
                original = resolve_module(self._originals[path], sub)
                self._handles.append(
                    live.register_forward_hook(
                        functools.partial(self._original_output, original), with_kwargs=True
                    )
                )

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _contract_targets(model: nn.Module) -> dict[str, str]:
        try:
            return contract_encoder_paths(
                model,
                "target_modules={modality: 'dotted.path.of.its.encoder'} (and fusion_module)",
            )
        except ModulePathError as err:
            raise WanderTargetError(str(err)) from None

    @staticmethod
    def _resolve(model: nn.Module, path: str, field: str, cfg: WanderConfig) -> nn.Module:
        try:
            return resolve_module(model, path)
        except ModulePathError as err:
            request = getattr(cfg, field)
            raise WanderTargetError(f"Wander {field}={request!r}: {err}") from None

    @torch.no_grad()
    def _read_sizes(self, cfg: WanderConfig, example_input: Any) -> None:
        seen: dict[str, Tensor] = {}

        def read(name: str, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            try:
                seen[name] = encoder_features(output)
            except TypeError as err:
                raise TypeError(
                    f"Wander: the target module of modality '{name}': {err} Name a module whose "
                    "output is the modality's features (target_modules=)."
                ) from None

        handles = [
            mod.register_forward_hook(functools.partial(read, name))
            for name, mod in self._targets.items()
        ]
        handles.append(
            self._consumer.register_forward_hook(
                lambda _m, _a, out: seen.__setitem__("__consumer__", out)
            )
        )
        try:
            with modes_kept(self.base_model):
                call_model(self.base_model.eval(), example_input)
        finally:
            for h in handles:
                h.remove()
        missing = [m for m in self._targets if m not in seen]
        if missing or "__consumer__" not in seen:
            raise ValueError(
                f"Wander: the example forward pass never called the target modules of {missing} "
                "or the fusion module; check target_modules / fusion_module."
            )
        for m in self._targets:
            x = seen[m]
            if x.ndim not in (2, 3):
                raise ValueError(
                    f"Wander: target module of '{m}' outputs shape {tuple(x.shape)}; expected "
                    "[B, T, D] sequences or [B, D] vectors. For a CNN's feature maps "
                    "[B, C, H, W], target a module that pools them ([B, C]) or flattens them to "
                    "tokens ([B, H·W, C], as a ViT's patch embedding does)."
                )
            cfg.hidden_dims[m] = int(x.shape[-1])
            cfg.seq_lens[m] = int(x.shape[1]) if x.ndim == 3 else 1
        consumer_out = seen["__consumer__"]
        if cfg.output == "fused":
            with contextlib.suppress(TypeError):  # a tuple or a transformers output: its features
                consumer_out = encoder_features(consumer_out)
            if not isinstance(consumer_out, Tensor) or consumer_out.ndim not in (2, 3):
                raise ValueError(
                    "Wander output='fused' adds the fused tokens to the fusion module's output, "
                    "which must be a [B, D] or [B, T, D] tensor (or a tuple whose first item, or "
                    "a transformers output whose last_hidden_state, is one); found "
                    f"{_describe(consumer_out)}."
                )
            cfg.out_dim = int(consumer_out.shape[-1])
            if consumer_out.ndim == 3 and consumer_out.shape[1] < cfg.fused_tokens:
                raise ValueError(
                    f"Wander: the fusion module outputs {consumer_out.shape[1]} tokens, fewer "
                    f"than num_fused_tokens={cfg.fused_tokens}."
                )

    def _check_batch_names(self, example_input: Any) -> None:
        """Warn where the masks of a ``ModalityBatch`` input could never reach the adapter.

        They are read from the batch by modality name, so an adapter modality named other than
        the batch's key (``target_modules={"text": ...}`` on a batch holding ``"txt"``) would
        silently see padded tokens and missing samples as real ones.
        """
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        kwargs = example_input if isinstance(example_input, dict) else {}
        batch = find_modality_batch(args, kwargs)
        if batch is not None:
            self._named.update(m for m in self._targets if m in batch)
        what = "Wander: the adapter's"
        message = None if batch is None else modalities_not_in_batch(self._targets, batch, what)
        if message:
            warnings.warn(message, stacklevel=stacklevel_outside(wander))

    # ------------------------------------------------------------------ hooks
    def _call(self) -> _Call:
        """This thread's running forward pass.

        A new one where the base model's pre-hook did not run in this thread: activation
        checkpointing recomputing target modules in the backward.
        """
        key = _thread_key()
        call = self._calls.get(key)
        if call is None:  # no new _Call on every hook's call: setdefault would build one
            call = self._calls[key] = _Call()
        return call

    def _on_base_call(
        self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        batch = None if self._disabled else find_modality_batch(args, kwargs)
        self._calls[_thread_key()] = _Call(batch)
        if batch is not None and len(self._named) < len(self._targets):
            self._named.update(m for m in self._targets if m in batch)

    def _after_base_call(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        # the fusion hook has used and dropped the call; a forward that raised (or returned
        # before its fusion module ran) leaves it, and its batch must not reach a later call
        # that registers none (a base method called directly)
        self._calls.pop(_thread_key(), None)

    def _capture(
        self,
        modality: str,
        module: nn.Module,
        _args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if self._disabled:
            return
        call = self._call()
        x = call.features[modality] = encoder_features(output)
        # model(input_ids, attention_mask=...): no batch to read the mask from
        call.masks[modality] = call_padding_mask(module, kwargs, x.shape[0])

    def _padding_masks(self, call: _Call) -> dict[str, Tensor | None]:
        """Each modality's padding mask (``None`` for vectors or where none is known).

        The batch's, else the one its target module was called with (a ``transformers``
        encoder's ``attention_mask``: a model called as ``model(input_ids, attention_mask)``).
        """
        masks: dict[str, Tensor | None] = {}
        for m, x in call.features.items():
            mask, source = None, "the batch's padding mask"
            if call.batch is not None and m in call.batch:
                mask = call.batch.padding_mask(m)
            if mask is None and call.masks.get(m) is not None:
                mask, source = call.masks[m], "the padding mask it was called with"
            if mask is not None and x.ndim == 3 and tuple(mask.shape) != tuple(x.shape[:2]):
                self._warn_length_changed(m, tuple(mask.shape), x.shape[1], source)
                mask = None  # the encoder changed the length: the mask no longer fits
            masks[m] = mask if x.ndim == 3 else None
        return masks

    def _warn_length_changed(
        self, modality: str, mask_shape: tuple[int, ...], t: int, source: str
    ) -> None:
        if modality in self._length_warned:
            return
        self._length_warned.add(modality)
        warnings.warn(
            f"Wander: the target module of '{modality}' outputs {t} tokens but {source} "
            f"is {list(mask_shape)}, so the adapter cannot apply it: padded "
            "positions take part in the fusion. Target a module whose output keeps the input's "
            "length, or give the batch a padding mask of the output's length.",
            stacklevel=stacklevel_outside(wander),
        )

    def _presence(self, call: _Call) -> dict[str, Tensor | None]:
        """The batch's presence masks (``None``: present in every sample, or no batch seen).

        A modality the batch does not name, though an earlier batch did (a model that encodes
        zeros for it), is absent from every sample.
        """
        batch = call.batch
        if batch is None:
            return {}
        presence: dict[str, Tensor | None] = {}
        for m, x in call.features.items():
            if x.shape[0] != batch.batch_size:
                continue
            if m in batch:
                presence[m] = batch.presence.get(m)
            elif m in self._named:
                presence[m] = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return presence

    def _adapter_output(self, call: _Call) -> Tensor | dict[str, Tensor]:
        features, masks, presence = (
            dict(call.features),
            self._padding_masks(call),
            self._presence(call),
        )
        skipped = [m for m in self._targets if m not in features]
        if len(skipped) == len(self._targets):
            raise RuntimeError(
                f"Wander: the fusion module ran before the target modules of {skipped} produced "
                "their outputs in this forward pass; check target_modules / fusion_module (or "
                "activation checkpointing recomputes the fusion module in the backward: "
                "checkpoint the target modules, not the module that consumes them)."
            )
        if skipped:  # a model that does not encode a modality its batch lacks: absent
            some = next(iter(features.values()))
            b = some.shape[0]
            for m in skipped:
                features[m] = some.new_zeros(b, 1, self.adapter.hidden_dims[m])
                presence[m] = torch.zeros(b, dtype=torch.bool, device=some.device)
        out = self.adapter(features, masks, presence)
        self._calls.pop(_thread_key(), None)  # hold no tensors between calls
        return out

    def _consumer_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        """This thread's call, with the batch the fusion module was given where none was seen.

        A call that bypassed the base model's forward (a method of the base called directly,
        or of a model with an injected adapter) registered no batch; a fusion module that
        takes the batch (``fusion(features, batch)``) still gives its masks.
        """
        call = self._call()
        if call.batch is None:
            call.batch = find_modality_batch(args, kwargs)
        return call

    def _fuse_output(
        self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if self._disabled:
            return output
        try:
            features = encoder_features(output)
        except TypeError:
            raise TypeError(
                f"Wander: fusion module output {_describe(output)} is not a tensor, nor a tuple "
                "or a transformers output holding one."
            ) from None
        fused = cast(Tensor, self._adapter_output(self._consumer_call(args, kwargs)))  # [B, T', D]
        if features is not output:  # the same kind of output, with the fused features
            return _with_features(output, self._fused_into(features, fused))
        return self._fused_into(output, fused)

    @staticmethod
    def _fused_into(output: Tensor, fused: Tensor) -> Tensor:
        """The fusion module's features ``output`` with the fused tokens ``[B, T', D]`` added."""
        fused = fused.to(output.dtype)  # the base model's output type, whatever the adapter's
        if output.ndim == 2:  # one vector: the fused tokens' mean (a free view for one token)
            return _add_tiled(output, fused[:, 0] if fused.shape[1] == 1 else fused.mean(dim=1))
        t_out = fused.shape[1]
        if output.shape[1] < t_out:
            raise ValueError(
                f"Wander: the fusion module output {output.shape[1]} tokens in this call, fewer "
                f"than the {t_out} fused tokens (num_fused_tokens) added to its first positions. "
                f"Pad the inputs so that it outputs at least {t_out}, or build the adapter with "
                "num_fused_tokens no larger than the shortest output."
            )
        return torch.cat([_add_tiled(output[:, :t_out], fused), output[:, t_out:]], dim=1)

    def _original_output(
        self,
        original: nn.Module,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        _output: Any,
    ) -> Any:
        """Under :meth:`disable_adapter`, the output of ``module`` as it was wrapped."""
        if not (self._disabled and self._use_originals):
            return None
        placement = _placement(module)
        if _placement(original) != placement:  # the model was moved or cast since
            original.to(**placement)
        original.train(module.training)
        return original(*args, **kwargs)

    def _add_residuals(
        self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        if self._disabled:
            return None
        call = self._consumer_call(args, kwargs)
        originals = dict(call.features)
        deltas = cast(dict[str, Tensor], self._adapter_output(call))
        unused = [deltas[m] for m in deltas if m not in originals]  # encoders the model skipped
        if unused:  # in the graph at weight 0: zero gradients, not none (DDP needs every one)
            m = next(iter(originals))
            deltas[m] = deltas[m] + 0.0 * sum(d.sum() for d in unused)
        replaced: set[str] = set()

        def swap(obj: Any) -> Any:
            if isinstance(obj, Tensor):
                for m, x in originals.items():
                    if obj is x:
                        replaced.add(m)
                        return x + deltas[m].to(x.dtype)
                return obj
            if isinstance(obj, dict):
                return {k: swap(v) for k, v in obj.items()}
            if isinstance(obj, list | tuple) and not isinstance(obj, ModalityBatch):
                return type(obj)(swap(v) for v in obj)
            return obj

        new_args, new_kwargs = swap(args), swap(kwargs)
        if replaced != set(originals):
            raise RuntimeError(
                "Wander output='residual': the inputs of the fusion module do not contain the "
                f"outputs of the target modules of {sorted(set(originals) - replaced)} as they "
                "were produced (the model transforms them in between); name the module that "
                "receives the encoder outputs directly as fusion_module."
            )
        return new_args, new_kwargs

    # ------------------------------------------------------------------ public API
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the base model (same signature, same output type) with the adapter active."""
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """An attribute the wrapper lacks is the base model's (as on PEFT's models).

        Code that reads ``model.head`` or ``model.fusion`` keeps working after wrapping, and so
        do tools that find a model's parts by those names (CASP, CGGM).
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet (a copy being built): no base to ask
                raise
        base = self.base_model
        try:
            value = getattr(base, name)
        except AttributeError:
            raise AttributeError(
                f"'Wander' object has no attribute '{name}', nor has its base model "
                f"({type(base).__name__})."
            ) from None
        if inspect.ismethod(value) and value.__self__ is base:
            return self._with_batch_masks(value)
        return value

    def _with_batch_masks(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` of the base model, reading the masks of the batch it is given.

        The masks reach the adapter through the base model's forward pre-hook; a method other
        than ``forward`` (``wander.fused(batch)``, ``wander.predict(batch)``) does not fire it,
        so the call's batch is registered here for the hooks its target modules fire.
        """

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            self._on_base_call(self.base_model, args, kwargs)
            try:
                return method(*args, **kwargs)
            finally:
                self._calls.pop(_thread_key(), None)  # hold no tensors between calls

        return call

    @contextlib.contextmanager
    def disable_adapter(self, original_modules: bool = True) -> Iterator[None]:
        """Context manager: inside it the model behaves exactly as the base model did when wrapped.

        The adapter is off, and the ``modules_to_save`` run with the weights they had when the
        adapter was added (a copy kept for this, as PEFT does; no gradient reaches them), so a
        trained head is not the one used. With ``original_modules=False`` only the adapter is
        off and the ``modules_to_save`` keep their current weights: the difference of the
        outputs is then the adapter's own contribution. The base's BatchNorm running statistics
        are as they now are (train mode updates them; see :meth:`adapter_state_dict`).
        """
        previous = self._disabled, self._use_originals
        self._disabled, self._use_originals = True, original_modules
        try:
            yield
        finally:
            self._disabled, self._use_originals = previous

    @property
    def original_modules(self) -> Mapping[str, nn.Module]:
        """The frozen copies of the ``modules_to_save`` that :meth:`disable_adapter` runs."""
        return MappingProxyType(self._originals)

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts of the base model plus the adapter."""
        # by identity: an injected adapter is also among the base model's parameters
        both = [*self.base_model.parameters(), *self.adapter.parameters()]
        params = list({id(p): p for p in both}.values())
        total = sum(p.numel() for p in params)
        return sum(p.numel() for p in params if p.requires_grad), total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: … || all params: … || trainable%: …`` (PEFT's format)."""
        trainable, total = self.trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def inject(self, adapter_name: str = "wander") -> nn.Module:
        """Register the adapter as ``base_model.<adapter_name>``; returns the base model.

        See :func:`wander.inject_wander`, the usual way to call it.
        """
        if self.adapter_name is not None:
            raise RuntimeError(
                f"Wander.inject: this adapter is already injected as '{self.adapter_name}'."
            )
        if not adapter_name.isidentifier():
            raise ValueError(
                f"Wander.inject: adapter_name={adapter_name!r} must be a Python identifier "
                "(it becomes an attribute of the model)."
            )
        if hasattr(self.base_model, adapter_name):
            raise ValueError(
                f"Wander.inject: the model already has an attribute '{adapter_name}'; choose "
                "another adapter_name (one per adapter, e.g. 'wander_layer0')."
            )
        self.base_model.add_module(adapter_name, self.adapter)
        self.adapter_name = adapter_name
        return self.base_model

    def unwrap(self) -> nn.Module:
        """Remove the adapter: hooks gone, ``requires_grad`` flags restored; returns the base.

        An injected adapter is also removed from the model's submodules. With several adapters
        on one model, unwrap the last one added first: each restores the flags it found when it
        was added.
        """
        on_model = adapters_on(self.base_model)
        later = on_model[on_model.index(self) + 1 :] if self in on_model else []
        if later:
            raise RuntimeError(
                f"Wander.unwrap: {len(later)} adapter(s) were added to this model after this "
                "one; unwrap them first (the last added first), since each restores the "
                "requires_grad flags it found."
            )
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.adapter_name is not None:
            delattr(self.base_model, self.adapter_name)
            self.adapter_name = None
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))
        return self.base_model

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The weights :meth:`save_pretrained` writes.

        The adapter's, the ``modules_to_save``'s, and the running statistics of the frozen
        base's BatchNorm-style layers (any module with ``track_running_stats``): train mode
        updates those even in a frozen layer, so the trained model depends on them (PEFT saves
        them too).
        """
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        state.update(
            {f"base_model.{k}": v for k, v in _running_statistics(self.base_model).items()}
        )
        for path in self.config.modules_to_save or []:
            module = resolve_module(self.base_model, path)
            prefix = f"base_model.{path}." if path else "base_model."
            state.update({prefix + k: v for k, v in module.state_dict().items()})
        return state

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically).

        Only the adapter and the ``modules_to_save`` weights are written, never the frozen
        base's weights; its norm layers' running statistics are (see :meth:`adapter_state_dict`).
        Weights tied to one another are written once, the other names kept as aliases.
        """
        directory = save_directory(directory, "Wander.save_pretrained")
        tensors, aliases = _unshared(self.adapter_state_dict())
        metadata = {"format": "pt", "library": "wander"}
        if aliases:  # tied weights (a head tied to an embedding) are written once
            metadata["aliases"] = json.dumps(aliases)
        with atomic_write(directory / WEIGHTS_NAME, "wb") as f:
            f.write(safetensors_bytes(tensors, metadata=metadata))
        payload = {"wander_version": __version__, **self.config.to_dict()}
        with atomic_write(directory / CONFIG_NAME) as f:
            json.dump(payload, f, indent=2)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path) -> Wander:
        """Attach a saved adapter (and saved head weights) to ``base_model``.

        Missing or unexpected keys are reported with a warning and kept in
        ``wander.load_report``.
        """
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        data = read_json(config_path, "Wander.from_pretrained")
        if not weights_path.is_file():
            raise FileNotFoundError(f"Wander.from_pretrained: {weights_path} not found.")
        data.pop("wander_version", None)
        wander = cls(base_model, WanderConfig.from_dict(data))
        try:
            missing, unexpected = wander._load_weights(weights_path)
        except BaseException:
            wander.unwrap()  # leave the model as it was: no hooks, its requires_grad flags
            raise
        wander.load_report = {"missing_keys": missing, "unexpected_keys": unexpected}
        if missing or unexpected:
            warnings.warn(
                f"Wander.from_pretrained({directory}): missing keys {missing}, unexpected keys "
                f"{unexpected}.",
                stacklevel=2,
            )
        return wander

    def _load_weights(self, weights_path: Path) -> tuple[list[str], list[str]]:
        """Copy the saved weights in; returns the missing and the unexpected keys."""
        # where the adapter was placed (the base model's device)
        device = str(next(self.adapter.parameters()).device)
        try:
            with safe_open(str(weights_path), framework="pt", device=device) as f:
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
                aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        except (SafetensorError, json.JSONDecodeError) as err:
            raise ValueError(f"Wander.from_pretrained: cannot read {weights_path}: {err}") from None
        state.update({alias: state[key] for alias, key in aliases.items() if key in state})
        expected = self.adapter_state_dict()
        shared = sorted(set(expected) & set(state))
        for key in shared:
            if expected[key].shape != state[key].shape:
                raise ValueError(
                    f"Wander.from_pretrained: '{key}' has shape {tuple(state[key].shape)} in "
                    f"{weights_path} but {tuple(expected[key].shape)} in the model."
                )
        with torch.no_grad():
            for key in shared:
                expected[key].copy_(state[key])
        return sorted(set(expected) - set(state)), sorted(set(state) - set(expected))


def _unshared(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``state`` on the CPU as safetensors can write it, and ``{alias: key}`` for tied weights.

    safetensors refuses tensors that share memory. A name for exactly the tensor of an earlier
    name becomes an alias of it; another view of memory already written is copied.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple[Any, ...], str] = {}
    seen_storages: set[int] = set()
    for key, value in state.items():
        value = value.detach()
        storage = value.untyped_storage().data_ptr()
        view = (storage, value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if view in seen_views:
            aliases[key] = seen_views[view]
            continue
        seen_views[view] = key
        shared = storage in seen_storages
        seen_storages.add(storage)
        value = value.contiguous().cpu()
        tensors[key] = value.clone() if shared else value
    return tensors, aliases


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without gradients and without the hooks on it or its submodules."""
    # the hooks are not copied (one bound to a wrapper would copy the wrapper and its whole
    # model with it), and the copy is left without any
    memo = {id(hook): hook for table in _hook_tables(module) for hook in table.values()}
    copied = copy.deepcopy(module, memo)
    for table in _hook_tables(copied):
        table.clear()
    return copied.requires_grad_(False)


def _hook_tables(module: nn.Module) -> list[dict[Any, Any]]:
    """Every hook dict (forward, backward, state dict) of ``module`` and its submodules."""
    return [
        value
        for sub in module.modules()
        for name, value in vars(sub).items()
        if name.endswith("_hooks") and isinstance(value, dict)
    ]


def _called_parts(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The parts of ``module`` that are called, by path within it: ``module`` itself.

    Or, where it has no ``forward`` of its own (a ``ModuleDict``, a ``ModuleList``, a plain
    container), those of its children.
    """
    if type(module).forward is not nn.Module.forward:
        return [(prefix, module)]
    return [
        part
        for name, child in module.named_children()
        for part in _called_parts(child, f"{prefix}.{name}" if prefix else name)
    ]


def _placement(module: nn.Module) -> dict[str, Any]:
    """The device and dtype of ``module``'s first floating-point tensor (none: ``{}``)."""
    tensors = (*module.parameters(), *module.buffers())
    first = next((t for t in tensors if t.is_floating_point()), None)
    return {} if first is None else {"device": first.device, "dtype": first.dtype}


def _running_statistics(model: nn.Module) -> dict[str, Tensor]:
    """The persistent buffers of ``model``'s layers that track running statistics, by state key.

    BatchNorm (any dimension, ``SyncBatchNorm``) and InstanceNorm with
    ``track_running_stats=True``: ``running_mean``, ``running_var``, ``num_batches_tracked``.
    """
    state: dict[str, Tensor] = {}
    for path, module in model.named_modules():
        if getattr(module, "track_running_stats", False) is not True:
            continue
        prefix = f"{path}." if path else ""
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = buffer
    return state


def adapters_on(model: nn.Module) -> list[Wander]:
    """The :class:`Wander` adapters whose hooks are on ``model`` (in the order they were added)."""
    adapters = []
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, Wander) and owner.base_model is model:
            adapters.append(owner)
    return adapters


def _check_fusion_point_free(consumer: nn.Module, path: str) -> None:
    """Refuse a second wrapper at a fusion module that already carries one.

    Each adapter acts through hooks on the module itself (it adds to the module's output, or to
    its inputs), so calling either wrapper would run both adapters. An injected adapter is part
    of the model, meant to run on every call: another adapter may stack on it.
    """
    hooks = [*consumer._forward_hooks.values(), *consumer._forward_pre_hooks.values()]
    # the hooks by which a wrapper acts there (not the pre-hook it puts on its base model)
    acting = (Wander._fuse_output, Wander._add_residuals)
    fusing = [
        owner
        for h in hooks
        if isinstance(owner := getattr(h, "__self__", None), Wander)
        and getattr(h, "__func__", None) in acting
    ]
    if any(w.adapter_name is None for w in fusing):
        raise ValueError(
            f"Wander: fusion_module '{path}' already carries the hooks of another Wander "
            "wrapper, so calling either wrapper would run both adapters. To switch adapters, "
            "`unwrap()` the first (save it with `save_pretrained`, load it back with "
            "`Wander.from_pretrained`); to stack adapters that always run together, inject the "
            "first (`inject_wander`); for one adapter per layer, give each its own "
            "fusion_module."
        )


def call_model(model: nn.Module, example: Any) -> Any:
    """``model`` on one example input: a tuple of arguments, a dict of keywords, or one value."""
    if isinstance(example, tuple):
        return model(*example)
    if isinstance(example, dict):
        return model(**example)
    return model(example)


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def _adapter_placement(model: nn.Module) -> dict[str, Any]:
    """Device and dtype for the adapter: those of the base model's floating-point weights.

    A base in half precision (float16, bfloat16) gets a float32 adapter
    (:func:`mmcore.trainable_dtype`; the product over modalities is safer in float32 too). The
    adapter casts its inputs to its own dtype and its output back to the base model's.
    """
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return {}
    return {"device": weight.device, "dtype": trainable_dtype(weight.dtype)}


def _with_features(output: Any, features: Tensor) -> Any:
    """``output`` with ``features`` where :func:`mmcore.encoder_features` finds its tensor.

    A transformers output (or mapping) gets a new ``last_hidden_state``, a tuple or list a new
    first item; the rest is passed on as it was.
    """
    if isinstance(output, Mapping) and "last_hidden_state" in output:
        updated = {**output, "last_hidden_state": features}
        return updated if type(output) is dict else type(output)(**updated)
    if hasattr(output, "last_hidden_state"):
        output = copy.copy(output)
        output.last_hidden_state = features
        return output
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return type(output)(features, *output[1:])
    return type(output)([features, *output[1:]])


def _add_tiled(output: Tensor, fused: Tensor) -> Tensor:
    """``output + fused``, ``fused`` tiled along the feature axis to ``output``'s size.

    A broadcast add over a view (``fused_dim`` divides the output size, checked at build):
    ``repeat`` would copy the fused tokens first, and its backward costs as much again.
    """
    d, d_fused = output.shape[-1], fused.shape[-1]
    if d == d_fused:
        return output + fused
    tiled = output.unflatten(-1, (d // d_fused, d_fused)) + fused.unsqueeze(-2)
    return tiled.flatten(-2)


def _thread_key() -> int:
    """The running thread's key into ``Wander._calls``.

    ``torch.compile`` cannot trace ``threading.get_ident``; a compiled graph carries the
    features from the hooks to the fusion inside itself, so it takes one fixed key.
    """
    return 0 if is_compiling() else threading.get_ident()


@dataclass
class _Call:
    """What one forward pass of the base model has shown a ``Wander``'s hooks so far."""

    batch: ModalityBatch | None = None
    features: dict[str, Tensor] = field(default_factory=dict)  # the target modules' outputs
    masks: dict[str, Tensor | None] = field(default_factory=dict)  # the masks they were given
