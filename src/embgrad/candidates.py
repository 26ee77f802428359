"""Token-substitution candidates at large vocabularies: HotFlip / GCG first-order scores
g_p · E[v] for every position p and vocabulary row v, computed in chunks of the vocabulary with
a running top-k per position — never the (positions × V) one-hot gradient.

HotFlip (Ebrahimi et al., 2018) ranks swaps of token t → v at position p by (E[v] − e_p) · g_p;
GCG (Zou et al., 2023) ranks them by the gradient with respect to the one-hot input,
(onehot_p @ E)' = g_p · E[v], the same numbers up to a per-position constant. AllenNLP's
HotFlip built that one-hot gradient and capped the vocabulary at 5,000 for memory; here the
extra memory is O(P · k) for the kept candidates plus one bounded chunk (``budget`` elements for
the chunk's embeddings and for its scores), whatever V.

Also: the convention-free whole-word filter used by ``candidates="words"``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .backends import Backend, EmbeddingInfo

__all__ = ["top_candidates", "whole_word_ids"]


def top_candidates(b: Backend, info: EmbeddingInfo, grads: Any, current: np.ndarray, cand: np.ndarray,
                   k: int, sign: float = 1.0, budget: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """The k best replacement tokens per position by ``sign · g_p · E[v]``.

    Args:
        grads: framework float tensor (P, D): the gradient at each position.
        current: NumPy int64 (P,): the token now at each position (never its own candidate).
        cand: NumPy int64 (C,): the admissible replacement ids.
        k: candidates kept per position.
        sign: +1 to rank by the largest g·E[v], −1 by the smallest.
        budget: elements of one chunk's embeddings (chunk × D) and scores (P × chunk).

    Returns:
        ``(values, ids)``: NumPy (P, min(k, C)) float64 ``sign · g_p · E[v]`` sorted descending,
        and int64 candidate ids (−1 and −inf where a position has fewer admissible candidates).
        The vocabulary is read in chunks of ``budget // max(P, D)`` rows through the layer's own
        lookup (``Backend.embed``), so any scaling the layer applies is included.
    """
    P, C = int(grads.shape[0]), int(cand.size)
    kk = int(min(k, C))
    best_v = np.full((P, 0), -np.inf)
    best_i = np.zeros((P, 0), np.int64)
    if P == 0 or kk == 0:
        return np.full((P, kk), -np.inf), np.full((P, kk), -1, np.int64)
    D = int(info.dim)
    chunk = max(1, min(C, int(budget) // max(P, D, 1)))
    dt = b.ops.dtype_name(grads)
    cur = b.ops.reshape(b.ops.from_numpy(current.astype(np.int64), like=grads), (-1, 1))
    with b.ops.no_grad():
        for c0 in range(0, C, chunk):
            cid = cand[c0:c0 + chunk]
            cid_t = b.ops.from_numpy(cid, like=grads)
            E = b.ops.cast(b.embed(info, cid_t), dt)                       # (c, D)
            sc = b.ops.matmul_t(grads, E)                                  # (P, c)
            if sign < 0:
                sc = -sc
            same = b.ops.cast(cur == b.ops.reshape(cid_t, (1, -1)), dt)
            v, i = b.ops.topk(sc - same * 1e30, int(min(kk, cid.size)))
            v_np = np.asarray(b.ops.to_numpy(v), dtype=np.float64)
            i_np = cid[np.asarray(b.ops.to_numpy(i), dtype=np.int64)]
            v_np[v_np < -1e29] = -np.inf
            allv = np.concatenate([best_v, v_np], axis=1)
            alli = np.concatenate([best_i, i_np], axis=1)
            order = np.argsort(-allv, axis=1, kind="stable")[:, :kk]
            best_v = np.take_along_axis(allv, order, 1)
            best_i = np.take_along_axis(alli, order, 1)
    best_i = np.where(np.isfinite(best_v), best_i, -1)
    return best_v, best_i


def whole_word_ids(tokenizer: Any, V: int) -> np.ndarray:
    """NumPy bool (V,): ids that are a whole word on their own, read from the tokenizer's own
    behaviour, not from "##"/"Ġ"/"▁" markers: the token decodes to alphabetic text w, and the
    tokenizer encodes " w" (a word in running text) to exactly that one id. For a plain
    vocabulary (no encoder): alphabetic strings.

    Raises:
        TypeError: ``tokenizer`` is neither a tokenizer nor a sequence of token strings.
    """
    ids = list(range(V))
    if hasattr(tokenizer, "batch_decode") and callable(tokenizer):
        texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
        words = [t.strip() for t in texts]
        alpha = np.char.isalpha(np.array(words, dtype=str)) if words else np.zeros(0, bool)
        keep = np.zeros(V, dtype=bool)
        idx = np.flatnonzero(alpha)
        if idx.size:
            enc = tokenizer([" " + words[i] for i in idx], add_special_tokens=False)["input_ids"]
            ok = np.array([len(e) == 1 and int(e[0]) == int(i) for e, i in zip(enc, idx, strict=True)], dtype=bool)
            keep[idx[ok]] = True
        return keep
    from .attribution.swaps import _vocab_strings
    strs = np.array(_vocab_strings(tokenizer, V), dtype=str)
    return np.char.isalpha(strs)
