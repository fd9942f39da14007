"""Under torch.distributed, metrics are computed on the predictions of every rank."""

import functools

import pytest
import torch

from mmcore.metrics import (
    ClassificationMetric,
    MSAMetric,
    all_gather_cat,
    classification_metrics,
    msa_regression_metrics,
)
from tests.distributed import run_ranks

PRED = torch.linspace(-3, 3, 11) * torch.tensor([1.0, -0.5] * 5 + [1.0])
TRUE = torch.linspace(-2.5, 2.8, 11)


def _shard_metrics(rank, world):
    # uneven shards: rank 0 holds 7 samples, rank 1 holds 4
    shard = slice(0, 7) if rank == 0 else slice(7, 11)
    metric = MSAMetric()
    metric(PRED[shard][:3], TRUE[shard][:3])
    metric(PRED[shard][3:], TRUE[shard][3:])
    gathered = all_gather_cat(torch.arange(7 if rank == 0 else 4) + 100 * rank)
    return metric.aggregate(), gathered.tolist()


def test_metrics_gather_uneven_shards_across_ranks():
    expected = msa_regression_metrics(PRED, TRUE)
    for metrics, gathered in run_ranks(_shard_metrics):
        assert metrics == expected  # every rank sees the metrics of all 11 predictions
        assert gathered == [0, 1, 2, 3, 4, 5, 6, 100, 101, 102, 103]


def test_collectives_run_where_the_backend_serves_tensors(monkeypatch):
    """NCCL has no CPU tensors: the metrics' CPU buffers are exchanged on the current GPU."""
    import torch.distributed as dist

    from mmcore import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for backend, device in [
        ("gloo", "cpu"),
        ("cpu:gloo,cuda:nccl", "cpu"),
        ("mpi", "cpu"),
        ("nccl", "cuda:1"),
    ]:
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collective_device() == torch.device(device), backend


def _sampler_shard_metrics(rank, world, with_index):
    """Evaluation as under DDP: a DistributedSampler pads 11 samples to 12 (one repeated)."""
    sampler = torch.utils.data.DistributedSampler(range(11), world, rank, shuffle=False)
    index = torch.tensor(list(sampler))
    metric = MSAMetric()
    for part in index.split(4):
        metric(PRED[part], TRUE[part], index=part if with_index else None)
    return metric.aggregate()


@pytest.mark.parametrize("with_index", [True, False])
def test_samples_a_distributed_sampler_repeats_count_once_given_their_index(with_index):
    expected = msa_regression_metrics(PRED, TRUE)
    results = run_ranks(functools.partial(_sampler_shard_metrics, with_index=with_index))
    for metrics in results:
        # with the indices, the metrics of the 11 samples (gathered in another order: equal to
        # rounding); without, one sample counts twice
        same = all(metrics[k] == pytest.approx(v, rel=1e-12) for k, v in expected.items())
        assert same == with_index


def test_index_deduplicates_and_is_checked():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 0])
    metric = ClassificationMetric()
    metric(logits[:2], labels[:2], index=torch.tensor([0, 1]))
    metric(logits[2:], labels[2:], index=torch.tensor([2, 0]))  # sample 0 again
    assert metric.aggregate() == classification_metrics(logits[:3], labels[:3])
    with pytest.raises(ValueError, match="with every batch or with none"):
        metric(logits, labels)
    with pytest.raises(ValueError, match="3 entries for 4 samples"):
        metric(logits, labels, index=torch.arange(3))
    with pytest.raises(TypeError, match="integer sample indices"):
        metric(logits, labels, index=torch.ones(4))
    metric.reset()
    metric(logits, labels)  # after reset, batches without indices again
    assert metric.aggregate() == classification_metrics(logits, labels)


def _rank_zero_evaluates_alone(rank, world):
    if rank != 0:
        return None  # this rank evaluates nothing, as in `if rank == 0: evaluate()`
    metric = MSAMetric()
    metric(PRED, TRUE)
    return metric.aggregate(sync=False)


def test_one_rank_can_aggregate_alone_inside_a_process_group():
    assert run_ranks(_rank_zero_evaluates_alone, timeout=60) == [
        msa_regression_metrics(PRED, TRUE),
        None,
    ]
