"""Per-example gradients of a *tied* table: one (V, D) table both looked up (an input
embedding) and multiplied by (an output projection ``logits = h @ W.T``, e.g. GPT-2's
``lm_head``, BERT's masked-LM decoder, Keras ``ReversibleEmbedding(reverse=True)``).

For example b with lookups (rows ``id_t``, output gradients ``g_t``) and projection inputs
``h_s`` with logit gradients ``a_s`` (a row of V values per position), the table's gradient is

    G_b = Σ_t e_{id_t} g_tᵀ + Σ_s a_s h_sᵀ  =  L_b + A_bᵀ H_b,

so ``‖G_b‖² = ‖L_b‖² + ‖A_bᵀ H_b‖² + 2 Σ_{s,t} a_s[id_t] (h_s · g_t)``. The projection part's
squared norm is ``⟨A_b A_bᵀ, H_b H_bᵀ⟩`` (S×S Gram matrices: the "ghost norm" identity of Goodfellow
2015, "Efficient per-example gradient computations", and Li et al. 2022, "Large language models can
be strong differentially private learners") or the direct (V, D) product per example, whichever costs
fewer operations for the sizes at hand. Nothing of size B × V × D is ever formed (except by
``to_dense``); the largest tensor is the (B, S, V) logit gradient the plain backward makes anyway,
and all work runs in chunks over the batch. Framework-neutral: written over the primitives of
:class:`embgrad.backends.base.Backend`, accumulating in float32 (float64 for float64 inputs).

Peers: Opacus's ghost clipping refuses tied parameters ("Parameter tying is not supported with
Ghost Clipping"); its hooks mode and ``torch.func.vmap`` form the B × V × D per-example gradients.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .backends import Backend
from .errors import EmbgradError
from .sparse import ExampleGrads, RowGrad, _accum_dtype, _check_positive, check_same_table

__all__ = [
    "TableExampleGrads",
    "fingerprint_projection",
    "fingerprint_rows",
    "projection_grad",
    "row_weights",
]

_PHI = 0.6180339887498949
_FP_RTOL = 1e-3   # a table fingerprint this close (relative) to the recorded uses' counts as equal

_CHUNK = 1 << 25  # elements of the largest temporary per batch chunk (128 MiB in float32)


def _no_grad(fn: Any) -> Any:
    """Run a method without recording autograd history (the projection's inputs may carry it)."""
    import functools

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._backend.ops.no_grad():
            return fn(self, *args, **kwargs)
    return wrapper


def _chunks(n: int, per_item: int) -> list[tuple[int, int]]:
    """[start, end) ranges over ``n`` items, each chunk about ``_CHUNK`` elements."""
    step = max(1, _CHUNK // max(per_item, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


class TableExampleGrads:
    """Per-example gradients of the WHOLE tied table: lookup part + projection part.

    ``lookup``: the :class:`~embgrad.ExampleGrads` of the lookups (example b's looked-up rows),
    with any pending ``clip``/``scale`` factors applied. ``inputs`` (B, S, D) and
    ``logit_grads`` (B, S, V): the projection's inputs ``h`` and dLoss/d(``h @ W.T``) per
    position (every call of the projection concatenated along S). Example b's gradient is
    ``lookup.example(b) + logit_grads[b].T @ inputs[b]``, a dense (V, D) matrix.

    Same interface as :class:`~embgrad.ExampleGrads`: ``norms()``, ``clip()``, ``scale()``,
    ``sum()``, ``dot()``, ``example()``, ``to_dense()``; ``clip`` and ``scale`` are lazy
    ((B,) factors). ``sum()`` and ``example()`` return a :class:`~embgrad.RowGrad` holding every
    row (the projection makes them dense).

    Raises:
        EmbgradError: (constructing it) ``inputs`` and ``logit_grads`` are not of the lookups'
            B examples, or the batch size is not known (a ``tf.function`` traced without a
            fixed batch size).
    """

    __slots__ = (
        "_backend",
        "_factor",
        "_lookup",
        "_norms",
        "batch_size",
        "inputs",
        "logit_grads",
        "num_rows",
    )

    def __init__(self, lookup: ExampleGrads, inputs: Any, logit_grads: Any, backend: Backend,
                 factor: Any = None):
        b = backend
        B = lookup._static_batch("a tied table's per-example gradients")
        if b.ops.shape(inputs)[0] != B or b.ops.shape(logit_grads)[:2] != b.ops.shape(inputs)[:2]:
            raise EmbgradError(
                f"the tied projection's input {b.ops.shape(inputs)} and logit gradient "
                f"{b.ops.shape(logit_grads)} do not match the lookups' batch of {B} examples: the "
                "projection must run on (B, ..., D) inputs of the same examples as the lookups.")
        self._lookup = lookup
        self.inputs = inputs
        self.logit_grads = logit_grads
        self.batch_size = B
        self.num_rows = lookup.num_rows
        self._backend = b
        self._factor = factor
        self._norms: Any = None

    # ------------------------------------------------------------------ small things
    @property
    def dim(self) -> int:
        return self._lookup.dim

    @property
    def lookup(self) -> ExampleGrads:
        """The lookup part (example b's looked-up rows only), with the same clip/scale factors."""
        return self._lookup if self._factor is None else self._lookup._scaled(self._factor)

    def __len__(self) -> int:
        return self.batch_size

    def _acc(self) -> str:
        return _accum_dtype(self._backend, self._lookup._base)

    def _slice(self, x: Any, s: int, e: int) -> Any:
        b = self._backend
        acc = self._acc()
        x = x[s:e]
        return x if b.ops.dtype_name(x) == acc else b.ops.cast(x, acc)

    def _scaled(self, factor: Any) -> TableExampleGrads:
        b = self._backend
        combined = factor if self._factor is None else self._factor * factor
        out = TableExampleGrads(self._lookup, self.inputs, self.logit_grads, b, combined)
        if self._norms is not None:
            out._norms = self._norms * b.ops.sqrt(factor * factor)
        return out

    # ------------------------------------------------------------------ norms
    def _unscaled_norms(self) -> Any:
        b = self._backend
        sq = self._lookup.norms()
        sq = sq * sq + _proj_sq_norms(self, self.inputs, self.logit_grads) \
            + 2.0 * _cross_diag(self, self._lookup, self.inputs, self.logit_grads)
        return b.ops.sqrt(b.ops.maximum(sq, 0.0))

    @_no_grad
    def norms(self) -> Any:
        """(B,) per-example L2 norms of the whole table's gradient (lookups, projection and
        their cross term), a framework tensor, float32 (float64 for float64 gradients)."""
        if self._norms is None:
            b = self._backend
            n = self._unscaled_norms()
            self._norms = n if self._factor is None else n * b.ops.sqrt(self._factor * self._factor)
        return self._norms

    def clip(self, max_norm: float) -> TableExampleGrads:
        """Example b scaled by ``min(1, max_norm / norm_b)`` (DP-SGD clipping of the whole table).

        Raises:
            EmbgradError: ``max_norm`` is not a positive finite number.
        """
        _check_positive(max_norm, "max_norm")
        b = self._backend
        return self._scaled(b.ops.minimum(max_norm / b.ops.maximum(self.norms(), 1e-30), 1.0))

    def scale(self, factors: Any) -> TableExampleGrads:
        """Example b scaled by ``factors[b]`` ((B,) tensor or array-like) or all by one float.

        Raises:
            EmbgradError: ``factors`` is not one number or of shape (B,).
        """
        f = self._lookup.scale(factors)._factor
        return self._scaled(f)

    # ------------------------------------------------------------------ sums
    def _proj_dense(self, s: int, e: int, factor: Any) -> Any:
        """(V, D): Σ_{b in [s, e)} factor[b] · A_bᵀ H_b."""
        b = self._backend
        a, h = self._slice(self.logit_grads, s, e), self._slice(self.inputs, s, e)
        c, S, V = b.ops.shape(a)
        D = b.ops.shape(h)[2]
        if factor is not None:
            h = h * b.ops.reshape(factor[s:e], (-1, 1, 1))
        return b.ops.matmul(b.ops.reshape(a, (c * S, V)), b.ops.reshape(h, (c * S, D)), transpose_a=True)

    @_no_grad
    def sum(self) -> RowGrad:
        """Σ_b G_b (with the pending clip/scale factors): a :class:`RowGrad` holding all V rows."""
        b = self._backend
        B, S, V = b.ops.shape(self.logit_grads)
        dense = None
        for s, e in _chunks(B, S * (V + self.dim)):
            part = self._proj_dense(s, e, self._factor)
            dense = part if dense is None else dense + part
        look = self.lookup.sum()
        if len(look):
            dense = dense + b.ops.scatter_rows(look.rows, look.values, V)
        return RowGrad(b.ops.arange(V, dense), dense, V, b)

    @_no_grad
    def example(self, index: int) -> RowGrad:
        """Example ``index``'s gradient of the whole table, a :class:`RowGrad` of all V rows
        (negative indices count from the end).

        Raises:
            EmbgradError: ``index`` is not an int in [-B, B).
        """
        if not isinstance(index, (int, np.integer)) or not -self.batch_size <= index < self.batch_size:
            raise EmbgradError(f"example index {index!r} is out of range for a batch of {self.batch_size}.")
        i = int(index) % self.batch_size
        b = self._backend
        dense = self._proj_dense(i, i + 1, None)
        if self._factor is not None:
            dense = dense * self._factor[i]
        look = self.lookup.example(i)
        if len(look):
            dense = dense + b.ops.scatter_rows(look.rows, look.values, self.num_rows)
        return RowGrad(b.ops.arange(self.num_rows, dense), dense, self.num_rows, b)

    @_no_grad
    def to_dense(self, max_bytes: int = 2 ** 30) -> Any:
        """(B, V, D) dense per-example gradients, a framework tensor, float32 (float64 for
        float64 gradients).

        Raises:
            EmbgradError: it would take more than ``max_bytes`` bytes.
        """
        b = self._backend
        need = self.batch_size * self.num_rows * self.dim * (8 if self._acc() == "float64" else 4)
        if need > max_bytes:
            raise EmbgradError(
                f"to_dense() would allocate {need / 2**20:.1f} MiB for ({self.batch_size}, "
                f"{self.num_rows}, {self.dim}) but max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB). "
                "Use norms(), clip(), sum(), dot() or example(b), or raise max_bytes.")
        a = self._slice(self.logit_grads, 0, self.batch_size)
        h = self._slice(self.inputs, 0, self.batch_size)
        proj = b.ops.matmul(a, h, transpose_a=True)                         # (B, V, D)
        if self._factor is not None:
            proj = proj * b.ops.reshape(self._factor, (-1, 1, 1))
        return proj + self.lookup.to_dense(max_bytes)

    # ------------------------------------------------------------------ inner products
    @_no_grad
    def dot(self, other: TableExampleGrads | ExampleGrads | None = None) -> Any:
        """(B1, B2) matrix of inner products <G_i, H_j> of whole-table gradients (with itself
        when ``other`` is None): lookup·lookup (sparse join), lookup·projection both ways, and
        projection·projection through Gram matrices, in chunks; never B × V × D. A framework
        tensor, float32 (float64 for float64 gradients).

        Raises:
            EmbgradError: ``other`` is not a :class:`TableExampleGrads` or
                :class:`~embgrad.ExampleGrads`, or is of a table of another (V, D).
        """
        other = self if other is None else other
        if not isinstance(other, (TableExampleGrads, ExampleGrads)):
            raise EmbgradError(f"dot() takes another per-example gradient, got {type(other).__name__}.")
        check_same_table(self, other)
        b = self._backend
        la = self._lookup                    # unscaled; the factors are applied at the end
        if isinstance(other, TableExampleGrads):
            lb = other._lookup
            out = la.dot(lb)                                           # (B1, B2) lookups · lookups
            out = out + _cross_all(self, la, other.inputs, other.logit_grads, transpose=False)
            out = out + _cross_all(self, lb, self.inputs, self.logit_grads, transpose=True)
            out = out + _proj_dot(self, self.inputs, self.logit_grads, other.inputs, other.logit_grads)
            if other._factor is not None:
                out = out * b.ops.reshape(other._factor, (1, -1))
        else:                                # a table without projection: its values carry its factors
            out = la.dot(other) + _cross_all(self, other, self.inputs, self.logit_grads, transpose=True)
        if self._factor is not None:
            out = out * b.ops.reshape(self._factor, (-1, 1))
        return out

    def __repr__(self) -> str:
        b = self._backend
        return (f"TableExampleGrads(batch_size={self.batch_size}, lookup_pairs={self._lookup.nnz}, "
                f"projection_positions={b.ops.shape(self.inputs)[1]}, num_rows={self.num_rows}, "
                f"dim={self.dim}, dtype={self._acc()}, backend={b.name})")


def projection_grad(b: Backend, projections: list[tuple[Any, Any]], acc: str) -> Any:
    """(V, D) Σ over projection calls of ``A.T @ H`` for inputs H (..., D) and logit gradients
    A (..., V) of any leading shape (no per-example structure needed), in chunks of rows."""
    dense = None
    for h, a in projections:
        V, D = b.ops.shape(a)[-1], b.ops.shape(h)[-1]
        a2, h2 = b.ops.reshape(a, (-1, V)), b.ops.reshape(h, (-1, D))
        n = b.ops.shape(a2)[0]
        for s, e in _chunks(n, V + D):
            aa, hh = a2[s:e], h2[s:e]
            aa = aa if b.ops.dtype_name(aa) == acc else b.ops.cast(aa, acc)
            hh = hh if b.ops.dtype_name(hh) == acc else b.ops.cast(hh, acc)
            part = b.ops.matmul(aa, hh, transpose_a=True)
            dense = part if dense is None else dense + part
    return dense


def row_weights(b: Backend, rows: Any) -> Any:
    """float64 (N,) fixed pseudo-random weights of table rows, ``frac(row · φ) - 1/2`` (a
    low-discrepancy sequence), the same for the same row wherever it is computed."""
    x = b.ops.cast(rows, "float64") * _PHI
    return x - b.ops.cast(b.ops.cast(x, "int64"), "float64") - 0.5


def fingerprint_rows(b: Backend, rows: Any, values: Any) -> Any:
    """float64 (D,) ``Σ_n w[rows[n]] · values[n]``: a random projection of the gradient whose
    entries are ``values`` at ``rows`` (duplicates add up), to compare two gradients of one
    table without densifying either."""
    if b.ops.shape(rows)[0] == 0:
        return b.ops.zeros((b.ops.shape(values)[-1],), "float64", values)
    # one matrix-vector product in the values' precision (float32 or wider): (N, D) values are
    # not copied to float64 (that copy and the elementwise product cost more than the lookups'
    # whole coalesce); float32 sums err by ~1e-7·√N relative, far below _FP_RTOL
    acc = "float64" if b.ops.dtype_name(values) == "float64" else "float32"
    values = values if b.ops.dtype_name(values) == acc else b.ops.cast(values, acc)
    w = b.ops.reshape(b.ops.cast(row_weights(b, rows), acc), (-1, 1))
    return b.ops.cast(b.ops.reshape(b.ops.matmul(values, w, transpose_a=True), (-1,)), "float64")


def fingerprint_projection(b: Backend, h: Any, a: Any) -> Any:
    """float64 (D,) fingerprint of ``A.T @ H`` (logit gradients A (..., V), inputs H (..., D))
    with the weights of :func:`row_weights`, without forming the (V, D) product."""
    V, D = b.ops.shape(a)[-1], b.ops.shape(h)[-1]
    a2, h2 = b.ops.reshape(a, (-1, V)), b.ops.reshape(h, (-1, D))
    w = b.ops.reshape(row_weights(b, b.ops.arange(V, a2)), (V, 1))
    out = b.ops.zeros((D,), "float64", h)
    for s, e in _chunks(b.ops.shape(a2)[0], V + D):
        aw = b.ops.matmul(b.ops.cast(a2[s:e], "float64"), w)                     # (n, 1)
        out = out + b.ops.sum(b.ops.cast(h2[s:e], "float64") * aw, 0)
    return out


def fingerprints_differ(b: Backend, total: Any, parts: list[Any]) -> bool:
    """True when the fingerprint ``total`` is not the sum of ``parts`` (relative ``_FP_RTOL``)."""
    t = b.ops.to_numpy(total)
    ps = [b.ops.to_numpy(p) for p in parts]
    known = sum(ps) if ps else np.zeros_like(t)
    scale = np.abs(t).sum() + sum(np.abs(p).sum() for p in ps) + 1e-30
    return bool(np.abs(t - known).sum() > _FP_RTOL * scale)


# ---------------------------------------------------------------------------- the algebra
def _proj_sq_norms(t: TableExampleGrads, H: Any, A: Any) -> Any:
    """(B,) ‖A_bᵀ H_b‖²: by S×S Gram matrices when S·(V+D) ≤ V·D, else directly per example."""
    b = t._backend
    B, S, V = b.ops.shape(A)
    D = b.ops.shape(H)[2]
    gram = S * (V + D) <= V * D
    parts = []
    for s, e in _chunks(B, S * max(S, D) + (S * V if gram else V * D)):
        a, h = t._slice(A, s, e), t._slice(H, s, e)
        c = e - s
        if gram:
            prod = b.ops.matmul(a, a, transpose_b=True) * b.ops.matmul(h, h, transpose_b=True)   # (c, S, S)
        else:
            p = b.ops.matmul(a, h, transpose_a=True)                                          # (c, V, D)
            prod = p * p
        parts.append(b.ops.sum(b.ops.reshape(prod, (c, -1)), 1))
    return parts[0] if len(parts) == 1 else b.ops.concat(parts)


def _padded_pairs(b: Backend, lk: ExampleGrads, acc: str) -> tuple[Any, Any, int]:
    """The lookup part's (example, row, value) pairs laid out per example: rows (B, n) int64 and
    values (B, n, D) (n the most rows of any example; padding rows 0 with zero values)."""
    B = lk._static_batch("a tied table's per-example gradients")
    ex_np = b.ops.to_numpy(lk.example_ids).astype(np.int64)
    counts = np.bincount(ex_np, minlength=B)
    n = max(int(counts.max()) if len(counts) else 0, 1)
    first = np.cumsum(counts) - counts
    pos = np.arange(len(ex_np), dtype=np.int64) - first[ex_np]
    key = b.ops.from_numpy(ex_np * n + pos, like=lk.rows)
    vals = lk._base if lk._factor is None else lk.values
    vals = vals if b.ops.dtype_name(vals) == acc else b.ops.cast(vals, acc)
    rows = b.ops.reshape(b.ops.scatter_rows(key, b.ops.reshape(lk.rows, (-1, 1)), B * n), (B, n))
    values = b.ops.reshape(b.ops.scatter_rows(key, vals, B * n), (B, n, lk.dim))
    return rows, values, n


def _cross_diag(t: TableExampleGrads, lk: ExampleGrads, H: Any, A: Any) -> Any:
    """(B,) ⟨L_b, A_bᵀ H_b⟩ = Σ_{s,n} A_b[s, row_n] (h_s · v_n) over example b's lookup pairs."""
    b = t._backend
    B, S, V = b.ops.shape(A)
    if lk.nnz == 0:
        return b.ops.zeros((B,), t._acc(), A)
    rows, values, n = _padded_pairs(b, lk, t._acc())
    parts = []
    for s, e in _chunks(B, S * (V + 2 * n)):
        a, h = t._slice(A, s, e), t._slice(H, s, e)
        picked = b.ops.take_along_last(a, rows[s:e])                      # (c, S, n)
        hv = b.ops.matmul(h, values[s:e], transpose_b=True)               # (c, S, n)
        parts.append(b.ops.sum(b.ops.reshape(picked * hv, (e - s, -1)), 1))
    return parts[0] if len(parts) == 1 else b.ops.concat(parts)


def _cross_all(t: TableExampleGrads, lk: ExampleGrads, H: Any, A: Any, transpose: bool) -> Any:
    """(B1, B2) ⟨L_i, A_jᵀ H_j⟩ for the lookup pairs of ``lk`` (B1 examples) against the
    projection (H, A) of B2 examples; transposed to (B2, B1) when ``transpose``."""
    b = t._backend
    acc = t._acc()
    B1 = lk._static_batch("dot()")
    B2, S, V = b.ops.shape(A)
    if lk.nnz == 0:
        return b.ops.zeros((B2, B1) if transpose else (B1, B2), acc, A)
    N = lk.nnz
    vals = lk._base if lk._factor is None else lk.values
    vals = vals if b.ops.dtype_name(vals) == acc else b.ops.cast(vals, acc)
    one = b.ops.zeros((N, 1), acc, vals) + 1.0
    onehot = b.ops.reshape(b.ops.scatter_rows(b.ops.arange(N, lk.rows) * B1 + lk.example_ids, one, N * B1), (N, B1))
    parts = []
    for s, e in _chunks(B2, S * (V + 2 * N)):
        c = e - s
        a = b.ops.reshape(t._slice(A, s, e), (c * S, V))
        h = b.ops.reshape(t._slice(H, s, e), (c * S, b.ops.shape(H)[2]))
        prod = b.ops.gather_last(a, lk.rows) * b.ops.matmul(h, vals, transpose_b=True)   # (c·S, N)
        per_j = b.ops.sum(b.ops.reshape(prod, (c, S, N)), 1)                           # (c, N)
        parts.append(b.ops.matmul(per_j, onehot) if transpose else
                     b.ops.matmul(onehot, per_j, transpose_a=True, transpose_b=True))
    return parts[0] if len(parts) == 1 else b.ops.concat(parts, axis=0 if transpose else 1)


def _proj_dot(t: TableExampleGrads, H1: Any, A1: Any, H2: Any, A2: Any) -> Any:
    """(B1, B2) ⟨A1_iᵀ H1_i, A2_jᵀ H2_j⟩ = Σ_{s,s'} (A1_i A2_jᵀ)[s,s'] (H1_i H2_jᵀ)[s,s']."""
    b = t._backend
    B1, S1, V = b.ops.shape(A1)
    B2, S2, _ = b.ops.shape(A2)
    D = b.ops.shape(H1)[2]
    rows = []
    for s1, e1 in _chunks(B1, S1 * (V + D) * 2):
        c1 = e1 - s1
        a1 = b.ops.reshape(t._slice(A1, s1, e1), (c1 * S1, V))
        h1 = b.ops.reshape(t._slice(H1, s1, e1), (c1 * S1, D))
        cols = []
        for s2, e2 in _chunks(B2, S2 * (V + D + 2 * c1 * S1)):
            c2 = e2 - s2
            a2 = b.ops.reshape(t._slice(A2, s2, e2), (c2 * S2, V))
            h2 = b.ops.reshape(t._slice(H2, s2, e2), (c2 * S2, D))
            g = b.ops.matmul(a1, a2, transpose_b=True) * b.ops.matmul(h1, h2, transpose_b=True)  # (c1·S1, c2·S2)
            g = b.ops.sum(b.ops.reshape(g, (c1, S1, c2 * S2)), 1)                              # (c1, c2·S2)
            cols.append(b.ops.sum(b.ops.reshape(g, (c1, c2, S2)), 2))                          # (c1, c2)
        rows.append(cols[0] if len(cols) == 1 else b.ops.concat(cols, axis=1))
    return rows[0] if len(rows) == 1 else b.ops.concat(rows, axis=0)
