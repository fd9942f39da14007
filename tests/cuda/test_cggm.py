import copy

import pytest
import torch
import torch.nn.functional as F

from cggm import CGGM
from tests.cggm.test_modulator import (
    grads,
    make_model,
    modulated_steps,
    segmentation_steps,
    vector_batch,
)

from .conftest import CUDA


def _run(model, batch, steps=3, **options):
    """Modulated SGD steps: the B history, the model and the modulator."""
    torch.manual_seed(0)  # the classifiers' initial weights, drawn on the CPU
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.1, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(model(batch), batch.target) + cggm.direction_loss()).backward()
        history.append(cggm.step(batch.target))
        opt.step()
    return history, model, cggm


@pytest.mark.parametrize("missing", [False, True])
def test_gpu_run_equals_the_cpu_run(missing):
    batch = vector_batch(4)
    if missing:  # presence masks: each classifier trains and scores on its own samples
        batch = batch.with_missing("m0", torch.arange(16) % 3 == 0)
    model = make_model(batch)
    cpu_history, cpu_model, _ = _run(copy.deepcopy(model), batch)
    gpu_history, gpu_model, cggm = _run(model.to(CUDA), batch.to(CUDA))
    classifiers = [cggm.classifier(m) for m in cggm.modalities]
    assert {p.device.type for c in classifiers for p in c.parameters()} == {"cuda"}
    for a, b in zip(gpu_history, cpu_history, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    expected = cpu_model.state_dict()
    for name, a in gpu_model.state_dict().items():
        torch.testing.assert_close(a.cpu(), expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_encoder_gradients_scaled_by_exactly_rho_b_on_the_gpu():
    batch = vector_batch(3).to(CUDA)
    model = make_model(batch).to(CUDA)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.0)
    F.cross_entropy(model(batch), batch.target).backward()
    before = grads(model)
    b = cggm.step(batch.target)
    for name, g in grads(model).items():
        factor = 1.3 * b[name.split(".")[1]] if name.startswith("encoders.") else 1.0
        torch.testing.assert_close(g, factor * before[name])


def test_float16_autocast_with_a_grad_scaler():
    """Unscale first, then CGGM scales the true gradients: as without the scaler."""
    batch = vector_batch(2).to(CUDA)
    model, reference = make_model(batch).to(CUDA), make_model(batch).to(CUDA)
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    with torch.autocast("cuda", dtype=torch.float16):
        ref_loss = F.cross_entropy(reference(batch), batch.target)
        loss = F.cross_entropy(model(batch), batch.target)
    ref_loss.backward()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    b = cggm.step(batch.target)
    assert all(0 < v < 2 for v in b.values())
    enc = "encoders.m1.net.0.weight"
    torch.testing.assert_close(
        grads(model)[enc], 1.3 * b["m1"] * grads(reference)[enc], rtol=1e-2, atol=1e-4
    )
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_saved_on_the_gpu_resumes_on_the_cpu():
    batches = [vector_batch(3, seed=s) for s in range(4)]
    run = modulated_steps
    model = make_model(batches[0])
    twin = copy.deepcopy(model)
    cggm = CGGM(model.to(CUDA), task="classification", num_outputs=3, smoothing=0.5)
    run(cggm, model, [b.to(CUDA) for b in batches[:2]])
    state, weights = cggm.state_dict(), copy.deepcopy(model.state_dict())
    expected = run(cggm, model, [b.to(CUDA) for b in batches[2:]])
    twin.load_state_dict(weights)  # the weights of the checkpoint, on the CPU
    resumed = CGGM(twin, task="classification", num_outputs=3, smoothing=0.5)
    resumed.load_state_dict(state)
    again = run(resumed, twin, batches[2:])
    for a, b in zip(again, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_segmentation_on_the_gpu():
    _, cggm = segmentation_steps(CUDA)
    classifiers = [cggm.classifier(m) for m in cggm.modalities]
    assert {p.device.type for c in classifiers for p in c.parameters()} == {"cuda"}
