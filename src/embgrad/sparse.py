"""Sparse gradients of embedding tables: :class:`RowGrad` and :class:`ExampleGrads`.

The algebra is written once, over the primitives of :class:`embgrad.backends.base.Backend`,
and works on the framework's own tensors (and device). Nothing here loops over examples or
table rows in Python; memory is O(entries · D), never O(V · D) unless you ask for dense.

Layout: a ``RowGrad`` stores R unique rows sorted ascending with their (R, D) values. An
``ExampleGrads`` stores N (example, row) pairs, unique and sorted by example then row, with
their (N, D) values: example b holds only the rows it looked up.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Literal, overload

import numpy as np

from .backends import Backend, get_backend
from .errors import EmbgradError

__all__ = ["RowGrad", "ExampleGrads", "rows_from_lookups", "row_grad", "coalesce_lookups"]

_PAIR_CHUNK = 1 << 22  # elements (pairs × D) per chunk of the sparse join in ExampleGrads.dot
_DENSE_ROW_SHARE = 512  # dot(): a row shared by ≥ 1/512 of all example pairs goes through a matmul
_DENSE_CHUNK = 1 << 24  # elements (examples × rows × D) of one dense block in ExampleGrads.dot


def _accum_dtype(backend: Backend, x: Any) -> str:
    name = backend.ops.dtype_name(x)
    return "float64" if name == "float64" else "float32"


def _coalesce_impl(backend: Backend, keys: Any, values: Any) -> tuple[Any, Any]:
    """Unique sorted keys (int64) and the segment sums of their values."""
    return backend.ops.coalesce(keys, values)


def _compiled(backend: Backend, fn: Any) -> Any:
    """``fn(backend, ...)`` compiled by the backend (a cached tf.function under TensorFlow;
    unchanged elsewhere). ``fn`` must be a pure function of tensors and Python constants."""
    return backend.ops.compile(functools.partial(fn, backend))


def _small(backend: Backend, fn: Any) -> Any:
    """``fn(backend, ...)``, a function of a few ops, as the backend runs those
    (:meth:`TensorOps.compile_small`: as it is under TensorFlow, compiled elsewhere)."""
    return backend.ops.compile_small(functools.partial(fn, backend))


def _coalesce(backend: Backend, keys: Any, values: Any) -> tuple[Any, Any]:
    """Unique sorted keys (int64) and the segment sums of their values (compiled)."""
    return _compiled(backend, _coalesce_impl)(keys, values)


class RowGrad:
    """A coalesced sparse gradient of one (V, D) embedding table.

    ``rows``: int64 (R,), unique, ascending. ``values``: float (R, D), float32 or wider.
    """

    __slots__ = ("rows", "values", "num_rows", "_backend")

    def __init__(self, rows: Any, values: Any, num_rows: int, backend: Backend | None = None):
        self._backend = backend or get_backend(values)
        self.rows = rows
        self.values = values
        self.num_rows = int(num_rows)

    # RowGrad is immutable by convention: every operation returns a new one.
    @property
    def dim(self) -> int:
        return self._backend.ops.shape(self.values)[1]

    def _size(self) -> int | None:
        """R as an int; None while a ``tf.function`` is traced (R is known only when it runs)."""
        n = self._backend.ops.shape(self.rows)[0]
        return n if isinstance(n, (int, np.integer)) else None

    def _traced(self) -> bool:
        return self._backend.ops.traced(self.values)

    def __len__(self) -> int:
        """R, the number of stored rows. Inside a ``tf.function`` R is not known while tracing:
        ``EmbgradError`` (use ``tf.shape(g.rows)[0]`` there)."""
        n = self._size()
        if n is None:
            raise EmbgradError(
                "len(RowGrad) needs the number of stored rows, which is not known while a tf.function "
                "is traced (it depends on the ids). Inside the function use tf.shape(g.rows)[0]; "
                "len(g) works eagerly.")
        return int(n)

    def to_dense(self) -> Any:
        """The (V, D) dense gradient, a framework tensor of ``values``' dtype (zeros off the
        stored rows). Memory O(V · D): prefer the sparse methods for large tables."""
        return self._backend.ops.scatter_rows(self.rows, self.values, self.num_rows)

    def row_norms(self) -> Any:
        """(R,) L2 norm of each stored row, a framework tensor of ``values``' dtype."""
        b = self._backend
        if self._size() == 0:
            return b.ops.zeros((0,), b.ops.dtype_name(self.values), self.values)
        return b.ops.sqrt(b.ops.sum(self.values * self.values, 1))

    def norm(self) -> Any:
        """L2 (Frobenius) norm of the whole gradient, as a Python float; inside a
        ``tf.function`` (no values while tracing) a float32 (float64) scalar tensor."""
        b = self._backend
        if self._traced():
            return b.ops.sqrt(b.ops.sum(self.values * self.values))
        if self._size() == 0:   # no row was looked up (or every lookup was ignored)
            return 0.0
        return float(b.ops.to_numpy(b.ops.sqrt(b.ops.sum(self.values * self.values))))

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, values)`` as NumPy arrays: int64 (R,) and float (R, D), float32 or wider.

        Raises:
            EmbgradError: called while a ``tf.function`` is traced (there ``.rows`` and
                ``.values`` are the tensors to use).
        """
        if self._traced():
            raise EmbgradError("RowGrad.numpy() needs values, which a tf.function being traced does "
                               "not have: use g.rows and g.values (tensors) inside the function, or "
                               "call numpy() on its eager result.")
        return self._backend.ops.to_numpy(self.rows), self._backend.ops.to_numpy(self.values)

    def __add__(self, other: RowGrad) -> RowGrad:
        """The coalesced sum of two gradients of one table (rows merged, values added).

        Raises:
            EmbgradError: the two are gradients of tables of different (V, D).
        """
        if not isinstance(other, RowGrad):
            return NotImplemented
        if other.num_rows != self.num_rows or (self._size() != 0 and other._size() != 0
                                               and other.dim != self.dim):
            raise EmbgradError(
                f"cannot add RowGrads of different tables: ({self.num_rows}, {self.dim}) and "
                f"({other.num_rows}, {other.dim}).")
        b = self._backend
        rows, values = _coalesce(b, b.ops.concat([self.rows, other.rows]),
                                 b.ops.concat([self.values, other.values]))
        return RowGrad(rows, values, self.num_rows, b)

    def scale(self, factor: float) -> RowGrad:
        """This gradient times a scalar (a float, or a scalar framework tensor)."""
        return RowGrad(self.rows, self.values * factor, self.num_rows, self._backend)

    def clip_by_norm(self, max_norm: float) -> RowGrad:
        """Scaled by ``min(1, max_norm / norm)``: the whole gradient's norm is at most
        max_norm, up to float rounding (a relative 1e-7 in float32).

        Raises:
            EmbgradError: ``max_norm`` is not a positive finite number.
        """
        _check_positive(max_norm, "max_norm")
        n = self.norm()
        if self._traced():   # tf.function: the same factor, as a tensor (1.0 when within the bound)
            b = self._backend
            return self.scale(b.ops.minimum(max_norm / b.ops.maximum(n, 1e-30), 1.0))
        return self if n <= max_norm else self.scale(max_norm / n)

    def clip_rows(self, max_row_norm: float) -> RowGrad:
        """Each row scaled by ``min(1, max_row_norm / row_norm)``.

        Raises:
            EmbgradError: ``max_row_norm`` is not a positive finite number.
        """
        _check_positive(max_row_norm, "max_row_norm")
        b = self._backend
        if self._size() == 0:
            return self
        norms = self.row_norms()
        factor = b.ops.minimum(max_row_norm / b.ops.maximum(norms, 1e-30), 1.0)
        return RowGrad(self.rows, self.values * b.ops.reshape(factor, (-1, 1)), self.num_rows, b)

    def __repr__(self) -> str:
        dt = self._backend.ops.dtype_name(self.values)
        if self._traced():
            return (f"RowGrad(rows=? of {self.num_rows}, dim={self.dim}, traced, dtype={dt}, "
                    f"backend={self._backend.name})")
        return (f"RowGrad(rows={len(self)} of {self.num_rows}, dim={self.dim}, "
                f"norm={self.norm():.6g}, dtype={dt}, backend={self._backend.name})")


def check_same_table(a: Any, b: Any) -> None:
    """Check that per-example gradients ``a`` and ``b`` are of tables of one (V, D) (what
    ``dot()`` needs).

    Raises:
        EmbgradError: their ``num_rows`` or ``dim`` differ.
    """
    if b.num_rows != a.num_rows or b.dim != a.dim:
        raise EmbgradError(
            f"dot() needs gradients of the same table: ({a.num_rows}, {a.dim}) vs "
            f"({b.num_rows}, {b.dim}).")


def _check_positive(x: float, what: str) -> None:
    if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
        raise EmbgradError(f"{what} must be a positive finite number, got {x!r}.")


def _heavy_rows(rows_a: np.ndarray, rows_b: np.ndarray, all_pairs: int) -> np.ndarray:
    """Sorted rows whose (i, j) pairs are at least 1/_DENSE_ROW_SHARE of all B1·B2 pairs: for
    those a dense matrix product beats gathering every pair (BLAS vs. gather per pair)."""
    ua, na = np.unique(rows_a, return_counts=True)
    ub, nb = np.unique(rows_b, return_counts=True)
    common, ia, ib = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
    pairs = na[ia].astype(np.int64) * nb[ib]
    return common[pairs * _DENSE_ROW_SHARE >= all_pairs]


def _without_rows(b: Backend, entries: tuple, rows_np: np.ndarray, drop: np.ndarray) -> tuple:
    """The (example_ids, rows, values) entries whose row is not in ``drop`` (sorted)."""
    keep = b.ops.from_numpy(~np.isin(rows_np, drop, assume_unique=False), like=entries[1])
    return tuple(b.ops.boolean_mask(x, keep) for x in entries)


def _dense_dot(b: Backend, a: tuple, rows_a: np.ndarray, o: tuple, rows_b: np.ndarray,
               heavy: np.ndarray, B1: int, B2: int, D: int, acc: str) -> Any:
    """(B1·B2,) inner products restricted to the ``heavy`` rows: per chunk of k rows, both
    sides scattered into (B, k·D) blocks and multiplied (B1, k·D) @ (k·D, B2)."""
    out = None
    per_chunk = max(1, _DENSE_CHUNK // (max(B1, B2) * max(D, 1)))
    for s in range(0, len(heavy), per_chunk):
        rows = heavy[s:s + per_chunk]
        blocks = [_dense_block(b, ent, rows_np, rows, B, D, acc)
                  for ent, rows_np, B in ((a, rows_a, B1), (o, rows_b, B2))]
        part = b.ops.reshape(b.ops.matmul_t(*blocks), (B1 * B2,))
        out = part if out is None else out + part
    return out


def _dense_block(b: Backend, entries: tuple, rows_np: np.ndarray, rows: np.ndarray, B: int, D: int,
                 acc: str) -> Any:
    """(B, k·D): each example's gradient on the k sorted ``rows`` (zeros where it has none)."""
    ex, _, values = entries
    k = len(rows)
    pos = np.searchsorted(rows, rows_np)
    hit = (pos < k) & (rows[np.minimum(pos, k - 1)] == rows_np)
    sel = b.ops.from_numpy(hit, like=entries[1])
    keys = b.ops.boolean_mask(ex, sel) * k + b.ops.from_numpy(pos[hit].astype(np.int64), like=entries[1])
    vals = b.ops.cast(b.ops.boolean_mask(values, sel), acc)
    return b.ops.reshape(b.ops.scatter_rows(keys, vals, B * k), (B, k * D))


def _sparse_join(b: Backend, a: tuple, o: tuple, B1: int, B2: int, D: int, acc: str, out: Any) -> Any:
    """``out`` (B1·B2,) plus the inner products over rows shared by entries of ``a`` and ``o``
    (each (example_ids, rows, values)), one gathered pair at a time, in bounded chunks."""
    a_ex, a_rows, a_vals = a
    o_ex, o_rows, o_vals = o
    n_a = b.ops.shape(a_rows)[0]
    if n_a == 0 or b.ops.shape(o_rows)[0] == 0:
        return out
    order = b.ops.argsort(o_rows)
    rb = b.ops.gather(o_rows, order)
    left = b.ops.searchsorted(rb, a_rows)
    cnt = b.ops.searchsorted(rb, a_rows, right=True) - left              # (Na,) matches per entry
    csum = np.cumsum(b.ops.to_numpy(cnt))
    total = int(csum[-1])
    if total == 0:
        return out
    # split entries of a into chunks whose pair count × D stays under _PAIR_CHUNK
    per_chunk = max(1, _PAIR_CHUNK // max(D, 1))
    bounds = np.searchsorted(csum, np.arange(per_chunk, total, per_chunk), side="left")
    starts = [0] + [int(x) + 1 for x in bounds]
    ends = starts[1:] + [n_a]
    for s, e in zip(starts, ends, strict=True):
        if s >= e:
            continue
        idx = b.ops.from_numpy(np.arange(s, e, dtype=np.int64), like=a_rows)
        key, prod = _join_pairs(b, a, o, (idx, order, left, cnt), B2, acc)
        if b.ops.shape(key)[0] == 0:
            continue
        out = out + b.ops.segment_sum(prod, key, B1 * B2)
    return out


def _join_pairs(b: Backend, a: tuple, o: tuple, plan: tuple | None, B2: Any, acc: str) -> tuple[Any, Any]:
    """For the entries ``idx`` of ``a`` (all of them when ``plan`` is None), every entry of ``o``
    on the same row: ``(key (P,) = example_a · B2 + example_o, prod (P,) = <value_a, value_o>)``.
    ``plan``: ``(idx, order, left, cnt)``, the argsort of o's rows and each a-entry's first match
    and match count in it."""
    a_ex, a_rows, a_vals = a
    o_ex, o_rows, o_vals = o
    if plan is None:
        order = b.ops.argsort(o_rows)
        rb = b.ops.gather(o_rows, order)
        left = b.ops.searchsorted(rb, a_rows)
        cnt = b.ops.searchsorted(rb, a_rows, right=True) - left
        idx = b.ops.arange(b.ops.shape(a_rows)[0], a_rows)
    else:
        idx, order, left, cnt = plan
    c = b.ops.gather(cnt, idx)
    a_idx = b.ops.repeat(idx, c)                                           # (P,) entry of a
    first = b.ops.cumsum(c) - c                                            # start of each entry's pairs
    local = b.ops.arange(b.ops.shape(a_idx)[0], a_rows) - b.ops.repeat(first, c)
    b_pos = b.ops.repeat(b.ops.gather(left, idx), c) + local
    b_idx = b.ops.gather(order, b_pos)
    prod = b.ops.sum(b.ops.cast(b.ops.gather(a_vals, a_idx), acc) * b.ops.cast(b.ops.gather(o_vals, b_idx), acc), 1)
    key = b.ops.gather(a_ex, a_idx) * B2 + b.ops.gather(o_ex, b_idx)
    return key, prod


def _norms_impl(b: Backend, values: Any, example_ids: Any, batch_size: Any) -> Any:
    """(B,) L2 norm of each example's entries (a few ops: see :func:`_small`)."""
    return b.ops.sqrt(b.ops.segment_sum(b.ops.row_sq_norms(values), example_ids, batch_size))


def _scaled_impl(b: Backend, values: Any, example_ids: Any, factor: Any) -> Any:
    """(N, D) values of entry n times ``factor[example_ids[n]]``."""
    return values * b.ops.reshape(b.ops.gather(factor, example_ids), (-1, 1))


def _scaled_sum_impl(b: Backend, values: Any, example_ids: Any, factor: Any, slot: Any,
                     num_unique: Any) -> Any:
    """(R, D): ``sum_n factor[example_ids[n]] · values[n]`` over the entries of each slot."""
    return b.ops.segment_sum(_scaled_impl(b, values, example_ids, factor), slot, num_unique)


class ExampleGrads:
    """Per-example sparse gradients of one (V, D) table.

    Stored as N unique (example, row) pairs sorted by example then row: ``example_ids`` (N,),
    ``rows`` (N,), ``values`` (N, D), float32 or wider. Memory O(N · D) with N ≤ B · T.

    ``clip()`` and ``scale()`` are lazy: they keep the unscaled values and a (B,) factor per
    example, so ``clip(C).sum()`` is one weighted segment sum
    and ``clip(C).norms()`` costs O(B); ``values`` applies the factors on first access.
    """

    __slots__ = ("example_ids", "rows", "batch_size", "num_rows", "_backend", "_norms",
                 "_row_index", "_base", "_factor")

    def __init__(self, example_ids: Any, rows: Any, values: Any, batch_size: int, num_rows: int,
                 backend: Backend | None = None, row_index: tuple[Any, Any] | None = None,
                 factor: Any = None):
        self._backend = backend or get_backend(values)
        self.example_ids = example_ids
        self.rows = rows
        self._base = values
        self._factor = factor           # (B,) pending per-example factors, or None
        # an int; a scalar tensor only while tracing a tf.function whose batch size is not static
        self.batch_size = int(batch_size) if isinstance(batch_size, (int, np.integer)) else batch_size
        self.num_rows = int(num_rows)
        self._norms = None
        # optional (unique_rows (R,), slot (N,)) with rows == unique_rows[slot]: sum() then
        # needs no second sort (capture builds it from its one unique over the looked-up ids)
        self._row_index = row_index

    @property
    def values(self) -> Any:
        """(N, D) the value of each (example, row) pair."""
        if self._factor is not None:   # apply the pending factors once (immutable: cached)
            b = self._backend
            self._base = _small(b, _scaled_impl)(self._base, self.example_ids, self._factor)
            self._factor = None
        return self._base

    def _scaled(self, factor: Any) -> ExampleGrads:
        """The same (example, row) pairs with example b scaled by ``factor[b]`` (lazily)."""
        b = self._backend
        combined = factor if self._factor is None else self._factor * factor
        out = ExampleGrads(self.example_ids, self.rows, self._base, self.batch_size, self.num_rows,
                           b, self._row_index, combined)
        if self._norms is not None:
            out._norms = self._norms * b.ops.sqrt(factor * factor)
        return out

    @property
    def dim(self) -> int:
        return self._backend.ops.shape(self._base)[1]

    @property
    def nnz(self) -> int:
        """Number of stored (example, row) pairs."""
        return self._backend.ops.shape(self.rows)[0]

    def __len__(self) -> int:
        return self._static_batch("len()")

    def _static_batch(self, what: str) -> int:
        """The batch size as an int; EmbgradError while tracing with a batch size not yet known."""
        if not isinstance(self.batch_size, int):
            raise EmbgradError(
                f"ExampleGrads.{what} needs the batch size, which is not known while this "
                "tf.function is traced (its batch dimension is None). norms(), clip(), scale() and "
                "sum() work in the traced function; for this, give the tf.function an "
                "input_signature with a fixed batch size, or call it eagerly.")
        return self.batch_size

    def norms(self) -> Any:
        """(B,) per-example L2 norms, a framework tensor of ``values``' dtype (float32 or wider)."""
        if self._norms is None:  # immutable, so computed once
            b = self._backend
            norms = _small(b, _norms_impl)(self._base, self.example_ids, self.batch_size)
            self._norms = norms if self._factor is None else norms * b.ops.sqrt(self._factor * self._factor)
        return self._norms

    def clip(self, max_norm: float) -> ExampleGrads:
        """Example b scaled by ``min(1, max_norm / norm_b)`` (DP-SGD style clipping, Abadi et
        al. 2016; Opacus's per-sample clipping). Lazy: see the class docstring.

        Raises:
            EmbgradError: ``max_norm`` is not a positive finite number.
        """
        _check_positive(max_norm, "max_norm")
        b = self._backend
        factor = b.ops.minimum(max_norm / b.ops.maximum(self.norms(), 1e-30), 1.0)   # (B,)
        return self._scaled(factor)

    def scale(self, factors: Any) -> ExampleGrads:
        """Example b scaled by ``factors[b]`` ((B,) tensor or array-like) or all by one float.

        Raises:
            EmbgradError: ``factors`` is not one number or of shape (B,).
        """
        b = self._backend
        dt = b.ops.dtype_name(self._base)
        if isinstance(factors, (int, float, np.integer, np.floating)):
            factors = b.ops.zeros((self.batch_size,), dt, self._base) + float(factors)
        else:
            if not b.is_appropriate(factors):
                factors = b.ops.from_numpy(np.asarray(factors), like=self._base)
            shape = b.ops.shape(factors)
            if len(shape) != 1 or (isinstance(shape[0], int) and isinstance(self.batch_size, int)
                                   and shape[0] != self.batch_size):
                raise EmbgradError(f"scale() takes one float or a ({self.batch_size},) tensor of "
                                   f"per-example factors, got shape {shape}.")
            factors = b.ops.cast(factors, dt)
        return self._scaled(factors)

    def sum(self) -> RowGrad:
        """The sum over examples: a :class:`RowGrad` equal to the layer's ``weight_grad``."""
        b = self._backend
        if self._row_index is not None:
            unique_rows, slot = self._row_index
            n = b.ops.shape(unique_rows)[0]
            if self._factor is not None:
                values = _small(b, _scaled_sum_impl)(self._base, self.example_ids, self._factor, slot, n)
            else:
                values = b.ops.segment_sum(self._base, slot, n)
            return RowGrad(unique_rows, values, self.num_rows, b)
        rows, values = _coalesce(b, self.rows, self.values)
        return RowGrad(rows, values, self.num_rows, b)

    def example(self, index: int) -> RowGrad:
        """The :class:`RowGrad` of example ``index`` (negative indices count from the end).

        Inside a ``tf.function`` whose batch size is not static the range is checked when the
        graph runs (an ``InvalidArgumentError`` carrying this message).

        Raises:
            EmbgradError: ``index`` is not an int, or is out of range for the batch.
        """
        b = self._backend
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise EmbgradError(f"example index must be an int, got {index!r}.")
        if isinstance(self.batch_size, int):
            if not -self.batch_size <= index < self.batch_size:
                raise EmbgradError(f"example index {index!r} is out of range for a batch of {self.batch_size}.")
            index = int(index) % self.batch_size
        else:   # traced, batch size known only when the graph runs: checked then
            pos = b.ops.from_numpy(np.array([int(index)], np.int64), like=self.example_ids)
            if index < 0:
                pos = pos + self.batch_size
            index = b.ops.gate(pos, b.ops.assert_in_range(pos, self.batch_size, f"embgrad: example index "
                                                  f"{int(index)} is out of range for the batch this "
                                                  "tf.function was called with."))
        mask = self.example_ids == index
        return RowGrad(b.ops.boolean_mask(self.rows, mask), b.ops.boolean_mask(self.values, mask),
                       self.num_rows, b)

    def dot(self, other: ExampleGrads | None = None) -> Any:
        """(B1, B2) matrix of inner products <G_i, H_j> (with itself when ``other`` is None).

        Only (i, j) pairs that share a row cost anything; the per-example gradients are never
        densified over the vocabulary. Rows shared by a large share of all pairs (the frequent
        tokens of real text) go through one dense (B1, k·D) @ (k·D, B2) product over just
        those k rows; the other rows through a sparse join on rows. Both run in chunks of
        bounded memory. Returns a framework tensor, float32 (float64 for float64 gradients).

        Raises:
            EmbgradError: ``other`` is not an :class:`ExampleGrads`, or is of a table of another
                (V, D); eagerly, a batch size not known while a ``tf.function`` is traced.
        """
        other = self if other is None else other
        if not isinstance(other, ExampleGrads):
            raise EmbgradError(f"dot() takes another ExampleGrads, got {type(other).__name__}.")
        check_same_table(self, other)
        b = self._backend
        acc = _accum_dtype(b, self.values)
        if b.ops.traced(self.values) or b.ops.traced(other.values):
            # tf.function: no values to plan chunks with; one sparse join over every pair of
            # entries that share a row (memory O(pairs · D), unbounded: chunking is eager-only)
            B1, B2 = self.batch_size, other.batch_size
            out = b.ops.zeros((B1 * B2,), acc, self.values)
            a = (self.example_ids, self.rows, self.values)
            o = (other.example_ids, other.rows, other.values)
            key, prod = _join_pairs(b, a, o, None, B2, acc)
            return b.ops.reshape(out + b.ops.segment_sum(prod, key, B1 * B2), (B1, B2))
        B1, B2 = self._static_batch("dot()"), other._static_batch("dot()")
        out = b.ops.zeros((B1 * B2,), acc, self.values)
        if self.nnz == 0 or other.nnz == 0:
            return b.ops.reshape(out, (B1, B2))
        rows_a, rows_b = b.ops.to_numpy(self.rows), b.ops.to_numpy(other.rows)
        heavy = _heavy_rows(rows_a, rows_b, B1 * B2)
        a = (self.example_ids, self.rows, self.values)
        o = (other.example_ids, other.rows, other.values)
        if len(heavy):
            out = out + _dense_dot(b, a, rows_a, o, rows_b, heavy, B1, B2, self.dim, acc)
            a = _without_rows(b, a, rows_a, heavy)
            o = _without_rows(b, o, rows_b, heavy)
        return b.ops.reshape(_sparse_join(b, a, o, B1, B2, self.dim, acc, out), (B1, B2))

    def to_dense(self, max_bytes: int = 2 ** 30) -> Any:
        """(B, V, D) dense per-example gradients, a framework tensor of ``values``' dtype.

        Raises:
            EmbgradError: it would take more than ``max_bytes`` bytes; the batch size is not
                known (inside a ``tf.function`` traced without a fixed batch size).
        """
        b = self._backend
        dt = b.ops.dtype_name(self.values)
        item = np.dtype(dt if dt != "bfloat16" else "float16").itemsize
        need = self._static_batch("to_dense()") * self.num_rows * self.dim * item
        if need > max_bytes:
            raise EmbgradError(
                f"to_dense() would allocate {need / 2**20:.1f} MiB for ({self.batch_size}, "
                f"{self.num_rows}, {self.dim}) but max_bytes={max_bytes} ({max_bytes / 2**20:.1f} MiB). "
                "Use norms(), clip(), dot() or example(b), which stay sparse, or raise max_bytes.")
        keys = self.example_ids * self.num_rows + self.rows
        flat = b.ops.scatter_rows(keys, self.values, self.batch_size * self.num_rows)
        return b.ops.reshape(flat, (self.batch_size, self.num_rows, self.dim))

    def __repr__(self) -> str:
        return (f"ExampleGrads(batch_size={self.batch_size}, pairs={self.nnz}, "
                f"num_rows={self.num_rows}, dim={self.dim}, "
                f"dtype={self._backend.ops.dtype_name(self.values)}, backend={self._backend.name})")


# ---------------------------------------------------------------------------- construction
@overload
def coalesce_lookups(backend: Backend, example_ids: Any, ids: Any, grads: Any, num_rows: int,
                     batch_size: int, per_example: Literal[False]) -> RowGrad: ...
@overload
def coalesce_lookups(backend: Backend, example_ids: Any, ids: Any, grads: Any, num_rows: int,
                     batch_size: int, per_example: Literal[True]) -> ExampleGrads: ...
@overload
def coalesce_lookups(backend: Backend, example_ids: Any, ids: Any, grads: Any, num_rows: int,
                     batch_size: int, per_example: bool) -> RowGrad | ExampleGrads: ...
def coalesce_lookups(backend: Backend, example_ids: Any, ids: Any, grads: Any, num_rows: int,
                     batch_size: int, per_example: bool) -> RowGrad | ExampleGrads:
    """Coalesce flat lookups: ``example_ids`` (N,), ``ids`` (N,) int64 valid rows, ``grads`` (N, D).

    The one hot path of capture: a unique over N keys and a segment sum of (N, D) values.

    Raises:
        EmbgradError: per example, when the (example, row) keys ``example · num_rows + row``
            would not fit in int64 (``batch_size · num_rows >= 2**63``).
    """
    bits = backend.ops.index_bits   # JAX without jax_enable_x64: int32 keys
    if per_example and isinstance(batch_size, (int, np.integer)) \
            and int(batch_size) * int(num_rows) >= 2 ** bits:
        raise EmbgradError(
            f"per-example gradients of a table of num_rows={num_rows} for {batch_size} examples: the "
            f"(example, row) key example * num_rows + row would overflow int{bits + 1} ({batch_size} x "
            f"{num_rows} >= 2**{bits}). Pass the table's real row count, or fewer examples at a time"
            + (" (or enable 64-bit integers: jax.config.update('jax_enable_x64', True))." if bits < 63 else "."))
    if per_example and not isinstance(batch_size, (int, np.integer)) and int(num_rows) > 1:
        # traced with an unknown batch size: checked when the graph runs (B <= (2**63 - 1) // V)
        limit = (2 ** 63 - 1) // int(num_rows) + 1
        if limit < 2 ** 62:     # a batch that large cannot exist otherwise: no op needed
            example_ids = backend.ops.gate(example_ids, backend.ops.assert_in_range(
                backend.ops.reshape(backend.ops.cast(batch_size, "int64"), (1,)), limit,
                f"embgrad: per-example gradients of a table of num_rows={num_rows}: the (example, "
                "row) key example * num_rows + row would overflow int64 for this batch size. Pass "
                "the table's real row count, or fewer examples at a time."))
    out = _compiled(backend, _coalesce_lookups_impl)(example_ids, ids, grads, num_rows, per_example)
    if not per_example:
        rows, values = out
        return RowGrad(rows, values, num_rows, backend)
    ex, rows, values, unique_rows, slot = out
    return ExampleGrads(ex, rows, values, batch_size, num_rows, backend, row_index=(unique_rows, slot))


def _coalesce_lookups_impl(b: Backend, example_ids: Any, ids: Any, grads: Any, num_rows: int,
                           per_example: bool) -> tuple[Any, ...]:
    """The pure tensor part of :func:`coalesce_lookups`: ``(rows, values)``, or
    ``(example_ids, rows, values, unique_rows, slot)`` when ``per_example``; compiled under
    TensorFlow. Per example: one coalesce of the (example, row) keys ``example · num_rows +
    row`` over the N lookups, then the unique rows of the P ≤ N pairs (for ``sum()``)."""
    acc = _accum_dtype(b, grads)
    if b.ops.dtype_name(grads) != acc:
        grads = b.ops.cast(grads, acc)
    if not per_example:
        return _coalesce_impl(b, ids, grads)
    uniq, values = _coalesce_impl(b, example_ids * num_rows + ids, grads)
    ex = b.ops.floordiv(uniq, num_rows)
    rows = uniq - ex * num_rows
    unique_rows, slot = b.ops.unique(rows)
    return ex, rows, values, unique_rows, slot


def rows_from_lookups(ids: Any, output_grad: Any, num_rows: int, *, per_example: bool = False,
                      ignore_index: int | None = None) -> RowGrad | ExampleGrads:
    """The table gradient from ids (B, T) (or (N,)) and dLoss/d(looked-up vectors) (B, T, D).

    Returns a :class:`RowGrad`, or an :class:`ExampleGrads` when ``per_example`` (with 1-D
    ids every lookup is its own example; ids (B, T1, T2, ...) are example b's T1·T2·... lookups,
    as in ``capture``). Lookups of ``ignore_index`` contribute nothing. An empty batch gives
    empty results (zero norms).

    Raises:
        EmbgradError: non-integer or ragged ids, ``output_grad`` not shaped ``ids.shape + (D,)``,
            an id out of range, NaN/Inf gradients, an (example, row) key overflow.
    """
    b = get_backend(output_grad)
    if not isinstance(num_rows, (int, np.integer)) or num_rows <= 0:
        raise EmbgradError(f"num_rows must be a positive int (the table's row count), got {num_rows!r}.")
    num_rows = int(num_rows)
    if not b.is_appropriate(ids):
        try:
            arr = np.asarray(ids)
        except ValueError as e:   # ragged nested lists
            raise EmbgradError(f"ids must be a rectangular array (B, T) or (N,); got ragged nested lists "
                               f"({e}). Pad each example to the same length and pass ignore_index= for "
                               "the padding id.") from None
        if arr.dtype == object:
            raise EmbgradError("ids must be a rectangular array of integers (B, T) or (N,); got ragged "
                               "or mixed nested sequences. Pad each example to the same length and pass "
                               "ignore_index= for the padding id.")
        ids = b.ops.from_numpy(arr, like=output_grad)
    if not b.ops.is_integer(ids):
        raise EmbgradError(f"ids must be integers, got dtype {b.ops.dtype_name(ids)}; cast them to int64.")
    ishape, gshape = b.ops.shape(ids), b.ops.shape(output_grad)
    output_grad = b.ops.gate(output_grad, *_check_grad_shape(b, ishape, gshape))
    if len(ishape) == 0:
        raise EmbgradError("ids must be (B, T, ...) or (N,), got a 0-d tensor; reshape it to (1,).")
    empty = any(isinstance(s, (int, np.integer)) and s == 0 for s in ishape)   # empty results
    bad = b.ops.count_nonfinite(output_grad)
    if bad:
        raise EmbgradError(f"output_grad holds {bad} NaN/Inf values; the loss or model diverged.")
    B = ishape[0]
    T = math.prod(ishape[1:])          # lookups per example (the non-batch dims flattened, as capture)
    D = gshape[-1]
    ids = b.ops.cast(b.ops.reshape(ids, (-1,)), "int64")
    if empty:
        lo, hi = 0, 0
    elif b.ops.traced(ids):  # inside tf.function: checked when the graph runs
        checked = (ids if ignore_index is None
                   else b.ops.where(ids == ignore_index, b.ops.zeros((1,), "int64", ids), ids))
        ids = b.ops.gate(ids, b.ops.assert_in_range(checked, num_rows, f"embgrad: an id is out of range for a "
                                            f"table of {num_rows} rows (valid ids are 0..{num_rows - 1})."))
        lo, hi = 0, 0
    else:
        lo, hi = b.ops.minmax(ids)
    if lo < 0 or hi >= num_rows:
        valid_ids = (b.ops.where(ids == ignore_index, b.ops.zeros((1,), "int64", ids), ids)
                     if ignore_index is not None else ids)
        lo, hi = b.ops.minmax(valid_ids)
        if lo < 0 or hi >= num_rows:
            bad_id = lo if lo < 0 else hi
            raise EmbgradError(f"id {bad_id} is out of range for a table of {num_rows} rows "
                               f"(valid ids are 0..{num_rows - 1}).")
    grads = b.ops.reshape(output_grad, (-1, D))
    ex = b.ops.floordiv(b.ops.arange(B * T, ids), T) if not (isinstance(T, int) and T == 0) else b.ops.arange(0, ids)
    if ignore_index is not None:
        keep = ids != ignore_index
        ids, grads, ex = b.ops.boolean_mask(ids, keep), b.ops.boolean_mask(grads, keep), b.ops.boolean_mask(ex, keep)
    return coalesce_lookups(b, ex, ids, grads, num_rows, B, per_example)


def _check_grad_shape(b: Backend, ishape: tuple, gshape: tuple) -> list[Any]:
    """EmbgradError unless ``gshape == ishape + (D,)``; dims only known when a traced
    ``tf.function`` runs are compared then (an ``InvalidArgumentError`` with this message):
    returns those run-time checks' tokens (for ``Backend.gate``)."""
    def show(shape: tuple) -> tuple:
        return tuple(s if isinstance(s, (int, np.integer)) else None for s in shape)

    msg = (f"output_grad must have shape ids.shape + (D,) = {show(ishape)} + (D,), got "
           f"{show(gshape)}.")
    if len(gshape) != len(ishape) + 1:
        raise EmbgradError(msg)
    tokens = []
    for i, g in zip(ishape, gshape[:-1], strict=True):
        if isinstance(i, (int, np.integer)) and isinstance(g, (int, np.integer)):
            if i != g:
                raise EmbgradError(msg)
        else:   # 0 <= g - i < 1: equal (checked when the graph runs)
            tokens.append(b.ops.assert_in_range(b.ops.reshape(b.ops.cast(g - i, "int64"), (1,)), 1, "embgrad: " + msg))
    return tokens


def row_grad(g: Any, num_rows: int | None = None) -> RowGrad:
    """A coalesced :class:`RowGrad` from a framework gradient of a table.

    Accepts a ``tf.IndexedSlices`` (never densified), a torch sparse COO tensor, a dense
    (V, D) tensor (rows with any nonzero are kept), or an MXNet ``RowSparseNDArray``.
    ``num_rows``: V, needed when ``g`` does not say it (an ``IndexedSlices`` without
    ``dense_shape``). Values are cast to float32 when narrower.

    Raises:
        EmbgradError: ``g`` is of no framework embgrad supports, or of an unsupported kind
            (layout, storage type) or shape (not (V, D)); ``num_rows`` is missing where ``g``
            does not tell it, or disagrees with it; a row index out of range.
    """
    b = get_backend(g)
    ids, values, V = b.ops.row_grad_parts(g)
    if num_rows is None:
        num_rows = V
    if num_rows is None:
        raise EmbgradError(f"row_grad(): cannot tell the table size from {type(g).__name__}; pass num_rows=.")
    if V is not None and num_rows != V:
        raise EmbgradError(f"row_grad(): num_rows={num_rows} but the gradient is of a table of {V} rows.")
    acc = _accum_dtype(b, values)
    if b.ops.dtype_name(values) != acc:
        values = b.ops.cast(values, acc)
    if b.ops.traced(ids):  # inside tf.function: checked when the graph runs
        ids = b.ops.gate(ids, b.ops.assert_in_range(ids, num_rows, f"embgrad row_grad(): a row index is out of "
                                            f"range for {num_rows} rows."))
        lo, hi = 0, 0
    elif b.ops.shape(ids)[0] == 0:
        return RowGrad(ids, values, num_rows, b)
    else:
        lo, hi = b.ops.minmax(ids)
    if lo < 0 or hi >= num_rows:
        raise EmbgradError(f"row_grad(): row index {lo if lo < 0 else hi} is out of range for {num_rows} rows.")
    rows, values = _coalesce(b, b.ops.cast(ids, "int64"), values)
    return RowGrad(rows, values, num_rows, b)
