"""Models that Wander cannot adapt as asked: each is a clear error at wrap or call time."""

import copy
import warnings

import pytest
import torch
from torch import nn

from tests.wander.conftest import make_batch
from wander import Wander

RANKS = (4, 2, 2)
TARGETS = {"text": "text_net", "audio": "audio_net"}


class TwoTowers(nn.Module):
    """``forward(text, audio)``; what the towers and the mixer do is set per test."""

    def __init__(self, use_audio=True, text_out=None, mix_first=False):
        super().__init__()
        self.text_net, self.audio_net = nn.Linear(6, 8), nn.Linear(3, 8)
        self.mixer, self.classifier = nn.Identity(), nn.Linear(8, 2)
        self.use_audio, self.text_out, self.mix_first = use_audio, text_out, mix_first

    def forward(self, text, audio):
        if self.mix_first:  # the "fusion" runs before the encoders
            self.mixer(torch.zeros(text.shape[0], 1, 8))
        t = self.text_net(text)
        if self.text_out is not None:
            t = self.text_out(t)
        feats = [t, self.audio_net(audio)] if self.use_audio else [t]
        mixed = torch.cat([f[:, :1] for f in feats], dim=1)  # [B, M, 8]
        mixed = self.mixer(mixed)
        return self.classifier(mixed[:, 0] if isinstance(mixed, torch.Tensor) else mixed[0][:, 0])


def example():
    return torch.randn(2, 5, 6), torch.randn(2, 4, 3)


class Unsqueeze(nn.Module):
    def forward(self, x):
        return x.unsqueeze(-1)


CASES = [
    (
        {"use_audio": False},
        {},
        ValueError,
        r"never called the target modules of \['audio'\]",
    ),
    (
        {},
        {"target_modules": {"text": "text_net.weight", "audio": "audio_net"}},
        ValueError,
        "text_net.weight",
    ),
    (
        {},
        {"fusion_module": "mixer", "num_fused_tokens": 3},
        ValueError,
        "outputs 2 tokens, fewer",
    ),
]


def wrap(model_kwargs, wander_kwargs):
    options = {
        "target_modules": TARGETS,
        "fusion_module": "mixer",
        "num_fused_tokens": 1,
        **wander_kwargs,
    }
    return Wander(TwoTowers(**model_kwargs), RANKS, example_input=example(), **options)


@pytest.mark.parametrize(("model_kwargs", "wander_kwargs", "error", "match"), CASES)
def test_wrap_time_errors(model_kwargs, wander_kwargs, error, match):
    with pytest.raises(error, match=match):
        wrap(model_kwargs, wander_kwargs)


def test_target_output_of_the_wrong_rank():
    model = TwoTowers(text_out=lambda t: t.squeeze(-1))
    model.text_net = nn.Sequential(nn.Linear(6, 8), Unsqueeze())  # [B, T, 8, 1]: not features
    with pytest.raises(
        ValueError, match=r"target module of 'text' outputs shape \(2, 5, 8, 1\).*CNN's feature"
    ):
        Wander(model, RANKS, example_input=example(), target_modules=TARGETS, fusion_module="mixer")


class AsDict(nn.Module):
    def forward(self, x):
        return {"features": x}


def test_a_target_output_without_features_names_the_modality():
    model = TwoTowers(text_out=lambda t: t["features"])
    model.text_net = nn.Sequential(nn.Linear(6, 8), AsDict())
    with pytest.raises(TypeError, match=r"modality 'text': cannot find features .*target_modules"):
        Wander(model, RANKS, example_input=example(), target_modules=TARGETS, fusion_module="mixer")
    wander = Wander(  # its linear layer outputs the features
        model,
        RANKS,
        example_input=example(),
        target_modules={**TARGETS, "text": "text_net.0"},
        fusion_module="mixer",
        num_fused_tokens=1,
    )
    assert wander(*example()).shape == (2, 2)


def test_fused_output_needs_a_tensor_from_the_fusion_module():
    class DictMixer(nn.Module):
        def forward(self, x):
            return {0: x}  # indexable, but no features where Wander looks

    model = TwoTowers()
    model.mixer = DictMixer()
    with pytest.raises(ValueError, match="adds the fused tokens to the fusion module's output"):
        Wander(model, RANKS, example_input=example(), target_modules=TARGETS, fusion_module="mixer")


def test_a_call_whose_fusion_output_is_shorter_than_the_fused_tokens():
    """Sequences shorter than at wrap time are fine, until the fusion module's output has fewer
    tokens than the adapter adds (batches padded to their longest sequence): a clear error."""

    class PerToken(TwoTowers):  # the mixer sees (and outputs) every token of both towers
        def forward(self, text, audio):
            mixed = self.mixer(torch.cat([self.text_net(text), self.audio_net(audio)], dim=1))
            return self.classifier(mixed.mean(dim=1))

    text, audio = example()  # 5 + 4 tokens
    wander = Wander(
        PerToken(),
        RANKS,
        example_input=(text, audio),
        target_modules=TARGETS,
        fusion_module="mixer",
        num_fused_tokens=4,
    )
    assert wander(text[:, :2], audio[:, :2]).shape == (2, 2)  # 4 tokens out: enough
    with pytest.raises(ValueError, match="output 3 tokens in this call, fewer than the 4 fused"):
        wander(text[:, :2], audio[:, :1])


def test_fusion_module_called_before_the_encoders():
    with pytest.raises(RuntimeError, match="ran before the target modules"):
        wrap({"mix_first": True}, {})(*example())


def test_keyword_example_input():
    class Keywords(TwoTowers):
        def forward(self, *, text, audio):
            return super().forward(text, audio)

    text, audio = example()
    wander = Wander(
        Keywords(),
        RANKS,
        example_input={"text": text, "audio": audio},
        target_modules=TARGETS,
        fusion_module="mixer",
        modules_to_save="classifier",  # one name
        num_fused_tokens=1,
    )
    assert wander(text=text, audio=audio).shape == (2, 2)
    assert wander.base_model.classifier.weight.requires_grad
    assert not wander.base_model.text_net.weight.requires_grad


def test_loading_into_a_model_whose_saved_module_differs_in_shape(tmp_path):
    """The error names the key; the model is left as it was: no weight of its saved module
    overwritten (its first layer matches in shape, its last does not), no hook, its flags."""
    saved = TwoTowers()
    saved.classifier = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    wander = Wander(
        saved,
        RANKS,
        example_input=example(),
        target_modules=TARGETS,
        fusion_module="mixer",
        num_fused_tokens=1,
        modules_to_save=["classifier"],
    )
    wander.save_pretrained(tmp_path)
    other = TwoTowers()
    other.classifier = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))  # 3 classes
    before = copy.deepcopy(other.state_dict())
    flags = {n: p.requires_grad for n, p in other.named_parameters()}
    inputs = example()
    with torch.no_grad():
        expected = other(*inputs)
    with pytest.raises(
        ValueError, match=r"'base_model.classifier.2.bias' has shape \(2,\) in .* but \(3,\)"
    ):
        Wander.from_pretrained(other, tmp_path)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in other.named_parameters()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in other.modules())
    with torch.no_grad():
        torch.testing.assert_close(other(*inputs), expected, rtol=0, atol=0)


def test_base_model_moved_without_its_wrapper():
    """The adapter is not a submodule of the base model, so ``base_model.to()`` leaves it
    behind; the next call says so instead of failing inside a kernel."""
    wander = wrap({}, {})
    wander.adapter.to("meta")  # as if the base model alone had moved to another device
    with pytest.raises(
        RuntimeError, match=r"features are on cpu but the adapter is on meta.*wander\.to\(device\)"
    ):
        wander(*example())


def test_adapter_modalities_named_unlike_the_batch_warn(base_model):
    """Presence masks are read from the batch by modality name: an adapter modality the example
    batch does not hold would see a missing modality's zeros as real ones, so wrapping warns.
    Its padding mask still arrives, through the call of its encoder (``padding_mask=``)."""
    pad = torch.zeros(4, 7, dtype=torch.bool)
    pad[1:, 4:] = True
    batch = make_batch().replace(padding_masks={"text": pad})
    noisy = batch.replace(
        inputs={**batch.inputs, "text": batch["text"].masked_fill(pad[..., None], 0.0)}
    )
    lacking = batch.with_missing("text", torch.tensor([False, True, False, True]))
    outputs = {}
    for text in ("text", "txt"):
        targets = {text: "encoders.text", "audio": "encoders.audio", "vision": "encoders.vision"}
        model = copy.deepcopy(base_model)
        torch.manual_seed(0)
        if text == "text":
            wander = Wander(model, RANKS, example_input=batch, target_modules=targets)
        else:
            with pytest.warns(
                UserWarning, match=r"modalities \['txt'\] are not modalities of"
            ) as w:
                wander = Wander(model, RANKS, example_input=batch, target_modules=targets)
            assert w[0].filename == __file__  # the user's line, not the library's
        g = torch.Generator().manual_seed(1)
        for p in wander.adapter.parameters():  # away from the initialisation's exact zero
            p.data.add_(0.1 * torch.randn(p.shape, generator=g))
        with torch.no_grad():
            outputs[text] = wander(batch), wander(noisy), wander(lacking)
    for out, noisy_out, _ in outputs.values():
        torch.testing.assert_close(noisy_out, out, rtol=0, atol=1e-6)  # padding changes nothing
    torch.testing.assert_close(outputs["txt"][0], outputs["text"][0])  # the same adapter
    # where the text is missing, only the adapter named as the batch knows it
    assert (outputs["txt"][2] - outputs["text"][2]).abs().max() > 1e-3


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_a_second_adapter_at_the_same_fusion_module(output, tmp_path):
    """Calling either wrapper would run both adapters (the first's output was the sum of both):
    an error that says how to switch, the model left as it was; once the first is unwrapped,
    the second loads. Stacking on an injected adapter stays allowed (tests/wander/test_inject)."""
    from benchmarks.backbones import LateFusionModel
    from tests.wander.conftest import LayerwiseModel

    torch.manual_seed(0)
    if output == "fused":  # the mmcore contract: encoders -> fusion -> head
        batch = make_batch()
        model = LateFusionModel.from_batch(batch, 1, width=8, num_heads=2, dropout=0.0).eval()
        where = {}
    else:  # after the second of two layers whose towers meet
        batch = make_batch(dims={"text": 6, "audio": 3}, lens={"text": 5, "audio": 4})
        model = LayerwiseModel().eval()
        where = dict(
            target_modules={"text": "text_layers.1", "audio": "audio_layers.1"},
            fusion_module="meet.1",
            output="residual",
        )
    first = Wander(model, RANKS, example_input=batch, **where)
    with torch.no_grad():
        for p in first.adapter.parameters():
            p.normal_()
        expected = first(batch)
    first.save_pretrained(tmp_path)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"another Wander wrapper.*unwrap"):
        Wander(model, RANKS, example_input=batch, **where)
    with pytest.raises(ValueError, match="another Wander wrapper"):
        Wander.from_pretrained(model, tmp_path)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        torch.testing.assert_close(first(batch), expected, rtol=0, atol=0)

    first.unwrap()
    again = Wander.from_pretrained(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(batch), expected, rtol=0, atol=0)


def test_a_data_parallel_wrapped_model_is_refused_with_the_order_to_wrap_in():
    """DDP registers the parameters to synchronise when it is built: the base's, which Wander
    would freeze, not the adapter's; so Wander goes inside, DDP outside (DataParallel alike)."""
    with pytest.raises(TypeError, match=r"wrapped in DataParallel.*`model.module`.*then the"):
        Wander(nn.DataParallel(TwoTowers()), RANKS, example_input=example())


def test_a_modality_name_with_a_dot_is_a_clear_error_that_leaves_the_model_as_it_was():
    """Its name keys the adapter's submodules; torch raised a bare KeyError for it."""
    model = TwoTowers()
    with pytest.raises(ValueError, match=r"Wander: the modality names \['audio.mfcc'\]"):
        Wander(
            model,
            RANKS,
            example_input=example(),
            target_modules={"text": "text_net", "audio.mfcc": "audio_net"},
            fusion_module="mixer",
            num_fused_tokens=1,
        )
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_an_attention_mask_that_is_no_padding_mask_is_left_alone():
    """An encoder called with a causal ``[T, T]`` ``attention_mask``: no padding mask is read
    from it, and no warning says one could not be applied (it did)."""
    from tests.helpers import CausalMaskModel

    batch = make_batch()
    torch.manual_seed(0)
    model = CausalMaskModel({m: batch[m].shape[-1] for m in batch.modalities})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wander = Wander(model, RANKS, example_input=batch)
        wander(batch).sum().backward()
