"""The ``embgrad`` command line.

``embgrad demo [--framework torch|tensorflow] [--out DIR] [--open]``: train the tiny demo
classifier on the built-in synthetic sentiment data, print a summary and write an HTML report.

``embgrad explain MODEL_DIR TEXT... [--target LABEL] [--compare TEXT] [--method M] [--out FILE]``:
token attributions of a local Hugging Face classifier or sentence-embedding model, as HTML.

``embgrad influence [TEXT...] [--model DIR --train FILE] [--exact | --k K] [--out FILE]``: training-data
attribution (TracInCP over embedding gradients): proponents/opponents per test sentence and the
self-influence ranking, on the demo or a local Hugging Face classifier, as HTML.

``embgrad --version``: the version (``embgrad.__version__``, which pyproject.toml reads too).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import __version__
from .errors import EmbgradError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``embgrad`` command."""
    parser = argparse.ArgumentParser(
        prog="embgrad", description="Exact, sparse, per-example and explainable gradients of embedding layers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    ex = sub.add_parser("explain", help="token attributions of a local Hugging Face model, as HTML",
                        description="Explain a local Hugging Face sequence classifier (the logit of a label) "
                                    "or sentence-embedding model (the cosine similarity to --compare) token "
                                    "by token. Loads offline; never downloads.")
    ex.add_argument("model_dir", metavar="MODEL_DIR", help="directory written by save_pretrained")
    ex.add_argument("texts", metavar="TEXT", nargs="+", help="text(s) to explain")
    ex.add_argument("--target", metavar="LABEL", help="label name or index to explain (classifier; "
                                                      "default: the predicted label)")
    ex.add_argument("--compare", metavar="TEXT", help="explain the cosine similarity to this text "
                                                      "(sentence-embedding model)")
    ex.add_argument("--continuation", metavar="TEXT",
                    help="causal language model: explain this continuation of each text token by token "
                         "(default: the model's greedy continuation)")
    ex.add_argument("--max-new-tokens", type=int, default=20, metavar="N",
                    help="causal language model without --continuation: tokens to generate (default: 20)")
    ex.add_argument("--method", action="append", choices=("saliency", "grad_x_input", "integrated_gradients",
                                                          "smoothgrad"),
                    help="attribution method, repeatable (default: grad_x_input and integrated_gradients)")
    ex.add_argument("--steps", type=int, default=50, help="integrated-gradients steps (default: 50)")
    ex.add_argument("--out", type=Path, default=Path("embgrad-explain.html"),
                    help="HTML file to write (default: embgrad-explain.html)")
    ex.add_argument("--no-truncate", action="store_true",
                    help="refuse texts longer than the model's limit instead of truncating them")
    _influence_parser(sub)
    return parser


def _influence_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("influence", help="which training sentences drove each prediction (TracInCP), as HTML",
                       description="Training-data attribution over embedding gradients (TracInCP): the top "
                                   "proponents and opponents of each test sentence, and the self-influence "
                                   "ranking of the training set (mislabelled examples first). Without --model: "
                                   "the demo classifier and its training data, which has flipped labels.")
    p.add_argument("texts", metavar="TEXT", nargs="*", help="test sentences (default: demo test sentences)")
    p.add_argument("--model", metavar="DIR", help="a local Hugging Face sequence classifier (save_pretrained)")
    p.add_argument("--train", metavar="FILE", type=Path,
                   help="training sentences for --model, one per line, optionally LABEL<TAB>sentence")
    p.add_argument("--exact", action="store_true", help="exact sparse inner products instead of a projection")
    p.add_argument("--k", type=int, default=1024, help="projection dimension (default: 1024)")
    p.add_argument("--exact-rows", type=int, default=None, metavar="H",
                   help="rows kept exactly outside the projection (default: 8 with --model, 0 on the demo)")
    p.add_argument("--metric", choices=("dot", "cosine"), default="cosine",
                   help="rank proponents by the cosine of the gradients (default) or the raw TracInCP score "
                        "(dot), which favours examples with large gradients")
    p.add_argument("--tests", type=int, default=6, help="demo test sentences to show (default: 6)")
    p.add_argument("--seed", type=int, default=0, help="demo seed (default: 0)")
    p.add_argument("--out", type=Path, default=Path("embgrad-influence.html"),
                   help="HTML file to write (default: embgrad-influence.html)")


def _influence(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .report.influence import demo_influence, model_influence, write_influence

    console = Console()
    if (args.model is None) != (args.train is None):
        raise EmbgradError("--model and --train go together: a local classifier and its training sentences "
                           "(or neither, for the demo).")
    mode = "exact" if args.exact else "projected"
    argv = " ".join(sys.argv[1:]) if sys.argv[1:2] == ["influence"] else "influence"
    with console.status("") as status:
        def step(what: str) -> None:
            status.update(what)
        if args.model is None:
            page = demo_influence(args.seed, mode, args.k, args.texts or args.tests, progress=False, step=step,
                                  command=f"embgrad {argv}", exact_rows=args.exact_rows or 0, metric=args.metric)
        else:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            _require(("torch", "transformers"), "torch,hf", "embgrad influence --model")
            import transformers  # its "Loading weights" bar would come before embgrad's output
            transformers.utils.logging.disable_progress_bar()
            page = model_influence(args.model, args.train, args.texts, mode, args.k, progress=False, step=step,
                                   command=f"embgrad {argv}",
                                   exact_rows=8 if args.exact_rows is None else args.exact_rows, metric=args.metric)
    found, total = page.flipped_found()
    console.print(f"[bold]{page.model_name}[/] on {page.source}: {len(page.train_texts):,} training sentences, "
                  f"{mode}" + (f" k={page.k}" if page.k else "") + f", {page.seconds:.1f} s", highlight=False)
    if page.recall is not None:
        console.print(f"  recall@5 of projected vs exact proponents: {page.recall:.0%}")
    if page.flipped is not None:
        console.print(f"  flipped labels in the top 5% by self-influence: {found} of {total}")
    out = write_influence(page, args.out)
    console.print(f"[bold green]Influence page written to[/] {out.resolve()}")
    return 0


def _require(modules: Sequence[str], extra: str, command: str) -> None:
    """Refuse before any work when an optional package that ``command`` needs is missing,
    naming the extra that brings it."""
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise EmbgradError(f"{command} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                           f"not installed here. Install {'it' if len(missing) == 1 else 'them'} with: "
                           f'pip install "embgrad[{extra}]"')


def _shorten(text: str, n: int = 60) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1].rstrip() + "…"


def _explain(args: argparse.Namespace) -> int:
    import warnings

    from rich.console import Console
    from rich.table import Table

    if args.steps < 1:
        raise EmbgradError(f"--steps {args.steps}: integrated gradients average the gradient over --steps points "
                           "on the path from the baseline to the text, so it needs at least 1 (default 50; "
                           "more steps, smaller completeness gap).")
    _require(("torch", "transformers"), "torch,hf", "embgrad explain")
    from .report.explain import DEFAULT_METHODS, check_out_file, explain, load_model, write_explanation
    check_out_file(args.out)          # before minutes of work, not after

    console = Console()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with console.status("loading the model"):
        import transformers
        transformers.utils.logging.disable_progress_bar()
        loaded = load_model(args.model_dir)
    if loaded.kind == "causal-lm":
        return _explain_generation(args, loaded, console)
    if args.continuation is not None:
        raise EmbgradError(f"--continuation explains a causal language model's continuation, but "
                           f"{args.model_dir!r} holds a {loaded.kind}; drop --continuation.")
    with warnings.catch_warnings(record=True) as caught, console.status("attributing"):
        warnings.simplefilter("always")
        ex = explain(loaded, args.texts, target=args.target, methods=tuple(args.method or DEFAULT_METHODS),
                     compare=args.compare, steps=args.steps, truncate=not args.no_truncate)
    for w in caught:
        if issubclass(w.category, UserWarning) and "truncated" in str(w.message):
            console.print(f"[yellow]warning:[/] {w.message}")
    console.print(f"[bold]{type(loaded.model).__name__}[/] ({loaded.kind}) from {loaded.path}")
    table = Table(title="Top tokens by |score| (token@position, counted from 1; special tokens left out)",
                  title_justify="left")
    for col in ("#", "method", "top tokens"):
        table.add_column(col)
    for b, text in enumerate(ex.texts):
        console.print(f"  #{b + 1} “{_shorten(text)}” — {ex.target_line(b)}", highlight=False, markup=False)
        for i, method in enumerate(ex.scores):
            top = ", ".join(f"{t}@{p} {s:+.3g}" for t, s, p in ex.top_tokens(method, b))
            table.add_row(f"#{b + 1}" if i == 0 else "", method, top)
    console.print(table)
    page = write_explanation(ex, args.out)
    console.print(f"[bold green]Explanation written to[/] {page.resolve()}")
    return 0


def _explain_generation(args: argparse.Namespace, loaded: object, console: object) -> int:
    """`embgrad explain` on a causal language model (see embgrad.report.generation)."""
    from rich.table import Table

    from .report.generation import explain_generation, write_generation_page

    if args.target is not None or args.compare is not None:
        raise EmbgradError(f"{args.model_dir!r} is a causal language model: it explains a continuation "
                           "(--continuation TEXT, or its greedy one), not --target or --compare.")
    if args.max_new_tokens < 1:
        raise EmbgradError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    with console.status("attributing"):                                     # type: ignore[attr-defined]
        gx = explain_generation(loaded, args.texts, continuation=args.continuation,
                                methods=tuple(args.method or ("grad_x_input", "integrated_gradients")),
                                steps=args.steps, max_new_tokens=args.max_new_tokens)
    table = Table(title="Prompt tokens that drove the continuation most", title_justify="left")
    for col in ("#", "method", "top prompt tokens (summed over the continuation)"):
        table.add_column(col)
    for b, text in enumerate(gx.texts):
        console.print(f"  #{b + 1} “{text}” → “{gx.continuation_text(b)}”", highlight=False)  # type: ignore[attr-defined]
        for i, method in enumerate(gx.results):
            top = ", ".join(f"{t} {s:+.3g}" for t, s in gx.top_sources(method, b))
            table.add_row(f"#{b + 1}" if i == 0 else "", method, top)
    console.print(table)                                                     # type: ignore[attr-defined]
    page = write_generation_page(gx, args.out)
    console.print(f"[bold green]Explanation written to[/] {page.resolve()}")  # type: ignore[attr-defined]
    return 0


def _start_tensorflow() -> None:
    """Import TensorFlow and Keras and initialise TF's devices with the process's stderr (fd 2)
    caught: TensorFlow's C++ start-up logs ignore TF_CPP_MIN_LOG_LEVEL. What was caught is
    shown again if this fails."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow as tf
            tf.constant(0.0) + 1.0     # the first op initialises the devices (and logs about CUDA)
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _DropUnconvergedOrders(logging.Filter):
    """Drops dp-accounting's "failed to converge ... Excluding this order" warnings (about 60 of
    them while the demo's noise-multiplier search tries small σ): each order it excludes only
    loosens the RDP bound, which stays valid, and the page states the ε it reports."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_accounting() -> Iterator[None]:
    """While the demo runs: dp-accounting's convergence warnings (logger "absl") are dropped;
    the filter is removed on exit (the process's logging is left as it was)."""
    logger, drop = logging.getLogger("absl"), _DropUnconvergedOrders()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _require((args.framework, "matplotlib"), f"{args.framework},viz", f"embgrad demo --framework {args.framework}")
    from .report.console import attribution_table, print_summary
    from .report.demo import report_steps, run_demo
    from .report.html import check_out_dir, write_report
    check_out_dir(args.out)          # refuse before minutes of work, not after

    console = Console()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        load = bar.add_task(f"importing {args.framework}", total=None, info="")
        if args.framework == "tensorflow":
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            _start_tensorflow()
        task = bar.add_task(f"training ({args.framework})", total=None, info="")

        def progress(epoch: int, epochs: int, loss: float) -> None:
            bar.update(load, total=1, completed=1)
            bar.update(task, total=epochs, completed=epoch, info=f"loss {loss:.3f}")

        steps = bar.add_task("report", total=report_steps(args.framework) + 1, info="",  # + writing
                             visible=False)

        def step(name: str) -> None:
            bar.update(steps, visible=True, description=name, advance=1)

        with _quiet_accounting():
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
    """Entry point of the ``embgrad`` console script; returns the exit status (0 on success,
    2 on an :class:`~embgrad.EmbgradError`, whose message is printed to stderr).

    Raises:
        SystemExit: from argparse: status 0 after ``--help`` or ``--version``, 2 for bad arguments.
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "explain":
            return _explain(args)
        if args.command == "influence":
            return _influence(args)
    except EmbgradError as e:
        print(f"embgrad: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
