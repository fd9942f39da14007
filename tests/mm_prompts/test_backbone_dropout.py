"""The backbone's CPU dropout and the attention path it needs."""

import pytest
import torch
import torch.nn.functional as F

from mm_prompts import MulTBackbone, MulTConfig
from mm_prompts import backbone as mult
from mmcore import ModalityBatch


def test_dropout_drops_at_the_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.rand(200, 500) + 1.0  # no zeros of its own
    out = mult.dropout_fast(x, 0.1)
    dropped = out == 0
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.003)
    scale = 32768 / (32768 - 3277)  # p rounded to a multiple of 2^-15
    torch.testing.assert_close(out[~dropped], x[~dropped] * scale)
    # the mean over many masks is x
    ratios = torch.stack([mult.dropout_fast(x[:4], 0.3) / x[:4] for _ in range(1000)])
    assert ratios.mean().item() == pytest.approx(1.0, abs=0.003)  # 2e6 draws: std 0.0005
    # every 16-bit chunk of the draws is used: no position is dropped more often than others
    by_position = torch.stack([mult.dropout_fast(torch.ones(8), 0.5) == 0 for _ in range(4000)])
    assert by_position.float().mean(0).sub(0.5).abs().max() < 0.04


def test_dropout_is_seeded_by_torch_and_its_gradient_is_the_mask():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(3)
    a = mult.dropout_fast(x, 0.2)
    torch.manual_seed(3)
    b = mult.dropout_fast(x, 0.2)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, mult.dropout_fast(x, 0.2))  # the generator moved on
    a.sum().backward()
    torch.testing.assert_close(x.grad, a.detach() / x.detach())
    # off in eval, at p = 0, and at a p that rounds to 0; p = 1 drops everything
    assert mult.dropout_fast(x, 0.2, training=False) is x
    assert mult.dropout_fast(x, 0.0) is x and mult.dropout_fast(x, 1e-6) is x
    assert (mult.dropout_fast(x, 1.0) == 0).all()


def test_attention_path_with_dropout_equals_the_fused_kernel_without_it(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 8, generator=g) for _ in range(3))
    keep = torch.ones(3, 1, 1, 4, dtype=torch.bool)
    keep[1, ..., 2:] = False  # padded keys
    keep[2] = False  # no key at all: 0, as the fused kernel gives
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    monkeypatch.setattr(mult, "dropout_fast", lambda x, p, training=True: x)
    torch.testing.assert_close(mult._attention(q, k, v, keep, 0.5), expected)
    torch.testing.assert_close(
        mult._attention(q, k, v, None, 0.5), F.scaled_dot_product_attention(q, k, v)
    )


def test_backbone_trains_with_dropout_and_is_deterministic_in_eval():
    dims = {"text": 6, "audio": 3, "vision": 4}
    torch.manual_seed(0)
    model = MulTBackbone(MulTConfig(dims, d=8, num_heads=2, dropout=0.3))
    batch = ModalityBatch({m: torch.randn(5, 4, d) for m, d in dims.items()})
    model.train()
    first, second = model(batch), model(batch)
    assert not torch.allclose(first, second)  # dropout on in training
    first.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(batch), model(batch))


def test_fast_dropout_false_uses_torchs_dropout(monkeypatch):
    dims = {"text": 6, "audio": 3}
    torch.manual_seed(0)
    model = MulTBackbone(MulTConfig(dims, d=8, num_heads=2, dropout=0.3)).train()
    batch = ModalityBatch({m: torch.randn(5, 4, d) for m, d in dims.items()})
    calls = []
    monkeypatch.setattr(mult, "dropout_fast", lambda x, p, training=True: calls.append(p) or x)
    model(batch)
    assert calls  # feed-forward, attention and head dropouts
    calls.clear()
    model.fast_dropout = False
    model.batched = False  # the per-transformer path passes the switch on too
    model(batch)
    assert not calls


def test_backbone_compiles_in_training_mode():
    # the int64 -> int16 view of the fast masks cannot be traced: compiled code uses F.dropout
    dims = {"text": 6, "audio": 3}
    torch.manual_seed(0)
    model = MulTBackbone(MulTConfig(dims, d=8, num_heads=2, dropout=0.3)).train()
    batch = ModalityBatch({m: torch.randn(5, 4, d) for m, d in dims.items()})
    out = torch.compile(model, backend="aot_eager")(batch)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
