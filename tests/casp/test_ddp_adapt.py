"""CASP.adapt under DDP (2 gloo processes): ranks adapt their own shards and stay identical."""

import functools

import pytest
import torch
from torch import nn

from casp import CASP, norm_parameters
from mmcore import ModalityBatch
from tests.distributed import run_ranks

FAST = {"epochs_ca": 2, "snapshot_every": 1, "epochs_pl": 1, "keep_ratio": 0.5, "batch_size": 8}


class _Net(nn.Module):
    """Two encoders, a fusion and a head (no dropout: the ranks' runs are exact), normalised by
    LayerNorm, or BatchNorm whose running statistics each rank updates from its own batches."""

    def __init__(self, norm=nn.LayerNorm):
        super().__init__()
        self.encoders = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(d, 6), norm(6)) for m, d in (("a", 5), ("b", 4))}
        )
        self.fusion = nn.Sequential(nn.Linear(12, 6), norm(6))
        self.head = nn.Linear(6, 1)

    def forward(self, batch):
        feats = torch.cat([self.encoders[m](batch[m]) for m in ("a", "b")], dim=-1)
        return self.head(self.fusion(feats))


def _shard(rank, n=16):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own target samples
    shift = torch.tensor(1.5)
    return ModalityBatch(
        {"a": torch.randn(n, 5, generator=g) + shift, "b": torch.randn(n, 4, generator=g)}
    )


def _adapt(rank, world, distributed, sizes=(16, 16), norm=nn.LayerNorm):
    torch.manual_seed(0)  # the same source model on every rank
    casp = CASP(_Net(norm).eval(), distributed=distributed, **FAST)
    report = casp.adapt(_shard(rank, sizes[rank]))
    state = [t.detach().clone() for t in (*norm_parameters(casp.model), *casp.model.buffers())]
    return state, len(report.kept_indices), report.contrastive_losses


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.BatchNorm1d])
def test_ranks_adapt_their_shards_in_step(norm):
    (p0, k0, l0), (p1, k1, l1) = run_ranks(functools.partial(_adapt, distributed=True, norm=norm))
    for a, b in zip(p0, p1, strict=True):  # weights, and BatchNorm's running statistics
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert k0 == k1 == 8  # the stablest half of each rank's 16 samples
    assert l0 == pytest.approx(l1)  # one NT-Xent over both ranks' embeddings
    torch.manual_seed(0)
    source = [p.detach() for p in norm_parameters(_Net(norm))]
    assert any(not torch.equal(a, s) for a, s in zip(p0, source, strict=True))
    if norm is nn.LayerNorm:
        # without distributed=True each process adapts on its own shard: the ranks drift apart
        (q0, _, _), (q1, _, _) = run_ranks(functools.partial(_adapt, distributed=False))
        assert any(not torch.allclose(a, b) for a, b in zip(q0, q1, strict=True))


def _unequal(rank, world):
    try:
        _adapt(rank, world, distributed=True, sizes=(16, 12))
    except ValueError as err:
        return str(err)
    return None


def test_shards_of_different_sizes_are_refused_on_every_rank():
    errors = run_ranks(_unequal)
    assert all(e is not None and "hold [16, 12] samples" in e for e in errors)


def _nan_on_rank_one(rank, world):
    torch.manual_seed(0)
    casp = CASP(_Net().eval(), distributed=True, **FAST)
    shard = _shard(rank)
    if rank == 1:
        shard = shard.replace(
            inputs={**shard.inputs, "a": shard["a"].index_fill(0, torch.tensor([2]), float("nan"))}
        )
    try:
        casp.adapt(shard)
    except ValueError as err:
        return str(err)
    return None


def test_non_finite_source_predictions_on_one_rank_stop_every_rank():
    """Each rank checks its own shard; the decision is shared, so no rank waits on the other."""
    errors = run_ranks(_nan_on_rank_one)
    assert errors[1] is not None and "1 of the 16 samples (the first at index 2)" in errors[1]
    assert errors[0] is not None and "another rank's shard" in errors[0]


def _rank_zero_alone(rank, world):
    if rank != 0:
        return None  # the other rank does no TTA at all, as in `if rank == 0: casp.adapt(...)`
    return _adapt(rank, world, distributed=False)[1]


def test_a_single_rank_adapts_alone_inside_a_process_group():
    """The default never communicates: rank 0 adapting alone does not wait for the others."""
    assert run_ranks(_rank_zero_alone, timeout=60) == [8, None]


def test_distributed_needs_a_process_group_and_forbids_what_cannot_be_shared():
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        CASP(_Net(), distributed=True, **FAST).adapt(_shard(0))
    with pytest.raises(ValueError, match="does not support select_by='target_validation'"):
        CASP(_Net(), distributed=True, select_by="target_validation", **FAST)
    with pytest.raises(RuntimeError, match="online TTA\\) is single-process"):
        CASP(_Net(), distributed=True, **FAST)(_shard(0))


def _sgd(self):
    # SGD, not CASP's Adam: Adam's first step divides by |g|, so float-rounding differences in a
    # near-zero gradient would become visible steps, and the runs would differ by more than
    # the order in which the ranks' sums are taken
    return torch.optim.SGD(self.params, lr=0.05)


_WHOLE = {**FAST, "keep_ratio": 1.0, "epochs_pl": 2}  # every sample kept: one selection


def _adapt_half_in_one_batch(rank, world):
    CASP._optimizer = _sgd  # this worker process only
    torch.manual_seed(0)
    casp = CASP(_Net().eval(), distributed=True, **{**_WHOLE, "batch_size": 16})
    report = casp.adapt(_shard(rank))
    return [p.detach().clone() for p in norm_parameters(casp.model)], report


def test_two_ranks_adapt_as_one_process_on_both_shards(monkeypatch):
    # each rank's batch is its whole shard, one process's batch is both shards: the gathered
    # NT-Xent, the averaged gradients and the pseudo-label losses are then the same numbers
    monkeypatch.setattr(CASP, "_optimizer", _sgd)
    torch.manual_seed(0)
    casp = CASP(_Net().eval(), **{**_WHOLE, "batch_size": 32})
    report = casp.adapt(ModalityBatch.concat([_shard(0), _shard(1)]))
    single = [p.detach() for p in norm_parameters(casp.model)]
    ranks = run_ranks(_adapt_half_in_one_batch)
    for params, rank_report in ranks:
        for a, b in zip(params, single, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert rank_report.contrastive_losses == pytest.approx(report.contrastive_losses)
    # each rank logs its own shard's pseudo-label loss; their mean is the whole's
    mean_pl = [sum(x) / 2 for x in zip(*(r.pseudo_label_losses for _, r in ranks), strict=True)]
    assert mean_pl == pytest.approx(report.pseudo_label_losses, rel=1e-4)
    torch.manual_seed(0)
    source = [p.detach() for p in norm_parameters(_Net())]
    assert any(not torch.allclose(a, s) for a, s in zip(single, source, strict=True))
