import pytest
import torch
import torch.nn.functional as F

from mmcore import (
    FastDropout,
    ModalityBatch,
    PointwiseConv1d,
    collate_modalities,
    dropout_fast,
    fused_optimizer,
)
from mmcore.metrics import BratsDiceMetric, ClassificationMetric, MSAMetric

from .conftest import CUDA


def test_batch_moves_whole_to_the_gpu():
    batch = ModalityBatch(
        {"text": torch.randn(4, 5, 3), "audio": torch.randn(4, 2)},
        target=torch.randn(4),
        padding_masks={"text": torch.tensor([[False] * 5, [False] * 4 + [True]] * 2)},
    ).with_missing("audio", torch.tensor([True, False, False, True]))
    moved = batch.to(CUDA)
    assert moved.device.type == "cuda"
    tensors = [*moved.inputs.values(), moved.target, *moved.padding_masks.values()]
    tensors += list(moved.presence.values())
    assert all(t.device.type == "cuda" for t in tensors)
    back = moved.to("cpu")
    for m in batch.modalities:
        torch.testing.assert_close(back[m], batch[m], rtol=0, atol=0)
        assert torch.equal(back.is_present(m), batch.is_present(m))


def test_a_data_loader_pins_batches_in_memory():
    samples = [
        ModalityBatch({"text": torch.randn(1, n, 3), "audio": torch.randn(1, 2)}, torch.randn(1))
        for n in (3, 5, 4, 2)
    ]
    loader = torch.utils.data.DataLoader(
        samples, batch_size=2, collate_fn=collate_modalities, pin_memory=True
    )
    for batch in loader:
        tensors = [*batch.inputs.values(), batch.target, *batch.padding_masks.values()]
        assert all(t.is_pinned() for t in tensors)
        assert batch.to(CUDA, non_blocking=True)["text"].device.type == "cuda"


def test_collate_keeps_samples_on_the_gpu():
    samples = [
        {
            "inputs": {
                "text": torch.randn(n, 3, device=CUDA),
                "audio": torch.randn(4, device=CUDA),
            },
            "target": torch.tensor(1.0, device=CUDA),
            "presence": {"audio": n == 2},
        }
        for n in (2, 4)
    ]
    batch = collate_modalities(samples)
    assert batch["text"].shape == (2, 4, 3)
    tensors = [*batch.inputs.values(), batch.target, batch.padding_masks["text"]]
    assert all(t.device.type == "cuda" for t in [*tensors, batch.presence["audio"]])
    assert batch.padding_masks["text"].cpu().tolist()[0] == [False, False, True, True]
    samples[0]["padding_masks"] = {"text": torch.tensor([False, True])}  # given on the CPU
    again = collate_modalities(samples)
    assert again.padding_masks["text"].device.type == "cuda"
    assert again.padding_masks["text"].cpu().tolist()[0] == [False, True, True, True]


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_fused_optimizer_fuses_on_cuda_and_steps_as_foreach(cls):
    torch.manual_seed(0)
    params = [torch.randn(5, 3, device=CUDA, requires_grad=True) for _ in range(3)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kwargs = {"lr": 0.1, "momentum": 0.9} if cls is torch.optim.SGD else {"lr": 0.1}
    fused = fused_optimizer(cls, params, **kwargs)
    assert fused.defaults["fused"] is True
    plain = cls(twins, foreach=True, **kwargs)
    for _ in range(3):
        for group in (params, twins):
            for p in group:
                p.grad = p.detach().square()  # same gradients for both
        fused.step()
        plain.step()
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b)


def test_dropout_on_the_gpu_is_torchs_dropout():
    x = torch.randn(64, 33, device=CUDA, requires_grad=True)
    torch.cuda.manual_seed(0)
    fast = dropout_fast(x, 0.3)
    torch.cuda.manual_seed(0)
    expected = F.dropout(x, 0.3)
    torch.testing.assert_close(fast, expected, rtol=0, atol=0)
    torch.cuda.manual_seed(0)
    torch.testing.assert_close(FastDropout(0.3)(x), expected, rtol=0, atol=0)
    fast.sum().backward()
    assert x.grad is not None and x.grad.device.type == "cuda"


def test_pointwise_conv_on_the_gpu_equals_conv1d():
    torch.manual_seed(0)
    conv = PointwiseConv1d(7, 4).to(CUDA)
    reference = torch.nn.Conv1d(7, 4, 1).to(CUDA)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(3, 7, 11, device=CUDA)
    torch.testing.assert_close(conv(x), reference(x))


def test_metrics_take_gpu_tensors():
    g = torch.Generator().manual_seed(0)
    pred, y = torch.randn(50, generator=g), torch.randn(50, generator=g)
    logits, labels = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    seg_pred, seg_y = (torch.randint(0, 5, (2, 6, 6, 6), generator=g) for _ in range(2))
    seg_pred[seg_pred == 3], seg_y[seg_y == 3] = 4, 4  # BraTS labels {0, 1, 2, 4}
    for metric, a, b in (
        (MSAMetric, pred, y),
        (ClassificationMetric, logits, labels),
        (BratsDiceMetric, seg_pred, seg_y),
    ):
        on_cpu, on_gpu = metric(), metric()
        on_cpu(a, b)
        on_gpu(a.to(CUDA), b.to(CUDA))
        assert on_gpu.aggregate() == pytest.approx(on_cpu.aggregate(), nan_ok=True)
