"""``inject_wander``: the adapter added to the model in place, seen by code for the bare model."""

import copy

import pytest
import torch

from benchmarks.backbones import LateFusionModel
from wander import Wander, WanderFusion, get_wander, inject_wander

from .conftest import LayerwiseModel, make_batch, train_steps

RANKS = {"bottleneck": 4, "feature": 2, "token": 3}


def test_inject_returns_the_model_with_the_adapter_as_a_submodule(base_model, batch):
    with torch.no_grad():
        base = base_model(batch)
    model = inject_wander(base_model, RANKS, example_input=batch)
    assert model is base_model and type(model) is LateFusionModel
    assert isinstance(model.wander, WanderFusion)
    wander = get_wander(model)
    assert wander.adapter is model.wander
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base, rtol=0, atol=0)  # identity at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.wander.named_parameters(prefix="wander")} | {
        n for n, _ in model.head.named_parameters(prefix="head")
    }
    # counted once, although the adapter is both the wrapper's and the model's
    assert wander.trainable_parameters() == (
        sum(p.numel() for p in model.parameters() if p.requires_grad),
        sum(p.numel() for p in model.parameters()),
    )
    assert any(k.startswith("wander.") for k in model.state_dict())

    (model(batch).squeeze(-1) - batch.target).pow(2).mean().backward()
    for n, p in model.wander.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in model.encoders.parameters())
    model.zero_grad()
    train_steps(model, batch)
    with torch.no_grad():
        assert not torch.allclose(model(batch), base)
        trained = model(batch)
        with wander.disable_adapter():
            assert not torch.allclose(model(batch), trained)
        for p in model.wander.parameters():  # the module the hooks run
            p.add_(0.5)
        assert not torch.allclose(model(batch), trained)


def test_state_dict_and_save_pretrained_round_trips(tmp_path, base_model, batch):
    model = inject_wander(base_model, RANKS, example_input=batch, cp_mode="true")
    train_steps(model, batch)
    with torch.no_grad():
        expected = model(batch)
    get_wander(model).save_pretrained(tmp_path)

    def fresh_base():
        torch.manual_seed(123)  # the same frozen encoders, another head
        fresh = LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2, dropout=0.0)
        fresh.encoders.load_state_dict(base_model.encoders.state_dict())
        return fresh.eval()

    # a whole-model checkpoint (adapter included) loads strictly into the same injection
    again = inject_wander(fresh_base(), RANKS, example_input=batch, cp_mode="true")
    again.load_state_dict(model.state_dict())
    loaded = inject_wander(fresh_base(), pretrained=tmp_path, adapter_name="loaded")
    assert get_wander(loaded, "loaded").load_report["missing_keys"] == []
    with torch.no_grad():
        torch.testing.assert_close(again(batch), expected)
        torch.testing.assert_close(loaded(batch), expected)


def test_adapters_injected_after_every_layer_train_through_the_models_parameters():
    batch = make_batch({"text": 6, "audio": 3}, {"text": 7, "audio": 4})
    torch.manual_seed(0)
    model = LayerwiseModel().eval()
    with torch.no_grad():
        base = model(batch)
    for layer in range(2):
        inject_wander(
            model,
            RANKS,
            adapter_name=f"wander_layer{layer}",
            example_input=batch,
            output="residual",
            target_modules={"text": f"text_layers.{layer}", "audio": f"audio_layers.{layer}"},
            fusion_module=f"meet.{layer}",
            modules_to_save=["head"] if layer == 0 else [],
        )
    # the second injection froze neither the first adapter nor the head the first one saves
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n in trainable} == {"head", "wander_layer0", "wander_layer1"}
    with torch.no_grad():
        torch.testing.assert_close(model(batch), base)
    train_steps(model, batch)
    for layer in range(2):
        adapter = getattr(model, f"wander_layer{layer}")
        assert all(torch.isfinite(p).all() for p in adapter.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())

    model.double()  # the adapters are submodules: they follow the model
    with torch.no_grad():
        assert model(batch.to(dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(RuntimeError, match="unwrap them first"):
        get_wander(model, "wander_layer0").unwrap()
    get_wander(model, "wander_layer1").unwrap()
    get_wander(model, "wander_layer0").unwrap()
    assert not hasattr(model, "wander_layer0") and not hasattr(model, "wander_layer1")
    assert all(p.requires_grad for p in model.parameters())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_a_deep_copy_of_an_injected_model_runs_its_own_adapter(base_model, batch):
    model = inject_wander(base_model, RANKS, example_input=batch)
    train_steps(model, batch)
    with torch.no_grad():
        expected = model(batch)
        copied = copy.deepcopy(model)
        assert get_wander(copied).adapter is copied.wander is not model.wander
        for p in copied.wander.parameters():
            p.add_(0.5)
        assert not torch.allclose(copied(batch), expected)
        torch.testing.assert_close(model(batch), expected)


def test_bad_injections_raise_and_leave_the_model_as_it_was(tmp_path, base_model, batch):
    flags = {n: p.requires_grad for n, p in base_model.named_parameters()}
    for name, match in (("head", "already has an attribute 'head'"), ("a.b", "identifier")):
        with pytest.raises(ValueError, match=match):
            inject_wander(base_model, RANKS, example_input=batch, adapter_name=name)
        assert {n: p.requires_grad for n, p in base_model.named_parameters()} == flags
        assert all(len(m._forward_hooks) == 0 for m in base_model.modules())
    with pytest.raises(ValueError, match="do not pass ranks"):
        inject_wander(base_model, RANKS, pretrained=tmp_path)
    wrapper = Wander(base_model, RANKS, example_input=batch)
    with pytest.raises(ValueError, match="is a Wander wrapper"):
        inject_wander(wrapper, RANKS)
    wrapper.unwrap()

    model = inject_wander(base_model.eval(), RANKS, example_input=batch, adapter_name="first")
    with pytest.raises(LookupError, match=r"no Wander adapter injected as 'wander'.*\['first'\]"):
        get_wander(model)
    with pytest.raises(RuntimeError, match="already injected as 'first'"):
        get_wander(model, "first").inject("second")


class _Outer(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner(batch)


def test_wrapping_a_model_keeps_adapters_injected_into_its_submodules_trainable(base_model, batch):
    inject_wander(base_model, RANKS, example_input=batch)
    outer = _Outer(base_model)
    second = Wander(
        outer,
        RANKS,
        example_input=batch,
        output="residual",
        target_modules={m: f"inner.encoders.{m}" for m in ("text", "audio", "vision")},
        fusion_module="inner.fusion",
        modules_to_save=[],
    )
    trainable = {n.split(".")[1] for n, p in outer.named_parameters() if p.requires_grad}
    assert trainable == {"wander", "head"}
    second(batch).sum().backward()
    assert all(p.grad is not None for p in base_model.wander.parameters())
    assert all(p.grad is not None for p in second.adapter.parameters())
