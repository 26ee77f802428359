"""What the demo report shows, computed with embgrad from a trained demo model.

One function per report section, each returning a small immutable result holding NumPy
arrays and strings only (so the console summary, the figures and the HTML page never touch a
framework). The few framework-specific operations (forward, loss, the plain backward pass)
come from :class:`embgrad.demo.models.Trained`; everything else is the public embgrad API.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..capture import capture
from ..demo.data import LABELS, DemoData, SentimentData
from ..demo.models import EMBEDDING_NAME, Trained
from ..sparse import ExampleGrads

__all__ = ["LayerInfo", "ModelInfo", "WeightGradInfo", "PerExampleInfo", "Timing",
           "SimilarityInfo", "AttributionInfo", "HotFlipInfo", "FlipRow", "model_info",
           "gradient_info", "similarity_info", "attribution_info", "hotflip_info", "top_is_planted",
           "capture_layer", "timed", "ATTRIBUTION_METHODS"]


# ---------------------------------------------------------------------------- section 1
@dataclass(frozen=True)
class LayerInfo:
    """One embedding layer: name, class, table size (V, D), padding (e.g. ``padding_idx=0``,
    ``mask_zero``, or ``""``), tied / frozen."""

    name: str
    type_name: str
    num_rows: int
    dim: int
    padding: str
    tied: bool
    frozen: bool


@dataclass(frozen=True)
class ModelInfo:
    """The trained model: framework, class, size, its embedding layers and how training went."""

    framework: str
    model_type: str
    num_parameters: int
    layers: tuple[LayerInfo, ...]
    losses: tuple[float, ...]
    train_seconds: float
    train_accuracy: float
    test_accuracy: float
    train_size: int
    test_size: int
    vocab_size: int


def _padding(info: Any) -> str:
    return info.padding


def _model_name(model: Any) -> str:
    """The class name of ``model``; for Keras's generic classes (a model built with the functional
    API is a ``Functional``, a stack a ``Sequential``) the model's own name too."""
    cls = type(model).__name__
    name = getattr(model, "name", None)
    if cls in ("Functional", "Sequential", "Model") and isinstance(name, str) and name:
        return f"{name} (a Keras {cls} model)"
    return cls


def model_info(trained: Trained, data: DemoData) -> ModelInfo:
    """Section 1: the model and its embedding layers, as embgrad finds them."""
    found = capture(trained.model).layers
    layers = tuple(LayerInfo(i.name, type(i.layer).__name__, i.num_rows, i.dim, _padding(i), i.tied, i.frozen)
                   for i in found)
    return ModelInfo(trained.framework, _model_name(trained.model), trained.num_parameters(), layers,
                     trained.losses, trained.seconds, trained.train_accuracy, trained.test_accuracy,
                     len(data.train), len(data.test), len(data.vocab))


# ---------------------------------------------------------------------------- capture helpers
def capture_layer(trained: Trained, ids: Any, labels: np.ndarray) -> Any:
    """``LayerGradients`` of the demo embedding for the summed cross-entropy of ``ids``."""
    with capture(trained.model, layers=EMBEDDING_NAME) as cap:
        loss = trained.loss(trained.logits(ids), labels, "sum")
    return cap.gradients(loss, loss_reduction="sum")[EMBEDDING_NAME]


def timed(fns: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median wall time of each ``fn()`` in milliseconds, after one warm-up call each.

    The functions run interleaved (round-robin), so a slowdown from other processes on a
    shared machine hits them alike and their ratios stay meaningful.
    """
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [1e3 * statistics.median(ts) for ts in times]


# ---------------------------------------------------------------------------- sections 2 and 3
@dataclass(frozen=True, eq=False)
class WeightGradInfo:
    """Section 2: the sparse weight gradient of one batch.

    ``rows`` (R,) touched rows, ``tokens`` their strings, ``row_norms`` (R,), ``counts`` (R,)
    how often each row occurs in the batch, ``total_norm``; ``max_abs_diff``: the largest
    difference to the framework's own dense gradient of the table (exactness check).
    """

    batch_size: int
    num_rows: int
    rows: np.ndarray
    tokens: tuple[str, ...]
    row_norms: np.ndarray
    counts: np.ndarray
    total_norm: float
    max_abs_diff: float

    @property
    def received(self) -> int:
        """Rows whose gradient is not zero. A looked-up row can be stored with a zero gradient
        (Keras's ``mask_zero`` PAD row): it counts as looked up, not as having received gradient,
        on every framework alike."""
        return int(np.count_nonzero(self.row_norms))

    def top(self, k: int = 10) -> list[tuple[int, str, int, float]]:
        """The ``k`` rows with the largest gradient norm: (row, token, count, norm)."""
        order = np.argsort(-self.row_norms, kind="stable")[:k]
        return [(int(self.rows[i]), self.tokens[i], int(self.counts[i]), float(self.row_norms[i]))
                for i in order]

    def __repr__(self) -> str:
        return (f"WeightGradInfo(rows={len(self.rows)} of {self.num_rows}, batch={self.batch_size}, "
                f"norm={self.total_norm:.4g}, max_abs_diff={self.max_abs_diff:.2g})")


@dataclass(frozen=True)
class Timing:
    """Median milliseconds of: the plain forward + backward over all parameters, the same with
    embgrad's capture and the sparse weight gradient, and with per-example norms too."""

    plain_ms: float
    capture_ms: float
    per_example_ms: float
    batch_size: int
    repeats: int


@dataclass(frozen=True, eq=False)
class PerExampleInfo:
    """Section 3: per-example gradients of the same batch.

    ``norms`` / ``clipped`` (B,) before / after clipping at ``max_norm``; ``texts``, ``labels``
    and ``flipped`` (label noise) of the batch; ``token_norms``: (example, token, norm) for the
    tokens whose row got the largest gradient from one example; ``sum_diff``: largest difference between the sum of the
    per-example gradients and the batch weight gradient.
    """

    norms: np.ndarray
    clipped: np.ndarray
    max_norm: float
    texts: tuple[str, ...]
    labels: np.ndarray
    flipped: np.ndarray
    token_norms: tuple[tuple[int, str, float], ...]
    sum_diff: float
    timing: Timing

    def top(self, k: int = 8) -> list[tuple[int, float, str, str, bool]]:
        """The ``k`` examples with the largest norms: (index, norm, text, label, flipped)."""
        order = np.argsort(-self.norms, kind="stable")[:k]
        return [(int(i), float(self.norms[i]), self.texts[i], LABELS[int(self.labels[i])],
                 bool(self.flipped[i])) for i in order]

    def __repr__(self) -> str:
        return (f"PerExampleInfo(B={len(self.norms)}, max_norm={self.max_norm:.3g}, "
                f"clipped={int((self.norms > self.max_norm).sum())})")


def _token_norms(trained: Trained, pe: ExampleGrads, batch: SentimentData, k: int) -> tuple:
    """The ``k`` tokens whose row got the largest gradient from a single example:
    (example, token, norm), one entry per token, largest first."""
    values = trained.to_numpy(pe.values).astype(np.float64)
    norms = np.sqrt((values * values).sum(1))                       # (N,) per (example, row)
    ex, rows = trained.to_numpy(pe.example_ids), trained.to_numpy(pe.rows)
    order = np.lexsort((-norms, rows))                              # by row, largest norm first
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]  # each row's largest entry
    best = first[np.argsort(-norms[first], kind="stable")[:k]]
    return tuple((int(ex[i]), batch.vocab.tokens[int(rows[i])], float(norms[i])) for i in best)


def _framework_dense(trained: Trained, g: Any) -> np.ndarray:
    """The framework's own dense form of a table gradient, as NumPy (V, D): TensorFlow's
    ``tf.convert_to_tensor`` sums the repeated rows of an ``IndexedSlices`` itself, so the
    reference shares nothing with embgrad's coalescing."""
    if type(g).__name__ == "IndexedSlices":
        import tensorflow as tf
        g = tf.convert_to_tensor(g)
    return trained.to_numpy(g)


def gradient_info(trained: Trained, batch: SentimentData, clip_quantile: float = 0.5,
                  repeats: int = 25) -> tuple[WeightGradInfo, PerExampleInfo]:
    """Sections 2 and 3 for one training batch (summed loss): the weight gradient, the
    per-example gradients clipped at the ``clip_quantile`` of their norms, and timings."""
    ids = trained.tensor(batch.ids)
    g = capture_layer(trained, ids, batch.labels)
    wg = g.weight_grad
    rows, values = wg.numpy()
    dense = _framework_dense(trained, trained.plain_backward(ids, batch.labels))
    ours = np.zeros_like(dense)
    ours[rows] = values
    counts = np.bincount(batch.ids[batch.mask], minlength=g.num_rows)
    weight = WeightGradInfo(
        len(batch), g.num_rows, rows, tuple(batch.vocab.tokens[r] for r in rows),
        trained.to_numpy(wg.row_norms()).astype(np.float64), counts[rows], wg.norm(),
        float(np.abs(dense - ours).max()))

    pe = g.per_example()
    norms = trained.to_numpy(pe.norms()).astype(np.float64)
    max_norm = float(np.quantile(norms, clip_quantile))
    clipped = trained.to_numpy(pe.clip(max_norm).norms()).astype(np.float64)
    s_rows, s_values = pe.sum().numpy()
    sum_diff = float(np.abs(s_values - values).max()) if np.array_equal(s_rows, rows) else float("inf")

    plain_ms, capture_ms, per_example_ms = timed([
        lambda: trained.plain_backward(ids, batch.labels),
        lambda: capture_layer(trained, ids, batch.labels).weight_grad.norm(),
        lambda: trained.to_numpy(capture_layer(trained, ids, batch.labels).per_example().norms()),
    ], repeats)
    timing = Timing(plain_ms, capture_ms, per_example_ms, len(batch), repeats)
    per_example = PerExampleInfo(norms, clipped, max_norm, batch.texts, batch.labels, batch.flipped,
                                 _token_norms(trained, pe, batch, 10), sum_diff, timing)
    return weight, per_example


# ---------------------------------------------------------------------------- section 6
@dataclass(frozen=True, eq=False)
class SimilarityInfo:
    """Section 6: TracIn-style similarity of one test example to a training batch.

    ``scores`` (B,): the inner products <g_query, g_b> of per-example loss gradients of the
    embedding table (positive: training on b lowers the query's loss).
    """

    query_text: str
    query_label: str
    predicted: str
    scores: np.ndarray
    texts: tuple[str, ...]
    labels: np.ndarray
    flipped: np.ndarray

    def proponents(self, k: int = 5) -> list[tuple[int, float, str, str, bool]]:
        """The ``k`` training examples with the largest scores: (index, score, text, label, flipped)."""
        return self._rows(np.argsort(-self.scores, kind="stable")[:k])

    def opponents(self, k: int = 5) -> list[tuple[int, float, str, str, bool]]:
        """The ``k`` training examples with the most negative scores."""
        return self._rows(np.argsort(self.scores, kind="stable")[:k])

    def _rows(self, order: np.ndarray) -> list[tuple[int, float, str, str, bool]]:
        return [(int(i), float(self.scores[i]), self.texts[i], LABELS[int(self.labels[i])],
                 bool(self.flipped[i])) for i in order]

    def __repr__(self) -> str:
        return f"SimilarityInfo({self.query_text!r}, B={len(self.scores)})"


def similarity_info(trained: Trained, query: SentimentData, batch: SentimentData) -> SimilarityInfo:
    """Section 6 for the first example of ``query`` against the training ``batch``."""
    q = capture_layer(trained, trained.tensor(query.ids[:1]), query.labels[:1]).per_example()
    t = capture_layer(trained, trained.tensor(batch.ids), batch.labels).per_example()
    scores = trained.to_numpy(q.dot(t)).astype(np.float64)[0]
    pred = int(trained.predict_proba(query.ids[:1]).argmax(1)[0])
    return SimilarityInfo(query.texts[0], LABELS[int(query.labels[0])], LABELS[pred], scores,
                          batch.texts, batch.labels, batch.flipped)


# ---------------------------------------------------------------------------- sections 4 and 5
ATTRIBUTION_METHODS = ("saliency", "grad_x_input", "integrated_gradients")


def top_is_tied(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """bool (B,): True where an example's highest score is shared by two or more tokens (within a
    relative 1e-5, as :func:`top_is_planted` counts ties): the method ranks no single top token."""
    s = np.where(mask, scores.astype(np.float64), -np.inf)
    mx = s.max(1, keepdims=True)
    return (s >= mx - 1e-5 * np.maximum(np.abs(mx), 1e-12)).sum(1) >= 2


def top_is_planted(scores: np.ndarray, mask: np.ndarray, planted: np.ndarray) -> np.ndarray:
    """bool (B,): True where the highest-scoring token(s) of an example are all planted words.

    Tokens within a relative 1e-5 of the maximum tie; a tie between a planted and another
    token does not count (a method that scores every token alike ranks nothing).
    """
    s = np.where(mask, scores.astype(np.float64), -np.inf)
    mx = s.max(1, keepdims=True)
    top = s >= mx - 1e-5 * np.maximum(np.abs(mx), 1e-12)
    return (top & planted).any(1) & ~(top & ~planted).any(1)


@dataclass(frozen=True, eq=False)
class AttributionInfo:
    """Section 4: attributions of the target (true) class for a dozen test sentences.

    ``scores[method]`` (B, T) for each of :data:`ATTRIBUTION_METHODS`; ``planted`` / ``mask``
    (B, T); ``share[method]``: fraction of the shown sentences whose top token is a planted
    word, ``test_share[method]`` the same over the whole test split; ``max_delta``: largest
    |completeness gap| of integrated gradients; ``steps``: its quadrature points.
    """

    tokens: tuple[tuple[str, ...], ...]
    texts: tuple[str, ...]
    labels: np.ndarray
    planted: np.ndarray
    mask: np.ndarray
    scores: dict[str, np.ndarray]
    share: dict[str, float]
    test_share: dict[str, float]
    test_size: int
    max_delta: float
    steps: int
    seconds: float
    test_ties: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        shares = ", ".join(f"{m}={self.share[m]:.0%}" for m in self.scores)
        return f"AttributionInfo({len(self.texts)} sentences, top token planted: {shares})"


def attribution_info(trained: Trained, sentences: SentimentData, test: SentimentData,
                     steps: int = 50) -> AttributionInfo:
    """Section 4 with :func:`embgrad.attribution.attribute`: saliency, gradient × input and
    integrated gradients (zero baseline) of each sentence's true class."""
    from ..attribution import attribute

    t = time.perf_counter()
    scores: dict[str, np.ndarray] = {}
    share: dict[str, float] = {}
    test_share: dict[str, float] = {}
    test_ties: dict[str, float] = {}
    max_delta = 0.0
    for method in ATTRIBUTION_METHODS:
        for split, out in ((sentences, None), (test, test_share)):
            a = attribute(trained.model, trained.tensor(split.ids), split.labels.tolist(), method=method,
                          steps=steps, mask=split.mask)
            hit = float(top_is_planted(a.scores, split.mask, split.planted).mean())
            if out is None:
                scores[method], share[method] = a.scores, hit
                if a.delta is not None:
                    max_delta = max(max_delta, float(np.abs(a.delta).max()))
            else:
                out[method] = hit
                test_ties[method] = float(top_is_tied(a.scores, split.mask).mean())
    return AttributionInfo(sentences.tokens, sentences.texts, sentences.labels, sentences.planted,
                           sentences.mask, scores, share, test_share, len(test), max_delta, steps,
                           time.perf_counter() - t, test_ties)


@dataclass(frozen=True)
class FlipRow:
    """One HotFlip suggestion: swap ``old`` at ``position`` for ``new`` in ``text``; the
    predicted (first-order) and actual change of the margin of the predicted class, and the
    prediction before / after the swap."""

    text: str
    new_text: str
    position: int
    old: str
    new: str
    margin: float
    predicted: float
    actual: float
    before: str
    after: str


@dataclass(frozen=True)
class HotFlipInfo:
    """Section 5: the best single-token swap (HotFlip) for a few sentences."""

    rows: tuple[FlipRow, ...]
    seconds: float

    @property
    def flipped(self) -> int:
        """How many swaps change the predicted label."""
        return sum(r.before != r.after for r in self.rows)

    def __repr__(self) -> str:
        return f"HotFlipInfo({len(self.rows)} sentences, {self.flipped} predictions flipped)"


def hotflip_info(trained: Trained, sentences: SentimentData, per_class: int = 3) -> HotFlipInfo:
    """Section 5 with :func:`embgrad.attribution.hotflip`: for ``per_class`` sentences of each
    predicted class, the swap that most lowers the margin logit[pred] − logit[other], verified
    by a real forward pass. Candidates: every real token (not PAD, not UNK)."""
    from ..attribution import hotflip

    t = time.perf_counter()
    pred = trained.predict_proba(sentences.ids).argmax(1)
    candidates = np.arange(2, len(sentences.vocab))
    rows: list[FlipRow] = []
    for c in (1, 0):
        pick = np.flatnonzero(pred == c)[:per_class]
        if not pick.size:
            continue
        part = sentences.subset(pick)
        h = hotflip(trained.model, trained.tensor(part.ids), lambda out, c=c: out[:, c] - out[:, 1 - c],
                    k=1, candidates=candidates, verify=True, tokenizer=part.vocab, mask=part.mask)
        for b in range(len(part)):
            swaps = h.swaps(b)
            if not swaps:
                continue
            pos, _, new_id, predicted, actual = swaps[0]
            assert actual is not None   # verify=True measured it
            toks = list(part.tokens[b])
            old, toks[pos] = toks[pos], part.vocab.tokens[new_id]
            after = c if float(h.output[b]) + actual > 0 else 1 - c
            text = " ".join(w.replace("not_", "not ", 1) for w in toks)
            rows.append(FlipRow(part.texts[b], text, pos, old, toks[pos], float(h.output[b]),
                                predicted, float(actual), LABELS[c], LABELS[after]))
    return HotFlipInfo(tuple(rows), time.perf_counter() - t)
