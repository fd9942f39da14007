"""Small shared test fixtures."""

from pathlib import Path

import torch


def tiny_bert(folder: Path, *, vocab_size: int = 50, hidden: int = 16, max_len: int = 16):
    """Save a tiny random ``BertModel`` with ``save_pretrained`` and load it back from disk."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_len,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return transformers.BertModel.from_pretrained(folder).eval()


def tiny_t5_encoder(folder: Path, *, vocab_size: int = 50, hidden: int = 16):
    """Save a tiny random ``T5EncoderModel`` (its norms are ``T5LayerNorm``, an RMS norm that
    subclasses no torch norm) with ``save_pretrained`` and load it back from disk."""
    import transformers

    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=hidden,
        d_kv=hidden // 2,
        d_ff=2 * hidden,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    return transformers.T5EncoderModel.from_pretrained(folder).eval()


class TokenizerInputModel(torch.nn.Module):
    """A model that does not take a ``ModalityBatch``: ``forward(input_ids, attention_mask,
    audio)``, as a ``transformers`` tokenizer's output feeds it, with a tiny random BERT text
    encoder called with that ``attention_mask`` and a transformer audio encoder called with
    ``src_key_padding_mask``; token concatenation, then a head on the first text token."""

    def __init__(self, folder: Path, out_dim: int = 1, *, vocab_size: int = 30, hidden: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.text = tiny_bert(folder, vocab_size=vocab_size, hidden=hidden, max_len=12)
        self.audio_proj = torch.nn.Linear(3, hidden)
        layer = torch.nn.TransformerEncoderLayer(
            hidden, 2, 2 * hidden, dropout=0.0, batch_first=True
        )
        self.audio = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.mixer = torch.nn.Identity()
        self.classifier = torch.nn.Linear(hidden, out_dim)

    def forward(self, input_ids, attention_mask, audio, audio_padding=None):
        t = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        a = self.audio(self.audio_proj(audio), src_key_padding_mask=audio_padding)
        return self.classifier(self.mixer(torch.cat([t, a], dim=1))[:, 0])


def tokenizer_inputs(b: int = 4, pad_id: int = 0, seed: int = 0):
    """``(input_ids, attention_mask, audio, audio_padding)`` with padded text and audio; what
    the padded positions hold (``pad_id``, audio noise) depends on ``pad_id``."""
    g = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(b, 7, dtype=torch.long)
    attention_mask[1::2, 4:] = 0
    ids = torch.randint(1, 30, (b, 7), generator=g).masked_fill(attention_mask == 0, pad_id)
    audio_padding = torch.zeros(b, 5, dtype=torch.bool)
    audio_padding[::2, 3:] = True
    audio = torch.randn(b, 5, 3, generator=g)
    noise = torch.randn(b, 5, 3, generator=torch.Generator().manual_seed(pad_id))
    audio = torch.where(audio_padding[..., None], noise, audio)
    return ids, attention_mask, audio, audio_padding


class CausalMaskModel(torch.nn.Module):
    """Contract model whose encoders take a ``[T, T]`` causal ``attention_mask`` (no padding
    mask, whatever its name): a reader of padding masks must leave it alone."""

    def __init__(self, dims: dict[str, int], out_dim: int = 1, width: int = 8):
        super().__init__()
        self.encoders = torch.nn.ModuleDict({m: _CausalEncoder(d, width) for m, d in dims.items()})
        self.fusion = torch.nn.Identity()
        self.head = torch.nn.Linear(width, out_dim)

    def forward(self, batch):
        feats = []
        for m, encoder in self.encoders.items():
            t = batch[m].shape[1]
            feats.append(encoder(batch[m], attention_mask=torch.ones(t, t).tril()))
        return self.head(self.fusion(torch.cat(feats, dim=1))[:, 0])


class _CausalEncoder(torch.nn.Module):
    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d)

    def forward(self, x, attention_mask=None):
        scores = (x @ x.transpose(1, 2)).masked_fill(attention_mask == 0, float("-inf"))
        return self.proj(scores.softmax(-1) @ x)


def adapter_grads(adapter) -> dict[str, torch.Tensor | None]:
    """A Wander adapter's gradients by parameter, a stacked ``[M, ...]`` one split per modality.

    A stacked parameter's gradient can be non-zero while one modality's slice of it is zero:
    checks that every parameter trains must look at each slice.
    """
    grads: dict[str, torch.Tensor | None] = {}
    for name, p in adapter.named_parameters():
        if name in adapter.stacked_kinds:
            for i, m in enumerate(adapter.modalities):
                grads[f"{name}[{m}]"] = None if p.grad is None else p.grad[i]
        else:
            grads[name] = p.grad
    return grads
