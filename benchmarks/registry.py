"""The task registry: a plain dict of :class:`Task` by name, filled by :func:`register_task`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Profile = Literal["quick", "full"]
PROFILES: tuple[Profile, ...] = ("quick", "full")


@dataclass
class RunContext:
    """What a task's ``run`` gets for one seed.

    Attributes:
        seed: the training seed.
        profile: ``"quick"`` (small budget) or ``"full"``.
        data_root: folder with users' real data sets, or ``None`` (embedded/generated data only).
        work_dir: a folder for this task's files (generated data, artefacts).
        progress: call with a short status string to show it on the task's progress bar.
    """

    seed: int
    profile: Profile
    data_root: Path | None
    work_dir: Path
    progress: Callable[[str], None] = field(default=lambda _status: None)


@dataclass(frozen=True)
class Reference:
    """A figure measured in the same run beside a target: what bounds it, or what it compares to.

    Read as a :class:`Target`'s value is: per seed, ``metric`` of ``method`` in the table
    ``dataset`` (the first of several names present), minus ``versus``'s when given; from the
    records of ``task``, or of the target's own task when ``None``. A ceiling that no method
    could pass on the data (a reference row, the same computation written by hand) shows a
    reader of the report, with a figure the run computed, why a target is out of reach.

    Attributes:
        label: what the figure is, in words.
        dataset, method, metric, versus: as :class:`Target`'s.
        task: the task whose records hold it (``None``: the target's).
    """

    label: str
    dataset: str | tuple[str, ...]
    method: str
    metric: str
    versus: str | None = None
    task: str | None = None


@dataclass(frozen=True)
class Target:
    """A figure a task is expected to reach (an acceptance criterion), checked in the report.

    The measured value is, per seed, ``metric`` of ``method`` in the table ``dataset``, minus
    the same metric of ``versus`` when given (a paired difference); the report shows its mean
    ± std over seeds and whether the mean satisfies ``op threshold``.

    Attributes:
        claim: the criterion in words.
        dataset: the table (the records' ``dataset``) to read, or several names of which the
            first in the run is read (e.g. the generated data's table, or the real data's).
        method: the method measured.
        metric: the metric read.
        op: ``">="``, ``">"``, ``"<="`` or ``"<"``.
        threshold: the bound the mean is compared with.
        versus: optional method whose metric is subtracted, seed by seed.
        references: figures of the same run shown beside the verdict (:class:`Reference`).
    """

    claim: str
    dataset: str | tuple[str, ...]
    method: str
    metric: str
    op: Literal[">=", ">", "<=", "<"]
    threshold: float
    versus: str | None = None
    references: tuple[Reference, ...] = ()

    def __post_init__(self) -> None:
        if self.op not in (">=", ">", "<=", "<"):
            raise ValueError(f"Target op must be '>=', '>', '<=' or '<', got {self.op!r}.")

    def met(self, value: float) -> bool:
        """Whether ``value`` satisfies the bound."""
        if self.op == ">=":
            return value >= self.threshold
        if self.op == ">":
            return value > self.threshold
        if self.op == "<=":
            return value <= self.threshold
        return value < self.threshold


@dataclass(frozen=True)
class Task:
    """A benchmark task, run once per seed.

    Attributes:
        name: registry key.
        description: one line for ``list`` and the report.
        run: ``run(ctx) -> records``; each record is a dict with ``method``, ``dataset``,
            ``metrics`` (name → float) and optionally ``config`` (the runner adds ``task`` and
            ``seed``).
        primary_metric: the metric plotted and listed first.
        higher_is_better: direction of ``primary_metric``.
        profiles: the profiles that include the task.
        metrics: metrics to tabulate, in order (default: every metric the records hold).
        plots: optional ``plots(records, plot_dir) -> [(caption, png_path), ...]`` for figures
            beyond the bar chart of the primary metric (e.g. a curve over a swept setting).
        targets: figures the task is expected to reach; the report checks each on the run.
    """

    name: str
    description: str
    run: Callable[[RunContext], list[dict[str, Any]]]
    primary_metric: str
    higher_is_better: bool = True
    profiles: tuple[Profile, ...] = PROFILES
    metrics: tuple[str, ...] | None = None
    plots: Callable[[list[dict[str, Any]], Path], list[tuple[str, Path]]] | None = None
    targets: tuple[Target, ...] = ()


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS`; a name registered twice is an error."""
    if task.name in TASKS:
        raise ValueError(f"task '{task.name}' is already registered.")
    bad = [p for p in task.profiles if p not in PROFILES]
    if bad:
        raise ValueError(f"task '{task.name}': unknown profiles {bad}; choose from {PROFILES}.")
    TASKS[task.name] = task
    return task
