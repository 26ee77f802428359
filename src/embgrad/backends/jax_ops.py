"""JAX tensor primitives (:class:`~embgrad.backends.base.TensorOps` over ``jax.Array``).

Static shapes: under ``jax.jit`` every array needs a shape known at trace time, so
:meth:`JaxOps.unique` returns as many slots as it has inputs; the slots past the real unique
values hold *sentinels* larger than every input (``iinfo.max - N + 1 + k``), ascending and
distinct, so "unique, sorted ascending" still holds and segment sums into those slots are
zero. Eagerly (concrete arrays) results are trimmed to their exact size. Primitives whose
output size depends on values (``boolean_mask``, ``repeat``) need concrete arrays and raise an
:class:`~embgrad.EmbgradError` under ``jit`` naming the eager alternative.

Integers: JAX uses 32-bit integers unless ``jax_enable_x64`` is set; "int64" here means the
widest integer JAX gives (int32 by default), and :attr:`JaxOps.index_bits` tells the
sparse algebra how large a combined (example, row) key may get.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import EmbgradError
from .base import TensorOps

__all__ = ["JaxOps", "unique_static", "check_in_range"]


def _x64() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _index_dtype() -> Any:
    return jnp.int64 if _x64() else jnp.int32


def _jdtype(name: str) -> Any:
    """A dtype name as JAX has it (64-bit names fall back to 32 bits without x64)."""
    if not _x64():
        name = {"int64": "int32", "float64": "float32", "uint64": "uint32"}.get(name, name)
    return jnp.dtype(name)


def _sentinels(n: int, dtype: Any) -> Any:
    """(n,) ascending distinct integers at the very top of ``dtype``'s range."""
    top = int(jnp.iinfo(dtype).max)
    return jnp.arange(top - n + 1, top + 1, dtype=jnp.int64 if _x64() else jnp.int32).astype(dtype) \
        if n else jnp.zeros((0,), dtype)


class JaxOps(TensorOps):
    name = "jax"

    @property
    def index_bits(self) -> int:
        """Bits of the widest non-negative integer index JAX has now (63 with x64, else 31)."""
        return 63 if _x64() else 31

    def to_numpy(self, x):
        if isinstance(x, np.ndarray):
            return x
        a = np.asarray(x)
        return a.astype(np.float32) if a.dtype.name == "bfloat16" else a

    def from_numpy(self, a, like=None):
        a = np.asarray(a)
        if a.dtype == np.int64 and not _x64():
            a = a.astype(np.int32)
        elif a.dtype == np.float64 and not _x64():
            a = a.astype(np.float32)
        return jnp.asarray(a)

    def dtype_name(self, x):
        return jnp.dtype(x.dtype).name

    def cast(self, x, dtype):
        return jnp.asarray(x).astype(_jdtype(dtype))

    def reshape(self, x, shape):
        return jnp.reshape(x, tuple(shape))

    def moveaxis(self, x, source, destination):
        return jnp.moveaxis(x, source, destination)

    def broadcast_to(self, x, shape):
        return jnp.broadcast_to(x, tuple(shape))

    def max_abs(self, x):
        return float(jnp.max(jnp.abs(x))) if x.size else 0.0

    def arange(self, n, like):
        return jnp.arange(n, dtype=_index_dtype())

    def zeros(self, shape, dtype, like):
        return jnp.zeros(tuple(shape), _jdtype(dtype))

    def concat(self, xs, axis=0):
        return jnp.concatenate(list(xs), axis=axis)

    def traced(self, x):
        return isinstance(x, jax.core.Tracer)

    def unique(self, x):
        if not self.traced(x):
            u, inv = jnp.unique(x, return_inverse=True)
            return u, jnp.reshape(inv, (-1,)).astype(_index_dtype())
        return unique_static(x)

    def segment_sum(self, data, segment_ids, num_segments):
        return jax.ops.segment_sum(data, segment_ids, num_segments=int(num_segments))

    def gather(self, x, idx):
        return jnp.take(x, idx, axis=0, mode="clip")

    def boolean_mask(self, x, mask):
        if self.traced(x) or self.traced(mask):
            raise EmbgradError(
                "this result's size depends on the values (a boolean selection), which JAX cannot "
                "trace under jax.jit: call it on the jitted function's output, eagerly (e.g. "
                "return the ExampleGrads / RowGrad from the jitted function, then call .example(b) "
                "or .numpy() outside).")
        return x[mask]

    def where(self, cond, a, b):
        return jnp.where(cond, a, b)

    def sqrt(self, x):
        return jnp.sqrt(x)

    def sum(self, x, axis=None):
        return jnp.sum(x) if axis is None else jnp.sum(x, axis=axis)

    def minimum(self, x, y):
        return jnp.minimum(x, y)

    def maximum(self, x, y):
        return jnp.maximum(x, y)

    def argsort(self, x):
        return jnp.argsort(x, stable=True).astype(_index_dtype())

    def searchsorted(self, sorted_seq, values, right=False):
        return jnp.searchsorted(sorted_seq, values, side="right" if right else "left").astype(_index_dtype())

    def repeat(self, x, counts):
        if self.traced(counts):
            raise EmbgradError(
                "this result's size depends on the values (ExampleGrads.dot joins pairs of rows), "
                "which JAX cannot trace under jax.jit: return the ExampleGrads from the jitted "
                "function and call dot() on it eagerly.")
        return jnp.repeat(x, counts, axis=0)

    def cumsum(self, x):
        return jnp.cumsum(x, axis=0)

    def floordiv(self, x, n):
        return x // n

    def scatter_rows(self, rows, values, num_rows):
        # add (not set): under jit, padded slots carry zero values at ids >= num_rows (dropped)
        out = jnp.zeros((int(num_rows), *values.shape[1:]), values.dtype)
        return out.at[rows].add(values, mode="drop")

    def count_nonfinite(self, x):
        if self.traced(x) or x.size == 0:
            return 0   # under jit a NaN/Inf stays visible in the results (nothing is dropped)
        if bool(jnp.isfinite(jnp.sum(x.astype(jnp.float32)))):
            return 0
        return int(jnp.sum(~jnp.isfinite(x)))

    def minmax(self, x):
        return int(jnp.min(x)), int(jnp.max(x))

    def eager_only(self, what, instead):
        if isinstance(jnp.zeros(()), jax.core.Tracer):   # inside a trace every new array is a tracer
            raise EmbgradError(f"{what} needs concrete values, which a function traced by jax.jit "
                               "does not have: call it outside the jitted function (before or between "
                               "steps); inside it, read rows with jnp.take(model.emb.embedding[...], ids, axis=0).")

    def assert_in_range(self, ids, num_rows, message):
        check_in_range(ids, num_rows, message)
        return None

    def row_grad_parts(self, g):
        if not isinstance(g, jax.Array):
            raise EmbgradError(f"row_grad() expected a jax.Array, got {type(g).__name__}.")
        if g.ndim != 2:
            raise EmbgradError(f"row_grad(): a dense table gradient must be (V, D), got {tuple(g.shape)}.")
        if self.traced(g):
            raise EmbgradError("row_grad() of a dense jax.Array keeps the rows with a nonzero, whose "
                               "number JAX cannot trace under jax.jit; call it eagerly.")
        rows = jnp.nonzero(jnp.any(g != 0, axis=1))[0].astype(_index_dtype())
        return rows, g[rows], int(g.shape[0])

    def matmul_t(self, a, b):
        return a @ b.T

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return jnp.matmul(jnp.swapaxes(a, -1, -2) if transpose_a else a,
                          jnp.swapaxes(b, -1, -2) if transpose_b else b)

    def take_along_last(self, x, idx):
        return jnp.take_along_axis(x, jnp.broadcast_to(idx[:, None, :], (x.shape[0], x.shape[1], idx.shape[1])),
                                   axis=2)

    def gather_last(self, x, idx):
        return jnp.take(x, idx, axis=-1)

    def topk(self, x, k):
        v, i = jax.lax.top_k(x, k)
        return v, i.astype(_index_dtype())

    def pick(self, x, idx):
        return jnp.take_along_axis(x, jnp.reshape(idx, (-1, 1)), axis=1).reshape(-1)


# ---------------------------------------------------------------------------- static-shape helpers
def unique_static(x: Any) -> tuple[Any, Any]:
    """Sorted unique values of (N,) int ``x`` and the inverse index, with static shapes.

    Returns ``(uniq (N,), inverse (N,))``: ``uniq[:R]`` the R unique values ascending, the
    N - R slots after them sentinels (ascending, distinct, above every value ``x`` can hold:
    the top of its dtype's range). ``uniq[inverse] == x``. jit-compatible: one sort of the
    values and a binary search (on XLA's CPU a sort of values alone is ~5x faster than an
    argsort, which sorts (value, index) pairs).
    """
    n = x.shape[0]
    idx = _index_dtype()
    if n == 0:
        return x, jnp.zeros((0,), idx)
    s, seg = _sorted_segments(x)
    count = seg[-1] + 1
    uniq = jnp.zeros((n,), x.dtype).at[seg].set(s)
    uniq = jnp.where(jnp.arange(n) < count, uniq, _sentinels(n, x.dtype))
    return uniq, seg[jnp.searchsorted(s, x)].astype(idx)


def _sorted_segments(x: Any) -> tuple[Any, Any]:
    """``(sorted x, slot)``: for each sorted entry, the rank of its value among the distinct
    values (0, 0, 1, 2, 2, ...)."""
    s = jnp.sort(x)
    new = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
    return s, (jnp.cumsum(new) - 1).astype(_index_dtype())


def check_in_range(ids: Any, num_rows: int, message: str, low: int = 0) -> None:
    """Raise ``message`` (an EmbgradError; ``{bad}`` in it becomes the offending id) unless every
    id is in [low, num_rows): eagerly now; under
    ``jit`` when the compiled function runs (a ``jax.debug.callback``; the error then reaches the
    caller as a ``JaxRuntimeError`` whose text holds ``message``)."""
    if ids.size == 0:
        return
    lo, hi = jnp.min(ids), jnp.max(ids)
    if not isinstance(lo, jax.core.Tracer) and not isinstance(hi, jax.core.Tracer):
        if int(lo) < low or int(hi) >= num_rows:
            raise EmbgradError(message.replace("{bad}", str(int(lo) if int(lo) < low else int(hi))))
        return

    def check(lo: Any, hi: Any) -> None:
        if int(lo) < low or int(hi) >= num_rows:
            raise EmbgradError(message.replace("{bad}", str(int(lo) if int(lo) < low else int(hi))))

    # the host callback runs only when an id is bad: a good batch costs two reductions and a branch
    jax.lax.cond((lo < low) | (hi >= num_rows), lambda lo, hi: jax.debug.callback(check, lo, hi),
                 lambda lo, hi: None, lo, hi)
