"""MXNet Gluon backend: finds ``gluon.nn.Embedding`` blocks, taps them by wrapping their
``forward`` (restored afterwards); its tensor primitives are :mod:`embgrad.backends.gluon_ops`.

MXNet cannot differentiate with respect to an intermediate array, so during capture the tap
adds to each recorded lookup's output a zero array marked as a variable (``attach_grad``):
``autograd.grad(loss, [that zero])`` is dLoss/d(looked-up vectors), and the table still gets
its gradient through the lookup. A hybridized parent runs a cached graph that never calls a
child's Python ``forward``, so while a capture is active the hybridized ancestors of the tapped
blocks run imperatively (their ``_active`` flag is lowered and restored, cached graphs kept).

Tensors: the core's results are ``mxnet.numpy.ndarray`` (a subclass of ``NDArray``;
``.as_nd_ndarray()`` is a zero-copy legacy view); ``ids`` and ``output_grad`` keep the type the
model used. Legacy ``NDArray`` lacks ``//`` and ``&``, hence ``mxnet.numpy`` inside.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (1, 24):  # pragma: no cover
    # numpy 1.24 removed the aliases (np.bool, np.int, ...) that mxnet 1.9 uses
    raise ImportError(
        f"mxnet 1.9 needs numpy<1.24 (it uses np.bool), but numpy {np.__version__} is installed: "
        "use the .venv-gluon environment (`make test-gluon`), pinned by constraints-gluon.txt.")

import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.base import MXNetError  # noqa: E402

from ..errors import EmbgradError  # noqa: E402
from .base import Call, EmbeddingInfo, ModelAdapter, Tap  # noqa: E402
from .gluon_ops import GluonOps, _as_nd, _as_np, _like  # noqa: E402

__all__ = ["GluonBackend"]

_mnp = mx.np


def _embedding_types() -> tuple[Any, ...]:
    from mxnet.gluon.contrib.nn import SparseEmbedding
    return (gluon.nn.Embedding, SparseEmbedding)


def _zeros_like_var(out: Any) -> Any:
    """A zero array like ``out`` (same array type, dtype and context), marked as a variable."""
    mod = _mnp if isinstance(out, _mnp.ndarray) else nd
    z = mod.zeros(out.shape, dtype=out.dtype, ctx=out.ctx)
    z.attach_grad()
    return z


# ---------------------------------------------------------------------------- validation
def _validate_ids(info: EmbeddingInfo, ids: Any) -> None:
    """Refuse ids MXNet would silently truncate (floats) or clip (out of range)."""
    if isinstance(ids, mx.sym.Symbol):
        raise EmbgradError(
            f"layer {info.name!r} received a Symbol: it is being traced into a static graph "
            "(hybridize/export), where embgrad cannot record lookups. Run the model on NDArrays "
            "inside `with embgrad.capture(...)`.")
    if not isinstance(ids, nd.NDArray):
        raise EmbgradError(f"layer {info.name!r}: ids must be an MXNet NDArray of integer ids, "
                           f"got {type(ids).__name__}.")
    dt = np.dtype(ids.dtype)
    if dt.kind not in "iuf":
        raise EmbgradError(
            f"layer {info.name!r}: ids have dtype {dt.name}; pass integer ids (ids.astype('int64'), "
            f"whole numbers in [0, {info.num_rows})).")
    if ids.size == 0:
        return    # an empty batch (MXNet makes them under np_shape semantics): empty results
    flat = _as_nd(ids).reshape((-1,))
    if dt.kind == "f":
        _check_float_ids(info, ids, flat, dt)
    lo, hi = int(nd.min(flat).asscalar()), int(nd.max(flat).asscalar())
    if lo < 0 or hi >= info.num_rows:
        bad = lo if lo < 0 else hi
        pos = tuple(int(i) for i in np.argwhere(ids.asnumpy() == bad)[0])
        raise EmbgradError(
            f"layer {info.name!r}: id {bad} at position {pos} is out of range for a table of "
            f"{info.num_rows} rows (valid ids are 0..{info.num_rows - 1}); MXNet would silently "
            "clip it to the nearest valid row. Check the vocabulary size against the Embedding's "
            "input_dim, or map unknown tokens to an UNK id.")


def _check_float_ids(info: EmbeddingInfo, ids: Any, flat: nd.NDArray, dt: np.dtype) -> None:
    """Float ids are MXNet's convention (``nd.array`` makes float32): accepted when every id is
    a whole number below the dtype's exact-integer limit (2**11 float16, 2**24 float32, 2**53
    float64; past it neighbouring integers share one float, so the id the user meant is lost).
    MXNet's Embedding would truncate a fractional id silently."""
    limit = 2 ** (np.finfo(dt).nmant + 1)
    whole = nd.floor(flat) == flat
    if int(nd.min(whole).asscalar()) == 0:
        a = ids.asnumpy()
        pos = tuple(int(i) for i in np.argwhere(np.floor(a) != a)[0])
        raise EmbgradError(
            f"layer {info.name!r}: id {a[pos]!r} at position {pos} is not a whole number (ids have "
            f"dtype {dt.name}); MXNet's Embedding would truncate it silently. Pass whole-number ids, "
            "e.g. nd.array(ids, dtype='int64').")
    if float(nd.max(nd.abs(flat)).asscalar()) >= limit:
        a = ids.asnumpy()
        pos = tuple(int(i) for i in np.argwhere(np.abs(a) >= limit)[0])
        raise EmbgradError(
            f"layer {info.name!r}: id {a[pos]!r} at position {pos} is at or past 2**{int(np.log2(limit))}, "
            f"where {dt.name} cannot hold every integer (the id you meant may have been rounded). "
            "Pass the ids as integers: nd.array(ids, dtype='int64').")


# ---------------------------------------------------------------------------- model walk
def _walk(model: gluon.Block) -> Iterator[tuple[str, gluon.Block]]:
    """Every block under ``model`` once, as ``(child path, block)``; the path joins the
    registration names (attribute names, Sequential indices) with dots, '' for the model."""
    seen: set[int] = set()
    stack: list[tuple[str, gluon.Block]] = [("", model)]
    while stack:
        path, blk = stack.pop()
        if id(blk) in seen:
            continue
        seen.add(id(blk))
        yield path, blk
        for key, child in reversed(list(blk._children.items())):
            stack.append((f"{path}.{key}" if path else str(key), child))


def _hybrid_active(blk: gluon.Block) -> bool:
    return isinstance(blk, gluon.HybridBlock) and bool(blk._active)


def _ancestors_of(model: gluon.Block, layers: Sequence[Any]) -> list[gluon.Block]:
    """Every block on any path from ``model`` down to one of ``layers`` (duplicates removed)."""
    out: dict[int, gluon.Block] = {}
    # a block shared under several parents is reached once by _walk; collect parents directly
    parents: dict[int, list[gluon.Block]] = {}
    for _, blk in _walk(model):
        for child in blk._children.values():
            parents.setdefault(id(child), []).append(blk)
    todo = [id(x) for x in layers]
    while todo:
        for p in parents.get(todo.pop(), []):
            if id(p) not in out:
                out[id(p)] = p
                todo.append(id(p))
    return list(out.values())


# ---------------------------------------------------------------------------- tap
class _GluonCall(Call):
    """A recorded lookup; ``grad`` also reads what the user's own ``loss.backward()`` wrote
    into the capture variable, so ``cap.gradients()`` works after a plain backward."""

    @property
    def grad(self) -> Any:
        g = self.__dict__.get("_grad")
        if g is not None:
            return g
        var = self.meta.get("var")
        if var is not None and var._fresh_grad:
            return var.grad
        return None

    @grad.setter
    def grad(self, value: Any) -> None:
        self.__dict__["_grad"] = value


class _GluonTap(Tap):
    def __init__(self, model: Any = None) -> None:
        self._patched: list[gluon.Block] = []
        self._deactivated: list[gluon.Block] = []
        self._freed = False          # an earlier grad() without retain_graph freed the graph
        blocks = [blk for _, blk in _walk(model)] if isinstance(model, gluon.Block) else []
        from mxnet.gluon.nn import BatchNorm, Dropout
        # MXNet's BatchNorm updates its running statistics in BACKWARD (train mode): embgrad's own
        # backward must leave them as they were (the user's backward updates them, as without it)
        self._stats = [p for blk in blocks if isinstance(blk, BatchNorm)
                       for p in (blk.running_mean, blk.running_var)]
        self._dropouts = [blk.name for blk in blocks if isinstance(blk, Dropout)]

    def remove(self) -> None:
        for blk in self._patched:
            blk.__dict__.pop("forward", None)
        for blk in self._deactivated:
            object.__setattr__(blk, "_active", True)
        self._patched, self._deactivated = [], []

    def grad(self, loss, calls, sources=None, retain_graph=False):
        variables = []
        for c in calls:
            var = c.meta.get("var")
            if var is None:
                raise EmbgradError(
                    f"layer {c.info.name!r} ran outside `autograd.record()`, so MXNet kept no graph "
                    "for it: run the forward (and the loss) inside `with autograd.record():`.")
            variables.append(var)
        srcs = [_source_array(s) for s in (sources or [])]
        train_mode = bool(calls[0].meta.get("train_mode", True)) if calls else True
        if retain_graph and train_mode and self._dropouts:
            raise EmbgradError(
                f"the model has Dropout ({', '.join(self._dropouts)}) in training mode, and MXNet's "
                "Dropout frees its mask in the first backward pass over a graph: a second backward "
                "(your loss.backward() after cap.gradients(loss, retain_graph=True)) would get "
                "gradient 1 through it, silently. Call loss.backward() first and then "
                "cap.gradients() without a loss (it reads the gradients your backward produced), or "
                "record the forward with autograd.record(train_mode=False).")
        targets = variables + srcs
        saved = [(p, [d.copy() for d in p.list_data()]) for p in self._stats]
        try:
            return self._grad(loss, variables, targets, sources, retain_graph, train_mode)
        finally:
            for p, data in saved:          # BatchNorm statistics as before embgrad's backward
                for d, old in zip(p.list_data(), data, strict=True):
                    old.copyto(d)

    def _grad(self, loss: Any, variables: list[Any], targets: list[Any], sources: Any,
              retain_graph: bool, train_mode: bool) -> tuple[list[Any], list[Any] | None]:
        try:
            grads = autograd.grad(loss, targets, retain_graph=retain_graph, train_mode=train_mode)
        except MXNetError as e:
            msg = str(e)
            if "not in a computational graph" in msg and (
                    self._freed or any(v._fresh_grad for v in variables)):
                raise EmbgradError(
                    "MXNet already freed this forward's graph: an earlier cap.gradients(loss) or "
                    "loss.backward() ran without retain_graph=True. Pass retain_graph=True to the "
                    "earlier call (or call loss.backward() last, then cap.gradients() without a "
                    "loss).") from None
            if "not in a computational graph" in msg:
                raise EmbgradError(
                    "the loss was not recorded by MXNet autograd (computed outside "
                    "`with autograd.record():`, or under autograd.pause()), so nothing can be "
                    "differentiated. Compute the loss inside `autograd.record()`.") from None
            if "unreachable" not in msg:
                raise
            reached = [_reaches(loss, v, train_mode) for v in variables]
            if not any(reached):
                # none is reached (a loss from a forward run before or outside the block): the
                # core refuses, with the same message on every backend
                return [None] * len(variables), ([None] * (len(targets) - len(variables))
                                                 if sources is not None else None)
            # some outputs do not reach the loss: their gradient is zero (arrays of the type of
            # the reached ones, which the core keeps as they are). Tie every target
            # to the loss with a zero weight so MXNet can return them all.
            with autograd.record(train_mode=train_mode):
                head = loss
                for t in targets:
                    term = (t * 0).sum()
                    head = head + (term.reshape(head.shape) if term.shape != head.shape else term)
            grads = autograd.grad(head, targets, retain_graph=retain_graph, train_mode=train_mode)
        self._freed = self._freed or not retain_graph
        grads = [_like(g, t) for g, t in zip(grads, targets, strict=True)]   # autograd.grad gives legacy arrays
        return grads[:len(variables)], (grads[len(variables):] if sources is not None else None)


class _ForwardTap(Tap):
    """Puts back what ``model.forward`` was before the forward tap (idempotent)."""

    def __init__(self, model: Any, fn: Callable, prev: Any) -> None:
        self.model, self.fn, self.prev = model, fn, prev

    def remove(self) -> None:
        if self.model is None:
            return
        d = self.model.__dict__
        if d.get("forward") is self.fn:
            if self.prev is None:
                d.pop("forward", None)
            else:
                object.__setattr__(self.model, "forward", self.prev)
        self.model = None


def _reaches(loss: Any, var: Any, train_mode: bool) -> bool:
    """Whether ``loss`` depends on ``var`` (a backward pass that keeps the graph)."""
    try:
        autograd.grad(loss, [var], retain_graph=True, train_mode=train_mode)
    except MXNetError as e:
        if "unreachable" in str(e):
            return False
        raise
    return True


def _source_array(s: Any) -> Any:
    """The array autograd differentiates for a ``sources=`` entry (a Parameter or a variable)."""
    if isinstance(s, gluon.Parameter):
        if s.grad_req == "null":
            raise EmbgradError(f"source parameter {s.name!r} has grad_req='null'; MXNet keeps no "
                               "gradient for it. Set its grad_req to 'write' before the forward.")
        return s.list_data()[0]
    if isinstance(s, nd.NDArray):
        return s
    raise EmbgradError(f"sources= takes Gluon Parameters or NDArrays marked with attach_grad(), "
                       f"got {type(s).__name__}.")


# ---------------------------------------------------------------------------- frozen rows
class _RowGuard:
    """Rows of one table kept out of a ``gluon.Trainer``'s updates: before each ``step`` /
    ``update`` their gradient is zeroed (dense gradients) and their values saved, afterwards
    the values are written back bit for bit (weight decay and momentum included). The trainer's
    ``step``/``update`` are wrapped per instance while any guard is active."""

    _active: weakref.WeakKeyDictionary[gluon.Trainer, list[_RowGuard]] = weakref.WeakKeyDictionary()

    def __init__(self, trainer: gluon.Trainer, weight: gluon.Parameter, rows: np.ndarray):
        self.trainer, self.weight, self.rows = trainer, weight, rows
        guards = self._active.setdefault(trainer, [])
        if not guards:
            for name in ("step", "update"):
                object.__setattr__(trainer, name, _guarded(trainer, getattr(type(trainer), name)))
        guards.append(self)

    def remove(self) -> None:
        guards = self._active.get(self.trainer)
        if guards is None or self not in guards:
            return
        guards.remove(self)
        if not guards:
            del self._active[self.trainer]
            for name in ("step", "update"):
                self.trainer.__dict__.pop(name, None)

    def _before(self) -> list[tuple[Any, Any, Any]]:
        saved = []
        with autograd.pause():
            for d, g in zip(self.weight.list_data(), self.weight.list_grad(), strict=True):
                idx = nd.array(self.rows, dtype="int64", ctx=d.ctx)
                if g.stype == "default":
                    g[idx] = 0
                saved.append((d, idx, nd.take(d, idx)))
        return saved


def _guarded(trainer: gluon.Trainer, method: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        saved = [s for guard in list(_RowGuard._active.get(trainer, [])) for s in guard._before()]
        try:
            return method(trainer, *args, **kwargs)
        finally:
            with autograd.pause():
                for d, idx, vals in saved:
                    d[idx] = vals
    return call


# ---------------------------------------------------------------------------- backend
class GluonBackend(ModelAdapter):
    name = "gluon"
    framework_module = "mxnet"
    searched_types = "gluon.nn.Embedding and gluon.contrib.nn.SparseEmbedding blocks"
    ops = GluonOps()
    no_grad_hint = "outside `with autograd.record():`, or under autograd.pause()"

    def is_appropriate(self, obj: Any) -> bool:
        return isinstance(obj, (nd.NDArray, gluon.Block, gluon.Parameter))

    # ------------------------------------------------------------------ surgery
    def find_embeddings(self, model: Any) -> dict[str, EmbeddingInfo]:
        if not isinstance(model, gluon.Block):
            raise EmbgradError(f"expected an MXNet Gluon Block, got {type(model).__name__}.")
        if isinstance(model, gluon.SymbolBlock):
            raise EmbgradError(
                f"{model.name!r} is a SymbolBlock (a graph imported from a symbol file): it has no "
                "Python Embedding blocks whose lookups embgrad could record. Capture the Python "
                "model it was exported from (un-hybridized or hybridized).")
        owners: dict[int, list[gluon.Block]] = {}
        blocks = list(_walk(model))
        for _, blk in blocks:
            for p in blk._reg_params.values():
                owners.setdefault(id(p), []).append(blk)
        infos: dict[str, EmbeddingInfo] = {}
        for path, blk in blocks:
            if not isinstance(blk, _embedding_types()):
                continue
            w = blk.weight
            V, D = int(blk._kwargs["input_dim"]), int(blk._kwargs["output_dim"])
            tied = any(o is not blk for o in owners.get(id(w), []))
            name = blk.name if blk.name not in infos else f"{blk.name}@{path}"
            infos[name] = EmbeddingInfo(
                name=name, layer=blk, num_rows=V, dim=D, tied=tied,
                frozen=w.grad_req == "null", weight=w,
                options={"sparse": w._grad_stype == "row_sparse", "path": path})
        return infos

    def match_name(self, key: str, found: dict[str, EmbeddingInfo]) -> EmbeddingInfo | None:
        """Also accept the child path (``"encoder.emb"``, ``"0"``) or a name's last part."""
        for info in found.values():
            if key == info.options.get("path"):
                return info
        hits = [i for i in found.values() if i.name.endswith("_" + key)]
        return hits[0] if len(hits) == 1 else None

    def install_tap(self, model, infos, on_call, active=None):
        tap = _GluonTap(model)
        try:
            # an active ancestor would run its cached graph and bypass the tap; everything
            # under it then runs imperatively, without building cached graphs of its own
            tops = [b for b in _ancestors_of(model, [i.layer for i in infos]) if _hybrid_active(b)]
            for top in tops:
                for _, blk in _walk(top):
                    if _hybrid_active(blk):
                        object.__setattr__(blk, "_active", False)
                        tap._deactivated.append(blk)
            for info in infos:
                blk = info.layer
                if "forward" in blk.__dict__:
                    raise EmbgradError(
                        f"layer {info.name!r} already has a patched forward (another capture of the "
                        "same layer is active?); capture contexts on one layer do not nest.")
                object.__setattr__(blk, "forward", self._forward(info, blk.forward, on_call, active))
                tap._patched.append(blk)
        except BaseException:
            tap.remove()
            raise
        return tap

    @staticmethod
    def _forward(info: EmbeddingInfo, orig: Callable, on_call: Callable[[Call], Any],
                 active: Callable[[], bool] | None = None) -> Callable:
        def forward(x, *args):
            if active is not None and not active():
                return orig(x, *args)     # another thread's / context's forward: not ours
            _validate_ids(info, x)
            out = orig(x, *args)
            recording = autograd.is_recording()
            # the core sees an mxnet.numpy view of the output; the model gets its own type back
            # whole-valued float ids (MXNet's convention, checked exact above) recorded as int64
            rec = x if np.dtype(x.dtype).kind in "iu" else x.astype("int64")
            call = _GluonCall(info=info, ids=rec, output=_as_np(out), grad_enabled=recording)
            call.meta["train_mode"] = autograd.is_training()
            replaced = on_call(call)
            if replaced is not None:
                if tuple(replaced.shape) != tuple(out.shape):
                    raise EmbgradError(
                        f"layer {info.name!r}: the replacement output has shape "
                        f"{tuple(replaced.shape)}, the layer's is {tuple(out.shape)}.")
                out = _like(replaced, out)
                call.output = _as_np(out)      # the model goes on with the replacement
            if recording:
                var = _zeros_like_var(out)
                out = out + var
                call.meta["var"] = var
            return out
        return forward

    def install_forward_tap(self, model, on_start, on_end):
        """Each call of ``model`` is one forward: its ``forward`` is wrapped (an instance
        attribute, as the lookup tap's; when the model is the tapped embedding itself, this
        wraps the tap's). ``on_start`` gets the shape of the first NDArray argument."""
        if not isinstance(model, gluon.Block):
            return None
        prev = model.__dict__.get("forward")
        inner = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, nd.NDArray)), None)
            on_start(tuple(int(d) for d in first.shape) if first is not None else None)
            try:
                return inner(*args, **kwargs)
            finally:
                on_end()

        object.__setattr__(model, "forward", forward)
        return _ForwardTap(model, forward, prev)

    def coupling_layers(self, model):
        from mxnet.gluon.nn import BatchNorm
        return [blk.name for _, blk in _walk(model)
                if isinstance(blk, BatchNorm) and not blk._kwargs.get("use_global_stats", False)]

    def scalar_loss(self, loss):
        if not isinstance(loss, nd.NDArray):
            raise EmbgradError(f"loss must be a scalar MXNet NDArray, got {type(loss).__name__}.")
        if loss.size != 1:
            raise EmbgradError(
                f"loss must be a scalar, got an array of shape {tuple(loss.shape)}; reduce it with "
                ".sum() or .mean() and pass loss_reduction='sum' or 'mean' accordingly.")
        return loss

    # ------------------------------------------------------------------ differentiation
    def value_and_grads(self, fn):
        # attribution explains the model as it predicts: recorded in predict mode (no dropout)
        watched: list[Any] = []

        def watch(t: Any) -> Any:
            with autograd.pause():
                leaf = _as_np(t).copy()
            leaf.attach_grad()
            watched.append(leaf)
            return leaf

        with autograd.record(train_mode=False):
            y = _as_np(fn(watch))
            if len(watched) != 1:
                raise EmbgradError(f"value_and_grads: fn watched {len(watched)} arrays, expected exactly one.")
            heads = [y[:, k].sum() for k in range(int(y.shape[1]))]
        x = watched[0]
        grads = []
        for k, head in enumerate(heads):
            try:
                (g,) = autograd.grad(head, [x], retain_graph=k < len(heads) - 1, train_mode=False)
                g = _as_np(g)
            except MXNetError as e:
                if "unreachable" not in str(e):
                    raise
                g = _mnp.zeros(x.shape, dtype=x.dtype, ctx=x.ctx)   # y does not depend on x
            grads.append(g)
        with autograd.pause():
            y = y.copy()
        return y, grads

    def embed(self, info, ids):
        blk = info.layer
        # the class's forward: an instance-level capture patch must not record this lookup
        with autograd.pause():
            out = type(blk).forward(blk, _like(ids, blk.weight.data()))
        return _as_np(out)

    # ------------------------------------------------------------------ tables (embgrad.table)
    def table_variable(self, info):
        return info.layer.weight

    def table_quantized(self, info):
        w = info.layer.weight
        if w._stype != "default":
            return f"its weight is stored {w._stype} (SparseEmbedding); use gluon.nn.Embedding"
        if np.dtype(w.dtype).kind != "f":
            return f"its weight has dtype {np.dtype(w.dtype).name}"
        return None

    def table_gather(self, info, rows, effective=False):
        w = info.layer.weight
        if w._stype != "default":
            raise EmbgradError(f"table {info.name!r}: {self.table_quantized(info)}.")
        return self.ops.gather(_as_np(w.data()), rows)

    def table_write(self, info, rows, values):
        w = info.layer.weight
        with autograd.pause():
            for d in w.list_data():          # every context holds a copy of the table
                d[nd.array(rows, dtype="int64", ctx=d.ctx)] = nd.array(values, dtype=d.dtype, ctx=d.ctx)

    def table_freeze(self, info, rows, optimizer=None):
        if not isinstance(optimizer, gluon.Trainer):
            raise EmbgradError(
                f"table {info.name!r}: Gluon parameters have no gradient hooks, so embgrad keeps rows "
                "frozen through the optimizer: pass optimizer=trainer (the gluon.Trainer that updates "
                f"this model), got {type(optimizer).__name__}. To freeze the whole table set "
                "weight.grad_req = 'null'.")
        w = info.layer.weight
        if not any(p is w for p in optimizer._params):
            raise EmbgradError(f"table {info.name!r}: the given Trainer does not update this table's "
                               f"parameter {w.name!r}; pass the Trainer built on this model's parameters.")
        return _RowGuard(optimizer, w, np.asarray(rows, dtype=np.int64))
