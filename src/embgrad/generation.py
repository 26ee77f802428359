"""Attribution for language models that generate: which prompt tokens (and earlier generated
tokens) drove each target token.

For a causal language model and a prompt x₁..x_P with target tokens y₁..y_K (a forced
continuation, or the model's own greedy generation), the output of interest is each target's
log-probability ``log p(y_j | x, y_<j)``, read at the position before y_j of ONE forward pass
over ``x y₁..y_{K−1}`` (a causal model's logits at a position depend only on the tokens up to
it). :func:`attribute_generation` returns per example an (n_target, n_source) matrix whose
sources are the prompt's tokens and then the earlier target tokens; entry (j, s) is 0 for
s ≥ P + j (a token cannot drive what precedes it), which is checked, not assumed.

How (and how this differs from Captum's ``LLMGradientAttribution``, which runs one full
attribution per target token, n_target × steps forward passes, one prompt at a time):

* the prompts of a batch are packed *right*-padded as ``prompt + targets[:-1]``: with causal
  attention nothing after a position can change it, so every example's numbers are those of
  the example alone (no position ids to fix, unlike left padding); the inputs may come padded
  on either side (the attention mask says which tokens are real);
* every (example, quadrature point) row goes through the model once, and the K targets'
  gradients come from K vector-Jacobian products over that one forward pass
  (:meth:`Backend.value_and_grads`, or with ``vjp="vmap"`` one batched backward pass,
  ``torch.autograd.grad(..., is_grads_batched=True)``). Summing the targets' log-probabilities
  into one backward pass is NOT valid: ∂(Σ_j log p_j)/∂e_s mixes every target after s, and
  the per-target matrix cannot be recovered from the sum;
* integrated gradients reuse :func:`embgrad.attribution.quadrature` and the chunked engine of
  :func:`embgrad.attribute` (memory bounded by ``batch_size`` rows per forward pass).

Integrated gradients move every source along the path (prompt and earlier targets) by
default, so Σ_s scores[j, s] = log p_j(input) − log p_j(baseline) up to ``delta[j]``;
``interpolate="prompt"`` keeps the earlier target tokens at their embeddings, as Captum's
``LLMGradientAttribution`` with ``LayerIntegratedGradients`` does (their scores are then 0).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .attribution.engine import _acc_dtype, _Engine, _per_row, _pick_layer, _refuse_jax
from .attribution.inputs import _baseline, _known_pad_id, _tokens
from .attribution.rules import quadrature
from .attribution.targets import _is_int, _logits
from .backends import Backend, get_backend
from .errors import EmbgradError, closest_names

__all__ = ["METHODS", "GenerationAttribution", "attribute_generation"]

METHODS = ("saliency", "grad_x_input", "integrated_gradients")
_VJP = ("auto", "loop", "vmap")


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False, repr=False)
class GenerationAttribution:
    """The result of :func:`attribute_generation`; lists hold one entry per example i.

    ``scores[i]``: NumPy float32 (n_target_i, n_source_i), n_source_i = n_prompt_i +
    n_target_i − 1 (the last target is never an input): row j attributes target j's
    log-probability to the prompt's tokens (padding excluded) then the earlier target tokens;
    entries at or after the target's own position are 0. ``delta[i]``: NumPy (n_target_i,)
    completeness gaps Σ_s scores[i][j, s] − (log p_j(input) − log p_j(baseline)) for integrated
    gradients, else None. ``prompt_ids[i]`` (n_prompt_i,), ``target_ids[i]`` (n_target_i,):
    NumPy int64. ``log_probs[i]``: NumPy (n_target_i,) natural-log probabilities of the targets;
    ``baseline_log_probs[i]`` at the baseline (integrated gradients). ``source_tokens[i]`` /
    ``target_tokens[i]``: strings when a tokenizer or vocabulary was given. ``evaluations``:
    example rows that went through the model; ``forward_passes``: calls of the model.
    """

    method: str
    scores: list[np.ndarray]
    delta: list[np.ndarray] | None
    prompt_ids: list[np.ndarray]
    target_ids: list[np.ndarray]
    log_probs: list[np.ndarray]
    baseline_log_probs: list[np.ndarray] | None
    layer: str
    baseline: str | None
    rule: str | None
    steps: int | None
    interpolate: str | None
    evaluations: int
    forward_passes: int
    generated: bool
    source_tokens: list[list[str]] | None = None
    target_tokens: list[list[str]] | None = None
    prompt_texts: list[str] | None = None
    target_texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def n_prompt(self, i: int) -> int:
        """Number of prompt tokens of example i (its first sources)."""
        return int(self.prompt_ids[i].shape[0])

    def source_ids(self, i: int) -> np.ndarray:
        """NumPy int64 (n_source_i,): the prompt's ids, then the earlier target ids."""
        return np.concatenate([self.prompt_ids[i], self.target_ids[i][:-1]])

    def prompt_scores(self, i: int) -> np.ndarray:
        """NumPy (n_target_i, n_prompt_i): the columns of the prompt's tokens only."""
        return self.scores[i][:, :self.n_prompt(i)]

    def words(self, i: int, tokenizer: Any, reduce: str = "sum", *, targets: str = "tokens",
              prompt_text: str | None = None, target_text: str | None = None, split: str = r"\S+") -> Any:
        """Example i's scores aggregated over words (:mod:`embgrad.words`): the sources' columns
        by ``reduce`` ("sum", "max" or "mean" of the word's subword scores), and with
        ``targets="words"`` the targets' rows summed per word (a word's log-probability is the
        sum of its tokens'). Word boundaries come from the tokenizer's character offsets (fast
        tokenizers) or its decoding (slow ones) of the prompt and target texts (given, kept
        from text inputs, or decoded from the ids). Returns a :class:`embgrad.words.WordScores`.

        Raises:
            EmbgradError: ``targets`` not "tokens"/"words", or a ``reduce`` that
                :func:`embgrad.words.aggregate` does not know.
        """
        from .words import aggregate, token_spans, word_groups
        if targets not in ("tokens", "words"):
            raise EmbgradError(f"targets={targets!r}: choose 'tokens' or 'words'.")
        if prompt_text is None and self.prompt_texts is not None:
            prompt_text = self.prompt_texts[i]
        if target_text is None and self.target_texts is not None:
            target_text = self.target_texts[i]
        ids = np.concatenate([self.prompt_ids[i], self.target_ids[i]])
        p = token_spans(tokenizer, prompt_text, self.prompt_ids[i], add_special_tokens=True, decode=False)
        t = token_spans(tokenizer, target_text, self.target_ids[i], add_special_tokens=False, decode=False)
        if p is not None and t is not None:           # offsets of both texts
            text, spans = p[0] + t[0], np.concatenate([p[1], t[1] + len(p[0])])
        else:                                          # the decoding of prompt and targets together
            text, spans = token_spans(tokenizer, None, ids)                # type: ignore[misc]  # decode=True: never None
        toks = [str(x) for x in tokenizer.convert_ids_to_tokens(ids.tolist())]
        tw, words = word_groups(text, spans, toks, split)
        n_src = self.scores[i].shape[1]
        n_wsrc = int(tw[:n_src].max()) + 1 if n_src else 0
        cols = aggregate(self.scores[i], tw[:n_src], n_wsrc, reduce, axis=1)
        rows = [toks[self.n_prompt(i) + j] for j in range(self.scores[i].shape[0])]
        if targets == "words":
            rw = tw[self.n_prompt(i):]
            first = int(rw.min())
            cols = aggregate(cols, rw - first, int(rw.max()) - first + 1, "sum", axis=0)
            rows = words[first:int(rw.max()) + 1]
        from .words import WordScores
        return WordScores(scores=cols, words=words[:n_wsrc], rows=rows, token_word=tw[:n_src], reduce=reduce)

    def _labels(self, i: int) -> tuple[list[str], list[str]]:
        src = self.source_tokens[i] if self.source_tokens is not None else [f"[{t}]" for t in self.source_ids(i)]
        tgt = self.target_tokens[i] if self.target_tokens is not None else [f"[{t}]" for t in self.target_ids[i]]
        return list(src), list(tgt)

    def to_html(self, title: str | None = None, examples: Sequence[int] | None = None) -> str:
        """A self-contained, escaped HTML fragment: per example the (target × source) matrix
        and, per target, the sources highlighted by that target's scores."""
        from ._html import esc, generation_view
        if title is None:
            title = f"{self.method} of each target token's log-probability, on {self.layer}" + (
                f" ({self.rule}, {self.steps} steps)" if self.method == "integrated_gradients" else "")
        head = f'<div style="font-family:sans-serif;font-weight:600;margin:4px 0">{esc(title)}</div>'
        parts = ['<div class="embgrad-generation">' + head]
        for i in (range(len(self)) if examples is None else examples):
            src, tgt = self._labels(i)
            parts.append(generation_view(src, tgt, self.scores[i], n_prompt=self.n_prompt(i),
                                         log_probs=self.log_probs[i],
                                         delta=None if self.delta is None else self.delta[i],
                                         caption=f"#{i}"))
        parts.append("</div>")
        return "".join(parts)

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s.shape[0]}x{s.shape[1]}" for s in self.scores[:4]) + (", ..." if len(self) > 4 else "")
        parts = [self.method, f"layer={self.layer!r}", f"examples={len(self)}", f"scores=[{shapes}]"]
        if self.method == "integrated_gradients":
            parts += [f"rule={self.rule}", f"steps={self.steps}", f"interpolate={self.interpolate}"]
        if self.generated:
            parts.append("targets=greedy")
        parts.append(f"forward_passes={self.forward_passes}")
        if self.delta is not None and len(self):
            parts.append(f"max|delta|={max(float(np.abs(d).max()) for d in self.delta):.2e}")
        return f"GenerationAttribution({', '.join(parts)})"


# ----------------------------------------------------------------------------- inputs
def _int_rows(x: Any, what: str) -> list[np.ndarray] | None:
    """A list of 1-D int arrays from a list of sequences of ints, else None."""
    if not isinstance(x, (list, tuple)) or not x:
        return None
    rows = []
    for r in x:
        if isinstance(r, (str, bytes)) or not hasattr(r, "__len__"):
            return None
        a = np.asarray(r)
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            return None
        rows.append(a.astype(np.int64))
    return rows


def _encode(tokenizer: Any, texts: list[str], what: str, special: bool) -> list[np.ndarray]:
    if tokenizer is None or not callable(tokenizer):
        raise EmbgradError(f"{what} given as text need tokenizer= (a Hugging Face tokenizer) to become ids; "
                           "or pass token ids.")
    enc = tokenizer(texts, add_special_tokens=special)["input_ids"]
    return [np.asarray(r, dtype=np.int64) for r in enc]


def _prompts(b: Backend, inputs: Any, mask: Any, tokenizer: Any) -> tuple[list[np.ndarray], str, dict]:
    """(prompts without padding, kind of model input "dict"/"tensor"/"auto", extra dict entries)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        return _encode(tokenizer, list(inputs), "prompts", True), "auto", {}
    rows = _int_rows(inputs, "inputs")
    if rows is not None:
        if mask is not None:
            raise EmbgradError("mask= goes with a padded (B, T) ids tensor; a list of prompts has no padding.")
        return rows, "auto", {}
    extra: dict = {}
    if isinstance(inputs, Mapping):
        d = dict(inputs)
        if "input_ids" not in d:
            raise EmbgradError(f"inputs is a dict without 'input_ids' (keys: {', '.join(map(str, d))}); pass "
                               "the tokenizer's encoding (input_ids, attention_mask) or an ids tensor.")
        ids = d.pop("input_ids")
        if mask is None:
            mask = d.pop("attention_mask", None)
        else:
            d.pop("attention_mask", None)
        for k, v in d.items():
            if hasattr(v, "shape") and len(getattr(v, "shape", ())) >= 2:
                raise EmbgradError(
                    f"inputs[{k!r}] is a per-token tensor of shape {tuple(v.shape)}; attribute_generation "
                    "re-packs the prompts with their targets and cannot extend it: pass input_ids and "
                    "attention_mask only (position ids follow from right padding).")
            extra[k] = v
        kind = "dict"
    else:
        ids, kind = inputs, "tensor"
    a = ids if isinstance(ids, np.ndarray) else np.asarray(b.ops.to_numpy(ids))
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise EmbgradError(f"input ids must be integers (B, T), got shape {a.shape} and dtype {a.dtype}.")
    if mask is None:
        m = np.ones(a.shape, dtype=bool)
    else:
        m = np.asarray(mask if isinstance(mask, np.ndarray) else b.ops.to_numpy(mask))
        if m.ndim == 1:
            m = m[None]
        if m.shape != a.shape:
            raise EmbgradError(f"the attention mask has shape {m.shape} but the ids have shape {a.shape}; "
                               "pass a (B, T) mask, 1 = token, 0 = padding.")
        m = m.astype(bool)
    return [a[i][m[i]].astype(np.int64) for i in range(a.shape[0])], kind, extra


def _targets(targets: Any, B: int, b: Backend, tokenizer: Any) -> list[np.ndarray]:
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
        rows = _encode(tokenizer, list(targets), "targets", False)
    elif isinstance(targets, (list, tuple)) and targets and all(_is_int(t) for t in targets):
        if B != 1:
            raise EmbgradError(f"targets is one flat list of {len(targets)} ids for {B} prompts; pass one list "
                               "of target ids per prompt (targets[i] for example i).")
        rows = [np.asarray(targets, dtype=np.int64)]
    else:
        maybe = _int_rows(targets, "targets")
        if maybe is not None:
            rows = maybe
        else:
            try:
                a = np.asarray(targets if isinstance(targets, np.ndarray) else b.ops.to_numpy(targets))
            except (TypeError, ValueError, AttributeError):
                a = None
            if a is None or a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
                raise EmbgradError(
                    f"targets of type {type(targets).__name__} are not token ids: pass targets[i] = the "
                    "target ids of example i (lists, arrays or a (B, K) tensor), strings with tokenizer=, "
                    "or None for the model's greedy continuation.")
            rows = [r.astype(np.int64) for r in a]
    if len(rows) != B:
        raise EmbgradError(f"{len(rows)} target sequences for {B} prompts; pass one per prompt.")
    for i, r in enumerate(rows):
        if r.size == 0:
            raise EmbgradError(f"example {i} has no target token; give at least one (or targets=None to "
                               "generate greedily).")
    return rows


class _Packer:
    """Right-padded batches ``prompt + targets[:-1]`` and the model inputs built from them."""

    def __init__(self, b: Backend, model: Any, info: Any, kind: str, extra: dict, pad: int):
        self.b, self.model, self.like = b, model, b.table_variable(info)
        if kind == "auto":    # a list of prompts: a Hugging Face model takes keywords, others ids
            kind = "dict" if hasattr(model, "config") and hasattr(model, "get_input_embeddings") else "tensor"
        self.kind, self.extra, self.pad = kind, dict(extra), int(pad)
        cfg = getattr(model, "config", None)
        if kind == "dict" and getattr(cfg, "use_cache", None) is not None and "use_cache" not in self.extra:
            self.extra["use_cache"] = False         # no key/value cache kept for attribution

    def pack(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        T = max(len(s) for s in seqs)
        ids = np.full((len(seqs), T), self.pad, np.int64)
        m = np.zeros((len(seqs), T), np.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
            m[i, :len(s)] = 1
        return ids, m

    def inputs(self, ids: np.ndarray, m: np.ndarray) -> Any:
        b = self.b
        t = b.ops.from_numpy(ids, like=self.like)
        if self.kind == "tensor":
            return t
        return {"input_ids": t, "attention_mask": b.ops.from_numpy(m, like=self.like), **self.extra}


class _GenTargets:
    """(n, K) log-probabilities of the targets of a chunk's rows (0 where an example has fewer)."""

    multi = True

    def __init__(self, b: Backend, positions: np.ndarray, tokens: np.ndarray, valid: np.ndarray, T: int):
        self.b, self.pos, self.tok, self.valid, self.T = b, positions, tokens, valid, T
        self.labels = tuple(f"target {k}" for k in range(tokens.shape[1]))
        self.checked = False

    def __call__(self, outputs: Any, idx: np.ndarray, like: Any) -> Any:
        b, n = self.b, int(idx.shape[0])
        lg = _logits(outputs)
        shape = b.ops.shape(lg) if hasattr(lg, "shape") else None
        if shape is None or len(shape) != 3 or shape[0] != n or shape[1] != self.T:
            raise EmbgradError(
                f"the model returned {type(outputs).__name__} of shape {shape} for {n} sequences of {self.T} "
                "tokens; a causal language model returns logits (batch, tokens, vocabulary). Pass forward= "
                "returning them (e.g. lambda m, **kw: m(**kw).logits).")
        if not self.checked:
            V = int(shape[2])
            hi = int(self.tok[self.valid].max())
            if hi >= V:
                raise EmbgradError(f"target id {hi} is out of range for a model with {V} output logits "
                                   f"(valid 0..{V - 1}).")
            first = np.asarray(b.ops.to_numpy(lg[:1, :1]), dtype=np.float64).reshape(-1)
            if first.min() >= 0 and abs(first.sum() - 1.0) < 1e-3:
                raise EmbgradError(
                    "the model's outputs look like probabilities (non-negative, summing to 1), not logits: "
                    "their log-softmax would be wrong. Pass forward= returning logits, or log-probabilities "
                    "(e.g. forward=lambda m, x: keras.ops.log(m(x))).")
            self.checked = True
        pos = b.ops.from_numpy(self.pos[idx], like=lg)
        tok = b.ops.from_numpy(self.tok[idx], like=lg)
        v = b.ops.log_probs_at(lg, pos, tok)
        w = b.ops.cast(b.ops.from_numpy(self.valid[idx].astype(np.float32), like=lg), b.ops.dtype_name(v))
        return v * w


# ----------------------------------------------------------------------------- greedy
def _greedy(packer: _Packer, call: Callable[[Any], Any], prompts: list[np.ndarray], max_new: int,
            eos: set[int]) -> list[np.ndarray]:
    """The model's greedy continuation of each prompt (argmax, stopping after an end token):
    one forward pass of the right-padded batch per new token (no key/value cache)."""
    b = packer.b
    out: list[list[int]] = [[] for _ in prompts]
    live = np.ones(len(prompts), dtype=bool)
    for _ in range(max_new):
        seqs = [np.concatenate([p, np.asarray(o, np.int64)]) for p, o in zip(prompts, out, strict=True)]
        ids, m = packer.pack(seqs)
        with b.ops.no_grad():
            lg = _logits(call(packer.inputs(ids, m)))
            shape = b.ops.shape(lg)
            if len(shape) != 3:
                raise EmbgradError(f"greedy generation: the model returned logits of shape {shape}, not "
                                   "(batch, tokens, vocabulary).")
            B, T, V = shape
            last = np.array([len(s) - 1 for s in seqs], dtype=np.int64) + np.arange(B, dtype=np.int64) * T
            rows = b.ops.gather(b.ops.reshape(lg, (B * T, V)), b.ops.from_numpy(last, like=lg))
            nxt = np.asarray(b.ops.to_numpy(rows)).argmax(axis=1)
        for i in np.flatnonzero(live):
            out[i].append(int(nxt[i]))
            if int(nxt[i]) in eos:
                live[i] = False
        if not live.any():
            break
    return [np.asarray(o, dtype=np.int64) for o in out]


# ----------------------------------------------------------------------------- main
def attribute_generation(model: Any, inputs: Any, targets: Any = None, method: str = "integrated_gradients",
                         *, layer: Any = None, baseline: Any = None, steps: int = 50,
                         rule: str = "gauss_legendre", interpolate: str = "all",
                         forward: Callable | None = None, batch_size: int | None = None,
                         tokenizer: Any = None, mask: Any = None, pad_id: int | None = None,
                         max_new_tokens: int = 20, eos_token_id: int | Sequence[int] | None = None,
                         vjp: str = "auto", progress: bool | None = None,
                         call: int | None = None) -> GenerationAttribution:
    """Attribute each target token's log-probability under a causal language model to the
    prompt's tokens and the earlier target tokens.

    Args:
        model: a Hugging Face ``*ForCausalLM``, any ``torch.nn.Module`` returning logits
            (B, T, V) (or an object with ``.logits``), or a Keras causal LM returning logits.
        inputs: the prompts: a tokenizer's encoding (dict with ``input_ids`` and
            ``attention_mask``, padded on the left or the right), an ids tensor/array (B, T)
            (with ``mask=`` for padding), a list of id lists (ragged), or text(s) with
            ``tokenizer=``.
        targets: ``targets[i]``: the target ids of example i (list, array, or a (B, K) tensor;
            a flat list for one prompt), text(s) with ``tokenizer=`` (encoded without special
            tokens), or None: the model's greedy continuation (``max_new_tokens``, stopping
            after ``eos_token_id``, default ``config.eos_token_id``), which is then attributed.
        method: ``"saliency"`` (‖∂log p_j/∂e_s‖₂), ``"grad_x_input"`` (∂log p_j/∂e_s · e_s) or
            ``"integrated_gradients"`` (Sundararajan et al., 2017, on the embedding layer's
            output as Captum's ``LayerIntegratedGradients``).
        baseline, steps, rule: as :func:`embgrad.attribute` (baseline None = zero vectors,
            "pad", an int id, ...; ``rule`` from :func:`embgrad.attribution.quadrature`).
        interpolate: ``"all"`` (prompt and earlier targets move from the baseline) or
            ``"prompt"`` (earlier targets stay; Captum ``LLMGradientAttribution``'s convention).
        forward: ``forward(model, **inputs)`` (dict inputs) or ``forward(model, ids)`` returning
            the logits; default ``model(...)``, Hugging Face outputs' ``.logits`` used.
        batch_size: (example × point) rows per forward pass; default from T, D and V.
        tokenizer: a Hugging Face tokenizer (texts, token strings) or a vocabulary (id -> str).
        mask: (B, T) padding mask for an ids tensor (1 = token).
        pad_id: the id filling packed rows (default ``config.pad_token_id``, the layer's padding
            index, ``eos_token_id``, else 0; padding never influences a causal model's tokens).
        vjp: how the K targets' gradients share each forward pass: ``"loop"`` (K backward
            passes over one retained graph), ``"vmap"`` (one batched backward,
            ``is_grads_batched``; PyTorch), ``"auto"`` (vmap on accelerators, loop on CPU, where
            it measured faster). Both exact.
        call: which lookup of the layer when one forward calls it several times.

    Returns:
        :class:`GenerationAttribution`; ``.scores[i]`` NumPy (n_target_i, n_source_i),
        ``.delta[i]`` (n_target_i,) for integrated gradients.

    Raises:
        EmbgradError: unknown method/rule/vjp, targets that do not match the prompts, ids out
            of range, a model whose outputs are not (B, T, V) logits (or look like
            probabilities), or a model that is not causal (a target's score depends on a later
            token).
    """
    if method not in METHODS:
        raise EmbgradError(f"unknown method {method!r} for attribute_generation; choose one of "
                           f"{', '.join(METHODS)} (closest: {closest_names(str(method), METHODS)}).")
    if vjp not in _VJP:
        raise EmbgradError(f"vjp={vjp!r}: choose 'auto', 'loop' or 'vmap'.")
    if interpolate not in ("all", "prompt"):
        raise EmbgradError(f"interpolate={interpolate!r}: choose 'all' (prompt and earlier targets move "
                           "from the baseline) or 'prompt' (earlier targets stay, as Captum).")
    if method == "integrated_gradients":
        if isinstance(steps, str):
            raise EmbgradError(f"attribute_generation takes an int number of steps, got {steps!r}.")
        quadrature(rule, steps)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise EmbgradError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    b = get_backend(model)
    _refuse_jax(b, "embgrad.attribute_generation")
    info = _pick_layer(b, model, layer)
    prompts, kind, extra = _prompts(b, inputs, mask, tokenizer)
    p_texts = _texts(inputs)
    t_texts = _texts(targets)
    B = len(prompts)
    for i, p in enumerate(prompts):
        if p.size == 0:
            raise EmbgradError(f"prompt {i} has no token (all padding); every prompt needs at least one.")
        if p.min() < 0 or p.max() >= info.num_rows:
            bad = int(p.max() if p.max() >= info.num_rows else p.min())
            raise EmbgradError(f"layer {info.name!r}: prompt {i} has id {bad}, out of range for a table of "
                               f"{info.num_rows} rows.")
    cfg = getattr(model, "config", None)
    if pad_id is None:
        pad_id = _known_pad_id(model, info)
    if eos_token_id is None:
        eos_token_id = getattr(cfg, "eos_token_id", None)
    eos: set[int] = set()
    if isinstance(eos_token_id, (int, np.integer)):
        eos = {int(eos_token_id)}
    elif eos_token_id is not None:
        eos = {int(t) for t in eos_token_id}
    if pad_id is None:
        pad_id = min(eos) if eos else 0
    if not 0 <= int(pad_id) < info.num_rows:
        pad_id = 0
    packer = _Packer(b, model, info, kind, extra, int(pad_id))
    calls = [0]

    def fwd(m: Any, *args: Any, **kw: Any) -> Any:
        calls[0] += 1
        return forward(m, *args, **kw) if forward is not None else m(*args, **kw)

    def call_model(inp: Any) -> Any:
        return fwd(model, **inp) if isinstance(inp, dict) else fwd(model, inp)

    generated = targets is None
    if generated:
        tgts = _greedy(packer, call_model, prompts, int(max_new_tokens), eos)
    else:
        tgts = _targets(targets, B, b, tokenizer)
        for i, t in enumerate(tgts):
            if t.min() < 0 or t.max() >= info.num_rows:
                raise EmbgradError(f"layer {info.name!r}: target id {int(t.max())} of example {i} is out of range "
                                   f"for a table of {info.num_rows} rows.")
    nP = np.array([len(p) for p in prompts])
    nK = np.array([len(t) for t in tgts])
    seqs = [np.concatenate([p, t[:-1]]) for p, t in zip(prompts, tgts, strict=True)]
    ids, m = packer.pack(seqs)
    T, K = ids.shape[1], int(nK.max())
    pos = np.zeros((B, K), np.int64)
    tok = np.zeros((B, K), np.int64)
    valid = np.zeros((B, K), bool)
    for i in range(B):
        pos[i, :nK[i]] = nP[i] - 1 + np.arange(nK[i])
        tok[i, :nK[i]] = tgts[i]
        valid[i, :nK[i]] = True
    like = b.table_variable(info)
    on_cpu = "cpu" in str(getattr(like, "device", "cpu")).lower()
    batched = vjp == "vmap" or (vjp == "auto" and not on_cpu)
    if batch_size is None:   # a vmap'd backward holds K copies of the backward's activations
        per_row = T * max(info.dim * (K if batched else min(K, 8)), info.num_rows)
        batch_size = int(min(512, max(1, 2 ** 25 // max(1, per_row))))
    eng = _Engine(model, packer.inputs(ids, m), layer if layer is not None else info.layer, fwd, None,
                  batch_size, progress, call=call, targets=_GenTargets(b, pos, tok, valid, T), batched_vjp=batched)
    scores, delta, fx, f0, base_desc = _run(eng, method, baseline, steps, rule, interpolate, pad_id, m, nP)
    out_s: list[np.ndarray] = []
    out_lp: list[np.ndarray] = []
    out_d: list[np.ndarray] | None = [] if delta is not None else None
    out_b0: list[np.ndarray] | None = [] if f0 is not None else None
    for i in range(B):
        L, k = int(nP[i] + nK[i] - 1), int(nK[i])
        s = scores[:k, i, :L].copy()
        future = np.arange(L)[None, :] > (nP[i] - 1 + np.arange(k))[:, None]
        big = float(np.abs(s).max()) if s.size else 0.0
        leak = float(np.abs(s[future]).max()) if future.any() else 0.0
        if leak > 1e-4 * big + 1e-12:
            j, t = np.argwhere(np.abs(s) * future == leak)[0]
            raise EmbgradError(
                f"example {i}: target {int(j)}'s score depends on source {int(t)}, a token after it (|score| "
                f"{leak:.3g}): the model is not causal (bidirectional attention?). attribute_generation needs a "
                "causal language model; for an encoder use embgrad.attribute.")
        s[future] = 0.0
        out_s.append(s.astype(np.float32))
        out_lp.append(fx[i, :k].copy())
        if out_d is not None and delta is not None:
            out_d.append(delta[i, :k].copy())
        if out_b0 is not None and f0 is not None:
            out_b0.append(f0[i, :k].copy())
    src_tok = tgt_tok = None
    if tokenizer is not None:
        src_tok = [_tokens(tokenizer, s[None])[0] for s in seqs]          # type: ignore[index]
        tgt_tok = [_tokens(tokenizer, t[None])[0] for t in tgts]          # type: ignore[index]
    ig = method == "integrated_gradients"
    return GenerationAttribution(
        method=method, scores=out_s, delta=out_d, prompt_ids=prompts, target_ids=tgts, log_probs=out_lp,
        baseline_log_probs=out_b0, layer=eng.info.name, baseline=base_desc, rule=rule if ig else None,
        steps=int(steps) if ig else None, interpolate=interpolate if ig else None,
        evaluations=eng.evaluations, forward_passes=calls[0], generated=generated,
        source_tokens=src_tok, target_tokens=tgt_tok, prompt_texts=p_texts,
        target_texts=t_texts if not generated else None)


def _texts(x: Any) -> list[str] | None:
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, str) for t in x):
        return list(x)
    return None


def _run(eng: _Engine, method: str, baseline: Any, steps: int, rule: str, interpolate: str, pad_id: int,
         m: np.ndarray, nP: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None, str | None]:
    """Scores NumPy (K, B, T), delta (B, K), the targets' values at the input (B, K), at the
    baseline (B, K) and the baseline's name."""
    b = eng.backend
    obs = eng.observe(grad=method != "integrated_gradients")
    e, fx = obs["e"], obs["values"]
    B, T = m.shape
    dt = _acc_dtype(b, e)
    with b.ops.no_grad():
        mt = b.ops.reshape(b.ops.cast(b.ops.from_numpy(m.astype(np.float32), like=e), dt), (B, T, 1))
    if method == "saliency":
        with b.ops.no_grad():
            sc = [b.ops.to_numpy(b.ops.sqrt(b.ops.sum((b.ops.cast(g, dt) * mt) ** 2, axis=2))) for g in obs["grads"]]
        return np.stack(sc).astype(np.float64), None, fx, None, None
    if method == "grad_x_input":
        with b.ops.no_grad():
            ec = b.ops.cast(e, dt) * mt
            sc = [b.ops.to_numpy(b.ops.sum(b.ops.cast(g, dt) * ec, axis=2)) for g in obs["grads"]]
        return np.stack(sc).astype(np.float64), None, fx, None, None
    e0, desc = _baseline(eng, baseline, obs, pad_id)
    if interpolate == "prompt":
        pm = (np.arange(T)[None, :] < nP[:, None]).astype(np.float32)
        with b.ops.no_grad():
            pt = b.ops.cast(b.ops.reshape(b.ops.from_numpy(pm, like=e), (B, T, 1)), b.ops.dtype_name(e))
            e0 = e0 * pt + e * (1 - pt)
    with b.ops.no_grad():
        diff = b.ops.cast(e, dt) - b.ops.cast(e0, dt)
    f0 = eng.values_at(e0)
    nodes, w = quadrature(rule, int(steps))
    idx = np.repeat(np.arange(B, dtype=np.int64), len(nodes))
    alpha = np.tile(nodes, B)

    def point(ix: np.ndarray, sl: slice, call: Any) -> Any:
        it = b.ops.from_numpy(ix, like=e)
        a = _per_row(b, alpha[sl], e, b.ops.dtype_name(e))
        return b.ops.gather(e0, it) + a * b.ops.cast(b.ops.gather(diff, it), b.ops.dtype_name(e))

    acc = eng.accumulate(idx, np.tile(w, B), point, e, f"integrated gradients ({len(nodes)} points)")
    with b.ops.no_grad():
        sc = [b.ops.to_numpy(b.ops.sum(g * diff * mt, axis=2)) for g in acc]
    S = np.stack(sc).astype(np.float64)                               # (K, B, T)
    delta = S.sum(axis=2).T - (fx - f0)
    return S, delta, fx, f0, desc



def hotflip_generation(model: Any, inputs: Any, targets: Any, k: int = 10, *, direction: str = "increase",
                       candidates: Any = None, tokenizer: Any = None, verify: bool = True, layer: Any = None,
                       forward: Callable | None = None, mask: Any = None, pad_id: int | None = None,
                       batch_size: int | None = None) -> Any:
    """HotFlip / GCG single-token swaps in the prompts that most raise (``direction="increase"``,
    GCG's aim: Zou et al., 2023) or lower the log-probability of the whole continuation,
    Σ_j log p(y_j | x, y_<j), of a causal language model.

    Candidates come from :func:`embgrad.candidates.top_candidates` (the vocabulary in chunks,
    top-k per position, never a (positions × V) one-hot gradient); only prompt tokens are swapped;
    ``verify`` runs each kept swap through the model (``.actual``). ``inputs``, ``targets``,
    ``tokenizer``, ``mask``, ``pad_id``, ``forward``: as :func:`attribute_generation` (targets
    required); ``candidates``: as :func:`embgrad.hotflip` (None, "words", ids, a (V,) mask or a
    predicate on token strings). Returns :class:`embgrad.attribution.HotFlip`; its positions
    index the prompt's tokens (padding excluded), ``output`` is the continuation's log-probability.

    Raises:
        EmbgradError: as :func:`attribute_generation` and :func:`embgrad.hotflip`.
    """
    from .attribution import hotflip
    if targets is None:
        raise EmbgradError("hotflip_generation needs the continuation to raise or lower: pass targets.")
    b = get_backend(model)
    _refuse_jax(b, "embgrad.generation.hotflip_generation")
    info = _pick_layer(b, model, layer)
    prompts, kind, extra = _prompts(b, inputs, mask, tokenizer)
    tgts = _targets(targets, len(prompts), b, tokenizer)
    if pad_id is None:
        pad_id = _known_pad_id(model, info)
    packer = _Packer(b, model, info, kind, extra, int(pad_id) if pad_id is not None else 0)
    ids, m = packer.pack([np.concatenate([p, t[:-1]]) for p, t in zip(prompts, tgts, strict=True)])
    B, T = ids.shape
    K = max(len(t) for t in tgts)
    pos = np.zeros((B, K), np.int64)
    tok = np.zeros((B, K), np.int64)
    valid = np.zeros((B, K), bool)
    for i, (p, t) in enumerate(zip(prompts, tgts, strict=True)):
        pos[i, :len(t)] = len(p) - 1 + np.arange(len(t))
        tok[i, :len(t)] = t
        valid[i, :len(t)] = True
    gen = _GenTargets(b, pos, tok, valid, T)

    def continuation_log_prob(outputs: Any, idx: Any) -> Any:
        lp = gen(outputs, np.asarray(b.ops.to_numpy(idx), dtype=np.int64), None)
        return b.ops.sum(lp, axis=1)

    in_prompt = np.arange(T)[None, :] < np.array([len(p) for p in prompts])[:, None]
    return hotflip(model, packer.inputs(ids, m), continuation_log_prob, k=k,
                   layer=layer if layer is not None else info.layer, candidates=candidates, direction=direction,
                   verify=verify, tokenizer=tokenizer, positions=in_prompt, forward=forward,
                   batch_size=batch_size, mask=m.astype(bool))
