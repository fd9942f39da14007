"""Runs tasks × seeds, records every number with its context, survives crashing tasks.

``results.json`` is rewritten atomically after every seed, so an interrupted run keeps what it
finished, and ``resume=True`` (``python -m benchmarks run --resume RUN_DIR``) runs only the task
seeds it lacks. A task that raises is recorded as failed (error and traceback) and the others
still run.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.registry import TASKS, Profile, RunContext, Task
from mmcore import atomic_write, read_json, seed_everything

RESULTS_FILE = "results.json"


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, tensors and numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _check_record(task: Task, seed: int, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise TypeError(
            f"task '{task.name}' returned a {type(record).__name__}, not a dict record."
        )
    missing = [k for k in ("method", "dataset", "metrics") if k not in record]
    if missing:
        raise ValueError(f"task '{task.name}': a record lacks {missing}: {record}")
    if not isinstance(record["metrics"], dict) or not record["metrics"]:
        raise ValueError(f"task '{task.name}': record 'metrics' must be a non-empty dict.")
    return _clean(
        {
            "task": task.name,
            "method": record["method"],
            "dataset": record["dataset"],
            "seed": seed,
            "metrics": record["metrics"],
            "config": record.get("config", {}),
        }
    )


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON atomically."""
    with atomic_write(path) as f:
        json.dump(results, f, indent=1)


def load_results(run_dir: Path) -> dict[str, Any]:
    """The ``results.json`` of ``run_dir``.

    Raises:
        FileNotFoundError: there is none.
        ValueError: it is not JSON, or not a run's results (``meta`` and ``records``).
    """
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a benchmark run folder?")
    results = read_json(path, "benchmarks")
    if not {"meta", "records"} <= results.keys():
        raise ValueError(f"{path} is not a benchmark run's results (no 'meta' and 'records').")
    return results


def _completed(results: dict[str, Any]) -> set[tuple[str, int]]:
    """The ``(task, seed)`` pairs a run finished without failing."""
    if "completed" in results["meta"]:
        return {(task, seed) for task, seed in results["meta"]["completed"]}
    # a run written before "completed" was recorded: a pair with records finished
    return {(r["task"], r["seed"]) for r in results["records"]}


def _show_status(bar: tqdm, seed: int, status: str) -> None:
    """A task's progress line: the seed and what it is doing."""
    bar.set_postfix_str(f"seed {seed}: {status}")


def run_tasks(
    task_names: Sequence[str],
    *,
    profile: Profile,
    seeds: Sequence[int],
    out_dir: Path,
    data_root: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run each task for each seed; returns (and writes) the results dict.

    Args:
        task_names: registered task names, run in this order.
        profile: ``"quick"`` or ``"full"``.
        seeds: each task runs once per seed.
        out_dir: the run folder (``results.json``, and each task's ``work/<task>``).
        data_root: a folder with real data sets, passed to the tasks.
        resume: continue the run in ``out_dir``: keep its records and run only the
            ``(task, seed)`` pairs it did not finish (those that failed run again; their old
            failures are dropped). Its profile and data root must be the ones given.

    Returns:
        ``{"meta": ..., "records": [...], "failures": [...]}``; ``records`` hold ``task, method,
        dataset, seed, metrics, config``; ``failures`` hold ``task, seed, error, traceback``;
        ``meta["completed"]`` lists the ``[task, seed]`` pairs that finished.
    """
    if resume:
        results = _resumed(load_results(out_dir), task_names, profile, seeds, data_root)
    else:
        results = _new_results(task_names, profile, seeds, data_root)
    done = _completed(results)
    results["meta"]["completed"] = sorted([task, seed] for task, seed in done)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    for name in task_names:
        task = TASKS[name]
        todo = [seed for seed in seeds if (name, seed) not in done]
        if not todo:
            continue
        start = time.perf_counter() - results["meta"]["task_seconds"].get(name, 0.0)
        bar = tqdm(todo, desc=name, unit="seed", dynamic_ncols=True)
        for seed in bar:
            ctx = RunContext(
                seed=seed,
                profile=profile,
                data_root=data_root,
                work_dir=out_dir / "work" / name,
                progress=functools.partial(_show_status, bar, seed),
            )
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
            try:
                seed_everything(seed)
                # all checked before any is kept: a bad record leaves none of the seed's behind
                records = [_check_record(task, seed, r) for r in task.run(ctx)]
                results["records"].extend(records)
                results["meta"]["completed"].append([name, seed])
            except Exception as err:  # a failing task must not stop the others
                results["failures"].append(
                    {
                        "task": name,
                        "seed": seed,
                        "error": f"{type(err).__name__}: {err}",
                        "traceback": traceback.format_exc(),
                    }
                )
                tqdm.write(f"[{name}] seed {seed} failed: {type(err).__name__}: {err}")
            results["meta"]["task_seconds"][name] = round(time.perf_counter() - start, 2)
            write_results(path, results)
        bar.close()
    results["meta"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_results(path, results)
    return results


def _resumed(
    results: dict[str, Any],
    task_names: Sequence[str],
    profile: Profile,
    seeds: Sequence[int],
    data_root: Path | None,
) -> dict[str, Any]:
    """``results`` of an earlier run, ready to go on with ``task_names`` × ``seeds``."""
    meta = results["meta"]
    root = str(data_root) if data_root else None
    if meta["profile"] != profile or meta.get("data_root") != root:
        raise ValueError(
            f"cannot resume a run of profile {meta['profile']!r}, data root "
            f"{meta.get('data_root')!r} with profile {profile!r}, data root {root!r}: its "
            "records would mix two settings."
        )
    done = _completed(results)
    rerun = {(task, seed) for task in task_names for seed in seeds} - done
    # what is run again starts clean: its failures go, and so would any stray records of it
    results["failures"] = [f for f in results["failures"] if (f["task"], f["seed"]) not in rerun]
    results["records"] = [r for r in results["records"] if (r["task"], r["seed"]) not in rerun]
    meta["tasks"] = list(dict.fromkeys([*meta["tasks"], *task_names]))
    meta["seeds"] = sorted({*meta["seeds"], *seeds})
    meta.setdefault("resumed", []).append(datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta.pop("finished", None)
    return results


def _new_results(
    task_names: Sequence[str], profile: Profile, seeds: Sequence[int], data_root: Path | None
) -> dict[str, Any]:
    return {
        "meta": {
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "profile": profile,
            "seeds": list(seeds),
            "tasks": list(task_names),
            "data_root": str(data_root) if data_root else None,
            "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "task_seconds": {},
        },
        "records": [],
        "failures": [],
    }
