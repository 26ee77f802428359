"""``hotflip`` (Ebrahimi et al., 2018): first-order single-token swaps from one gradient."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..candidates import top_candidates, whole_word_ids
from ..errors import EmbgradError
from .engine import _acc_dtype, _Engine, _values_np
from .inputs import _known_pad_id, _mask, _tokens
from .results import HotFlip
from .targets import _is_int

__all__ = ["hotflip"]

def _candidate_ids(candidates: Any, V: int, tokenizer: Any, exclude: set[int]) -> np.ndarray:
    """Sorted int64 ids allowed as replacements."""
    if candidates is None:
        keep = np.ones(V, dtype=bool)
    elif isinstance(candidates, str):
        if candidates != "words":
            raise EmbgradError(f"candidates={candidates!r}: pass 'words', ids, a (V,) bool mask, or a "
                               "callable token -> bool.")
        if tokenizer is None:
            raise EmbgradError("candidates='words' needs tokenizer= (to read the vocabulary's strings).")
        keep = whole_word_ids(tokenizer, V)
    elif callable(candidates):
        if tokenizer is None:
            raise EmbgradError("a callable candidates filter is called on token strings: pass tokenizer= "
                               "(a tokenizer or a vocabulary), or give candidate ids instead.")
        keep = np.array([bool(candidates(s)) for s in _vocab_strings(tokenizer, V)], dtype=bool)
    else:
        arr = np.asarray(candidates)
        if arr.size == 0:
            raise EmbgradError(f"candidates={candidates!r} is empty, so there is no replacement token to "
                               "try: pass at least one candidate id, or candidates=None for every id.")
        if arr.dtype == bool:
            if arr.shape != (V,):
                raise EmbgradError(f"a candidates mask must be bool ({V},), got shape {arr.shape}.")
            keep = arr.copy()
        elif np.issubdtype(arr.dtype, np.integer) and arr.ndim == 1:
            if arr.size and (arr.min() < 0 or arr.max() >= V):
                raise EmbgradError(f"candidate id {int(arr.max() if arr.max() >= V else arr.min())} is out of "
                                   f"range for a table of {V} rows.")
            keep = np.zeros(V, dtype=bool)
            keep[arr] = True
        else:
            raise EmbgradError(f"candidates of dtype {arr.dtype} and shape {arr.shape}: pass 1-D int ids, a "
                               f"({V},) bool mask, 'words', or a callable token -> bool.")
    if exclude:
        keep[np.array(sorted(i for i in exclude if 0 <= i < V), dtype=np.int64)] = False
    ids = np.flatnonzero(keep).astype(np.int64)
    if not ids.size:
        raise EmbgradError("the candidates filter leaves no replacement token; loosen it.")
    return ids


def _vocab_strings(tokenizer: Any, V: int) -> list[str]:
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(s) for s in tokenizer.convert_ids_to_tokens(list(range(V)))]
    if hasattr(tokenizer, "tokens") and not isinstance(tokenizer, (list, tuple)):
        tokenizer = tokenizer.tokens
    strs = [str(tokenizer[i]) for i in range(min(V, len(tokenizer)))]
    return strs + [""] * (V - len(strs))


def hotflip(model: Any, inputs: Any, target: Any, k: int = 10, layer: Any = None,
            candidates: Any = None, *, direction: str = "decrease", verify: bool = False,
            tokenizer: Any = None, positions: Any = None, forward: Callable | None = None,
            batch_size: int | None = None, mask: Any = None, call: int | None = None) -> HotFlip:
    """HotFlip (Ebrahimi et al., 2018): the k single-token swaps per example that most lower
    (``direction="decrease"``) or raise (``"increase"``) the target, to first order.

    From one gradient g = ∂f/∂e at the input, swapping token t to v changes f by about
    (E[v] − e_t) · g_t, where E[v] is the layer's output for v; scored for every admissible
    position and candidate, chunked over positions. ``candidates``: None (all ids but the
    tokenizer's special tokens / the pad id), ``"words"`` (alphabetic whole-word tokens),
    ids, a (V,) bool mask, or a callable token string -> bool (with ``tokenizer``).
    ``positions``: (B, T) bool of positions that may change (default: non-padding, non-special
    tokens). ``verify``: run the swapped inputs through the model and report ``actual``.

    Raises:
        EmbgradError: ``direction`` not "decrease"/"increase", ``k`` not a positive int, several
            targets, ids that are not (B, T), ``positions`` not bool (B, T), a ``candidates``
            filter that is unknown, out of range or leaves no token (or needs ``tokenizer=``);
            and as :func:`embgrad.attribute` for the layer, the inputs and the target.
    """
    if direction not in ("decrease", "increase"):
        raise EmbgradError(f"direction must be 'decrease' or 'increase', got {direction!r}.")
    if not _is_int(k) or k < 1:
        raise EmbgradError(f"k must be a positive int (swaps per example), got {k!r}.")
    eng = _Engine(model, inputs, layer, forward, target, batch_size, None, call=call, who="embgrad.hotflip")
    if eng.targets.multi:
        raise EmbgradError("hotflip takes one target (a class index, (B,) indices or a callable), not a list.")
    b, info = eng.backend, eng.info
    obs = eng.observe(grad=True)
    e, g, ids = obs["e"], obs["grads"][0], obs["ids"]
    ids_np = b.ops.to_numpy(ids).astype(np.int64)
    if ids_np.ndim != 2:
        raise EmbgradError(f"hotflip needs (B, T) ids, layer {info.name!r} looked up {ids_np.shape}.")
    B, T = ids_np.shape
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    pid = _known_pad_id(model, info)
    exclude = special | ({int(pid)} if pid is not None else set())
    cand = _candidate_ids(candidates, info.num_rows, tokenizer, exclude)
    if positions is None:
        allowed = _mask(eng, ids_np, mask) & ~np.isin(ids_np, np.array(sorted(exclude), dtype=np.int64))
    else:
        allowed = np.asarray(positions if isinstance(positions, np.ndarray) else b.ops.to_numpy(positions), dtype=bool)
        if allowed.shape != (B, T):
            raise EmbgradError(f"positions must be bool (B, T) = {(B, T)}, got {allowed.shape}.")
    sign = -1.0 if direction == "decrease" else 1.0
    kk = int(min(k, cand.size))                                  # best candidates kept per position
    with b.ops.no_grad():
        D = info.dim
        gf = b.ops.reshape(g, (B * T, D))
        base = b.ops.to_numpy(b.ops.sum(b.ops.reshape(b.ops.cast(e, _acc_dtype(b, g)), (B * T, D)) * gf, axis=1))
        at = np.flatnonzero(allowed.reshape(-1))                 # only admissible positions are scored
        best_v = np.full((B * T, kk), -np.inf)
        best_i = np.zeros((B * T, kk), np.int64)
        if at.size:
            gsel = b.ops.cast(b.ops.gather(gf, b.ops.from_numpy(at, like=gf)), _acc_dtype(b, g))
            v, i = top_candidates(b, info, gsel, ids_np.reshape(-1)[at], cand, kk, sign)
            best_v[at], best_i[at] = v, np.maximum(i, 0)
        best_i = np.searchsorted(cand, best_i)                   # candidate ids -> their index in cand
    gain = best_v - sign * base[:, None]                         # sign · predicted change
    gain[~allowed.reshape(-1)] = -np.inf
    gain[best_v < -1e29] = -np.inf
    gain = gain.reshape(B, T * kk)
    if T * kk < k:                                               # fewer (position, token) pairs than k
        gain = np.concatenate([gain, np.full((B, k - T * kk), -np.inf)], axis=1)
    order = np.argsort(-gain, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(gain, order, 1)
    ok = np.isfinite(top)
    order = np.where(ok, order, 0)
    pos = np.where(ok, order // kk, -1)
    new = np.where(ok, cand[best_i.reshape(B, T * kk)[np.arange(B)[:, None], order]], -1)
    old = np.where(ok, ids_np[np.arange(B)[:, None], np.maximum(pos, 0)], -1)
    predicted = np.where(ok, sign * top, np.nan)
    actual = None
    if verify:
        actual = np.full((B, k), np.nan)
        rows_b, rows_j = np.nonzero(ok)
        if rows_b.size:
            actual[rows_b, rows_j] = _verify(eng, e, rows_b, pos[rows_b, rows_j], new[rows_b, rows_j]) \
                - obs["values"][rows_b, 0]
    old_tok = new_tok = None
    if tokenizer is not None:
        old_tok = _tokens(tokenizer, np.maximum(old, 0))
        new_tok = _tokens(tokenizer, np.maximum(new, 0))
    return HotFlip(positions=pos, old_ids=old, new_ids=new, predicted=predicted, actual=actual,
                   output=obs["values"][:, 0], direction=direction, layer=info.name,
                   old_tokens=old_tok, new_tokens=new_tok)


def _verify(eng: _Engine, e: Any, ex: np.ndarray, pos: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Target values (R,) with example ex[r]'s token at pos[r] swapped to new[r] (a real forward
    through the model with the layer's output swapped at that one position)."""
    b, out = eng.backend, []
    T = b.ops.shape(e)[1]
    uniq, inv = np.unique(new, return_inverse=True)
    table = b.ops.cast(b.embed(eng.info, b.ops.from_numpy(uniq.astype(np.int64), like=e)), b.ops.dtype_name(e))

    def point(ix, sl, call):
        x = b.ops.gather(e, b.ops.from_numpy(ix, like=e))
        onehot = np.zeros((len(ix), T, 1), np.float32)
        onehot[np.arange(len(ix)), pos[sl], 0] = 1.0
        oh = b.ops.cast(b.ops.from_numpy(onehot, like=e), b.ops.dtype_name(e))
        vec = b.ops.reshape(b.ops.gather(table, b.ops.from_numpy(inv[sl].astype(np.int64), like=e)), (len(ix), 1, -1))
        return x * (1 - oh) + vec * oh

    eng.run(ex.astype(np.int64), point, False, lambda sl, ix, st, v, g: out.append(_values_np(b, v)[:, 0]),
            "hotflip verify")
    return np.concatenate(out)
