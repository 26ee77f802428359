"""``embgrad influence``: which training sentences drove each test prediction (TracInCP over the
embedding gradients, :mod:`embgrad.influence`), and which training labels look wrong
(self-influence), written as one self-contained HTML page.

Two sources of model and data:

* the built-in demo (:func:`demo_influence`): the tiny classifier trained on the synthetic
  sentiment data, whose training split has deliberately flipped labels (``train.flipped``,
  ``label_noise=0.02``); checkpoints after epochs 2, 4 and 6 with the trainer's learning rate;
* a local Hugging Face sequence classifier (:func:`model_influence`) with a text file of
  training sentences, one per line, optionally ``LABEL<TAB>sentence`` (without a label the
  model's own prediction is used, as TracIn does for unlabelled data).

Frameworks are imported inside the functions only.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .. import influence as inf
from ..errors import EmbgradError

__all__ = ["InfluencePage", "demo_influence", "model_influence", "read_training_file", "render_influence",
           "write_influence"]

TOP_FRACTION = 0.05        # the self-influence ranking shows (and scores flipped labels in) the top 5 %


@dataclass(frozen=True, eq=False)
class InfluencePage:
    """Everything the page shows. ``train_labels`` / ``test_labels`` / ``test_predicted`` are label
    names; ``flipped`` bool (N,) marks training labels known to be wrong (demo), else None;
    ``influences`` the top proponents/opponents of each test sentence; ``self_influence`` (N,);
    ``recall`` recall@n of the projected top proponents against exact ones where measured."""

    source: str
    model_name: str
    mode: str
    k: int | None
    exact_rows: int
    checkpoints: tuple[tuple[str, float], ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[str, ...]
    flipped: np.ndarray | None
    test_texts: tuple[str, ...]
    test_labels: tuple[str, ...]
    test_predicted: tuple[str, ...]
    influences: inf.Influences
    self_influence: np.ndarray
    recall: float | None
    seconds: float
    command: str

    @property
    def ranking(self) -> np.ndarray:
        """Training indices by decreasing self-influence."""
        return np.argsort(-self.self_influence, kind="stable")

    @property
    def top_count(self) -> int:
        return max(1, round(TOP_FRACTION * len(self.train_texts)))

    def flipped_found(self) -> tuple[int, int]:
        """(flipped labels among the top 5 % by self-influence, flipped labels in all)."""
        if self.flipped is None:
            return 0, 0
        top = self.ranking[:self.top_count]
        return int(self.flipped[top].sum()), int(self.flipped.sum())

    def __repr__(self) -> str:
        return (f"InfluencePage({self.source}, {len(self.train_texts)} training × {len(self.test_texts)} test "
                f"sentences, {self.mode}{f' k={self.k}' if self.k else ''})")


def _loss(model: Any, batch: Any) -> Any:
    import torch
    x, y = batch
    out = model(**x) if isinstance(x, dict) else model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


def _collect(ckpts: list, train_b: list, test_b: list, mode: str, k: int, layers: Any,
             progress: bool, exact_rows: int = 0, metric: str = "dot",
             ) -> tuple[inf.Influences, np.ndarray, inf.ExactIndex | inf.ProjectedIndex, Any]:
    index = inf.collect(ckpts, train_b, _loss, layers=layers, mode=mode, k=k, progress=progress,
                        exact_rows=exact_rows if mode == "projected" else 0, description="training set")
    query = inf.collect(ckpts, test_b, _loss, like=index, progress=False)
    return index.top(query, n=5, metric=metric), index.self_influence(), index, query


def demo_influence(seed: int = 0, mode: str = "projected", k: int = 1024, tests: Sequence[str] | int = 6,
                   progress: bool = True, step: Callable[[str], None] | None = None,
                   command: str = "embgrad influence", exact_rows: int = 0, metric: str = "dot") -> InfluencePage:
    """TracInCP on the demo: the torch demo classifier after epochs 2, 4 and 6 (lr 0.02, the
    trainer's Adam step size, as in Pruthi et al. 2020 §3.1), its 1,600 training sentences
    (2 % flipped labels), and ``tests`` (test sentences, or how many of the test split).

    With ``mode="projected"`` the exact top proponents are computed too (the demo is small) and
    their recall@5 is on the page.

    Raises:
        EmbgradError: an unknown ``mode`` or ``metric``, a bad ``k`` or ``exact_rows`` (as
            :func:`embgrad.influence.collect`); ``tests`` an int below 1 or an empty list.
        ImportError: torch is not installed (the demo model is a torch model).
    """

    from ..demo.models import _one_thread

    with _one_thread():       # a tiny model: threads only add synchronisation (see demo.models)
        return _demo_influence(seed, mode, k, tests, progress, step, command, exact_rows, metric)


def _demo_influence(seed: int, mode: str, k: int, tests: Sequence[str] | int, progress: bool,
                    step: Callable[[str], None] | None, command: str, exact_rows: int,
                    metric: str) -> InfluencePage:
    import torch

    from ..demo import LABELS, demo_data, train

    t0 = time.perf_counter()
    say = step or (lambda _: None)
    data = demo_data(seed=seed)
    say("training the demo model (3 checkpoints)")
    epochs = (2, 4, 6)
    ckpts = [inf.Checkpoint(train(data, "torch", epochs=e, seed=seed).model, 0.02, f"epoch {e}") for e in epochs]
    final = ckpts[-1].model
    if isinstance(tests, int):
        if tests < 1:
            raise EmbgradError(f"--tests must be at least 1, got {tests}.")
        texts = list(data.test.texts[:tests])
        ids, labels = data.test.ids[:tests], data.test.labels[:tests]
    else:
        texts = [str(t) for t in tests]
        if not texts:
            raise EmbgradError("no test sentences given.")
        max_len = max(data.train.ids.shape[1], *(len(data.vocab.tokenize(t)) for t in texts))
        ids = data.vocab.encode(texts, max_len=max_len)
        with torch.no_grad():
            labels = final(torch.as_tensor(ids)).argmax(1).numpy()
    with torch.no_grad():
        pred = final(torch.as_tensor(ids)).argmax(1).numpy()
    X, Y = torch.as_tensor(data.train.ids), torch.as_tensor(data.train.labels)
    train_b = [(X[i:i + 128], Y[i:i + 128]) for i in range(0, len(X), 128)]
    test_b = [(torch.as_tensor(ids), torch.as_tensor(np.asarray(labels, dtype=np.int64)))]
    say("collecting gradients")
    top, si, _, _ = _collect(ckpts, train_b, test_b, mode, k, "embedding", progress, exact_rows, metric)
    recall = None
    if mode == "projected":
        say("checking against exact mode")
        exact, _, _, _ = _collect(ckpts, train_b, test_b, "exact", k, "embedding", False, 0, metric)
        recall = inf.recall_at(top.proponents, exact.proponents)
    return InfluencePage(
        f"demo (seed {seed})", "TinyClassifier (torch)", mode, k if mode == "projected" else None, exact_rows,
        tuple((c.name, c.lr) for c in ckpts), tuple(data.train.texts),
        tuple(LABELS[i] for i in data.train.labels), data.train.flipped.copy(), tuple(texts),
        tuple(LABELS[i] for i in labels), tuple(LABELS[i] for i in pred), top, si, recall,
        time.perf_counter() - t0, command)


def read_training_file(path: str | Path, labels: Sequence[str]) -> tuple[list[str], list[int | None]]:
    """Sentences and label indices (None where a line has no label) of a text file: one sentence
    per line, optionally ``LABEL<TAB>sentence`` with LABEL a label name or index; blank lines skipped.

    Raises:
        EmbgradError: the file cannot be read (or is not UTF-8), holds no sentence, or a line
            names a label that is neither one of ``labels`` nor an index of one.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EmbgradError(f"cannot read the training file {str(p)!r}: {e}.") from None
    texts: list[str] = []
    ys: list[int | None] = []
    names = {n.lower(): i for i, n in enumerate(labels)}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep:
            texts.append(line.strip())
            ys.append(None)
            continue
        key = label.strip().lower()
        if key in names:
            ys.append(names[key])
        elif key.isdigit() and int(key) < len(labels):
            ys.append(int(key))
        else:
            raise EmbgradError(f"{p.name} line {n}: unknown label {label.strip()!r}; the model's labels are "
                               f"{', '.join(labels)} (or their indices 0..{len(labels) - 1}).")
        texts.append(text.strip())
    if not texts:
        raise EmbgradError(f"the training file {str(p)!r} holds no sentence (one per line, optionally LABEL<TAB>text).")
    return texts, ys


def model_influence(model_dir: str | Path, train_file: str | Path, tests: Sequence[str], mode: str = "projected",
                    k: int = 1024, batch_size: int = 16, progress: bool = True,
                    step: Callable[[str], None] | None = None, command: str = "embgrad influence",
                    exact_rows: int = 8, metric: str = "dot") -> InfluencePage:
    """TracIn (one checkpoint, lr 1) on a local Hugging Face sequence classifier, over its input
    (word) embedding table: the training sentences of ``train_file`` against ``tests`` (their
    predicted labels). Texts longer than the model's limit are truncated. ``exact_rows``: rows kept
    exactly outside the projection (the [CLS] row carries most of a BERT gradient; see
    :func:`embgrad.influence.collect`).

    Raises:
        EmbgradError: what :func:`~embgrad.report.explain.load_model` refuses (no model or
            tokenizer files, a tokenizer of another model); a model that is not a sequence
            classifier; no ``tests``; a bad training file (:func:`read_training_file`); a bad
            ``mode``, ``k``, ``exact_rows`` or ``metric`` (as :func:`embgrad.influence.collect`).
    """
    import torch

    from .explain import load_model

    t0 = time.perf_counter()
    say = step or (lambda _: None)
    say("loading the model")
    loaded = load_model(model_dir)
    if loaded.kind != "classifier" or not loaded.labels:
        raise EmbgradError(f"{str(model_dir)!r} holds a {loaded.kind} model; embgrad influence needs a sequence "
                           "classifier (…ForSequenceClassification), whose loss defines the gradients.")
    if not tests:
        raise EmbgradError("no test sentences given: pass them as arguments (embgrad influence --model DIR "
                           "--train FILE 'a test sentence' ...).")
    texts, ys = read_training_file(train_file, loaded.labels)
    model, tok = loaded.model, loaded.tokenizer

    def encode(batch: Sequence[str]) -> dict:
        return dict(tok(list(batch), padding=True, truncation=True, max_length=loaded.max_length,
                        return_tensors="pt"))

    def predict(batch: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            return model(**encode(batch)).logits.argmax(-1).numpy()

    missing = [i for i, y in enumerate(ys) if y is None]
    if missing:
        guessed = np.concatenate([predict([texts[i] for i in missing[s:s + batch_size]])
                                  for s in range(0, len(missing), batch_size)])
        for i, g in zip(missing, guessed, strict=True):
            ys[i] = int(g)
    y_all = torch.as_tensor(np.asarray(ys, dtype=np.int64))
    train_b = [(encode(texts[s:s + batch_size]), y_all[s:s + batch_size]) for s in range(0, len(texts), batch_size)]
    pred = predict(list(tests))
    test_b = [(encode(list(tests)), torch.as_tensor(pred))]
    layer = model.get_input_embeddings()
    say("collecting gradients")
    top, si, _, _ = _collect([inf.Checkpoint(model, 1.0, "saved model")], train_b, test_b, mode, k, [layer],
                             progress, exact_rows, metric)
    names = loaded.labels
    return InfluencePage(
        str(model_dir), type(model).__name__, mode, k if mode == "projected" else None, exact_rows,
        (("saved model", 1.0),),
        tuple(texts), tuple(names[int(y)] for y in y_all), None, tuple(tests),
        tuple(names[int(p)] for p in pred), tuple(names[int(p)] for p in pred), top, si, None,
        time.perf_counter() - t0, command)


# ----------------------------------------------------------------------------- HTML
def render_influence(page: InfluencePage) -> str:
    """The self-contained HTML page (inline CSS, no scripts, no URLs; every text escaped)."""
    from .. import __version__
    from .html import _label, _Raw, _table, esc

    css = resources.files("embgrad.report").joinpath("style.css").read_text(encoding="utf-8")
    flipped = page.flipped if page.flipped is not None else np.zeros(len(page.train_texts), bool)
    found, total = page.flipped_found()
    ck = ", ".join(f"{n} (lr {lr:g})" for n, lr in page.checkpoints)
    how = (f"projected to k = {page.k} by a seeded sparse Johnson–Lindenstrauss sketch"
           + (f" (the {page.exact_rows} heaviest rows kept exactly)" if page.exact_rows else "")
           if page.mode == "projected"
           else "exact sparse inner products")
    cards = [(f"{len(page.train_texts):,}", "training sentences"), (f"{len(page.test_texts)}", "test sentences"),
             (page.mode + (f", k={page.k}" if page.k else ""), "gradients")]
    if page.recall is not None:
        cards.append((f"{page.recall:.0%}", "recall@5 of projected vs exact proponents"))
    if page.flipped is not None:
        cards.append((f"{found} / {total}", f"flipped labels in the top {TOP_FRACTION:.0%} by self-influence"))
    if page.influences.metric == "cosine":
        note = ("Scores are cosines of the gradients (TracInCP divided by both gradient norms): they rank by "
                "direction only; --metric dot gives the raw TracInCP scores, which favour training examples "
                "with large gradients (often the mislabelled ones).")
    else:
        note = ("Raw TracInCP scores favour training examples with large gradients, which are often the "
                "mislabelled ones (★); --metric cosine ranks by direction only.")
    card_html = '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{esc(v)}</div><div class="k">{esc(t)}</div></div>'
        for v, t in cards) + "</div>"

    def rows(idx: np.ndarray, scores: np.ndarray) -> list:
        return [(r + 1, f"{s:+.4g}", _label(page.train_labels[i], bool(flipped[i])), page.train_texts[i])
                for r, (i, s) in enumerate(zip(idx, scores, strict=True))]

    heads = ["#", "score", "label", "training sentence"]
    parts = []
    inf_ = page.influences
    for q, text in enumerate(page.test_texts):
        parts.append(
            f'<section data-section="test-{q}"><h2>“{esc(text)}”</h2><p class="intro">label '
            f"{esc(page.test_labels[q])}, predicted {esc(page.test_predicted[q])}</p>"
            f'<div class="row"><div><h3>Proponents</h3>'
            f"{_table(heads, rows(inf_.proponents[q], inf_.proponent_scores[q]), num=(0, 1))}</div>"
            f"<div><h3>Opponents</h3>"
            f"{_table(heads, rows(inf_.opponents[q], inf_.opponent_scores[q]), num=(0, 1))}</div></div></section>")
    n_top = page.top_count
    ranking = page.ranking[:n_top]
    si_rows = [(r + 1, f"{page.self_influence[i]:.4g}", _label(page.train_labels[i], bool(flipped[i])),
                _Raw('<span class="bad">flipped</span>' if flipped[i] else ""), page.train_texts[i])
               for r, i in enumerate(ranking)]
    found_line = (f" {found} of the {total} training labels flipped on purpose (★) are among these {n_top} "
                  f"({found / max(total, 1):.0%})." if page.flipped is not None else "")
    self_section = (
        f'<section id="self-influence" data-section="self-influence"><h2>Self-influence ranking</h2>'
        f'<p class="intro">TracInCP(z, z) = Σ<sub>c</sub> lr<sub>c</sub> ‖g<sub>c</sub>(z)‖²: how much a training '
        f"sentence's own loss depends on itself. Mislabelled examples have large, persistent gradients, so they "
        f"come first. The top {TOP_FRACTION:.0%} ({n_top} of {len(page.train_texts):,}):{esc(found_line)}</p>"
        f"{_table(['#', 'self-influence', 'label', 'flipped', 'training sentence'], si_rows, num=(0, 1))}</section>")
    intro = (f"TracInCP (Pruthi et al., 2020) over the embedding table's per-example gradients, {how}; "
             f"checkpoints: {ck}. A proponent's gradient step lowers the test sentence's loss, an opponent's "
             f"raises it. Training labels flipped by noise are marked ★.")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>embgrad influence · {esc(page.source)}</title><style>{css}</style></head><body>"
            f"<header><h1>embgrad influence</h1><p>{esc(page.model_name)} on {esc(page.source)}: {esc(intro)}</p>"
            f"<p>{esc(note)}</p></header><main>{card_html}{''.join(parts)}{self_section}</main>"
            f"<footer>Generated by embgrad {esc(__version__)} with <code>{esc(page.command)}</code> in "
            f"{page.seconds:.1f} s. This page loads nothing from the network.</footer></body></html>\n")


def write_influence(page: InfluencePage, path: str | Path) -> Path:
    """Write the page to ``path`` (``path/influence.html`` for a directory); return where.

    Raises:
        EmbgradError: ``path`` (or its folder) cannot be created or written.
    """
    out = Path(path)
    if out.is_dir():
        out = out / "influence.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_influence(page), encoding="utf-8")
    except OSError as e:
        raise EmbgradError(f"cannot write {str(out)!r}: {e.strerror or e}. Pass --out PATH you can write to.") from None
    return out
