"""CGGM does what its paper builds it for on data with a planted imbalance."""

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from benchmarks.backbones import LateFusionModel
from cggm import CGGM
from mmcore import ModalityBatch


def imbalanced(n: int = 256, seed: int = 0) -> ModalityBatch:
    """Two modalities: ``strong`` shows the class almost noise-free, ``weak`` through noise."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (n,), generator=g)
    signal = F.one_hot(target, 3).float()
    distractors = torch.randn(n, 5, generator=g)
    strong = torch.cat([3 * signal, distractors], dim=1)
    noisy = 0.5 * signal + torch.randn(n, 3, generator=g)
    weak = torch.cat([noisy, torch.randn(n, 5, generator=g)], dim=1)
    return ModalityBatch({"strong": strong, "weak": weak}, target=target)


def train(seed: int, cggm_options: dict | None) -> tuple[LateFusionModel, list[dict]]:
    """Four epochs of SGD, jointly or with CGGM; returns the model and each step's ``B``."""
    data = imbalanced(seed=seed)
    torch.manual_seed(seed)
    model = LateFusionModel.from_batch(data, 3, width=8, hidden=16, head="linear", dropout=0.0)
    cggm = None
    if cggm_options is not None:
        cggm = CGGM(model, task="classification", num_outputs=3, lam=0.0, **cggm_options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator, history = torch.Generator().manual_seed(seed), []
    for _ in range(4):
        for batch in data.split(32, shuffle=True, generator=generator):
            opt.zero_grad()
            F.cross_entropy(model(batch), batch.target).backward()
            if cggm is not None:
                history.append(cggm.step(batch.target))
            opt.step()
    return model, history


def weak_probe(model: LateFusionModel, seed: int) -> float:
    """Test accuracy of a linear probe on the frozen ``weak`` encoder's features."""
    train_set, test_set = imbalanced(seed=seed), imbalanced(seed=100 + seed)
    with torch.no_grad():
        x_train = model.encode(train_set)["weak"].numpy()
        x_test = model.encode(test_set)["weak"].numpy()
    probe = LogisticRegression(max_iter=1000).fit(x_train, train_set.target.numpy())
    return probe.score(x_test, test_set.target.numpy())


def test_the_lagging_modality_gets_the_larger_coefficient():
    # smoothed scores: per-batch accuracy differences on 32 samples are mostly sampling noise
    # (unsmoothed, B swings between ~0 and ~1 from one step to the next)
    for seed in (0, 1):
        _, history = train(seed, {"rho": 1.0, "cls_lr": 1e-2, "smoothing": 0.8})
        early = history[: len(history) // 2]  # while the strong modality's classifier leads
        b_strong = sum(b["strong"] for b in early) / len(early)
        b_weak = sum(b["weak"] for b in early) / len(early)
        assert b_weak > b_strong + 0.1, (seed, b_strong, b_weak)


def test_the_weak_modality_encoder_learns_more_than_under_joint_training():
    options = {"rho": 2.0, "cls_lr": 1e-2, "smoothing": 0.8}
    gains = [
        weak_probe(train(seed, options)[0], seed) - weak_probe(train(seed, None)[0], seed)
        for seed in (0, 1)
    ]
    assert min(gains) > 0.005, gains
