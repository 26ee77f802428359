"""TensorFlow backend: the adapter for raw TensorFlow tensors (its tensor primitives and
``tf.function`` compiler are :mod:`embgrad.backends.tensorflow_ops`), and a persistent
``tf.GradientTape`` tap that the Keras backend (``embgrad.backends.keras``) builds on.

Raw TensorFlow has no embedding *layers* to tap: code that calls ``tf.nn.embedding_lookup`` on
its own ``tf.Variable`` uses ``embgrad.rows_from_lookups(ids, tape.gradient(loss, looked_up), V)``
or ``embgrad.row_grad(tape.gradient(loss, table))`` (an ``IndexedSlices``, never densified).

Inside ``tf.function`` the id checks are run-time assertions (see ``tensorflow_ops``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from ..errors import EmbgradError
from .base import ModelAdapter, Tap
from .tensorflow_ops import _TF_TYPES, TensorFlowOps, _unwrap_variable, is_symbolic

__all__ = ["TensorFlowBackend", "TapeTap"]

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
        # a call the loss does not reach gets None (the core uses zeros, and refuses when no
        # call is reached: a loss from a forward run outside the block, which the tape, recording
        # only while the capture is active, never saw)
        out = [None if g is None else _densify_slices(g) for g in grads[:len(outputs)]]
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


def _out_of_range(where: str, what: str, num_rows: int) -> str:
    return (f"{where}: {what} is out of range for a table of {num_rows} rows (valid ids are "
            f"0..{num_rows - 1}). Check the tokenizer's vocabulary size against the layer's "
            "input_dim, or map unknown tokens to an UNK id. (Keras would wrap a negative id, and "
            "TensorFlow on GPU returns zeros for out-of-range ids: embgrad refuses both.)")


def _current_graph() -> Any:
    """The graph being traced (a ``tf.function``'s FuncGraph), or None when executing eagerly."""
    return None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()


def _densify_slices(g: Any) -> Any:
    # dLoss/d(output) is dense by nature; an IndexedSlices here (a gather downstream of the
    # lookup) covers an (B, T, D) tensor, never a table, so densifying it costs O(B·T·D).
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


class TensorFlowBackend(ModelAdapter):
    """Raw TensorFlow: no layers to tap (its ``ops`` are used by Keras on TensorFlow and for
    ``tf.Tensor`` / ``tf.IndexedSlices`` results)."""

    name = "tensorflow"
    framework_module = "tensorflow"

    def __init__(self) -> None:
        self.ops = TensorFlowOps()    # its own cache of compiled functions

    #: added to the core's refusal of a loss that reaches no recorded lookup
    unreached_hint = (" TensorFlow's tape records only while the capture is active: compute the loss INSIDE "
                      "the `with embgrad.capture(model) as cap:` block.")

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
            return self.ops.gate(ids, self.ops.assert_in_range(ids, num_rows, _out_of_range(where, "an id", num_rows)))
        lo, hi = self.ops.minmax(ids)
        if lo < 0 or hi >= num_rows:
            bad = lo if lo < 0 else hi
            pos = tuple(int(i) for i in tf.where(ids == bad)[0].numpy())
            raise EmbgradError(_out_of_range(where, f"id {bad} at position {pos}", num_rows))
        return given

    # ------------------------------------------------------------------ differentiation
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

    def embed(self, info, ids):
        return tf.stop_gradient(info.layer(ids))

    #: ops through which a lookup's output flows elementwise (its axes kept, or new ones
    #: broadcast in front by NumPy's right-aligned rule)
    _ELEMENTWISE = frozenset({
        "Identity", "Cast", "Neg", "Relu", "Relu6", "Elu", "Selu", "Gelu", "Tanh", "Sigmoid",
        "Square", "Sqrt", "Rsqrt", "Exp", "Log", "Abs", "Softplus", "AddV2", "Add", "Sub", "Mul",
        "RealDiv", "DivNoNan", "Maximum", "Minimum", "SquaredDifference", "BiasAdd", "SelectV2",
        "AddN", "BroadcastTo", "ExpandDims", "Reshape", "StridedSlice"})

    def broadcast_in_graph(self, call):
        """In a traced function: follow the lookup's output (N, ..., D) through elementwise and
        view ops of the graph and report the first op that moves its ids' axis off axis 0 by
        putting new axes in front of it (``pos(tf.range(T))[None] + x``, ``x + pos(...)`` with
        x of shape (B, T, D), ``tf.broadcast_to``, ``tf.expand_dims(..., 0)``): the lookup is
        then broadcast over the batch, not one id per example. New axes after it
        (``user_emb[:, None] * seq``) keep one row per example and are not reported."""
        out = call.output
        if not isinstance(out, tf.Tensor) or not is_symbolic(out) or out.shape.rank is None:
            return None
        seen: set[int] = set()
        todo: list[tuple[Any, int]] = [(out, 0)]
        while todo and len(seen) < 256:
            t, pos = todo.pop()
            if id(t) in seen or t.shape.rank is None:
                continue
            seen.add(id(t))
            rank = t.shape.rank
            for op in t.consumers():
                if op.type not in self._ELEMENTWISE or not op.outputs:
                    continue
                for o in op.outputs[:1]:
                    if o.shape.rank is None:
                        continue
                    grow = o.shape.rank - rank
                    if grow <= 0:
                        new = pos if grow == 0 else -1
                    elif op.type == "ExpandDims":
                        axis = tf.get_static_value(op.inputs[1])
                        if axis is None:
                            continue
                        axis = int(axis) % o.shape.rank
                        new = pos + 1 if axis <= pos else pos
                    elif op.type == "StridedSlice":
                        mask = int(op.get_attr("new_axis_mask"))
                        new = pos + 1 if mask & 1 else pos
                    elif op.type == "Reshape":
                        front = o.shape[0] == 1 and t.shape[0] not in (None, 1)
                        new = pos + 1 if front else pos
                    else:                       # right-aligned broadcasting: axes added in front
                        new = pos + grow
                    if new > 0:
                        return f"{op.type} ({op.name}: {t.shape} -> {o.shape})"
                    if new == 0:
                        todo.append((o, new))
        return None
