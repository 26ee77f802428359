"""Keras on TensorFlow (Keras 3 with ``KERAS_BACKEND=tensorflow``, and tf-keras / Keras 2): the
Keras adapter (:mod:`embgrad.backends.keras`) with TensorFlow's primitives
(:mod:`embgrad.backends.tensorflow_ops`) and a persistent ``tf.GradientTape`` tap.
"""
from __future__ import annotations

import tensorflow as tf

from ..errors import EmbgradError
from .base import Tap
from .keras import KerasBackend
from .tensorflow import TapeTap, TensorFlowBackend, is_symbolic

__all__ = ["KerasTensorFlowBackend"]


class KerasTensorFlowBackend(KerasBackend, TensorFlowBackend):
    """Keras layers whose tensors are TensorFlow's: ids checked as TensorFlow checks them
    (run-time assertions inside ``tf.function``), gradients from the tap's ``GradientTape``."""

    table_check = "total"

    def _check(self, info, ids):
        return self.check_ids(ids, info.num_rows, f"Keras layer {info.name!r}")

    def _open_tap(self) -> Tap:
        return TapeTap()

    def _add_patch(self, tap, patch):
        tap.on_remove(patch.remove)

    def _var_tensor(self, var):
        inner = var if isinstance(var, tf.Variable) else var.value
        return inner if isinstance(inner, (tf.Variable, tf.Tensor)) else tf.convert_to_tensor(var)

    def _put_rows(self, w, rows, values):
        return tf.tensor_scatter_nd_update(tf.convert_to_tensor(w), rows[:, None], values)

    def table_write(self, info, rows, values):
        var = self.table_variable(info)
        inner = self._var_tensor(var)
        idx = tf.constant(rows)
        vals = tf.cast(tf.constant(values), inner.dtype)
        if isinstance(inner, tf.Variable):
            inner.scatter_update(tf.IndexedSlices(vals, idx))
        else:
            var.assign(self._put_rows(var, idx, vals))

    def _record(self, tap, info, out):
        if not isinstance(out, tf.Tensor):
            raise EmbgradError(
                f"Keras layer {info.name!r} returned a {type(out).__name__}; embgrad taps "
                "dense lookups (pass dense int ids, not a SparseTensor/RaggedTensor).")
        tap.watch(out, f"Keras layer {info.name!r}")
        return out, True

    def _wrap_dispatch(self, fn):
        # plain Python even when traced: autograph must not rewrite embgrad's checks
        return tf.autograph.experimental.do_not_convert(fn)

    def split_broadcast(self, tap, loss, call, output, batch_size):
        """Per-example gradients of a batch-free lookup's output (B, *output.shape),
        from the forward's output y (B, ...): row b is d(sum(g_b · y_b))/d(lookup output)
        with g = dLoss/dy held fixed, i.e. example b's share when the examples do not
        interact in the model; B backward passes vectorized by tape.jacobian (pfor)."""
        if is_symbolic(loss) or not isinstance(tap, TapeTap):
            return None
        leaves = [t for t in tf.nest.flatten(output)
                  if isinstance(t, tf.Tensor) and t.dtype.is_floating and t.shape.rank
                  and t.shape[0] == batch_size]
        if not leaves:
            return None
        gys = tap.tape.gradient(loss, leaves)
        pairs = [(t, g) for t, g in zip(leaves, gys, strict=True) if g is not None]
        if not pairs:
            return None
        with tap.tape:            # record z on the capture's tape, then differentiate it
            z = tf.add_n([tf.reduce_sum(tf.reshape(tf.stop_gradient(tf.convert_to_tensor(g)) * t,
                                                   (batch_size, -1)), axis=1) for t, g in pairs])
        return tap.tape.jacobian(z, call.output)

    def _selected_rows(self, info, inner, args, kwargs):
        var = getattr(info.weight, "_value", None)
        if not isinstance(var, tf.Variable):
            var = self._var_tensor(info.weight)
        if not isinstance(var, tf.Variable):
            return inner(*args, **kwargs), None
        V, D = info.num_rows, info.dim
        direction = tf.broadcast_to(tf.cast(tf.range(V)[:, None], var.dtype), (V, D))
        with tf.autodiff.ForwardAccumulator(var, direction) as acc:
            out = inner(*args, **kwargs)
        j = acc.jvp(out) if isinstance(out, tf.Tensor) else None
        if j is None or out.shape.rank is None or out.shape.rank < 1 \
                or out.shape[-1] not in (None, D):
            return out, None
        j = tf.cast(j, tf.float64)
        r = j[..., 0]
        ids = tf.cast(tf.clip_by_value(tf.round(r), 0, V - 1), tf.int64)
        ok = (tf.reduce_all(tf.equal(j, r[..., None])) & tf.reduce_all(tf.equal(r, tf.round(r)))
              & tf.reduce_all(r >= 0) & tf.reduce_all(r < V)
              & tf.reduce_all(tf.equal(out, tf.gather(tf.cast(var, out.dtype), ids))))
        if not is_symbolic(out):
            return out, (ids if bool(ok) else False)
        check = tf.debugging.Assert(ok, [
            f"embgrad: Keras layer {info.name!r} did not return rows of its table "
            "unchanged in this traced call (a pure slice / gather / broadcast of its "
            f"{V}x{D} table), so embgrad cannot tell which rows its output holds. Call it "
            "eagerly inside the capture, or capture the layers that look rows up by ids."])
        with tf.control_dependencies([check]):
            return out, tf.identity(ids)
