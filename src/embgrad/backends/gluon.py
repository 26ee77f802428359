"""MXNet Gluon backend: finds ``gluon.nn.Embedding`` blocks, taps them by wrapping their
``forward`` (restored afterwards), and implements the tensor primitives with ``mxnet.numpy``.

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
from typing import Any, Callable, Iterator, Sequence

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
from .base import Backend, Call, EmbeddingInfo, Tap  # noqa: E402

__all__ = ["GluonBackend"]

_mnp = mx.np


def _embedding_types() -> tuple[Any, ...]:
    from mxnet.gluon.contrib.nn import SparseEmbedding
    return (gluon.nn.Embedding, SparseEmbedding)


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
    if isinstance(like, gluon.Parameter):
        return like.list_ctx()[0]
    return mx.current_context()


def _np_shape() -> Any:
    """NumPy shape semantics (zero-size arrays allowed) for primitives that may produce them."""
    return mx.util.np_shape(True)


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
        raise EmbgradError(f"layer {info.name!r}: empty batch (ids of shape {tuple(ids.shape)}); "
                           "there is nothing to look up. Pass at least one example with one token.")
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
            if not any(_reaches(loss, v, train_mode) for v in variables):
                raise EmbgradError(
                    "the loss does not depend on any lookup recorded by this capture (it was computed "
                    "from a forward run before or outside the `with embgrad.capture(...)` block): its "
                    "gradient would be zero everywhere. Compute the loss from the outputs of the "
                    "forward run inside the block.") from None
            # some outputs do not reach the loss: their gradient is zero. Tie every target
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

    _active: "weakref.WeakKeyDictionary[gluon.Trainer, list[_RowGuard]]" = weakref.WeakKeyDictionary()

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
class GluonBackend(Backend):
    name = "gluon"
    framework_module = "mxnet"
    searched_types = "gluon.nn.Embedding and gluon.contrib.nn.SparseEmbedding blocks"
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
            if recording:
                var = _zeros_like_var(out)
                out = out + var
                call.meta["var"] = var
            return out
        return forward

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

    # ------------------------------------------------------------------ tensor primitives
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

    # ------------------------------------------------------------------ attribution
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

    def pick(self, x, idx):
        return nd.pick(_as_nd(_as_np(x)), _as_nd(_as_np(idx)).astype(x.dtype), axis=1).as_np_ndarray()

    def matmul_t(self, a, b):
        return _mnp.dot(_as_np(a), _as_np(b).T)

    def topk(self, x, k):
        v, i = nd.topk(_as_nd(_as_np(x)), k=int(k), axis=-1, ret_typ="both", dtype="int64")
        return v.as_np_ndarray(), i.as_np_ndarray()

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
        return self.gather(_as_np(w.data()), rows)

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
