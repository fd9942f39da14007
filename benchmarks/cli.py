"""``python -m benchmarks {list,run,report}``."""

from __future__ import annotations

import argparse
import difflib
from datetime import datetime
from pathlib import Path

import benchmarks.tasks  # noqa: F401  (registers the tasks)
from benchmarks.registry import PROFILES, TASKS
from benchmarks.report import write_report
from benchmarks.runner import run_tasks

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
    run.add_argument("--profile", choices=PROFILES, default="quick")
    run.add_argument(
        "--seeds", type=parse_seeds, default=[0, 1, 2], help="comma list (default 0,1,2)"
    )
    run.add_argument("--data-root", type=Path, default=None, help="folder with real data sets")
    run.add_argument("--out", type=Path, default=None, help="run folder (default: timestamped)")
    report = sub.add_parser("report", help="rewrite report.md and plots from results.json")
    report.add_argument("run_dir", type=Path)
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
        except FileNotFoundError as err:
            raise SystemExit(str(err)) from None
        return 0
    tasks = _resolve_tasks(args.task, args.profile)
    if args.data_root is not None and not args.data_root.is_dir():
        raise SystemExit(f"--data-root {args.data_root} is not a folder.")
    out = args.out or RESULTS_ROOT / f"{datetime.now():%Y%m%d-%H%M%S}-{args.profile}"
    results = run_tasks(
        tasks, profile=args.profile, seeds=args.seeds, out_dir=out, data_root=args.data_root
    )
    report = write_report(out)
    print(f"report: {report}")
    if results["failures"]:
        print(f"{len(results['failures'])} task run(s) failed; see the report's 'Failed' section.")
        return 1
    return 0
