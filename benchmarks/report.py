"""``report.md`` and PNG plots from a run's ``results.json``: mean ± std per method and data set."""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.registry import TASKS, Reference, Target
from benchmarks.runner import load_results
from mmcore import atomic_write

REPORT_FILE = "report.md"


def _slug(text: str) -> str:
    """A file-name-safe version of ``text`` (markdown image links break on spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def summarise(values: list[float | None]) -> tuple[float, float, int]:
    """``(mean, std, n)`` over the finite values; std is the sample std (0 when n = 1)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    arr = np.asarray(finite, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, len(arr)


def paired_deltas(records: list[dict], reference: list[dict], metric: str) -> list[float | None]:
    """Per-seed ``metric`` differences of ``records`` from ``reference`` (seeds both have)."""
    base = {r.get("seed"): r["metrics"].get(metric) for r in reference}
    out: list[float | None] = []
    for r in records:
        a, b = r["metrics"].get(metric), base.get(r.get("seed"))
        out.append(None if a is None or b is None else a - b)
    return out


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "—"
    if std == 0 and float(mean).is_integer() and abs(mean) >= 10:
        return f"{int(mean):,}"  # counts (e.g. parameters)
    digits = 4 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _cell(records: list[dict], metric: str, values: list[float | None]) -> str:
    """A table cell: :func:`summarise` of ``values`` (``metric``'s, or derived from it).

    It notes the seeds whose ``metric`` was recorded but not finite (NaN is saved as null).
    """
    mean, std, n = summarise(values)
    given = sum(metric in r["metrics"] for r in records)
    text = _fmt(mean, std, n)
    if 0 < n < given:
        text += f" (n={n}; {given - n} not finite)"
    elif n == 0 and given:
        text = f"not finite ({given})"
    return text


def group_records(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[dict]]]]:
    """``task → dataset → method → records``, keeping first-seen order."""
    grouped: dict[str, dict[str, dict[str, list[dict]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in records:
        grouped[r["task"]][r["dataset"]][r["method"]].append(r)
    return grouped


def _metric_order(task_name: str, methods: dict[str, list[dict]]) -> list[str]:
    task = TASKS.get(task_name)
    seen: list[str] = []
    for recs in methods.values():
        for r in recs:
            seen.extend(k for k in r["metrics"] if k not in seen)
    if task is None:
        return seen
    first = list(task.metrics or ())
    if task.primary_metric not in first:
        first.insert(0, task.primary_metric)
    return [m for m in first if m in seen] + (
        [] if task.metrics else [m for m in seen if m not in first]
    )


def _plot(
    task_name: str, dataset: str, methods: dict[str, list[dict]], metric: str, path: Path
) -> None:
    plt = pyplot()

    # rows without the metric (reference rows of other metrics) get no empty bar
    summaries = {m: summarise([r["metrics"].get(metric) for r in methods[m]]) for m in methods}
    names = [m for m, stat in summaries.items() if stat[2]]
    stats = [summaries[m] for m in names]
    # long method names wrap, so the bars keep most of the width
    labels = [textwrap.fill(name, width=34) for name in names]
    rows = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * rows + 0.15 * len(names) + 1.4))
    y = np.arange(len(names))
    means, stds = [s[0] for s in stats], [s[1] for s in stats]
    # positive figures close together (accuracies) are zoomed in on; the axis then does not
    # start at 0, so they are drawn as points, not bars whose lengths would mislead
    finite = [s[0] - s[1] for s in stats if s[2]]
    left = 0.0
    if finite and min(finite) > 0:
        left = max(0.0, min(finite) - 0.1 * (max(s[0] + s[1] for s in stats) - min(finite) + 1e-9))
    if left > 0:
        ax.errorbar(means, y, xerr=stds, fmt="o", color="#4C72B0", capsize=3)
        ax.set_xlim(left=left)
    else:
        ax.barh(y, means, xerr=stds, color="#4C72B0", capsize=3)
    ax.set_yticks(y, labels)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first method on top, as in the tables
    ax.set_xlabel(f"{metric} (mean ± std over seeds)")
    # over the whole figure, not the axes (which long labels push right); long dataset names
    # (sizes, shapes) wrap instead of running off it
    fig.suptitle(textwrap.fill(f"{task_name} — {dataset}", width=70), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())


def target_values(target: Target | Reference, methods: dict[str, list[dict]]) -> list[float | None]:
    """Per-seed values of ``target`` (or a reference) from one table (``method → records``)."""
    records = methods.get(target.method, [])
    if target.versus is None:
        return [r["metrics"].get(target.metric) for r in records]
    return paired_deltas(records, methods.get(target.versus, []), target.metric)


def _measure(
    item: Target | Reference, datasets: dict[str, dict[str, list[dict]]]
) -> tuple[float, float, int]:
    """Mean, std and count over seeds of ``item`` in a task's tables (``dataset → table``)."""
    names = (item.dataset,) if isinstance(item.dataset, str) else item.dataset
    table = next((datasets[d] for d in names if d in datasets), {})
    return summarise(target_values(item, table))


def _target_lines(grouped: dict[str, dict[str, dict[str, list[dict]]]]) -> list[str]:
    """The report's "Targets" table: every target of the tasks in the run, checked on it."""
    rows = []
    for task_name, datasets in grouped.items():
        task = TASKS.get(task_name)
        for target in task.targets if task is not None else ():
            mean, std, n = _measure(target, datasets)
            measured = target.method + (f" − {target.versus}" if target.versus else "")
            verdict = "not measured" if n == 0 else ("met" if target.met(mean) else "**not met**")
            if n > 1 and abs(mean - target.threshold) < std:
                verdict += " (the bound is within one std)"
            beside = []
            for ref in target.references:
                ref_mean, ref_std, ref_n = _measure(ref, grouped.get(ref.task or task_name, {}))
                figure = _fmt(ref_mean, ref_std, ref_n) if ref_n else "not in this run"
                beside.append(f"{ref.label}: {figure}")
            rows.append(
                f"| {task_name} | {target.claim} | {measured}: {target.metric} | "
                f"{_fmt(mean, std, n)} | {target.op} {target.threshold:g} | {verdict} | "
                f"{'; '.join(beside) or '—'} |"
            )
    if not rows:
        return []
    return [
        "## Targets",
        "",
        "The figures each task is expected to reach, checked on this run: the mean over seeds of"
        " the metric (a per-seed paired difference where a second method is named) against the"
        " bound. Where the bound lies within one standard deviation of the mean, the verdict"
        " could change with other seeds, and says so. The last column gives figures of the same"
        " run that bound the target or compare with it (a reference row, the same computation"
        " written by hand), read the same way.",
        "",
        "| task | target | measured | value | needs | verdict | beside it in this run |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` for the run in ``run_dir``; return the report."""
    results = load_results(run_dir)
    meta = results.get("meta", {})
    lines = [
        "# Benchmark report",
        "",
        f"- profile: `{meta.get('profile')}`, seeds: {meta.get('seeds')}",
        f"- started {meta.get('started')}, finished {meta.get('finished', '(unfinished)')}",
        f"- python {meta.get('python')}, torch {meta.get('torch')}, {meta.get('threads')} threads,"
        f" {meta.get('platform')}",
        f"- command: `{meta.get('command')}`",
        "",
        "Every cell is mean ± sample std over seeds (n = number of seeds that finished; a cell"
        " over fewer, where a seed's value was not finite, e.g. a diverged run, says so). The last"
        " column is the per-seed difference of the primary metric from the table's first method"
        " (same seed, same data), whose spread is smaller than the seeds' spread.",
        "",
    ]
    grouped = group_records(results.get("records", []))
    lines += _target_lines(grouped)
    for task_name, datasets in grouped.items():
        task = TASKS.get(task_name)
        seconds = meta.get("task_seconds", {}).get(task_name)
        lines += [f"## {task_name}", ""]
        if task is not None:
            lines += [task.description, ""]
        if seconds is not None:
            lines += [f"Wall time: {seconds:.0f} s.", ""]
        for dataset, methods in datasets.items():
            metrics = _metric_order(task_name, methods)
            primary = task.primary_metric if task else metrics[0]
            reference = next(iter(methods))
            paired = primary in metrics and len(methods) > 1
            header = [*metrics, f"Δ {primary} vs {reference} (paired)"] if paired else metrics
            lines += [f"### {dataset}", ""]
            lines.append("| method | n | " + " | ".join(header) + " |")
            lines.append("|---|---|" + "---|" * len(header))
            for method, recs in methods.items():
                cells = [_cell(recs, m, [r["metrics"].get(m) for r in recs]) for m in metrics]
                if paired:
                    deltas = paired_deltas(recs, methods[reference], primary)
                    cells.append("—" if method == reference else _cell(recs, primary, deltas))
                lines.append(f"| {method} | {len(recs)} | " + " | ".join(cells) + " |")
            lines.append("")
            if primary in metrics:
                plot = Path("plots") / f"{_slug(f'{task_name}--{dataset}')}.png"
                _plot(task_name, dataset, methods, primary, run_dir / plot)
                lines += [f"![{task_name} {dataset} {primary}]({plot.as_posix()})", ""]
        if task is not None and task.plots is not None:
            records = [r for r in results.get("records", []) if r["task"] == task_name]
            for caption, path in task.plots(records, run_dir / "plots"):
                lines += [f"![{caption}]({path.relative_to(run_dir).as_posix()})", ""]
    failures = results.get("failures", [])
    if failures:
        lines += ["## Failed", ""]
        for f in failures:
            lines.append(f"- **{f['task']}**, seed {f['seed']}: `{f['error']}`")
        lines.append("")
    if not results.get("records") and not failures:
        lines += ["(no results yet)", ""]
    report = run_dir / REPORT_FILE
    with atomic_write(report) as f:
        f.write("\n".join(lines))
    return report
