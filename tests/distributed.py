"""Run a function in several CPU processes joined by a gloo process group (for DDP tests).

The ranks meet through a file store in a fresh temporary folder, not a TCP port picked in
advance (another process could take that port before rank 0 binds it, and the other ranks would
then wait for a rendezvous that never comes). A rank that fails, in set-up or in ``fn``,
reports its traceback; one that dies without reporting fails the call at once.
"""

import os
import pickle
import queue as queue_module
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

#: set-up failures (joining the group) are retried this many times in all
ATTEMPTS = 2


def _entry(rank, world, store_file, fn, queue):
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store_file}", rank=rank, world_size=world
        )
    except Exception:
        queue.put((rank, None, "setup", traceback.format_exc()))
        return
    try:
        # plain pickle bytes: tensors are copied, not shared with a process about to exit
        queue.put((rank, pickle.dumps(fn(rank, world)), None, None))
    except Exception:
        queue.put((rank, None, "fn", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def _run_once(fn, world: int, timeout: float) -> tuple[list | None, str | None]:
    """``(results, None)``, or ``(None, traceback)`` when a rank could not join the group."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        procs = [
            ctx.Process(target=_entry, args=(r, world, store, fn, queue)) for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            results, deadline = {}, time.monotonic() + timeout
            while len(results) < world:
                try:
                    rank, value, phase, error = queue.get(timeout=1.0)
                except queue_module.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in results and not p.is_alive()]
                    if dead and queue.empty():
                        codes = [procs[r].exitcode for r in dead]
                        raise AssertionError(
                            f"ranks {dead} exited (codes {codes}) without reporting"
                        ) from None
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"no result from every rank in {timeout:.0f} s"
                        ) from None
                    continue
                if phase == "setup":
                    return None, f"rank {rank} could not join the process group:\n{error}"
                if phase == "fn":
                    raise AssertionError(f"rank {rank} failed:\n{error}")
                results[rank] = pickle.loads(value)
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)], None


def run_ranks(fn, world: int = 2, timeout: float = 180.0) -> list:
    """``[fn(0, world), fn(1, world), ...]``, each in its own process (``fn`` picklable)."""
    for _ in range(ATTEMPTS):
        results, setup_error = _run_once(fn, world, timeout)
        if results is not None:
            return results
    raise AssertionError(setup_error)
