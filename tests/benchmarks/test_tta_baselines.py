"""The test-time adaptation baselines of the CASP tasks: Tent and naive self-training."""

import pytest
import torch
from torch import nn

from benchmarks.baselines.tta import SelfTraining, Tent
from mmcore import ModalityBatch


class Normed(nn.Module):
    def __init__(self, out_dim):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(d, 16), nn.LayerNorm(16)) for m, d in (("a", 6), ("b", 4))}
        )
        self.head = nn.Linear(32, out_dim)

    def forward(self, batch):
        return self.head(torch.cat([self.encoders[m](batch[m]) for m in self.encoders], -1))


def data(n=96, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    inputs = {"a": torch.randn(n, 6, generator=g) + 1.5, "b": torch.randn(n, 4, generator=g)}
    return ModalityBatch(inputs, target=torch.randint(0, classes, (n,), generator=g))


def norm_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}


@pytest.mark.parametrize("method", [Tent, SelfTraining])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_only_norm_parameters_move_the_source_is_untouched_and_labels_are_never_read(method, task):
    torch.manual_seed(0)
    source = Normed(3 if task == "classification" else 1)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    target = data()
    runs = []
    for labels in (target.target, torch.randint(0, 3, target.target.shape)):  # poisoned
        baseline = method(source, task, lr=1e-2, batch_size=32, seed=0)
        baseline.adapt(target.replace(target=labels))
        runs.append(baseline.model.state_dict())
    for k, v in source.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # adapted on a copy
    norms = norm_names(source)
    moved = {k for k, v in runs[0].items() if not torch.equal(v, before[k])}
    if method is SelfTraining and task == "regression":
        assert not moved  # its own predictions: zero L1 residuals (no dropout in this model)
    else:
        assert moved and all(k.rsplit(".", 1)[0] in norms for k in moved)
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[1][k], v, rtol=0, atol=0)


def test_tent_lowers_the_entropy_of_its_predictions():
    torch.manual_seed(0)
    source = Normed(3)
    target = data()

    def entropy(model):
        with torch.no_grad():
            p = model(target).softmax(-1)
        return -(p * p.log()).sum(-1).mean().item()

    tent = Tent(source, "classification", lr=1e-2, batch_size=32, epochs=3)
    tent.adapt(target)
    assert entropy(tent.model) < entropy(source) - 0.01


def test_self_training_fits_the_source_models_own_predictions():
    """Pseudo-labels are the source model's soft predictions on every sample: training on them
    from the source weights keeps the predicted classes (no label is read)."""
    torch.manual_seed(0)
    source = Normed(3)
    target = data()
    st = SelfTraining(source, "classification", lr=1e-2, batch_size=32)
    st.adapt(target)
    with torch.no_grad():
        agree = (st.model(target).argmax(-1) == source(target).argmax(-1)).float().mean()
    assert agree > 0.9


def test_a_model_without_normalisation_layers_is_refused():
    with pytest.raises(ValueError, match="normalisation"):
        Tent(nn.Linear(3, 2), "classification")
