"""MXNet tensor primitives (:class:`~embgrad.backends.base.TensorOps` over ``mxnet.numpy``).

Imported through :mod:`embgrad.backends.gluon`, which first refuses a NumPy too new for
MXNet 1.9. Results are ``mxnet.numpy.ndarray``; arrays taken from the user keep their type.
"""
from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, nd

from ..errors import EmbgradError
from .base import TensorOps

__all__ = ["GluonOps"]

_mnp = mx.np


# ---------------------------------------------------------------------------- array helpers
def _as_np(x: Any) -> Any:
    """A zero-copy ``mxnet.numpy.ndarray`` view of a dense NDArray (or the array itself)."""
    if isinstance(x, _mnp.ndarray):
        return x
    if isinstance(x, nd.NDArray):
        if x.stype != "default":
            x = x.tostype("default")
        return x.as_np_ndarray()
    raise EmbgradError(f"expected an MXNet NDArray, got {type(x).__name__}.")


def _as_nd(x: Any) -> nd.NDArray:
    """A zero-copy legacy ``NDArray`` view (legacy operators such as integer division)."""
    return x.as_nd_ndarray() if isinstance(x, _mnp.ndarray) else x


def _like(x: Any, model_array: Any) -> Any:
    """``x`` as the array type of ``model_array`` (legacy NDArray or mxnet.numpy), zero-copy;
    what goes back into the user's model must be of the type its operators accept."""
    if isinstance(model_array, _mnp.ndarray):
        return _as_np(x)
    return _as_nd(_as_np(x))


def _ctx(like: Any) -> mx.Context:
    if isinstance(like, nd.NDArray):
        return like.ctx
    if isinstance(like, mx.gluon.Parameter):
        return like.list_ctx()[0]
    return mx.current_context()


def _np_shape() -> Any:
    """NumPy shape semantics (zero-size arrays allowed) for primitives that may produce them."""
    return mx.util.np_shape(True)


class GluonOps(TensorOps):
    name = "gluon"

    def to_numpy(self, x):
        if isinstance(x, np.ndarray):
            return x
        return x.asnumpy()

    def from_numpy(self, a, like=None):
        a = np.ascontiguousarray(a)
        with _np_shape():
            return _mnp.array(a, dtype=a.dtype, ctx=_ctx(like))

    def dtype_name(self, x):
        return np.dtype(x.dtype).name

    def cast(self, x, dtype):
        x = _as_np(x)
        return x if np.dtype(x.dtype).name == dtype else x.astype(dtype)

    def reshape(self, x, shape):
        with _np_shape():
            return _as_np(x).reshape(tuple(shape))

    def moveaxis(self, x, source, destination):
        with _np_shape():
            return _mnp.moveaxis(_as_np(x), source, destination)

    def broadcast_to(self, x, shape):
        with _np_shape():
            return _mnp.broadcast_to(_as_np(x), tuple(shape))

    def arange(self, n, like):
        return _mnp.arange(n, dtype="int64", ctx=_ctx(like))

    def zeros(self, shape, dtype, like):
        with _np_shape():
            return _mnp.zeros(tuple(shape), dtype=dtype, ctx=_ctx(like))

    def concat(self, xs, axis=0):
        with _np_shape():
            return _mnp.concatenate([_as_np(x) for x in xs], axis=axis)

    def floordiv(self, x, n):
        # legacy integer division truncates in the integer dtype; mxnet.numpy would go
        # through float (inexact above 2**24). Exact floor for the non-negative ids used here.
        return (_as_nd(_as_np(x)) / int(n)).as_np_ndarray()

    def compile(self, fn):
        """``fn`` run with NumPy shape semantics: MXNet 1.x otherwise reads a zero-size dim as
        "unknown" and fails on the empty arrays that masking every lookup leaves."""
        def run(*args):
            with _np_shape():
                return fn(*args)
        return run

    def unique(self, x):
        with _np_shape():
            u, inv = _mnp.unique(_as_np(x), return_inverse=True)
        return u, inv

    def segment_sum(self, data, segment_ids, num_segments):
        data = _as_np(data)
        shape = (int(num_segments),) + tuple(data.shape[1:])
        if data.shape[0] == 0:
            return self.zeros(shape, self.dtype_name(data), data)
        # the backward of gather_nd accumulates duplicate indices: a segment sum
        out = nd._internal._backward_gather_nd(
            _as_nd(data), _as_nd(_as_np(segment_ids)).reshape((1, -1)), shape=shape)
        return out.as_np_ndarray()

    def gather(self, x, idx):
        # keeps x's array type: rows of the user's inputs go back into the model
        with _np_shape():
            out = _mnp.take(_as_np(x), _as_np(idx), axis=0)
        return _like(out, x)

    def boolean_mask(self, x, mask):
        with _np_shape():
            return _as_np(x)[_as_np(mask).astype("bool")]

    def where(self, cond, a, b):
        return _mnp.where(_as_np(cond), _as_np(a), _as_np(b))

    def sqrt(self, x):
        return _mnp.sqrt(_as_np(x))

    def sum(self, x, axis=None):
        if axis is None:  # shape (1,): outside NumPy-shape mode MXNet reads () as "unknown"
            return nd.sum(_as_nd(_as_np(x))).as_np_ndarray()
        x = _as_np(x)
        if x.size == 0:   # MXNet 1.9's reduction fails on zero-size input ("Shape size mismatch")
            shape = tuple(d for i, d in enumerate(x.shape) if i != axis % x.ndim)
            return self.zeros(shape, self.dtype_name(x), x)
        return _mnp.sum(x, axis=axis)

    def minimum(self, x, y):
        return _mnp.minimum(_as_np(x), y if isinstance(y, (int, float)) else _as_np(y))

    def maximum(self, x, y):
        return _mnp.maximum(_as_np(x), y if isinstance(y, (int, float)) else _as_np(y))

    def argsort(self, x):
        # MXNet's sorts are not stable: break ties by position
        x = _as_np(x)
        return _mnp.lexsort((_mnp.arange(x.shape[0], dtype="int64", ctx=x.ctx), x))

    def searchsorted(self, sorted_seq, values, right=False):
        return _mnp.searchsorted(_as_np(sorted_seq), _as_np(values),
                                 side="right" if right else "left").astype("int64")

    def repeat(self, x, counts):
        x, counts = _as_np(x), _as_np(counts).astype("int64")
        total = int(counts.sum()) if counts.shape[0] else 0
        if total == 0:
            return self.zeros((0,) + tuple(x.shape[1:]), self.dtype_name(x), x)
        ends = _mnp.cumsum(counts)
        src = _mnp.searchsorted(ends, _mnp.arange(total, dtype="int64", ctx=x.ctx), side="right")
        return self.gather(x, src.astype("int64"))

    def cumsum(self, x):
        return _mnp.cumsum(_as_np(x), axis=0)

    def scatter_rows(self, rows, values, num_rows):
        return self.segment_sum(values, rows, num_rows)  # rows are unique

    def count_nonfinite(self, x):
        x = _as_np(x)
        if x.size == 0:
            return 0
        return int((~_mnp.isfinite(x)).sum())

    def minmax(self, x):
        flat = _as_nd(_as_np(x)).reshape((-1,))
        return int(nd.min(flat).asscalar()), int(nd.max(flat).asscalar())

    def row_grad_parts(self, g):
        if not isinstance(g, nd.NDArray):
            raise EmbgradError(f"row_grad() expected an MXNet NDArray, got {type(g).__name__}.")
        if len(g.shape) != 2:
            raise EmbgradError(f"row_grad(): a table gradient must be (V, D), got shape {tuple(g.shape)}.")
        V, D = int(g.shape[0]), int(g.shape[1])
        if g.stype == "row_sparse":
            if g.indices.shape[0] == 0:
                return (*self._no_rows(g, D), V)
            return g.indices.as_np_ndarray(), g.data.as_np_ndarray(), V
        if g.stype != "default":
            raise EmbgradError(f"row_grad(): unsupported storage type {g.stype!r}; pass a dense or "
                               "row_sparse gradient (g.tostype('row_sparse')).")
        x = _as_np(g)
        nonzero = (x != 0).astype("float32").sum(1) > 0
        if not bool(nonzero.any()):
            return (*self._no_rows(g, D), V)
        return self.boolean_mask(self.arange(V, x), nonzero), self.boolean_mask(x, nonzero), V

    def _no_rows(self, g: Any, D: int) -> tuple[Any, Any]:
        # an all-zero gradient: one explicit zero row (legacy MXNet operators cannot handle
        # zero-size arrays outside NumPy-shape mode)
        rows = _mnp.zeros((1,), dtype="int64", ctx=g.ctx)
        return rows, _mnp.zeros((1, D), dtype=np.dtype(g.dtype).name, ctx=g.ctx)

    def no_grad(self):
        return autograd.pause()

    def pick(self, x, idx):
        return nd.pick(_as_nd(_as_np(x)), _as_nd(_as_np(idx)).astype(x.dtype), axis=1).as_np_ndarray()

    def matmul_t(self, a, b):
        return _mnp.dot(_as_np(a), _as_np(b).T)

    def topk(self, x, k):
        v, i = nd.topk(_as_nd(_as_np(x)), k=int(k), axis=-1, ret_typ="both", dtype="int64")
        return v.as_np_ndarray(), i.as_np_ndarray()
