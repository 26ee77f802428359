"""TensorFlow backend: the tensor primitives over ``tf.Tensor`` / ``tf.Variable`` /
``tf.IndexedSlices``, a ``tf.function`` compiler for the sparse hot path, and a persistent
``tf.GradientTape`` tap that the Keras backend (``embgrad.backends.keras``) builds on.

Raw TensorFlow has no embedding *layers* to tap: code that calls ``tf.nn.embedding_lookup`` on
its own ``tf.Variable`` uses ``embgrad.rows_from_lookups(ids, tape.gradient(loss, looked_up), V)``
or ``embgrad.row_grad(tape.gradient(loss, table))`` (an ``IndexedSlices``, never densified).

Inside ``tf.function`` (graph mode) values are not known while tracing: shapes that are not
static come back as scalar tensors, and the checks that need values (ids in range, gradients
finite) become run-time assertions (``tf.errors.InvalidArgumentError`` carrying embgrad's
message) instead of an immediate :class:`~embgrad.EmbgradError`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from ..errors import EmbgradError
from .base import Backend, Tap

__all__ = ["TensorFlowBackend", "TapeTap"]

_TF_TYPES = (tf.Tensor, tf.Variable, tf.IndexedSlices, tf.RaggedTensor, tf.SparseTensor)


def is_symbolic(x: Any) -> bool:
    """True while tracing a ``tf.function`` (ops on ``x`` have no value yet, even when ``x``
    itself is an eager tensor the function closes over) or for a graph tensor."""
    return not tf.executing_eagerly() or (isinstance(x, tf.Tensor) and not hasattr(x, "numpy"))


class TapeTap(Tap):
    """A tap whose gradients come from one persistent ``tf.GradientTape``.

    The tape is opened when the tap is installed (so it records the whole forward pass and
    watches the trainable variables it reads, for ``sources=``) and stops recording in
    :meth:`remove`; :meth:`grad` differentiates after that. ``restore`` callbacks undo the
    patches of the model (run first, also when the forward raised).
    """

    def __init__(self) -> None:
        self.tape = tf.GradientTape(persistent=True)
        self.tape.__enter__()
        self._recording = True
        self._graph = _current_graph()
        self._restore: list[Callable[[], None]] = []

    def on_remove(self, fn: Callable[[], None]) -> None:
        self._restore.append(fn)

    def watch(self, x: Any, where: str = "a layer") -> None:
        """Make ``x`` a source of the tape; EmbgradError if ``x`` lives in another graph (a
        ``tf.function`` such as ``model.fit``'s train step, traced inside the capture)."""
        if _current_graph() is not self._graph:
            raise EmbgradError(
                f"{where} ran inside a tf.function (e.g. model.fit / predict, or a @tf.function) "
                "that was traced inside the capture, so its lookups cannot be differentiated from "
                "here. Put the `with embgrad.capture(model) as cap:` block INSIDE that function "
                "(e.g. a custom train_step), or call the model eagerly inside the block.")
        if self._recording:
            self.tape.watch(x)

    def remove(self) -> None:
        restore, self._restore = self._restore, []
        try:
            for fn in reversed(restore):
                fn()
        finally:
            if self._recording:
                self._recording = False
                self.tape.__exit__(None, None, None)

    def grad(self, loss, calls, sources=None, retain_graph=False):
        outputs = [c.output for c in calls]
        srcs = [_source(s, k) for k, s in enumerate(_source_list(sources))]
        try:
            grads = self.tape.gradient(loss, outputs + srcs)
        except (TypeError, ValueError) as e:
            raise EmbgradError(f"TensorFlow could not differentiate the loss: {e}") from e
        out_grads = grads[:len(outputs)]
        if all(g is None for g in out_grads):
            raise EmbgradError(
                "the loss does not depend on any recorded embedding output: compute the loss INSIDE "
                "the `with embgrad.capture(model) as cap:` block (TensorFlow's tape only records "
                "while the capture is active), from the outputs of the model called in that block.")
        out = [tf.zeros_like(o) if g is None else _densify_slices(g) for o, g in zip(outputs, out_grads, strict=True)]
        src = list(grads[len(outputs):]) if sources is not None else None
        return out, src


def _source_list(sources: Any) -> list[Any]:
    if sources is None:
        return []
    if isinstance(sources, (str, bytes)) or not isinstance(sources, (list, tuple)):
        raise EmbgradError(
            f"sources= takes a list of variables (e.g. model.trainable_variables), got "
            f"{type(sources).__name__} {sources!r:.60}.")
    return list(sources)


def _source(s: Any, k: int) -> Any:
    """A ``sources=`` entry as the tensor/variable the tape differentiates (EmbgradError for
    names and other non-variables)."""
    v = _unwrap_variable(s)
    if isinstance(v, (tf.Variable, tf.Tensor)):
        return v
    hint = (" Pass the variable itself, e.g. model.get_layer('dense').kernel, or "
            "model.trainable_variables; names are not looked up.") if isinstance(s, str) else ""
    raise EmbgradError(f"sources[{k}] must be a variable or tensor of the model, got "
                       f"{type(s).__name__} {s!r:.60}.{hint}")


def _leading_shape(n: Any, like: Any) -> Any:
    """The shape ``(n, *like.shape[1:])`` as int64: a constant when static (eager: no ops)."""
    rest = like.shape.as_list()[1:]
    if isinstance(n, (int, np.integer)) and None not in rest:
        return tf.constant([int(n)] + rest, tf.int64)
    return tf.concat([tf.reshape(tf.cast(n, tf.int64), (1,)), tf.shape(like, out_type=tf.int64)[1:]], 0)


def _out_of_range(where: str, what: str, num_rows: int) -> str:
    return (f"{where}: {what} is out of range for a table of {num_rows} rows (valid ids are "
            f"0..{num_rows - 1}). Check the tokenizer's vocabulary size against the layer's "
            "input_dim, or map unknown tokens to an UNK id. (Keras would wrap a negative id, and "
            "TensorFlow on GPU returns zeros for out-of-range ids: embgrad refuses both.)")


_NOT_DENSE = (
    "embgrad takes dense tensors, got a tf.{0}. Ragged ids (examples of different lengths): "
    "ids.to_tensor(default_value=PAD); sparse ids: tf.sparse.to_dense(ids, default_value=PAD); "
    "then pass ignore_index=PAD to rows_from_lookups (or mask PAD in the loss).")


def _current_graph() -> Any:
    """The graph being traced (a ``tf.function``'s FuncGraph), or None when executing eagerly."""
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def _unwrap_variable(v: Any) -> Any:
    """A Keras 3 ``Variable`` differentiates through its backing ``tf.Variable``."""
    inner = getattr(v, "value", None)
    if not isinstance(v, (tf.Tensor, tf.Variable)) and isinstance(inner, (tf.Tensor, tf.Variable)):
        return inner
    return v


def _densify_slices(g: Any) -> Any:
    # dLoss/d(output) is dense by nature; an IndexedSlices here (a gather downstream of the
    # lookup) covers an (B, T, D) tensor, never a table, so densifying it costs O(B·T·D).
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


class TensorFlowBackend(Backend):
    """Primitives over TensorFlow tensors, eager or inside ``tf.function``."""

    name = "tensorflow"
    framework_module = "tensorflow"

    def __init__(self) -> None:
        self._compiled: dict[Any, Callable] = {}

    broadcast_seen = ("a TensorFlow/Keras lookup's output cannot be split by example once it is "
                      "broadcast: the tap sees the (1, T, D) output only")

    def expand_hint(self, batch_size: Any) -> str:
        return f"keras.ops.broadcast_to(ids, ({batch_size}, T)) (or tf.broadcast_to)"

    def is_appropriate(self, obj: Any) -> bool:
        return isinstance(obj, _TF_TYPES)

    # ------------------------------------------------------------------ surgery
    def find_embeddings(self, model: Any) -> dict:
        raise EmbgradError(
            f"{type(model).__name__} is not a Keras model or layer, and raw TensorFlow has no "
            "embedding layers to tap. For your own tf.nn.embedding_lookup on a tf.Variable use "
            "embgrad.rows_from_lookups(ids, tape.gradient(loss, looked_up), num_rows) or "
            "embgrad.row_grad(tape.gradient(loss, table)).")

    def install_tap(self, model, infos, on_call, active=None):
        raise EmbgradError("raw TensorFlow has no layers to tap; pass a Keras model to capture().")

    def scalar_loss(self, loss: Any) -> Any:
        if not isinstance(loss, (tf.Tensor, tf.Variable)):
            raise EmbgradError(f"loss must be a scalar tf.Tensor, got {type(loss).__name__}.")
        if loss.shape.rank is not None and loss.shape.num_elements() not in (None, 1):
            raise EmbgradError(
                f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}; reduce it with "
                "tf.reduce_sum or tf.reduce_mean and pass loss_reduction='sum' or 'mean' accordingly.")
        if not loss.dtype.is_floating:
            raise EmbgradError(f"loss must be a floating-point scalar, got dtype {loss.dtype.name}.")
        return loss   # not reshaped: a new op after the tape stopped would cut the loss off

    # ------------------------------------------------------------------ checks
    def check_ids(self, ids: Any, num_rows: int, where: str) -> Any:
        """EmbgradError unless ``ids`` are integers in ``[0, num_rows)``; returns ``ids``. In
        graph mode the range is a run-time assertion, and the ids returned only have a value once
        it passed (look up those, so the lookup cannot run first). ``where`` names the layer."""
        if isinstance(ids, tf.RaggedTensor):
            raise EmbgradError(
                f"{where}: ids are a tf.RaggedTensor (examples of different lengths); pad them to "
                "a dense (B, T) tensor (e.g. ids.to_tensor(default_value=PAD)) and mask the padding.")
        if isinstance(ids, tf.SparseTensor):
            raise EmbgradError(
                f"{where}: ids are a tf.SparseTensor; embgrad taps dense lookups. Densify them with "
                "tf.sparse.to_dense(ids, default_value=PAD) and mask PAD (mask_zero=True with PAD=0).")
        given = ids
        if not isinstance(ids, (tf.Tensor, tf.Variable)):
            ids = tf.convert_to_tensor(ids)
        dt = ids.dtype
        if not dt.is_integer:
            raise EmbgradError(
                f"{where}: ids have dtype {dt.name}, but an embedding looks up integer ids (Keras "
                f"would silently truncate them). Cast them with tf.cast(ids, 'int32') after checking "
                f"they are whole numbers in [0, {num_rows}).")
        if ids.shape.num_elements() == 0:
            return given    # an empty batch (Poisson sampling makes them): empty results
        if is_symbolic(ids):
            return self.gate(ids, self.assert_in_range(ids, num_rows, _out_of_range(where, "an id", num_rows)))
        lo, hi = self.minmax(ids)
        if lo < 0 or hi >= num_rows:
            bad = lo if lo < 0 else hi
            pos = tuple(int(i) for i in tf.where(ids == bad)[0].numpy())
            raise EmbgradError(_out_of_range(where, f"id {bad} at position {pos}", num_rows))
        return given

    # ------------------------------------------------------------------ tensor primitives
    def to_numpy(self, x):
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, tf.IndexedSlices):
            raise EmbgradError("to_numpy() of a tf.IndexedSlices: use embgrad.row_grad(g).numpy().")
        x = _unwrap_variable(x)
        if x.dtype == tf.bfloat16:
            x = tf.cast(x, tf.float32)
        return x.numpy()

    def from_numpy(self, a, like=None):
        dev = getattr(like, "device", None) if isinstance(like, (tf.Tensor, tf.Variable)) else None
        if dev:
            with tf.device(dev):
                return tf.constant(a)
        return tf.constant(a)

    def shape(self, x):
        """Static dims as ints; dims unknown while tracing a ``tf.function`` as scalar tensors."""
        if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
            raise EmbgradError(_NOT_DENSE.format(type(x).__name__))
        static = x.shape.as_list()
        if None not in static:
            return tuple(static)
        dyn = tf.shape(x, out_type=tf.int64)
        return tuple(s if s is not None else dyn[i] for i, s in enumerate(static))

    def dtype_name(self, x):
        return x.dtype.name

    def cast(self, x, dtype):
        return tf.cast(x, dtype)

    def reshape(self, x, shape):
        return tf.reshape(x, shape)

    def moveaxis(self, x, source, destination):
        return tf.experimental.numpy.moveaxis(x, source, destination)

    def broadcast_to(self, x, shape):
        return tf.broadcast_to(x, shape)

    def arange(self, n, like):
        return tf.range(tf.cast(n, tf.int64), dtype=tf.int64)

    def zeros(self, shape, dtype, like):
        return tf.zeros(shape, dtype=dtype)

    def concat(self, xs, axis=0):
        return tf.concat(list(xs), axis)

    def unique(self, x):
        # tf.unique keeps first-occurrence order: sort the (few) unique values and remap.
        u, idx = tf.unique(x, out_idx=tf.int64)
        order = tf.argsort(u, stable=True)
        rank = tf.math.invert_permutation(order)
        return tf.gather(u, order), tf.gather(tf.cast(rank, tf.int64), idx)

    def segment_sum(self, data, segment_ids, num_segments):
        # on CPU (TF 2.21) unsorted_segment_sum beats scatter_nd: ~1.3x on (8192, 128) float32
        # rows, ~10x on (8192,) scalars (the per-example norms)
        return tf.math.unsorted_segment_sum(data, tf.cast(segment_ids, tf.int64),
                                            tf.cast(num_segments, tf.int64))

    def gather(self, x, idx):
        return tf.gather(x, idx)

    def boolean_mask(self, x, mask):
        return tf.boolean_mask(x, mask)

    def where(self, cond, a, b):
        return tf.where(cond, a, b)

    def sqrt(self, x):
        return tf.sqrt(x)

    def sum(self, x, axis=None):
        return tf.reduce_sum(x, axis)

    def minimum(self, x, y):
        return tf.minimum(x, tf.cast(y, x.dtype))

    def maximum(self, x, y):
        return tf.maximum(x, tf.cast(y, x.dtype))

    def argsort(self, x):
        return tf.cast(tf.argsort(x, stable=True), tf.int64)

    def searchsorted(self, sorted_seq, values, right=False):
        return tf.searchsorted(sorted_seq, values, side="right" if right else "left", out_type=tf.int64)

    def repeat(self, x, counts):
        return tf.repeat(x, counts)

    def cumsum(self, x):
        return tf.cumsum(x, 0)

    def scatter_rows(self, rows, values, num_rows):
        return tf.scatter_nd(tf.reshape(tf.cast(rows, tf.int64), (-1, 1)), values,
                             _leading_shape(num_rows, values))

    def count_nonfinite(self, x):
        if is_symbolic(x):
            # graph mode: the value is not known yet; assert at run time instead. (Not
            # tf.debugging.assert_all_finite: its CheckNumerics kernel and the identity it returns
            # cost ~2 ms on a (64, 128, 128) gradient on CPU, is_finite + all ~0.2 ms.)
            if x.dtype.is_floating:
                tf.debugging.Assert(
                    tf.reduce_all(tf.math.is_finite(x)),
                    ["embgrad: a gradient holds NaN/Inf values; the loss or the model diverged "
                     "(or a float16 loss was scaled too far)."])
            return 0
        if not x.dtype.is_floating or bool(tf.reduce_all(tf.math.is_finite(x))):
            return 0   # the common case in two ops; count only when something is wrong
        return int(tf.reduce_sum(tf.cast(~tf.math.is_finite(x), tf.int64)))

    def minmax(self, x):
        return int(tf.reduce_min(x)), int(tf.reduce_max(x))

    def traced(self, x):
        return is_symbolic(x)

    def eager_only(self, what, instead):
        if not tf.executing_eagerly():
            raise EmbgradError(f"{what} runs eagerly only: it needs tensor values, which a tf.function "
                               f"being traced does not have. {instead}")

    def assert_in_range(self, ids, num_rows, message):
        flat = tf.reshape(ids, (-1,))
        return [op for op in (tf.debugging.assert_non_negative(flat, message=message),
                              tf.debugging.assert_less(flat, tf.cast(num_rows, flat.dtype), message=message))
                if op is not None]

    def gate(self, x, *tokens):
        deps = [op for t in tokens if t for op in t]
        if not deps:
            return x
        with tf.control_dependencies(deps):
            return tf.identity(x)

    def row_grad_parts(self, g):
        if isinstance(g, tf.IndexedSlices):
            values = g.values
            if values.shape.rank != 2:
                raise EmbgradError(f"row_grad(): IndexedSlices values must be (N, D), got shape "
                                   f"{tuple(values.shape)}.")
            V = None
            if g.dense_shape is not None:
                static = tf.get_static_value(g.dense_shape)
                V = int(static[0]) if static is not None else None
            return tf.cast(g.indices, tf.int64), values, V
        g = _unwrap_variable(g)
        if isinstance(g, (tf.Tensor, tf.Variable)):
            if g.shape.rank != 2:
                raise EmbgradError(f"row_grad(): a dense table gradient must be (V, D), got "
                                   f"{tuple(g.shape)}.")
            rows = tf.reshape(tf.where(tf.reduce_any(g != 0, axis=1)), (-1,))
            return rows, tf.gather(g, rows), self.shape(g)[0]
        raise EmbgradError(f"row_grad() expected a tf.IndexedSlices or a (V, D) tf.Tensor, got "
                           f"{type(g).__name__}.")

    def compile(self, fn: Callable) -> Callable:
        """``fn`` as a ``tf.function`` (cached per function; shapes generalise, no retrace storm)."""
        base = fn.func if isinstance(fn, functools.partial) else fn
        key = (base, tuple(fn.args) if isinstance(fn, functools.partial) else ())
        compiled = self._compiled.get(key)
        if compiled is None:
            traced = tf.function(fn, reduce_retracing=True, autograph=False)

            def compiled(*args: Any) -> Any:
                # Python ints (batch sizes, table sizes) go in as int64 tensors: a new value then
                # reuses the trace instead of tracing again (bools stay Python: they pick code)
                return traced(*(tf.constant(a, tf.int64) if isinstance(a, (int, np.integer))
                                and not isinstance(a, bool) else a for a in args))

            compiled.tf_function = traced   # type: ignore[attr-defined]
            self._compiled[key] = compiled
        return compiled

    def no_grad(self):
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ attribution
    def value_and_grads(self, fn):
        watched: list[Any] = []
        with tf.GradientTape(persistent=True) as tape:
            def watch(t: Any) -> Any:
                tape.watch(t)  # noqa: F821 (the cell is emptied by `del tape` below, after the last call)
                watched.append(t)
                return t

            y = fn(watch)
            sums = [tf.reduce_sum(y[:, k]) for k in range(int(y.shape[1]))]
        if len(watched) != 1:
            raise EmbgradError(f"value_and_grads: fn watched {len(watched)} tensors, expected exactly one.")
        x = watched[0]
        grads = []
        for s in sums:
            g = tape.gradient(s, x)
            grads.append(tf.zeros_like(x) if g is None else _densify_slices(g))
        del tape
        return tf.stop_gradient(y), grads

    def log_probs_at(self, logits, positions, tokens):
        rows = tf.gather(logits, positions, batch_dims=1)              # (N, K, V)
        if rows.dtype not in (tf.float32, tf.float64):
            rows = tf.cast(rows, tf.float32)
        lp = tf.nn.log_softmax(rows, axis=-1)
        return tf.gather(lp, tokens, batch_dims=2)

    def embed(self, info, ids):
        return tf.stop_gradient(info.layer(ids))

    def pick(self, x, idx):
        return tf.reshape(tf.gather(x, tf.reshape(idx, (-1, 1)), batch_dims=1), (-1,))

    def matmul_t(self, a, b):
        return tf.matmul(a, b, transpose_b=True)

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)

    def take_along_last(self, x, idx):
        return tf.gather(x, idx, axis=2, batch_dims=1)

    def gather_last(self, x, idx):
        return tf.gather(x, idx, axis=-1)

    def topk(self, x, k):
        v, i = tf.math.top_k(x, k)
        return v, tf.cast(i, tf.int64)
