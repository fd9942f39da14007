"""The normalisation layers CASP adapts, and their affine parameters."""

from __future__ import annotations

from torch import nn

__all__ = ["is_norm_layer", "norm_parameters"]


_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),  # torch >= 2.4
)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer whose affine parameters CASP adapts.

    torch's LayerNorm, RMSNorm, BatchNorm, GroupNorm and InstanceNorm are, and so is a module
    without submodules whose class name ends in ``Norm``. The name rule catches the
    normalisation layers that libraries write as plain modules, such as ``transformers``'
    ``LlamaRMSNorm``, ``Qwen2RMSNorm`` or ``T5LayerNorm``, which subclass none of torch's; a
    module with submodules (a whole model named ``...BatchNorm``) is not one.
    """
    if isinstance(module, _NORMS):
        return True
    return type(module).__name__.endswith("Norm") and next(module.children(), None) is None


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every normalisation layer of ``model`` (:func:`is_norm_layer`).

    A layer's own ``weight`` and ``bias`` count, not those of modules inside it; a parameter
    that two layers share is listed once.
    """
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if is_norm_layer(module):
            own = dict(module.named_parameters(recurse=False))
            for name in ("weight", "bias"):
                if name in own:
                    params.setdefault(id(own[name]), own[name])
    return list(params.values())
