"""The demo report as one self-contained HTML page: inline CSS, no scripts, no external URL,
fonts or requests, and its PNG figures embedded as ``data:`` URIs, so the one ``index.html`` can
be mailed or attached as it is.

Every string that comes from data is escaped. Sections carry ``id`` and ``data-section``
attributes (``model``, ``weight-gradient``, ``per-example``, ``attribution``, ``hotflip``,
``similarity``) so tests and readers can find them.
"""
from __future__ import annotations

import base64
import tempfile
import time
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._html import esc, token_heatmap
from ..errors import EmbgradError
from .analysis import AttributionInfo, HotFlipInfo, SimilarityInfo
from .console import group_ties
from .demo import DemoResults
from .figures import attribution_figure, cost_figure, loss_figure, norms_figure, rows_figure

__all__ = ["write_report", "render_page", "SECTIONS"]

SECTIONS: tuple[tuple[str, str], ...] = (
    ("model", "The model and its embedding layers"),
    ("weight-gradient", "The weight gradient of one batch"),
    ("per-example", "Per-example gradients"),
    ("attribution", "Attributions"),
    ("hotflip", "HotFlip"),
    ("similarity", "Gradient similarity"),
    ("generation", "A language model that generates"),
    ("privacy", "Training privately: clipping, noise, ε"),
)
_METHOD_NAMES = {"saliency": "Saliency ‖∂f/∂e‖", "grad_x_input": "Gradient × input",
                 "integrated_gradients": "Integrated gradients"}


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], num: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped unless given as ``Markup`` (a ``_Raw`` string)."""
    def cell(tag: str, i: int, v: object) -> str:
        cls = ' class="num"' if i in num else ""
        text = v if isinstance(v, _Raw) else esc(str(v))
        return f"<{tag}{cls}>{text}</{tag}>"
    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """A string that is already HTML (not escaped again by :func:`_table`)."""


def _label(label: str, flipped: bool) -> _Raw:
    return _Raw(esc(label) + (' <span class="star" title="label flipped by noise">★</span>' if flipped else ""))


def _fig(name: str, alt: str) -> str:
    return f'<img class="fig" src="{esc(name, quote=True)}" alt="{esc(alt, quote=True)}">'


def _section(key: str, n: int, intro: str, body: str) -> str:
    title = dict(SECTIONS)[key]
    return (f'<section id="{key}" data-section="{key}"><h2>{n}. {esc(title)}</h2>'
            f'<p class="intro">{intro}</p>{body}</section>')


def _cards(r: DemoResults) -> str:
    t = r.per_example.timing
    ig = r.attribution.share.get("integrated_gradients", float("nan"))
    items = [
        (f"{r.model.test_accuracy:.1%}", "test accuracy"),
        (f"{r.weight.received} / {r.weight.num_rows}", "rows with gradient in one batch"),
        (f"{r.weight.max_abs_diff:.1g}", "max |embgrad − dense autograd|"),
        (f"{t.per_example_ms / t.plain_ms:.1f}×", "per-example norms vs plain backward"),
        (f"{ig:.0%}", "IG top token is a planted word"),
        (f"{r.hotflip.flipped} / {len(r.hotflip.rows)}", "HotFlip swaps that flip the label"),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(k)}</div></div>'
        for v, k in items) + "</div>"


def _model_section(r: DemoResults, figs: dict[str, str]) -> str:
    m = r.model
    layers = _table(["layer", "type", "rows V", "dim D", "padding", "tied", "frozen"],
                    [(la.name, la.type_name, la.num_rows, la.dim, la.padding or "—", "yes" if la.tied else "no",
                      "yes" if la.frozen else "no") for la in m.layers], num=(2, 3))
    intro = (f"<b>{esc(m.model_type)}</b> ({esc(m.framework)}), {m.num_parameters:,} parameters: "
             "embedding → mean over the non-padding tokens → linear. Trained for "
             f"{len(m.losses)} epochs on {m.train_size:,} synthetic sentences (a few labels flipped on "
             f"purpose) in {m.train_seconds:.1f} s; accuracy {m.train_accuracy:.1%} on the training set, "
             f"<b>{m.test_accuracy:.1%}</b> on {m.test_size} test sentences. Vocabulary of {m.vocab_size} "
             "tokens: the tokenizer merges <code>not good</code> into one token <code>not_good</code>, "
             "so a bag of embeddings can learn negation. The embedding layers embgrad finds:")
    loss_fig = _fig(figs["loss"], "training loss")
    return _section("model", 1, intro, f'<div class="row"><div>{layers}</div>{loss_fig}</div>')


def _weight_section(r: DemoResults, figs: dict[str, str]) -> str:
    w = r.weight
    exact = ('<span class="ok">exact</span>' if w.max_abs_diff == 0 else
             f"max difference {w.max_abs_diff:.2g}")
    pad = np.flatnonzero(w.rows == 0)
    pad_text = ("the PAD row (id 0) gets none: the layer's padding index excludes it." if not pad.size else
                f"the PAD row (id 0) is looked up too, so it is a stored row, with gradient norm "
                f"{w.row_norms[pad[0]]:.2g} (the pooling masks it; the plot leaves zero rows out).")
    intro = (f"One training batch of {w.batch_size} sentences, summed loss: {w.received} of {w.num_rows} "
             f"rows received gradient (‖G‖ = {w.total_norm:.4g}). Compared with the framework's own dense "
             f"gradient of the table: {exact}. A row collects gradient from every example that looks it "
             f"up, so row norms grow with token frequency; {pad_text}")
    code = ("<pre><code>with embgrad.capture(model) as cap:\n    loss = cross_entropy(model(ids), labels)\n"
            "g = cap.gradients(loss)[\"embedding\"]\nrg = g.weight_grad          # RowGrad: rows, values, "
            "row_norms()</code></pre>")
    top = _table(["row", "token", "count in batch", "row gradient norm"],
                 [(row, tok, count, f"{norm:.4g}") for row, tok, count, norm in w.top(10)], num=(0, 2, 3))
    return _section("weight-gradient", 2, intro,
                    f'<div class="row">{_fig(figs["rows"], "row gradient norm against token frequency")}'
                    f"<div><h3>Rows with the largest gradient</h3>{top}{code}</div></div>")


def _per_example_section(r: DemoResults, figs: dict[str, str]) -> str:
    pe, t = r.per_example, r.per_example.timing
    n_clipped = int((pe.norms > pe.max_norm).sum())
    intro = (f"<code>g.per_example()</code> keeps, for each example, only the rows it looked up. Clipped "
             f"at the median norm {pe.max_norm:.3g} (DP-SGD style): {n_clipped} of {len(pe.norms)} examples "
             f"scaled down. The sum of the per-example gradients equals the batch gradient (max difference "
             f"{pe.sum_diff:.1g}). The largest norms belong to the examples whose label was flipped "
             '(<span class="star">★</span>): the model disagrees with them most.')
    top = _table(["#", "norm", "label", "text"],
                 [(i, f"{norm:.4g}", _label(label, fl), text) for i, norm, text, label, fl in pe.top(8)],
                 num=(0, 1))
    toks = _table(["tokens", "norm", "from example"],
                  [(", ".join(tk), f"{norm:.4g}", pe.texts[ex]) for ex, tk, norm in group_ties(pe.token_norms[:8])],
                  num=(1,))
    cost = _table(["pass", "ms", "× plain"], [
        ("plain forward + backward (all parameters)", f"{t.plain_ms:.2f}", "1.0"),
        ("capture + sparse weight gradient", f"{t.capture_ms:.2f}", f"{t.capture_ms / t.plain_ms:.1f}"),
        ("… + per-example norms", f"{t.per_example_ms:.2f}", f"{t.per_example_ms / t.plain_ms:.1f}")],
        num=(1, 2))
    return _section("per-example", 3, intro,
                    f'<div class="row">{_fig(figs["norms"], "per-example norms before and after clipping")}'
                    f"<div><h3>Examples with the largest norms</h3>{top}</div></div>"
                    f'<div class="row"><div><h3>Tokens with the largest per-example gradient norms</h3>{toks}'
                    f"<p class=\"legend\">With mean pooling every token of an example receives the same "
                    f"gradient (divided by the sentence length), so the tokens of one example tie: "
                    f"they share a row.</p></div>"
                    f"<div><h3>Cost</h3>{cost}{_fig(figs['cost'], 'cost of capture next to the plain backward')}"
                    f"</div></div>")


def _attribution_section(a: AttributionInfo, figs: dict[str, str]) -> str:
    intro = ("<code>embgrad.attribute</code> on the true class of a dozen test sentences, at the output of "
             "the embedding layer. Planted words (the words that carry the label, negated ones included) "
             "are <span class=\"embgrad-mark\">underlined</span>; red supports the class, blue opposes it. "
             f"Integrated gradients use a zero baseline, {a.steps} Gauss–Legendre steps; largest "
             f"completeness gap {a.max_delta:.1e}. Saliency ‖∂f/∂e<sub>t</sub>‖ is the same for every "
             "token of a mean-pooled model (∂f/∂e<sub>t</sub> = Wᵀ/n for all t), so it cannot rank "
             "tokens: a known limit of plain gradients that gradient × input and integrated gradients fix.")
    maps = "".join(
        "<div>" + token_heatmap([list(t) for t in a.tokens], a.scores[m], mask=a.mask, marks=a.planted,
                                title=_METHOD_NAMES.get(m, m)) + "</div>"
        for m in a.scores)
    share = _table(["method", "top token planted (shown)", f"(all {a.test_size} test sentences)"],
                   [(_METHOD_NAMES.get(m, m), f"{a.share[m]:.0%}", f"{a.test_share[m]:.0%}") for m in a.scores],
                   num=(1, 2))
    return _section("attribution", 4, intro,
                    f'<div class="heatmaps">{maps}</div><p class="legend">The same sentences in the same '
                    f"order in each column; each row is scaled to its own largest |score|. Hover a token for "
                    f"its exact score.</p>"
                    f'<div class="row"><div><h3>Is the top token a planted word?</h3>{share}</div>'
                    f'{_fig(figs["attribution"], "share of top tokens that are planted words")}</div>')


def _hotflip_section(h: HotFlipInfo) -> str:
    intro = ("<code>embgrad.attribution.hotflip</code>: from one gradient, the single-token swap that most "
             "lowers the margin logit[predicted] − logit[other], to first order; then a real forward pass "
             "measures it. This model is linear in each embedding, so the first-order prediction is exact "
             f"here. {h.flipped} of {len(h.rows)} swaps flip the prediction. Token positions count from 1 "
             "(the first token of the sentence is token 1).")
    rows = [(r.text, _Raw(f"<code>{esc(r.old)}</code> → <code>{esc(r.new)}</code> (token {r.position + 1})"),
             f"{r.margin:+.3g}", f"{r.predicted:+.3g}", f"{r.actual:+.3g}",
             _Raw(esc(r.before) + " → " + (f'<span class="bad">{esc(r.after)}</span>' if r.after != r.before
                                          else esc(r.after))), r.new_text) for r in h.rows]
    return _section("hotflip", 5, intro, _table(
        ["sentence", "suggested swap", "margin", "predicted Δ", "actual Δ", "prediction", "after the swap"],
        rows, num=(2, 3, 4)))


def _similarity_section(s: SimilarityInfo) -> str:
    intro = (f"TracIn-style: the inner product of per-example loss gradients of the embedding table, "
             f"<code>ExampleGrads.dot</code>, between the test sentence <b>“{esc(s.query_text)}”</b> "
             f"(label {esc(s.query_label)}, predicted {esc(s.predicted)}) and each sentence of the training "
             "batch. Positive: a gradient step on that example lowers this sentence's loss (a proponent); "
             "negative: it raises it (an opponent). Mislabelled examples (★) dominate, as TracIn is known "
             "for: their gradients are large.")
    def table(rows: list) -> str:
        return _table(["#", "score", "label", "text"],
                      [(i, f"{sc:+.3g}", _label(lab, fl), text) for i, sc, text, lab, fl in rows], num=(0, 1))
    return _section("similarity", 6, intro,
                    f'<div class="row"><div><h3>Proponents</h3>{table(s.proponents(5))}</div>'
                    f"<div><h3>Opponents</h3>{table(s.opponents(5))}</div></div>")


def _generation_section(g: Any) -> str:
    if g is None:
        return _section("generation", len(SECTIONS), "The tiny causal language model of this section is a PyTorch "
                        "model: run <code>embgrad demo --framework torch</code> to see "
                        "<code>embgrad.attribute_generation</code> on it (it also takes Keras causal LMs).", "")
    lm = g.lm
    intro = (f"A tiny causal language model (embedding → GRU → logits over {len(lm.vocab)} tokens), trained in "
             f"{lm.seconds:.1f} s on the same sentences followed by <code>{esc('<sentiment>')}</code> and their "
             f"label word, predicts the label of {lm.accuracy:.0%} of the test sentences. "
             "<code>embgrad.attribute_generation</code> attributes the label token's log-probability to every "
             "prompt token (here gradient × input; all targets of all prompts share each forward pass). "
             "The top-|score| word of the sentence (the separator, a constant cue, left out) is a planted "
             f"word for {g.hits['grad_x_input']:.0%} of these sentences with gradient × input, "
             f"{g.hits['saliency']:.0%} with saliency and {g.hits['integrated_gradients']:.0%} with integrated "
             "gradients from a zero baseline (the path through all-zero sentences passes states of the GRU the "
             "model never saw). Planted words are underlined.")
    r = g.result
    rows, labels, marks, toks = [], [], [], []
    for i in range(len(r)):
        src, tgt = r._labels(i)
        toks.append(src)
        rows.append(r.scores[i][0])
        marks.append(g.planted[i])
        labels.append(f"→ {tgt[0]} (log p {r.log_probs[i][0]:.2f})")
    width = max(len(t) for t in toks)
    marked = np.zeros((len(toks), width), dtype=bool)
    for i, m in enumerate(marks):
        marked[i, :len(m)] = m
    heat = token_heatmap(toks, rows, labels=labels, marks=marked, title="gradient × input of log p(label)")
    return _section("generation", len(SECTIONS), intro, f'<div class="heatmaps"><div>{heat}</div></div>')


def _privacy_section(p: Any) -> str:
    if p is None:
        return _section("privacy", len(SECTIONS), "Not computed for these results.", "")
    eps = ("not computed — " + esc(p.missing)) if p.epsilon is None else (
        f"<b>ε = {p.epsilon:.2f}</b> (RDP accountant; {p.epsilon_pld:.2f} with PLD) at δ = 1/N = {p.delta:.1e}")
    target = "" if p.target_epsilon is None else f", the smallest that keeps ε ≤ {p.target_epsilon:g}"
    intro = (
        "Differentially private training of the embedding table with <code>embgrad.privacy</code>, on the batch "
        "of section 3: each example's gradient is clipped to norm C, the clipped sum gets Gaussian noise, "
        "and an accountant turns the noise into ε. DP-AdaFEST (Ghazi et al. 2023) keeps the update sparse: "
        "it first counts, per row, how many examples looked it up (each example's contribution bounded), "
        "adds noise to those counts and keeps only the rows whose noisy count passes a threshold; the "
        "gradient noise goes on the kept rows only. Dense DP-SGD would draw a Gaussian for every entry of "
        "the table every step. In PyTorch the same runs under Opacus with one line, "
        "<code>embgrad.privacy.register_opacus()</code>; in Keras 3 with "
        "<code>embgrad.privacy.make_private_keras</code>.")
    rows = [
        ("1. per-example norms", f"batch of {p.batch_size} from N = {p.dataset_size:,} training sentences"),
        ("2. clipping", f"C = {p.max_norm:.3g} (the median norm): {p.clipped} of {p.batch_size} examples scaled down"),
        ("3. noise multiplier", _Raw(f"σ = {p.noise_multiplier:.3g}{esc(target)} over {p.epochs} epochs of "
                                    f"Poisson-sampled batches (q = {p.sample_rate:.3f})")),
        ("4. row selection", f"counts noised with std {p.selection_noise_std:.3g}, threshold τ = {p.threshold:.3g}: "
                             f"{p.selected} rows kept of the {p.touched} the batch looked up "
                             f"({p.false_positives} false positives among the others)"),
        ("5. gradient noise", f"std σ_grad·C = {p.gradient_noise_std:.3g} per entry on the kept rows: noise norm "
                              f"{p.noise_norm:.3g} against the clipped sum's {p.signal_norm:.3g}"),
        ("6. what it costs", f"{p.sparse_entries:,} Gaussians this step instead of dense DP-SGD's "
                             f"{p.dense_entries:,} (V × D)"),
        ("7. privacy", _Raw(eps)),
    ]
    code = ("<pre><code>from embgrad import privacy\n"
            "pe = cap.gradients(loss)[\"embedding\"].per_example()\n"
            "mech = privacy.DPAdaFEST(noise_multiplier=σ, max_grad_norm=C, threshold=τ)\n"
            "update = mech.privatize(pe.clip(C).sum(), privacy.contribution_counts(pe))\n"
            "privacy.epsilon(mech, sample_rate=q, steps=steps, delta=1 / N)</code></pre>")
    return _section("privacy", len(SECTIONS), intro, _table(["step", "on the demo"], rows) + code)


def render_page(r: DemoResults, figs: dict[str, str], command: str = "embgrad demo") -> str:
    """The HTML page for ``r``; ``figs`` maps figure keys to image sources (``data:`` URIs, or
    file names next to the page)."""
    css = resources.files("embgrad.report").joinpath("style.css").read_text(encoding="utf-8")
    nav = "".join(f'<a href="#{k}">{n}. {esc(t)}</a>' for n, (k, t) in enumerate(SECTIONS, 1))
    body = "".join([
        _cards(r), _model_section(r, figs), _weight_section(r, figs), _per_example_section(r, figs),
        _attribution_section(r.attribution, figs), _hotflip_section(r.hotflip), _similarity_section(r.similarity),
        _generation_section(r.generation), _privacy_section(r.privacy)])
    total = sum(r.seconds.values())
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>embgrad report · {esc(r.model.framework)}</title><style>{css}</style></head><body>"
            f"<header><h1>embgrad report</h1><p>Everything embgrad knows about the embedding gradients of "
            f"the demo classifier ({esc(r.model.framework)}), computed in {total:.1f} s.</p><nav>{nav}</nav></header>"
            f"<main>{body}</main><footer>Generated by embgrad {esc(__version__)} with <code>{esc(command)}</code> "
            f"on {esc(time.strftime('%Y-%m-%d %H:%M'))}. This page loads nothing from the network.</footer>"
            "</body></html>\n")


def check_out_dir(out_dir: Path | str) -> Path:
    """``out_dir`` as a Path, checked before any work: a directory that exists or can be made and
    written to (it is created).

    Raises:
        EmbgradError: a file is in the way, or the directory cannot be made or written to (the
            message names the fix).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EmbgradError(f"--out {str(out)!r} is a file; the report needs a directory (index.html goes "
                           "into it). Pass a directory path.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise EmbgradError(f"--out {str(out)!r} cannot be written: {e.strerror or e}. Pass a directory you "
                           "can write to.") from None
    return out


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def write_report(r: DemoResults, out_dir: Path | str, command: str = "embgrad demo") -> Path:
    """Write ``out_dir/index.html``, its figures embedded; return the page's path.

    Raises:
        EmbgradError: ``out_dir`` is a file or cannot be written.
    """
    out = check_out_dir(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        files = {
            "loss": loss_figure(r.model, t / "loss.png"),
            "rows": rows_figure(r.weight, t / "rows.png"),
            "norms": norms_figure(r.per_example, t / "norms.png"),
            "cost": cost_figure(r.per_example.timing, t / "cost.png"),
            "attribution": attribution_figure(r.attribution, t / "attribution.png"),
        }
        figs = {key: _data_uri(t / name) for key, name in files.items()}
    page = out / "index.html"
    page.write_text(render_page(r, figs, command), encoding="utf-8")
    return page
