"""The low-level path: add a Wander adapter to a model in place.

PEFT's ``inject_adapter_in_model`` for Wander. ``Wander(model)`` returns a wrapper;
:func:`inject_wander` returns the model itself, of the same class, with the adapter registered
as one of its submodules. Code written for the bare model (an optimiser over
``model.parameters()``, ``model.to(device)``, ``model.state_dict()``, DDP, a trainer that
expects the user's class, attributes such as a ``transformers`` model's ``config``) then sees
the adapter with no further change. :func:`get_wander` returns the :class:`~wander.Wander`
behind an injected adapter, for ``save_pretrained``, ``disable_adapter`` and ``unwrap``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mmcore import compiled_inner
from wander.config import WanderConfig
from wander.model import Wander, adapters_on

__all__ = ["get_wander", "inject_wander"]


def inject_wander(
    model: nn.Module,
    ranks: WanderConfig | Mapping[str, int] | Sequence[int] | None = None,
    *,
    adapter_name: str = "wander",
    pretrained: str | Path | None = None,
    **options: Any,
) -> nn.Module:
    """Add a Wander adapter to ``model`` in place and return ``model`` itself.

    The base is frozen exactly as by :class:`~wander.Wander` (except ``modules_to_save``), and
    the adapter becomes ``getattr(model, adapter_name)``: a :class:`~wander.WanderFusion` whose
    parameters are among ``model.parameters()`` and whose weights are in ``model.state_dict()``
    under ``f"{adapter_name}."``. Calling ``model(...)`` runs the adapter.

    Args:
        model: the base model, as for :class:`~wander.Wander`.
        ranks: the three ranks (a :class:`~wander.WanderConfig`, a mapping or a tuple).
        adapter_name: the attribute the adapter is registered under; one per adapter when a
            model holds several (one per layer, e.g. ``"wander_layer0"``).
        pretrained: a directory written by ``save_pretrained``: the adapter is built from its
            config and loaded with its weights (then ``ranks`` and ``options`` must be empty).
        **options: every other argument of :class:`~wander.Wander` (``example_input``,
            ``target_modules``, ``fusion_module``, ``modules_to_save``, config fields).

    Returns:
        ``model``, mutated.

    Example:
        >>> model = inject_wander(model, (8, 2, 2), example_input=batch)  # doctest: +SKIP
        >>> trainable = [p for p in model.parameters() if p.requires_grad]  # doctest: +SKIP
        >>> opt = torch.optim.AdamW(trainable)  # doctest: +SKIP
        >>> get_wander(model).save_pretrained("adapter/")  # doctest: +SKIP
    """
    if isinstance(model, Wander):
        raise ValueError(
            "inject_wander: this model is a Wander wrapper; inject into its base model "
            "(`wander.base_model`) instead."
        )
    if compiled_inner(model) is not None:
        raise TypeError(
            "inject_wander: this model is torch.compile'd, and graphs it traced before the "
            "adapter existed would not run it (dynamo does not re-trace for hooks added later). "
            "Inject into the module it wraps (`model._orig_mod`, or the model before "
            "torch.compile), then compile that."
        )
    if pretrained is not None:
        if ranks is not None or options:
            raise ValueError(
                "inject_wander(pretrained=...): the configuration comes from the saved "
                f"adapter; do not pass ranks or options (got ranks={ranks!r}, "
                f"options={sorted(options)})."
            )
        wander = Wander.from_pretrained(model, pretrained)
    else:
        wander = Wander(model, ranks, **options)
    try:
        return wander.inject(adapter_name)
    except (ValueError, RuntimeError):
        wander.unwrap()  # leave the model as it was
        raise


def get_wander(model: nn.Module, adapter_name: str = "wander") -> Wander:
    """The :class:`~wander.Wander` behind the adapter injected into ``model`` as ``adapter_name``.

    Raises:
        LookupError: no adapter of that name was injected into ``model``; the message lists the
            injected names.
    """
    injected = [w for w in adapters_on(model) if w.adapter_name is not None]
    for wander in injected:
        if wander.adapter_name == adapter_name:
            return wander
    raise LookupError(
        f"get_wander: no Wander adapter injected as '{adapter_name}' in this "
        f"{type(model).__name__}; injected: {[w.adapter_name for w in injected]}."
    )
