import copy

import pytest
import torch

from mm_prompts import MPLMM, MulTBackbone, MulTConfig, simulate_missing
from mm_prompts import backbone as mult
from tests.mm_prompts.test_model import build, padded_copy

from .conftest import CUDA


@pytest.mark.parametrize("m", [3, 4])
def test_mixed_cases_on_the_gpu_equal_the_cpu_and_the_per_sample_loop(m):
    model, data = build(m)
    model.eval()
    gpu_model = copy.deepcopy(model).to(CUDA)
    with torch.no_grad():
        expected = model(data)
        fast = gpu_model(data.to(CUDA))
        slow = gpu_model.forward_per_sample(data.to(CUDA))
    torch.testing.assert_close(fast.cpu(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(slow, fast, rtol=1e-4, atol=1e-5)


def test_padding_on_the_gpu_changes_nothing_even_as_inf():
    """The fused attention kernels of the GPU: padded keys get weight 0, -inf included."""
    model, data = build()
    model.eval()
    gpu_model = copy.deepcopy(model).to(CUDA)
    with torch.no_grad():
        expected = model(padded_copy(data, None))
        for fill in (None, 1e3, float("-inf")):
            batch = padded_copy(data, fill).to(CUDA)
            torch.testing.assert_close(gpu_model(batch).cpu(), expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                gpu_model.forward_per_sample(batch).cpu(), expected, rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_gives_zeros_where_a_row_has_no_key(dtype):
    """A fully padded key sequence: 0 from every fused GPU kernel, as on the CPU (no NaN)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 8, generator=g) for _ in range(3))
    keep = torch.ones(3, 1, 1, 4, dtype=torch.bool)
    keep[1, ..., 2:] = False  # padded keys
    keep[2] = False  # no key at all
    expected = mult._attention(q, k, v, keep, 0.0)
    assert torch.equal(expected[2], torch.zeros_like(expected[2]))
    on_gpu = (x.to(CUDA, dtype) for x in (q, k, v))
    out = mult._attention(*on_gpu, keep.to(CUDA), 0.0)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tolerance, atol=tolerance)


def test_training_on_the_gpu_with_dropout_and_simulated_missingness():
    model, data = build()
    config = {**model.backbone.config_dict(), "dropout": 0.2}  # the GPU uses torch's dropout
    backbone = MulTBackbone(MulTConfig(**config)).to(CUDA)
    model = MPLMM(backbone, model.seq_lens, prompt_length=4).train()
    batch, cases = simulate_missing(data.to(CUDA), 0.7, generator=torch.Generator().manual_seed(0))
    assert batch.device.type == "cuda" and cases.shape == (len(data),)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = (model(batch).squeeze(-1) - batch.target).pow(2).mean()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert model.type_prompts["text"].grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)


def test_bfloat16_autocast_forward_and_backward():
    model, data = build()
    model = model.to(CUDA).eval()
    batch = data.to(CUDA)
    with torch.no_grad():
        full = model(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    torch.testing.assert_close(out.float(), full, rtol=5e-2, atol=5e-2)
    out.float().pow(2).mean().backward()
    assert model.type_prompts["text"].grad.abs().sum() > 0


def test_saved_on_the_gpu_loads_on_the_cpu(tmp_path):
    model, data = build()
    model = model.to(CUDA).eval()
    with torch.no_grad():
        expected = model(data.to(CUDA)).cpu()
    model.save_pretrained(tmp_path)
    loaded = MPLMM.from_pretrained(tmp_path).eval()
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(data), expected, rtol=1e-4, atol=1e-5)
