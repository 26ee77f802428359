"""``embgrad.capture``: record every embedding lookup of an unchanged forward pass, and from one
backward pass return per-layer :class:`LayerGradients` (ids, output gradients, the coalesced
sparse weight gradient and per-example gradients).

Framework-neutral orchestration: the backend finds layers, taps them and differentiates; this
module selects layers, keeps the record and builds the results with :mod:`embgrad.sparse`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence

from .backends import Backend, Call, EmbeddingInfo, Tap, get_backend
from .errors import EmbgradError, closest_names
from .sparse import ExampleGrads, RowGrad, coalesce_lookups

__all__ = ["capture", "Capture", "Gradients", "LayerGradients", "select_layers", "input_embedding"]

_REDUCTIONS = ("sum", "mean")


def select_layers(backend: Backend, model: Any, layers: Any) -> list[EmbeddingInfo]:
    """The embedding layers of ``model`` named or given by ``layers`` (None = all)."""
    found = backend.find_embeddings(model)
    if not found:
        raise EmbgradError(
            f"{type(model).__name__} has no embedding layer: embgrad searched it for "
            f"{getattr(backend, 'searched_types', 'embedding layers')}. Pass the model that owns the "
            "embedding (or the embedding layer itself).")
    if layers is None:
        return list(found.values())
    keys = [layers] if isinstance(layers, str) or not isinstance(layers, (list, tuple, set)) else list(layers)
    if not keys:
        raise EmbgradError("layers=[] selects nothing; pass None for every embedding layer.")
    chosen: list[EmbeddingInfo] = []
    for key in keys:
        info = None
        if isinstance(key, str):
            info = found.get(key)
            if info is None and hasattr(backend, "match_name"):
                info = backend.match_name(key, found)
            if info is None:
                raise EmbgradError(
                    f"no embedding layer named {key!r} in {type(model).__name__}; closest names: "
                    f"{closest_names(key, found)}. All embedding layers: {', '.join(found)}.")
        else:
            info = next((i for i in found.values() if i.layer is key), None)
            if info is None:
                raise EmbgradError(
                    f"layer object {type(key).__name__} is not an embedding layer of "
                    f"{type(model).__name__}; its embedding layers are: {', '.join(found)}.")
        if info not in chosen:
            chosen.append(info)
    return chosen


def input_embedding(model: Any, found: Sequence[EmbeddingInfo]) -> EmbeddingInfo | None:
    """Of the embedding layers ``found`` in ``model``, the one its ``get_input_embeddings()``
    returns (Hugging Face's name for the token embedding), else the only one, else None."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError, TypeError):
            emb = None
        info = next((i for i in found if i.layer is emb), None)
        if info is not None:
            return info
    return found[0] if len(found) == 1 else None


class LayerGradients:
    """Gradients of one embedding layer from one backward pass.

    ``ids`` (B, T) and ``output_grad`` (B, T, D) cover the layer's first call; ``calls`` lists
    ``(ids, output_grad)`` for every call; ``weight_grad`` (a :class:`RowGrad`) covers all calls.
    For ``EmbeddingBag`` layers ``ids`` is (bags, longest bag), padded with -1, and
    ``output_grad`` is the gradient of each looked-up vector (the bag reduction applied).
    """

    __slots__ = ("name", "num_rows", "dim", "tied", "frozen", "info", "calls", "_valid",
                 "_backend", "_loss_reduction", "_coupling", "_weight_grad", "_per_example")

    def __init__(self, info: EmbeddingInfo, calls: list[tuple[Any, Any]], valid: list[Any],
                 backend: Backend, loss_reduction: str, coupling: Sequence[str] = ()):
        self.name = info.name
        self.num_rows = info.num_rows
        self.dim = info.dim
        self.tied = info.tied
        self.frozen = info.frozen
        self.info = info
        self.calls = calls
        self._valid = valid
        self._backend = backend
        self._loss_reduction = loss_reduction
        self._coupling = tuple(coupling)
        self._weight_grad: RowGrad | None = None
        self._per_example: ExampleGrads | None = None

    @property
    def ids(self) -> Any:
        return self.calls[0][0]

    @property
    def output_grad(self) -> Any:
        return self.calls[0][1]

    def _flat(self) -> tuple[Any, Any, Any, Any]:
        """All calls' lookups as flat (example index, row, grad) with ignored entries removed, and
        the batch size B (an int; -1 when calls disagree; a scalar tensor while tracing)."""
        b, info = self._backend, self.info
        exs, rows, grads = [], [], []
        batch = None
        for (ids, og), valid in zip(self.calls, self._valid, strict=True):
            shape = b.shape(ids)
            B = shape[0]
            T = math.prod(shape[1:])  # lookups per example (ids may have more than 2 dims)
            batch = B if batch is None else batch
            flat_ids = b.cast(b.reshape(ids, (-1,)), "int64")
            g = b.reshape(og, (-1, self.dim))
            if b.dtype_name(g) not in ("float32", "float64"):
                g = b.cast(g, "float32")
            ex = b.floordiv(b.arange(B * T, flat_ids), T)
            keep = None
            if valid is not None:
                keep = b.reshape(valid, (-1,))
            if info.padding_idx is not None:
                not_pad = flat_ids != info.padding_idx
                keep = not_pad if keep is None else (keep & not_pad)
            if keep is not None:
                flat_ids, g, ex = b.boolean_mask(flat_ids, keep), b.boolean_mask(g, keep), b.boolean_mask(ex, keep)
            if info.options.get("scale_grad_by_freq"):
                # PyTorch divides each row's gradient by how often the row occurs in the call
                uniq, inv = b.unique(flat_ids)
                ones = b.zeros((b.shape(flat_ids)[0],), b.dtype_name(g), g) + 1.0
                counts = b.segment_sum(ones, inv, b.shape(uniq)[0])
                g = g / b.reshape(b.gather(counts, inv), (-1, 1))
            exs.append(ex)
            rows.append(flat_ids)
            grads.append(g)
        if len(self.calls) > 1:
            # calls with different batch sizes: no per-example meaning (sizes only known while
            # tracing a tf.function are not compared)
            sizes = {s for s in (b.shape(ids)[0] for ids, _ in self.calls) if isinstance(s, int)}
            if len(sizes) > 1:
                batch = -1
        cat = (lambda xs: xs[0]) if len(exs) == 1 else b.concat
        return cat(exs), cat(rows), cat(grads), batch

    @property
    def weight_grad(self) -> RowGrad:
        """The gradient of the table from its lookups, coalesced (unique sorted rows)."""
        if self._weight_grad is None:
            if self._per_example is not None and self._loss_reduction == "sum":
                self._weight_grad = self._per_example.sum()
            else:
                with self._backend.no_grad():
                    ex, rows, grads, B = self._flat()
                    self._weight_grad = coalesce_lookups(self._backend, ex, rows, grads, self.num_rows,
                                                         B if not isinstance(B, int) else max(B, 1),
                                                         per_example=False)
        return self._weight_grad

    def per_example(self) -> ExampleGrads:
        """Per-example sparse gradients: example b holds only the rows it looked up.

        With ``loss_reduction="mean"`` the captured gradient is scaled by B so that each
        example's gradient is that of its own loss term; ``sum()`` then equals B · weight_grad.
        """
        if self._per_example is None:
            if self._coupling:
                warnings.warn(
                    f"layer {self.name!r}: the model has layers that couple the examples of a batch "
                    f"({', '.join(self._coupling)}: BatchNorm in training mode), so per-example "
                    "gradients are not defined; the values returned are each example's share of the "
                    "batch gradient. Put those layers in eval() mode for true per-example gradients.",
                    stacklevel=2)
            b = self._backend
            with b.no_grad():
                ex, rows, grads, B = self._flat()
                if isinstance(B, int) and B < 0:
                    raise EmbgradError(
                        f"layer {self.name!r} was called {len(self.calls)} times with different batch "
                        f"sizes {[b.shape(i)[0] for i, _ in self.calls]}; per-example gradients need "
                        "every call to look up the same examples (one row of ids per example).")
                if not isinstance(B, int) and len(self.calls) > 1:   # sizes known only when it runs
                    for ids, _ in self.calls[1:]:         # 0 <= B_i - B < 1: the same batch size
                        b.assert_in_range(
                            b.reshape(b.shape(ids)[0] - B, (1,)), 1,
                            f"embgrad: layer {self.name!r} was called {len(self.calls)} times with "
                            "different batch sizes; per-example gradients need every call to look up "
                            "the same examples (one row of ids per example).")
                if self._loss_reduction == "mean":
                    grads = grads * (float(B) if isinstance(B, int) else b.cast(B, b.dtype_name(grads)))
                self._per_example = coalesce_lookups(b, ex, rows, grads, self.num_rows, B, per_example=True)
        return self._per_example

    def __repr__(self) -> str:
        shape = self._backend.shape(self.ids)
        flags = "".join(f", {f}=True" for f in ("tied", "frozen") if getattr(self, f))
        calls = f", calls={len(self.calls)}" if len(self.calls) > 1 else ""
        return (f"LayerGradients({self.name!r}, num_rows={self.num_rows}, dim={self.dim}, "
                f"ids={shape}{calls}{flags})")


class Gradients(Mapping):
    """Read-only mapping ``layer name -> LayerGradients``; ``.sources`` holds the gradients of
    extra variables asked for with ``sources=`` (TensorFlow), else None."""

    def __init__(self, layers: dict[str, LayerGradients], sources: list[Any] | None = None):
        self._layers = dict(layers)
        self.sources = sources

    def __getitem__(self, name: str) -> LayerGradients:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"no captured layer {name!r}; captured: {', '.join(self._layers)} "
                           f"(closest: {closest_names(name, self._layers)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def only(self) -> LayerGradients:
        """The single captured layer's gradients (EmbgradError if there are several)."""
        if len(self._layers) != 1:
            raise EmbgradError(
                f"only() needs exactly one captured layer, but {len(self._layers)} were captured: "
                f"{', '.join(self._layers)}. Index by name, or capture(model, layers=NAME).")
        return next(iter(self._layers.values()))

    def __repr__(self) -> str:
        inner = ", ".join(repr(v) for v in self._layers.values())
        return f"Gradients([{inner}])"


class Capture:
    """Context manager returned by :func:`capture`. Use ``gradients()`` after the forward."""

    def __init__(self, model: Any, layers: Any = None):
        self.model = model
        self._backend = get_backend(model)
        self.layers: list[EmbeddingInfo] = select_layers(self._backend, model, layers)
        self.calls: list[Call] = []
        self._tap: Tap | None = None
        self._coupling: list[str] = []
        self._replace: Callable[[Call], Any] | None = None
        self._used = False

    def __enter__(self) -> "Capture":
        if self._tap is not None:
            raise EmbgradError("this capture is already active; capture contexts do not nest with themselves.")
        self.calls = []
        self._coupling = self._backend.coupling_layers(self.model)
        self._tap = self._backend.install_tap(self.model, self.layers, self._on_call)
        self._used = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._tap is not None:
            self._tap.remove()
            # keep the tap object for differentiation after the block (TensorFlow's tape)
            self._tap_done = self._tap
            self._tap = None

    def _on_call(self, call: Call) -> Any:
        self.calls.append(call)
        if self._replace is not None:
            return self._replace(call)
        return None

    def gradients(self, loss: Any = None, loss_reduction: str = "sum", *,
                  sources: Sequence[Any] | None = None, retain_graph: bool = False,
                  loss_scale: Any = None) -> Gradients:
        """Gradients of ``loss`` for every captured layer (one backward pass, no ``.grad`` written).

        With ``loss=None`` (PyTorch), returns what the user's own ``loss.backward()`` produced.
        ``loss_reduction``: "sum" or "mean", how the loss combines the examples (only
        ``per_example()`` depends on it). ``sources``: extra variables whose gradients come
        back in ``.sources`` (same order). ``retain_graph``: keep the graph for another backward.
        ``loss_scale``: the factor a mixed-precision loss was multiplied by (e.g. a Keras
        ``LossScaleOptimizer``'s ``dynamic_scale``, or ``torch.amp.GradScaler.get_scale()``):
        embgrad's results are divided by it in float32; ``sources`` stay scaled, as the
        loss-scale optimizer's own ``apply`` expects them.
        """
        if loss_reduction not in _REDUCTIONS:
            raise EmbgradError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}.")
        if not self._used:
            raise EmbgradError("gradients() called before any forward pass: run the model inside "
                               "`with embgrad.capture(model) as cap:` first.")
        names = ", ".join(i.name for i in self.layers)
        if not self.calls:
            raise EmbgradError(
                f"no lookup of the captured layers ({names}) was recorded: run the forward pass inside "
                "the `with embgrad.capture(...)` block (calls after the block are not recorded), and "
                "check that the model actually uses these layers for its inputs.")
        if not all(c.grad_enabled for c in self.calls):
            hint = getattr(self._backend, "no_grad_hint", "torch.no_grad() / inference mode")
            raise EmbgradError(
                f"the forward pass ran with gradients disabled ({hint}), so "
                f"layers {names} produced no graph to differentiate. Run the forward inside capture "
                "with gradient recording on.")
        tap = self._tap or getattr(self, "_tap_done", None)
        assert tap is not None   # self._used: __enter__ installed one
        src = None
        if loss is not None:
            loss = self._backend.scalar_loss(loss)
            grads, src = tap.grad(loss, self.calls, sources, retain_graph)
        else:
            if sources is not None:
                raise EmbgradError("sources= needs the loss: cap.gradients(loss, sources=[...]).")
            missing = [c.info.name for c in self.calls if c.grad is None]
            if missing:
                raise EmbgradError(
                    f"no backward pass has reached layers {sorted(set(missing))}: pass the loss, "
                    "cap.gradients(loss), or call loss.backward() before cap.gradients().")
            grads = [c.grad for c in self.calls]
        b = self._backend
        inv_scale = None if loss_scale is None else 1.0 / _positive_scale(b, loss_scale)
        by_layer: dict[str, tuple[list, list]] = {i.name: ([], []) for i in self.layers}
        for call, g in zip(self.calls, grads, strict=True):
            bad = b.count_nonfinite(g)
            if bad:
                raise EmbgradError(
                    f"layer {call.info.name!r}: the gradient of its output holds {bad} NaN/Inf values "
                    f"(of {int(__import__('math').prod(b.shape(g)))}). " + (
                        "The scaled loss overflowed: skip this step, as the loss-scale optimizer "
                        "does (it lowers its scale for the next one)." if inv_scale is not None else
                        "The loss or the model diverged (check the learning rate, or an unscaled "
                        "float16 loss)."))
            if inv_scale is not None:
                g = b.cast(g, "float64" if b.dtype_name(g) == "float64" else "float32") * inv_scale
            call.grad = g
            tg = call.token_grad(g) if call.token_grad is not None else g
            by_layer[call.info.name][0].append((call.ids, tg))
            by_layer[call.info.name][1].append(call.valid)
        result = {}
        for info in self.layers:
            calls, valid = by_layer[info.name]
            if calls:
                result[info.name] = LayerGradients(info, calls, valid, b, loss_reduction, self._coupling)
        return Gradients(result, src)

    def __repr__(self) -> str:
        state = "active" if self._tap is not None else ("done" if self._used else "not entered")
        return (f"Capture({type(self.model).__name__}, layers=[{', '.join(i.name for i in self.layers)}], "
                f"calls={len(self.calls)}, {state})")


def _positive_scale(b: Backend, scale: Any) -> float:
    """``loss_scale`` (a number, scalar tensor or variable) as a positive finite float."""
    s = float(scale) if isinstance(scale, (int, float)) else float(b.to_numpy(scale))
    if not (s > 0 and s != float("inf")):
        raise EmbgradError(f"loss_scale must be a positive finite number (the factor the loss was "
                           f"multiplied by), got {s!r}.")
    return s


def capture(model: Any, layers: Any = None) -> Capture:
    """Record every lookup of ``model``'s embedding layers inside a ``with`` block.

    ``layers``: None (every embedding layer), a name, a list of names, or layer objects.
    The model is never modified: hooks/patches are removed on exit, also on error.
    """
    return Capture(model, layers)
