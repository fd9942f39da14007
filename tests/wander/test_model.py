import copy
import gc
import json
import threading
import warnings
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from benchmarks.backbones import LateFusionModel
from mmcore import ModalityBatch
from tests.helpers import adapter_grads
from tests.wander.test_errors import TARGETS, TwoTowers, example
from wander import Wander, WanderConfig, WanderTargetError, inject_wander

from .conftest import (
    LayerwiseModel,
    PlainModel,
    SkipsAbsent,
    bert_text_model,
    make_batch,
    train_steps,
)

RANKS = {"bottleneck": 4, "feature": 2, "token": 3}


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_contract_model_identity_at_init_and_freezing(base_model, batch, output):
    wander = Wander(base_model, RANKS, example_input=batch, output=output)
    with torch.no_grad():
        with wander.disable_adapter():
            base = wander(batch)
        out = wander(batch)
    assert out.shape == base.shape == (4, 1)
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    trainable = {n for n, p in wander.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in wander.adapter.named_parameters(prefix="adapter")} | {
        n for n, _ in base_model.head.named_parameters(prefix="base_model.head")
    }
    # one backward: every adapter parameter gets a gradient, no frozen base parameter does
    (wander(batch).squeeze(-1) - batch.target).pow(2).mean().backward()
    for n, g in adapter_grads(wander.adapter).items():  # every modality's slice
        assert g is not None and g.abs().sum() > 0, n
    for n, p in base_model.encoders.named_parameters():
        assert p.grad is None, n


def test_training_changes_output_and_disable_restores_base(base_model, batch):
    wander = Wander(base_model, RANKS, example_input=batch)
    with torch.no_grad(), wander.disable_adapter():
        base = wander(batch)
    head_before = {k: v.clone() for k, v in base_model.head.state_dict().items()}
    train_steps(wander, batch)
    with torch.no_grad():
        assert not torch.allclose(wander(batch), base)
        # as PEFT's: the trained head (modules_to_save) is off too, its wrapped weights used
        with wander.disable_adapter():
            torch.testing.assert_close(wander(batch), base)
        with wander.disable_adapter(original_modules=False):  # the adapter alone off
            trained_head = wander(batch)
        assert not torch.allclose(trained_head, base)
        base_model.head.load_state_dict(head_before)
        assert not torch.allclose(wander(batch), base)  # the adapter itself moved
        with wander.disable_adapter(original_modules=False):
            torch.testing.assert_close(wander(batch), base)


def test_disabled_the_wrapped_modules_get_no_gradient_and_follow_the_model(base_model, batch):
    wander = Wander(base_model, RANKS, example_input=batch)
    with torch.no_grad(), wander.disable_adapter():
        base = wander(batch)
    train_steps(wander, batch)
    with wander.disable_adapter():
        assert not wander(batch).requires_grad  # nothing trainable takes part
    wander.to(torch.float64)  # the kept copy follows on the next disabled call
    with torch.no_grad(), wander.disable_adapter():
        out = wander(batch.to(dtype=torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, base.double(), rtol=1e-5, atol=1e-6)
    copied = copy.deepcopy(wander)
    with torch.no_grad(), copied.disable_adapter():
        torch.testing.assert_close(copied(batch.to(dtype=torch.float64)), out)


def test_wrap_any_number_of_modalities_with_padding():
    dims = {f"m{i}": 3 + i for i in range(7)}
    lens = {f"m{i}": 2 + i % 4 for i in range(7)}
    batch = make_batch(dims, lens)
    pad = torch.zeros(4, lens["m3"], dtype=torch.bool)
    pad[0, -2:] = True
    batch = batch.replace(padding_masks={"m3": pad})
    torch.manual_seed(0)
    model = LateFusionModel.from_batch(batch, 1, width=8, num_heads=2, dropout=0.0).eval()
    wander = Wander(model, RANKS, example_input=batch)
    train_steps(wander, batch, steps=2)
    x = batch["m3"].clone()
    x[0, -2:] = 1e3
    garbage = batch.replace(inputs={**batch.inputs, "m3": x})
    with torch.no_grad():
        torch.testing.assert_close(wander(batch), wander(garbage))


class StridedConv(torch.nn.Module):
    """``[B, T, 4] → [B, T // 2, 8]``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 2, stride=2)

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class Downsampling(torch.nn.Module):
    """``b``'s encoder halves its sequence; the fusion mean-pools."""

    def __init__(self):
        super().__init__()
        self.encoders = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 8), "b": StridedConv()})
        self.fusion = torch.nn.Identity()
        self.head = torch.nn.Linear(16, 1)

    def forward(self, batch):
        a = self.encoders["a"](batch["a"])  # [B, 5, 8]
        b = self.encoders["b"](batch["b"])  # [B, 3, 8]
        return self.head(self.fusion(torch.cat([a.mean(1), b.mean(1)], dim=-1)))


def test_an_encoder_that_changes_the_length_warns_once_that_its_mask_is_not_applied():
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, -2:] = True
    batch = ModalityBatch(
        {"a": torch.randn(2, 5, 3, generator=g), "b": torch.randn(2, 6, 4, generator=g)},
        padding_masks={"b": pad},
    )
    torch.manual_seed(0)
    wander = Wander(Downsampling(), RANKS, example_input=batch.replace(padding_masks={}))
    with pytest.warns(UserWarning, match=r"'b' outputs 3 tokens but the batch's padding mask is"):
        first = wander(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(wander(batch), first)  # once per modality
        wander(batch.replace(padding_masks={}))  # no mask: nothing to say


def test_non_contract_model_by_module_names():
    torch.manual_seed(0)
    model = PlainModel().eval()
    text, audio = torch.randn(3, 5, 6), torch.randn(3, 5, 3)
    with torch.no_grad():
        base = model(text, audio)
    wander = Wander(
        model,
        RANKS,
        example_input=(text, audio),
        target_modules={"text": "text_net", "audio": "audio_net"},
        fusion_module="mixer",
        modules_to_save=["classifier"],
    )
    with torch.no_grad():
        torch.testing.assert_close(wander(text, audio), base)
    assert wander.config.hidden_dims == {"text": 8, "audio": 8}
    assert wander.config.out_dim == 16  # the mixer's [B, T, 16] output gets T' fused tokens
    wander(text, audio).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in wander.adapter.parameters())
    assert model.classifier.weight.grad is not None and model.text_net[0].weight.grad is None


def _layer_adapter(model, batch, layer, **options):
    return Wander(
        model,
        RANKS,
        example_input=batch,
        output="residual",
        target_modules={"text": f"text_layers.{layer}", "audio": f"audio_layers.{layer}"},
        fusion_module=f"meet.{layer}",
        **options,
    )


class _CheckpointedLayers(LayerwiseModel):
    """``LayerwiseModel`` with each tower layer under ``torch.utils.checkpoint`` (as large
    models are fine-tuned): the recomputation in the backward calls the hooked modules again."""

    use_reentrant = False

    def run_layer(self, layer, x):
        if not torch.is_grad_enabled():
            return layer(x)
        return checkpoint(layer, x, use_reentrant=self.use_reentrant)


# reentrant checkpoints warn on the frozen first layer, whose input needs no gradient
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    batch = make_batch({"text": 6, "audio": 3}, {"text": 7, "audio": 4})
    torch.manual_seed(0)
    plain = LayerwiseModel().eval()
    checkpointed = _CheckpointedLayers().eval()
    checkpointed.use_reentrant = use_reentrant
    checkpointed.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        adapters = [_layer_adapter(model, batch, layer) for layer in (0, 1)]
        with torch.no_grad():  # away from the identity init, so every gradient is informative
            for p in (p for w in adapters for p in w.adapter.parameters()):
                p.add_(0.1 * torch.randn_like(p))
        (adapters[-1](batch).squeeze(-1) - batch.target).pow(2).mean().backward()
        grads.append([p.grad for w in adapters for p in w.adapter.parameters()])
    for a, b in zip(*grads, strict=True):
        assert a is not None and a.abs().sum() > 0
        torch.testing.assert_close(b, a)


class _CheckpointedFusion(LayerwiseModel):
    """``LayerwiseModel`` with each meeting module (the adapters' fusion module) checkpointed."""

    def forward(self, batch):
        text, audio = self.text_in(batch["text"]), self.audio_in(batch["audio"])
        for text_layer, audio_layer, meet in zip(
            self.text_layers, self.audio_layers, self.meet, strict=True
        ):
            text, audio = checkpoint(
                meet, text_layer(text), audio_layer(audio), use_reentrant=False
            )
        return self.head(torch.cat([text.mean(1), audio.mean(1)], dim=-1))


def test_checkpointing_the_fusion_module_is_a_clear_error():
    """Its recomputation in the backward runs the fusion hook without the forward's features:
    the error says to checkpoint the target modules instead (it pointed at a wrong name)."""
    batch = make_batch({"text": 6, "audio": 3}, {"text": 7, "audio": 4})
    torch.manual_seed(0)
    model = _CheckpointedFusion().eval()
    wander = _layer_adapter(model, batch, 1)
    loss = (wander(batch).squeeze(-1) - batch.target).pow(2).mean()
    with pytest.raises(RuntimeError, match="checkpoint the target modules, not the module that"):
        loss.backward()


def test_residual_adapters_after_every_layer(tmp_path):
    """One residual adapter per layer of one model: identity, gradients, save/load, unwrap."""
    batch = make_batch({"text": 6, "audio": 3}, {"text": 7, "audio": 4})
    torch.manual_seed(0)
    model = LayerwiseModel().eval()
    frozen_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(batch)
    # the head is saved (and trained) with the first adapter only
    adapters = [_layer_adapter(model, batch, 0)]
    adapters.append(_layer_adapter(model, batch, 1, modules_to_save=[]))
    with torch.no_grad():
        torch.testing.assert_close(adapters[-1](batch), base)
    # wrapping again kept the head trainable: the first adapter saves it
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "head.weight",
        "head.bias",
    ]
    adapter_params = [p for w in adapters for p in w.adapter.parameters()]
    trainable = [p for p in model.parameters() if p.requires_grad] + adapter_params
    adapters[-1](batch).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params)
    assert model.text_layers[0].linear1.weight.grad is None

    opt = torch.optim.Adam(trainable, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        (adapters[-1](batch).squeeze(-1) - batch.target).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        expected = adapters[-1](batch)
        with adapters[0].disable_adapter():  # the second layer's adapter alone
            second_only = adapters[-1](batch)
    assert not torch.allclose(expected, second_only)
    for i, wander in enumerate(adapters):
        wander.save_pretrained(tmp_path / f"layer{i}")

    fresh = LayerwiseModel().eval()
    fresh.load_state_dict(frozen_state)  # the same frozen towers, the untrained head
    loaded = [Wander.from_pretrained(fresh, tmp_path / f"layer{i}") for i in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(loaded[-1](batch), expected)
    with pytest.raises(RuntimeError, match="unwrap them first"):
        loaded[0].unwrap()
    for wander in reversed(loaded):  # the last added first
        wander.unwrap()
    assert all(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():  # hooks gone: the base model with the loaded head
        fresh_base = fresh(batch)
        fresh.load_state_dict(frozen_state)
        torch.testing.assert_close(fresh(batch), base)
    assert not torch.allclose(fresh_base, base)


def test_residual_mode_on_non_contract_model_needs_direct_consumer():
    model = PlainModel().eval()
    text, audio = torch.randn(3, 5, 6), torch.randn(3, 5, 3)
    wander = Wander(
        model,
        RANKS,
        example_input=(text, audio),
        output="residual",
        target_modules={"text": "text_net", "audio": "audio_net"},
        fusion_module="mixer",
        modules_to_save=["classifier"],
    )
    with pytest.raises(RuntimeError, match="do not contain the outputs"):
        wander(text, audio)  # the mixer receives torch.cat of them, not the outputs themselves


def test_wrong_names_raise_with_suggestions(base_model, batch):
    with pytest.raises(WanderTargetError, match=r"no submodule 'encoders.txt'.*'encoders.text'"):
        Wander(
            base_model,
            RANKS,
            example_input=batch,
            target_modules={"text": "encoders.txt", "audio": "encoders.audio"},
        )
    with pytest.raises(ValueError, match=r"fusion_module='fuse'.*Did you mean.*'fusion'"):
        Wander(base_model, RANKS, example_input=batch, fusion_module="fuse")
    with pytest.raises(WanderTargetError, match="no `encoders` ModuleDict"):
        Wander(PlainModel(), RANKS, example_input=(torch.randn(1, 2, 6), torch.randn(1, 2, 3)))
    with pytest.raises(ValueError, match="needs `example_input`"):
        Wander(base_model, RANKS)
    with pytest.raises(ValueError, match="unknown rank name"):
        Wander(base_model, {"bottleneck": 4, "depth": 2}, example_input=batch)
    with pytest.raises(ValueError, match=r"\(bottleneck_dim, feature_rank, token_rank\)"):
        Wander(base_model, (4, 2), example_input=batch)
    with pytest.raises(TypeError, match="ranks must be a WanderConfig, a mapping"):
        Wander(base_model, 4, example_input=batch)
    with pytest.raises(ValueError, match="'text' and 'audio' name the same module"):
        Wander(
            base_model,
            RANKS,
            example_input=batch,
            target_modules={"text": "encoders.text", "audio": "encoders.text"},
        )
    with pytest.raises(ValueError, match="already wrapped by Wander"):
        Wander(Wander(base_model, RANKS, example_input=batch), RANKS, example_input=batch)


class ConcatTokens(torch.nn.Module):
    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(feats.values()), dim=1)


class LinearLateFusion(torch.nn.Module):
    """A contract model: linear encoders, token concatenation as the fusion, a linear head."""

    def __init__(self, dims: dict[str, int], width: int = 8):
        super().__init__()
        self.encoders = torch.nn.ModuleDict({m: torch.nn.Linear(d, width) for m, d in dims.items()})
        self.fusion = ConcatTokens()
        self.head = torch.nn.Linear(width, 1)

    def forward(self, batch):
        feats = {m: enc(batch[m]) for m, enc in self.encoders.items()}
        return self.head(self.fusion(feats).mean(dim=1))


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_the_batchs_presence_masks_reach_the_adapter(batch, output):
    """A sample's missing modality (kept features, ``fill=None``) does not move the adapter's
    contribution, which the linear head passes on unchanged."""
    torch.manual_seed(0)
    base_model = LinearLateFusion({m: x.shape[-1] for m, x in batch.inputs.items()})
    wander = Wander(base_model, RANKS, example_input=batch, output=output, bias_augment=True)
    train_steps(wander, batch, steps=2)
    missing = torch.tensor([True, False, False, False])
    kept = batch.with_missing("audio", missing, fill=None)
    audio = batch["audio"].clone()
    audio[0] = 2.0 - 3.0 * audio[0]  # other values, of the same scale (the base reads them)
    other = kept.replace(inputs={**kept.inputs, "audio": audio})

    def adapter_part(b):
        with torch.no_grad():
            with wander.disable_adapter(original_modules=False):
                base = wander(b)
            return wander(b) - base

    torch.testing.assert_close(adapter_part(kept), adapter_part(other))
    assert adapter_part(kept)[0].abs().max() > 0  # the other modalities still act
    ignored = adapter_part(batch.replace(inputs={**batch.inputs, "audio": audio}))
    assert not torch.allclose(ignored[0], adapter_part(kept)[0])  # without the mask, it is read


@pytest.mark.parametrize("output", ["fused", "residual"])
@pytest.mark.parametrize("lacking_one", ["skips its encoder", "encodes zeros"])
def test_a_modality_the_batch_lacks_counts_as_absent(output, lacking_one):
    """A model that does not run the encoder of a modality its batch lacks, or runs it on
    zeros, gets what a model that runs it on a batch marking that modality missing everywhere
    gets: same outputs, same adapter gradients. (The example input named it.)"""
    g = torch.Generator().manual_seed(0)
    dims = {"a": 4, "b": 5, "c": 3}
    full = ModalityBatch({m: torch.randn(6, d, generator=g) for m, d in dims.items()})
    lacking = ModalityBatch({m: full[m] for m in ("a", "b")})
    zero_fill = lacking_one == "encodes zeros"
    results = []
    for skip_absent, batch in ((True, lacking), (False, full.with_missing("c", True))):
        torch.manual_seed(1)
        wander = Wander(
            SkipsAbsent(dims, skip_absent, zero_fill=zero_fill and skip_absent),
            RANKS,
            example_input=full,
            output=output,
            bias_augment=True,
        )
        noise = torch.Generator().manual_seed(2)
        with torch.no_grad():  # away from the identity at init
            for p in wander.adapter.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=noise))
        out = wander(batch)
        out.square().sum().backward()
        grads = {n: p.grad for n, p in wander.adapter.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected)
    # every adapter parameter gets a gradient, zero where it only acts on the skipped modality
    assert grads.keys() == expected_grads.keys() == dict(wander.adapter.named_parameters()).keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    with torch.no_grad(), wander.disable_adapter():
        assert not torch.allclose(expected, wander(full.with_missing("c", True)))  # it acts


@pytest.mark.parametrize(
    ("base_dtype", "adapter_dtype"),
    [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)],
)
@pytest.mark.parametrize("output", ["fused", "residual"])
def test_adapter_follows_the_base_models_dtype(batch, base_dtype, adapter_dtype, output):
    """float64 bases get a float64 adapter; half-precision bases a float32 one (as PEFT's
    ``autocast_adapter_dtype``), and the model's outputs keep the base model's dtype."""
    torch.manual_seed(0)
    base_model = LinearLateFusion({m: x.shape[-1] for m, x in batch.inputs.items()})
    base_model.to(base_dtype)
    batch = batch.replace(inputs={m: x.to(base_dtype) for m, x in batch.inputs.items()})
    wander = Wander(base_model, RANKS, example_input=batch, output=output)
    assert {p.dtype for p in wander.adapter.parameters()} == {adapter_dtype}
    with torch.no_grad():
        with wander.disable_adapter():
            base = wander(batch)
        out = wander(batch)
    assert out.dtype == base.dtype == base_dtype
    torch.testing.assert_close(out, base, rtol=0, atol=0)  # identity at init, in any dtype
    wander(batch).float().pow(2).mean().backward()
    for n, p in wander.adapter.named_parameters():
        assert p.grad is not None and p.grad.dtype == adapter_dtype and p.grad.abs().sum() > 0, n


def test_longer_sequences_than_built_for_are_rejected(base_model, batch):
    wander = Wander(base_model, RANKS, example_input=batch)
    longer = make_batch(lens={"text": 9, "audio": 4, "vision": 5})
    with pytest.raises(ValueError, match=r"'text' has sequence length 9 .* at most 7"):
        wander(longer)


@pytest.mark.parametrize("fused_dim", [None, 8])
def test_save_load_round_trip(tmp_path, base_model, batch, fused_dim):
    wander = Wander(base_model, RANKS, example_input=batch, cp_mode="true", fused_dim=fused_dim)
    train_steps(wander, batch)
    with torch.no_grad():
        expected = wander(batch)
    (tmp_path / "a file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"Wander\.save_pretrained: cannot save into"):
        wander.save_pretrained(tmp_path / "a file")
    wander.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fused_dim"] == fused_dim
    assert config["bottleneck_dim"] == 4 and config["seq_lens"] == {
        "text": 7,
        "audio": 4,
        "vision": 5,
    }
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all(k.startswith(("adapter.", "base_model.head.")) for k in keys)
    assert not any("encoders" in k for k in keys)

    torch.manual_seed(123)  # a fresh base with the same frozen encoders, different head
    fresh = LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2, dropout=0.0)
    fresh.encoders.load_state_dict(base_model.encoders.state_dict())
    fresh.eval()
    with torch.no_grad():
        fresh_out = fresh(batch)
    assert wander.load_report is None  # built, not loaded
    loaded = Wander.from_pretrained(fresh, tmp_path)
    assert loaded.load_report == {"missing_keys": [], "unexpected_keys": []}
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), expected)
        with loaded.disable_adapter():  # the base as given, before the saved head was loaded
            torch.testing.assert_close(loaded(batch), fresh_out)
    # an adapter saved from a model with other modalities is a clear error, not a KeyError
    other = ModalityBatch({m: batch[m] for m in ("text", "audio")})
    two = LateFusionModel.from_batch(other, out_dim=1, width=8, num_heads=2, dropout=0.0)
    with pytest.raises(ValueError, match=r"sizes are for modalities \['audio', 'text', 'vision'\]"):
        Wander.from_pretrained(two, tmp_path)


@pytest.mark.parametrize("saved_stacked", [True, False])
def test_an_adapter_saved_in_one_parameter_layout_loads_into_the_other(
    tmp_path, base_model, batch, saved_stacked
):
    wander = Wander(base_model, RANKS, example_input=batch, stack_parameters=saved_stacked)
    # the encoders share a width (down-projections stack), not a length (token factors don't)
    assert wander.adapter.stacked_kinds == (
        ("down_weight", "down_bias", "feature_factors") if saved_stacked else ()
    )
    train_steps(wander, batch)
    with torch.no_grad():
        expected = wander(batch)
    wander.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["stack_parameters"] is saved_stacked
    config_path.write_text(json.dumps({**config, "stack_parameters": not saved_stacked}))
    torch.manual_seed(123)
    fresh = LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2, dropout=0.0)
    fresh.encoders.load_state_dict(base_model.encoders.state_dict())
    loaded = Wander.from_pretrained(fresh.eval(), tmp_path)
    assert bool(loaded.adapter.stacked_kinds) is not saved_stacked
    assert loaded.load_report == {"missing_keys": [], "unexpected_keys": []}
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), expected)


def test_deep_copy_and_pickle_give_independent_working_models(base_model, batch):
    """A deep copy (an EMA model, a best-epoch snapshot) runs its own adapter through its own
    hooks, and the whole wrapped model survives ``torch.save``/``torch.load``."""
    import copy
    import io

    wander = Wander(base_model, RANKS, example_input=batch)
    train_steps(wander, batch)
    wander.eval()
    with torch.no_grad():
        expected = wander(batch)
        copied = copy.deepcopy(wander)
        torch.testing.assert_close(copied(batch), expected)
        for p in copied.adapter.parameters():
            p.add_(0.5)
        assert not torch.allclose(copied(batch), expected)
        torch.testing.assert_close(wander(batch), expected)  # the original is untouched
        copied.unwrap()  # removes the copy's hooks only
        torch.testing.assert_close(wander(batch), expected)
        buffer = io.BytesIO()
        torch.save(wander, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(batch), expected)


def test_attributes_the_wrapper_lacks_are_the_base_models(base_model, batch):
    """As on PEFT's models: ``wander.head`` is the base's head, its methods stay callable, and
    tools that look parts up by name (CASP, CGGM) find them through the wrapper."""
    from casp import CASP

    wander = Wander(base_model, RANKS, example_input=batch)
    assert wander.head is base_model.head and wander.fusion is base_model.fusion
    assert wander.get_submodule("encoders.text") is base_model.encoders["text"]
    assert wander.adapter is not None and wander.config.bottleneck_dim == RANKS["bottleneck"]
    with pytest.raises(AttributeError, match=r"nor has its base model \(LateFusionModel\)"):
        _ = wander.no_such_attribute
    assert not hasattr(wander, "no_such_attribute")
    train_steps(wander, batch)
    wander.eval()
    with torch.no_grad():
        before = wander(batch).squeeze(-1)
    casp = CASP(wander, epochs_ca=2, snapshot_every=1, epochs_pl=1, keep_ratio=0.5)
    shifted = batch.replace(inputs={m: batch[m] + 0.5 for m in batch.modalities})
    casp.adapt(shifted)  # finds `fusion` (base_model.fusion) through the wrapper
    assert casp.params and not torch.equal(casp.predict(batch), before)
    with torch.no_grad():
        torch.testing.assert_close(wander(batch).squeeze(-1), before)  # a copy adapted


def assert_compiled_matches_eager(wander, batch, tolerance=None, **compile_options):
    """``torch.compile(wander, **compile_options)`` gives ``wander``'s outputs and gradients."""
    trainable = [p for p in wander.parameters() if p.requires_grad]

    def run(model):
        out = model(batch)
        return out, torch.autograd.grad(out.square().sum(), trainable)

    (eager, eager_grads), (compiled, compiled_grads) = (
        run(wander),
        run(torch.compile(wander, **compile_options)),
    )
    close = {} if tolerance is None else {"rtol": tolerance, "atol": tolerance / 10}
    torch.testing.assert_close(compiled, eager, **close)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, **close)


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_torch_compile_gives_the_eager_outputs_and_gradients(base_model, batch, output):
    """Dynamo traces the hooks and the hand-written fusion backward (``aot_eager``: the graph
    capture without code generation, so no C++ compiler is needed)."""
    if output == "residual" and torch.__version__ < "2.4":
        pytest.skip("dynamo before torch 2.4 fails on the residual hooks (internal error)")
    wander = Wander(base_model, RANKS, example_input=batch, output=output)
    with torch.no_grad(), wander.disable_adapter():
        base = wander(batch)
    train_steps(wander, batch)
    assert_compiled_matches_eager(wander, batch, backend="aot_eager")
    compiled = torch.compile(wander, backend="aot_eager")
    with torch.no_grad(), wander.disable_adapter():  # dynamo guards on the flag: traced again
        torch.testing.assert_close(compiled(batch), base)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_compiled_model_that_already_ran_is_wrapped_through_its_module(base_model, batch, frozen):
    """Its graphs were traced without the adapter's hooks, and dynamo does not always trace
    again (not for a base already frozen before compiling: the adapter was silently absent).
    Wander wraps the module it holds, so the adapter is in the outputs; injecting into the
    compiled model is a clear error."""
    with torch.no_grad():
        plain = base_model(batch)
    eager = Wander(copy.deepcopy(base_model), RANKS, example_input=batch)
    g = torch.Generator().manual_seed(1)
    for p in eager.adapter.parameters():  # away from the initialisation's exact zero
        p.data.add_(0.1 * torch.randn(p.shape, generator=g))
    if frozen:
        for name, p in base_model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    compiled = torch.compile(base_model, backend="aot_eager")
    compiled(batch)  # traced before the adapter exists
    with pytest.raises(TypeError, match=r"inject_wander: this model is torch.compile'd"):
        inject_wander(compiled, RANKS, example_input=batch)
    wander = Wander(compiled, RANKS, example_input=batch)
    assert wander.base_model is base_model
    wander.adapter.load_state_dict(eager.adapter.state_dict())
    with torch.no_grad():
        assert not torch.allclose(eager(batch), plain)
        torch.testing.assert_close(wander(batch), eager(batch))


def test_load_reports_missing_and_unexpected_keys(tmp_path, base_model, batch):
    Wander(base_model, RANKS, example_input=batch).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["modules_to_save"] = []
    config["future_option"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    fresh = LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2).eval()
    with (
        pytest.warns(UserWarning, match="future_option"),
        pytest.warns(UserWarning, match="unexpected keys"),
    ):
        loaded = Wander.from_pretrained(fresh, tmp_path)
    assert loaded.load_report["unexpected_keys"][0].startswith("base_model.head.")
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        Wander.from_pretrained(fresh, tmp_path / "nope")


def test_a_damaged_checkpoint_is_an_error_that_names_the_file(tmp_path, base_model, batch):
    """And leaves the model as it was: a failed load unwraps the adapter it built."""
    wander = Wander(base_model, RANKS, example_input=batch)
    wander.save_pretrained(tmp_path)
    wander.unwrap()
    config_path, weights_path = (
        tmp_path / "adapter_config.json",
        tmp_path / "adapter_model.safetensors",
    )
    config, weights = config_path.read_text(), weights_path.read_bytes()
    config_path.write_text(config[: len(config) // 2])  # a copy cut short
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        Wander.from_pretrained(base_model, tmp_path)
    config_path.write_text(config)
    weights_path.write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*adapter_model\.safetensors"):
        Wander.from_pretrained(base_model, tmp_path)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base_model.modules())
    assert all(p.requires_grad for p in base_model.parameters())
    weights_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors not found"):
        Wander.from_pretrained(base_model, tmp_path)


def test_unwrap_restores_the_base_model(base_model, batch):
    flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
    with torch.no_grad():
        base = base_model(batch)
    wander = Wander(base_model, RANKS, example_input=batch, init="gate")
    train_steps(wander, batch)
    head = {k: v.clone() for k, v in base_model.head.state_dict().items()}
    model = wander.unwrap()
    assert model is base_model
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    model.head.load_state_dict(head)
    with torch.no_grad():
        wandered_head = model(batch)
    assert not torch.equal(wandered_head, base)  # head was trained, but no adapter hook left
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_print_trainable_parameters(capsys, base_model, batch):
    wander = Wander(
        base_model,
        WanderConfig(bottleneck_dim=4, feature_rank=2, token_rank=3),
        example_input=batch,
    )
    wander.print_trainable_parameters()
    trainable, total = wander.trainable_parameters()
    assert f"trainable params: {trainable:,} || all params: {total:,}" in capsys.readouterr().out


def test_transformers_text_encoder(tmp_path):
    pytest.importorskip("transformers")
    model, batch = bert_text_model(tmp_path)
    wander = Wander(model, RANKS, example_input=batch)
    assert wander.config.hidden_dims == {"audio": 8, "text": 8}
    with torch.no_grad(), wander.disable_adapter():
        base = wander(batch)
    with torch.no_grad():
        torch.testing.assert_close(wander(batch), base)
    wander(batch).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in wander.adapter.parameters())
    assert all(p.grad is None for p in model.encoders["text"].parameters())


def test_fused_dim_tiles_the_fused_tokens_to_the_fusion_output(base_model, batch):
    """The paper's late-fusion head: one D-sized fused token tiled over the M modality slots."""
    full = Wander(base_model, RANKS, example_input=batch)
    out_dim = full.config.out_dim
    full.unwrap()
    wander = Wander(base_model, RANKS, example_input=batch, fused_dim=out_dim // 3)
    assert wander.adapter.out_dim == out_dim // 3
    assert sum(p.numel() for p in wander.adapter.parameters()) < sum(
        p.numel() for p in full.adapter.parameters()
    )
    with torch.no_grad():
        with wander.disable_adapter():
            base = wander(batch)
        torch.testing.assert_close(wander(batch), base, rtol=0, atol=0)
    (wander(batch).squeeze(-1) - batch.target).pow(2).mean().backward()
    for n, p in wander.adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    # what the fusion module hands on: its own output plus the fused token repeated per slot
    train_steps(wander, batch, steps=1)
    seen = []
    handle = base_model.fusion.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        wander(batch)
        with wander.disable_adapter():
            wander(batch)
    handle.remove()
    delta = (seen[0] - seen[1]).reshape(len(batch.target), 3, out_dim // 3)
    assert delta.abs().max() > 0
    torch.testing.assert_close(delta[:, 1], delta[:, 0])
    torch.testing.assert_close(delta[:, 2], delta[:, 0])
    wander.unwrap()
    with pytest.raises(ValueError, match="must divide"):
        Wander(base_model, RANKS, example_input=batch, fused_dim=out_dim - 1)


def test_a_model_with_its_own_forward_hooks_is_wrapped_and_they_still_run(base_model, batch):
    """Profilers and libraries such as accelerate put their own pre-hooks on a model (plain
    functions, bound methods of other objects): Wander looks for its own hooks among them, and
    must pass over the others."""
    seen = []

    class Profiler:
        def before(self, _module, _args):
            seen.append("method")

    profiler = Profiler()
    base_model.register_forward_pre_hook(profiler.before)
    base_model.head.register_forward_pre_hook(lambda _module, _args: seen.append("function"))
    wander = Wander(base_model, RANKS, example_input=batch)
    seen.clear()
    with torch.no_grad():
        with wander.disable_adapter():
            base = wander(batch)
        torch.testing.assert_close(wander(batch), base)
    assert seen == ["method", "function"] * 2
    assert wander.unwrap() is base_model


def test_vector_features_are_one_token_each():
    """Encoders returning ``[B, d]`` (no sequence axis) give one token per modality: token
    factors of one row, nothing spent on positions that never hold data."""
    dims = {"a": 4, "b": 5}
    batch = ModalityBatch({m: torch.randn(6, d) for m, d in dims.items()})
    wander = Wander(SkipsAbsent(dims, skip_absent=False), RANKS, example_input=batch)
    assert wander.adapter.config.seq_lens == {"a": 1, "b": 1}
    state = wander.adapter.state_dict()
    token_factors = [state[f"token_factors.{m}"] for m in dims]  # [R_t, T, T'] each
    assert all(p.shape[1] == 1 for p in token_factors)


def test_padding_masks_of_a_model_called_with_tokenizer_inputs(tmp_path):
    """A model that takes no ``ModalityBatch`` (``model(input_ids, attention_mask, ...)``): the
    masks its encoders are called with (BERT's ``attention_mask``, a ``TransformerEncoder``'s
    ``src_key_padding_mask``) keep padded positions out of the adapter. They took part before:
    what the padded positions held changed the output."""
    from tests.helpers import TokenizerInputModel, tokenizer_inputs

    model = TokenizerInputModel(tmp_path)
    x, other = tokenizer_inputs(pad_id=0), tokenizer_inputs(pad_id=17)
    with torch.no_grad():
        torch.testing.assert_close(model(*other), model(*x))  # the base model ignores padding
    torch.manual_seed(0)
    wander = Wander(
        model,
        RANKS,
        example_input=x,
        target_modules={"text": "text", "audio": "audio"},
        fusion_module="mixer",
        modules_to_save=["classifier"],
    )
    g = torch.Generator().manual_seed(1)
    for p in wander.adapter.parameters():  # away from the initialisation's exact identity
        p.data.add_(0.1 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        out = wander(*x)
        with wander.disable_adapter():
            assert (out - wander(*x)).abs().max() > 1e-3  # the adapter acts
        torch.testing.assert_close(wander(*other), out, rtol=0, atol=1e-6)


class _PausingEncoder(torch.nn.Module):
    """An encoder that, in the thread named ``"paused"``, waits until another thread's forward
    pass has run: the two passes interleave the same way every time."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.reached, self.resume = inner, None, None

    def forward(self, x, padding_mask=None):
        if self.resume is not None and threading.current_thread().name == "paused":
            self.reached.set()
            assert self.resume.wait(timeout=30)
        return self.inner(x, padding_mask=padding_mask)


def test_concurrent_forward_passes_each_fuse_their_own_features(base_model, batch):
    """Two threads calling one wrapped model (a threaded inference server): a pass that starts
    while another is between its encoders and its fusion does not take or clear the other's
    features and masks. It did: the paused pass lost its text features, silently."""
    base_model.encoders["audio"] = _PausingEncoder(base_model.encoders["audio"])
    other = make_batch(b=3, seed=5)
    wander = Wander(base_model, RANKS, example_input=batch)
    g = torch.Generator().manual_seed(1)
    for p in wander.adapter.parameters():  # away from the initialisation's exact identity
        p.data.add_(0.1 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        expected = {"paused": wander(batch), "other": wander(other)}
    pausing = base_model.encoders["audio"]
    pausing.reached, pausing.resume = threading.Event(), threading.Event()
    outputs = {}

    def paused():
        with torch.no_grad():
            outputs["paused"] = wander(batch)

    def interleaved():
        assert pausing.reached.wait(timeout=30)  # the paused pass has its text features
        with torch.no_grad():
            outputs["other"] = wander(other)
        pausing.resume.set()

    threads = [threading.Thread(target=paused, name="paused"), threading.Thread(target=interleaved)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(outputs) == {"paused", "other"}
    for name, out in expected.items():
        torch.testing.assert_close(outputs[name], out, rtol=0, atol=0)


class _TiedHeads(torch.nn.Module):
    """Contract model whose two head layers share one weight (as a head tied to an embedding)."""

    def __init__(self, batch):
        super().__init__()
        dims = {m: batch[m].shape[-1] for m in batch.modalities}
        self.encoders = torch.nn.ModuleDict({m: torch.nn.Linear(d, 8) for m, d in dims.items()})
        self.fusion = torch.nn.Identity()
        self.head = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 1)
        self.out_in = torch.nn.Linear(8, 8)
        self.out_in.weight = self.head.weight

    def forward(self, batch):
        fused = self.fusion(torch.cat([self.encoders[m](batch[m]) for m in self.encoders], 1))
        return self.out(torch.relu(self.out_in(torch.relu(self.head(fused[:, 0])))))


def test_tied_weights_among_the_saved_modules_round_trip(tmp_path, batch):
    """``save_pretrained`` writes a tied weight once, its other name as an alias, and loading
    restores both (it failed: safetensors refuses tensors that share memory)."""
    torch.manual_seed(0)
    model = _TiedHeads(batch)
    fresh = copy.deepcopy(model)  # the same frozen base, its own (untrained) heads
    wander = Wander(model, RANKS, example_input=batch, modules_to_save=["head", "out_in", "out"])
    train_steps(wander, batch)
    wander.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
        assert "base_model.head.weight" in saved and "base_model.out_in.weight" not in saved
        assert json.loads(f.metadata()["aliases"]) == {
            "base_model.out_in.weight": "base_model.head.weight"
        }
    again = Wander.from_pretrained(fresh, tmp_path)
    assert again.load_report == {"missing_keys": [], "unexpected_keys": []}
    assert fresh.out_in.weight is fresh.head.weight
    with torch.no_grad():
        torch.testing.assert_close(again(batch), wander(batch), rtol=0, atol=0)


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_base_methods_called_through_the_wrapper_read_the_batchs_masks(base_model, output):
    """``wander.fused(batch)`` (a base method other than ``forward``) runs the adapter with the
    batch's padding and presence masks, as ``wander(batch)`` does: the head on it gives the
    model's output, and the missing sample's kept values reach nothing."""
    g = torch.Generator().manual_seed(1)
    pad = torch.zeros(4, 7, dtype=torch.bool)
    pad[1, 4:] = True
    batch = make_batch().replace(padding_masks={"text": pad})
    wander = Wander(base_model, RANKS, example_input=batch, output=output)
    train_steps(wander, batch, steps=2)
    kept = batch.with_missing("audio", torch.tensor([True, False, False, False]), fill=None)
    with torch.no_grad():
        torch.testing.assert_close(wander.head(wander.fused(kept)), wander(kept))
        text = kept["text"].clone()
        text[1, 4:] = torch.randn(3, text.shape[-1], generator=g) * 5  # padded positions
        moved = kept.replace(inputs={**kept.inputs, "text": text})
        torch.testing.assert_close(wander.fused(moved), wander.fused(kept))
    assert not wander._calls  # no tensor held between calls
    assert wander.fused.__doc__ == base_model.fused.__doc__


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_a_forward_that_raised_leaves_no_batch_behind(base_model, output):
    """A forward that fails after its target modules ran (here: in the fusion module) must not
    leave its batch for the next call that registers none: the base's method called directly
    then reads its own batch's masks, not the failed call's."""
    batch = make_batch()
    kept = batch.with_missing("audio", torch.tensor([True, False, False, False]), fill=None)
    wander = Wander(base_model, RANKS, example_input=batch, output=output)
    train_steps(wander, batch, steps=2)

    def fail(*_):
        raise RuntimeError("boom")

    handle = wander.base_model.fusion.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        wander(kept)
    handle.remove()
    assert not wander._calls
    base = wander.base_model
    with torch.no_grad():
        torch.testing.assert_close(base.head(base.fused(batch)), wander(batch))


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_a_fusion_module_given_the_batch_supplies_its_masks(base_model, output):
    """Where no base forward saw the batch (the base's method called directly, or a model
    with an injected adapter), a fusion module called with it (``fusion(features, batch)``)
    still gives the adapter the batch's masks."""
    batch = make_batch()
    kept = batch.with_missing("audio", torch.tensor([True, False, False, False]), fill=None)
    wander = Wander(copy.deepcopy(base_model), RANKS, example_input=batch, output=output)
    injected = inject_wander(copy.deepcopy(base_model), RANKS, example_input=batch, output=output)
    for model in (wander, injected):
        train_steps(model, batch, steps=2)
        with torch.no_grad():
            expected = model(kept)
            base = model.base_model if model is wander else model
            torch.testing.assert_close(base.head(base.fused(kept)), expected)


class _BatchNormEncoders(torch.nn.Module):
    """Two modalities whose frozen encoders hold BatchNorm running statistics."""

    def __init__(self):
        super().__init__()
        self.encoders = torch.nn.ModuleDict(
            {
                m: torch.nn.Sequential(
                    torch.nn.Linear(d, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU()
                )
                for m, d in (("text", 6), ("audio", 3))
            }
        )
        self.fusion = torch.nn.Identity()
        self.head = torch.nn.Linear(16, 1)

    def forward(self, batch):
        feats = [self.encoders[m](batch[m]) for m in self.encoders]
        return self.head(self.fusion(torch.cat(feats, dim=-1)))


def test_the_frozen_bases_running_statistics_are_saved_and_loaded(tmp_path):
    # a frozen BatchNorm still updates its running statistics in train mode (PEFT saves them
    # too, huggingface/peft#1732): without them the loaded model is not the trained one
    batch = ModalityBatch(
        {"text": torch.randn(16, 6) + 2, "audio": torch.randn(16, 3) * 3}, target=torch.randn(16)
    )
    torch.manual_seed(0)
    base = _BatchNormEncoders()
    original = copy.deepcopy(base.state_dict())
    wander = Wander(base, RANKS, example_input=batch)
    wander.train()
    train_steps(wander, batch)
    wander.eval()
    with torch.no_grad():
        expected = wander(batch)
    wander.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.encoders.text.1.running_mean" in keys
    assert "base_model.encoders.audio.1.num_batches_tracked" in keys
    assert not any(k.endswith(("0.weight", "1.weight")) for k in keys if "encoders" in k)

    fresh = _BatchNormEncoders()
    fresh.load_state_dict(original)  # the base as it was before training
    loaded = Wander.from_pretrained(fresh, tmp_path).eval()
    assert loaded.load_report == {"missing_keys": [], "unexpected_keys": []}
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), expected)


class _Aux(NamedTuple):
    features: torch.Tensor
    weights: torch.Tensor


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple", "transformers", "object"])
def test_a_fusion_module_that_returns_a_tuple_or_a_transformers_output(kind):
    """Attention layers return ``(output, weights)``, a ``transformers`` encoder a
    ``BaseModelOutput``: the fused tokens go into the features, as ``mmcore.encoder_features``
    reads them, and the rest of the output is passed on as it was."""
    from transformers.modeling_outputs import BaseModelOutput

    pack = {
        "tuple": lambda x: (x, x.sum(-1)),
        "list": lambda x: [x, x.sum(-1)],
        "namedtuple": lambda x: _Aux(x, x.sum(-1)),
        "transformers": lambda x: BaseModelOutput(last_hidden_state=x, hidden_states=(x.sum(-1),)),
        "object": lambda x: SimpleNamespace(last_hidden_state=x, weights=x.sum(-1)),
    }[kind]
    seen = []

    class Mixer(torch.nn.Module):
        def forward(self, x):
            return pack(x)

    class Reader(torch.nn.Module):  # what consumes the mixer's whole output
        def forward(self, out):
            seen.append(out)
            return (out.last_hidden_state,) if isinstance(out, SimpleNamespace) else out

    torch.manual_seed(0)
    model = TwoTowers()
    model.mixer = torch.nn.Sequential(Mixer(), Reader())
    inputs = example()
    with torch.no_grad():
        base = model(*inputs)
    wander = Wander(
        model,
        RANKS,
        example_input=inputs,
        target_modules=TARGETS,
        fusion_module="mixer.0",
        num_fused_tokens=1,
    )
    seen.clear()
    out = wander(*inputs)
    torch.testing.assert_close(out, base)  # identity at init
    (passed,) = seen
    assert type(passed) is type(pack(torch.zeros(1)))
    if kind == "transformers":
        other = passed.hidden_states[0]
    elif kind == "object":
        other = passed.weights
    else:
        other = passed[1]
    assert not other.requires_grad  # the second item as the mixer made it (no adapter in it)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wander.adapter.parameters())


def test_a_saved_container_of_the_target_modules_is_restored_when_disabled(batch):
    """``modules_to_save=["encoders"]``: a ``ModuleDict`` is never called itself, its members
    are; they hold Wander's hooks, which the kept copy must neither run nor copy (a hook bound
    to the wrapper would copy the wrapper, its base model with it)."""
    torch.manual_seed(0)
    base = LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2, dropout=0.0).eval()
    gc.collect()
    wrappers = sum(type(o) is Wander for o in gc.get_objects())
    wander = Wander(base, RANKS, example_input=batch, modules_to_save=["encoders", "head"])
    gc.collect()
    assert sum(type(o) is Wander for o in gc.get_objects()) == wrappers + 1
    copies = wander.original_modules["encoders"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in copies.modules())
    with torch.no_grad(), wander.disable_adapter():
        before = wander(batch)
    train_steps(wander, batch)
    assert not torch.equal(base.encoders["text"].proj.weight, copies["text"].proj.weight)
    with torch.no_grad(), wander.disable_adapter():
        torch.testing.assert_close(wander(batch), before)
