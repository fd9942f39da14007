"""Wander on real data: adapt a frozen six-modality model to new classes from a few labels.

A late-fusion model is trained on UCI mfeat digits 0-4, then adapted to digits 5-9 from 5
labelled digits per class, twice from the same weights: training the head alone, and with
Wander (its adapter fuses the six modalities; the head trains too, the rest stays frozen).
The adapter is then saved on its own and attached to a fresh copy of the base model.

The frozen features of this small model already separate the new digits well, so the head
alone is strong here and the two end close; the ``wander-uci-transfer`` benchmark task
compares Wander with full fine-tuning, LoRA and a Houlsby adapter over seeds.

    uv run python examples/wander_transfer.py
"""

from __future__ import annotations

import copy
import tempfile

import torch
from mfeat import LateFusion, accuracy, dims_of, fit, load_mfeat, parse_args

from mmcore import ModalityBatch
from wander import Wander


def classes(batch: ModalityBatch, digits: range, shots: int | None = None) -> ModalityBatch:
    """The samples of ``digits`` (relabelled from 0), the first ``shots`` of each if given."""
    target = batch.require_target()
    keep = [torch.nonzero(target == d).squeeze(1)[:shots] for d in digits]
    subset = batch.select(torch.cat(keep))
    return subset.replace(target=subset.require_target() - digits.start)


def trainable(model: torch.nn.Module) -> int:
    """The number of parameters that train."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    """Run the example (``--quick``: a smoke test)."""
    args = parse_args(__doc__)
    epochs = (2, 5) if args.quick else (20, 60)

    torch.manual_seed(args.seed)
    data = load_mfeat(args.seed)
    old, new = range(0, 5), range(5, 10)
    base = LateFusion(dims_of(data["train"]), classes=5)
    fit(base, classes(data["train"], old), epochs[0])
    print(f"base model, digits 0-4: {accuracy(base, classes(data['test'], old)):.1f}% test")

    few = classes(data["train"], new, shots=5)  # 25 labelled samples
    test = classes(data["test"], new)
    results: dict[str, tuple[float, int]] = {}  # accuracy, trainable parameters
    head_only = copy.deepcopy(base)
    head_only.head.reset_parameters()
    head_only.requires_grad_(False).head.requires_grad_(True)
    fit(head_only, few, epochs[1], lr=1e-2)
    results["head only"] = accuracy(head_only, test), trainable(head_only)

    model = copy.deepcopy(base)
    model.head.reset_parameters()
    wander = Wander(
        model,
        ranks={"bottleneck": 4, "feature": 1, "token": 1},
        example_input=few,
        # each encoder's hidden layer (its GELU's output), where the 128 features are not yet
        # squeezed into the 32 tuned to digits 0-4
        target_modules={m: f"encoders.{m}.1" for m in model.encoders},
        num_fused_tokens=1,
        bias_augment=True,
        interaction_init=0.1,
    )
    fit(wander, few, epochs[1], lr=3e-3)
    results["Wander + head"] = accuracy(wander, test), trainable(wander)

    print(
        f"digits 5-9 from {few.batch_size} labels ({sum(p.numel() for p in base.parameters())} "
        "base parameters):"
    )
    for name, (acc, n) in results.items():
        print(f"  {name:14s} {acc:5.1f}% test, {n} trainable parameters")

    with tempfile.TemporaryDirectory() as folder:
        wander.save_pretrained(folder)  # adapter_config.json + the adapter and head weights
        fresh = copy.deepcopy(base)
        again = Wander.from_pretrained(fresh, folder)
        same = torch.equal(again.eval()(test), wander.eval()(test))
    print(f"saved and loaded onto a fresh base model: same outputs = {same}")


if __name__ == "__main__":
    main()
