"""Runs tasks × seeds, records every number with its context, survives crashing tasks.

``results.json`` is rewritten atomically after every seed, so an interrupted run keeps what it
finished. A task that raises is recorded as failed (error and traceback) and the others still run.
"""

from __future__ import annotations

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
from mmcore import atomic_write, seed_everything

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


def run_tasks(
    task_names: Sequence[str],
    *,
    profile: Profile,
    seeds: Sequence[int],
    out_dir: Path,
    data_root: Path | None = None,
) -> dict[str, Any]:
    """Run each task for each seed; returns (and writes) the results dict.

    Returns:
        ``{"meta": ..., "records": [...], "failures": [...]}``; ``records`` hold ``task, method,
        dataset, seed, metrics, config``; ``failures`` hold ``task, seed, error, traceback``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
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
    path = out_dir / RESULTS_FILE
    for name in task_names:
        task = TASKS[name]
        start = time.perf_counter()
        bar = tqdm(seeds, desc=name, unit="seed", dynamic_ncols=True)
        for seed in bar:
            ctx = RunContext(
                seed=seed,
                profile=profile,
                data_root=data_root,
                work_dir=out_dir / "work" / name,
                progress=lambda status, bar=bar, seed=seed: bar.set_postfix_str(
                    f"seed {seed}: {status}"
                ),
            )
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
            try:
                seed_everything(seed)
                records = task.run(ctx)
                results["records"].extend(_check_record(task, seed, r) for r in records)
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
