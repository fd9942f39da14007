import pytest
import torch
from torch import nn

import wander.functional
from benchmarks.backbones import LateFusionModel
from mmcore import ModalityBatch
from tests.helpers import tiny_bert


def make_batch(dims=None, lens=None, b=4, seed=0):
    dims = dims or {"text": 6, "audio": 3, "vision": 5}
    lens = lens or {"text": 7, "audio": 4, "vision": 5}
    g = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(b, lens[m], d, generator=g) for m, d in dims.items()}
    return ModalityBatch(inputs, target=torch.randn(b, generator=g))


def bert_text_model(folder):
    """A late-fusion model whose text encoder is a tiny random ``BertModel`` (saved to and
    loaded from ``folder``) beside a transformer audio encoder, and a batch with padded text."""
    batch = ModalityBatch(
        {"text": torch.randint(0, 30, (3, 6)), "audio": torch.randn(3, 4, 3)},
        target=torch.randn(3),
        padding_masks={"text": torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 6])},
    )
    model = LateFusionModel.from_batch(
        ModalityBatch({"audio": batch["audio"]}), 1, width=8, num_heads=2, dropout=0.0
    )
    model.encoders["text"] = tiny_bert(folder, vocab_size=30, hidden=8, max_len=10)
    model.fusion.modalities = ("text", "audio")
    model.head = nn.Linear(16, 1)
    return model.eval(), batch


def train_steps(model, batch, steps=3):
    """Adam on ``model``'s trainable parameters (a ``Wander`` wrapper or a bare model with an
    injected adapter: the same loop), squared error on ``batch``."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (model(batch).squeeze(-1) - batch.target).pow(2).mean().backward()
        opt.step()


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture
def base_model(batch):
    torch.manual_seed(0)
    return LateFusionModel.from_batch(batch, out_dim=1, width=8, num_heads=2, dropout=0.0).eval()


class PlainModel(nn.Module):
    """A model that does not follow the mmcore contract: positional tensors, own names."""

    def __init__(self):
        super().__init__()
        self.text_net = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.audio_net = nn.GRU(3, 8, batch_first=True)
        self.mixer = nn.Identity()
        self.classifier = nn.Linear(16, 2)

    def forward(self, text, audio):
        t = self.text_net(text)  # [B, T, 8]
        a, _ = self.audio_net(audio)  # [B, T, 8]
        mixed = self.mixer(torch.cat([t, a], dim=-1))  # [B, T, 16]
        return self.classifier(mixed[:, 0])


class _Meet(nn.Module):
    """Where the modalities' layer outputs meet: returns them as they are."""

    def forward(self, text, audio):
        return text, audio


class LayerwiseModel(nn.Module):
    """Two transformer towers run layer by layer, meeting after every layer (``meet.<l>``)."""

    def __init__(self, layers=2, d=8):
        super().__init__()
        self.text_in, self.audio_in = nn.Linear(6, d), nn.Linear(3, d)
        self.text_layers, self.audio_layers = (
            nn.ModuleList(
                nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
                for _ in range(layers)
            )
            for _ in range(2)
        )
        self.meet = nn.ModuleList(_Meet() for _ in range(layers))
        self.head = nn.Linear(2 * d, 1)

    def forward(self, batch):
        text, audio = self.text_in(batch["text"]), self.audio_in(batch["audio"])
        for text_layer, audio_layer, meet in zip(
            self.text_layers, self.audio_layers, self.meet, strict=True
        ):
            text, audio = meet(self.run_layer(text_layer, text), self.run_layer(audio_layer, audio))
        return self.head(torch.cat([text.mean(1), audio.mean(1)], dim=-1))

    def run_layer(self, layer, x):
        """One tower layer on ``x`` (subclasses change how it is called)."""
        return layer(x)


class MeanOfPresent(torch.nn.Module):
    """The mean of the features of the modalities each sample has (weights ``[B]`` each)."""

    def forward(self, feats, weights):
        w = torch.stack(weights).unsqueeze(-1)
        return (torch.stack(feats) * w).sum(0) / w.sum(0).clamp_min(1)


class SkipsAbsent(torch.nn.Module):
    """``skip_absent``: a modality the batch lacks is not encoded at all (``if m in batch``);
    ``zero_fill``: it is encoded from zeros, weighted 0; else every encoder runs on the batch
    and the presence masks weight the fusion."""

    def __init__(self, dims, skip_absent, zero_fill=False):
        super().__init__()
        torch.manual_seed(0)
        self.skip_absent, self.zero_fill = skip_absent, zero_fill
        self.encoders = torch.nn.ModuleDict({m: torch.nn.Linear(d, 8) for m, d in dims.items()})
        self.fusion = MeanOfPresent()
        self.head = torch.nn.Linear(8, 3)

    def forward(self, batch):
        feats, weights = [], []
        for m, encoder in self.encoders.items():
            if m in batch:
                feats.append(encoder(batch[m]))
                weights.append(batch.is_present(m).float())
            elif self.zero_fill:
                feats.append(encoder(torch.zeros(batch.batch_size, encoder.in_features)))
                weights.append(torch.zeros(batch.batch_size))
            elif not self.skip_absent:
                batch[m]  # the batch's KeyError
        return self.head(self.fusion(feats, weights))


@pytest.fixture(params=["saved", "recomputed"])
def projections(request, monkeypatch):
    """Both ways a fused kernel's backward gets the per-modality projections: saved by the
    forward (small shapes) or recomputed (large ones: here, every shape)."""
    if request.param == "recomputed":
        monkeypatch.setattr(wander.functional, "_SAVED_PROJECTIONS_MAX", 0)
    return request.param
