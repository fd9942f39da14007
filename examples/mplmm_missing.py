"""MPLMM: a model trained on complete data, made robust to missing modalities with prompts.

A MulT-style backbone is trained on UCI mfeat with all six modalities (each a one-step
sequence). Tested with modalities missing (zero-filled), it degrades. MPLMM then trains its
prompts and small parts on the frozen backbone, with 70% of the training samples missing a
random subset of their modalities, and is tested again, per missing case. The
``mplmm-uci-missing`` benchmark task compares it with modality dropout, mean substitution and
missing-aware prompts over seeds and all 63 cases.

    uv run python examples/mplmm_missing.py
"""

from __future__ import annotations

import torch
from mfeat import accuracy, fit, load_mfeat, parse_args

from mm_prompts import MPLMM, MulTBackbone, MulTConfig, apply_case, simulate_missing
from mmcore import ModalityBatch


def as_sequences(batch: ModalityBatch) -> ModalityBatch:
    """Each ``[N, D]`` modality as a one-step sequence ``[N, 1, D]`` (MulT's input)."""
    return batch.replace(inputs={m: x.unsqueeze(1) for m, x in batch.inputs.items()})


def main() -> None:
    """Run the example (``--quick``: a smoke test)."""
    args = parse_args(__doc__)
    epochs = (1, 1) if args.quick else (10, 20)

    torch.manual_seed(args.seed)
    data = {k: as_sequences(v) for k, v in load_mfeat(args.seed).items()}
    train, test = data["train"], data["test"]
    dims = {m: train[m].shape[-1] for m in train.modalities}
    config = MulTConfig(dims, out_dim=10, d=16, num_heads=2, cross_layers=1, memory_layers=1)
    backbone = MulTBackbone(config)
    fit(backbone, train, epochs[0])  # complete data

    model = MPLMM(backbone, dict.fromkeys(dims, 1), prompt_length=4)  # freezes the backbone
    generator = torch.Generator().manual_seed(args.seed)
    fit(
        model,
        train,
        epochs[1],
        lr=3e-3,
        prepare=lambda batch: simulate_missing(batch, rate=0.7, generator=generator)[0],
    )
    trained, total = model.trainable_parameters()
    print(f"MPLMM trains {trained} parameters ({100 * trained / total:.1f}% of the backbone's)")

    print(f"{'present':24s} {'backbone':>9s} {'MPLMM':>7s}   (test accuracy, %)")
    modalities = list(train.modalities)
    cases = {"all six": 2 ** len(modalities) - 1}
    cases.update({f"{m} only": 1 << i for i, m in enumerate(modalities)})
    for name, case in cases.items():
        # the backbone reads missing modalities as zeros; MPLMM also reads the presence masks
        tested = apply_case(test, case)
        print(f"{name:24s} {accuracy(backbone, tested):9.1f} {accuracy(model, tested):7.1f}")


if __name__ == "__main__":
    main()
