"""``embgrad.capture``: record every embedding lookup of an unchanged forward pass, and from one
backward pass return per-layer :class:`LayerGradients` (ids, output gradients, the coalesced
sparse weight gradient and per-example gradients).

Framework-neutral orchestration: the backend finds layers, taps them and differentiates; this
module selects layers, keeps the record and builds the results with :mod:`embgrad.sparse`.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .backends import Backend, Call, EmbeddingInfo, Tap, get_backend
from .errors import EmbgradError, closest_names
from .sparse import ExampleGrads, RowGrad, coalesce_lookups

__all__ = ["capture", "Capture", "Gradients", "LayerGradients", "select_layers", "input_embedding"]

_REDUCTIONS = ("sum", "mean")

# The captures active in the current thread / contextvars context. A tap asks its capture
# whether a call belongs to it (Capture._active_here): a forward of the same model in another
# thread (whose context does not hold the capture) passes through unrecorded and unchecked.
_ACTIVE: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("embgrad_captures", default=())


def select_layers(backend: Backend, model: Any, layers: Any,
                  given: dict[str, str] | None = None) -> list[EmbeddingInfo]:
    """The embedding layers of ``model`` named or given by ``layers`` (None = all).

    ``given``: filled with ``{layer name: the name the user gave}`` for layers found by another
    name than their own (a Keras path, a Gluon child path such as ``"emb"``).

    Raises:
        EmbgradError: the model has no embedding layer, ``layers=[]``, a name that is no
            embedding layer of the model (the message lists the closest names and all of them),
            or a layer object that is not one of its embedding layers.
    """
    found = backend.find_embeddings(model)
    if not found:
        raise EmbgradError(
            f"{type(model).__name__} has no embedding layer: embgrad searched it for "
            f"{backend.searched_types}. Pass the model that owns the "
            "embedding (or the embedding layer itself)." + _uncaptured_text(backend, model))
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
            if info is None:
                info = backend.match_name(key, found)
                if info is not None and given is not None:
                    given.setdefault(info.name, key)
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


def _uncaptured_text(backend: Backend, model: Any) -> str:
    """Names of the variables that look like embedding tables but that capture cannot tap."""
    tables = backend.uncaptured_tables(model)
    if not tables:
        return ""
    return (f" Layers holding several tables read in one call ({'; '.join(tables)}) are not captured: "
            "embgrad cannot tell which rows of which table each output holds. Give each table its "
            "own keras.layers.Embedding (ids) or a layer that slices one table (positions).")


def input_embedding(model: Any, found: Sequence[EmbeddingInfo]) -> EmbeddingInfo | None:
    """Of the embedding layers ``found`` in ``model``, the one its ``get_input_embeddings()``
    returns (Hugging Face's name for the token embedding), else the only one, else None.
    Raises nothing: a ``get_input_embeddings`` that fails counts as absent."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError, TypeError):
            emb = None
        info = next((i for i in found if i.layer is emb), None)
        if info is not None:
            return info
    if len(found) == 1:
        return found[0]
    by_ids = [i for i in found if i.by_ids]   # not a sliced position table
    return by_ids[0] if len(by_ids) == 1 else None


_PARTS = ("table", "lookup")


class _Examples:
    """Which examples each recorded call looked up, for per-example gradients.

    Built by :meth:`Capture.gradients` from the calls, their gradients and the forwards the
    backend reported: per call a batch-first layout ``(ids (B_f, ...), grads (B_f, ..., D),
    valid or None, offset)`` whose example b is example ``offset + b`` of the capture, or the
    reason it has none (``problems``); ``batch_size`` is the capture's number of examples.
    """

    __slots__ = ("layouts", "problems", "batch_size", "warning")

    def __init__(self, layouts: list[Any], problems: list[str | None], batch_size: Any,
                 warning: str | None = None):
        self.layouts = layouts
        self.problems = problems
        self.batch_size = batch_size
        self.warning = warning


class LayerGradients:
    """Gradients of one embedding layer from one backward pass.

    ``ids`` (B, T) and ``output_grad`` (B, T, D) cover the layer's first call; ``calls`` lists
    ``(ids, output_grad)`` for every call; ``weight_grad`` (a :class:`RowGrad`) covers all calls.
    For ``EmbeddingBag`` layers ``ids`` is (bags, longest bag), padded with -1, and
    ``output_grad`` is the gradient of each looked-up vector (the bag reduction applied).
    ``ids`` and ``output_grad`` are as the layer saw them (e.g. (1, T) for position ids
    broadcast over the batch; (T, B) with ``batch_dim=1``); ``per_example()`` resolves them.

    Tied tables (``tied`` is True: the table is also used outside this layer's lookups, e.g. by
    a language-model head that shares it): ``weight_grad`` and ``per_example()`` describe the
    WHOLE table's gradient (lookups + projection + cross term, see :mod:`embgrad.tied`);
    ``lookup_grad`` and ``per_example(part="lookup")`` the lookup part alone. ``projections``
    lists ``(inputs (B, S, D), logit_grads (B, S, V))`` of each recorded call of the tied
    projection. A use of the table embgrad cannot see through (``h @ emb.weight.T`` written by
    hand) makes the whole-table per-example gradient an :class:`EmbgradError` naming the fix.
    """

    __slots__ = ("name", "num_rows", "dim", "tied", "frozen", "info", "calls", "_valid",
                 "_backend", "_loss_reduction", "_coupling", "_weight_grad", "_per_example",
                 "_examples", "_index", "projections", "_proj_forwards", "_unknown_use", "_total",
                 "_shared", "_lookup_grad", "_table_pe", "_checked")

    def __init__(self, info: EmbeddingInfo, calls: list[tuple[Any, Any]], valid: list[Any],
                 backend: Backend, loss_reduction: str, coupling: Sequence[str] = (),
                 examples: _Examples | None = None, index: Sequence[int] = (), *,
                 projections: Sequence[tuple[Any, Any, int]] = (), unknown_use: str | None = None,
                 total: Any = None, checked: bool = True):
        self.name = info.name
        self.num_rows = info.num_rows
        self.dim = info.dim
        self.projections = [(h, a) for h, a, _ in projections]
        self._proj_forwards = [f for _, _, f in projections]
        self._unknown_use = unknown_use
        self._total = total            # the dense total gradient of the table, when a use is unknown
        self._shared: tuple[LayerGradients, ...] = ()   # other captured layers looking up the same table
        self.tied = bool(info.tied or self.projections or unknown_use)
        self.frozen = info.frozen
        self.info = info
        self.calls = calls
        self._valid = valid
        self._backend = backend
        self._loss_reduction = loss_reduction
        self._coupling = tuple(coupling)
        self._weight_grad: RowGrad | None = None
        self._per_example: ExampleGrads | None = None
        self._examples = examples
        self._index = list(index) if index else list(range(len(calls)))
        self._lookup_grad: RowGrad | None = None
        self._table_pe: Any = None
        # whether embgrad could see every use of the table (autograd graph, or a fingerprint of
        # the table's total gradient); a tied table whose other uses are unseen is not guessed at
        self._checked = checked

    @property
    def ids(self) -> Any:
        return self.calls[0][0]

    @property
    def output_grad(self) -> Any:
        return self.calls[0][1]

    def _flat_weight(self) -> tuple[Any, Any]:
        """All calls' lookups as flat (row, grad) with ignored entries removed, for the whole
        table's gradient (``freq_scaled`` tables, PyTorch's ``scale_grad_by_freq``: counts over
        the whole call, as PyTorch defines it)."""
        b, info = self._backend, self.info
        rows, grads = [], []
        for (ids, og), valid in zip(self.calls, self._valid, strict=True):
            flat_ids = b.ops.cast(b.ops.reshape(ids, (-1,)), "int64")
            g = b.ops.reshape(og, (-1, self.dim))
            flat_ids, g, _ = self._clean(flat_ids, g, None, valid)
            if info.freq_scaled:
                # PyTorch divides each row's gradient by how often the row occurs in the call
                g = g / b.ops.reshape(_counts(b, flat_ids, g), (-1, 1))
            rows.append(flat_ids)
            grads.append(g)
        cat = (lambda xs: xs[0]) if len(rows) == 1 else b.ops.concat
        return cat(rows), cat(grads)

    def _clean(self, flat_ids: Any, g: Any, ex: Any, valid: Any) -> tuple[Any, Any, Any]:
        """Drop ignored entries (invalid bag slots, the padding row); float32 or wider grads."""
        b, info = self._backend, self.info
        if b.ops.dtype_name(g) not in ("float32", "float64"):
            g = b.ops.cast(g, "float32")
        keep = None
        if valid is not None:
            keep = b.ops.reshape(valid, (-1,))
        if info.pad_id is not None and not info.pad_receives_grad:
            not_pad = flat_ids != info.pad_id
            keep = not_pad if keep is None else (keep & not_pad)
        if keep is not None:
            flat_ids, g = b.ops.boolean_mask(flat_ids, keep), b.ops.boolean_mask(g, keep)
            ex = b.ops.boolean_mask(ex, keep) if ex is not None else None
        return flat_ids, g, ex

    def _flat_examples(self) -> tuple[Any, Any, Any, Any]:
        """All calls' lookups as flat (example index, row, grad), examples numbered across the
        capture's forwards, with ignored entries removed; and the capture's batch size."""
        b, info, exm = self._backend, self.info, self._examples
        assert exm is not None
        exs, rows, grads = [], [], []
        for k in self._index:
            problem = exm.problems[k]
            if problem is not None:
                raise EmbgradError(f"layer {self.name!r}: {problem}")
            ids, og, valid, offset = exm.layouts[k]
            shape = b.ops.shape(ids)
            B = shape[0]
            T = math.prod(shape[1:])  # lookups per example (ids may have more than 2 dims)
            flat_ids = b.ops.cast(b.ops.reshape(ids, (-1,)), "int64")
            g = b.ops.reshape(og, (-1, self.dim))
            ex = (b.ops.arange(0, flat_ids) if isinstance(T, int) and T == 0
                  else b.ops.floordiv(b.ops.arange(B * T, flat_ids), T))
            if not (isinstance(offset, int) and offset == 0):
                ex = ex + offset
            flat_ids, g, ex = self._clean(flat_ids, g, ex, valid)
            if info.freq_scaled:
                # per example: each example's own counts (its gradient depends on it alone)
                g = g / b.ops.reshape(_counts(b, ex * self.num_rows + flat_ids, g), (-1, 1))
            exs.append(ex)
            rows.append(flat_ids)
            grads.append(g)
        cat = (lambda xs: xs[0]) if len(exs) == 1 else b.ops.concat
        return cat(exs), cat(rows), cat(grads), exm.batch_size

    @property
    def lookup_grad(self) -> RowGrad:
        """The gradient of the table from this layer's lookups alone, coalesced (unique sorted
        rows); equal to ``weight_grad`` unless the table is tied."""
        if self._lookup_grad is None:
            if self._per_example is not None and self._loss_reduction == "sum" \
                    and not self.info.freq_scaled:
                self._lookup_grad = self._per_example.sum()
            else:
                with self._backend.ops.no_grad():
                    rows, grads = self._flat_weight()
                    rg = coalesce_lookups(self._backend, rows, rows, grads, self.num_rows, 1, per_example=False)
                    assert isinstance(rg, RowGrad)
                    self._lookup_grad = rg
        return self._lookup_grad

    @property
    def weight_grad(self) -> RowGrad:
        """The gradient of the whole table (for a tied table: lookups of every captured layer
        that shares it, plus the tied projection's part, dense over all V rows); the lookup
        part alone is ``lookup_grad``.

        Raises:
            EmbgradError: the table is also read where embgrad cannot see (e.g. ``h @ emb.weight.T``
                written by hand) and its total gradient is unknown; the message names the fix.
        """
        if self._weight_grad is None:
            if not self.tied or not (self.projections or self._unknown_use or self._shared):
                self._weight_grad = self.lookup_grad
            elif self._unknown_use is not None:
                if self._total is None:
                    raise EmbgradError(self._unknown_message("weight_grad", "lookup_grad"))
                from .sparse import row_grad
                total, factor = self._total if isinstance(self._total, tuple) else (self._total, None)
                rg = row_grad(total, self.num_rows)
                self._weight_grad = rg if factor is None else rg.scale(factor)
            else:
                from .tied import projection_grad
                b = self._backend
                with b.ops.no_grad():
                    total = self.lookup_grad
                    for other in self._shared:
                        total = total + other.lookup_grad
                    if self.projections:
                        acc = "float64" if b.ops.dtype_name(total.values) == "float64" else "float32"
                        dense = projection_grad(b, self.projections, acc)
                        if len(total):
                            dense = dense + b.ops.scatter_rows(total.rows, b.ops.cast(total.values, acc), self.num_rows)
                        total = RowGrad(b.ops.arange(self.num_rows, dense), dense, self.num_rows, b)
                self._weight_grad = total
        return self._weight_grad

    def _unknown_message(self, what: str, alternative: str) -> str:
        return (f"layer {self.name!r}: its table is also used outside its lookups and the projections "
                f"embgrad recognises ({self._unknown_use}; e.g. `h @ emb.weight.T` written by hand, or "
                f"another module reading the weight), so the whole table's {what} "
                "cannot be formed exactly. Fix: route the product through an nn.Linear that shares the "
                "table (`head = nn.Linear(D, V, bias=False); head.weight = emb.weight; logits = "
                "head(h)`), capture every embedding module that shares it, and pass the whole model to "
                f"capture(); or ask for the lookup part explicitly: {alternative}.")

    def _table_part(self) -> Any:
        """The whole-table per-example gradients (a TableExampleGrads, or the lookups' own
        ExampleGrads when nothing else reads the table)."""
        from .tied import TableExampleGrads

        b = self._backend
        lookups = [self] + list(self._shared)
        if len(lookups) == 1:
            lk = self._lookup_examples()
        else:
            parts = [lg._lookup_flat() for lg in lookups]   # examples numbered capture-wide
            ex = b.ops.concat([p[0] for p in parts])
            rows = b.ops.concat([p[1] for p in parts])
            grads = b.ops.concat([p[2] for p in parts])
            sizes = {p[3] for p in parts}
            if len(sizes) != 1 or -1 in sizes:
                raise EmbgradError(
                    f"layers {[lg.name for lg in lookups]} share one table but looked up batches of "
                    f"sizes {sorted(sizes)}; per-example gradients of the table need the same examples.")
            B = sizes.pop()
            if self._loss_reduction == "mean":
                grads = grads * float(B)
            pe = coalesce_lookups(b, ex, rows, grads, self.num_rows, B, per_example=True)
            assert isinstance(pe, ExampleGrads)
            lk = pe
        if not self.projections:
            return lk
        B = lk._static_batch("a tied table's per-example gradients")
        # the projection's calls: those of one forward side by side (positions), forwards of
        # distinct examples one after the other (examples), as the lookups are numbered
        groups: dict[int, tuple[list, list]] = {}
        for (h, a), f in zip(self.projections, self._proj_forwards, strict=True):
            hs, as_ = groups.setdefault(f, ([], []))
            hs.append(_as_positions(b, h, self.name, "input"))
            as_.append(_as_positions(b, a, self.name, "logit gradient"))
        per_fwd = [(hs[0] if len(hs) == 1 else b.ops.concat(hs, axis=1),
                    as_[0] if len(as_) == 1 else b.ops.concat(as_, axis=1)) for _, (hs, as_) in sorted(groups.items())]
        rows_per_fwd = [b.ops.shape(h)[0] for h, _ in per_fwd]
        H: Any = None
        A: Any = None
        if len(per_fwd) == 1 or all(n == B for n in rows_per_fwd):
            H = b.ops.concat([h for h, _ in per_fwd], axis=1) if len(per_fwd) > 1 else per_fwd[0][0]
            A = b.ops.concat([a for _, a in per_fwd], axis=1) if len(per_fwd) > 1 else per_fwd[0][1]
        elif sum(rows_per_fwd) == B and len({b.ops.shape(h)[1] for h, _ in per_fwd}) == 1:
            H = b.ops.concat([h for h, _ in per_fwd], axis=0)
            A = b.ops.concat([a for _, a in per_fwd], axis=0)
        if H is None or b.ops.shape(H)[0] != B:
            raise EmbgradError(
                f"layer {self.name!r}: the tied projection ran on batches of {rows_per_fwd} rows, but the "
                f"lookups have {B} examples; per-example gradients of the whole table need the "
                "projection to run on (B, ..., D) inputs of the same examples (not flattened to "
                "(B*T, D)), with the same number of positions in every forward.")
        if self._loss_reduction == "mean":
            A = A * float(B)
        return TableExampleGrads(lk, H, A, b)

    def per_example(self, part: str = "table") -> Any:
        """Per-example gradients of the layer's table.

        ``part="table"`` (default): the whole table's gradient. For an untied table that is the
        lookups' :class:`ExampleGrads` (example b holds only the rows it looked up); for a tied
        one a :class:`~embgrad.tied.TableExampleGrads` (lookups + projection + cross term; same
        methods: norms, clip, scale, sum, dot, example, to_dense). ``part="lookup"``: the lookup
        part alone (an :class:`ExampleGrads`), also for tied tables.

        Examples are numbered across the capture's forwards (see :func:`capture`'s
        ``forwards=``): with two forwards of B1 and B2 examples, B1 + B2 in all. A lookup
        broadcast over the batch (position ids of batch size 1, or without a batch dimension)
        counts once per example, with that example's share of its gradient.

        ``loss_reduction``: the loss is the sum ("sum", embgrad's default) or the mean
        ("mean") of per-example terms. With "mean" the captured gradient is scaled by B, so
        that each example's gradient is that of its own loss term and ``sum()`` equals
        B · weight_grad. embgrad cannot tell from the loss which one it is: pass what the loss
        does. (Opacus's ``GradSampleModule`` defaults to ``loss_reduction="mean"``; embgrad
        defaults to "sum", the reduction under which per-example gradients add up to the
        batch gradient with no factor.)

        ``scale_grad_by_freq=True`` tables: each example's gradient divides by the counts of
        the ids in that example alone (its gradient depends on nothing else), so ``sum()``
        then differs from PyTorch's batch gradient (``weight_grad``), which divides by the
        counts over the whole batch.

        Raises:
            EmbgradError: where per-example gradients are not defined or embgrad cannot be sure
                of them: calls of one forward with different batch sizes, a broadcast lookup
                whose batch size cannot be known, sequence-first models without ``batch_dim=``;
                ``part`` not "table" or "lookup"; a tied table read somewhere embgrad cannot see
                (``part="table"`` only: the message names the fix).
        """
        if part not in _PARTS:
            raise EmbgradError(f"layer {self.name!r}: per_example(part=...) takes 'table' (the whole "
                               f"table, the default) or 'lookup' (the lookup part alone), got {part!r}.")
        if part == "table" and self.tied and not (self.projections or self._unknown_use or self._shared) \
                and not self._checked:
            raise EmbgradError(
                f"layer {self.name!r}: its table is tied (also used outside its lookups), and embgrad "
                f"could not see those uses here ({self._backend.name} backend"
                + (", gradients() without the loss" if self._backend.name == "torch" else "") +
                "), so it does not know the whole table's per-example gradients. Pass the loss "
                "(cap.gradients(loss)) on PyTorch or Keras, or ask for the lookup part explicitly: "
                "per_example(part='lookup').")
        if part == "table" and self.tied and (self.projections or self._unknown_use or self._shared):
            if self._unknown_use is not None:
                raise EmbgradError(self._unknown_message("per-example gradients",
                                                         "per_example(part='lookup')"))
            if self._table_pe is None:
                with self._backend.ops.no_grad():
                    self._table_pe = self._table_part()
            return self._table_pe
        return self._lookup_examples()

    def _lookup_flat(self) -> tuple[Any, Any, Any, Any]:
        with self._backend.ops.no_grad():
            return self._flat_examples()

    def _lookup_examples(self) -> ExampleGrads:
        """The lookup part's per-example gradients (cached)."""
        if self._per_example is None:
            if self._coupling:
                warnings.warn(
                    f"layer {self.name!r}: the model has layers that couple the examples of a batch "
                    f"({', '.join(self._coupling)}: BatchNorm in training mode), so per-example "
                    "gradients are not defined; the values returned are each example's share of the "
                    "batch gradient. Put those layers in eval() mode for true per-example gradients.",
                    stacklevel=2)
            exm = self._examples
            if exm is not None and exm.warning:
                warnings.warn(exm.warning.format(layer=self.name), stacklevel=2)
            b = self._backend
            with b.ops.no_grad():
                ex, rows, grads, B = self._flat_examples()
                if self._loss_reduction == "mean":
                    grads = grads * (float(B) if isinstance(B, int) else b.ops.cast(B, b.ops.dtype_name(grads)))
                self._per_example = coalesce_lookups(b, ex, rows, grads, self.num_rows, B, per_example=True)
        return self._per_example

    def __repr__(self) -> str:
        shape = self._backend.ops.shape(self.ids)
        flags = "".join(f", {f}=True" for f in ("tied", "frozen") if getattr(self, f))
        calls = f", calls={len(self.calls)}" if len(self.calls) > 1 else ""
        return (f"LayerGradients({self.name!r}, num_rows={self.num_rows}, dim={self.dim}, "
                f"ids={shape}{calls}{flags})")


def _counts(b: Backend, keys: Any, like: Any) -> Any:
    """For each entry, how many entries share its key (float, like ``like``)."""
    uniq, inv = b.ops.unique(keys)
    ones = b.ops.zeros((b.ops.shape(keys)[0],), b.ops.dtype_name(like), like) + 1.0
    return b.ops.gather(b.ops.segment_sum(ones, inv, b.ops.shape(uniq)[0]), inv)


def _grad_fingerprint(b: Backend, g: Any) -> Any:
    """The :func:`embgrad.tied.fingerprint_rows` of a framework gradient of a table (dense,
    sparse, IndexedSlices), without coalescing it."""
    from .tied import fingerprint_rows
    rows, values, _ = b.ops.row_grad_parts(g)
    return fingerprint_rows(b, rows, values)


def _fingerprint_differs(b: Backend, total: Any, lg: LayerGradients) -> bool:
    """Whether a table's total-gradient fingerprint is more than its recorded uses' (the
    lookups of every captured layer sharing it, and its projections)."""
    from .tied import fingerprint_projection, fingerprint_rows, fingerprints_differ
    parts = []
    with b.ops.no_grad():
        for g in (lg, *lg._shared):
            rows, grads = g._flat_weight()
            parts.append(fingerprint_rows(b, rows, grads))
        parts += [fingerprint_projection(b, h, a) for h, a in lg.projections]
        return fingerprints_differ(b, total, parts)


def _as_positions(b: Backend, x: Any, name: str, what: str) -> Any:
    """A projection's (N, ..., K) tensor as (N, S, K) (S = 1 for (N, K))."""
    shape = b.ops.shape(x)
    if len(shape) < 2:
        raise EmbgradError(f"layer {name!r}: the tied projection's {what} has shape {shape}; "
                           "expected (B, ..., D).")
    return b.ops.reshape(x, (shape[0], -1, shape[-1]))


class Gradients(Mapping):
    """Read-only mapping ``layer name -> LayerGradients``; ``.sources`` holds the gradients of
    extra variables asked for with ``sources=`` (TensorFlow), else None."""

    def __init__(self, layers: dict[str, LayerGradients], sources: list[Any] | None = None,
                 aliases: Mapping[str, str] | None = None):
        # keyed by the name each layer was selected by (capture(net, layers="emb") -> "emb");
        # the layer's own name (Gluon "embedding0", a Keras layer.name) finds it too
        aliases = dict(aliases or {})
        self._layers = {aliases.get(k, k): v for k, v in layers.items()}
        self._aliases = {k: v for k, v in aliases.items() if k in layers and k not in self._layers}
        self.sources = sources

    def __getitem__(self, name: str) -> LayerGradients:
        try:
            return self._layers[name if name not in self._aliases else self._aliases[name]]
        except KeyError:
            raise KeyError(f"no captured layer {name!r}; captured: {', '.join(self._layers)} "
                           f"(closest: {closest_names(name, self._layers)})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def only(self) -> LayerGradients:
        """The single captured layer's gradients.

        Raises:
            EmbgradError: several layers were captured (index by name instead).
        """
        if len(self._layers) != 1:
            raise EmbgradError(
                f"only() needs exactly one captured layer, but {len(self._layers)} were captured: "
                f"{', '.join(self._layers)}. Index by name, or capture(model, layers=NAME).")
        return next(iter(self._layers.values()))

    def __repr__(self) -> str:
        inner = ", ".join(repr(v) for v in self._layers.values())
        return f"Gradients([{inner}])"


_FORWARDS = ("distinct", "same_examples")


class Capture:
    """Context manager returned by :func:`capture`. Use ``gradients()`` after the forward."""

    def __init__(self, model: Any, layers: Any = None, *, batch_dim: int | None = None,
                 forwards: str = "distinct"):
        self.model = model
        self._backend = get_backend(model)
        self._given: dict[str, str] = {}    # layer name -> the name the user selected it by
        self.layers: list[EmbeddingInfo] = select_layers(self._backend, model, layers, self._given)
        if layers is None:
            missed = _uncaptured_text(self._backend, model)
            if missed:
                warnings.warn(f"capture({type(model).__name__}):{missed}", stacklevel=3)
        if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int)
                                      or batch_dim < 0):
            raise EmbgradError(f"batch_dim must be a non-negative int (the dimension of the ids that "
                               f"indexes the examples: 0 for (B, T), 1 for (T, B)), got {batch_dim!r}.")
        if forwards not in _FORWARDS:
            raise EmbgradError(f"forwards must be 'distinct' (each forward of the model in the block "
                               f"looks up its own examples) or 'same_examples' (every forward looks up "
                               f"the same examples, e.g. the towers of a siamese model run one after "
                               f"the other), got {forwards!r}.")
        self.batch_dim = batch_dim
        self.forwards = forwards
        self.calls: list[Call] = []
        self.projections: list[Call] = []   # calls of tied projections (role "projection")
        self._grad_before: dict[str, Any] = {}
        self._tap: Tap | None = None
        self._fwd_tap: Tap | None = None
        self._coupling: list[str] = []
        self._replace: Callable[[Call], Any] | None = None
        self._used = False
        self._graph_freed = False
        self._fwd_hints: list[Any] = []    # per forward: its input's batch size (or None)
        self._fwd_outputs: dict[int, Any] = {}   # per forward: the model's output, where seen
        self._split: tuple[Any, Any] | None = None   # (loss, 1 / loss_scale) while gradients() runs
        self._depth = 0
        self._loose: int | None = None     # the forward index of calls made outside any forward
        self._boundaries = False
        self._loose_fwds: set[int] = set()
        self._seq_first: list[str] | None = None

    def __enter__(self) -> Capture:
        if self._tap is not None:
            raise EmbgradError("this capture is already active; capture contexts do not nest with themselves.")
        self.calls = []
        self.projections = []
        # fingerprints of the tables' accumulated gradients before the block (None: no gradient
        # yet), so that gradients() after the user's own backward sees what that backward added
        self._grad_before = {}
        for info in self.layers:
            if not info.frozen and self._backend.table_weight(info) is not None:
                g = self._backend.accumulated_grad(info)
                self._grad_before[info.name] = None if g is None else _grad_fingerprint(self._backend, g)
        self._fwd_hints, self._depth, self._loose = [], 0, None
        self._fwd_outputs = {}
        self._loose_fwds = set()
        self._graph_freed = False
        self._coupling = self._backend.coupling_layers(self.model)
        self._tap = self._backend.install_tap(self.model, self.layers, self._on_call,
                                              active=self._active_here)
        try:
            # after the layers' tap: when the model is the embedding itself, the forward's end
            # must come after the lookup's record
            self._fwd_tap = self._backend.install_forward_tap(
                self.model, self._if_here(self._forward_start), self._if_here(self._forward_end))
        except BaseException:
            self._tap.remove()
            self._tap = None
            raise
        self._boundaries = self._fwd_tap is not None
        _ACTIVE.set(_ACTIVE.get() + (self,))
        self._used = True
        return self

    def _active_here(self) -> bool:
        """True when this capture is active in the calling thread's / task's context."""
        return self._tap is not None and any(c is self for c in _ACTIVE.get())

    def _if_here(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, run only for calls in this capture's thread / context (a forward of the same
        model in another thread neither starts nor ends one of this capture's forwards)."""
        def call(*args: Any) -> Any:
            return fn(*args) if self._active_here() else None
        return call

    def __exit__(self, *exc: Any) -> None:
        active = _ACTIVE.get()
        if any(c is self for c in active):
            _ACTIVE.set(tuple(c for c in active if c is not self))
        if self._fwd_tap is not None:
            self._fwd_tap.remove()
            self._fwd_tap = None
        if self._tap is not None:
            self._tap.remove()
            # keep the tap object for differentiation after the block (TensorFlow's tape)
            self._tap_done = self._tap
            self._tap = None

    def _forward_start(self, input_shape: Sequence[int] | None) -> None:
        if self._depth == 0:
            bd = self.batch_dim or 0
            hint = None
            if input_shape is not None and len(input_shape) > bd and isinstance(input_shape[bd], int):
                hint = int(input_shape[bd])
            self._fwd_hints.append(hint)
            self._loose = None
        self._depth += 1

    def _forward_end(self, *output: Any) -> None:
        if self._depth == 1 and output:      # the outermost call's output (split_broadcast)
            self._fwd_outputs[len(self._fwd_hints) - 1] = output[0]
        self._depth = max(self._depth - 1, 0)

    def _on_call(self, call: Call) -> Any:
        if self._depth > 0:
            call.forward = len(self._fwd_hints) - 1
        else:                       # outside the model's forward (or no boundaries known)
            if self._loose is None:
                self._fwd_hints.append(None)
                self._loose = len(self._fwd_hints) - 1
                self._loose_fwds.add(self._loose)
            call.forward = self._loose
        if call.role == "projection":
            self.projections.append(call)
            return None
        call.batch_dim = self.batch_dim or 0
        if call.grad_enabled and call.info.kind == "embedding":
            shape = self._backend.ops.shape(call.ids)
            if len(shape) == 0:
                raise EmbgradError(
                    f"layer {call.info.name!r}: 0-d ids (a single id, not a batch): per-example "
                    "gradients need the examples' dimension. Pass ids of shape (B,) or (B, T), e.g. "
                    "ids.reshape(1, 1).")
            bd = call.batch_dim
            if len(shape) == 1 and bd == 0:
                call.batch_free = "absent"        # (N,) ids: per-token examples, or positions
            elif len(shape) > bd and isinstance(shape[bd], int) and shape[bd] == 1:
                call.batch_free = "one"           # (1, T) ids: one example, or broadcast
        replaced = self._replace(call) if self._replace is not None else None
        if replaced is not None:
            b = self._backend
            if tuple(b.ops.shape(replaced)) != tuple(b.ops.shape(call.output)):
                raise EmbgradError(
                    f"layer {call.info.name!r}: the replacement output has shape {tuple(b.ops.shape(replaced))}, "
                    f"the layer's output {tuple(b.ops.shape(call.output))}; replacing(fn) must return a tensor "
                    "of the layer output's shape (or None to keep the output).")
        self.calls.append(call)
        return replaced

    def replacing(self, fn: Callable[[Call], Any]) -> contextlib.AbstractContextManager[Capture]:
        """Replace the outputs of the captured layers' lookups: a context manager around (or
        inside) the ``with cap:`` block, what integrated gradients needs (Captum's
        ``LayerIntegratedGradients`` does the same with a forward hook on the layer).

        ``fn(call)`` is called for every lookup of a captured layer inside the block, in the
        order of the forward pass, with its :class:`~embgrad.backends.Call`: ``call.info.name``
        (which layer), ``call.ids`` (the ids, as the layer got them, e.g. (B, T)),
        ``call.output`` (the layer's own output, (B, T, D) for (B, T) ids). It returns the
        tensor the model goes on with instead (a tensor of the framework, of the output's
        shape), or None to keep the output. Calls of a tied output projection are not passed.

        Recording: every call is recorded in ``cap.calls`` as without a replacement (each
        ``with cap:`` block starts a fresh record). Where ``fn`` replaced the output,
        ``call.output`` is the replacement and ``gradients()`` differentiates with respect to
        it (a replacement that records no gradient becomes a leaf that does, as a frozen
        table's output), so ``weight_grad`` and ``per_example()`` are the gradients the table
        would get at the replaced point.

        Example (the integrand of integrated gradients at α = 0.5, zero baseline)::

            cap = embgrad.capture(model, layers="emb")
            with cap.replacing(lambda call: 0.5 * call.output), cap:
                loss = model(ids).sum()
            g = cap.gradients(loss)["emb"].output_grad   # ∂loss/∂e at e/2, (B, T, D)

        Raises:
            EmbgradError: ``fn`` is not callable, this capture already has a replacement
                active (they do not nest), or ``fn`` returns a tensor of another shape than the
                layer's output (at the call; the message names the layer).
        """
        if not callable(fn):
            raise EmbgradError(f"replacing(fn) takes a callable call -> tensor or None, got "
                               f"{type(fn).__name__}.")
        if self._replace is not None:
            raise EmbgradError("this capture already replaces its layers' outputs (a replacing() block is "
                               "active); replacements do not nest: pass one fn that does both.")
        return self._replacing(fn)

    @contextlib.contextmanager
    def _replacing(self, fn: Callable[[Call], Any]) -> Iterator[Capture]:
        self._replace = fn
        try:
            yield self
        finally:
            self._replace = None

    def gradients(self, loss: Any = None, loss_reduction: str = "sum", *,
                  sources: Sequence[Any] | None = None, retain_graph: bool = False,
                  loss_scale: Any = None) -> Gradients:
        """Gradients of ``loss`` for every captured layer (one backward pass, no ``.grad`` written).

        Args:
            loss: a scalar framework tensor computed from the forward run inside the block.
                With ``loss=None`` (PyTorch), returns what the user's own ``loss.backward()``
                produced.
            loss_reduction: "sum" (default) or "mean": how the loss combines the examples'
                terms. Only ``per_example()`` depends on it (see
                :meth:`LayerGradients.per_example`); embgrad cannot detect it from the loss, and
                the default differs from Opacus's (``loss_reduction="mean"``).
            sources: extra variables whose gradients come back in ``.sources`` (same order).
            retain_graph: keep the graph for another backward (also needed to call
                ``gradients(loss)`` a second time on the same capture in PyTorch).
            loss_scale: the factor a mixed-precision loss was multiplied by (e.g. a Keras
                ``LossScaleOptimizer``'s ``dynamic_scale``, or ``torch.amp.GradScaler.get_scale()``):
                embgrad's results are divided by it in float32; ``sources`` stay scaled, as the
                loss-scale optimizer's own ``apply`` expects them.

        Returns:
            :class:`Gradients`, layer name -> :class:`LayerGradients`.

        Raises:
            EmbgradError: no forward ran in the block, it ran without gradients, the loss does
                not depend on any recorded lookup (e.g. it came from a forward run before the
                block), ``gradients(loss)`` was already called without ``retain_graph=True``,
                or the gradient holds NaN/Inf.
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
                "check that the model actually uses these layers for its inputs." + self._compiled_hint())
        if not all(c.grad_enabled for c in self.calls):
            hint = self._backend.no_grad_hint
            raise EmbgradError(
                f"the forward pass ran with gradients disabled ({hint}), so "
                f"layers {names} produced no graph to differentiate. Run the forward inside capture "
                "with gradient recording on.")
        tap = self._tap or getattr(self, "_tap_done", None)
        assert tap is not None
        b = self._backend
        src = None
        projections = [p for p in self.projections if p.grad_enabled]
        n_calls = len(self.calls)
        weights = {i.name: b.table_weight(i) for i in self.layers}
        trainable = [i for i in self.layers if not i.frozen and weights[i.name] is not None]
        checked: set[str] = set()
        totals: dict[str, Any] = {}
        unknown: dict[str, str] = {}
        check_fp: dict[str, Any] = {}    # layer -> fingerprint of the table's total gradient
        proj_grads: list[Any] = []
        if loss is not None:
            if self._graph_freed and getattr(tap, "single_use", False):
                raise EmbgradError(
                    "gradients(loss) was already called on this capture without retain_graph=True, "
                    "and that backward pass freed the graph. Keep the first result, pass "
                    "retain_graph=True to the first call, or run the forward again in a new capture.")
            loss = b.scalar_loss(loss)
            # uses of a table that no recorded lookup or projection explains (never a lookup-only
            # gradient of a tied table without a word): torch walks its autograd graph; Keras on
            # TensorFlow asks the tape for the table's total gradient and compares fingerprints
            extra_for: list[str] = []
            if b.table_check == "graph":
                unknown = b.table_uses(loss, self.layers, self.calls + projections)
                checked = {i.name for i in self.layers}
                extra_for = [i.name for i in trainable if i.name in unknown]
            elif b.table_check == "total" and not b.ops.traced(loss):   # values needed: eager only
                extra_for = [i.name for i in trainable]
            extra = [weights[n] for n in extra_for]
            if isinstance(sources, (str, bytes)):
                raise EmbgradError(
                    f"sources= takes a list of variables (e.g. model.trainable_variables), got the "
                    f"string {sources!r:.60}; names are not looked up: pass the variables themselves.")
            srcs = list(sources or []) + extra
            raw, src = tap.grad(loss, self.calls + projections, srcs if srcs else sources, retain_graph)
            raw, proj_grads = list(raw[:n_calls]), list(raw[n_calls:])
            if extra:
                got = list(src or [])
                totals = dict(zip(extra_for, got[len(got) - len(extra):], strict=True))
                src = got[:len(got) - len(extra)] if sources is not None else None
            if b.table_check == "total":
                check_fp = {n: _grad_fingerprint(b, g) for n, g in totals.items() if g is not None}
            if raw and all(g is None for g in raw):
                raise EmbgradError(
                    f"the loss does not depend on any lookup recorded in this capture (layers "
                    f"{names}): it was computed from a forward run outside the `with` block (e.g. "
                    "before it), or from outputs that do not use these layers. Compute the loss from "
                    "the forward run inside the block." + b.unreached_hint)
            grads = [b.ops.zeros(b.ops.shape(c.output), _float_name(b, c.output), c.output) if g is None else g
                     for c, g in zip(self.calls, raw, strict=True)]
            if not retain_graph:
                self._graph_freed = True
        else:
            if sources is not None:
                raise EmbgradError("sources= needs the loss: cap.gradients(loss, sources=[...]).")
            missing = [c.info.name for c in self.calls if c.grad is None]
            if missing:
                raise EmbgradError(
                    f"no backward pass has reached layers {sorted(set(missing))}: pass the loss, "
                    "cap.gradients(loss), or call loss.backward() before cap.gradients().")
            grads = [c.grad for c in self.calls]
            proj_grads = [c.grad for c in projections]
            # the user's own backward added the table's total gradient to its accumulated gradient
            for info in trainable:
                after = b.accumulated_grad(info)
                before = self._grad_before.get(info.name, False)
                if after is not None and before is not False:
                    fp = _grad_fingerprint(b, after)
                    check_fp[info.name] = fp if before is None else fp - before
                    if before is None:
                        totals[info.name] = after
        inv_scale = None if loss_scale is None else 1.0 / _positive_scale(b, loss_scale)
        if inv_scale is not None and loss is not None:   # totals from the tape are of the scaled loss
            check_fp = {n: fp * inv_scale for n, fp in check_fp.items()}
            totals = {n: (t, inv_scale) for n, t in totals.items()}
        proj_by_layer: dict[str, list] = {i.name: [] for i in self.layers}
        for call, g in zip(projections, proj_grads, strict=True):
            if g is None:               # a projection the backward did not reach
                continue
            bad = b.ops.count_nonfinite(g)
            if bad:
                raise EmbgradError(
                    f"layer {call.info.name!r}: the gradient of its tied projection's output holds "
                    f"{bad} NaN/Inf values. " + ("The scaled loss overflowed: skip this step." if inv_scale
                                                  is not None else "The loss or the model diverged."))
            if inv_scale is not None:
                g = b.ops.cast(g, "float64" if b.ops.dtype_name(g) == "float64" else "float32") * inv_scale
            if "version" in call.meta and getattr(call.output, "_version", None) != call.meta["version"]:
                raise EmbgradError(
                    f"layer {call.info.name!r}: the output of its tied projection was modified in "
                    "place after the projection ran, so its gradient is not the logit gradient "
                    "of the table's product. Use an out-of-place operation on the logits.")
            lg = call.meta["logit_grad"](g) if call.meta.get("logit_grad") else g
            proj_by_layer[call.info.name].append((call.meta["input"], lg, call.forward))
        by_layer: dict[str, tuple[list, list, list]] = {i.name: ([], [], []) for i in self.layers}
        token_grads = []
        for n, (call, g) in enumerate(zip(self.calls, grads, strict=True)):
            bad = b.ops.count_nonfinite(g)
            if bad:
                raise EmbgradError(
                    f"layer {call.info.name!r}: the gradient of its output holds {bad} NaN/Inf values "
                    f"(of {int(math.prod(b.ops.shape(g)))}). " + (
                        "The scaled loss overflowed: skip this step, as the loss-scale optimizer "
                        "does (it lowers its scale for the next one)." if inv_scale is not None else
                        "The loss or the model diverged (check the learning rate, or an unscaled "
                        "float16 loss)."))
            if inv_scale is not None:
                g = b.ops.cast(g, "float64" if b.ops.dtype_name(g) == "float64" else "float32") * inv_scale
                call.view_grads = [b.ops.cast(v, "float64" if b.ops.dtype_name(v) == "float64" else "float32")
                                   * inv_scale for v in call.view_grads if v is not None]
            call.grad = g
            tg = call.token_grad(g) if call.token_grad is not None else g
            token_grads.append(tg)
            by_layer[call.info.name][0].append((call.ids, tg))
            by_layer[call.info.name][1].append(call.valid)
            by_layer[call.info.name][2].append(n)
        self._split = (loss, inv_scale)
        try:
            examples = self._examples(token_grads)
        finally:
            self._split = None
        result: dict[str, LayerGradients] = {}
        for info in self.layers:
            calls, valid, index = by_layer[info.name]
            if calls:
                result[info.name] = LayerGradients(
                    info, calls, valid, b, loss_reduction, self._coupling, examples, index,
                    projections=proj_by_layer[info.name], unknown_use=unknown.get(info.name),
                    total=totals.get(info.name), checked=info.name in checked)
        # captured layers that look up the same table: each one's whole-table gradient has all lookups
        for name, lg in result.items():
            w = weights[name]
            if w is not None:
                shared = [o for n, o in result.items() if n != name and weights[n] is w]
                if shared:
                    lg._shared = tuple(shared)
                    lg.tied = True
        for name, fp in check_fp.items():
            lg = result.get(name)
            if lg is None:
                continue
            lg._checked = True
            if _fingerprint_differs(b, fp, lg):
                lg._unknown_use = "the table's total gradient differs from that of its recorded lookups and projections"
                lg.tied = True
                lg._total = totals.get(name)   # exact only when nothing had accumulated before
        return Gradients(result, src, aliases=self._given)

    def _compiled_hint(self) -> str:
        return self._backend.compiled_hint(self.model)

    # ------------------------------------------------------------------ examples
    def _examples(self, token_grads: list[Any]) -> _Examples:
        """Which examples every call looked up (see :class:`_Examples`)."""
        b = self._backend
        layouts: list[Any] = []
        problems: list[str | None] = []
        sizes: list[Any] = []                 # the call's batch size
        strong: list[bool] = []               # the size is certain (not a batch-free guess)
        for call, tg in zip(self.calls, token_grads, strict=True):
            layout, call_size, sure, call_problem = self._layout(call, tg)
            layouts.append(layout)
            sizes.append(call_size)
            strong.append(sure)
            problems.append(call_problem)
        if any(not isinstance(s, int) for s in sizes):
            return self._traced_examples(layouts, problems, sizes)
        global_problem = self._sequence_first_problem()
        n_fwd = max(len(self._fwd_hints), 1 + max((c.forward for c in self.calls), default=0))
        hints = self._fwd_hints + [None] * (n_fwd - len(self._fwd_hints))
        fwd_size: list[int | None] = []
        fwd_problem: list[str | None] = []
        for f in range(n_fwd):
            mine = [k for k, c in enumerate(self.calls) if c.forward == f]
            certain = {sizes[k] for k in mine if strong[k]}
            guesses = {sizes[k] for k in mine if not strong[k] and problems[k] is None}
            size: int | None = None
            problem: str | None = None
            if len(certain) > 1:
                by: dict[str, list[int]] = {}
                for k in mine:
                    if strong[k]:
                        by.setdefault(self.calls[k].info.name, []).append(sizes[k])
                problem = (f"the lookups of one forward have different batch sizes ({by}); per-example "
                           "gradients need every call of a forward to look up the same examples (one "
                           "row of ids per example). If these calls are separate batches, run them as "
                           "separate forwards of the model (each its own examples).")
            elif certain:
                size = certain.pop()
            elif hints[f] is not None and mine:   # a forward without lookups (e.g. only a tied
                size = hints[f]                      # projection's call) has no examples here
            elif guesses == {1} and f in self._loose_fwds and not b.broadcast_views \
                    and any(self.calls[k].batch_free == "one" for k in mine):
                problem = (f"cannot tell the batch size: it was called outside any forward of the captured "
                           f"model with ids of batch size 1, and the {b.name} backend does not see whether "
                           "its output was then broadcast over a batch (never a batch of 1 assumed). Call it "
                           "inside the model's forward, or pass ids with the batch dimension, e.g. "
                           f"{b.expand_hint('B')}.")
            elif len(guesses) == 1:
                size = next(iter(guesses))
            elif guesses:
                problem = (f"cannot tell the batch size of a forward: its lookups have ids without a "
                           f"batch dimension of sizes {sorted(guesses)}. Pass ids with the batch "
                           "dimension (e.g. position_ids.expand(batch_size, -1)).")
            fwd_size.append(size)
            fwd_problem.append(problem)
            for k in mine:
                if problems[k] is None and problem is not None:
                    problems[k] = problem
                elif problems[k] is None and not strong[k] and size is not None and sizes[k] != size:
                    call = self.calls[k]
                    shape = b.ops.shape(call.ids)
                    problems[k] = (
                        f"its ids of shape {shape} carry no batch dimension (batch size "
                        f"{'1' if call.batch_free == 'one' else 'absent'}) while the forward's batch has "
                        f"{size} examples, and embgrad saw no operation broadcasting its output over "
                        f"that batch ({b.broadcast_seen}). Its per-example gradients are unknown: "
                        f"pass ids with the batch dimension, e.g. {b.expand_hint(size)} for "
                        "position ids.")
        # examples of each forward: numbered one after the other, or shared
        offsets: list[int] = []
        if self.forwards == "same_examples":
            known = {s for s in fwd_size if s is not None}
            total = known.pop() if len(known) == 1 else 0
            if len(known) > 0:
                all_sizes = [s for s in fwd_size]
                for k in range(len(problems)):
                    if problems[k] is None:
                        problems[k] = (f"forwards='same_examples', but the forwards have different "
                                       f"batch sizes {all_sizes}; each must look up the same examples.")
            offsets = [0] * n_fwd
        else:
            total = 0
            for s in fwd_size:
                offsets.append(total)
                total += s or 0
        for k, call in enumerate(self.calls):
            if layouts[k] is not None:
                ids, g, valid = layouts[k]
                layouts[k] = (ids, g, valid, offsets[call.forward])
            if global_problem is not None and problems[k] is None:
                problems[k] = global_problem
        warning = None
        if self.forwards == "distinct":
            warning = self._ambiguity_warning()
        return _Examples(layouts, problems, total, warning)

    def _ambiguity_warning(self) -> str | None:
        """A warning when a layer was called several times where embgrad cannot see forwards."""
        counts: dict[tuple[str, int], int] = {}
        for c in self.calls:
            if c.forward in self._loose_fwds:
                counts[(c.info.name, c.forward)] = counts.get((c.info.name, c.forward), 0) + 1
        repeated = sorted({name for (name, _), n in counts.items() if n > 1})
        if not repeated:
            return None
        where = ("this backend does not show where a forward begins and ends" if not self._boundaries
                 else "they ran outside any forward of the captured model")
        return (f"layer {{layer}}: layers {repeated} were called several times and {where}; embgrad "
                "assumed that those calls look up the SAME examples (like the two inputs of a siamese "
                "model in one forward). If they are different batches, run each inside the model's "
                "forward or in its own `with embgrad.capture(...)` block.")

    def _sequence_first_problem(self) -> str | None:
        if self.batch_dim is not None:
            return None
        if self._seq_first is None:   # once per capture (a scan of the model's modules)
            self._seq_first = self._backend.sequence_first_layers(self.model)
        seq = self._seq_first
        if not seq or not any(len(self._backend.ops.shape(c.ids)) >= 2 and c.info.kind == "embedding"
                              for c in self.calls):
            return None
        return (f"the model has layers that read their input sequence-first by default ({', '.join(seq)}: "
                "batch_first=False), so its ids may be (T, B) and dimension 0 is not surely the batch. "
                "Say which dimension of the ids indexes the examples: embgrad.capture(model, "
                "batch_dim=1) for (T, B) ids, batch_dim=0 for (B, T).")

    def _layout(self, call: Call, tg: Any) -> tuple[Any, Any, bool, str | None]:
        """One call's per-example layout ``(ids, grads, valid)`` (batch first), its batch size,
        whether that size is certain, and the problem if it has no per-example meaning."""
        b = self._backend
        ids, valid = call.ids, call.valid
        shape = b.ops.shape(ids)
        bd = call.batch_dim if call.info.kind == "embedding" else 0
        if call.batch_free is not None and call.views:
            return self._broadcast_layout(call, tg)
        if call.batch_free is not None:
            split = self._split_layout(call, tg)
            if split is not None:
                return split
            if call.batch_free == "absent":
                seen = b.broadcast_in_graph(call)
                if seen is not None:
                    return None, 0, False, (
                        f"its ids of shape {shape} carry no batch dimension and the traced graph "
                        f"broadcasts its output over the batch ({seen}); inside a traced function "
                        f"embgrad cannot split that gradient by example (never read as one id per "
                        f"example, even where the sizes agree). Pass ids with the batch dimension, "
                        f"e.g. {b.expand_hint('B')} for position ids, or call capture eagerly.")
        if len(shape) == 0:
            return None, 0, False, "0-d ids have no examples' dimension."
        if len(shape) <= bd:
            bd = 0
        if bd:
            ids, tg = b.ops.moveaxis(ids, bd, 0), b.ops.moveaxis(tg, bd, 0)
            valid = b.ops.moveaxis(valid, bd, 0) if valid is not None else None
        sure = call.batch_free is None
        return (ids, tg, valid), shape[bd], sure, None

    def _split_layout(self, call: Call, tg: Any) -> tuple[Any, Any, bool, str | None] | None:
        """The layout of a batch-free lookup whose output the backend splits by example from the
        forward's output (Keras on TensorFlow: ``split_broadcast``), or None where it cannot."""
        b = self._backend
        f = call.forward
        y = self._fwd_outputs.get(f)
        B = self._fwd_hints[f] if f < len(self._fwd_hints) else None
        if y is None or self._split is None or self._split[0] is None \
                or call.info.kind != "embedding" or not isinstance(B, int) or B < 2:
            return None
        loss, inv_scale = self._split
        J = b.split_broadcast(self._tap or getattr(self, "_tap_done", None), loss, call, y, B)
        if J is None:
            return None
        oshape = b.ops.shape(call.output)
        bd = 0 if call.batch_free == "absent" else call.batch_dim
        if call.batch_free == "one":      # (B, ..., 1, ...) -> (B, ...) without the ids' batch dim
            J = b.ops.reshape(J, (B, *oshape[:bd], *oshape[bd + 1:]))
        J = b.ops.cast(J, _float_name(b, tg))
        if inv_scale is not None:
            J = J * inv_scale
        summed = b.ops.reshape(b.ops.sum(J, 0), b.ops.shape(tg))
        gap = b.ops.max_abs(summed - tg)
        scale = max(b.ops.max_abs(tg), b.ops.max_abs(summed), 1e-30)
        if gap > 1e-4 * scale:
            return None, B, True, (
                f"its ids of shape {b.ops.shape(call.ids)} carry no batch dimension while the forward's batch "
                f"has {B} examples; embgrad split its gradient by the examples of the model's output, "
                f"but the loss also depends on it another way (part of the gradient, relative size "
                f"{gap / scale:.3g}) that cannot be split by example. Pass ids with the batch "
                f"dimension, e.g. {b.expand_hint(B)} for position ids.")
        ids = call.ids
        if call.batch_free == "one":
            ids = b.ops.reshape(ids, (*b.ops.shape(ids)[:bd], *b.ops.shape(ids)[bd + 1:]))
        ids = b.ops.broadcast_to(b.ops.reshape(ids, (1, *b.ops.shape(ids))), (B, *b.ops.shape(ids)))
        return (ids, J, None), B, True, None

    def _broadcast_layout(self, call: Call, tg: Any) -> tuple[Any, Any, bool, str | None]:
        """The layout of a lookup whose output the tap gave per-example views of."""
        b = self._backend
        vshapes = {tuple(b.ops.shape(v)) for v in call.views}
        if len(vshapes) != 1:
            return None, -1, True, (f"its output (ids of shape {b.ops.shape(call.ids)}, no batch "
                                    f"dimension) was broadcast against batches of different shapes "
                                    f"{sorted(vshapes)} in one forward.")
        vshape = vshapes.pop()
        vg = [g for g in call.view_grads if g is not None]
        G = vg[0] if len(vg) == 1 else functools.reduce(lambda x, y: x + y, vg) if vg else \
            b.ops.zeros(vshape, _float_name(b, tg), tg)
        bd = 0 if call.batch_free == "absent" else call.batch_dim
        B = vshape[bd]
        if call.other_use:
            # the output was also used where no per-example view could be made: only safe if
            # that use got no gradient (the views' gradients add up to the output's)
            summed = b.ops.reshape(b.ops.sum(G, bd), b.ops.shape(tg))
            gap = b.ops.max_abs(summed - tg)
            scale = max(b.ops.max_abs(tg), b.ops.max_abs(summed), 1e-30)
            if gap > 1e-4 * scale:
                return None, B, True, (
                    f"its output (ids of shape {b.ops.shape(call.ids)}, no batch dimension) was broadcast "
                    "over the batch and ALSO used in another way whose gradient embgrad cannot split "
                    f"by example (part of the gradient, relative size {gap / scale:.3g}). Pass ids "
                    f"with the batch dimension, e.g. ids.expand({B}, -1) for position ids.")
        ids = call.ids
        if call.batch_free == "absent":
            ids = b.ops.broadcast_to(b.ops.reshape(ids, (1, *b.ops.shape(ids))), vshape[:-1])
        else:
            ids = b.ops.moveaxis(b.ops.broadcast_to(ids, vshape[:-1]), bd, 0)
            G = b.ops.moveaxis(G, bd, 0)
        return (ids, G, None), B, True, None

    def _traced_examples(self, layouts: list[Any], problems: list[str | None], sizes: list[Any]) -> _Examples:
        """Batch sizes known only when a traced function runs (tf.function): every call of one
        forward must look up the same examples, checked by a run-time assertion; forwards are
        numbered one after the other (``forwards="distinct"``) or must all have the same size
        (``"same_examples"``), as in eager mode."""
        b = self._backend
        first: dict[int, int] = {}          # forward -> its first call
        for k, call in enumerate(self.calls):
            f = first.setdefault(call.forward, k)
            if f == k or (isinstance(sizes[k], int) and isinstance(sizes[f], int)
                          and sizes[k] == sizes[f]):
                continue
            b.ops.assert_in_range(b.ops.reshape(sizes[k] - sizes[f], (1,)), 1,
                              f"embgrad: layer {call.info.name!r} was called with a batch size that "
                              "differs from the other lookups of the same forward; per-example "
                              "gradients need every call of a forward to look up the same examples "
                              "(one row of ids per example).")
        order = sorted(first)
        offsets: dict[int, Any] = {}
        total: Any = 0
        if self.forwards == "same_examples":
            for f in order:
                offsets[f] = 0
                if f != order[0]:
                    b.ops.assert_in_range(b.ops.reshape(sizes[first[f]] - sizes[first[order[0]]], (1,)), 1,
                                      "embgrad: forwards='same_examples', but the forwards have "
                                      "different batch sizes; each must look up the same examples.")
            total = sizes[first[order[0]]]
        else:
            for f in order:
                offsets[f] = total
                total = sizes[first[f]] if isinstance(total, int) and total == 0 else total + sizes[first[f]]
        layouts = [(lay[0], lay[1], lay[2], offsets[self.calls[k].forward]) if lay is not None else None
                   for k, lay in enumerate(layouts)]
        return _Examples(layouts, problems, total)

    def __repr__(self) -> str:
        state = "active" if self._tap is not None else ("done" if self._used else "not entered")
        return (f"Capture({type(self.model).__name__}, layers=[{', '.join(i.name for i in self.layers)}], "
                f"calls={len(self.calls)}, {state})")


def _float_name(b: Backend, x: Any) -> str:
    name = b.ops.dtype_name(x)
    return name if name in ("float16", "bfloat16", "float32", "float64") else "float32"


def _positive_scale(b: Backend, scale: Any) -> float:
    """``loss_scale`` (a number, scalar tensor or variable) as a positive finite float."""
    s = float(scale) if isinstance(scale, (int, float)) else float(b.ops.to_numpy(scale))
    if not (s > 0 and s != float("inf")):
        raise EmbgradError(f"loss_scale must be a positive finite number (the factor the loss was "
                           f"multiplied by), got {s!r}.")
    return s


def capture(model: Any, layers: Any = None, *, batch_dim: int | None = None,
            forwards: str = "distinct") -> Capture:
    """Record every lookup of ``model``'s embedding layers inside a ``with`` block.

    Args:
        model: a ``torch.nn.Module``, Keras model/layer, tf-keras model/layer or Gluon Block.
        layers: None (every embedding layer), a name, a list of names, or layer objects.
        batch_dim: the dimension of the ids that indexes the examples: 0 for (B, T) ids (the
            default), 1 for sequence-first (T, B) ids (``batch_first=False``, the default of
            ``nn.LSTM``, ``nn.GRU``, ``nn.Transformer``). Left as None with such a layer in
            the model, ``per_example()`` refuses rather than guess.
        forwards: what several forwards of the model inside one block mean for
            ``per_example()``: "distinct" (default): each forward looks up its own examples
            (gradient accumulation, or one model run on two batches: B1 + B2 examples);
            "same_examples": every forward looks up the same B examples (a siamese model's
            towers run as separate forwards). Several calls of a layer inside ONE forward
            always look up the same examples (siamese inputs, an encoder and a decoder sharing
            a table).

    Lookups broadcast over the batch (position ids of shape (1, T) or (T,), as in every
    Hugging Face model) get exact per-example gradients: where such an output meets a batched
    tensor in an elementwise operation, the operation gets a per-example view of it (PyTorch);
    the batch size comes from that operation and the other lookups and inputs of the same
    forward. Where it cannot be known, ``per_example()`` raises an EmbgradError saying how to
    pass the ids with their batch dimension (never a batch of 1). Keras layers that slice one
    table and broadcast it to their input's (B, T, D) shape themselves (Keras-Hub's
    ``PositionEmbedding``) are found and tapped after the broadcast: exact. A Keras
    ``Embedding`` looked up with batch-free ids and broadcast by the model's own ``+``: on
    PyTorch, per-example views as above; on TensorFlow (eager), its gradient is split by the
    examples of the model's output y (example b: d(g_b · y_b)/d(output), g = dLoss/dy held
    fixed; ``tape.jacobian``, about B backward passes vectorized), exact when the loss reaches
    the lookup only through y (checked) and the examples do not interact in the model. Each
    call of ``model`` is one forward (PyTorch, Keras, Gluon).

    The model is never modified: hooks/patches are removed on exit, also on error.

    Raises:
        EmbgradError: no embedding layer found, an unknown layer name, a bad ``batch_dim`` or
            ``forwards``.
    """
    return Capture(model, layers, batch_dim=batch_dim, forwards=forwards)
