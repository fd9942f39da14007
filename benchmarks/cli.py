"""``python -m benchmarks {list,run,report,compare}``."""

from __future__ import annotations

import argparse
import difflib
import sys
from datetime import datetime
from pathlib import Path

import benchmarks.tasks  # noqa: F401  (registers the tasks)
from benchmarks.compare import compare_runs, format_comparison
from benchmarks.registry import PROFILES, TASKS
from benchmarks.report import write_report
from benchmarks.runner import load_results, run_tasks
from benchmarks.tasks.common import describe_data_root

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; ``"5"`` → ``[5]``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(
            f"--seeds takes a comma-separated list of integers (e.g. 0,1,2), got {text!r}"
        )
    return seeds


def _resolve_tasks(names: list[str] | None, profile: str) -> list[str]:
    if not names:
        return [n for n, t in TASKS.items() if profile in t.profiles]
    for n in names:
        if n not in TASKS:
            close = difflib.get_close_matches(n, list(TASKS), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SystemExit(f"unknown task '{n}'.{hint} Known tasks: {', '.join(TASKS)}.")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the registered tasks")
    run = sub.add_parser("run", help="run tasks and write results.json, report.md and plots")
    run.add_argument("--task", action="append", help="task to run (repeatable; default: all)")
    run.add_argument("--profile", choices=PROFILES, default=None, help="default: quick")
    run.add_argument("--seeds", type=parse_seeds, default=None, help="comma list (default 0,1,2)")
    run.add_argument("--data-root", type=Path, default=None, help="folder with real data sets")
    run.add_argument("--out", type=Path, default=None, help="run folder (default: timestamped)")
    run.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="go on with an interrupted run: its tasks, seeds, profile and data root; only "
        "the task seeds it did not finish run (failed ones again)",
    )
    report = sub.add_parser("report", help="rewrite report.md and plots from results.json")
    report.add_argument("run_dir", type=Path)
    compare = sub.add_parser(
        "compare",
        help="compare two runs' figures, timings excluded (exit code 1 when any differs)",
    )
    compare.add_argument("run_a", type=Path)
    compare.add_argument("run_b", type=Path)
    compare.add_argument(
        "--tolerance", type=float, default=0.0, help="absolute; default 0 (bitwise equal)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (1 when a task failed)."""
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for name, task in TASKS.items():
            profiles = ", ".join(task.profiles) or "explicit --task only"
            print(f"{name:28s} [{profiles}] {task.description}")
        return 0
    if args.command == "report":
        try:
            print(write_report(args.run_dir))
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(str(err)) from None
        return 0
    if args.command == "compare":
        try:
            a, b = load_results(args.run_a), load_results(args.run_b)
            comparison = compare_runs(a, b, args.tolerance)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(str(err)) from None
        print(format_comparison(comparison))
        return 0 if comparison.equal else 1
    if args.resume is not None:
        return _resume(args)
    args.profile = args.profile or "quick"
    args.seeds = args.seeds or [0, 1, 2]
    tasks = _resolve_tasks(args.task, args.profile)
    if args.data_root is not None:
        if not args.data_root.is_dir():
            raise SystemExit(f"--data-root {args.data_root} is not a folder.")
        print(describe_data_root(args.data_root), file=sys.stderr)
    out = args.out or RESULTS_ROOT / f"{datetime.now():%Y%m%d-%H%M%S}-{args.profile}"
    results = run_tasks(
        tasks, profile=args.profile, seeds=args.seeds, out_dir=out, data_root=args.data_root
    )
    return _finish(out, results)


def _resume(args: argparse.Namespace) -> int:
    """``run --resume RUN_DIR``: the run's own tasks, seeds, profile and data root."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("task", "profile", "seeds", "data_root", "out")
        if getattr(args, name) is not None
    ]
    if given:
        raise SystemExit(
            f"--resume takes the run's own settings from its results.json; drop {given}."
        )
    try:
        meta = load_results(args.resume)["meta"]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    unknown = [t for t in meta["tasks"] if t not in TASKS]
    if unknown:
        raise SystemExit(f"--resume: the run's tasks {unknown} are no longer registered.")
    data_root = Path(meta["data_root"]) if meta.get("data_root") else None
    results = run_tasks(
        meta["tasks"],
        profile=meta["profile"],
        seeds=meta["seeds"],
        out_dir=args.resume,
        data_root=data_root,
        resume=True,
    )
    return _finish(args.resume, results)


def _finish(out: Path, results: dict) -> int:
    report = write_report(out)
    print(f"report: {report}")
    if results["failures"]:
        print(f"{len(results['failures'])} task run(s) failed; see the report's 'Failed' section.")
        return 1
    return 0
