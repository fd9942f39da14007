"""The backbone's CPU dropout (mmcore.dropout_fast) and the attention path it needs."""

import torch
import torch.nn.functional as F

from mm_prompts import MulTBackbone, MulTConfig
from mm_prompts import backbone as mult
from mmcore import ModalityBatch


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
