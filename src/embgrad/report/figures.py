"""PNG figures of the demo report, drawn on a ``matplotlib.figure.Figure`` with its own Agg
canvas: no display needed, and neither pyplot's backend nor ``rcParams`` is touched (a user's
notebook keeps its settings; the style is set on each figure's artists).

Each function takes a section's result and a path, writes one PNG and returns its file name.
PNG metadata is stripped of matplotlib's URL so the report holds no external address at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..demo.data import is_planted
from .analysis import AttributionInfo, ModelInfo, PerExampleInfo, Timing, WeightGradInfo

__all__ = ["loss_figure", "rows_figure", "norms_figure", "cost_figure", "attribution_figure",
           "PLANTED_COLOR", "OTHER_COLOR"]

PLANTED_COLOR = "#b2182b"
OTHER_COLOR = "#2166ac"
_GREY = "#777777"


def _figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A new (figure, axes) pair on an Agg canvas of its own (not registered with pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _style(fig: Any) -> None:
    """The report's look, on this figure's artists only: 9 pt text, 10 pt bold titles, no top
    or right spine."""
    for ax in fig.axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.title.set_fontsize(10)
        ax.title.set_fontweight("bold")
        ax.xaxis.label.set_fontsize(9)
        ax.yaxis.label.set_fontsize(9)
        ax.tick_params(which="both", labelsize=9)
        legend = ax.get_legend()
        if legend is not None:
            for text in legend.get_texts():
                text.set_fontsize(9)


def _save(fig: Any, path: Path) -> str:
    _style(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path.name


def loss_figure(model: ModelInfo, path: Path) -> str:
    """Mean training loss per epoch."""
    fig, ax = _figure((3.6, 2.4))
    epochs = np.arange(1, len(model.losses) + 1)
    ax.plot(epochs, model.losses, "o-", color=OTHER_COLOR)
    ax.set(xlabel="epoch", ylabel="mean cross-entropy", title="Training loss", xticks=epochs)
    return _save(fig, path)


def rows_figure(weight: WeightGradInfo, path: Path, label: int = 8) -> str:
    """Row gradient norm against the row's count in the batch (log-log), planted words red."""
    return _save(rows_axes(weight, label), path)


def rows_axes(weight: WeightGradInfo, label: int = 8) -> Any:
    """The figure of :func:`rows_figure`, not yet saved; its ``label`` largest rows labelled
    without overlapping labels."""
    fig, ax = _figure((5.6, 3.6))
    planted = np.array([is_planted(t) for t in weight.tokens], dtype=bool)
    norms = weight.row_norms
    shown = (norms > 0) & (weight.counts > 0)      # a log-log plot: zero rows (e.g. PAD) left out
    for sel, color, name in ((~planted & shown, OTHER_COLOR, "other tokens"),
                             (planted & shown, PLANTED_COLOR, "planted words")):
        ax.scatter(weight.counts[sel], norms[sel], s=22, alpha=0.8, color=color, label=name,
                   edgecolors="white", linewidths=0.5)
    points: dict[tuple[int, float], list[str]] = {}      # tokens at the same spot share a label
    for _, tok, count, norm in weight.top(label):
        points.setdefault((count, float(f"{norm:.3g}")), []).append(tok)
    ax.set(xscale="log", yscale="log", xlabel="occurrences of the token in the batch",
           ylabel="row gradient norm",
           title=f"{weight.received} of {weight.num_rows} rows received gradient")
    ax.legend(frameon=False, loc="lower right")
    _label_points(fig, ax, [(c, n, ", ".join(t)) for (c, n), t in points.items()])
    return fig


def _label_points(fig: Any, ax: Any, items: list[tuple[float, float, str]], fontsize: int = 8) -> None:
    """Label points so that no two labels overlap: each label goes left of and above its point,
    and moves down in steps of one line until it clears the labels already placed (largest y
    first), with a thin leader line when it moved. Deterministic and cheap: a handful of labels
    (adjustText would do it iteratively, but pulls in SciPy for the demo)."""
    fig.canvas.draw()                                       # fixes the limits and transforms
    placed: list[Any] = []
    line_px = fontsize * fig.dpi / 72 * 1.25
    for x, y, text in sorted(items, key=lambda it: -it[1]):
        for step in range(40):
            dy = 3 - step * line_px * 72 / fig.dpi             # points
            ann = ax.annotate(text, (x, y), xytext=(-4, dy), textcoords="offset points", fontsize=fontsize,
                              ha="right", va="bottom",
                              arrowprops=None if step == 0 else {"arrowstyle": "-", "color": _GREY, "lw": 0.5})
            box = ann.get_window_extent(fig.canvas.get_renderer()).expanded(1.05, 1.1)
            if not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            ann.remove()


def norms_figure(per_example: PerExampleInfo, path: Path) -> str:
    """Histograms (log-spaced bins) of per-example norms before and after clipping."""
    return _save(norms_axes(per_example), path)


def norms_axes(per_example: PerExampleInfo) -> Any:
    """The figure of :func:`norms_figure`, not yet saved: max_norm is a bin edge, the clipped
    examples one bar ON the max_norm line, the unchanged ones an outline over the same bars."""
    fig, ax = _figure((5.6, 3.4))
    pe = per_example
    lo = max(min(pe.norms.min(), pe.clipped.min()), 1e-12)
    hi = max(pe.norms.max() * 1.01, pe.max_norm * 1.01)
    # max_norm is a bin edge, so no bin straddles the clipping line
    below = np.geomspace(lo, pe.max_norm, 25) if lo < pe.max_norm else np.array([pe.max_norm])
    bins = np.concatenate([below, np.geomspace(pe.max_norm, hi, 16)[1:]])
    ax.hist(pe.norms, bins=bins, color=OTHER_COLOR, alpha=0.55, label="before clipping")
    # after clipping: the norms under max_norm are unchanged (an outline over the same bars), and
    # every clipped example sits exactly ON the line: one bar there, not a bin to its right
    clipped = pe.norms > pe.max_norm
    ax.hist(pe.norms[~clipped], bins=bins, histtype="step", color="#d6604d", lw=1.4, label="after clipping")
    ax.vlines(pe.max_norm, 0, int(clipped.sum()), color="#d6604d", lw=4)
    ax.axvline(pe.max_norm, color="#111", lw=1, ls="--")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)                # headroom: the notes sit above the bars
    ax.text(0.99, 0.97, f"dashed: max_norm = {pe.max_norm:.3g}\n{int(clipped.sum())} of {len(pe.norms)} "
            "examples clipped onto it", transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.9, "pad": 1})
    flipped = pe.norms[pe.flipped]
    if flipped.size:
        ax.plot(flipped, np.full(flipped.shape, ax.get_ylim()[1] * 0.04), "v", color=PLANTED_COLOR,
                ms=6, label="label flipped by noise")
    ax.set(xscale="log", xlabel="per-example gradient norm", ylabel="examples",
           title=f"Per-example gradient norms (batch of {len(pe.norms)})")
    ax.legend(frameon=False, loc="upper left")
    return fig


def cost_figure(timing: Timing, path: Path) -> str:
    """Median milliseconds of the plain backward, capture, and capture + per-example norms."""
    fig, ax = _figure((5.6, 1.9))
    names = ["plain backward", "capture + weight grad", "… + per-example norms"]
    ms = [timing.plain_ms, timing.capture_ms, timing.per_example_ms]
    ax.barh(names[::-1], ms[::-1], color=[OTHER_COLOR, OTHER_COLOR, _GREY][::-1])
    for y, v in enumerate(ms[::-1]):
        ax.annotate(f"{v:.2f} ms", (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set(xlabel=f"milliseconds per batch of {timing.batch_size} (median of {timing.repeats})")
    ax.set_xlim(0, max(ms) * 1.3)
    return _save(fig, path)


def attribution_figure(attribution: AttributionInfo, path: Path) -> str:
    """Share of test sentences whose top token is a planted word, per method."""
    fig, ax = _figure((4.2, 2.2))
    methods = list(attribution.test_share)
    vals = [100 * attribution.test_share[m] for m in methods]
    ax.bar([m.replace("_", " ") for m in methods], vals, color=[PLANTED_COLOR if v >= 50 else _GREY for v in vals])
    for x, v in enumerate(vals):
        ax.annotate(f"{v:.0f}%", (x, v), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
    ax.set(ylim=(0, 110), ylabel="% of sentences",
           title=f"Top token is planted ({attribution.test_size} test sentences)")
    return _save(fig, path)
