"""Run a function in several CPU processes joined by a gloo process group (for DDP tests)."""

import os
import pickle
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # plain pickle bytes: tensors are copied, not shared with a process about to exit
        queue.put((rank, pickle.dumps(fn(rank, world)), None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int = 2, timeout: float = 180.0) -> list:
    """``[fn(0, world), fn(1, world), ...]``, each in its own process (``fn`` picklable)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, value, error = queue.get(timeout=timeout)
        if error:
            raise AssertionError(f"rank {rank} failed:\n{error}")
        results[rank] = pickle.loads(value)
    for p in procs:
        p.join(timeout=60)
    return [results[r] for r in range(world)]
