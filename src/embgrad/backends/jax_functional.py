"""``embgrad.value_and_gradients`` for Flax NNX: sparse and per-example gradients of ``nnx.Embed``.

JAX has no tape and no hooks, so the entry point is functional, like ``nnx.value_and_grad``::

    loss, grads = embgrad.value_and_gradients(loss_fn, model, x, y)   # loss_fn(model, x, y)

How it works (one backward pass, no ``vmap``, never a (V, D) table gradient):

1. ``nnx.split(model)`` and ``nnx.merge`` give a private copy of the model; in the copy each
   selected ``nnx.Embed`` is given a subclass whose ``__call__`` records the ids and adds a
   zero *probe* to the looked-up vectors (and whose ``attend`` adds one to the logits of a
   tied projection). The user's model is never touched (its non-parameter state, such as
   ``nnx.Rngs`` counters or batch statistics, is updated afterwards exactly as the user's own
   forward updates it, as ``nnx.value_and_grad`` does).
2. ``jax.make_jaxpr`` traces the forward once to learn each lookup's output shape; in that
   trace the tables are read from a separate input, so any read of a table outside its
   lookups and ``attend`` (``h @ model.emb.embedding[...].T`` by hand) is seen and reported.
3. ``jax.vjp`` with respect to the probes gives dLoss/d(looked-up vectors) for every lookup
   (the probes are zero, so the loss is unchanged): the same quantity PyTorch's ``capture``
   records, from which the sparse algebra of :mod:`embgrad.sparse` forms ``RowGrad`` and
   ``ExampleGrads`` with static shapes (:func:`coalesce_static`), usable under ``jax.jit``.

The (V, D) gradient of the table that ``jax.grad`` / ``nnx.value_and_grad`` would build by
scatter-add is never formed; per-example gradients cost O(B·T·D), not the B·V·D of
``jax.vmap(jax.grad(...))`` (jax_privacy / Opacus-style per-example clipping).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from ..capture import Gradients, LayerGradients, select_layers
from ..errors import EmbgradError
from ..sparse import ExampleGrads, RowGrad
from .base import Backend, EmbeddingInfo
from .jax import JaxBackend, _nnx
from .jax_ops import _index_dtype, _sorted_segments, check_in_range, unique_static

__all__ = ["value_and_gradients", "JaxLayerGradients", "coalesce_static"]

_REDUCTIONS = ("sum", "mean")


# ---------------------------------------------------------------------------- static coalescing
def _sentinel_rows(num_rows: int, n: int) -> Any:
    """(n,) ids num_rows, num_rows + 1, ...: the padded slots of a static-shape result."""
    return num_rows + jnp.arange(n, dtype=_index_dtype())


def coalesce_static(ids: Any, grads: Any, num_rows: int, per_example: bool) -> dict[str, Any]:
    """Coalesce lookups with static shapes (usable under ``jax.jit``).

    ``ids``: int (B, T), already in [0, num_rows). ``grads``: float32+ (B, T, D).

    Returns a dict of arrays: ``rows`` (N,) and ``values`` (N, D) with N = B·T: the R unique
    looked-up rows ascending, then N - R padded slots with ids ``num_rows + k`` (ascending,
    distinct, outside the table) and zero values; ``count`` the scalar R. Per example also
    ``pe_rows`` (B·T,), ``pe_values`` (B·T, D), ``pe_examples`` (B·T,): example b's slots are
    b·T .. b·T + T - 1, its unique rows ascending first and then padded slots with ids
    ``num_rows + t``; and ``pe_slot`` (B·T,): for each per-example slot, its row's slot in
    ``rows`` (so the sum over examples is one segment sum). Two sorts of the ids (all lookups;
    each example's lookups) with binary searches for the inverse, and segment sums; no (V, D)
    or B·V array; keys never exceed B·T.
    """
    B, T = ids.shape
    D = grads.shape[-1]
    N = B * T
    idx = _index_dtype()
    flat = jnp.reshape(ids, (N,)).astype(idx)
    g = jnp.reshape(grads, (N, D))
    if N == 0:   # an empty batch: empty results
        e, ev = jnp.zeros((0,), idx), jnp.zeros((0, D), g.dtype)
        return {"rows": e, "values": ev, "count": jnp.zeros((), idx), "pe_rows": e, "pe_values": ev,
                "pe_examples": e, "pe_slot": e, "pe_real": jnp.zeros((0,), bool)}
    uniq, inv = unique_static(flat)
    count = jnp.sum(uniq < num_rows)
    slots = jnp.arange(N, dtype=idx)
    rows = jnp.where(slots < count, uniq, _sentinel_rows(num_rows, N))
    out = {"rows": rows, "values": jax.ops.segment_sum(g, inv, num_segments=N), "count": count}
    if not per_example:
        return out
    s, seg = jax.vmap(_sorted_segments)(ids.astype(idx))                   # each example's ids sorted
    local = jax.vmap(lambda s_b, seg_b, i_b: seg_b[jnp.searchsorted(s_b, i_b)])(s, seg, ids.astype(idx))
    n_b = seg[:, -1:] + 1                                                  # (B, 1) unique rows per example
    b_idx = jnp.arange(B, dtype=idx)[:, None]
    key = jnp.reshape(b_idx * T + local, (N,))                             # example b's slots: b*T ...
    pe_values = jax.ops.segment_sum(g, key, num_segments=N)
    t_idx = jnp.arange(T, dtype=idx)[None, :]
    pe_rows = jnp.zeros((B, T), idx).at[b_idx, seg].set(s)
    pe_rows = jnp.where(t_idx < n_b, pe_rows, num_rows + t_idx)
    pe_slot = jnp.zeros((B, T), idx).at[b_idx, local].set(jnp.reshape(inv, (B, T)))
    out.update(pe_rows=jnp.reshape(pe_rows, (N,)), pe_values=pe_values,
               pe_examples=jnp.repeat(jnp.arange(B, dtype=idx), T), pe_slot=jnp.reshape(pe_slot, (N,)),
               pe_real=jnp.reshape(t_idx < n_b, (N,)))
    return out


# one compiled program per shape instead of one per operation eagerly (inlined under an outer jit)
_coalesce = jax.jit(coalesce_static, static_argnums=(2, 3))


def _is_traced(*xs: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


# ---------------------------------------------------------------------------- results
class JaxLayerGradients(LayerGradients):
    """:class:`~embgrad.LayerGradients` of one ``nnx.Embed`` from :func:`value_and_gradients`.

    ``ids`` / ``output_grad`` / ``calls`` are jax.Arrays as the layer saw them (ids wrapped into
    [0, V) as ``nnx.Embed`` does for negative ids). Under ``jax.jit`` the ``RowGrad`` /
    ``ExampleGrads`` it returns have static shapes: ``rows`` holds B·T slots, the real rows
    first, then padded slots with ids >= ``num_rows`` and zero values (``to_dense``, norms,
    clipping and sums ignore them; eagerly the padding is trimmed away).
    """

    __slots__ = ("batch_size", "broadcast")

    def __init__(self, info: EmbeddingInfo, calls: list[tuple[Any, Any]], backend: JaxBackend,
                 loss_reduction: str, batch_size: int, projections: Sequence[tuple[Any, Any]] = (),
                 unknown_use: str | None = None, broadcast: Sequence[bool] = ()):
        super().__init__(info, calls, [None] * len(calls), backend, loss_reduction,
                         projections=[(h, a, 0) for h, a in projections], unknown_use=unknown_use)
        self.batch_size = batch_size
        # per call: True when the lookup's output was seen broadcast with new dimensions before its
        # first axis (so that axis is not the batch, whatever its size)
        self.broadcast = tuple(broadcast) or (False,) * len(calls)

    # -- lookups, flattened
    def _flat(self) -> tuple[Any, Any]:
        """All calls as ids (1, N) and float32+ grads (1, N, D) (one pseudo-example)."""
        ids = [jnp.reshape(i, (1, i.size)) for i, _ in self.calls]
        gs = [jnp.reshape(_acc(g), (1, i.size, self.dim)) for i, g in self.calls]
        return _cat(ids, 1), _cat(gs, 1)

    def _by_example(self) -> tuple[Any, Any]:
        """All calls as ids (B, T) and float32+ grads (B, T, D), calls side by side."""
        B = self.batch_size
        ids, gs = [], []
        for (i, g), spread in zip(self.calls, self.broadcast, strict=True):
            lead = i.shape[0] if i.ndim else None
            if spread and lead == B:
                raise EmbgradError(
                    f"layer {self.name!r}: per-example gradients need every lookup's ids to have the "
                    f"batch of {B} examples as their first dimension, but this layer looked up ids of "
                    f"shape {tuple(i.shape)} whose output the forward broadcasts over the batch (e.g. "
                    f"position ids jnp.arange(T) added to (B, T, D) token vectors; here T == B == {B} by "
                    "coincidence), so each of its rows is shared by all examples. Fix: look up the ids "
                    "with the batch dimension, e.g. self.pos(jnp.broadcast_to(jnp.arange(T), x.shape)).")
            if i.ndim == 0 or lead != B:
                raise EmbgradError(
                    f"layer {self.name!r}: per-example gradients need every lookup's ids to have the "
                    f"batch of {B} examples as their first dimension, but this layer looked up ids of "
                    f"shape {tuple(i.shape)} (e.g. position ids broadcast over the batch). Fix: look up "
                    f"ids broadcast to the batch (jnp.broadcast_to(pos, ({B}, T))), or pass "
                    "batch_size= to value_and_gradients if the batch is not the first argument's "
                    "first dimension.")
            per = math.prod(i.shape[1:])            # explicit: -1 is undefined for an empty batch
            ids.append(jnp.reshape(i, (B, per)))
            gs.append(jnp.reshape(_acc(g), (B, per, self.dim)))
        return _cat(ids, 1), _cat(gs, 1)

    @property
    def lookup_grad(self) -> RowGrad:
        """The gradient of the table from this layer's lookups alone (coalesced)."""
        if self._lookup_grad is None:
            if self._per_example is not None and self._loss_reduction == "sum":
                self._lookup_grad = self._per_example.sum()
            else:
                ids, g = self._flat()
                c = _coalesce(ids, g, self.num_rows, False)
                self._lookup_grad = _row_grad(c["rows"], c["values"], c["count"], self.num_rows,
                                              self._backend)
        return self._lookup_grad

    @property
    def weight_grad(self) -> RowGrad:
        """The gradient of the whole table: lookups, plus the tied ``attend`` projection's part
        (then dense: all V rows)."""
        if self._weight_grad is None:
            if self._unknown_use is not None:
                raise EmbgradError(self._unknown_message("weight_grad", "lookup_grad"))
            if not self.projections:
                self._weight_grad = self.lookup_grad
            else:
                from ..tied import projection_grad
                b = self._backend
                look = self.lookup_grad
                dense = projection_grad(b, self.projections, "float32")
                dense = dense + b.ops.scatter_rows(look.rows, look.values.astype(dense.dtype), self.num_rows)
                self._weight_grad = RowGrad(b.ops.arange(self.num_rows, dense), dense, self.num_rows, b)
        return self._weight_grad

    def _unknown_message(self, what: str, alternative: str) -> str:
        return (f"layer {self.name!r}: its table is also read outside its lookups and its attend() "
                f"({self._unknown_use}), so embgrad cannot form the whole table's {what} exactly. "
                "Fix: compute tied logits with the layer's own method (logits = model.emb.attend(h)) "
                "instead of reading model.emb.embedding directly, or ask for the lookup part "
                f"explicitly: {alternative}.")

    def per_example(self, part: str = "table") -> Any:
        """Per-example gradients of the layer's table (see :meth:`LayerGradients.per_example`).

        ``part="table"``: the whole table's (for a table also used by ``attend``: lookups +
        projection + cross term, a :class:`~embgrad.tied.TableExampleGrads`, eager only);
        ``part="lookup"``: the lookups' :class:`~embgrad.ExampleGrads` (works under ``jit``).

        Raises:
            EmbgradError: ``part`` not "table"/"lookup"; a lookup whose ids lack the batch
                dimension; a table read outside lookups and ``attend`` (``part="table"``); the
                tied table's per-example gradients asked for under ``jit``.
        """
        if part not in ("table", "lookup"):
            raise EmbgradError(f"layer {self.name!r}: per_example(part=...) takes 'table' (the whole "
                               f"table, the default) or 'lookup' (the lookup part alone), got {part!r}.")
        if part == "table" and self._unknown_use is not None:
            raise EmbgradError(self._unknown_message("per-example gradients", "per_example(part='lookup')"))
        lk = self._lookup_examples()
        if part == "lookup" or not self.projections:
            return lk
        if self._table_pe is None:
            from ..tied import TableExampleGrads
            if _is_traced(lk._base):
                raise EmbgradError(
                    f"layer {self.name!r}: per-example gradients of a tied table (looked up and used by "
                    "attend()) are computed eagerly only: return grads (or the lookups' "
                    "per_example(part='lookup') and the projections) from the jitted function, "
                    "then call per_example() on the result.")
            B = self.batch_size
            hs = [jnp.reshape(h, (B, math.prod(h.shape[1:-1]), self.dim)) for h, _ in self.projections]
            as_ = [jnp.reshape(a, (B, math.prod(a.shape[1:-1]), self.num_rows)) for _, a in self.projections]
            H, A = _cat(hs, 1), _acc(_cat(as_, 1))
            if self._loss_reduction == "mean":
                A = A * float(B)
            self._table_pe = TableExampleGrads(lk, H, A, self._backend)
        return self._table_pe

    def _lookup_examples(self) -> ExampleGrads:
        if self._per_example is None:
            ids, g = self._by_example()
            B = self.batch_size
            if self._loss_reduction == "mean":
                g = g * float(B)
            c = _coalesce(ids, g, self.num_rows, True)
            b = self._backend
            rows, count = c["rows"], c["count"]
            ex, pr, pv, slot = c["pe_examples"], c["pe_rows"], c["pe_values"], c["pe_slot"]
            if not _is_traced(count, pr):   # eagerly: trim the padded slots away
                keep = np.asarray(c["pe_real"])
                ex, pr, pv, slot = ex[keep], pr[keep], pv[keep], slot[keep]
                rows = rows[: int(count)]
            self._per_example = ExampleGrads(ex, pr, pv, B, self.num_rows, b, row_index=(rows, slot))
        return self._per_example

    def __repr__(self) -> str:
        shape = tuple(self.ids.shape)
        flags = "".join(f", {f}=True" for f in ("tied",) if getattr(self, f))
        calls = f", calls={len(self.calls)}" if len(self.calls) > 1 else ""
        return (f"LayerGradients({self.name!r}, num_rows={self.num_rows}, dim={self.dim}, "
                f"ids={shape}{calls}{flags}, backend=jax)")


def _acc(g: Any) -> Any:
    return g if g.dtype in (jnp.float32, jnp.float64) else g.astype(jnp.float32)


def _cat(xs: list[Any], axis: int) -> Any:
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=axis)


def _row_grad(rows: Any, values: Any, count: Any, num_rows: int, b: Backend) -> RowGrad:
    if not _is_traced(count, rows):
        n = int(count)
        rows, values = rows[:n], values[:n]
    return RowGrad(rows, values, num_rows, b)


# ---------------------------------------------------------------------------- pytrees
def _register_pytrees() -> None:
    """RowGrad, ExampleGrads, JaxLayerGradients and Gradients as JAX pytrees, so that a
    ``jax.jit``-ed function can return them. Registered once, when this module loads."""
    from jax import tree_util as tu

    b = _backend()

    def rg_flat(r: RowGrad) -> tuple[tuple[Any, ...], Any]:
        return (r.rows, r.values), r.num_rows

    def rg_unflat(aux: Any, ch: Any) -> RowGrad:
        return RowGrad(ch[0], ch[1], aux, b)

    def eg_flat(e: ExampleGrads) -> tuple[tuple[Any, ...], Any]:
        return (e.example_ids, e.rows, e._base, e._factor, e._row_index), (e.batch_size, e.num_rows)

    def eg_unflat(aux: Any, ch: Any) -> ExampleGrads:
        return ExampleGrads(ch[0], ch[1], ch[2], aux[0], aux[1], b, row_index=ch[4], factor=ch[3])

    def lg_flat(g: JaxLayerGradients) -> tuple[tuple[Any, ...], Any]:
        return (g.calls, g.projections), (g.info, g._loss_reduction, g.batch_size, g._unknown_use,
                                          g.broadcast)

    def lg_unflat(aux: Any, ch: Any) -> JaxLayerGradients:
        info, red, B, unknown, spread = aux
        calls = [tuple(c) for c in ch[0]]
        return JaxLayerGradients(info, calls, b, red, B, [tuple(p) for p in ch[1]], unknown, spread)

    def gr_flat(g: Gradients) -> tuple[tuple[Any, ...], Any]:
        keys = tuple(g)
        return (tuple(g[k] for k in keys), g.sources), keys

    def gr_unflat(keys: Any, ch: Any) -> Gradients:
        return Gradients(dict(zip(keys, ch[0], strict=True)), ch[1])

    pairs: list[tuple[type, Any, Any]] = [
        (RowGrad, rg_flat, rg_unflat), (ExampleGrads, eg_flat, eg_unflat),
        (JaxLayerGradients, lg_flat, lg_unflat), (Gradients, gr_flat, gr_unflat)]
    for cls, fl, un in pairs:
        with contextlib.suppress(ValueError):   # already registered (module reloaded)
            tu.register_pytree_node(cls, fl, un)


def _backend() -> JaxBackend:
    from . import _load
    be = _load("embgrad.backends.jax", "JaxBackend")
    assert isinstance(be, JaxBackend)
    return be


_register_pytrees()


# ---------------------------------------------------------------------------- the probed copy
class _Recorder:
    """What one traced forward of the private model copy saw, per selected layer."""

    def __init__(self, names: dict[int, str], infos: dict[str, EmbeddingInfo],
                 probes: dict[str, list[Any]] | None, tables: dict[str, Any] | None):
        self.names = names                      # id(layer in the copy) -> layer name
        self.infos = infos
        self.probes = probes                    # name -> [probe per lookup call] (None: discovery)
        self.tables = tables                    # name -> table value the lookups read (discovery)
        self.lookups: dict[str, list[tuple[Any, Any]]] = {n: [] for n in infos}   # (ids, output)
        self.projections: dict[str, list[tuple[Any, Any]]] = {n: [] for n in infos}  # (query, logits)
        self.proj_probes: dict[str, list[Any]] | None = None

    def probe(self, name: str, kind: str, out: Any) -> Any:
        store = self.lookups if kind == "lookup" else self.projections
        k = len(store[name]) - 1
        if self.probes is None:
            return out
        probes = self.probes[name] if kind == "lookup" else (self.proj_probes or {}).get(name, [])
        if k >= len(probes) or probes[k].shape != out.shape:
            raise EmbgradError(
                f"layer {name!r}: the forward made a different number of {kind} calls, or of other "
                "shapes, when traced a second time; embgrad needs a forward whose structure does not "
                "change from one trace to the next (no Python state that changes between calls).")
        return out + probes[k].astype(out.dtype)


def _probed_class(cls: Any, rec: _Recorder) -> type:
    """A subclass of the ``nnx.Embed`` class ``cls`` that records its calls into ``rec``."""
    orig_call, orig_attend = cls.__call__, cls.attend

    @contextlib.contextmanager
    def own_table(self: Any, name: str) -> Any:
        """During discovery, the lookups read the table from their own input (so that any
        other read of the Param is visible in the jaxpr as a use of the Param's value)."""
        if rec.tables is None:
            yield
            return
        param = self.embedding
        other = param[...]
        param[...] = rec.tables[name]
        try:
            yield
        finally:
            param[...] = other

    def clone_error(self: Any) -> EmbgradError:
        return EmbgradError(
            f"an embedding layer embgrad probes ({type(self).__name__}) was called through a copy of "
            "itself: an NNX transform inside loss_fn (nnx.remat, nnx.scan, nnx.vmap, nnx.jit ...) "
            "splits and re-merges modules, and embgrad cannot see the copy's lookups. Fix: call the "
            "embedding outside the transform (look up the ids first, pass the vectors in), or jit the "
            "whole step around value_and_gradients instead.")

    def __call__(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        name = rec.names.get(id(self))
        if name is None:
            raise clone_error(self)
        V = rec.infos[name].num_rows
        ids = jnp.asarray(inputs)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise EmbgradError(f"layer {name!r}: ids must be integers, got dtype {ids.dtype}; cast "
                               "them with ids.astype(jnp.int32).")
        check_in_range(ids, V, f"embgrad: layer {name!r}: id {{bad}} is out of range for its table of "
                       f"{V} rows (nnx.Embed returns NaN for ids >= {V} and wraps negative ones). "
                       f"Fix: map the ids into 0..{V - 1} (e.g. unknown tokens to an <unk> id) before "
                       "the model.", low=-V)
        with own_table(self, name):
            out = orig_call(self, inputs, *args, **kwargs)
        wrapped = jnp.where(ids < 0, ids + V, ids).astype(_index_dtype())
        rec.lookups[name].append((wrapped, out))
        return rec.probe(name, "lookup", out)

    def attend(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        name = rec.names.get(id(self))
        if name is None:
            raise clone_error(self)
        with own_table(self, name):
            out = orig_attend(self, query, *args, **kwargs)
        rec.projections[name].append((query, out))
        return rec.probe(name, "projection", out)

    return type(cls.__name__, (cls,), {"__call__": __call__, "attend": attend,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _first_batch(args: Sequence[Any]) -> int | None:
    for leaf in jax.tree_util.tree_leaves(args):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    return None


# ---------------------------------------------------------------------------- Keras 3 on JAX
_FUNCTIONAL: contextvars.ContextVar[bool] = contextvars.ContextVar("embgrad_functional", default=False)


def _keras_jax_tap_guard() -> None:
    """Keras on JAX has no tape: its tap is installed by value_and_gradients only."""
    if not _FUNCTIONAL.get():
        raise EmbgradError(
            "embgrad.capture() needs a framework with a tape; Keras on the JAX backend has none. Use "
            "the functional entry point: loss, grads = embgrad.value_and_gradients(loss_fn, model, x, y) "
            "with loss_fn(model, x, y) -> scalar (works under jax.jit).")


def is_keras_on_jax(model: Any) -> bool:
    keras = sys.modules.get("keras")
    layer = getattr(keras, "Layer", None) if keras is not None else None
    if keras is None or not isinstance(layer, type) or not isinstance(model, layer):
        return False
    try:
        return bool(keras.backend.backend() == "jax")
    except AttributeError:
        return False


def _keras_value_and_gradients(loss_fn: Callable[..., Any], model: Any, args: Sequence[Any], layers: Any,
                               loss_reduction: str, batch_size: int | None) -> tuple[Any, Gradients]:
    """value_and_gradients for a Keras 3 model on the JAX backend: embgrad's Keras tap (the one
    ``capture`` uses on TensorFlow/torch, removed again before returning) adds a zero probe to
    each lookup's output while ``loss_fn(model, *args)`` runs; one ``jax.vjp`` with respect to the
    probes. Layers are keyed by name (a nested path also accepted), as in ``capture``."""
    from .keras_jax import KerasJaxBackend

    kb = KerasJaxBackend()
    given: dict[str, str] = {}
    infos = select_layers(kb, model, layers, given)
    names = [i.name for i in infos]

    def forward(probes: Any) -> Any:
        lookups: dict[str, list[tuple[Any, Any]]] = {n: [] for n in names}
        tied: set[str] = set()

        def on_call(call: Any) -> Any:
            n = call.info.name
            if call.role != "lookup":
                tied.add(n)      # a ReversibleEmbedding's tied projection: not differentiated here
                return None
            k = len(lookups[n])
            ids = jnp.asarray(call.ids).astype(_index_dtype())
            lookups[n].append((ids, call.output))
            if probes is None:
                replace = found.get("replace")
                if replace is None:
                    return None
                new = jnp.take(replace[n], ids, axis=0).astype(call.output.dtype)
                lookups[n][-1] = (ids, new)     # the shapes to return: not the original output
                return new
            ps = probes[n]
            if k >= len(ps) or ps[k].shape != call.output.shape:
                raise EmbgradError(f"layer {n!r}: the forward made a different number of lookups, or of "
                                   "other shapes, when traced a second time; embgrad needs a forward "
                                   "whose structure does not change from one trace to the next.")
            return call.output + ps[k].astype(call.output.dtype)

        token = _FUNCTIONAL.set(True)
        try:
            tap = kb.install_tap(model, infos, on_call)
        finally:
            _FUNCTIONAL.reset(token)
        try:
            loss = loss_fn(model, *args)
        finally:
            tap.remove()
        return loss, lookups, tied

    found: dict[str, Any] = {}
    import keras
    variables = {i.name: kb.table_variable(i) for i in infos}
    tables = {n: jnp.asarray(v.value) for n, v in variables.items()}

    def discover(tables_in: Any, params_in: Any) -> Any:
        # the variables read as params_in everywhere; the lookups' outputs are replaced by lookups
        # in tables_in: any read of params_in the loss still depends on is a use embgrad cannot see
        found["replace"] = tables_in
        with keras.StatelessScope(state_mapping=[(variables[n], params_in[n]) for n in names]):
            loss, lookups, tied = forward(None)
        found["tied"] = tied
        return loss, {n: [o for _, o in lookups[n]] for n in names}

    jaxpr, (loss_shape, out_shapes) = jax.make_jaxpr(discover, return_shape=True)(tables, tables)
    found.pop("replace", None)
    broadcast = _broadcast_lookups(jaxpr.jaxpr, (loss_shape, out_shapes), 1, names)
    n_tables = len(names)
    used = _used_vars(jaxpr.jaxpr)
    unseen = {n for n, v in zip(sorted(names), jaxpr.jaxpr.invars[n_tables:2 * n_tables], strict=True)
              if v in used}
    _check_loss(loss_shape)
    for n in names:
        if not out_shapes[n]:
            raise EmbgradError(f"layer {n!r} was not called by loss_fn, so it has no gradient; select the "
                               f"layers the forward uses with layers=[...] (found: {', '.join(names)}).")
    probes = {n: [jnp.zeros(sh.shape, sh.dtype) for sh in out_shapes[n]] for n in names}

    def objective(p: Any) -> Any:
        loss, lookups, _ = forward(p)
        return jnp.asarray(loss), {n: [i for i, _ in lookups[n]] for n in names}

    loss, vjp_fn, ids = jax.vjp(objective, probes, has_aux=True)
    (g_probes,) = vjp_fn(jnp.ones((), loss.dtype))
    B = batch_size if batch_size is not None else _first_batch(args)
    if B is None:
        B = int(ids[names[0]][0].shape[0]) if ids[names[0]][0].ndim else 1
    b = _backend()
    out: dict[str, LayerGradients] = {}
    for info in infos:
        n = info.name
        unknown = ("a ReversibleEmbedding's tied projection (reverse=True), whose part of the table's "
                   "gradient embgrad does not take on JAX yet" if n in found["tied"] else
                   "the forward reads the layer's embeddings variable directly" if n in unseen else None)
        out[n] = JaxLayerGradients(info, list(zip(ids[n], g_probes[n], strict=True)), b, loss_reduction, B,
                                   (), unknown, broadcast[n])
    return loss, Gradients(out, None, aliases=given)


def _check_loss(loss_shape: Any) -> None:
    if isinstance(loss_shape, (tuple, list)):
        raise EmbgradError(
            f"loss_fn returned a {type(loss_shape).__name__} of {len(loss_shape)} items; "
            "value_and_gradients needs loss_fn(model, *args) -> one scalar float loss (it has no "
            "has_aux=, unlike nnx.value_and_grad): return the loss alone, and compute auxiliary "
            "outputs (logits, metrics) from the model outside, or in a second call.")
    if isinstance(loss_shape, dict):
        raise EmbgradError(
            f"loss_fn returned a dict (keys {sorted(map(str, loss_shape))}); value_and_gradients "
            "needs loss_fn(model, *args) -> one scalar float loss: return the entry to "
            "differentiate, e.g. lambda m, *a: my_loss(m, *a)['loss'].")
    if not hasattr(loss_shape, "shape") or not hasattr(loss_shape, "dtype"):
        raise EmbgradError(
            f"loss_fn returned a {type(loss_shape).__name__} ({loss_shape!r:.60}), not a JAX array "
            "computed from the model: return the scalar loss of the model's output (a Python number "
            "does not depend on the model's tables).")
    if tuple(loss_shape.shape) != () or not jnp.issubdtype(loss_shape.dtype, jnp.floating):
        raise EmbgradError(
            f"loss_fn must return a scalar float loss, got shape {tuple(loss_shape.shape)} dtype "
            f"{loss_shape.dtype}; reduce it (e.g. .sum() over the batch, and pass "
            "loss_reduction='sum', or .mean() with loss_reduction='mean').")


# ---------------------------------------------------------------------------- the entry point
def value_and_gradients(loss_fn: Callable[..., Any], model: Any, *args: Any, layers: Any = None,
                        loss_reduction: str = "sum", batch_size: int | None = None,
                        sources: Any = None) -> tuple[Any, Gradients]:
    """See :func:`embgrad.value_and_gradients`."""
    if loss_reduction not in _REDUCTIONS:
        raise EmbgradError(f"loss_reduction must be 'sum' or 'mean' (how the loss combines the batch's "
                           f"examples), got {loss_reduction!r}.")
    if is_keras_on_jax(model):
        if sources is not None:
            raise EmbgradError("sources= is for Flax NNX models; for a Keras model differentiate "
                               "model.stateless_call yourself for the other variables.")
        return _keras_value_and_gradients(loss_fn, model, args, layers, loss_reduction, batch_size)
    nnx = _nnx()
    if nnx is None or not isinstance(model, nnx.Module):
        raise EmbgradError(
            f"value_and_gradients() takes a Flax NNX module as `model`, got {type(model).__name__}. "
            "(PyTorch, Keras and Gluon models use `with embgrad.capture(model) as cap: ...`.)")
    if not callable(loss_fn):
        raise EmbgradError(f"loss_fn must be a callable loss_fn(model, *args) -> scalar loss, got "
                           f"{type(loss_fn).__name__}.")
    if loss_reduction not in _REDUCTIONS:
        raise EmbgradError(f"loss_reduction must be 'sum' or 'mean' (how the loss combines the batch's "
                           f"examples), got {loss_reduction!r}.")
    b = _backend()
    infos = select_layers(b, model, layers)
    by_path = {info.options["path"]: info for info in infos}
    table_paths = {p + ("embedding",) for p in by_path}
    if sources is not None:
        pred = nnx.filterlib.to_predicate(sources)

        def src_filter(path: Any, value: Any) -> bool:
            return bool(pred(path, value)) and tuple(path) not in table_paths

        graphdef, src_state, rest = nnx.split(model, src_filter, ...)
    else:
        graphdef, rest = nnx.split(model)
        src_state = None
    old_leaves = {k: v for k, v in nnx.to_flat_state(rest)} if hasattr(nnx, "to_flat_state") else None

    def forward(state: Any, probes: Any, src: Any, tables: Any, proj_probes: Any) -> Any:
        m = nnx.merge(graphdef, src, state, copy=True) if src is not None else nnx.merge(graphdef, state, copy=True)
        names: dict[int, str] = {}
        for path, node in nnx.iter_graph(m):
            info = by_path.get(tuple(path))
            if info is not None and isinstance(node, nnx.Embed):
                names[id(node)] = info.name
        rec = _Recorder(names, {i.name: i for i in infos}, probes, tables)
        rec.proj_probes = proj_probes
        classes: dict[type, type] = {}
        for _, node in nnx.iter_graph(m):
            if id(node) in names:
                cls = type(node)
                if cls not in classes:
                    classes[cls] = _probed_class(cls, rec)
                object.__setattr__(node, "__class__", classes[cls])
        loss = loss_fn(m, *args)
        return loss, rec, nnx.state(m, nnx.Not(nnx.Param))

    # 1. discovery: shapes of every lookup / projection, and reads of a table outside them (the
    # Params hold `params_in`, the lookups read `tables_in`: a use of params_in is unseen)
    names = [i.name for i in infos]
    tables = {i.name: i.layer.embedding[...] for i in infos}

    def discover(tables_in: Any, params_in: Any) -> Any:
        state = _replace_tables(nnx, rest, by_path, params_in)
        loss, rec, _ = forward(state, None, src_state, tables_in, None)
        return loss, {n: [o for _, o in rec.lookups[n]] for n in names}, \
            {n: [o for _, o in rec.projections[n]] for n in names}

    jaxpr, shapes = jax.make_jaxpr(discover, return_shape=True)(tables, tables)
    n_tables = len(jax.tree_util.tree_leaves(tables))
    param_vars = jaxpr.jaxpr.invars[n_tables:2 * n_tables]
    used = _used_vars(jaxpr.jaxpr)
    unseen = {name for name, v in zip(sorted(tables), param_vars, strict=True) if v in used}
    loss_shape, out_shapes, proj_shapes = shapes
    _check_loss(loss_shape)
    missing = [n for n in names if not out_shapes[n] and not proj_shapes[n]]
    # lookups whose output is broadcast with new leading dimensions (a (T,) position lookup added
    # to (B, T, D) vectors): their first axis is not the batch, even when its size equals B
    broadcast = _broadcast_lookups(jaxpr.jaxpr, shapes, 1, names)

    # 2. one backward pass with respect to zero probes (and the `sources` parameters)
    probes = {n: [jnp.zeros(s.shape, s.dtype) for s in out_shapes[n]] for n in names}
    pprobes = {n: [jnp.zeros(s.shape, s.dtype) for s in proj_shapes[n]] for n in names}

    def objective(p: Any, pp: Any, src: Any) -> Any:
        loss, rec, state = forward(rest, p, src, None, pp)
        loss = jnp.asarray(loss)          # a Python number: a constant loss, zero gradients
        ids = {n: [i for i, _ in rec.lookups[n]] for n in names}
        queries = {n: [q for q, _ in rec.projections[n]] for n in names}
        return loss, (ids, queries, state)

    loss, vjp_fn, (ids, queries, new_state) = jax.vjp(objective, probes, pprobes, src_state, has_aux=True)
    g_probes, g_pprobes, g_src = vjp_fn(jnp.ones((), loss.dtype))

    # 3. the user's own forward's state updates (rng counters, batch stats), as nnx.value_and_grad
    _propagate_state(nnx, model, new_state, old_leaves)

    B = batch_size if batch_size is not None else _first_batch(args)
    if B is None:
        first = ids[names[0]][0] if ids[names[0]] else None
        B = int(first.shape[0]) if first is not None and first.ndim else 1
    out: dict[str, LayerGradients] = {}
    for info in infos:
        n = info.name
        if n in missing:
            raise EmbgradError(
                f"layer {n!r} was not called by loss_fn (no lookup and no attend), so it has no "
                f"gradient; select the layers the forward uses with layers=[...] (found: "
                f"{', '.join(names)}).")
        calls = list(zip(ids[n], g_probes[n], strict=True))
        projections = list(zip(queries[n], g_pprobes[n], strict=True))
        unknown = ("the forward reads the table's nnx.Param directly" if n in unseen else None)
        if not calls:
            raise EmbgradError(f"layer {n!r} was only used by attend(), never looked up; embgrad's "
                               "gradients describe lookups (select the layers that look up ids).")
        out[n] = JaxLayerGradients(info, calls, b, loss_reduction, B, projections, unknown, broadcast[n])
    return loss, Gradients(out, g_src if sources is not None else None)


def _replace_tables(nnx: Any, rest: Any, by_path: dict[tuple, EmbeddingInfo], tables: dict[str, Any]) -> Any:
    """``rest`` (an nnx.State) with each selected table's value replaced by ``tables[name]``."""
    flat = nnx.to_flat_state(rest)
    repl = {info.options["path"] + ("embedding",): tables[info.name] for info in by_path.values()}
    items = []
    for path, var in flat:
        if tuple(path) in repl:
            var = var.replace(repl[tuple(path)])
        items.append((path, var))
    return nnx.from_flat_state(items)


def _sub_jaxpr(eqn: Any) -> Any:
    """The inner jaxpr of a call-like equation (jit, closed_call, custom_jvp/vjp) whose inputs
    and outputs are the equation's, else None (scan, cond, while: not followed)."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        sub = getattr(sub, "jaxpr", sub)
        if sub is not None and hasattr(sub, "eqns") and len(sub.invars) == len(eqn.invars) \
                and len(sub.outvars) == len(eqn.outvars):
            return sub
    return None


def _reshaped_axis(shape_in: tuple[int, ...], shape_out: tuple[int, ...], axis: int) -> int | None:
    """Where axis ``axis`` of ``shape_in`` lands after a reshape to ``shape_out`` when the reshape
    keeps it whole (same size, same product of the sizes before it), else None."""
    before = int(np.prod(shape_in[:axis], dtype=np.int64))
    prefix = 1
    for k, size in enumerate(shape_out):
        if prefix == before and size == shape_in[axis]:
            return k
        prefix *= size
    return None


def _moves_off_axis0(jaxpr: Any, tracked: dict[Any, int]) -> bool:
    """Whether a value derived from the tracked variables (var -> position of a lookup output's
    first axis) is broadcast with new dimensions put before that axis: e.g. a (T, D) position
    lookup added to (B, T, D) token vectors (broadcast_in_dim to (1, T, D) or (B, T, D)), which
    shows that the lookup's first axis is not the batch even when T == B. Follows elementwise
    operations (same shape), broadcasts, reshapes that keep the axis whole, transposes and
    call-like sub-jaxprs; stops following at anything else (reductions, matmuls that change the
    shape, control flow)."""
    for eqn in jaxpr.eqns:
        ins = [(v, tracked[v]) for v in eqn.invars
               if not isinstance(v, jax.extend.core.Literal) and v in tracked]
        if not ins:
            continue
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            inner = {iv: tracked[ov] for ov, iv in zip(eqn.invars, sub.invars, strict=True)
                     if not isinstance(ov, jax.extend.core.Literal) and ov in tracked}
            if _moves_off_axis0(sub, inner):
                return True
            for iv, ov in zip(sub.outvars, eqn.outvars, strict=True):
                if not isinstance(iv, jax.extend.core.Literal) and iv in inner:
                    tracked[ov] = inner[iv]
            continue
        var, axis = ins[0]
        shape_in = tuple(var.aval.shape)
        name = eqn.primitive.name
        for out in eqn.outvars:
            shape_out = tuple(getattr(out.aval, "shape", ()))
            new: int | None = None
            if name == "broadcast_in_dim":
                new = int(eqn.params["broadcast_dimensions"][axis])
            elif name == "reshape":
                new = _reshaped_axis(shape_in, shape_out, axis)
            elif name == "transpose":
                new = list(eqn.params["permutation"]).index(axis)
            elif shape_out == shape_in:
                new = axis
            elif len(shape_out) > len(shape_in) and shape_out[len(shape_out) - len(shape_in):] == shape_in:
                return True                                     # implicit rank promotion: dims put before it
            if new is None:
                continue
            if name == "broadcast_in_dim" and new > axis:
                return True
            tracked[out] = new
    return False


def _broadcast_lookups(jaxpr: Any, shapes: Any, part: int, names: Sequence[str]) -> dict[str, tuple[bool, ...]]:
    """Per layer, per lookup call: whether the discovery trace ``jaxpr`` (whose outputs are the
    leaves of ``shapes``, the lookups' outputs in ``shapes[part][name]``) broadcasts the lookup's
    output with new dimensions before its first axis, so that axis is not the batch."""
    leaf_ix = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), range(len(jaxpr.outvars)))
    return {n: tuple(_moves_off_axis0(jaxpr, {jaxpr.outvars[k]: 0}) for k in leaf_ix[part][n]) for n in names}


def _used_vars(jaxpr: Any) -> set[Any]:
    """Variables of ``jaxpr`` that its outputs depend on (a backward liveness pass; an equation
    with side effects, or a nested call whose output is live, keeps all its inputs live)."""
    live: set[Any] = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
    for eqn in reversed(jaxpr.eqns):
        if getattr(eqn, "effects", None) or any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal))
    return live


def _propagate_state(nnx: Any, model: Any, new_state: Any, old_leaves: Any) -> None:
    """Write back the non-parameter variables the user's forward changed (as ``nnx.value_and_grad``
    does); nothing at all when it changed none."""
    if old_leaves is None:
        return
    changed = []
    for path, var in nnx.to_flat_state(new_state):
        old = old_leaves.get(path)
        if old is None or var.get_value() is not old.get_value():
            changed.append((path, var))
    if changed:
        nnx.update(model, nnx.from_flat_state(changed))
