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
