"""CASP's stage 2 rests on a claim: the samples whose prediction moved least during the
contrastive stage have the most reliable pseudo-labels. Checked under a planted shift."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.backbones import LateFusionModel
from benchmarks.data.generators import write_shift_pair
from benchmarks.data.pickles import load_mult_pickle
from benchmarks.data.uci import load_uci_mfeat
from benchmarks.tasks.casp_tta import corrupt, pseudo_label_quality
from benchmarks.training import accuracy, fit
from casp import CASP
from mmcore import ModalityBatch

STAGE1 = {"epochs_ca": 4, "snapshot_every": 2, "epochs_pl": 0}


def adapt_and_score(
    source: torch.nn.Module,
    target: ModalityBatch,
    task: str,
    seed: int,
    batch_size: int = 32,
    **selection,
) -> float:
    """Accuracy (classification) or MAE (regression) of the kept samples' pseudo-labels."""
    casp = CASP(source, task=task, batch_size=batch_size, seed=seed, **STAGE1, **selection)
    (value,) = pseudo_label_quality(casp.adapt(target), target, task).values()
    return value


def selections(source, target, task, seed, batch_size=32) -> dict[str, float]:
    """The stablest 30% (CASP), every sample, and the least stable 30% (the released rule)."""
    kept = {"stable": {}, "all": {"keep_ratio": 1.0}, "unstable": {"keep": "least_stable"}}
    return {
        name: adapt_and_score(
            source, target, task, seed, batch_size, **{"keep_ratio": 0.3, **options}
        )
        for name, options in kept.items()
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_stable_pseudo_labels_are_the_accurate_ones_on_corrupted_uci(seed):
    """Real UCI mfeat; at test time noise on three modalities, a drift on one, one zeroed.

    Measured on 4 seeds: the stablest 30% were 100% correct, all samples 92.5-96.5%, the least
    stable 30% 77.5-89%.
    """
    splits = load_uci_mfeat()
    torch.manual_seed(seed)
    source = LateFusionModel.from_batch(splits["train"], 10, width=32, hidden=64)
    fit(
        source,
        splits["train"],
        splits["valid"],
        loss_fn=F.cross_entropy,
        score_fn=accuracy,
        epochs=8,
        seed=seed,
    )
    got = selections(source, corrupt(splits["test"], 3, seed), "classification", seed)
    assert got["stable"] >= got["all"] + 0.02, got
    assert got["stable"] >= got["unstable"] + 0.05, got


def test_stable_pseudo_labels_have_the_lowest_error_under_a_mosi_shift(tmp_path):
    """MOSI-format source/target pairs with a planted feature shift (1.0), regression.

    Pooled over seeds 0-2 (batch 24, the casp-mosi-shift benchmark's). Per seed the effect is
    weaker than in classification. Measured on seeds 0-5 at batches 16, 24 and 32, the stablest
    30% had a lower pseudo-label MAE than all samples in 15 of 18 runs and than the least
    stable 30% in 17 of 18. The exceptions were seed 4 (about equal everywhere) and seed 0 at
    batch 32. The margins below depend on the torch build (kernels round differently, so the
    source models differ): stable vs all and vs least stable, 0.074 and 0.134 with torch 2.15,
    0.050 and 0.066 with torch 2.2 and 2.4; a selection that ignored stability would give
    about 0 for both.
    """
    lens = dict.fromkeys(("text", "audio", "vision"), 8)
    runs = []
    for seed in (0, 1, 2):
        source_path, target_path = write_shift_pair(
            tmp_path / f"pair{seed}", "mosi", shift=1.0, n=(300, 60, 300), seq_lens=lens, seed=seed
        )
        src, tgt = load_mult_pickle(source_path), load_mult_pickle(target_path)
        torch.manual_seed(seed)
        source = LateFusionModel.from_batch(src["train"], 1, width=16, num_layers=1, num_heads=2)
        fit(
            source,
            src["train"],
            src["valid"],
            loss_fn=lambda p, y: F.l1_loss(p.squeeze(-1), y),
            score_fn=lambda p, y: -float((p.squeeze(-1) - y).abs().mean()),
            epochs=8,
            seed=seed,
        )
        runs.append(selections(source, tgt["train"], "regression", seed, batch_size=24))
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    assert mean["stable"] <= mean["all"] - 0.03, runs
    assert mean["stable"] <= mean["unstable"] - 0.05, runs
