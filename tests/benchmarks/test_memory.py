import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.backbones import LateFusionModel
from benchmarks.memory import MIB, StepMemory, step_memory
from benchmarks.tasks.wander_transfer import _kept_copies
from mmcore import ModalityBatch
from wander import Wander


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, batch):
        return self.head(torch.relu(self.enc(batch["x"])))


def mse(out, target):
    return (out - target).pow(2).mean()


BATCH = ModalityBatch({"x": torch.randn(4, 5)}, target=torch.randn(4, 3))
FLOAT = 4  # bytes


def test_counts_by_hand_full_training_with_sgd():
    """Parameters 5·7+7 + 7·3+3 = 66 floats, and their gradients. Saved for the backward: the
    input (first weight's gradient), ReLU's output (its own backward and the head's weight
    gradient: one storage, counted once) and the error (``pow``'s backward): 20 + 28 + 12."""
    model = TwoLayers()
    got = step_memory(model, torch.optim.SGD(model.parameters(), lr=0.1), BATCH, mse)
    assert got == StepMemory(66 * FLOAT, 66 * FLOAT, 0, (20 + 28 + 12) * FLOAT)
    assert got.total == (66 + 66 + 60) * FLOAT
    assert got.metrics()["total_mib"] == got.total / MIB


def test_counts_by_hand_frozen_encoder_with_adam():
    """With the encoder frozen nothing before the head is saved, only the head's 24 values
    have gradients, and Adam keeps two moments per value plus one step count per tensor."""
    model = TwoLayers()
    model.enc.requires_grad_(False)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    got = step_memory(model, optimiser, BATCH, mse)
    assert got == StepMemory(66 * FLOAT, 24 * FLOAT, (2 * 24 + 2) * FLOAT, (28 + 12) * FLOAT)


def test_freezing_cuts_gradients_optimiser_state_and_activations():
    """Head-only training of a late-fusion model holds gradients and Adam moments for the head
    alone and saves only the head's input. An adapter's gradients may be views of a larger
    storage (Wander's stacked factors, whose constant set gets zero gradients), which they keep
    alive: counted whole."""
    g = torch.Generator().manual_seed(0)
    batch = ModalityBatch(
        {"a": torch.randn(8, 6, generator=g), "b": torch.randn(8, 4, generator=g)},
        target=torch.randint(0, 3, (8,), generator=g),
    )
    torch.manual_seed(0)
    base = LateFusionModel.from_batch(batch, 3, width=16, hidden=64, head="linear", dropout=0.0)
    head_only = copy.deepcopy(base).requires_grad_(False)
    head_only.head.requires_grad_(True)
    ranks = {"bottleneck": 4, "feature": 1, "token": 1}
    wander = Wander(copy.deepcopy(base), ranks, example_input=batch)

    def measure(model, views=False):
        trainable = [p for p in model.parameters() if p.requires_grad]
        got = step_memory(model, torch.optim.Adam(trainable), batch, F.cross_entropy)
        values = sum(p.numel() for p in trainable)
        assert got.gradients >= FLOAT * values if views else got.gradients == FLOAT * values
        assert got.optimiser_state == FLOAT * (2 * values + len(trainable))
        return got

    full, head = measure(copy.deepcopy(base)), measure(head_only)
    adapted = measure(wander, views=True)
    assert head.parameters == full.parameters < adapted.parameters
    head_input = batch.batch_size * base.head.in_features
    log_softmax = batch.batch_size * 3
    # the NLL's saves: the int64 targets and its total weight (a float)
    nll = batch.batch_size * 8 + FLOAT
    assert head.activations == FLOAT * (head_input + log_softmax) + nll
    assert head.activations < adapted.activations
    assert full.gradients > 3 * adapted.gradients


def test_wanders_frozen_copy_of_its_head_is_counted():
    """``disable_adapter`` runs a copy of the ``modules_to_save`` that Wander keeps outside the
    model's modules; the transfer tasks count it beside the model."""
    g = torch.Generator().manual_seed(0)
    batch = ModalityBatch(
        {"a": torch.randn(8, 6, generator=g), "b": torch.randn(8, 4, generator=g)},
        target=torch.randint(0, 3, (8,), generator=g),
    )
    base = LateFusionModel.from_batch(batch, 3, width=16, hidden=64, head="linear", dropout=0.0)
    wander = Wander(base, {"bottleneck": 4, "feature": 1, "token": 1}, example_input=batch)

    def measure(**kwargs):
        trainable = [p for p in wander.parameters() if p.requires_grad]
        return step_memory(wander, torch.optim.Adam(trainable), batch, F.cross_entropy, **kwargs)

    alone = measure()
    beside = measure(held_beside=functools.partial(_kept_copies, wander))
    head = sum(p.numel() for p in base.head.parameters())
    assert beside.parameters - alone.parameters == FLOAT * head
    assert beside.gradients == alone.gradients
