"""The hand-written CGGM step that ``cggm-step-overhead`` times trains exactly as ``cggm.CGGM``."""

import copy

import pytest
import torch
import torch.nn.functional as F

from benchmarks.backbones import LateFusionModel
from benchmarks.baselines.cggm_lean import LeanCGGM
from benchmarks.training import train_step
from cggm import CGGM
from mmcore import ModalityBatch

OPTIONS = {"rho": 1.3, "lam": 0.2, "cls_lr": 1e-2}


def _batches(n=4):
    g = torch.Generator().manual_seed(0)
    dims = {"a": 12, "b": 7, "c": 5}
    return [
        ModalityBatch(
            {m: torch.randn(16, d, generator=g) for m, d in dims.items()},
            target=torch.randint(0, 4, (16,), generator=g),
        )
        for _ in range(n)
    ]


def test_lean_step_trains_as_the_library_does():
    batches = _batches()
    torch.manual_seed(0)
    model = LateFusionModel.from_batch(batches[0], 4, width=8, hidden=16, head="linear")
    runs = {}
    for name in ("library", "lean"):
        net = copy.deepcopy(model).train()
        if name == "library":
            modulator = CGGM(net, task="classification", num_outputs=4, **OPTIONS)
        else:
            modulator = LeanCGGM(net, num_outputs=4, **OPTIONS)
        optimiser = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        torch.manual_seed(1)  # the same dropout masks and classifier draws in both runs
        coefficients = []
        for batch in batches:
            train_step(
                net,
                optimiser,
                batch,
                F.cross_entropy,
                modulator.direction_loss,
                lambda b, modulator=modulator: modulator.step(b.target),
            )
            coefficients.append(modulator.coefficients.clone())
        runs[name] = (net, modulator, torch.stack(coefficients))
    (net, lib, b_lib), (lean_net, lean, b_lean) = runs["library"], runs["lean"]
    torch.testing.assert_close(b_lean, b_lib)
    assert not torch.allclose(b_lib[-1], b_lib[-1].mean().expand(3))  # B told them apart
    for p, q in zip(lean.params, lib.classifiers.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    for (name, p), q in zip(net.named_parameters(), lean_net.parameters(), strict=True):
        torch.testing.assert_close(q, p, msg=name)
    assert not torch.allclose(lib.direction_loss(), torch.zeros(()))
    torch.testing.assert_close(lean.direction_loss(), lib.direction_loss())


def test_lean_step_is_only_for_vector_features():
    batch = _batches(1)[0]
    seq = batch.replace(
        inputs={m: x.unsqueeze(1).expand(-1, 3, -1) for m, x in batch.inputs.items()}
    )
    model = LateFusionModel.from_batch(seq, 4, width=8, num_heads=2, head="linear")
    lean = LeanCGGM(model, num_outputs=4, **OPTIONS)
    model(seq)
    with pytest.raises(ValueError, match=r"vector features \[B, d\] only; got \(16, 3, 8\)"):
        lean.step(seq.target)
