import torch
from torch import nn

from wander import Wander, inspect_targets

from .conftest import PlainModel


def test_contract_model_targets_found_called_once_with_shapes(base_model, batch):
    report = inspect_targets(base_model, batch)
    assert report.ok
    rows = {row.modality or row.role: row for row in report.rows}
    assert set(rows) == {"text", "audio", "vision", "fusion"}
    assert rows["text"].path == "encoders.text" and rows["text"].calls == 1
    assert rows["text"].output_shape == (4, 7, 8)  # [B, T_text, width]
    assert rows["fusion"].calls == 1 and rows["fusion"].output_shape[0] == 4
    table = str(report)
    assert "encoders.audio" in table and "[4, 4, 8]" in table
    # without an example: names and classes only
    assert inspect_targets(base_model).rows[0].calls is None


def test_bad_names_unused_and_repeated_modules_are_reported():
    model = PlainModel().train()
    text, audio = torch.randn(3, 5, 6), torch.randn(3, 5, 3)
    report = inspect_targets(
        model,
        (text, audio),
        target_modules={"text": "text_nett", "audio": "audio_net"},
        fusion_module="mixer",
    )
    assert not report.ok and model.training  # the mode it had
    text_row = report.rows[0]
    assert text_row.module is None and "text_net" in text_row.suggestions
    assert "no submodule 'text_nett' (closest: text_net" in text_row.problem
    assert report.rows[1].problem is None and report.rows[1].module == "GRU"

    class Twice(nn.Module):  # one encoder applied to both modalities, and a dead module
        def __init__(self):
            super().__init__()
            self.shared, self.unused, self.mix = nn.Linear(4, 4), nn.Linear(4, 4), nn.Identity()

        def forward(self, a, b):
            return self.mix(self.shared(a) + self.shared(b))

    x = torch.randn(2, 4)
    report = inspect_targets(
        Twice(), (x, x), target_modules={"a": "shared", "b": "unused"}, fusion_module="mix"
    )
    problems = [row.problem for row in report.rows]
    assert problems[0] == "called 2 times per forward pass (Wander keeps the last output)"
    assert problems[1] == "not called by the example forward pass"
    assert problems[2] is None
    assert "called 2 times" in str(report)


def test_inspection_changes_nothing(base_model, batch):
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    hooks = len(base_model.encoders.text._forward_hooks)
    inspect_targets(base_model, batch)
    assert len(base_model.encoders.text._forward_hooks) == hooks
    assert all(torch.equal(v, before[k]) for k, v in base_model.state_dict().items())
    # and Wander then wraps what it reported
    wander = Wander(base_model, {"bottleneck": 4, "feature": 1, "token": 1}, example_input=batch)
    assert wander.config.hidden_dims == {"text": 8, "audio": 8, "vision": 8}


def test_example_passes_keep_each_modules_own_mode(base_model, batch):
    """Wrapping and inspecting run the example in eval mode; after, every module is back in its
    own mode (``train(was_training)`` had put a BatchNorm frozen on purpose back in train mode,
    where it updates its statistics)."""
    base_model.train()
    base_model.encoders["text"].eval()  # e.g. a pretrained encoder kept frozen, dropout off
    modes = {n: m.training for n, m in base_model.named_modules()}
    inspect_targets(base_model, batch)
    assert {n: m.training for n, m in base_model.named_modules()} == modes
    Wander(base_model, (4, 2, 2), example_input=batch)
    assert {n: m.training for n, m in base_model.named_modules()} == modes


def test_a_model_without_the_contract_and_without_target_modules_is_not_ok():
    """With no ``target_modules`` and no ``encoders`` ModuleDict, Wander(model) has nothing to
    wrap: the report says so (it used to list the fusion module alone and call that ok)."""

    class NoContract(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_net, self.fusion = nn.Linear(4, 4), nn.Identity()

        def forward(self, x):
            return self.fusion(self.text_net(x))

    report = inspect_targets(NoContract(), (torch.randn(2, 4),))
    assert not report.ok
    assert report.rows[0].path == "encoders" and report.rows[0].calls is None
    assert "no `encoders` ModuleDict" in report.rows[0].problem
    assert "target_modules=" in str(report)
    assert report.rows[1].role == "fusion" and report.rows[1].problem is None
