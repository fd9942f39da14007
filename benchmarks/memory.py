"""What one training step holds in memory, counted tensor by tensor.

A CPU has no allocator statistics to read (``torch.cuda.max_memory_allocated`` has no CPU
twin), and the process's resident size moves with the allocator's caching, so the figure here
is counted from the tensors themselves, the same way on every device and bit for bit the same
on every run:

* **parameters**: every parameter and buffer of the model (frozen ones included), once per
  storage;
* **gradients**: the ``.grad`` of every parameter after the backward;
* **optimiser state**: every tensor in the optimiser's state after its step (Adam's two
  moments);
* **activations**: the tensors autograd saved for the backward during the forward pass, once
  per storage, leaving out those that are parameters or buffers (a frozen layer's weight saved
  for its input's gradient is counted once, as a parameter).

Their sum is the memory a step needs at least, the quantity that parameter-efficient methods
cut (gradients and optimiser state for the frozen part; activations where the backward stops
early). It leaves out the temporaries that live inside one operation and the allocator's
overhead, so it sits below a GPU's peak allocation; methods are compared by their ratios.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.training import LossFn, add_ratio_column
from mmcore import ModalityBatch

MIB = 2**20


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step holds, by kind (see the module docstring)."""

    parameters: int
    gradients: int
    optimiser_state: int
    activations: int

    @property
    def total(self) -> int:
        """Bytes in all."""
        return self.parameters + self.gradients + self.optimiser_state + self.activations

    def metrics(self) -> dict[str, float]:
        """MiB per kind and in all, for a benchmark record."""
        return {
            "activation_mib": self.activations / MIB,
            "grad_and_optimiser_mib": (self.gradients + self.optimiser_state) / MIB,
            "total_mib": self.total / MIB,
        }


def _storage_key(t: Tensor) -> tuple[Any, int, int]:
    """``(device, data pointer, bytes)`` of ``t``'s storage (views of one storage share it)."""
    try:
        storage = t.untyped_storage()
        return t.device, storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, a tensor subclass)
        return t.device, id(t), t.numel() * t.element_size()


def unique_bytes(tensors: Iterable[Tensor], exclude: Iterable[tuple[Any, int, int]] = ()) -> int:
    """Bytes of the distinct storages behind ``tensors``, leaving out the keys in ``exclude``."""
    seen = {_storage_key(t) for t in tensors} - set(exclude)
    return sum(key[2] for key in seen)


def _optimiser_state(optimiser: torch.optim.Optimizer) -> list[Tensor]:
    return [v for state in optimiser.state.values() for v in state.values() if torch.is_tensor(v)]


def step_memory(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    batch: ModalityBatch,
    loss_fn: LossFn,
    extra_loss: Callable[[Tensor], Tensor] | None = None,
    after_backward: Callable[[ModalityBatch], Any] | None = None,
    held_beside: Callable[[], Sequence[tuple[nn.Module, torch.optim.Optimizer | None]]]
    | None = None,
) -> StepMemory:
    """Run one training step of ``model`` on ``batch`` and count what it held.

    The step is :func:`benchmarks.training.train_step`'s: forward, ``loss_fn`` (+
    ``extra_loss(loss)``), backward, ``after_backward(batch)`` (a modulator's step, say),
    ``optimiser.step()``. ``held_beside()``, called after the step, names what a method keeps
    outside the model (a modulator's classifiers and their optimiser): their parameters,
    gradients and optimiser state are counted too. The parameters move, so measure a copy
    when the model is needed afterwards.
    """

    def loss() -> Tensor:
        value = loss_fn(model(batch), batch.require_target())
        return value if extra_loss is None else value + extra_loss(value)

    return loss_step_memory(
        model,
        optimiser,
        loss,
        after_backward=None if after_backward is None else lambda: after_backward(batch),
        held_beside=held_beside,
    )


def loss_step_memory(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    compute_loss: Callable[[], Tensor],
    *,
    after_backward: Callable[[], Any] | None = None,
    held_beside: Callable[[], Sequence[tuple[nn.Module, torch.optim.Optimizer | None]]]
    | None = None,
) -> StepMemory:
    """:func:`step_memory` for a step whose loss is not ``loss_fn(model(batch), target)``.

    ``compute_loss()`` runs the forward passes and returns the loss (a test-time objective:
    an entropy, a contrastive loss between two views); then backward, ``after_backward()``,
    ``optimiser.step()``, and the same count.
    """
    held = [*model.parameters(), *model.buffers()]
    own = {_storage_key(t) for t in held}
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    optimiser.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compute_loss()
    activations = unique_bytes(saved, exclude=own)
    saved.clear()
    loss.backward()
    if after_backward is not None:
        after_backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    optimiser.step()
    state = _optimiser_state(optimiser)
    for module, its_optimiser in held_beside() if held_beside is not None else ():
        held += [*module.parameters(), *module.buffers()]
        grads += [p.grad for p in module.parameters() if p.grad is not None]
        state += [] if its_optimiser is None else _optimiser_state(its_optimiser)
    return StepMemory(
        parameters=unique_bytes(held),
        gradients=unique_bytes(grads),
        optimiser_state=unique_bytes(state),
        activations=activations,
    )


def memory_records(
    memories: Mapping[str, StepMemory], reference: str, *, dataset: str, config: dict[str, Any]
) -> list[dict[str, Any]]:
    """One benchmark record per method: MiB held by a training step, by kind.

    Beside them, the total as ``memory_vs_<reference>`` (``reference`` lower-cased, spaces
    and dashes as underscores).
    """
    records = [
        {"method": method, "dataset": dataset, "metrics": memory.metrics(), "config": dict(config)}
        for method, memory in memories.items()
    ]
    key = reference.lower().replace("-", "_").replace(" ", "_")
    return add_ratio_column(records, reference, "total_mib", f"memory_vs_{key}")
