import copy

import pytest
import torch

from benchmarks.backbones import LateFusionModel
from casp import CASP, norm_parameters
from tests.casp.test_adapter import FAST, data

from .conftest import CUDA


def source_model(out_dim=1):
    torch.manual_seed(0)
    return LateFusionModel.from_batch(
        data(), out_dim, width=6, hidden=8, num_heads=2, num_layers=1, dropout=0.0
    ).eval()


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_gpu_model_adapts_on_cpu_data_as_on_the_cpu(task):
    """The data stay in CPU memory; batches go to the model's device, predictions come back."""
    classes = 3 if task == "classification" else None
    target = data(seed=7, classes=classes)
    model = source_model(out_dim=classes or 1)
    cpu = CASP(copy.deepcopy(model), task=task, **FAST)
    gpu = CASP(model.to(CUDA), task=task, **FAST)
    source = gpu.predict(target)
    cpu_report, gpu_report = cpu.adapt(target), gpu.adapt(target)
    assert {p.device.type for p in norm_parameters(gpu.model)} == {"cuda"}
    assert torch.equal(gpu_report.kept_indices.cpu(), cpu_report.kept_indices.cpu())
    prediction = gpu.predict(target)
    assert prediction.device.type == "cpu"
    torch.testing.assert_close(prediction, cpu.predict(target), rtol=1e-4, atol=1e-5)
    on_gpu = gpu.predict(target.to(CUDA))
    assert on_gpu.device.type == "cuda"
    gpu.reset()
    torch.testing.assert_close(gpu.predict(target), source, rtol=0, atol=0)


def test_online_mode_on_the_gpu():
    target = data(seed=7, classes=3)
    online = CASP(source_model(3).to(CUDA), task="classification", **FAST)
    first = online(target.select(slice(0, 8)), episodic=True)
    assert first.device.type == "cpu" and first.shape == (8, 3)
    again = online(target.select(slice(0, 8)).to(CUDA), episodic=True)
    assert again.device.type == "cuda"
    torch.testing.assert_close(again.cpu(), first)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_gpu_model_adapts_as_the_float32_one(dtype):
    """The float32 master copies on the GPU: a half-precision model follows the float32 one."""
    target = data(n=48, seed=7)
    model = source_model()
    full = CASP(copy.deepcopy(model).to(CUDA), **{**FAST, "epochs_ca": 8})
    half = CASP(copy.deepcopy(model).to(CUDA, dtype), **{**FAST, "epochs_ca": 8})
    full.adapt(target)
    report = half.adapt(target.to(dtype=dtype))
    assert not report.collapsed
    for p0, p32, p16 in zip(
        norm_parameters(model),
        norm_parameters(full.model),
        norm_parameters(half.model),
        strict=True,
    ):
        assert p16.dtype == dtype
        moved = (p32.cpu() - p0).abs().max()
        rounding = p32.abs().max().cpu() * torch.finfo(dtype).eps  # of the written-back value
        assert (p16.float().cpu() - p32.cpu()).abs().max() < 0.3 * moved + rounding
