"""HuggingFace ``Trainer`` on a model with an injected adapter (the README's recipe)."""

import inspect

import pytest
import torch
from torch import nn

from wander import Wander, get_wander, inject_wander

RANKS = {"bottleneck": 4, "feature": 2, "token": 2}


class KeywordModel(nn.Module):
    """A model called the way ``Trainer`` calls one: a keyword per dataset column."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"text": nn.Linear(6, 8), "audio": nn.Linear(3, 8)})
        self.fusion = nn.Identity()
        self.head = nn.Linear(8, 2)

    def forward(self, text, audio, labels=None):
        tokens = torch.cat([self.encoders["text"](text), self.encoders["audio"](audio)], dim=1)
        logits = self.head(self.fusion(tokens).mean(dim=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _dataset():
    g = torch.Generator().manual_seed(0)
    return [
        {
            "text": torch.randn(5, 6, generator=g),
            "audio": torch.randn(4, 3, generator=g),
            "labels": i % 2,
        }
        for i in range(16)
    ]


def _example():
    return {"text": torch.randn(2, 5, 6), "audio": torch.randn(2, 4, 3)}


def _trainer(model, folder):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    args = transformers.TrainingArguments(
        output_dir=str(folder),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_dataset())


def test_trainer_trains_the_injected_adapter_and_head_only(tmp_path):
    torch.manual_seed(0)
    model = inject_wander(KeywordModel(), RANKS, example_input=_example())
    assert list(inspect.signature(model.forward).parameters) == ["text", "audio", "labels"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(model, tmp_path / "run").train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert {n.split(".")[0] for n in trainable} == {"wander", "head"}

    get_wander(model).save_pretrained(tmp_path / "adapter")
    torch.manual_seed(1)
    fresh = KeywordModel()
    fresh.load_state_dict({k: v for k, v in before.items() if not k.startswith("wander.")})
    again = Wander.from_pretrained(fresh, tmp_path / "adapter")
    example = _example()
    torch.testing.assert_close(again(**example)["logits"], model(**example)["logits"])


def test_trainer_finds_no_columns_in_the_wrappers_signature(tmp_path):
    """Why the README sends ``Trainer`` users to ``inject_wander``: the wrapper's ``forward`` is
    ``(*args, **kwargs)``, and ``Trainer`` drops the columns its signature does not name."""
    wrapped = Wander(KeywordModel(), RANKS, example_input=_example())
    with pytest.raises(ValueError, match=r"(?i)columns|keys expected"):
        _trainer(wrapped, tmp_path / "run").train()
