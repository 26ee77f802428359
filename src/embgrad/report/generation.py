"""``embgrad explain`` for causal language models: which prompt tokens drove each token of a
continuation (given with ``--continuation``, or the model's greedy one), as one self-contained
HTML page: per text and method the (target × source) matrix and each target's highlighted
prompt (:meth:`embgrad.GenerationAttribution.to_html`). Transformers is imported by the caller.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbgradError

__all__ = ["GenerationExplanation", "explain_generation", "write_generation_page"]

_TRUST = ("Each row is one token of the continuation; its cells say how much each earlier token (the "
          "prompt's, then the continuation's own earlier tokens, in italics) raised (red) or lowered (blue) "
          "that token's log-probability. Integrated gradients add up, per row, to the change of the "
          "log-probability from the baseline (zero vectors) to the text, up to the gap Δ shown; gradient × "
          "input is their one-point preview. Cells after a token's own position are empty: a causal model "
          "cannot look ahead.")


@dataclass(frozen=True, eq=False)
class GenerationExplanation:
    """``results[method]``: the :class:`embgrad.GenerationAttribution` of every text; ``texts``
    the prompts; ``continuation`` the forced continuation (None: greedy); ``seconds``."""

    model: Any
    texts: tuple[str, ...]
    continuation: str | None
    results: dict[str, Any]
    seconds: float

    def continuation_text(self, b: int) -> str:
        """The continuation of text ``b`` as the tokenizer decodes it."""
        r = next(iter(self.results.values()))
        return str(self.model.tokenizer.decode([int(t) for t in r.target_ids[b]]))

    def top_sources(self, method: str, b: int, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` prompt tokens of text ``b`` with the largest |score| summed over the targets
        (the attribution of the continuation's total log-probability)."""
        r = self.results[method]
        s = r.prompt_scores(b).sum(0)
        toks = (r.source_tokens[b] if r.source_tokens is not None else [str(t) for t in r.prompt_ids[b]])
        order = np.argsort(-np.abs(s), kind="stable")[:k]
        return [(toks[i], float(s[i])) for i in order]


def explain_generation(loaded: Any, texts: Sequence[str], *, continuation: str | None = None,
                       methods: Sequence[str] = ("grad_x_input", "integrated_gradients"), steps: int = 50,
                       max_new_tokens: int = 20) -> GenerationExplanation:
    """Attribute the continuation of each text under a causal LM (``loaded.kind == "causal-lm"``)
    with :func:`embgrad.attribute_generation`.

    Raises:
        EmbgradError: an empty text or continuation, or an unknown method.
    """
    from ..generation import METHODS, attribute_generation

    t0 = time.perf_counter()
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise EmbgradError(f"text #{i + 1} is empty ({t!r}): there is nothing to explain. Pass non-empty text.")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise EmbgradError(f"method {bad[0] if bad else None!r} is not available for a causal language model; "
                           f"choose from {', '.join(METHODS)}.")
    if continuation is not None and not continuation:
        raise EmbgradError("--continuation is empty: pass the text whose tokens to explain, or leave it out "
                           "to explain the model's own greedy continuation.")
    tok = loaded.tokenizer
    targets: Any = None
    if continuation is not None:
        targets = [continuation] * len(texts)
    results = {}
    for method in methods:
        r = attribute_generation(loaded.model, texts, targets, method=method, tokenizer=tok, steps=steps,
                                 max_new_tokens=max_new_tokens, progress=False)
        results[method] = r
        if targets is None:            # every method explains the same (greedy) continuation
            targets = [t.tolist() for t in r.target_ids]
    return GenerationExplanation(loaded, tuple(texts), continuation, results, time.perf_counter() - t0)


def write_generation_page(gx: GenerationExplanation, path: str | Path) -> Path:
    """Write ``gx`` as one self-contained HTML page (inline CSS, no scripts, no URLs); return its
    path (``path``, or ``path/explain.html`` for a directory).

    Raises:
        EmbgradError: the page cannot be written there.
    """
    from .._html import esc
    from .explain import write_page

    m = gx.model
    how = f"the continuation “{gx.continuation}”" if gx.continuation is not None else "its greedy continuation"
    parts = []
    for b, text in enumerate(gx.texts):
        views = "".join(f"<div>{r.to_html(title=meth.replace('_', ' '), examples=[b])}</div>"
                        for meth, r in gx.results.items())
        parts.append(f'<section data-section="text-{b}"><h2>#{b + 1} “{esc(text)}” → '
                     f'“{esc(gx.continuation_text(b))}”</h2><div class="heatmaps">{views}</div></section>')
    header = f"{esc(type(m.model).__name__)} from {esc(str(m.path))}: which tokens drove each token of {esc(how)}."
    return write_page(path, m.path.name, header, "How to read it", _TRUST, "".join(parts), gx.seconds)
