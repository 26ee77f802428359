"""The built-in synthetic sentiment data: seeded sentences from a small grammar in which known
("planted") words carry the label, including negation ("not good" is negative).

Framework-neutral: everything is NumPy. The tokenizer merges ``not X`` into one token
``not_X`` when the vocabulary knows it, so a bag-of-embeddings classifier
(embedding → mean pool → linear) can learn negation. Every example records which of its
token positions hold a planted word, to judge attributions against.

>>> data = demo_data(seed=0)
>>> data.train.ids.shape, data.vocab.PAD, data.vocab.UNK
((1600, 10), 0, 1)
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import EmbgradError

__all__ = ["Vocab", "SentimentData", "DemoData", "demo_data", "make_sentences", "build_vocab", "is_planted",
           "POSITIVE", "NEGATIVE", "NEGATOR", "LABELS"]

LABELS: tuple[str, ...] = ("negative", "positive")
POSITIVE: tuple[str, ...] = ("good", "great", "excellent", "wonderful", "brilliant", "superb",
                             "charming", "delightful")
NEGATIVE: tuple[str, ...] = ("bad", "awful", "terrible", "boring", "dull", "dreadful", "poor",
                             "clumsy")
NEGATOR = "not"

# Neutral words, most frequent first: sampled with Zipf-like weights, so the table has
# frequent and rare rows (the report plots gradient norm against token frequency).
_NOUNS = ("movie", "film", "plot", "acting", "story", "cast", "ending", "script", "music",
          "director", "dialogue", "pacing", "soundtrack", "cinematography", "sequel", "premise",
          "finale", "editing", "costumes", "screenplay", "villain", "narrator")
_ADVERBS = ("really", "very", "quite", "truly", "rather", "simply")
_OPENERS = ("honestly", "overall", "frankly", "today", "sadly", "luckily", "again", "somehow")
_TEMPLATES = (
    # (template, negatable): {n} noun, {a} adverb (maybe empty), {j} planted adjective
    ("the {n} was {a}{j}", True),
    ("this {n} is {a}{j}", True),
    ("i thought the {n} was {a}{j}", True),
    ("{o} the {n} was {a}{j}", True),
    ("the {n} was {a}{j} and the {n2} was {j2}", True),
    ("a {j} {n}", False),
    ("what a {j} {n}", False),
    ("{o} a {a}{j} {n} with a {j2} {n2}", False),
)


def _zipf(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** 1.1
    return w / w.sum()


@dataclass(frozen=True)
class Vocab:
    """Token ↔ id. ``PAD = 0`` pads sequences, ``UNK = 1`` stands for unknown words.

    Tokenization lower-cases, splits on whitespace and merges ``not X`` into ``not_X`` when
    that token is in the vocabulary (so negation is visible to a bag-of-embeddings model).
    """

    tokens: tuple[str, ...]

    PAD = 0
    UNK = 1

    def __post_init__(self) -> None:
        if self.tokens[:2] != ("<pad>", "<unk>"):
            raise EmbgradError(f"a Vocab starts with '<pad>', '<unk>', got {self.tokens[:2]}.")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._index  # type: ignore[attr-defined]

    def id(self, token: str) -> int:
        """The id of ``token`` (``UNK`` if unknown)."""
        return self._index.get(token, self.UNK)  # type: ignore[attr-defined]

    def tokenize(self, text: str) -> list[str]:
        """Words of ``text``, with ``not X`` merged into ``not_X`` where the vocabulary has it."""
        return _merge_negation(text.lower().split(), self)

    def encode(self, texts: Sequence[str], max_len: int | None = None) -> np.ndarray:
        """int64 (B, T) ids, right-padded with PAD; T = ``max_len`` or the longest text.

        Raises EmbgradError for an empty text, or one longer than ``max_len`` tokens.
        """
        if isinstance(texts, str):
            raise EmbgradError(f"encode needs a list of texts, got the string {texts[:40]!r}; "
                               "wrap a single text in a list.")
        return self.encode_tokens([self.tokenize(t) for t in texts], max_len)

    def encode_tokens(self, token_lists: Sequence[Sequence[str]], max_len: int | None = None) -> np.ndarray:
        """int64 (B, T) ids of already tokenized texts (see :meth:`encode`)."""
        if isinstance(token_lists, str) or not len(token_lists):
            raise EmbgradError("encode needs a non-empty list of texts, got "
                               f"{token_lists!r}; wrap a single text in a list.")
        lengths = [len(t) for t in token_lists]
        if min(lengths) == 0:
            raise EmbgradError(f"text #{lengths.index(0) + 1} is empty: there is nothing to classify.")
        T = max(lengths) if max_len is None else int(max_len)
        if max(lengths) > T:
            i = int(np.argmax(lengths))
            raise EmbgradError(f"text #{i + 1} has {lengths[i]} tokens, more than max_len={T}; "
                               "shorten it or pass a larger max_len.")
        ids = np.full((len(token_lists), T), self.PAD, dtype=np.int64)
        for b, toks in enumerate(token_lists):
            ids[b, :len(toks)] = [self.id(t) for t in toks]
        return ids

    def decode(self, ids: np.ndarray) -> list[list[str]]:
        """Tokens of each row of an (B, T) id array, padding dropped."""
        ids = np.asarray(ids)
        return [[self.tokens[i] for i in row if i != self.PAD] for row in ids.reshape(len(ids), -1)]

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {', '.join(self.tokens[:6])}, ...)"


def _merge_negation(words: list[str], vocab: Vocab | None = None) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == NEGATOR and i + 1 < len(words):
            merged = f"{NEGATOR}_{words[i + 1]}"
            if vocab is None or merged in vocab:
                out.append(merged)
                i += 2
                continue
        out.append(w)
        i += 1
    return out


def is_planted(token: str) -> bool:
    """True for a label-carrying token: a planted adjective, possibly negated (``not_good``)."""
    word = token[len(NEGATOR) + 1:] if token.startswith(NEGATOR + "_") else token
    return word in POSITIVE or word in NEGATIVE


@dataclass(frozen=True, eq=False)
class SentimentData:
    """One split of the demo data.

    ``texts`` (N,) str; ``tokens`` list of N token lists; ``ids`` int64 (N, T) padded with
    PAD; ``labels`` int64 (N,) (0 negative, 1 positive); ``planted`` bool (N, T): True where
    the token carries the label; ``flipped`` bool (N,): True where label noise replaced the
    label the planted words imply (these examples should have large gradients).
    """

    texts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    ids: np.ndarray
    labels: np.ndarray
    planted: np.ndarray
    vocab: Vocab
    flipped: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def mask(self) -> np.ndarray:
        """bool (N, T): True at real (non-PAD) tokens."""
        return self.ids != Vocab.PAD

    def subset(self, index: Sequence[int] | np.ndarray) -> SentimentData:
        """The examples at ``index`` (in that order)."""
        index = np.asarray(index, dtype=np.int64)
        return SentimentData(tuple(self.texts[i] for i in index), tuple(self.tokens[i] for i in index),
                             self.ids[index], self.labels[index], self.planted[index], self.vocab,
                             self.flipped[index])

    def __repr__(self) -> str:
        pos = float(self.labels.mean()) if len(self) else 0.0
        return (f"SentimentData({len(self)} examples, ids={self.ids.shape}, "
                f"{pos:.0%} positive, vocab={len(self.vocab)})")


@dataclass(frozen=True, eq=False)
class DemoData:
    """The seeded demo data: ``train`` and ``test`` splits sharing one ``vocab``."""

    train: SentimentData
    test: SentimentData
    vocab: Vocab
    seed: int

    @property
    def token_counts(self) -> np.ndarray:
        """int64 (V,): how often each token occurs in the training split (PAD not counted)."""
        ids = self.train.ids[self.train.mask]
        return np.bincount(ids, minlength=len(self.vocab)).astype(np.int64)

    def __repr__(self) -> str:
        return f"DemoData(seed={self.seed}, train={len(self.train)}, test={len(self.test)}, vocab={len(self.vocab)})"


def make_sentences(n: int, seed: int = 0, negation_rate: float = 0.3) -> tuple[list[str], np.ndarray]:
    """``n`` sentences from the grammar and their labels (int64 (n,), 1 = positive).

    Each sentence holds one or two planted adjectives of one effective polarity; with
    probability ``negation_rate`` a negatable sentence puts ``not`` before its adjective(s)
    and the label flips.
    """
    if n <= 0:
        raise EmbgradError(f"make_sentences needs n > 0, got n={n}.")
    rng = np.random.default_rng(seed)
    noun_p, adv_p, op_p = _zipf(len(_NOUNS)), _zipf(len(_ADVERBS)), _zipf(len(_OPENERS))
    texts: list[str] = []
    labels = rng.integers(0, 2, size=n)
    for label in labels:
        template, negatable = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        negate = negatable and rng.random() < negation_rate
        pool = POSITIVE if (label == 1) != negate else NEGATIVE
        neg = f"{NEGATOR} " if negate else ""
        adverb = f"{_ADVERBS[rng.choice(len(_ADVERBS), p=adv_p)]} " if rng.random() < 0.3 else ""
        n1, n2 = rng.choice(len(_NOUNS), size=2, replace=False, p=noun_p)
        j1, j2 = rng.choice(len(pool), size=2)
        texts.append(template.format(
            n=_NOUNS[n1], n2=_NOUNS[n2], a=adverb + neg,
            j=pool[j1], j2=neg + pool[j2], o=_OPENERS[rng.choice(len(_OPENERS), p=op_p)]))
    texts = [re.sub(r"\ba (?=[aeiou])", "an ", t) for t in texts]
    return texts, labels.astype(np.int64)


def build_vocab(texts: Iterable[str], min_count: int = 1) -> Vocab:
    """A vocabulary of the tokens in ``texts`` seen at least ``min_count`` times, most
    frequent first, after ``<pad>`` (0) and ``<unk>`` (1)."""
    counts = Counter(t for text in texts for t in _merge_negation(text.lower().split()))
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return Vocab(("<pad>", "<unk>", *kept))


def _split(texts: list[str], labels: np.ndarray, vocab: Vocab, max_len: int,
           flipped: np.ndarray) -> SentimentData:
    tokens = tuple(tuple(vocab.tokenize(t)) for t in texts)
    ids = vocab.encode_tokens(tokens, max_len)
    planted = np.zeros(ids.shape, dtype=bool)
    for b, toks in enumerate(tokens):
        planted[b, :len(toks)] = [is_planted(t) for t in toks]
    return SentimentData(tuple(texts), tokens, ids, labels ^ flipped, planted, vocab, flipped)


def demo_data(seed: int = 0, n_train: int = 1600, n_test: int = 400,
              negation_rate: float = 0.3, label_noise: float = 0.02) -> DemoData:
    """The seeded demo data set: same seed, same sentences, vocabulary and ids.

    A fraction ``label_noise`` of the training labels is flipped (``train.flipped``); the
    test labels are clean.
    """
    if n_train < 1 or n_test < 1 or not 0.0 <= label_noise < 0.5:
        raise EmbgradError(f"demo_data needs n_train, n_test >= 1 and 0 <= label_noise < 0.5, got "
                           f"n_train={n_train}, n_test={n_test}, label_noise={label_noise}.")
    texts, labels = make_sentences(n_train + n_test, seed=seed, negation_rate=negation_rate)
    vocab = build_vocab(texts[:n_train])
    tokens = [vocab.tokenize(t) for t in texts]
    max_len = max(len(t) for t in tokens)
    flipped = np.random.default_rng([seed, 1]).random(n_train) < label_noise
    train = _split(texts[:n_train], labels[:n_train], vocab, max_len, flipped)
    test = _split(texts[n_train:], labels[n_train:], vocab, max_len, np.zeros(n_test, dtype=bool))
    return DemoData(train, test, vocab, seed)
