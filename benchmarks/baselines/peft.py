"""Parameter-efficient fine-tuning baselines.

Head-only, full fine-tuning, LoRA (the real ``peft`` library) and a Houlsby bottleneck adapter
after every encoder.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from mmcore import run_encoder

__all__ = ["HoulsbyAdapter", "add_houlsby_adapters", "apply_lora", "freeze_all_but"]


def freeze_all_but(model: nn.Module, trainable: list[str]) -> nn.Module:
    """Freeze ``model`` except the submodules named in ``trainable`` (dotted paths)."""
    model.requires_grad_(False)
    for path in trainable:
        model.get_submodule(path).requires_grad_(True)
    return model


class HoulsbyAdapter(nn.Module):
    """``x + up(gelu(down(x)))`` with ``up`` zero-initialised (Houlsby et al., ICML 2019)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Residual bottleneck over the last axis."""
        return x + self.up(torch.nn.functional.gelu(self.down(x)))


class _EncoderWithAdapter(nn.Module):
    def __init__(self, encoder: nn.Module, adapter: HoulsbyAdapter) -> None:
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.adapter(run_encoder(self.encoder, x, padding_mask))


def add_houlsby_adapters(model: nn.Module, dims: dict[str, int], bottleneck: int) -> nn.Module:
    """Put a :class:`HoulsbyAdapter` after each encoder of a contract model.

    Everything but the adapters and the head is frozen; ``dims[m]`` is encoder ``m``'s output size.
    """
    model.requires_grad_(False)
    encoders = cast(nn.ModuleDict, model.encoders)
    for m, encoder in list(encoders.items()):
        encoders[m] = _EncoderWithAdapter(encoder, HoulsbyAdapter(dims[m], bottleneck))
    cast(nn.Module, model.head).requires_grad_(True)
    return model


def apply_lora(model: nn.Module, rank: int, target_prefix: str = "encoders") -> nn.Module:
    """LoRA (``peft.get_peft_model``) on every ``nn.Linear`` under ``target_prefix``.

    The head stays trainable (``modules_to_save``).
    """
    from peft import LoraConfig, get_peft_model

    targets = [
        name
        for name, module in model.named_modules()
        if name.startswith(target_prefix) and isinstance(module, nn.Linear)
    ]
    if not targets:
        raise ValueError(f"no nn.Linear under '{target_prefix}' to put LoRA on.")
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        modules_to_save=["head"],
        lora_dropout=0.0,
    )
    return get_peft_model(model, config)
