"""``inspect_targets``: what Wander would hook in a model, before wrapping it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mmcore import (
    ModulePathError,
    closest_module_names,
    contract_encoder_paths,
    encoder_features,
    modes_kept,
)
from wander.model import call_model

__all__ = ["TargetReport", "TargetRow", "inspect_targets"]


@dataclass
class TargetRow:
    """One module Wander would hook: a modality's target, or the fusion module.

    ``calls`` and ``output_shape`` come from the example forward pass (``None`` without one).
    """

    role: str  # "target" or "fusion"
    modality: str | None
    path: str
    module: str | None = None  # class name; None when the path names no submodule
    suggestions: list[str] = field(default_factory=list)
    calls: int | None = None
    output_shape: tuple[int, ...] | None = None
    error: str | None = None  # a problem found before any module was looked up

    @property
    def problem(self) -> str | None:
        """What would stop Wander from using this module, or ``None``."""
        if self.error is not None:
            return self.error
        if self.module is None:
            hint = f" (closest: {', '.join(self.suggestions)})" if self.suggestions else ""
            return f"no submodule '{self.path}'{hint}"
        if self.calls == 0:
            return "not called by the example forward pass"
        if self.role == "target" and self.calls is not None and self.calls > 1:
            return f"called {self.calls} times per forward pass (Wander keeps the last output)"
        return None


@dataclass
class TargetReport:
    """The rows of :func:`inspect_targets`; ``str(report)`` is a table."""

    rows: list[TargetRow]

    @property
    def ok(self) -> bool:
        """Every module exists and, where an example ran, targets ran once and fusion ran."""
        return all(row.problem is None for row in self.rows)

    def __str__(self) -> str:
        header = ("role", "modality", "path", "module", "calls", "output", "problem")
        lines = [header]
        for r in self.rows:
            lines.append(
                (
                    r.role,
                    r.modality or "",
                    r.path,
                    r.module or "—",
                    "" if r.calls is None else str(r.calls),
                    "" if r.output_shape is None else str(list(r.output_shape)),
                    r.problem or "",
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )


def inspect_targets(
    model: nn.Module,
    example_input: Any = None,
    *,
    target_modules: Mapping[str, str] | None = None,
    fusion_module: str | None = None,
) -> TargetReport:
    """The modules :class:`~wander.Wander` would hook in ``model``, checked before wrapping.

    For each modality's target module and for the fusion module: whether the path exists (and
    the closest real names when it does not), its class, and, given ``example_input`` (one
    input for the model, as ``Wander`` takes it), how often the example forward pass called it
    and the shape of its features. Nothing is changed: the model runs in eval mode without
    gradients, and its mode is restored.

    Args:
        model: the base model.
        example_input: one input for it (``ModalityBatch``, tuple of arguments or dict of
            keyword arguments); optional.
        target_modules: modality → dotted path (default: the mmcore contract's encoders).
        fusion_module: dotted path of the module consuming the encoders (default ``"fusion"``).
    """
    rows: list[TargetRow] = []
    if target_modules is None:
        try:
            target_modules = contract_encoder_paths(model, "target_modules={modality: path}")
        except ModulePathError as exc:  # the row says what Wander(model) would raise
            rows.append(TargetRow("target", None, "encoders", error=str(exc)))
            target_modules = {}
    rows += [TargetRow("target", m, path) for m, path in target_modules.items()]
    rows.append(TargetRow("fusion", None, fusion_module or "fusion"))
    modules: dict[int, nn.Module] = {}
    for i, row in enumerate(rows):
        if row.error is not None:
            continue
        try:
            module = model.get_submodule(row.path)
        except AttributeError:
            row.suggestions = closest_module_names(model, row.path)
            continue
        row.module = type(module).__name__
        modules[i] = module
    if example_input is not None:
        _run_example(model, example_input, rows, modules)
    return TargetReport(rows)


@torch.no_grad()
def _run_example(
    model: nn.Module, example_input: Any, rows: list[TargetRow], modules: dict[int, nn.Module]
) -> None:
    def record(i: int, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        rows[i].calls = (rows[i].calls or 0) + 1
        try:
            features: Tensor = encoder_features(output)
            rows[i].output_shape = tuple(features.shape)
        except TypeError:
            rows[i].output_shape = None

    for i in modules:
        rows[i].calls = 0
    handles = [
        module.register_forward_hook(lambda mod, args, out, i=i: record(i, mod, args, out))
        for i, module in modules.items()
    ]
    try:
        with modes_kept(model):
            call_model(model.eval(), example_input)
    finally:
        for handle in handles:
            handle.remove()
