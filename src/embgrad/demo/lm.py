"""A tiny causal language model trained in seconds on the demo sentences, for attribution of
generated tokens (:func:`embgrad.attribute_generation`).

Each training sequence is a demo sentence, then ``is``, then its label word: ``"the plot was
really dull is negative"``. A GRU language model (embedding → GRU → linear over the vocabulary)
learns the next token everywhere, so after ``is`` it predicts the label, which only the planted
words (possibly negated) decide. The attribution of the label token's log-probability should
therefore point at the planted words; :func:`generation_info` measures how often it does.

PyTorch only (imported inside the functions).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import LABELS, DemoData, SentimentData, Vocab, is_planted

__all__ = ["TrainedLM", "train_lm", "lm_vocab", "GenerationInfo", "generation_info", "SEPARATOR"]

SEPARATOR = "<sentiment>"


def lm_vocab(vocab: Vocab) -> Vocab:
    """The demo vocabulary with the separator and the label words added (where missing)."""
    extra = tuple(t for t in (SEPARATOR, *LABELS) if t not in vocab)
    return Vocab(vocab.tokens + extra)


def _sequences(split: SentimentData, vocab: Vocab) -> list[list[int]]:
    return [[vocab.id(t) for t in toks] + [vocab.id(SEPARATOR), vocab.id(LABELS[int(y)])]
            for toks, y in zip(split.tokens, split.labels, strict=True)]


@dataclass(frozen=True, eq=False)
class TrainedLM:
    """``model``: the torch module (ids (B, T) → logits (B, T, V)), in eval mode; ``vocab``;
    ``losses`` per epoch; ``seconds`` of training; ``accuracy``: the share of test sentences
    whose most likely token after ``is`` is their label."""

    model: Any
    vocab: Vocab
    losses: list[float]
    seconds: float
    accuracy: float

    def __repr__(self) -> str:
        return (f"TrainedLM(V={len(self.vocab)}, final loss {self.losses[-1]:.3f}, label accuracy "
                f"{self.accuracy:.1%}, {self.seconds:.1f} s)")


def _model(V: int, dim: int, hidden: int, seed: int) -> Any:
    import torch
    from torch import nn

    class TinyCausalLM(nn.Module):
        """Embedding → GRU → Linear: a causal language model (each position sees only its past)."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(V, dim, padding_idx=Vocab.PAD)
            self.rnn = nn.GRU(dim, hidden, batch_first=True)
            self.out = nn.Linear(hidden, V)

        def forward(self, ids: Any) -> Any:
            return self.out(self.rnn(self.embed(ids))[0])

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyCausalLM()


def train_lm(data: DemoData, *, seed: int = 0, epochs: int = 4, dim: int = 24, hidden: int = 48,
             batch_size: int = 64, lr: float = 0.01) -> TrainedLM:
    """Train the tiny causal LM on ``data.train`` (next-token cross-entropy, Adam): seconds on a CPU."""
    import torch

    from .models import _one_thread

    vocab = lm_vocab(data.vocab)
    seqs = _sequences(data.train, vocab)
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), Vocab.PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    model = _model(len(vocab), dim, hidden, seed)
    params = list(model.parameters())
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    rng = np.random.default_rng([seed, 18])
    losses: list[float] = []
    t0 = time.perf_counter()
    n = 0
    with _one_thread():
        for _ in range(epochs):
            total, count = 0.0, 0
            for idx in np.array_split(rng.permutation(len(seqs)), max(1, len(seqs) // batch_size)):
                x = ids[torch.as_tensor(idx)]
                logits = model(x[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         ignore_index=Vocab.PAD)
                grads = torch.autograd.grad(loss, params)
                n += 1
                with torch.no_grad():                    # Adam (Kingma & Ba, 2015), written out
                    for p, g, (m1, m2) in zip(params, grads, state, strict=True):
                        m1.lerp_(g, 0.1)
                        m2.lerp_(g * g, 0.001)
                        p.sub_(lr * (m1 / (1 - 0.9 ** n)) / ((m2 / (1 - 0.999 ** n)).sqrt() + 1e-8))
                total, count = total + float(loss.detach()) * len(idx), count + len(idx)
            losses.append(total / count)
    model.eval()
    seconds = time.perf_counter() - t0
    test = _sequences(data.test, vocab)
    acc = _label_accuracy(model, test, vocab)
    return TrainedLM(model, vocab, losses, seconds, acc)


def _label_accuracy(model: Any, seqs: list[list[int]], vocab: Vocab) -> float:
    import torch

    labels = [vocab.id(w) for w in LABELS]
    hits = 0
    with torch.no_grad():
        for s in seqs:                                   # test-time check only, not a hot path
            logits = model(torch.tensor([s[:-1]]))[0, -1]
            hits += int(labels[int(torch.argmax(logits[labels]))] == s[-1]
                        and int(torch.argmax(logits)) in labels)
    return hits / max(1, len(seqs))


@dataclass(frozen=True, eq=False)
class GenerationInfo:
    """Attribution of the label token after the separator for some test sentences: ``result``
    the :class:`embgrad.GenerationAttribution` (gradient × input), ``planted`` per sentence a bool
    array over its prompt tokens, ``hits[method]`` the share of sentences whose top-|score|
    sentence token (the separator left out) is planted, ``lm``: the trained model's facts."""

    result: Any
    planted: list[np.ndarray]
    hits: dict[str, float]
    lm: TrainedLM
    seconds: float

    @property
    def hit(self) -> float:
        """The share for gradient × input (the method of ``result``)."""
        return self.hits["grad_x_input"]

    def __repr__(self) -> str:
        shares = ", ".join(f"{m} {h:.0%}" for m, h in self.hits.items())
        return f"GenerationInfo({len(self.planted)} sentences, top token planted: {shares}, {self.lm!r})"


def generation_info(data: DemoData, sentences: SentimentData, *, seed: int = 0, steps: int = 32) -> GenerationInfo:
    """Train the tiny causal LM and attribute each sentence's label token to its prompt with
    saliency, gradient × input and integrated gradients (zero baseline)."""
    from ..generation import METHODS, attribute_generation

    t0 = time.perf_counter()
    lm = train_lm(data, seed=seed)
    v = lm.vocab
    prompts = [[v.id(t) for t in toks] + [v.id(SEPARATOR)] for toks in sentences.tokens]
    targets = [[v.id(LABELS[int(y)])] for y in sentences.labels]
    planted = [np.array([is_planted(t) for t in toks] + [False]) for toks in sentences.tokens]
    hits, results = {}, {}
    for method in METHODS:
        r = attribute_generation(lm.model, prompts, targets, method=method, steps=steps, tokenizer=list(v.tokens),
                                 progress=False)
        top = [int(np.argmax(np.abs(r.prompt_scores(i)[0][:-1]))) for i in range(len(prompts))]
        hits[method] = float(np.mean([planted[i][t] for i, t in enumerate(top)]))
        results[method] = r
    return GenerationInfo(results["grad_x_input"], planted, hits, lm, time.perf_counter() - t0)
