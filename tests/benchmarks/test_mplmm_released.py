"""The released-structure MPLMM, the speed baseline of ``mplmm-throughput``."""

import pytest
import torch

from benchmarks.baselines.mplmm_released import ReleasedStructureMPLMM, _Attention, _Transformer
from mm_prompts import MulTConfig, apply_case, simulate_missing
from mmcore import ModalityBatch


def setup(dims=None, seed=0, n=6, length=3, missing_rate=0.7):
    torch.manual_seed(seed)
    dims = dims or {"text": 5, "audio": 3, "vision": 4}
    config = MulTConfig(dims, out_dim=1, d=4, num_heads=2, cross_layers=1, memory_layers=1)
    model = ReleasedStructureMPLMM(config, dict.fromkeys(dims, length), prompt_length=2).eval()
    g = torch.Generator().manual_seed(seed)
    batch = ModalityBatch({m: torch.randn(n, length, d, generator=g) for m, d in dims.items()})
    if missing_rate:
        batch, _ = simulate_missing(batch, missing_rate, generator=g)
    return model, batch


@pytest.mark.parametrize("dims", [None, {"a": 2, "b": 3, "c": 4, "d": 5}])
def test_one_temporal_mixer_per_target_and_available_subset(dims):
    model, batch = setup(dims)
    m = len(model.modalities)
    assert len(model.mixers) == m * (2 ** (m - 1) - 1)  # 9 for M = 3, 28 for M = 4
    assert model(batch).shape == (batch.batch_size, 1)


@torch.no_grad()
def test_each_sample_is_computed_alone():
    model, batch = setup()
    whole = model(batch)
    alone = torch.cat([model(batch.select([i])) for i in range(batch.batch_size)])
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_missing_modality_is_generated_not_read():
    model, batch = setup(missing_rate=0.0)
    no_audio = apply_case(batch, 0b101)  # text and vision present
    scrambled = no_audio.replace(inputs={**dict(no_audio.inputs), "audio": torch.randn(6, 3, 3)})
    torch.testing.assert_close(model(no_audio), model(scrambled))
    assert not torch.allclose(model(no_audio), model(batch))


@torch.no_grad()
def test_attention_is_causal():
    torch.manual_seed(0)
    transformer = _Transformer(4, 2, 2).eval()
    x = torch.randn(5, 2, 4)  # [T, B, d]
    x[..., 0] += 10.0  # no token taken for padding
    later = x.clone()
    later[3:] = torch.randn(2, 2, 4)
    out, out_later = transformer(x), transformer(later)
    torch.testing.assert_close(out[:3], out_later[:3])
    assert not torch.allclose(out[3:], out_later[3:])


def test_a_sample_with_nothing_present_is_an_error():
    model, batch = setup(missing_rate=0.0)
    empty = batch.with_missing("text", torch.ones(6, dtype=torch.bool))
    empty = empty.with_missing("audio", torch.ones(6, dtype=torch.bool))
    empty = empty.with_missing("vision", torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="every modality missing"):
        model(empty)


@torch.no_grad()
@pytest.mark.parametrize("self_attention", [True, False])
def test_attention_by_hand_equals_torchs(self_attention):
    torch.manual_seed(0)
    mine, torchs = _Attention(6, 3), torch.nn.MultiheadAttention(6, 3)
    torchs.in_proj_weight.copy_(mine.in_proj.weight)
    torchs.in_proj_bias.copy_(mine.in_proj.bias)
    torchs.out_proj.load_state_dict(mine.out_proj.state_dict())
    query = torch.randn(4, 2, 6)
    key, value = (query, query) if self_attention else (torch.randn(5, 2, 6), torch.randn(5, 2, 6))
    mask = torch.triu(torch.full((4, key.shape[0]), float("-inf")), 1 + key.shape[0] - 4)
    expected, expected_weights = torchs(query, key, value, attn_mask=mask)  # averaged over heads
    out, weights = mine(query, key, value, mask)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)


@torch.no_grad()
def test_a_token_whose_first_feature_is_zero_gets_no_position():
    torch.manual_seed(0)
    transformer = _Transformer(4, 2, 1)
    x = torch.randn(3, 2, 4)
    x[1, 0, 0] = 0.0  # sample 0, step 1: "padding"
    embedded = transformer._embed(x)
    torch.testing.assert_close(embedded[1, 0], transformer.scale * x[1, 0])
    assert not torch.allclose(embedded[1, 1], transformer.scale * x[1, 1])


def test_an_empty_batch_is_an_error():
    model, batch = setup(missing_rate=0.0)
    with pytest.raises(ValueError, match="at least one sample"):
        model(batch.select([]))
