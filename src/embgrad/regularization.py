"""Lazy L1/L2 regularisation of a sparse :class:`~embgrad.RowGrad`: :func:`regularize`.

Part of the ``RowGrad`` algebra (:mod:`embgrad.sparse`): the penalty's gradient is added on
the rows the batch touched only, so the gradient stays sparse. The table's current rows come
from :func:`embgrad.table`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import EmbgradError
from .sparse import RowGrad

__all__ = ["regularize"]


def regularize(row_grad: RowGrad, table: Any, *, l1: float = 0.0, l2: float = 0.0, layer: Any = None) -> RowGrad:
    """``row_grad`` plus the gradient of ``l1·Σ|E_r| + l2·Σ E_r²`` over the rows it touches.

    Lazy regularisation, as sparse optimizers do: only the R rows in ``row_grad.rows`` are
    penalised, so the result stays a sparse (R, D) gradient. Putting ``l1 * sum(|E|)`` into the
    loss instead gives every one of the V rows a gradient (dense, and it shrinks rows the batch
    never saw); on the touched rows both agree. Same coefficients as
    ``keras.regularizers.L1L2``; PyTorch's ``weight_decay=wd`` corresponds to ``l2=wd/2``.
    The L1 subgradient at 0 is 0. ``table``: a :class:`~embgrad.tables.Table`, or a model/layer
    (with ``layer=``) whose table the gradient belongs to. Returns a new :class:`~embgrad.RowGrad`
    on the same R rows, in ``row_grad``'s dtype (float32 or wider); ``row_grad`` is not changed.

    Raises:
        EmbgradError: ``row_grad`` is not a :class:`~embgrad.RowGrad`; ``l1`` or ``l2`` is not a
            finite number >= 0; the gradient's (V, D) is not the table's; and what
            :func:`embgrad.table` raises for a model/layer (no embedding layer, an unknown
            ``layer``, several layers and no way to pick).
    """
    if not isinstance(row_grad, RowGrad):
        raise EmbgradError(f"regularize() takes a RowGrad (e.g. grads['emb'].weight_grad), got "
                           f"{type(row_grad).__name__}; convert a framework gradient with embgrad.row_grad(g).")
    for name, v in (("l1", l1), ("l2", l2)):
        if not isinstance(v, (int, float, np.floating)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise EmbgradError(f"regularize(): {name} must be a finite number >= 0, got {v!r}.")
    from . import tables  # tables imports this module: looked up when called

    t = table if isinstance(table, tables.Table) else tables.table(table, layer)
    if row_grad.num_rows != t.num_rows or (row_grad._size() != 0 and row_grad.dim != t.dim):
        raise EmbgradError(f"regularize(): the gradient is of a ({row_grad.num_rows}, {row_grad.dim}) table "
                           f"but table {t.name!r} is ({t.num_rows}, {t.dim}); pass the table it belongs to.")
    if row_grad._size() == 0 or (l1 == 0 and l2 == 0):
        return row_grad
    b = row_grad._backend
    dt = b.ops.dtype_name(row_grad.values)
    E = b.ops.cast(t._backend.table_gather(t.info, row_grad.rows), dt)
    values = row_grad.values
    if l1:
        values = values + float(l1) * (b.ops.cast(E > 0, dt) - b.ops.cast(E < 0, dt))
    if l2:
        values = values + (2.0 * float(l2)) * E
    return RowGrad(row_grad.rows, values, row_grad.num_rows, b)
