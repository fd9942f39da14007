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
