"""The ``embgrad`` command line.

``embgrad demo [--framework torch|tensorflow] [--out DIR] [--open]``: train the tiny demo
classifier on the built-in synthetic sentiment data, print a summary and write an HTML report.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import EmbgradError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``embgrad`` command."""
    parser = argparse.ArgumentParser(
        prog="embgrad", description="Exact, sparse, per-example and explainable gradients of embedding layers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a tiny classifier on synthetic data and write a report",
                          description="Train the tiny demo classifier on seeded synthetic sentiment data "
                                      "(planted label words, negation) and write an HTML report of "
                                      "everything embgrad knows about its embedding gradients.")
    demo.add_argument("--framework", choices=("torch", "tensorflow"), default="torch",
                      help="framework of the demo model (default: torch)")
    demo.add_argument("--out", type=Path, default=Path("embgrad-report"),
                      help="directory for index.html and its figures (default: embgrad-report)")
    demo.add_argument("--open", action="store_true", help="open the report in a web browser")
    demo.add_argument("--seed", type=int, default=0, help="seed of data and training (default: 0)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .report.console import attribution_table, print_summary
    from .report.demo import run_demo
    from .report.html import write_report

    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        load = bar.add_task(f"importing {args.framework}", total=None, info="")
        if args.framework == "tensorflow":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        task = bar.add_task(f"training ({args.framework})", total=None, info="")

        def progress(epoch: int, epochs: int, loss: float) -> None:
            bar.update(load, total=1, completed=1)
            bar.update(task, total=epochs, completed=epoch, info=f"loss {loss:.3f}")

        steps = bar.add_task("report", total=None, info="", visible=False)

        def step(name: str) -> None:
            bar.update(steps, visible=True, description=name, advance=1)

        results, _, _ = run_demo(args.framework, seed=args.seed, progress=progress, step=step)
        step("writing the report")
        command = f"embgrad demo --framework {args.framework} --seed {args.seed}"
        page = write_report(results, args.out, command)
        bar.update(steps, description="report", info="done")
    print_summary(console, results.model, results.weight, results.per_example,
                  extra=[attribution_table(results.attribution, results.hotflip)])
    console.print(f"[bold green]Report written to[/] {page.resolve()}")
    if args.open:
        import webbrowser
        webbrowser.open(page.resolve().as_uri())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``embgrad`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
    except EmbgradError as e:
        print(f"embgrad: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
