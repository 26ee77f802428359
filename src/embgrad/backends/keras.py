"""Keras backend: Keras 3 on TensorFlow and on PyTorch, and tf-keras (Keras 2).

Finds ``Embedding`` layers (also ``ReversibleEmbedding``, LoRA-enabled and nested ones, named
by ``layer.name``; a ``/``-joined path of layer names also works), and taps them reversibly:
Keras layers have no forward hooks, so the tap *shadows* the instance's ``call`` (an instance
attribute that :meth:`Tap.remove` deletes again, also when the forward raises). A reverse call
of a ``ReversibleEmbedding`` (the tied output projection) passes through unrecorded, so the
layer's ``weight_grad`` is its lookup part only; so is it with an ``embeddings_regularizer``,
whose dense gradient reaches the table through ``model.losses`` (``embgrad.regularize`` adds
the lazy, sparse version of that term to a ``RowGrad``).

Gradients: on TensorFlow a persistent ``tf.GradientTape`` opened with the tap records the
forward (and the trainable variables it reads, for ``sources=``); on PyTorch the tensors are
torch tensors and the torch backend's autograd machinery and primitives are reused; on JAX
(no tape) the way in is :func:`embgrad.value_and_gradients`. This module holds what all Keras
flavours share; :func:`embgrad.backends.get_backend` picks the flavour by
``keras.backend.backend()``: :mod:`embgrad.backends.keras_tensorflow` (also tf-keras),
:mod:`embgrad.backends.keras_torch` or :mod:`embgrad.backends.keras_jax`, each with its
framework's primitives, never a copy.
"""
from __future__ import annotations

import functools
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import EmbgradError
from .base import Call, EmbeddingInfo, LowRank, ModelAdapter, Tap

__all__ = ["KerasBackend", "UnsupportedKerasBackend"]


def _keras3() -> Any:
    return sys.modules.get("keras") if "keras" in sys.modules else None


def _keras3_backend() -> str | None:
    k = _keras3()
    if k is None:
        return None
    try:
        return k.backend.backend()
    except AttributeError:  # a partially imported keras
        return None


def _keras_classes(name: str) -> tuple[type, ...]:
    """``keras.layers.<name>`` of Keras 3 and of tf-keras, for those already imported."""
    mods = [_keras3(), sys.modules.get("tf_keras")]
    return tuple(getattr(m.layers, name) for m in mods if m is not None and hasattr(m, "layers"))


def _layer_types() -> tuple[type, ...]:
    return _keras_classes("Layer")


def _embedding_types() -> tuple[Any, ...]:
    return _keras_classes("Embedding")


def _children(layer: Any) -> list[Any]:
    try:
        return list(layer._flatten_layers(include_self=False, recursive=False))
    except (AttributeError, TypeError):
        return list(getattr(layer, "_layers", []) or [])


def _own_variables(layer: Any) -> list[Any]:
    """Variables a layer created itself (not its sublayers')."""
    own: list[Any] = []
    for attr in ("_trainable_variables", "_non_trainable_variables",  # Keras 3
                 "_trainable_weights", "_non_trainable_weights"):      # tf-keras
        own.extend(getattr(layer, attr, None) or [])
    return own


def _var_name(v: Any) -> str:
    return str(getattr(v, "path", None) or getattr(v, "name", ""))


def _looks_like_tables(layer: Any) -> list[Any]:
    """A layer's own 2-D variables that look like embedding tables (not a Keras ``Embedding``):
    named like one (``embed`` in the variable's or the layer class's name), and not the layer's
    ``kernel`` (a Dense-like weight)."""
    if isinstance(layer, _embedding_types()) or not getattr(layer, "built", False):
        return []
    kernel = getattr(layer, "kernel", None) if "kernel" in getattr(layer, "__dict__", {}) else None
    by_class = "embed" in type(layer).__name__.lower()
    return [v for v in _own_variables(layer)
            if len(getattr(v, "shape", ())) == 2 and v is not kernel
            and (by_class or "embed" in _var_name(v).lower())]


def _table_variable(layer: Any) -> Any:
    if not getattr(layer, "built", False):
        return None
    if not isinstance(layer, _embedding_types()):
        tables = _looks_like_tables(layer)      # a layer that selects rows of its one table
        return tables[0] if len(tables) == 1 else None
    # Keras 3 keeps the variable in ``_embeddings`` (``embeddings`` adds LoRA); tf-keras in ``embeddings``
    var = getattr(layer, "_embeddings", None)
    return var if var is not None else getattr(layer, "embeddings", None)


class _Dispatch:
    """The one shadow of a layer's ``call`` shared by every capture of that layer.

    Installed (an instance attribute, bypassing Keras's attribute tracking) when the first
    capture of the layer enters and removed when the last one leaves, whatever the order of
    their exits: overlapping captures cannot leave the layer patched. Each capture adds a
    handler ``handler(inner, *args, **kwargs)``; a call runs the handlers in the order the
    captures entered, each wrapping the one before (the first wraps the layer's own method).
    """

    _MISSING = object()
    _lock = threading.Lock()

    def __init__(self, obj: Any, attr: str, wrap: Callable[[Callable], Callable]) -> None:
        self.obj, self.attr = obj, attr
        self.prev = obj.__dict__.get(attr, self._MISSING)
        self.inner = getattr(obj, attr)
        self.handlers: list[Callable] = []

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            fn = self.inner
            for h in list(self.handlers):
                fn = functools.partial(h, fn)
            return fn(*args, **kwargs)

        self.fn = wrap(dispatch)
        self.fn._embgrad_dispatch = self   # type: ignore[attr-defined]
        object.__setattr__(obj, attr, self.fn)

    @classmethod
    def add(cls, obj: Any, attr: str, handler: Callable, wrap: Callable[[Callable], Callable]) -> _Handler:
        with cls._lock:
            current = obj.__dict__.get(attr)
            d = getattr(current, "_embgrad_dispatch", None)
            if d is None or d.obj is not obj:
                d = cls(obj, attr, wrap)
            d.handlers.append(handler)
        return _Handler(d, handler)

    def discard(self, handler: Callable) -> None:
        with self._lock:
            if handler in self.handlers:
                self.handlers.remove(handler)
            if self.handlers:
                return
            d = self.obj.__dict__
            if d.get(self.attr, None) is self.fn:   # someone patched on top of us: leave theirs
                if self.prev is self._MISSING:
                    del d[self.attr]
                else:
                    object.__setattr__(self.obj, self.attr, self.prev)


class _Handler:
    """One capture's handler in a layer's :class:`_Dispatch`; ``remove()`` is idempotent."""

    def __init__(self, dispatch: _Dispatch, handler: Callable) -> None:
        self.dispatch: _Dispatch | None = dispatch
        self.handler = handler

    def remove(self) -> None:
        if self.dispatch is not None:
            self.dispatch.discard(self.handler)
            self.dispatch = None


class KerasBackend(ModelAdapter):
    """Keras models and layers, whatever Keras runs on: finding layers, the shadowing tap and
    the table operations. The adapters for one Keras backend subclass it
    (:mod:`embgrad.backends.keras_tensorflow`, :mod:`embgrad.backends.keras_torch`,
    :mod:`embgrad.backends.keras_jax`), filling in the hooks below and bringing that framework's
    tensor primitives and autograd."""

    name = "keras"
    framework_module = "keras"
    structured_inputs = True
    searched_types = "keras.layers.Embedding (and subclasses such as ReversibleEmbedding, tf-keras Embedding)"

    broadcast_seen = ("on TensorFlow it splits the output's gradient by the examples of the "
                      "model's output, which needs the model's forward and, in a traced "
                      "tf.function, is not done; a layer that slices its table and broadcasts it "
                      "to its input's (B, T, D) shape itself, as Keras-Hub's PositionEmbedding "
                      "does, is exact everywhere")

    def expand_hint(self, batch_size: Any) -> str:
        return f"keras.ops.broadcast_to(ids, ({batch_size}, T))"

    def is_appropriate(self, obj: Any) -> bool:
        if isinstance(obj, _layer_types()):
            return True
        k = _keras3()
        return k is not None and hasattr(k, "Variable") and isinstance(obj, k.Variable)

    # ------------------------------------------------------------------ finding layers
    def find_embeddings(self, model: Any) -> dict[str, EmbeddingInfo]:
        if not isinstance(model, _layer_types()):
            raise EmbgradError(f"expected a Keras model or layer, got {type(model).__name__}.")
        found: list[tuple[str, Any]] = []   # (path, layer), depth first, each layer once
        seen: set[int] = set()

        def walk(layer: Any, path: str) -> None:
            if id(layer) in seen:
                return
            seen.add(id(layer))
            if isinstance(layer, _embedding_types()) or len(_looks_like_tables(layer)) == 1:
                found.append((path, layer))
            for child in _children(layer):
                walk(child, f"{path}/{child.name}" if path else child.name)

        walk(model, "" if not isinstance(model, _embedding_types()) else model.name)
        owners: dict[int, list[Any]] = {}
        if found:
            for layer in [model] + _all_layers(model):
                for v in _own_variables(layer):
                    owners.setdefault(id(v), []).append(layer)
        counts: dict[str, int] = {}
        for _, layer in found:
            counts[layer.name] = counts.get(layer.name, 0) + 1
        infos: dict[str, EmbeddingInfo] = {}
        for path, layer in found:
            name = layer.name if counts[layer.name] == 1 else path
            infos[name] = self._info(name, path, layer, owners)
        return infos

    def uncaptured_tables(self, model: Any) -> list[str]:
        """Layers of ``model`` holding several 2-D variables that look like embedding tables
        (Hugging Face's TF ``*Embeddings`` layers: word, position and token-type tables read in
        one ``call``), which capture cannot tap: ``"layer (var, var, ...)"`` each."""
        out = []
        for layer in [model] + _all_layers(model):
            tables = _looks_like_tables(layer)
            if len(tables) > 1:
                out.append(f"{layer.name} ({', '.join(_var_name(v) for v in tables)})")
        return out

    def _info(self, name: str, path: str, layer: Any, owners: dict[int, list[Any]]) -> EmbeddingInfo:
        var = _table_variable(layer)
        if not isinstance(layer, _embedding_types()):
            # a layer that reads rows of its one table by slicing / broadcasting (Keras-Hub's
            # PositionEmbedding): the tap recovers which rows each output position holds
            shared = any(o is not layer for o in owners.get(id(var), []))
            return EmbeddingInfo(
                name=name, layer=layer, num_rows=int(var.shape[0]), dim=int(var.shape[1]),
                kind="embedding", by_ids=False, tied=shared, frozen=not (layer.trainable and var.trainable),
                weight=var, options={"path": path, "reversible": False, "quantization_mode": None,
                                     "sparse": False, "regularizer": None,
                                     "keras": "tf_keras" if type(layer).__module__.startswith("tf_keras")
                                     else "keras"})
        shared = var is not None and any(o is not layer for o in owners.get(id(var), []))
        reversible = hasattr(layer, "tie_weights")
        tied = bool(reversible and layer.tie_weights) or shared
        mask_zero = bool(getattr(layer, "mask_zero", False))
        low_rank = None
        if getattr(layer, "lora_enabled", False):
            low_rank = LowRank(scale=float(layer.lora_alpha) / float(layer.lora_rank), rank=int(layer.lora_rank))
        options = {
            "path": path,
            "reversible": reversible,
            "quantization_mode": getattr(layer, "quantization_mode", None),
            "keras": "tf_keras" if type(layer).__module__.startswith("tf_keras") else "keras",
            "sparse": bool(getattr(layer, "sparse", False)),           # tf-keras sparse outputs
            "regularizer": getattr(layer, "embeddings_regularizer", None),
        }
        # mask_zero: id 0 is padding that the layers after it skip; its row still gets gradient
        return EmbeddingInfo(
            name=name, layer=layer, num_rows=int(layer.input_dim), dim=int(layer.output_dim),
            kind="embedding", pad_id=0 if mask_zero else None, pad_masked=mask_zero,
            padding="mask_zero" if mask_zero else "", low_rank=low_rank, tied=tied,
            frozen=not layer.trainable, weight=var, options=options)

    def low_rank_factors(self, info: EmbeddingInfo) -> tuple[Any, Any]:
        from keras import ops
        return (ops.convert_to_tensor(info.layer.lora_embeddings_a),
                ops.convert_to_tensor(info.layer.lora_embeddings_b))

    def match_name(self, key: str, found: dict[str, EmbeddingInfo]) -> EmbeddingInfo | None:
        """A nested path (``"encoder/token_embedding"``, optionally led by the model's name)."""
        key = key.strip("/")
        hits = [i for i in found.values()
                if i.options.get("path") == key or i.options.get("path", "").endswith("/" + key)
                or key.endswith("/" + i.options.get("path", "\0"))]
        return hits[0] if len(hits) == 1 else None

    # ------------------------------------------------------------------ the tap
    def install_tap(self, model: Any, infos: Sequence[EmbeddingInfo],
                    on_call: Callable[[Call], Any], active: Callable[[], bool] | None = None) -> Tap:
        for info in infos:
            if info.options.get("sparse"):
                raise EmbgradError(
                    f"Keras layer {info.name!r} has sparse=True (its output is a tf.SparseTensor); "
                    "embgrad taps dense lookups. Use sparse=False (the table gradient stays sparse "
                    "either way).")
        tap = self._open_tap()
        hint = _float_inputs_hint(model)
        try:
            for info in infos:
                layer = info.layer
                attr = "quantized_call" if info.options.get("quantization_mode") else "call"
                handle = _Dispatch.add(layer, attr, self._shadow(tap, info, on_call, active, hint),
                                       self._wrap_dispatch)
                self._add_patch(tap, handle)
            if _autocasts_ids(model):
                # a Sequential whose first layer is an integer Input: Keras's Layer.__call__ casts
                # float arrays to that dtype before any method embgrad could shadow takes them, so
                # its first step (_check_super_called) reads the raw arguments from its caller
                handle = _Dispatch.add(model, "_check_super_called",
                                       self._sequential_check(model, active), self._wrap_dispatch)
                self._add_patch(tap, handle)
            for entry in _entries(model):
                # where the model turns the user's arrays into its Inputs' dtypes: check ids there,
                # before Keras truncates floats, wraps int64 or turns bools into rows 0/1
                handle = _Dispatch.add(entry, "_convert_inputs_to_tensors",
                                       self._entry_check(model, entry, active), self._wrap_dispatch)
                self._add_patch(tap, handle)
        except BaseException:
            tap.remove()
            raise
        return tap

    def install_forward_tap(self, model: Any, on_start: Callable[[Any], None],
                            on_end: Callable[..., None]) -> Tap | None:
        """Each call of ``model`` is one forward: its ``call`` is shadowed (one dispatcher per
        layer, shared with the lookup taps; the lookup's own handler runs inside it when the
        model is the embedding layer itself). ``on_start`` gets the shape of the first tensor of
        the inputs (a structured input's first leaf; dims unknown while tracing are None),
        ``on_end`` the model's output (for :meth:`split_broadcast`)."""
        def call(inner: Callable, *args: Any, **kwargs: Any) -> Any:
            on_start(_first_shape(args, kwargs))
            try:
                out = inner(*args, **kwargs)
            except BaseException:
                on_end()
                raise
            on_end(out)
            return out

        handle = _Dispatch.add(model, "call", call, self._wrap_dispatch)
        return _ForwardTap(handle)

    def _sequential_check(self, model: Any, active: Callable[[], bool] | None) -> Callable:
        spec = model._layers[0].output if hasattr(model._layers[0], "output") else None

        def check_super_called(inner: Callable, *args: Any, **kwargs: Any) -> Any:
            if spec is not None and (active is None or active()):
                caller: Any = sys._getframe(1)   # Layer.__call__ is a few frames up (dispatch,
                for _ in range(8):             # autograph's wrapper)
                    if caller is None or (caller.f_code.co_name == "__call__"
                                          and caller.f_locals.get("self") is model):
                        break
                    caller = caller.f_back
                raw = caller.f_locals.get("args") if caller is not None else None
                if isinstance(raw, tuple) and len(raw) == 1 and caller.f_locals.get("self") is model:
                    _check_entry(model, spec, raw[0])
            return inner(*args, **kwargs)
        return check_super_called

    def _entry_check(self, model: Any, entry: Any, active: Callable[[], bool] | None) -> Callable:
        def convert(inner: Callable, flat_inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if active is None or active():
                specs = list(getattr(entry, "_inputs", None) or [])
                if isinstance(flat_inputs, (list, tuple)) and len(specs) == len(flat_inputs):
                    for x, spec in zip(flat_inputs, specs, strict=True):
                        _check_entry(model, spec, x)
            return inner(flat_inputs, *args, **kwargs)
        return convert

    def _shadow(self, tap: Tap, info: EmbeddingInfo, on_call: Callable,
                active: Callable[[], bool] | None = None, hint: str = "") -> Callable:
        def call(inner: Callable, *args: Any, **kwargs: Any) -> Any:
            if active is not None and not active():
                return inner(*args, **kwargs)          # another thread's / context's forward
            if kwargs.get("reverse") or (len(args) > 1 and args[1] is True):
                out = inner(*args, **kwargs)           # the tied output projection: not a lookup
                if not getattr(info.layer, "tie_weights", False):
                    return out                         # its own reverse_embeddings: not this table
                return self._projection(tap, info, args[0] if args else kwargs.get("inputs"), out, on_call)
            if not info.by_ids:
                return self._selection(tap, info, on_call, inner, args, kwargs)
            ids = args[0] if args else kwargs.get("inputs")
            try:
                checked = self._check(info, ids)
            except EmbgradError as e:
                if hint and _dtype_of(ids).startswith(("float", "bfloat")):
                    raise EmbgradError(f"{e} {hint}") from None
                raise
            if checked is not None and checked is not ids:   # graph mode: ids gated on the check
                ids = checked
                if args:
                    args = (ids,) + tuple(args[1:])
                else:
                    kwargs = dict(kwargs, inputs=ids)
            return self._lookup(tap, info, on_call, ids, inner(*args, **kwargs))
        return call

    def _lookup(self, tap: Tap, info: EmbeddingInfo, on_call: Callable, ids: Any, out: Any,
                **meta: Any) -> Any:
        """Record one lookup (``ids`` -> ``out``) and return what the model gets: the output a
        capture replaced it with, a batch-free lookup's broadcastable output, or ``out``."""
        out, grad_enabled = self._record(tap, info, out)
        call_ = Call(info=info, ids=ids, output=out, grad_enabled=grad_enabled, meta=meta)
        self._on_grad(call_)
        replaced = on_call(call_)
        if replaced is not None:
            call_.meta["original_output"] = out
            call_.output, _ = self._record(tap, info, replaced)
            self._on_grad(call_)
            return call_.output
        return self._broadcast_output(call_, out)

    def _broadcast_output(self, call: Call, out: Any) -> Any:
        """The output the model gets for a lookup with batch-free ids (``call.batch_free``): on
        PyTorch a tensor that gives each broadcast against the batch a per-example view (see
        ``embgrad.backends.torch``); elsewhere the output itself."""
        return out

    def _wrap_dispatch(self, fn: Callable) -> Callable:
        """The dispatcher as installed (TensorFlow: kept out of autograph's conversion)."""
        return fn

    def _selection(self, tap: Tap, info: EmbeddingInfo, on_call: Callable, inner: Callable,
                   args: tuple, kwargs: dict) -> Any:
        """A call of a layer that reads rows of its table by slicing / broadcasting (no ids):
        recorded as a lookup of the rows its output holds, found by a forward-mode derivative of
        the call in the direction "row r -> r" (exact: the output is checked to be those rows).
        Its output is already batched (Keras-Hub broadcasts it to the input's (B, T, D)), so
        per-example gradients are each example's slice of it. A call that is not a pure row
        selection passes through unrecorded, with a warning naming the layer (its table's
        gradient is then not in the result)."""
        out, ids = self._selected_rows(info, inner, args, kwargs)
        if ids is False:
            warnings.warn(
                f"Keras layer {info.name!r} read its {info.num_rows}x{info.dim} table "
                f"{_var_name(info.weight)!r} other than by returning some of its rows unchanged (a "
                "slice / gather / broadcast), so embgrad cannot tell which rows its output holds: "
                "this call is not captured, and the table's gradient is not in the result. Capture "
                "the other layers by name (capture(model, layers=[...])) to silence this.", stacklevel=4)
            return out
        if ids is None:
            return out
        return self._lookup(tap, info, on_call, ids, out, selects=True)

    def _selected_rows(self, info: EmbeddingInfo, inner: Callable, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """Run the layer's call; return its output and the int64 ids (output shape without D) of
        the table rows it holds; None for ids when the output does not depend on the table, False
        when it is not a pure selection of rows."""
        raise EmbgradError(
            f"Keras layer {info.name!r} reads rows of its table without ids (a sliced / broadcast "
            "position table, as Keras-Hub's PositionEmbedding): embgrad taps such layers on Keras over "
            f"TensorFlow and PyTorch, not on the {_keras3_backend()!r} backend. Select the other layers "
            "by name (layers=[...]).")

    def _projection(self, tap: Tap, info: EmbeddingInfo, h: Any, out: Any, on_call: Callable) -> Any:
        """Records a ``ReversibleEmbedding(reverse=True)`` call (``logits = h @ table.T``, then
        an optional ``logit_soft_cap``) as the table's tied projection; the logit gradient is
        taken through the softcap: d(c·tanh(z/c))/dz = 1 - (out/c)²."""
        out, grad_enabled = self._record(tap, info, out)
        meta: dict[str, Any] = {"input": h, "node": getattr(out, "grad_fn", None),
                                "input_node": getattr(h, "grad_fn", None)}
        cap = getattr(info.layer, "logit_soft_cap", None)
        if cap is not None:
            capped = out

            def logit_grad(g: Any, capped: Any = capped, cap: float = float(cap)) -> Any:
                t = self.ops.cast(capped, "float32") / cap
                return self.ops.cast(g, "float32") * (1.0 - t * t)
            meta["logit_grad"] = logit_grad
        call = Call(info=info, ids=None, output=out, grad_enabled=grad_enabled, role="projection", meta=meta)
        self._on_grad(call)
        on_call(call)
        return out

    def table_weight(self, info: EmbeddingInfo) -> Any:
        return _table_variable(info.layer)

    # hooks the flavours fill in
    def _check(self, info: EmbeddingInfo, ids: Any) -> Any:
        """EmbgradError unless ``ids`` are integer ids in range (before Keras casts or wraps them).
        Returns the ids to look up (in a traced graph: the ids gated on the run-time check)."""
        raise NotImplementedError

    def _open_tap(self) -> Tap:
        raise NotImplementedError

    def _add_patch(self, tap: Tap, patch: _Handler) -> None:
        raise NotImplementedError

    def _record(self, tap: Tap, info: EmbeddingInfo, out: Any) -> tuple[Any, bool]:
        """Make ``out`` differentiable-against; returns (tensor to use, grad recording on)."""
        raise NotImplementedError

    def _on_grad(self, call: Call) -> None:
        """Arrange for ``call.grad`` to be set by the user's own backward (torch only)."""

    # ------------------------------------------------------------------ tables (embgrad.table)
    def table_variable(self, info):
        var = _table_variable(info.layer)
        if var is None:
            raise EmbgradError(f"Keras layer {info.name!r} is not built yet, so it has no table: call the "
                               "model on a batch (or model.build(input_shape)) first.")
        return var

    def table_dtype(self, info):
        dt = self.table_variable(info).dtype
        return dt if isinstance(dt, str) else dt.name

    def table_gather(self, info, rows, effective=False):
        with self.ops.no_grad():
            if effective and info.by_ids:
                # what the layer looks up: base + LoRA part, dequantized; bypasses taps
                quantized = getattr(info.layer, "quantization_mode", None)
                call = type(info.layer).quantized_call if quantized else type(info.layer).call
                return call(info.layer, rows)
            return self.ops.gather(self._var_tensor(self.table_variable(info)), rows)

    def table_read(self, info, rows, effective=False):
        like = self._var_tensor(self.table_variable(info))
        return self.ops.to_numpy(self.table_gather(info, self.ops.from_numpy(rows, like=like), effective))

    def table_quantized(self, info):
        mode = getattr(info.layer, "quantization_mode", None)
        return (f"it is quantized (quantization_mode={mode!r}, table dtype {self.table_dtype(info)}); "
                "write the float table before quantizing the model") if mode else None

    def table_freeze(self, info, rows, optimizer=None):
        """A variable constraint that puts the frozen rows back after every optimizer step, so
        also weight decay and a tied use of the table leave them as they are (``optimizer`` is
        not needed). A ``tf.function``-compiled train step reads the constraint when traced."""
        if info.low_rank is not None:
            raise EmbgradError(
                f"Keras layer {info.name!r} has LoRA enabled: every row of the table it looks up "
                "changes through the shared low-rank factor, so single rows cannot be frozen. Freeze "
                "rows before layer.enable_lora(), or merge the LoRA weights first.")
        var = self.table_variable(info)
        idx = self.ops.from_numpy(rows, like=self._var_tensor(var))
        saved = self.table_gather(info, idx)
        prev = var.constraint
        prev = getattr(prev, "_embgrad_own", prev)   # replacing an earlier guard: wrap the layer's own

        def constraint(w: Any) -> Any:
            return self._put_rows(prev(w) if prev is not None else w, idx, saved)

        constraint._embgrad_own = prev  # type: ignore[attr-defined]
        _set_constraint(var, constraint)
        return _ConstraintGuard(var, constraint, prev)

    def table_steps_changed(self, model: Any) -> None:
        """``fit``'s compiled step read the old constraints when traced: drop it, as
        ``model.compile()`` does, so that the next ``fit`` traces it again."""
        for m in [model] + _all_layers(model):
            if getattr(m, "train_function", None) is not None and hasattr(m, "make_train_function"):
                m.train_function = None

    def _var_tensor(self, var: Any) -> Any:
        """The framework tensor/variable behind a Keras variable (read without copying)."""
        raise NotImplementedError

    def _put_rows(self, w: Any, rows: Any, values: Any) -> Any:
        """A new tensor: ``w`` with ``values`` in rows ``rows``."""
        raise NotImplementedError


class _ForwardTap(Tap):
    """Removes the model's forward handler again (idempotent)."""

    def __init__(self, handle: _Handler) -> None:
        self.handle = handle

    def remove(self) -> None:
        self.handle.remove()


def _first_shape(args: tuple, kwargs: dict) -> tuple[Any, ...] | None:
    """The shape of the first array-like leaf of a model's inputs (None dims stay None)."""
    stack = list(args) + list(kwargs.values())
    while stack:
        x = stack.pop(0)
        if isinstance(x, dict):
            stack[:0] = list(x.values())
        elif isinstance(x, (list, tuple)):
            stack[:0] = list(x)
        elif hasattr(x, "shape") and hasattr(x, "dtype"):
            try:
                return tuple(None if d is None else int(d) for d in tuple(x.shape))
            except TypeError:
                return None
    return None


def _set_constraint(var: Any, fn: Any) -> None:
    try:
        var.constraint = fn
    except AttributeError:          # a tf.Variable (tf-keras): constraint is a read-only property
        var._constraint = fn


class _ConstraintGuard:
    """Removes a frozen-rows constraint again, restoring the variable's own constraint."""

    def __init__(self, var: Any, fn: Any, prev: Any) -> None:
        self.var, self.fn, self.prev = var, fn, prev

    def remove(self) -> None:
        if self.var is not None and self.var.constraint is self.fn:
            _set_constraint(self.var, self.prev)
        self.var = None


class UnsupportedKerasBackend(KerasBackend):
    """Keras 3 on a backend embgrad has no primitives for (OpenVINO, NumPy): recognises
    Keras objects (so they are not mistaken for another framework's) and says so."""

    def find_embeddings(self, model: Any) -> dict[str, EmbeddingInfo]:
        raise EmbgradError(
            f"Keras is running on the {_keras3_backend()!r} backend, which embgrad does not support; "
            "set KERAS_BACKEND=tensorflow or KERAS_BACKEND=torch before importing keras.")


def _dtype_of(x: Any) -> str:
    dt = getattr(x, "dtype", None)
    if dt is None:
        return ""
    name = str(getattr(dt, "name", dt))
    return name[6:] if name.startswith("torch.") else name


def _model_inputs(model: Any) -> list[Any]:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):   # a subclassed model has no symbolic inputs
        return []
    return list(inputs) if isinstance(inputs, (list, tuple)) else []


def _input_name(spec: Any) -> str:
    """The name of the Input layer behind a symbolic model input (else the tensor's name)."""
    layer = getattr(getattr(spec, "_keras_history", None), "operation", None)
    return str(getattr(layer, "name", None) or getattr(spec, "name", "?"))


def _float_inputs_hint(model: Any) -> str:
    """For a model whose Inputs are floating point: Keras converts integer ids to floats there,
    so a float-ids error should name that Input, not the user's ids."""
    floats = [_input_name(t) for t in _model_inputs(model)
              if _dtype_of(t).startswith(("float", "bfloat"))]
    if not floats:
        return ""
    names = ", ".join(repr(n) for n in floats)
    return (f"If you passed integer ids: the model's Input {names} has a floating-point dtype "
            "(keras.Input's default is float32), and Keras converted the ids to it before the "
            "Embedding. Build that Input with keras.Input(shape, dtype='int32').")


def _autocasts_ids(model: Any) -> bool:
    """A Keras 3 Sequential whose first layer is an Input of integer dtype (its ``__call__``
    casts float arrays to that dtype, truncating them, before ``call``)."""
    layers = getattr(model, "_layers", None)
    if type(model).__name__ != "Sequential" or not layers or type(layers[0]).__name__ != "InputLayer":
        return False
    return _dtype_of(layers[0].output if hasattr(layers[0], "output") else None).startswith(("int", "uint")) \
        and callable(getattr(type(model), "_check_super_called", None))


def _entries(model: Any) -> list[Any]:
    """The functional graphs through which ``model``'s own inputs enter (the model itself, or a
    Sequential's inner functional graph), whose ``_convert_inputs_to_tensors`` casts them."""
    out = []
    for m in (model, getattr(model, "_functional", None)):
        if m is not None and callable(getattr(type(m), "_convert_inputs_to_tensors", None)) \
                and getattr(m, "_inputs", None):
            out.append(m)
    return out


def _check_entry(model: Any, spec: Any, x: Any) -> None:
    """EmbgradError when the array ``x`` given for Input ``spec`` of integer dtype would be
    changed by Keras's conversion to that dtype: floats that are not whole (truncated), bools
    (looked up as rows 0/1), integers outside the dtype's range (wrapped). Values are checked
    eagerly; while tracing a tf.function, only the dtype."""
    want = _dtype_of(spec)
    if x is None or not want.startswith(("int", "uint")):
        return
    name = _input_name(spec)
    model_name = getattr(model, "name", type(model).__name__)
    where = f"Keras model {model_name!r}, Input {name!r} (dtype {want})"
    have = _dtype_of(x) if hasattr(x, "dtype") else ""
    if type(x).__name__ == "SparseTensor":
        raise EmbgradError(
            f"{where}: ids are a tf.SparseTensor; embgrad taps dense lookups. Densify them with "
            "tf.sparse.to_dense(ids, default_value=PAD) and mask PAD (mask_zero=True with PAD=0).")
    if have == "bool":
        raise EmbgradError(
            f"{where}: got bool values; Keras would look them up as rows 0 and 1. Pass integer ids "
            "(or cast explicitly, e.g. ids.astype('int32'), if rows 0/1 are meant).")
    try:
        a = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
    except Exception:   # noqa: BLE001 - a symbolic tensor (tf.function being traced): dtype only
        if have.startswith(("float", "bfloat")):
            raise EmbgradError(
                f"{where}: got {have} ids inside a tf.function; Keras would truncate them to "
                f"{want} without a check. Cast them to {want} yourself (after checking they are "
                "whole numbers), or give the tf.function an integer input_signature.") from None
        return
    if a.dtype == np.bool_:
        raise EmbgradError(
            f"{where}: got bool values; Keras would look them up as rows 0 and 1. Pass integer ids "
            "(or cast explicitly, e.g. ids.astype('int32'), if rows 0/1 are meant).")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (np.floor(a) != a)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise EmbgradError(
                f"{where}: id {a[pos].item()!r} at position {pos} is not a whole number; Keras would "
                f"truncate it to {want} silently (and look up another row). Pass integer ids.")
    if a.dtype.kind in "iuf" and a.size:
        info = np.iinfo(np.dtype(want))
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            bad_value = lo if lo < info.min else hi
            pos = tuple(int(i) for i in np.argwhere(a == bad_value)[0])
            raise EmbgradError(
                f"{where}: id {bad_value.item()!r} at position {pos} does not fit in {want}; Keras would "
                f"wrap it around (2**32 + 3 becomes 3) and look up another row silently. Check the "
                "ids (no embedding has that many rows).")


def _all_layers(model: Any) -> list[Any]:
    try:
        return list(model._flatten_layers(include_self=False, recursive=True))
    except (AttributeError, TypeError):
        return []
