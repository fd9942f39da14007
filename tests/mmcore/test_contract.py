import pytest
import torch
from torch import nn

from mmcore import (
    ModalityBatch,
    ModulePathError,
    MultimodalModel,
    call_padding_mask,
    check_module_names,
    check_multimodal_model,
    contract_encoder_paths,
    encoder_features,
    held_module,
    is_multimodal_model,
    masked_mean,
    resolve_module,
    run_encoder,
)
from tests.helpers import tiny_bert


class MaskAware(nn.Module):
    def forward(self, x, padding_mask=None):
        return masked_mean(x, padding_mask)


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)})
        self.fusion = nn.Identity()
        self.head = nn.Linear(8, 1)

    def forward(self, batch):
        feats = [run_encoder(self.encoders[m], batch[m]) for m in self.encoders]
        return self.head(torch.cat(feats, dim=-1))


def test_contract_check_accepts_and_rejects():
    model = ToyModel()
    assert is_multimodal_model(model)
    check_multimodal_model(model)
    bare = nn.Sequential(nn.Linear(2, 2))
    assert not is_multimodal_model(bare)
    with pytest.raises(TypeError):  # isinstance would be wrong from Python 3.12: not offered
        isinstance(model, MultimodalModel)
    with pytest.raises(TypeError, match=r"`encoders` must be an nn.ModuleDict.*\(missing\)"):
        check_multimodal_model(bare)
    with pytest.raises(TypeError, match=r"it is a dict, not a torch\.nn\.Module"):
        check_multimodal_model({"encoders": {}})


def test_resolve_module_suggests_close_names():
    model = ToyModel()
    assert resolve_module(model, "encoders.a") is model.encoders.a
    assert resolve_module(model, "") is model
    with pytest.raises(ModulePathError, match=r"no submodule 'encoder.a'.*'encoders.a'"):
        resolve_module(model, "encoder.a")
    with pytest.raises(ValueError, match="Did you mean"):  # also a ValueError, as PEFT's errors
        resolve_module(model, "heads")
    with pytest.raises(TypeError, match="module path must be a string, found int"):
        resolve_module(model, 0)


def test_encoder_features_unwraps_outputs():
    t = torch.ones(2, 3)
    assert encoder_features(t) is t
    assert encoder_features((t, None)) is t
    assert encoder_features({"last_hidden_state": t}) is t
    with pytest.raises(TypeError, match="last_hidden_state"):
        encoder_features("nope")


def test_run_encoder_passes_padding_mask_when_accepted():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[False, False, True]])
    assert run_encoder(MaskAware(), x, mask).item() == pytest.approx(2.0)
    # a module without a padding_mask parameter is called with x alone
    assert run_encoder(nn.Identity(), x, mask).shape == x.shape


def test_masked_mean_ignores_padding_and_handles_all_padding():
    x = torch.tensor([[[2.0], [4.0]], [[1.0], [1.0]]])
    mask = torch.tensor([[False, True], [True, True]])
    assert masked_mean(x, mask).squeeze(-1).tolist() == [2.0, 0.0]
    x = torch.tensor([[[2.0], [float("-inf")]], [[float("inf")], [1.0]]], requires_grad=True)
    mask = torch.tensor([[False, True], [True, True]])
    out = masked_mean(x, mask)
    assert out.squeeze(-1).tolist() == [2.0, 0.0]  # padding may hold inf
    out.sum().backward()
    assert x.grad.squeeze(-1).tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_transformers_encoder_is_accepted(tmp_path):
    pytest.importorskip("transformers")
    bert = tiny_bert(tmp_path)

    ids = torch.randint(0, 50, (2, 6))
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    batch = ModalityBatch({"text": ids}, padding_masks={"text": pad})
    out = run_encoder(bert, batch["text"], batch.padding_mask("text"))
    assert out.shape == (2, 6, 16)
    # padding is honoured: changing padded token ids leaves the real tokens' features unchanged
    ids2 = ids.clone()
    ids2[1, 4:] = 7
    out2 = run_encoder(bert, ids2, pad)
    torch.testing.assert_close(out[1, :4], out2[1, :4])
    # precomputed features go in as inputs_embeds
    emb = run_encoder(bert, torch.randn(2, 6, 16))
    assert emb.shape == (2, 6, 16)


def test_contract_encoder_paths_names_the_encoders_or_says_what_to_pass():
    model = torch.nn.Module()
    model.encoders = torch.nn.ModuleDict(
        {"text": torch.nn.Linear(2, 2), "audio": torch.nn.Identity()}
    )
    assert contract_encoder_paths(model, "x") == {
        "text": "encoders.text",
        "audio": "encoders.audio",
    }
    with pytest.raises(ModulePathError, match=r"no `encoders` ModuleDict.*pass paths=\{\}"):
        contract_encoder_paths(torch.nn.Linear(2, 2), "paths={}")


def test_held_module_looks_through_compile_and_data_parallel_wrappers_nested_either_way():
    """An empty ``nn.Sequential`` is falsy and a compiled wrapper's ``len()`` raises: the module
    is found by identity, never by ``inner or model``."""
    inner = nn.Sequential()
    compiled = torch.compile(inner)
    assert held_module(inner) is inner
    assert held_module(nn.DataParallel(compiled)) is inner
    assert held_module(torch.compile(nn.DataParallel(inner))) is inner
    assert held_module(nn.DataParallel(compiled), compiled=False) is compiled


def test_modality_names_that_cannot_name_a_submodule():
    check_module_names(["text", "audio-mfcc"], "Caller")
    with pytest.raises(
        ValueError, match=r"Caller: the modality names \['audio.mfcc'\].*'audio_mfcc'"
    ):
        check_module_names(["text", "audio.mfcc"], "Caller")
    with pytest.raises(ValueError, match=r"\['type'\] key submodules, and torch's ModuleDict"):
        check_module_names(["text", "type"], "Caller")


def test_call_padding_mask_reads_the_fields_conventions(tmp_path):
    """``True`` = padding, whichever convention the call used; masks that are not a [B, T]
    padding mask (a float additive one, an extended 4-D attention mask) are not read, nor an
    ``attention_mask`` given to a module that is not a ``transformers`` model (a causal one)."""
    pad = torch.tensor([[False, False, True], [False, True, True]])
    bert, plain = tiny_bert(tmp_path), nn.Linear(2, 2)
    assert call_padding_mask(bert, {}, 2) is None
    for name in ("padding_mask", "src_key_padding_mask", "key_padding_mask"):
        assert torch.equal(call_padding_mask(plain, {name: pad}, 2), pad)
    assert torch.equal(call_padding_mask(bert, {"attention_mask": (~pad).long()}, 2), pad)
    assert torch.equal(call_padding_mask(bert, {"attention_mask": (~pad).float()}, 2), pad)
    assert call_padding_mask(plain, {"attention_mask": (~pad).long()}, 2) is None
    assert call_padding_mask(plain, {"src_key_padding_mask": pad.float() * -1e9}, 2) is None
    assert call_padding_mask(bert, {"attention_mask": (~pad).long()[:, None, None]}, 2) is None
    assert call_padding_mask(plain, {"mask": pad}, 2) is None  # torch's attention mask, not padding
    assert call_padding_mask(plain, {"padding_mask": pad}, 3) is None  # not one row a sample
