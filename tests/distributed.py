"""Run a function in several CPU processes joined by a gloo process group (for DDP tests).

The ranks meet through a file store in a fresh temporary folder, not a TCP port picked in
advance (another process could take that port before rank 0 binds it, and the other ranks would
then wait for a rendezvous that never comes). Joining is a phase of its own: a rank has joined
once ``init_process_group`` and a first barrier over the group returned, so a group whose
connections never came up fails in set-up, not inside ``fn``. A set-up failure or hang (the
environment's, not the code's under test) is retried; a failure or hang in ``fn`` is not.

A rank that fails reports its traceback; one that dies without reporting fails the call at once.
Each rank's result is delivered before it leaves the group: under load, torch 2.2's gloo
deadlocks in ``destroy_process_group`` now and then (8 runs in 60 on 2 cores), and a rank stuck
there after delivering is killed.
Collectives time out (gloo raises, with the rank's traceback, rather than block forever), and a
rank still running at the deadline has its Python stacks written to stderr before it is killed,
so that a hang says where it is.
"""

import datetime
import faulthandler
import os
import pickle
import queue as queue_module
import signal
import sys
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

#: set-up failures (joining the group) are retried this many times in all
ATTEMPTS = 2
#: seconds every rank has to join the group
JOIN_TIMEOUT = 60.0
#: seconds a rank that delivered its result has to leave the group before it is killed
TEARDOWN_TIMEOUT = 10.0


def _entry(rank, world, store_file, fn, queue, collective_timeout):
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        dist.barrier()  # the connections between every pair of ranks work
    except Exception:
        queue.put((rank, None, "setup", traceback.format_exc()))
        return
    queue.put((rank, None, "joined", None))
    try:
        # plain pickle bytes: tensors are copied, not shared with a process about to exit
        queue.put((rank, pickle.dumps(fn(rank, world)), None, None))
    except Exception:
        queue.put((rank, None, "fn", traceback.format_exc()))
    finally:
        # Delivered before the teardown: torch 2.2's gloo may deadlock in
        # destroy_process_group holding the GIL, which the queue's feeder thread needs.
        queue.close()
        queue.join_thread()
        dist.destroy_process_group()


def _dump_stacks(procs) -> str:
    """Each rank's state; every live rank first prints its Python stacks (``faulthandler``)."""
    states = []
    for rank, p in enumerate(procs):
        if p.is_alive():
            print(f"--- rank {rank} (pid {p.pid}) ---", file=sys.stderr, flush=True)
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(1.0)
        states.append(f"rank {rank}: pid {p.pid}, exit code {p.exitcode}")
    return "; ".join(states)


def _run_once(fn, world: int, timeout: float) -> tuple[list | None, str | None]:
    """``(results, None)``, or ``(None, reason)`` when a rank could not join the group."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        procs = [
            ctx.Process(target=_entry, args=(r, world, store, fn, queue, 0.75 * timeout))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        start = time.monotonic()
        joined: set[int] = set()
        results: dict = {}
        try:
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
                    waited = time.monotonic() - start
                    if len(joined) < world and waited > JOIN_TIMEOUT:
                        states = _dump_stacks(procs)
                        missing = sorted(set(range(world)) - joined)
                        return None, f"ranks {missing} did not join in {waited:.0f} s ({states})"
                    if waited > timeout:
                        states = _dump_stacks(procs)
                        raise AssertionError(
                            f"no result from ranks {sorted(set(range(world)) - set(results))} "
                            f"in {timeout:.0f} s ({states}; stacks on stderr)"
                        ) from None
                    continue
                if phase == "setup":
                    return None, f"rank {rank} could not join the process group:\n{error}"
                if phase == "joined":
                    joined.add(rank)
                    continue
                if phase == "fn":
                    raise AssertionError(f"rank {rank} failed:\n{error}")
                results[rank] = pickle.loads(value)
        finally:
            for p in procs:  # a rank stuck in the teardown, its result delivered, is killed
                p.join(timeout=TEARDOWN_TIMEOUT if len(results) == world else 1)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)], None


def run_ranks(fn, world: int = 2, timeout: float = 180.0) -> list:
    """``[fn(0, world), fn(1, world), ...]``, each in its own process (``fn`` picklable).

    ``timeout``: seconds for the whole run once started; each collective inside ``fn`` times
    out after three quarters of it.
    """
    for _ in range(ATTEMPTS):
        results, setup_error = _run_once(fn, world, timeout)
        if results is not None:
            return results
    raise AssertionError(setup_error)
