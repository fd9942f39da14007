"""CASP after training: adapt a model to corrupted test data without labels.

Trains a late-fusion model on clean UCI mfeat, then corrupts the test split (noise on three
modalities, a drift on a fourth, a fifth missing), at three severities. For each, `CASP` adapts
a copy of the model on the unlabeled corrupted split (stage 1: contrast each batch with a copy
missing one modality; stage 2: train on the most stable pseudo-labels), and the script prints
the test accuracy before and after, and how accurate the kept pseudo-labels were against all of
them (the labels are used for that print only). On these data CASP's gains are small, within
a point (the package README gives the benchmark's figures over seeds); the
``casp-uci-corruption`` benchmark task compares it with Tent and self-training.

    uv run python examples/casp_shift.py
"""

from __future__ import annotations

import torch
from mfeat import LateFusion, accuracy, dims_of, fit, load_mfeat, parse_args
from torch import Tensor

from casp import CASP
from mmcore import ModalityBatch


def corrupt(batch: ModalityBatch, severity: int, seed: int) -> ModalityBatch:
    """Noise on fou/kar/zer (σ = 0.5·severity), a drift on pix, fac missing (zero-filled).

    The ``casp-uci-corruption`` benchmark task's corruption, copied so that this script needs
    only the installed packages.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    inputs = dict(batch.inputs)
    for m in ("fou", "kar", "zer"):
        inputs[m] = inputs[m] + 0.5 * severity * torch.randn(inputs[m].shape, generator=g)
    inputs["pix"] = inputs["pix"] * (1 + 0.25 * severity) + 0.25 * severity
    return batch.replace(inputs=inputs).with_missing("fac")


def share_right(probabilities: Tensor, target: Tensor) -> float:
    """Percentage of rows of ``probabilities [N, C]`` whose argmax is ``target [N]``."""
    return 100 * float((probabilities.argmax(dim=-1) == target).float().mean())


def main() -> None:
    """Run the example (``--quick``: a smoke test)."""
    args = parse_args(__doc__)
    data = load_mfeat(args.seed)
    torch.manual_seed(args.seed)
    model = LateFusion(dims_of(data["train"]), classes=10)  # its LayerNorms are what CASP adapts
    fit(model, data["train"], epochs=2 if args.quick else 25)
    print(f"clean test accuracy: {accuracy(model, data['test']):.1f}%")

    for severity in (1, 2) if args.quick else (1, 2, 3):
        test = corrupt(data["test"], severity, args.seed)
        target = test.require_target()
        unlabeled = test.replace(target=None)  # what a deployed model would see
        casp = CASP(
            model,  # a copy is adapted; `model` stays the source model
            task="classification",
            epochs_ca=2 if args.quick else 6,
            snapshot_every=2,
            keep_ratio=0.3,
            epochs_pl=1 if args.quick else 3,
            seed=args.seed,
        )
        report = casp.adapt(unlabeled)
        assert report.kept_indices is not None and report.pseudo_labels is not None
        adapted = casp.predict(unlabeled)  # [N, C] probabilities of the adapted model
        print(
            f"severity {severity}: source {accuracy(model, test):.1f}%, "
            f"CASP {share_right(adapted, target):.1f}%; "
            f"kept {len(report.kept_indices)} of {test.batch_size} pseudo-labels, "
            f"{share_right(report.pseudo_labels, target[report.kept_indices]):.1f}% right"
        )


if __name__ == "__main__":
    main()
