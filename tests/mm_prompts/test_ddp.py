"""MPLMM under torch DDP (2 CPU processes, gloo), each rank with its own missing cases.

Each sample picks its missing-type and missing-signal prompts, so a rank whose batch lacks a
case would leave that case's prompts unused, and DDP without ``find_unused_parameters`` would
wait for their gradients for ever (ecosystem notes §4). MPLMM selects with ``torch.where``, so
every trainable parameter takes part in every step (with a zero gradient where unused).
"""

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from mm_prompts import MPLMM, MulTBackbone, MulTConfig, apply_case
from mmcore import ModalityBatch
from tests.distributed import run_ranks

DIMS, LENS = {"text": 4, "audio": 5, "vision": 3}, {"text": 3, "audio": 4, "vision": 2}
#: rank 0 sees only complete samples, rank 1 only samples missing text and audio
CASES = (0b111, 0b100)


def _batch(seed, case):
    g = torch.Generator().manual_seed(seed)
    batch = ModalityBatch(
        {m: torch.randn(6, LENS[m], d, generator=g) for m, d in DIMS.items()},
        target=torch.randn(6, generator=g),
    )
    return apply_case(batch, case)


def _model():
    torch.manual_seed(0)  # the same weights on every rank
    cfg = MulTConfig(DIMS, d=8, num_heads=2, cross_layers=1, memory_layers=1, dropout=0.0)
    return MPLMM(MulTBackbone(cfg), LENS, prompt_length=2)


def _train(rank, world):
    model = _model()
    ddp = DDP(model)  # find_unused_parameters=False: every parameter must get a gradient
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=0.05)
    batch = _batch(rank, CASES[rank])
    for _ in range(3):
        opt.zero_grad()
        (ddp(batch).squeeze(-1) - batch.target).pow(2).mean().backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_alone():
    """One process on both ranks' batches: DDP averages the ranks' mean-loss gradients."""
    model = _model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=0.05)
    batches = [_batch(rank, case) for rank, case in enumerate(CASES)]
    for _ in range(3):
        opt.zero_grad()
        losses = [(model(b).squeeze(-1) - b.target).pow(2).mean() for b in batches]
        (sum(losses) / len(losses)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_ranks_with_different_missing_cases_stay_identical_and_equal_one_process():
    s0, s1 = run_ranks(_train)
    alone = _train_alone()
    assert s0.keys() == s1.keys() == alone.keys()
    for name in s0:
        torch.testing.assert_close(s0[name], s1[name], msg=name)
        torch.testing.assert_close(s0[name], alone[name], msg=name)
    # the prompts of a case only rank 1 has trained on every rank
    before = _model()
    assert not torch.equal(s0["signal_miss.text"], before.signal_miss["text"])
