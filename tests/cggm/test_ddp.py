"""CGGM under DDP (2 CPU processes, gloo): every rank scales identically."""

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from cggm import CGGM
from tests.cggm.test_modulator import make_model, vector_batch
from tests.distributed import run_ranks


def _train(rank, world):
    model = make_model(vector_batch(3))  # same seed: same weights on every rank
    cggm = CGGM(model, task="classification", num_outputs=3, rho=1.3, lam=0.2)
    ddp = DDP(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    history = []
    for step in range(3):
        batch = vector_batch(3, seed=100 * rank + step)  # different data per rank
        opt.zero_grad()
        (F.cross_entropy(ddp(batch), batch.target) + cggm.direction_loss()).backward()
        history.append(cggm.step(batch.target))
        opt.step()
    return history, model.state_dict(), cggm.classifiers.state_dict()


def test_ranks_stay_identical():
    (h0, w0, c0), (h1, w1, c1) = run_ranks(_train)
    assert h0 == h1  # B from all-reduced statistics
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], msg=k)
    for k in c0:
        torch.testing.assert_close(c0[k], c1[k], msg=k)
