"""Word-level aggregation of token scores from the tokenizer's character offsets.

A word is a maximal run of non-whitespace characters of the text (``split=r"\\S+"``, or any
regular expression). Each token belongs to the word that holds its first non-space character,
found from its character span: a fast (Rust) tokenizer's ``return_offsets_mapping``, or, for a
slow (Python) tokenizer, which has no offsets, the lengths of the tokenizer's own decoding of
growing prefixes of the ids. No tokenizer-specific marker ("##", "Ġ", "▁") is read. Special
tokens (empty spans) stay units of their own.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import EmbgradError

__all__ = ["REDUCTIONS", "WordScores", "aggregate", "token_spans", "word_groups"]

REDUCTIONS = ("sum", "max", "mean")


@dataclass(frozen=True, eq=False, repr=False)
class WordScores:
    """Scores aggregated over words: ``scores`` NumPy (n_rows, n_words); ``words`` the column
    labels (the text of each word, or a special token's string); ``rows`` the row labels;
    ``token_word``: NumPy int (n_tokens,), the column of each token; ``reduce``: how."""

    scores: np.ndarray
    words: list[str]
    rows: list[str]
    token_word: np.ndarray
    reduce: str

    def __repr__(self) -> str:
        return (f"WordScores({self.scores.shape[0]} rows x {len(self.words)} words, reduce={self.reduce}, "
                f"words={self.words[:6]}{'...' if len(self.words) > 6 else ''})")


def token_spans(tokenizer: Any, text: str | None, ids: Sequence[int] | np.ndarray, *, add_special_tokens: bool = True,
                decode: bool = True) -> tuple[str, np.ndarray] | None:
    """``(text, spans)``: character spans NumPy int (n, 2) of the tokens ``ids`` in ``text``.

    Fast tokenizers: the offsets of ``tokenizer(text, return_offsets_mapping=True)``, which must
    give exactly ``ids``. Slow tokenizers (no offsets), or text that does not encode to ``ids``:
    the text is the tokenizer's decoding of ``ids`` and token k spans the characters that the
    decoding of ``ids[:k+1]`` adds to that of ``ids[:k]`` (with ``decode=False``: None instead).

    Raises:
        EmbgradError: ``tokenizer`` is not a Hugging Face tokenizer (no ``decode``).
    """
    ids = [int(i) for i in ids]
    if not hasattr(tokenizer, "decode"):
        raise EmbgradError(f"word aggregation needs a Hugging Face tokenizer (offsets or decode), got "
                           f"{type(tokenizer).__name__}.")
    if text is not None:
        try:
            enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            if [int(i) for i in enc["input_ids"]] == ids:
                return text, np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        except (NotImplementedError, ValueError, TypeError, KeyError):
            pass                      # a slow tokenizer: no offsets
    if not decode:
        return None
    ends = [0]
    for k in range(1, len(ids) + 1):
        s = tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        ends.append(max(ends[-1], len(s)))
    full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    e = np.minimum(np.asarray(ends, dtype=np.int64), len(full))
    return full, np.stack([e[:-1], e[1:]], axis=1)


def word_groups(text: str, spans: np.ndarray, tokens: Sequence[str] | None = None, split: str = r"\S+"
                ) -> tuple[np.ndarray, list[str]]:
    """``(token_word, words)``: the word index of each token (NumPy int (n,)) and the words'
    strings. A token is in the word holding its first non-space character; a token with an
    empty (or all-space) span is a unit of its own, labelled ``tokens[k]``. ``spans``: int
    (n, 2) character spans (from :func:`token_spans`); ``split``: the regular expression of a
    word.

    Raises:
        re.error: ``split`` is not a valid regular expression.
    """
    matches = [(m.start(), m.end()) for m in re.finditer(split, text)]
    starts = np.array([a for a, _ in matches], dtype=np.int64)
    token_word = np.empty(len(spans), dtype=np.int64)
    words: list[str] = []
    seen: dict[int, int] = {}
    for k, (a, b) in enumerate(np.asarray(spans).tolist()):
        piece = text[a:b]
        first = a + (len(piece) - len(piece.lstrip())) if b > a else -1
        w = int(np.searchsorted(starts, first, side="right")) - 1 if first >= 0 and first < b else -1
        if w >= 0 and first >= matches[w][1]:
            w = -1
        if w < 0:
            words.append(str(tokens[k]) if tokens is not None else text[a:b])
            token_word[k] = len(words) - 1
            continue
        if w not in seen:
            seen[w] = len(words)
            words.append(text[matches[w][0]:matches[w][1]])
        token_word[k] = seen[w]
    return token_word, words


def aggregate(scores: np.ndarray, token_word: np.ndarray, n_words: int, reduce: str = "sum",
              axis: int = -1) -> np.ndarray:
    """Scores (..., n_tokens, ...) aggregated along ``axis`` to (..., n_words, ...): the sum,
    the max or the mean of each word's tokens (a segment reduction; NumPy float64).
    ``token_word``: int (n_tokens,) word index of each token (from :func:`word_groups`).

    Raises:
        EmbgradError: ``reduce`` is not one of :data:`REDUCTIONS`; ``scores`` has another
            number of tokens along ``axis`` than ``token_word``.
    """
    if reduce not in REDUCTIONS:
        raise EmbgradError(f"reduce={reduce!r}: choose one of {', '.join(REDUCTIONS)}.")
    s = np.moveaxis(np.asarray(scores, dtype=np.float64), axis, 0)
    if s.shape[0] != len(token_word):
        raise EmbgradError(f"{s.shape[0]} token scores for {len(token_word)} tokens.")
    out = np.zeros((n_words,) + s.shape[1:])
    if reduce == "max":
        out.fill(-np.inf)
        np.maximum.at(out, token_word, s)
    else:
        np.add.at(out, token_word, s)
        if reduce == "mean":
            counts = np.bincount(token_word, minlength=n_words).reshape((-1,) + (1,) * (s.ndim - 1))
            out = out / np.maximum(counts, 1)
    return np.moveaxis(out, 0, axis)
