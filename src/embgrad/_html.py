"""Self-contained HTML token heatmaps: one row of tokens per example, each token's background
a diverging colour (red = positive score, blue = negative, white = 0), its exact score shown
on hover. Inline styles only (no scripts, no external CSS); every token and label is escaped,
so a token ``<script>`` shows as text. Used by :meth:`embgrad.Attribution.to_html` and the report.
"""
from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

__all__ = ["token_heatmap", "generation_view", "score_colors", "esc", "neutralize_bidi", "color_legend",
           "POSITIVE_RGB", "NEGATIVE_RGB"]

POSITIVE_RGB = (178, 24, 43)    # ColorBrewer RdBu ends: red for positive scores
NEGATIVE_RGB = (33, 102, 172)   # and blue for negative ones

#: Unicode bidirectional controls (Unicode TR9, "explicit directional formatting characters"): in
#: a token or a text they would reorder the rest of the page (e.g. U+202E RIGHT-TO-LEFT OVERRIDE).
_BIDI = dict.fromkeys(map(ord, "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))
_BIDI_SHOWN = {c: f"<U+{c:04X}>" for c in _BIDI}


def neutralize_bidi(text: str) -> str:
    """``text`` with every bidirectional control character replaced by a visible ``<U+XXXX>``,
    so data cannot reorder the page around it (the controls of Unicode TR9, e.g. U+202E)."""
    return text.translate(_BIDI_SHOWN)


def esc(text: object, quote: bool = True) -> str:
    """HTML-escape ``str(text)`` and neutralise its bidirectional controls
    (:func:`neutralize_bidi`): what every string that comes from data goes through."""
    return html.escape(neutralize_bidi(str(text)), quote=quote)


def color_legend(vmax: float | None = None, positive: str = "raises the target",
                 negative: str = "lowers it") -> str:
    """A small HTML colour legend: blue (negative) → white (0) → red (positive), with what each
    end means; ``vmax`` (if given) is the |score| shown at full colour."""
    lo = "rgb({},{},{})".format(*NEGATIVE_RGB)
    hi = "rgb({},{},{})".format(*POSITIVE_RGB)
    scale = "" if vmax is None else f" (full colour at |score| = {vmax:.3g})"
    return ('<div class="embgrad-legend" style="font-family:sans-serif;font-size:12px;color:#444;margin:4px 0">'
            f'<span style="display:inline-block;width:120px;height:10px;vertical-align:middle;border:1px solid #ccc;'
            f'background:linear-gradient(to right,{lo},#fff,{hi})"></span> '
            f"blue {esc(negative)} · white 0 · red {esc(positive)}{esc(scale)}</div>")


_ROW = "margin:2px 0;line-height:1.9;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px"
_TOK = "padding:1px 3px;margin:0 1px;border-radius:3px;white-space:pre;display:inline-block"
_MARK = ";box-shadow:inset 0 -3px 0 #111"
_LABEL = "display:inline-block;min-width:9em;color:#555;font-family:sans-serif;font-size:12px"


def score_colors(scores: np.ndarray, vmax: float) -> list[tuple[str, str]]:
    """(background, text colour) CSS pairs for ``scores`` (any shape, flattened), scaled so
    that |score| = ``vmax`` is the full colour."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.clip(np.abs(s) / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(s)
    out = []
    for v, f in zip(s, t, strict=True):
        end = POSITIVE_RGB if v >= 0 else NEGATIVE_RGB
        r, g, b = (round(255 + (c - 255) * f) for c in end)
        out.append((f"rgb({r},{g},{b})", "#fff" if f > 0.6 else "#111"))
    return out


def token_heatmap(tokens: Sequence[Sequence[str]], scores: np.ndarray | Sequence[Sequence[float] | np.ndarray], *,
                  mask: np.ndarray | None = None, labels: Sequence[str] | None = None,
                  title: str | None = None, scale: str = "row", marks: np.ndarray | None = None,
                  legend: str | None = None) -> str:
    """An HTML ``<div>`` fragment: row b shows ``tokens[b]`` coloured by ``scores[b]``.

    ``scores``: (B, T) numbers (rows may be ragged lists); tokens beyond a row's scores, or with
    ``mask[b, t]`` False (padding), are left out. ``labels``: one caption per row.
    ``scale``: ``"row"`` (each row's largest |score| is full colour) or ``"global"``.
    Hovering a token shows its exact score. ``marks``: optional bool (B, T); marked tokens
    (e.g. words known to carry the label) are underlined and get the class ``embgrad-mark``.
    ``legend``: an HTML fragment (e.g. :func:`color_legend`) shown under the title.
    """
    if scale not in ("row", "global"):
        raise ValueError(f"scale must be 'row' or 'global', got {scale!r}")
    rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in scores]
    if len(tokens) != len(rows):
        raise ValueError(f"token_heatmap: {len(tokens)} token rows but {len(rows)} score rows")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"token_heatmap: {len(labels)} labels for {len(rows)} rows")
    gmax = max((float(np.abs(r).max()) for r in rows if r.size), default=0.0)
    parts = ['<div class="embgrad-heatmap" style="padding:4px">']
    if title:
        parts.append(f'<div style="font-family:sans-serif;font-weight:600;margin-bottom:4px">'
                     f'{esc(title)}</div>')
    if legend:
        parts.append(legend)
    for b, (toks, row) in enumerate(zip(tokens, rows, strict=True)):
        n = min(len(toks), row.size)
        keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask[b], dtype=bool)[:n]
        vmax = gmax if scale == "global" else (float(np.abs(row[:n][keep]).max()) if keep.any() else 0.0)
        colors = score_colors(row[:n], vmax)
        parts.append(f'<div class="embgrad-row" style="{_ROW}">')
        if labels is not None:
            parts.append(f'<span style="{_LABEL}">{esc(labels[b])}</span>')
        for t in range(n):
            if not keep[t]:
                continue
            tok = str(toks[t])
            bg, fg = colors[t]
            tip = esc(f"{tok} (position {t + 1}): {float(row[t]):.4g}")
            marked = marks is not None and bool(marks[b][t])
            cls, mark = ("embgrad-tok embgrad-mark", _MARK) if marked else ("embgrad-tok", "")
            parts.append(f'<span class="{cls}" title="{tip}" data-score="{float(row[t])!r}" '
                         f'style="{_TOK};background:{bg};color:{fg}{mark}">{esc(tok or "∅")}</span>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


_CELL = "padding:2px 4px;text-align:center;font-family:ui-monospace,Menlo,monospace;font-size:11px;min-width:2.2em"
_HEAD = "padding:2px 4px;font-family:ui-monospace,Menlo,monospace;font-size:11px;white-space:pre;color:#333"


def generation_view(sources: Sequence[str], targets: Sequence[str], scores: np.ndarray, *, n_prompt: int,
                    log_probs: np.ndarray | None = None, delta: np.ndarray | None = None,
                    caption: str = "") -> str:
    """An HTML ``<div>``: the (target × source) score matrix of one generated sequence as a table
    (each row scaled to its largest |score|; earlier-target sources in italics, cells a target
    cannot depend on left blank), then each target's sources as a highlighted token row.
    Every token and number escaped; exact scores on hover."""
    S = np.asarray(scores, dtype=np.float64)
    K, L = S.shape
    if len(targets) != K or len(sources) != L:
        raise ValueError(f"generation_view: {K}x{L} scores for {len(targets)} targets and {len(sources)} sources")
    parts = ['<div class="embgrad-genview" style="margin:8px 0 16px 0">']
    if caption:
        parts.append(f'<div style="font-family:sans-serif;color:#555;font-size:12px">{esc(caption)} · prompt '
                     f'{n_prompt} tokens, {K} target tokens</div>')
    parts.append('<table class="embgrad-matrix" style="border-collapse:collapse;margin:4px 0"><tr><th></th>')
    for s, tok in enumerate(sources):
        style = _HEAD + (";font-style:italic;color:#777" if s >= n_prompt else "")
        parts.append(f'<th style="{style}">{esc(str(tok) or "∅")}</th>')
    parts.append("</tr>")
    for j in range(K):
        row = S[j]
        vis = min(L, n_prompt + j)
        vmax = float(np.abs(row[:vis]).max()) if vis else 0.0
        colors = score_colors(row, vmax)
        parts.append(f'<tr><th style="{_HEAD};text-align:right">{esc(str(targets[j]) or "∅")}</th>')
        for s in range(L):
            if s >= vis:
                parts.append(f'<td style="{_CELL}"></td>')
                continue
            bg, fg = colors[s]
            tip = esc(f"{sources[s]} → {targets[j]}: {float(row[s])!r}", quote=True)
            parts.append(f'<td class="embgrad-cell" title="{tip}" data-score="{float(row[s])!r}" '
                         f'style="{_CELL};background:{bg};color:{fg}">{row[s]:+.2f}</td>')
        parts.append("</tr>")
    parts.append("</table>")
    toks, rows, labels = [], [], []
    for j in range(K):
        vis = min(L, n_prompt + j)
        toks.append(list(sources[:vis]))
        rows.append(S[j, :vis])
        lab = f"→ {targets[j]}"
        if log_probs is not None:
            lab += f" · log p={float(log_probs[j]):.2f}"
        if delta is not None:
            lab += f" · Δ={float(delta[j]):.1e}"
        labels.append(lab)
    parts.append(token_heatmap(toks, rows, labels=labels))
    parts.append("</div>")
    return "".join(parts)
