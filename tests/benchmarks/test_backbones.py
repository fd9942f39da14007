import pytest
import torch

from benchmarks.backbones import LateFusionModel, SequenceEncoder
from mmcore import FastDropout, ModalityBatch, check_multimodal_model, is_multimodal_model
from tests.helpers import tiny_bert


def seq_batch(b=3):
    pad = torch.zeros(b, 7, dtype=torch.bool)
    pad[0, 5:] = True
    return ModalityBatch(
        {"text": torch.randn(b, 7, 6), "audio": torch.randn(b, 4, 3), "vec": torch.randn(b, 5)},
        padding_masks={"text": pad},
    )


def test_from_batch_sizes_come_from_the_data():
    batch = seq_batch()
    model = LateFusionModel.from_batch(batch, out_dim=2, width=8, num_heads=2).eval()
    assert is_multimodal_model(model)
    check_multimodal_model(model)
    assert model(batch).shape == (3, 2)
    feats = model.encode(batch)
    assert feats["text"].shape == (3, 7, 8) and feats["vec"].shape == (3, 8)
    assert model.fused(batch).shape == (3, 24)
    sub = LateFusionModel.from_batch(batch, out_dim=1, modalities=("vec",))
    assert sub(batch).shape == (3, 1)


@pytest.mark.parametrize("garbage", [1e3, float("-inf"), float("nan")])
def test_padded_positions_change_nothing(garbage):
    """Not even -inf (MOSI's audio padding) or NaN: 0 · inf in the attention would be NaN."""
    torch.manual_seed(0)
    batch = seq_batch()
    model = LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2).eval()
    text = batch["text"].clone()
    text[0, 5:] = garbage
    altered = batch.replace(inputs={**batch.inputs, "text": text})
    torch.testing.assert_close(model(batch), model(altered))
    text.requires_grad_()
    model(batch.replace(inputs={**batch.inputs, "text": text})).sum().backward()
    assert torch.isfinite(text.grad).all() and (text.grad[0, 5:] == 0).all()
    unmasked = altered.replace(padding_masks={})
    assert not torch.allclose(model(batch)[0], model(unmasked)[0])


def test_gradients_reach_every_parameter():
    batch = seq_batch()
    model = LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2)
    model(batch).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="divisible"):
        SequenceEncoder(4, d_model=10, num_heads=4)
    img = ModalityBatch({"img": torch.randn(2, 1, 4, 4)})
    with pytest.raises(ValueError, match="modality 'img' is a spatial input"):
        LateFusionModel.from_batch(img, out_dim=1)
    model = LateFusionModel.from_batch(seq_batch(), out_dim=1, width=8, num_heads=2)
    with pytest.raises(ValueError, match=r"lacks modalities \['vec'\]"):
        model(ModalityBatch({"text": torch.randn(1, 7, 6), "audio": torch.randn(1, 4, 3)}))


def test_transformers_text_encoder_in_the_backbone(tmp_path):
    pytest.importorskip("transformers")
    batch = ModalityBatch(
        {"text": torch.randint(0, 40, (2, 6)), "audio": torch.randn(2, 4, 3)},
        padding_masks={"text": torch.tensor([[False] * 6, [False] * 3 + [True] * 3])},
    )
    model = LateFusionModel.from_batch(
        ModalityBatch({"audio": batch["audio"]}), out_dim=1, width=8, num_heads=2
    )
    model.encoders["text"] = tiny_bert(tmp_path, vocab_size=40, hidden=8, max_len=12)
    model.fusion.modalities = ("text", "audio")
    model.head = torch.nn.Linear(16, 1)
    assert model(batch).shape == (2, 1)


def test_sequence_encoder_draws_fast_dropout_masks_in_training_only():
    torch.manual_seed(0)
    encoder = SequenceEncoder(6, d_model=8, num_layers=2, num_heads=2, dropout=0.3)
    layers = list(encoder.transformer.layers)
    assert all(isinstance(layer.dropout1, FastDropout) for layer in layers)
    x = torch.randn(3, 7, 6)
    assert not torch.allclose(encoder(x), encoder(x))
    encoder.eval()
    torch.testing.assert_close(encoder(x), encoder(x))
