"""Wander under torch DDP (2 CPU processes, gloo): only trainable parameters are synchronised."""

import functools

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.backbones import LateFusionModel
from tests.distributed import run_ranks
from tests.wander.conftest import make_batch
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
