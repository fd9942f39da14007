import copy

import pytest
import torch

from benchmarks.backbones import LateFusionModel
from tests.wander.conftest import bert_text_model, make_batch, train_steps
from tests.wander.test_model import assert_compiled_matches_eager
from wander import Wander, dense_fusion, fusion_product, get_wander, inject_wander
from wander.functional import fusion_product_stacked

from .conftest import CUDA

RANKS = {"bottleneck": 4, "feature": 2, "token": 3}


def base_pair(batch):
    """The same frozen base model on the CPU and on the GPU."""
    torch.manual_seed(0)
    cpu = LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2, dropout=0.0).eval()
    return cpu, copy.deepcopy(cpu).to(CUDA)


@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("missing", [False, True])
def test_a_gpu_model_trains_as_on_the_cpu(output, missing):
    batch = make_batch()
    if missing:  # presence masks: the missing modality's features are never read
        batch = batch.with_missing("audio", torch.tensor([True, False, True, False]))
    on_gpu = batch.to(CUDA)
    cpu_base, gpu_base = base_pair(batch)
    options = {"output": output, "bias_augment": missing}
    torch.manual_seed(1)
    cpu = Wander(cpu_base, RANKS, example_input=batch, **options)
    torch.manual_seed(1)
    gpu = Wander(gpu_base, RANKS, example_input=on_gpu, **options)
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    with torch.no_grad():
        with gpu.disable_adapter():
            base = gpu(on_gpu)
        torch.testing.assert_close(gpu(on_gpu), base, rtol=0, atol=0)  # identity at init
    (gpu(on_gpu).squeeze(-1) - on_gpu.target).pow(2).mean().backward()
    for n, p in gpu.adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    gpu.zero_grad()
    train_steps(cpu, batch)
    train_steps(gpu, on_gpu)
    with torch.no_grad():
        assert not torch.allclose(gpu(on_gpu), base)
        torch.testing.assert_close(gpu(on_gpu).cpu(), cpu(batch), rtol=1e-4, atol=1e-5)


def test_save_on_the_gpu_load_on_the_cpu_and_back(tmp_path):
    batch = make_batch()
    cpu_base, gpu_base = base_pair(batch)
    fresh_gpu = copy.deepcopy(gpu_base)  # copies of the bare models: a wrap's hooks stay behind
    gpu = Wander(gpu_base, RANKS, example_input=batch.to(CUDA), cp_mode="true")
    train_steps(gpu, batch.to(CUDA))
    with torch.no_grad():
        expected = gpu(batch.to(CUDA))
    gpu.save_pretrained(tmp_path)
    on_cpu = Wander.from_pretrained(cpu_base, tmp_path)
    assert {p.device.type for p in on_cpu.adapter.parameters()} == {"cpu"}
    on_gpu = Wander.from_pretrained(fresh_gpu, tmp_path)
    assert {p.device.type for p in on_gpu.adapter.parameters()} == {"cuda"}
    with torch.no_grad():
        torch.testing.assert_close(on_cpu(batch), expected.cpu(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(on_gpu(batch.to(CUDA)), expected)


def test_wrapped_on_the_cpu_then_moved():
    batch = make_batch()
    cpu_base, _ = base_pair(batch)
    wander = Wander(cpu_base, RANKS, example_input=batch)
    train_steps(wander, batch)
    with torch.no_grad():
        expected = wander(batch)
        wander.to(CUDA)
        torch.testing.assert_close(wander(batch.to(CUDA)).cpu(), expected, rtol=1e-4, atol=1e-5)


def test_injected_adapter_on_the_gpu():
    batch = make_batch().to(CUDA)
    _, gpu_base = base_pair(make_batch())
    model = inject_wander(gpu_base, RANKS, example_input=batch)
    assert {p.device.type for p in model.wander.parameters()} == {"cuda"}
    train_steps(model, batch)
    with torch.no_grad(), get_wander(model).disable_adapter():
        base = model(batch)
    assert not torch.allclose(model(batch), base)


def test_bfloat16_autocast_trains_a_float32_adapter():
    batch = make_batch().to(CUDA)
    _, gpu_base = base_pair(make_batch())
    wander = Wander(gpu_base, RANKS, example_input=batch)
    train_steps(wander, batch)
    with torch.no_grad():
        full = wander(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = wander(batch)
    torch.testing.assert_close(out.float(), full, rtol=5e-2, atol=5e-2)
    (out.float().squeeze(-1) - batch.target).pow(2).mean().backward()
    for n, p in wander.adapter.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None, n
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_half_precision_base_gets_a_float32_adapter():
    batch = make_batch().to(CUDA)
    _, gpu_base = base_pair(make_batch())
    gpu_base = gpu_base.to(torch.float16)
    half = batch.to(torch.float16)
    wander = Wander(gpu_base, RANKS, example_input=half)
    assert {p.dtype for p in wander.adapter.parameters()} == {torch.float32}
    with torch.no_grad(), wander.disable_adapter():
        base = wander(half)
    out = wander(half)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in wander.adapter.parameters())


@pytest.mark.parametrize("cp_mode", ["true", "reference"])
def test_fused_kernel_on_the_gpu(cp_mode):
    """The hand-written backward against finite differences, and the fast path against the
    dense CP reconstruction, on the GPU in float64."""
    g = torch.Generator().manual_seed(0)
    lens = [1, 3, 2]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(CUDA)

    hs = [rand(2, t, 2) for t in lens]
    qs = [rand(2, t, 2) for t in lens]
    ps = [rand(3, 2, 3) for _ in lens]
    lam = rand(2, 3)
    torch.testing.assert_close(
        fusion_product(hs, qs, ps, lam, cp_mode), dense_fusion(hs, qs, ps, lam, cp_mode)
    )
    s, m, b, t, r, rt, t_out, rd, d = 2, 3, 3, 3, 2, 2, 2, 3, 2
    h, q = rand(s, m, b, t, r), rand(s, m, rt, t, t_out)
    for i, length in enumerate(lens):  # padded rows are zero, as the layer feeds them
        h[:, i, :, length:] = 0
        q[:, i, :, length:] = 0
    args = [x.requires_grad_() for x in (h, q, rand(s, m, rd, r, d), rand(s, rt, rd))]
    assert torch.autograd.gradcheck(lambda *a: fusion_product_stacked(*a, cp_mode), args)


def test_transformers_text_encoder_on_the_gpu(tmp_path):
    pytest.importorskip("transformers")
    cpu_model, batch = bert_text_model(tmp_path)
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    torch.manual_seed(2)
    cpu = Wander(cpu_model, RANKS, example_input=batch)
    torch.manual_seed(2)
    gpu = Wander(gpu_model, RANKS, example_input=batch.to(CUDA))
    train_steps(cpu, batch)
    train_steps(gpu, batch.to(CUDA))
    with torch.no_grad():
        torch.testing.assert_close(gpu(batch.to(CUDA)).cpu(), cpu(batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_inductor_compiles_the_adapter_on_the_gpu(output):
    """``torch.compile`` with its default backend (Triton kernels) gives the eager outputs and
    gradients, the hand-written fusion backward included."""
    batch = make_batch().to(CUDA)
    _, gpu_base = base_pair(make_batch())
    wander = Wander(gpu_base, RANKS, example_input=batch, output=output)
    train_steps(wander, batch)
    assert_compiled_matches_eager(wander, batch, tolerance=1e-4)
