"""``embgrad explain``: token attributions for a local Hugging Face model, written as HTML.

Two kinds of model directory (``save_pretrained`` output, loaded offline, never downloaded):

* a sequence classifier (``*ForSequenceClassification``): explains the logit of a target label
  (default: the predicted one) for each text;
* a sentence-embedding model (a sentence-transformers directory, e.g. all-MiniLM-L6-v2):
  explains the cosine similarity between each text's pooled embedding and the embedding of a
  ``compare`` text.

Integrated gradients use a "pad" baseline that keeps the special tokens ([CLS], [SEP]): the
path then only removes the words, as Captum's tutorials recommend for BERT-style models.
Transformers (PyTorch) is imported inside the functions only.
"""
from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .._html import token_heatmap
from ..errors import EmbgradError, closest_names

__all__ = ["LoadedModel", "Explanation", "load_model", "explain", "write_explanation", "write_page", "check_out_file",
           "DEFAULT_METHODS"]

DEFAULT_METHODS = ("grad_x_input", "integrated_gradients")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A local model: ``kind`` is "classifier", "sentence-embedding" or "causal-lm"; ``labels`` the class
    names (classifier); ``pooling`` how token states become a sentence vector (embedding
    model); ``max_length`` the most tokens the model takes."""

    path: Path
    model: Any
    tokenizer: Any
    kind: str
    labels: tuple[str, ...] | None
    pooling: str | None
    max_length: int

    def __repr__(self) -> str:
        what = f"labels={list(self.labels)}" if self.labels else f"pooling={self.pooling}"
        return (f"LoadedModel({str(self.path)!r}, {type(self.model).__name__}, {self.kind}, {what}, "
                f"max_length={self.max_length})")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pooling(path: Path) -> str:
    """The pooling of a sentence-transformers directory (mean if it does not say)."""
    modules = _read_json(path / "modules.json") or []
    for m in modules if isinstance(modules, list) else []:
        if str(m.get("type", "")).endswith("Pooling"):
            cfg = _read_json(path / m.get("path", "") / "config.json") or {}
            for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
                              ("pooling_mode_mean_tokens", "mean")):
                if cfg.get(key):
                    return name
    return "mean"


#: files from which transformers builds a real tokenizer (fast or slow, any family)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model", "merges.txt")


def _check_tokenizer(path: Path, tokenizer: Any, vocab: Any) -> None:
    """Refuse a directory without tokenizer files (transformers then builds a tiny default
    tokenizer that turns every word into [UNK]) and a tokenizer whose vocabulary does not fit
    the model's embedding table (``config.vocab_size``)."""
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise EmbgradError(
            f"{str(path)!r} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}): embgrad explain "
            "would explain every word as an unknown token. Save the tokenizer next to the model "
            "(tokenizer.save_pretrained(MODEL_DIR)).")
    n = len(tokenizer)
    # a model may pad its table past the tokenizer (vocab_size rounded up to a multiple of 64/128),
    # never the reverse; a tokenizer much smaller than the table is another model's tokenizer
    if isinstance(vocab, int) and vocab > 0 and (n > vocab or n < 0.5 * vocab):
        raise EmbgradError(
            f"the tokenizer in {str(path)!r} has {n:,} tokens but the model's embedding table has "
            f"config.vocab_size = {vocab:,} rows: they do not belong together. Save the model's own "
            "tokenizer next to it (tokenizer.save_pretrained(MODEL_DIR)).")


def load_model(model_dir: str | Path) -> LoadedModel:
    """Load a local Hugging Face classifier or sentence-embedding model, offline.

    Raises:
        EmbgradError: ``model_dir`` is not a directory holding a model (config.json, weights
            and tokenizer files), or its tokenizer does not fit the model's vocabulary.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise EmbgradError(f"MODEL_DIR {str(model_dir)!r} is not a directory. embgrad explain loads a local "
                           "Hugging Face model (the output of save_pretrained); it never downloads one.")
    config_path = path / "config.json"
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise EmbgradError(f"{str(path)!r} is not a Hugging Face model directory: "
                           f"{'config.json is not valid JSON' if config_path.exists() else 'it has no config.json'} "
                           "(expected config.json, model weights and tokenizer files, as save_pretrained writes).")
    import transformers  # local_files_only=True below: never a download (the CLI also sets HF_HUB_OFFLINE)

    arch = " ".join(config.get("architectures") or [])
    classifier = "ForSequenceClassification" in arch
    causal = "ForCausalLM" in arch or "LMHeadModel" in arch
    auto: Any = (transformers.AutoModelForSequenceClassification if classifier
                 else transformers.AutoModelForCausalLM if causal else transformers.AutoModel)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise EmbgradError(f"could not load the tokenizer in {str(path)!r} offline: {e}".rstrip()
                           + " (it needs tokenizer files next to config.json).") from None
    _check_tokenizer(path, tokenizer, config.get("vocab_size"))
    try:
        model = auto.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise EmbgradError(f"could not load the model in {str(path)!r} offline: {e}".rstrip()
                           + " (it needs weights and tokenizer files next to config.json).") from None
    model.eval()
    limits = [int(v) for v in (getattr(model.config, "max_position_embeddings", None),
                               getattr(tokenizer, "model_max_length", None)) if v and int(v) < 1_000_000]
    max_length = min(limits) if limits else 512
    if classifier:
        id2label = model.config.id2label or {}
        labels = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels))
        return LoadedModel(path, model, tokenizer, "classifier", labels, None, max_length)
    if causal:        # explained by embgrad.report.generation (attribute_generation)
        return LoadedModel(path, model, tokenizer, "causal-lm", None, None, max_length)
    if not (path / "modules.json").exists() and not hasattr(model, "get_input_embeddings"):
        raise EmbgradError(f"{str(path)!r} holds a {arch or 'model'} that is neither a sequence classifier nor "
                           "a sentence-embedding model; embgrad explain needs one of those.")
    return LoadedModel(path, model, tokenizer, "sentence-embedding", None, _pooling(path), max_length)


@dataclass(frozen=True, eq=False)
class Explanation:
    """Attributions of ``texts``: ``tokens`` per text, ``scores[method]`` NumPy (B, T),
    ``mask`` (B, T) real tokens, ``special`` (B, T) special tokens; ``targets`` describe what was
    explained; ``values`` the explained output per text (logit, or cosine similarity);
    ``probabilities`` of the target (classifier); ``deltas`` completeness gaps of integrated
    gradients; ``truncated`` indices of texts cut to ``max_length``."""

    model: LoadedModel
    texts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    scores: dict[str, np.ndarray]
    mask: np.ndarray
    special: np.ndarray
    targets: tuple[str, ...]
    values: np.ndarray
    probabilities: np.ndarray | None
    deltas: np.ndarray | None
    compare: str | None
    truncated: tuple[int, ...]
    seconds: float
    predicted: tuple[str, ...] | None = None
    predicted_probabilities: np.ndarray | None = None
    requested: bool = False

    def target_line(self, b: int) -> str:
        """One line saying what was explained for text ``b``: the target (requested, or the
        predicted label by default) with its logit and probability, and the model's prediction
        beside it; or the cosine similarity for a sentence-embedding model."""
        if self.probabilities is None:
            return f"explained: {self.targets[b]} = {self.values[b]:.3f}"
        how = "requested target" if self.requested else "target (the predicted label)"
        line = (f"{how}: {self.targets[b]} (logit {self.values[b]:.3f}, probability "
                f"{self.probabilities[b]:.1%})")
        if self.predicted is not None and self.predicted_probabilities is not None and (
                self.requested or self.predicted[b] != self.targets[b]):
            line += f"; the model predicts {self.predicted[b]} ({self.predicted_probabilities[b]:.1%})"
        return line

    def top_tokens(self, method: str, b: int, k: int = 5) -> list[tuple[str, float, int]]:
        """The ``k`` non-special tokens of text ``b`` with the largest |score|, positive or negative
        (a token that lowers the output counts as much as one that raises it):
        ``(token, score, position)``, position counted from 1 over the text's tokens (special
        tokens included), so repeated words stay apart."""
        s = self.scores[method][b]
        keep = np.flatnonzero(self.mask[b] & ~self.special[b])
        order = keep[np.argsort(-np.abs(s[keep]), kind="stable")][:k]
        return [(self.tokens[b][t], float(s[t]), int(t) + 1) for t in order]

    def __repr__(self) -> str:
        return f"Explanation({len(self.texts)} texts, methods={list(self.scores)}, targets={list(self.targets)})"


def _resolve_target(loaded: LoadedModel, target: str | int | None) -> int | None:
    if target is None:
        return None
    labels = loaded.labels or ()
    text = str(target).strip()
    for i, name in enumerate(labels):
        if text.lower() == name.lower():
            return i
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(labels):
        return int(text)
    raise EmbgradError(f"label {target!r} does not exist in {loaded.path.name!r}: its labels are "
                       f"{', '.join(f'{i}={n!r}' for i, n in enumerate(labels))} (closest: "
                       f"{closest_names(text, labels)}). Pass --target NAME or --target INDEX.")


def _encode(loaded: LoadedModel, texts: Sequence[str], truncate: bool) -> tuple[dict, tuple[int, ...]]:
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise EmbgradError(f"text #{i + 1} is empty ({t!r}): there is nothing to explain. Pass non-empty text.")
    # verbose=False: embgrad's own warning below says what happens; transformers' would come first
    lengths = [len(loaded.tokenizer(t, truncation=False, verbose=False)["input_ids"]) for t in texts]
    long = tuple(i for i, n in enumerate(lengths) if n > loaded.max_length)
    if long and not truncate:
        i = long[0]
        raise EmbgradError(f"text #{i + 1} has {lengths[i]} tokens, more than the model's limit of "
                           f"{loaded.max_length}; shorten it, or allow truncation (drop --no-truncate).")
    if long:
        warnings.warn(f"text(s) {', '.join(f'#{i + 1} ({lengths[i]} tokens)' for i in long)} exceed the model's "
                      f"limit of {loaded.max_length} tokens and were truncated; the explanation covers the "
                      "kept tokens only.", stacklevel=3)
    enc = loaded.tokenizer(list(texts), padding=True, truncation=True, max_length=loaded.max_length,
                           return_tensors="pt", return_special_tokens_mask=True)
    return dict(enc), long


def _pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """(B, T, H) token states → (B, H) sentence vectors, padding ignored."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        return (hidden - (1 - m) * 1e9).max(1).values
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def explain(loaded: LoadedModel, texts: Sequence[str], *, target: str | int | None = None,
            methods: Sequence[str] = DEFAULT_METHODS, compare: str | None = None, steps: int = 50,
            truncate: bool = True) -> Explanation:
    """Attribute each text's target output to its tokens with :func:`embgrad.attribution.attribute`.

    Classifier: the logit of ``target`` (a label name or index; default the predicted label).
    Sentence-embedding model: the cosine similarity to ``compare`` (required). ``truncate``:
    cut texts longer than the model's limit with a warning (else EmbgradError).

    Raises:
        EmbgradError: no text, an unknown method, ``compare`` given to a classifier or missing for
            a sentence-embedding model, a ``target`` label the model does not have, or (with
            ``truncate=False``) a text longer than the model's limit.
    """
    import torch

    from ..attribution import METHODS, attribute

    t0 = time.perf_counter()
    texts = list(texts) if not isinstance(texts, str) else [texts]
    if not texts:
        raise EmbgradError("no text given: pass at least one text to explain.")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise EmbgradError(f"unknown method {bad[0] if bad else None!r}; choose from {', '.join(METHODS)}.")
    if loaded.kind == "classifier" and compare is not None:
        raise EmbgradError(f"--compare explains the similarity of two texts under a sentence-embedding model, "
                           f"but {loaded.path.name!r} is a classifier (labels {', '.join(loaded.labels or ())}); "
                           "use --target LABEL instead.")
    if loaded.kind == "sentence-embedding" and compare is None:
        raise EmbgradError(f"{loaded.path.name!r} is a sentence-embedding model: pass --compare \"OTHER TEXT\" "
                           "to explain the cosine similarity of each text to it.")
    if loaded.kind == "sentence-embedding" and target is not None:
        raise EmbgradError(f"{loaded.path.name!r} is a sentence-embedding model and has no labels; drop "
                           "--target (the explained output is the cosine similarity to --compare).")
    enc, long = _encode(loaded, texts, truncate)
    special = enc.pop("special_tokens_mask").bool()
    inputs = {k: v for k, v in enc.items()}
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    baseline = torch.where(special, ids, torch.full_like(ids, pad))   # words → [PAD], specials kept
    model = loaded.model
    probabilities = predicted_probabilities = None
    predicted: tuple[str, ...] | None = None
    with torch.no_grad():
        if loaded.kind == "classifier":
            logits = model(**inputs).logits.float()
            idx = _resolve_target(loaded, target)
            argmax = logits.argmax(-1)
            chosen = argmax if idx is None else torch.full((len(texts),), idx)
            probs = torch.softmax(logits, -1)
            probabilities = probs.gather(1, chosen[:, None])[:, 0].numpy()
            predicted = tuple((loaded.labels or ())[int(c)] for c in argmax)
            predicted_probabilities = probs.gather(1, argmax[:, None])[:, 0].numpy()
            values = logits.gather(1, chosen[:, None])[:, 0].numpy()
            targets = tuple((loaded.labels or ())[int(c)] for c in chosen)
            target_arg: Any = chosen.tolist()
            forward = None
        else:
            assert compare is not None and loaded.pooling is not None   # checked above; set by the loader
            pooling = loaded.pooling
            other, _ = _encode(loaded, [compare], truncate)
            other.pop("special_tokens_mask")
            ref = _pool(model(**other).last_hidden_state, other["attention_mask"], pooling)[0]
            ref = ref / ref.norm()

            def forward(m: Any, **kw: Any) -> Any:
                return _pool(m(**kw).last_hidden_state, kw["attention_mask"], pooling)

            def target_arg(out: Any) -> Any:
                return (out * ref).sum(-1) / out.norm(dim=-1).clamp(min=1e-12)

            values = target_arg(forward(model, **inputs)).numpy()
            targets = tuple(f"cosine similarity to {compare!r}" for _ in texts)
    scores, deltas = {}, None
    for method in methods:
        a = attribute(model, inputs, target_arg, method=method, steps=steps, forward=forward,
                      baseline=baseline if method == "integrated_gradients" else None,
                      tokens=loaded.tokenizer, progress=False)
        scores[method] = a.scores
        if a.delta is not None:
            deltas = a.delta
        tokens = tuple(tuple(row) for row in a.tokens or ())
    return Explanation(loaded, tuple(texts), tokens, scores, mask.numpy().astype(bool),
                       special.numpy().astype(bool), targets, np.asarray(values, np.float64),
                       probabilities, deltas, compare, long, time.perf_counter() - t0, predicted,
                       predicted_probabilities, loaded.kind == "classifier" and target is not None)


_HEADING = 80   # characters of a text shown in its section's heading

#: what the page says about the methods (and what the README says about `embgrad explain`)
_TRUST = ("Integrated gradients (IG) are exact in one sense: their scores add up to the change of the "
          "explained output from the baseline to the text, up to the completeness gap shown under each "
          "text. Gradient × input is the first-order, one-point approximation of the same thing; where the "
          "model is not linear in the embeddings the two can disagree, even in sign. Trust IG when its gap "
          "is small next to the output; use gradient × input as a fast preview. The IG baseline replaces every "
          "word by [PAD] and keeps the special tokens ([CLS], [SEP]) — the same baseline the API gives "
          "with baseline=IDS (an id tensor: the pad id at words, the input's ids at special tokens). Special "
          "tokens are held fixed on that path, so IG gives them nothing; for the same reason they are left "
          "out of every method's heatmap and top tokens here.")


def _shorten(text: str, n: int = _HEADING) -> str:
    """``text`` on one line, cut to ``n`` characters with an ellipsis."""
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1].rstrip() + "…"


def check_out_file(path: str | Path) -> Path:
    """Where :func:`write_explanation` writes for ``path`` (``path/explain.html`` for a
    directory), checked before any work: its folder exists (or is made) and can be written.

    Raises:
        EmbgradError: the folder cannot be made or written to.
    """
    import tempfile

    out = Path(path)
    if out.is_dir():
        out = out / "explain.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise EmbgradError(f"cannot write {str(out)!r}: {e.strerror or e}. Pass --out PATH in a directory "
                           "you can write to.") from None
    return out


def write_explanation(ex: Explanation, path: str | Path) -> Path:
    """Write ``ex`` as one self-contained HTML page (inline CSS, no scripts, no URLs); return its
    path (``path``, or ``path/explain.html`` for a directory).

    Raises:
        EmbgradError: the page cannot be written there.
    """
    from .._html import color_legend
    from .html import _table, esc

    check_out_file(path)
    m = ex.model
    what = (f"the logit of the target label (labels: {', '.join(m.labels or ())})" if m.kind == "classifier"
            else f"the cosine similarity of each text's {m.pooling}-pooled embedding to “{ex.compare}”")
    parts = []
    shown = ex.mask & ~ex.special
    for b, text in enumerate(ex.texts):
        maps = "".join("<div>" + token_heatmap([list(ex.tokens[b])], ex.scores[meth][b:b + 1],
                                               mask=shown[b:b + 1], title=meth.replace("_", " "),
                                               legend=color_legend()) + "</div>"
                       for meth in ex.scores)
        top = _table(["method", "top tokens by |score| (word @ position)"], [
            (meth.replace("_", " "), ", ".join(f"{t} @{p} ({s:+.3g})" for t, s, p in ex.top_tokens(meth, b)))
            for meth in ex.scores])
        note = " <b>(truncated)</b>" if b in ex.truncated else ""
        delta = "" if ex.deltas is None else f"; integrated-gradients completeness gap {ex.deltas[b]:+.1e}"
        full = "" if len(text) <= _HEADING else f'<p class="intro">Full text: {esc(text)}</p>'
        parts.append(f'<section data-section="text-{b}"><h2>#{b + 1} “{esc(_shorten(text))}”{note}</h2>{full}'
                     f'<p class="intro">{esc(ex.target_line(b))}{esc(delta)}</p>'
                     f'<div class="heatmaps">{maps}</div>{top}</section>')
    header = (f"{esc(type(m.model).__name__)} from {esc(str(m.path))}: token attributions of {esc(what)}. "
              "Red raises it, blue lowers it.")
    return write_page(path, m.path.name, header, "Which to trust", _TRUST, "".join(parts), ex.seconds)


def write_page(path: str | Path, name: str, header: str, intro_title: str, intro: str, body: str,
               seconds: float) -> Path:
    """Write one self-contained ``embgrad explain`` page (inline CSS, no scripts, no URLs) to
    ``path`` (``path/explain.html`` for a directory): ``header`` and ``body`` are HTML, ``name``
    and the intro are text (escaped here). Returns the path.

    Raises:
        EmbgradError: the page cannot be written there.
    """
    from .html import esc

    out = check_out_file(path)
    css = resources.files("embgrad.report").joinpath("style.css").read_text(encoding="utf-8")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>embgrad explain · {esc(name)}</title><style>{css}</style></head><body>"
            f"<header><h1>embgrad explain</h1><p>{header}</p></header>"
            f"<main><section data-section=\"methods\"><h2>{esc(intro_title)}</h2><p class=\"intro\">"
            f"{esc(intro)}</p></section>{body}</main><footer>Generated by embgrad explain in {seconds:.1f} s. "
            "This page loads nothing from the network.</footer></body></html>\n")
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise EmbgradError(f"cannot write {str(out)!r}: {e.strerror or e}. Pass --out PATH in a directory "
                           "you can write to.") from None
    return out
