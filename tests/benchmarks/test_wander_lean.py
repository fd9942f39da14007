"""The hand-written forward that ``wander-step-overhead`` times computes as ``wander.Wander``."""

import copy

import pytest
import torch
import torch.nn.functional as F

from benchmarks.backbones import LateFusionModel
from benchmarks.baselines.wander_lean import LeanWander
from benchmarks.training import make_optimizer, train_step
from tests.benchmarks.test_cggm_lean import _batches
from wander import Wander

OPTIONS = {
    "num_fused_tokens": 1,
    "bias_augment": True,
    "fused_dim": 6,
    "interaction_init": 0.1,
}


def _wander(batch, feature_rank=1, **options):
    torch.manual_seed(0)
    base = LateFusionModel.from_batch(batch, 4, width=6, hidden=16, head="linear")
    targets = {m: f"encoders.{m}.net.2" for m in base.encoders}
    ranks = {"bottleneck": 3, "feature": feature_rank, "token": 1}
    return Wander(
        base, ranks, example_input=batch, target_modules=targets, **{**OPTIONS, **options}
    )


@pytest.mark.parametrize("feature_rank", [1, 2])
def test_lean_forward_and_gradients_equal_the_library(feature_rank):
    batch = _batches(1)[0]
    wander = _wander(batch, feature_rank)
    with torch.no_grad():  # away from init, where both would give the base model's output
        for p in wander.adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    lean = LeanWander(copy.deepcopy(wander))
    wander.eval(), lean.eval()
    out, lean_out = wander(batch), lean(batch)
    with wander.disable_adapter():
        assert not torch.allclose(out, wander(batch))
    torch.testing.assert_close(lean_out, out)
    F.cross_entropy(out, batch.target).backward()
    F.cross_entropy(lean_out, batch.target).backward()
    for (name, p), q in zip(wander.named_parameters(), lean.parameters(), strict=True):
        assert p.requires_grad == q.requires_grad, name
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_lean_step_trains_as_the_library_does():
    batches = _batches(3)
    wander = _wander(batches[0])
    lean = LeanWander(copy.deepcopy(wander))
    runs = {}
    for name, model in (("library", wander), ("lean", lean)):
        model.train()
        optimiser = make_optimizer(model, lr=1e-2)
        torch.manual_seed(1)  # the same dropout masks in both runs
        for batch in batches:
            train_step(model, optimiser, batch, F.cross_entropy)
        runs[name] = list(model.parameters())
    for p, q in zip(runs["library"], runs["lean"], strict=True):
        torch.testing.assert_close(q, p)
    initial = _wander(batches[0]).adapter.parameters()
    moved = [
        not torch.equal(p, p0) for p, p0 in zip(wander.adapter.parameters(), initial, strict=True)
    ]
    assert len(moved) == 5 and all(moved)  # every adapter tensor trained


def test_without_centring_the_output_leaves_the_base_model():
    batch = _batches(1)[0]
    wander = _wander(batch).eval()
    centred = LeanWander(copy.deepcopy(wander)).eval()
    uncentred = LeanWander(copy.deepcopy(wander), centred=False).eval()
    with wander.disable_adapter():
        base_out = wander(batch)
    torch.testing.assert_close(centred(batch), base_out)
    assert not torch.allclose(uncentred(batch), base_out)


@pytest.mark.parametrize(
    "options",
    [{"init": "gate"}, {"output": "residual"}, {"normalize_inputs": False}],
)
def test_other_adapters_are_refused(options):
    batch = _batches(1)[0]
    with pytest.raises(ValueError, match="LeanWander handles"):
        LeanWander(_wander(batch, **options))
