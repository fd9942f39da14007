"""The per-case missing-aware prompt baseline (Lee et al., CVPR 2023)."""

import pytest
import torch

from benchmarks.baselines.missing_prompts import MissingAwarePrompts
from mm_prompts import MulTBackbone, MulTConfig, apply_case
from mmcore import ModalityBatch


def setup(seed=0):
    torch.manual_seed(seed)
    dims = {"text": 5, "audio": 3, "vision": 4}
    backbone = MulTBackbone(
        MulTConfig(dims, out_dim=1, d=4, num_heads=1, cross_layers=1, memory_layers=1, dropout=0.0)
    )
    g = torch.Generator().manual_seed(seed)
    batch = ModalityBatch({m: torch.randn(6, 3, d, generator=g) for m, d in dims.items()})
    return MissingAwarePrompts(backbone, prompt_length=2).eval(), batch


def test_only_prompts_projections_and_output_layer_train():
    model, _ = setup()
    trainable = {
        n.split(".")[0] if not n.startswith("backbone") else ".".join(n.split(".")[:2])
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"prompts", "backbone.proj", "backbone.out"}
    assert model.prompts.shape == (8, 3, 2, 8)  # 2^M cases, M branches, L, (M-1) d


def test_each_case_reads_its_own_prompt():
    model, batch = setup()
    text_only = apply_case(batch, 0b001)
    model(text_only).sum().backward()
    used = model.prompts.grad.abs().sum(dim=(1, 2, 3)) > 0
    assert used.tolist() == [i == 0b001 for i in range(8)]
    before = model(text_only)
    with torch.no_grad():
        # (random, not constant: a constant shift of a token is undone by layer norm)
        model.prompts[0b011] += torch.randn_like(model.prompts[0b011])  # another case's prompt
    torch.testing.assert_close(model(text_only), before)
    with torch.no_grad():
        model.prompts[0b001] += torch.randn_like(model.prompts[0b001])
    assert not torch.allclose(model(text_only), before)


def test_mixed_batch_equals_per_case_batches():
    model, batch = setup()
    cases = torch.tensor([1, 2, 3, 4, 5, 7])
    mixed = torch.cat([model(apply_case(batch.select([i]), int(c))) for i, c in enumerate(cases)])
    parts = [apply_case(batch.select([i]), int(c)) for i, c in enumerate(cases)]
    together = model(ModalityBatch.concat(parts))
    torch.testing.assert_close(together, mixed)


def test_bad_input_raises():
    model, batch = setup()
    with pytest.raises(ValueError, match="prompt_length must be >= 1"):
        MissingAwarePrompts(model.backbone, prompt_length=0)
    nothing = batch.with_missing("text").with_missing("audio").with_missing("vision")
    with pytest.raises(ValueError, match="every modality missing"):
        model(nothing)


def test_prompt_gradients_are_the_same_run_after_run():
    """Many samples share a case; their prompt gradients must sum in a fixed order (the
    indexing backward of ``prompts[cases]`` did not, on two CPU threads)."""
    torch.manual_seed(0)
    dims = {"text": 5, "audio": 3, "vision": 4}
    backbone = MulTBackbone(
        MulTConfig(dims, out_dim=1, d=16, num_heads=2, cross_layers=1, memory_layers=1, dropout=0.0)
    )
    model = MissingAwarePrompts(backbone, prompt_length=8).eval()
    g = torch.Generator().manual_seed(0)
    batch = ModalityBatch({m: torch.randn(512, 2, d, generator=g) for m, d in dims.items()})
    batch = apply_case(batch, torch.randint(1, 8, (512,), generator=g))

    def prompt_grad():
        model.zero_grad(set_to_none=True)
        model(batch).square().sum().backward()
        return model.prompts.grad.clone()

    first = prompt_grad()
    assert all(torch.equal(first, prompt_grad()) for _ in range(10))
