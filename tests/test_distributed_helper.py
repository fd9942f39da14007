"""The DDP tests' process runner: a deadlock is a failure that says where, not a stuck suite."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks


def _sum_of_ranks(rank, world):
    total = torch.tensor(float(rank))
    dist.all_reduce(total)
    return total.item()


def _rank_zero_waits_alone(rank, world):
    if rank == 0:
        dist.barrier()  # rank 1 never enters it
    return rank


def test_every_rank_returns_its_result():
    assert run_ranks(_sum_of_ranks) == [1.0, 1.0]


def test_a_collective_that_one_rank_never_enters_times_out_on_the_waiting_rank():
    with pytest.raises(AssertionError, match="rank 0 failed") as err:
        run_ranks(_rank_zero_waits_alone, timeout=8)
    assert "_rank_zero_waits_alone" in str(err.value)  # the traceback names the function
