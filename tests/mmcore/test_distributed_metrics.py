"""Under torch.distributed, metrics are computed on the predictions of every rank."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmcore.metrics import MSAMetric, all_gather_cat, msa_regression_metrics

PRED = torch.linspace(-3, 3, 11) * torch.tensor([1.0, -0.5] * 5 + [1.0])
TRUE = torch.linspace(-2.5, 2.8, 11)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # uneven shards: rank 0 holds 7 samples, rank 1 holds 4
        shard = slice(0, 7) if rank == 0 else slice(7, 11)
        metric = MSAMetric()
        metric(PRED[shard][:3], TRUE[shard][:3])
        metric(PRED[shard][3:], TRUE[shard][3:])
        gathered = all_gather_cat(torch.arange(7 if rank == 0 else 4) + 100 * rank)
        queue.put((rank, metric.aggregate(), gathered.tolist()))
    finally:
        dist.destroy_process_group()


def test_metrics_gather_uneven_shards_across_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (m, g)) for r, m, g in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = msa_regression_metrics(PRED, TRUE)
    for rank in (0, 1):
        metrics, gathered = results[rank]
        assert metrics == expected  # every rank sees the metrics of all 11 predictions
        assert gathered == [0, 1, 2, 3, 4, 5, 6, 100, 101, 102, 103]
