"""Under torch.distributed, metrics are computed on the predictions of every rank."""

import torch

from mmcore.metrics import MSAMetric, all_gather_cat, msa_regression_metrics
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
