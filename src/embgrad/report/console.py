"""The demo's terminal summary with ``rich``: rows that received gradient, the tokens with the
largest per-example gradient norms, per-example norms before and after clipping, and the cost
of capture next to the plain backward pass."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from .analysis import AttributionInfo, HotFlipInfo, ModelInfo, PerExampleInfo, WeightGradInfo

__all__ = ["summary_tables", "print_summary", "attribution_table", "group_ties"]


def _stats(x: np.ndarray) -> str:
    return f"min {x.min():.3g} · median {np.median(x):.3g} · max {x.max():.3g}"


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _columns(table: Table, *names: str, right: Sequence[str] = ()) -> None:
    """Add columns ``names`` to ``table``, those in ``right`` right-justified (numbers)."""
    for name in names:
        table.add_column(name, justify="right" if name in right else "left")


def summary_tables(model: ModelInfo, weight: WeightGradInfo, per_example: PerExampleInfo,
                   k: int = 8) -> list[Table]:
    """The rich tables of the summary, in print order."""
    rows = Table(title=f"Rows that received gradient: {weight.received} of {weight.num_rows}",
                 caption=f"one batch of {weight.batch_size}, ‖G‖ = {weight.total_norm:.4g}, "
                         f"max |embgrad − dense autograd| = {weight.max_abs_diff:.2g}",
                 title_justify="left", caption_justify="left")
    _columns(rows, "row", "token", "count in batch", "row gradient norm",
             right=("row", "count in batch", "row gradient norm"))
    for r, tok, count, norm in weight.top(k):
        rows.add_row(str(r), tok, str(count), f"{norm:.4g}")

    tokens = Table(title="Tokens with the largest per-example gradient norms",
                   caption="tokens of one example with the same norm are one row (a mean-pooled model "
                           "gives every token of an example the same gradient)",
                   title_justify="left", caption_justify="left")
    _columns(tokens, "tokens", "norm", "from example", right=("norm",))
    for ex, toks, norm in group_ties(per_example.token_norms[:k]):
        tokens.add_row(", ".join(toks), f"{norm:.4g}", _short(per_example.texts[ex]))

    pe = per_example
    clip = Table(title=f"Per-example gradient norms, clipped at {pe.max_norm:.3g} (the median)",
                 caption=f"{int((pe.norms > pe.max_norm).sum())} of {len(pe.norms)} examples scaled down",
                 title_justify="left", caption_justify="left")
    clip.add_column("")
    clip.add_column("norms")
    clip.add_row("before clipping", _stats(pe.norms))
    clip.add_row("after clipping", _stats(pe.clipped))
    top = Table(title="Examples with the largest gradient norms (★ = label flipped by noise)",
                title_justify="left")
    _columns(top, "#", "norm", "label", "text", right=("#", "norm"))
    for i, norm, text, label, flipped in pe.top(k):
        top.add_row(str(i), f"{norm:.4g}", label + (" ★" if flipped else ""), _short(text, 60))

    t = pe.timing
    cost = Table(title=f"Cost per batch of {t.batch_size} ({model.framework}, median of {t.repeats})",
                 title_justify="left")
    for col in ("pass", "ms", "× plain"):
        cost.add_column(col, justify="right" if col != "pass" else "left")
    for name, ms in (("plain forward + backward (all parameters)", t.plain_ms),
                     ("with embgrad capture + sparse weight gradient", t.capture_ms),
                     ("… + per-example norms", t.per_example_ms)):
        cost.add_row(name, f"{ms:.2f}", f"{ms / t.plain_ms:.1f}")
    return [rows, tokens, clip, top, cost]


def print_summary(console: Console, model: ModelInfo, weight: WeightGradInfo,
                  per_example: PerExampleInfo, extra: Sequence[Table] = ()) -> None:
    """Print the summary tables (and any ``extra`` ones) to ``console``."""
    console.print(f"[bold]{model.model_type}[/] ({model.framework}): {model.num_parameters} parameters, "
                  f"trained {len(model.losses)} epochs in {model.train_seconds:.1f} s, "
                  f"test accuracy {model.test_accuracy:.1%}")
    for table in [*summary_tables(model, weight, per_example), *extra]:
        console.print(table)


def attribution_table(attribution: AttributionInfo, hotflip: HotFlipInfo) -> Table:
    """How often each attribution method's top token is a planted word; HotFlip flips."""
    t = Table(title=f"Attribution: is the top token a planted word? ({attribution.test_size} test sentences)",
              caption=f"HotFlip: {hotflip.flipped} of {len(hotflip.rows)} single-token swaps flip the prediction",
              title_justify="left", caption_justify="left")
    t.add_column("method")
    t.add_column("top token planted", justify="right")
    t.add_column("top token tied", justify="right")
    for method, share in attribution.test_share.items():
        ties = attribution.test_ties.get(method, 0.0)
        t.add_row(method, f"{share:.0%}" if ties < 0.5 else f"{share:.0%} (ties: ranks nothing)", f"{ties:.0%}")
    return t


def group_ties(entries: Sequence[tuple[int, str, float]], rel: float = 1e-6) -> list[tuple[int, list[str], float]]:
    """``(example, token, norm)`` entries, largest first, with consecutive entries of the same
    example and the same norm (within a relative ``rel``) merged: ``(example, tokens, norm)``."""
    out: list[tuple[int, list[str], float]] = []
    for ex, tok, norm in entries:
        if out and out[-1][0] == ex and abs(out[-1][2] - norm) <= rel * max(abs(norm), 1e-30):
            out[-1][1].append(tok)
        else:
            out.append((ex, [tok], norm))
    return out
