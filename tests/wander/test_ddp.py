"""Wander under torch DDP (2 CPU processes, gloo): only trainable parameters are synchronised."""

import functools

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.backbones import LateFusionModel
from mmcore import ModalityBatch
from tests.distributed import run_ranks
from tests.wander.conftest import SkipsAbsent, make_batch
from wander import Wander, get_wander, inject_wander


def _train(rank, world, injected):
    batch = make_batch(seed=0)
    torch.manual_seed(0)  # same base and adapter on every rank
    model = LateFusionModel.from_batch(batch, 1, width=8, num_heads=2, dropout=0.0).eval()
    if injected:  # DDP wraps the user's own model, the adapter inside it
        ddp = DDP(inject_wander(model, (4, 2, 3), example_input=batch))
        wander = get_wander(model)
    else:
        wander = Wander(model, (4, 2, 3), example_input=batch)
        ddp = DDP(wander)
    registered = sum(p.numel() for p in ddp.parameters() if p.requires_grad)
    opt = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=0.05)
    local = make_batch(seed=10 + rank)  # different data per rank
    for _ in range(3):
        opt.zero_grad()
        (ddp(local).squeeze(-1) - local.target).pow(2).mean().backward()
        opt.step()
    state = {k: v.clone() for k, v in wander.adapter_state_dict().items()}
    return registered, wander.trainable_parameters()[0], state


@pytest.mark.parametrize("injected", [False, True], ids=["wrapped", "injected"])
def test_ddp_keeps_ranks_identical(injected):
    (reg0, trainable0, s0), (_, _, s1) = run_ranks(functools.partial(_train, injected=injected))
    assert reg0 == trainable0
    assert s0.keys() == s1.keys()
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], msg=k)
    # and training moved the adapter away from its (centered) initial weights
    assert not torch.equal(s0["adapter.down.text.weight"], s0["adapter.anchor__down__text__weight"])


def _train_skipping(rank, world, output):
    """Rank 0's second batch lacks modality ``c`` and its model skips that encoder."""
    dims = {"a": 4, "b": 5, "c": 3}
    g = torch.Generator().manual_seed(rank)
    full = ModalityBatch({m: torch.randn(6, d, generator=g) for m, d in dims.items()})
    lacking = ModalityBatch({m: full[m] for m in ("a", "b")})
    torch.manual_seed(1)
    wander = Wander(
        SkipsAbsent(dims, skip_absent=True), (4, 2, 3), example_input=full, output=output
    )
    ddp = DDP(wander)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        opt.zero_grad()
        ddp(lacking if (rank, step) == (0, 1) else full).square().sum().backward()
        opt.step()
    return {k: v.clone() for k, v in wander.adapter_state_dict().items()}


@pytest.mark.parametrize("output", ["fused", "residual"])
def test_ddp_with_a_model_that_skips_an_absent_encoder(output):
    """Every adapter parameter gets a gradient (zero where the modality was skipped), so DDP
    without ``find_unused_parameters`` reduces them all and the ranks stay identical."""
    s0, s1 = run_ranks(functools.partial(_train_skipping, output=output))
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], msg=k)
