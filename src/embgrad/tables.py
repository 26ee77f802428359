"""Embedding tables as data, next to their gradients: :func:`table` and :class:`Table`.

:func:`table` gives a :class:`Table` view of one embedding table of a model: read rows
(NumPy out), write rows in place through the framework's own assignment (returning what was
there, so it can be undone), freeze rows so that training leaves them bit-identical, and
put pretrained vectors into their rows (:meth:`Table.assign_vectors`).

Framework-neutral: the backend reads, writes and guards rows (``Backend.table_*``); this
module checks the input and keeps the book of frozen rows. Shapes: V table rows, D dim.

Next door: reading vector files (:func:`load_vectors`, :class:`Vectors`) is
:mod:`embgrad.vectors`; :func:`regularize` is :mod:`embgrad.regularization`. Both are
re-exported here, so ``from embgrad.tables import load_vectors, regularize`` keeps working.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from ._weak import WeakIdMap
from .backends import Backend, EmbeddingInfo, get_backend
from .capture import input_embedding, select_layers
from .errors import EmbgradError
from .regularization import regularize
from .vectors import Vectors, VectorsReport, load_vectors

__all__ = ["table", "Table", "FrozenRows", "Written", "load_vectors", "Vectors", "VectorsReport",
           "regularize"]

# the largest finite value of each table dtype: writing more would silently become inf
_DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38,
              "float32": float(np.finfo(np.float32).max), "float64": math.inf}
_MISSING_INITS = ("keep", "zeros", "normal", "uniform")


# ============================================================================ table views
class Written(NamedTuple):
    """Rows written by :meth:`Table.assign_vectors` and what they held before:
    ``table.assign(*written)`` undoes the write. ``rows`` (R,) int64, ``previous`` (R, D)."""

    rows: np.ndarray
    previous: np.ndarray


class FrozenRows:
    """The guard keeping some rows of one table out of training (see :meth:`Table.freeze`).

    ``rows``: sorted int64 NumPy (R,). ``remove()`` takes the hook/constraint away again.
    """

    __slots__ = ("table_name", "rows", "optimizer", "_handle", "_key", "__weakref__")

    def __init__(self, table_name: str, rows: np.ndarray, optimizer: Any, handle: Any, key: int):
        self.table_name = table_name
        self.rows = rows
        self.optimizer = optimizer
        self._handle = handle
        self._key = key

    @property
    def active(self) -> bool:
        return self._handle is not None

    def remove(self) -> None:
        """Unfreeze these rows: remove the gradient mask (and optimizer guard); idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        _guards.pop_if(self._key, self)

    def __repr__(self) -> str:
        shown = ", ".join(str(int(r)) for r in self.rows[:8]) + (", ..." if len(self.rows) > 8 else "")
        state = "" if self.active else ", removed"
        return f"FrozenRows({self.table_name!r}, {len(self.rows)} rows: [{shown}]{state})"


# variable -> its guard: one guard per table, whatever view (weakly keyed by identity)
_guards: WeakIdMap[FrozenRows] = WeakIdMap()


def _guard_of(variable: Any) -> FrozenRows | None:
    return _guards.get(variable)


class Table:
    """A view of one (V, D) embedding table of a model; see :func:`table`.

    ``variable`` is the framework's own parameter/variable (``nn.Embedding.weight``, the Keras
    ``embeddings`` variable, the Gluon ``weight`` Parameter). With Keras LoRA enabled that is the
    base table; the layer looks up in base + low-rank part: ``read(ids, effective=True)`` and
    ``numpy(effective=True)`` give that one. Reads return NumPy (bfloat16 tables as float32).
    """

    __slots__ = ("info", "name", "layer", "_backend", "_model")

    def __init__(self, info: EmbeddingInfo, backend: Backend, model: Any = None):
        self.info = info
        self.name = info.name
        self.layer = info.layer
        self._backend = backend
        # the model the table was taken from (weakly): freezing rebuilds its compiled train step
        self._model: Callable[[], Any] | None = None
        if model is not None and model is not info.layer:
            try:
                self._model = weakref.ref(model)
            except TypeError:          # not weakly referenceable: nothing compiled to rebuild
                self._model = None

    # ------------------------------------------------------------------ what it is
    @property
    def num_rows(self) -> int:
        return self.info.num_rows

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def variable(self) -> Any:
        """The framework's own parameter/variable holding the table (the base table under LoRA)."""
        return self._backend.table_variable(self.info)

    @property
    def dtype(self) -> str:
        """The table's dtype name: 'float32', 'bfloat16', 'int8' (quantized), ..."""
        return self._backend.table_dtype(self.info)

    @property
    def lora(self) -> bool:
        """True when the layer adds a low-rank (LoRA) part to the table at lookup time."""
        return self.info.low_rank is not None

    @property
    def trainable(self) -> bool:
        """False when the whole table is frozen (requires_grad=False, trainable=False, grad_req='null')."""
        return not self._live_info().frozen

    @property
    def frozen_rows(self) -> np.ndarray:
        """Sorted int64 (R,) rows frozen with :meth:`freeze` (empty if none)."""
        guard = _guard_of(self.variable)
        return guard.rows.copy() if guard is not None else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.num_rows

    def _live_info(self) -> EmbeddingInfo:
        """The layer's info as it is now (the user may have frozen or replaced the table since)."""
        found = self._backend.find_embeddings(self.layer)
        return next(iter(found.values()), self.info)

    # ------------------------------------------------------------------ read
    def read(self, ids: Any, effective: bool = False) -> np.ndarray:
        """Rows ``ids`` as NumPy: an int gives (D,), ids of shape S give S + (D,); a slice or a
        boolean (V,) mask also work. ``effective``: the rows the layer looks up (LoRA). NumPy of
        the table's dtype (bfloat16 as float32).

        Raises:
            EmbgradError: ``ids`` are not integers (or a boolean (V,) mask), are out of range, or
                are not array-like; called while a ``tf.function`` is traced; a Keras layer not
                built yet (no table); a Gluon ``SparseEmbedding`` (row_sparse) table.
        """
        rows, shape = self._rows(ids, "ids")
        out = self._backend.table_read(self.info, rows.reshape(-1), effective) if rows.size else \
            np.zeros((0, self.dim), np.float32)
        return out.reshape(shape + (self.dim,))

    def __getitem__(self, ids: Any) -> np.ndarray:
        return self.read(ids)

    def numpy(self, effective: bool = False) -> np.ndarray:
        """The whole (V, D) table as NumPy (a copy), as :meth:`read` gives it.

        Raises:
            EmbgradError: as :meth:`read` (inside a traced ``tf.function``, an unbuilt Keras layer,
                a Gluon ``SparseEmbedding``).
        """
        return self.read(slice(None), effective)

    # ------------------------------------------------------------------ write
    def assign(self, ids: Any, vectors: Any, *, force: bool = False) -> np.ndarray:
        """Write ``vectors`` into rows ``ids`` in place and return what the rows held before.

        ``ids``: an int (then ``vectors`` is (D,)) or unique ids (R,) (then (R, D)), also a
        slice or boolean mask. ``vectors``: floating NumPy / framework tensor / nested lists,
        finite and within the table dtype's range (cast to it). Refuses a quantized table, and
        unless ``force``, a frozen table (not trainable) or rows frozen with :meth:`freeze`.
        ``table.assign(ids, previous)`` undoes it. Returns the previous rows, (R, D) (or (D,)
        for an int id), as :meth:`read` gives them.

        Raises:
            EmbgradError: ``ids`` as in :meth:`read`, or of more than one dimension, or holding an
                id twice; ``vectors`` not floating point, of the wrong shape, holding NaN/Inf or
                values beyond the table dtype's range; a quantized table (or a Gluon
                ``SparseEmbedding``); without ``force``, a table that is not trainable or rows
                frozen with :meth:`freeze`; called while a ``tf.function`` is traced.
        """
        rows, shape = self._rows(ids, "ids")
        if len(shape) > 1:
            raise EmbgradError(f"table {self.name!r}: assign() takes an int or a 1-D list of ids, got "
                               f"ids of shape {shape}; flatten them (and their vectors) first.")
        scalar = shape == ()
        rows = rows.reshape(-1)
        values = self._vectors(vectors, rows, scalar)
        if rows.size == 0:
            return values
        uniq, counts = np.unique(rows, return_counts=True)
        if len(uniq) != len(rows):
            dup = int(uniq[counts > 1][0])
            raise EmbgradError(
                f"table {self.name!r}: id {dup} appears {int(counts[counts > 1][0])} times in ids, so "
                "it is ambiguous which vector it should get; pass each id once.")
        self._check_writable(rows, force, "assign")
        previous = self._backend.table_read(self.info, rows)
        dt = self.dtype
        self._backend.table_write(self.info, rows, values.astype(dt if dt in ("float16", "float32", "float64")
                                                                  else np.float32, copy=False))
        guard = _guard_of(self.variable)
        if guard is not None and np.intersect1d(rows, guard.rows).size:   # forced: frozen rows' new values
            self._install_guard(self.variable, guard.rows, guard.optimizer, guard)
        return previous[0] if scalar else previous

    def assign_vectors(self, vectors: Vectors, *, missing: str | Callable[[int, int], Any] = "keep",
                       seed: int | None = 0, skip_frozen: bool = False, force: bool = False) -> Written:
        """Put pretrained :class:`Vectors` (from :func:`load_vectors`) into their rows.

        ``missing``: what rows without a vector get: ``"keep"`` (their current values),
        ``"zeros"``, ``"normal"`` / ``"uniform"`` (zero mean, the standard deviation of the
        loaded vectors; seeded by ``seed``), or a callable ``(n, D) -> (n, D)`` array. The
        ``padding_idx`` row is never re-initialised. ``skip_frozen``: leave frozen rows alone
        instead of refusing. Returns :class:`Written`; ``table.assign(*written)`` undoes it.

        Raises:
            EmbgradError: ``vectors`` is not a :class:`Vectors`, or of another dimension than the
                table, or maps a word to an id beyond the table (a vocabulary of another model);
                ``missing`` is none of the choices, or its callable returns another shape than
                (n, D); and what :meth:`assign` refuses (frozen rows unless ``skip_frozen`` or
                ``force``, a table that is not trainable unless ``force``, a quantized table).
        """
        if not isinstance(vectors, Vectors):
            raise EmbgradError(
                f"table {self.name!r}: assign_vectors() takes the Vectors returned by "
                f"embgrad.load_vectors(path, vocab), got {type(vectors).__name__}; to write rows of "
                "your own, use table.assign(ids, array).")
        if vectors.dim != self.dim:
            raise EmbgradError(
                f"table {self.name!r} has dimension {self.dim} but the vectors from "
                f"{vectors.report.path} have dimension {vectors.dim}; load a file of dimension "
                f"{self.dim} or project the vectors first.")
        if len(vectors) and int(vectors.ids.max()) >= self.num_rows:
            k = int(np.argmax(vectors.ids))
            raise EmbgradError(
                f"table {self.name!r} has {self.num_rows} rows but the vocabulary maps "
                f"{vectors.words[k]!r} to id {int(vectors.ids[k])}: the vocabulary (tokenizer) does "
                "not belong to this model. Pass the vocabulary the model was built with.")
        if not (missing in _MISSING_INITS or callable(missing)):
            raise EmbgradError(f"missing={missing!r}: choose one of {', '.join(_MISSING_INITS)} or a "
                               "callable (n, dim) -> array.")
        found = vectors.ids
        values = vectors.vectors
        if missing != "keep":
            others = np.setdiff1d(np.arange(self.num_rows, dtype=np.int64), found, assume_unique=True)
            if self.info.pad_id is not None and not self.info.pad_receives_grad:
                others = others[others != self.info.pad_id]
            init = self._init_rows(missing, len(others), vectors.vectors, seed)
            found = np.concatenate([found, others])
            values = np.concatenate([values, init])
        if skip_frozen:
            keep = ~np.isin(found, self.frozen_rows)
            found, values = found[keep], values[keep]
        return Written(found, self.assign(found, values, force=force))

    def _init_rows(self, missing: Any, n: int, loaded: np.ndarray, seed: int | None) -> np.ndarray:
        D = self.dim
        if missing == "zeros":
            return np.zeros((n, D), np.float32)
        if callable(missing):
            init = self._backend_free_array(missing(n, D))
            if init.shape != (n, D):
                raise EmbgradError(f"table {self.name!r}: missing= callable returned shape "
                                   f"{init.shape}, expected ({n}, {D}) for the {n} rows without a vector.")
            return init
        std = float(loaded.std()) if loaded.size else 1.0
        rng = np.random.default_rng(seed)
        if missing == "normal":
            return rng.normal(0.0, std, (n, D)).astype(np.float32)
        a = std * math.sqrt(3.0)   # uniform(-a, a) has standard deviation std
        return rng.uniform(-a, a, (n, D)).astype(np.float32)

    # ------------------------------------------------------------------ freeze
    def freeze(self, ids: Any, *, optimizer: Any = None) -> FrozenRows:
        """Keep rows ``ids`` out of training: their gradient is masked to exactly zero (a hook
        on the weight in PyTorch, a gradient mask in TensorFlow/Keras and Gluon).

        A zero gradient alone does not stop an optimizer that has already taken steps: momentum
        and Adam's moments built up before the freeze, and weight decay (``weight_decay=``,
        AdamW's decoupled decay) move rows whose gradient is zero. In PyTorch the rows are
        therefore also put back after every optimizer step, bit for bit: after the steps of
        ``optimizer`` when given, else after the steps of any ``torch.optim.Optimizer`` that
        holds the table (torch's global optimizer step hooks, removed with the guard), so frozen
        rows stay bit-identical with SGD + momentum, Adam, AdamW, RMSprop, ..., frozen before or
        during training. Freezing more
        rows adds to the frozen set. Returns the :class:`FrozenRows` guard; ``unfreeze()`` or
        ``guard.remove()`` removes it. :func:`embgrad.capture` still reports the rows' true
        gradient (of the loss); the mask acts on what the optimizer is given.

        Keras: the mask is a variable constraint, which a compiled train step reads when it is
        traced. Freezing (or unfreezing) through ``embgrad.table(model)`` drops the model's
        ``train_function`` that ``fit`` compiled, as ``model.compile()`` does, so the next ``fit``
        traces it again with the rows frozen; a ``@tf.function`` step of your own traced before
        ``freeze()`` must be traced again too (call ``freeze()`` before its first call).

        Gluon: there are no gradient hooks; ``optimizer`` (the ``gluon.Trainer``) is required and
        the rows are put back after each of its steps.

        Raises:
            EmbgradError: no ids; ids as in :meth:`read`; the whole table is not trainable;
                ``optimizer`` is not a ``torch.optim.Optimizer`` (PyTorch) / ``gluon.Trainer``
                (Gluon, where it is required) or does not update this table; a Keras layer with
                LoRA enabled (every row changes through the shared low-rank factor); called while
                a ``tf.function`` is traced.
        """
        rows, _ = self._rows(ids, "ids")
        rows = np.unique(rows)
        if rows.size == 0:
            raise EmbgradError(f"table {self.name!r}: freeze() got no ids; pass the rows to freeze.")
        if not self.trainable:
            raise EmbgradError(
                f"table {self.name!r} is frozen as a whole (not trainable), so training changes none "
                "of its rows already; make it trainable first if you want to freeze only some rows.")
        var = self.variable
        old = _guard_of(var)
        if old is not None:
            rows = np.union1d(old.rows, rows)
            optimizer = optimizer if optimizer is not None else old.optimizer
        guard = self._install_guard(var, rows, optimizer, old)
        self._recompile()
        return guard

    def unfreeze(self, ids: Any = None) -> None:
        """Unfreeze rows ``ids`` (None: every frozen row, removing the hook/constraint); rows
        that are not frozen are ignored.

        Raises:
            EmbgradError: ``ids`` as in :meth:`read` (when some rows are frozen).
        """
        var = self.variable
        old = _guard_of(var)
        if old is None:
            return
        if ids is None:
            old.remove()
        else:
            rows, _ = self._rows(ids, "ids")
            remaining = np.setdiff1d(old.rows, rows)
            if remaining.size == 0:
                old.remove()
            else:
                self._install_guard(var, remaining, old.optimizer, old)
        self._recompile()

    def _recompile(self) -> None:
        """Let the model's compiled train step see the changed frozen rows (Keras ``fit``)."""
        model = self._model() if self._model is not None else None
        if model is not None:
            self._backend.table_steps_changed(model)

    def _install_guard(self, var: Any, rows: np.ndarray, optimizer: Any, old: FrozenRows | None) -> FrozenRows:
        handle = self._backend.table_freeze(self.info, rows.astype(np.int64), optimizer)
        if old is not None:
            old.remove()
        guard = FrozenRows(self.name, rows.astype(np.int64), optimizer, handle, id(var))
        _guards[var] = guard
        return guard

    # ------------------------------------------------------------------ checks
    def _check_writable(self, rows: np.ndarray, force: bool, what: str) -> None:
        why = self._backend.table_quantized(self.info)
        if why is not None:
            raise EmbgradError(f"table {self.name!r}: {what}() cannot write float rows into it: {why}.")
        if force:
            return
        if not self.trainable:
            raise EmbgradError(
                f"table {self.name!r} is frozen (not trainable): it is meant to stay as it is. Pass "
                f"force=True to {what}() rows anyway.")
        hit = np.intersect1d(rows, self.frozen_rows)
        if hit.size:
            raise EmbgradError(
                f"table {self.name!r}: rows {hit[:8].tolist()}{' ...' if hit.size > 8 else ''} are "
                f"frozen with freeze(); unfreeze them, pass force=True, or (assign_vectors) skip_frozen=True.")

    def _rows(self, ids: Any, what: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """int64 NumPy of ``ids`` (range-checked) and the shape they came in (() for an int)."""
        self._backend.ops.eager_only(
            f"table {self.name!r}: read(), numpy(), assign() and freeze()",
            "Call them outside the tf.function (before or between steps); inside it, read rows "
            "with tf.gather(table.variable, ids).")
        V = self.num_rows
        if isinstance(ids, slice):
            a = np.arange(V, dtype=np.int64)[ids]
            return a, a.shape
        a = self._backend_free_array(ids)
        if a.dtype == np.bool_:
            if a.shape != (V,):
                raise EmbgradError(f"table {self.name!r}: a boolean mask of {what} must have shape ({V},), "
                                   f"got {a.shape}.")
            a = np.flatnonzero(a)
            return a.astype(np.int64), a.shape
        if a.size == 0:
            return a.astype(np.int64), a.shape
        if not np.issubdtype(a.dtype, np.integer):
            raise EmbgradError(f"table {self.name!r}: {what} must be integer row ids, got dtype {a.dtype} "
                               f"(e.g. {a.reshape(-1)[0]!r}); convert them to int64.")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise EmbgradError(f"table {self.name!r}: id {bad} is out of range for a table of {V} rows "
                               f"(valid ids are 0..{V - 1}).")
        return a.astype(np.int64, copy=False), a.shape

    def _vectors(self, vectors: Any, rows: np.ndarray, scalar: bool) -> np.ndarray:
        """``vectors`` as a checked (R, D) floating NumPy array."""
        v = self._backend_free_array(vectors)
        want = (self.dim,) if scalar else (len(rows), self.dim)
        if not np.issubdtype(v.dtype, np.floating):
            hint = (" (did you pass ids?)" if np.issubdtype(v.dtype, np.integer) else "")
            raise EmbgradError(f"table {self.name!r}: vectors must be floating point, got dtype "
                               f"{v.dtype}{hint}; convert them with .astype(np.float32).")
        if v.shape != want and not (scalar and v.shape == (1, self.dim)):
            raise EmbgradError(f"table {self.name!r}: vectors have shape {v.shape} but {len(rows)} "
                               f"id{'s' if len(rows) != 1 else ''} of a table of dimension {self.dim} need "
                               f"shape {want}.")
        v = v.reshape(len(rows), self.dim)
        if v.size:
            finite = np.isfinite(v)
            if not finite.all():
                r = int(np.argwhere(~finite)[0][0])
                raise EmbgradError(f"table {self.name!r}: the vector for id {int(rows[r])} holds NaN/Inf "
                                   f"values ({v[r][~finite[r]][:3].tolist()}); refusing to write them.")
            top = float(np.abs(v).max())
            limit = _DTYPE_MAX.get(self.dtype, math.inf)
            if top > limit:
                raise EmbgradError(f"table {self.name!r}: a value of magnitude {top:.4g} does not fit the "
                                   f"table's dtype {self.dtype} (largest finite value {limit:.4g}); it "
                                   "would become inf. Rescale the vectors.")
        return v

    def _backend_free_array(self, x: Any) -> np.ndarray:
        """NumPy from NumPy, Python scalars/lists or any framework's tensor."""
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, (int, float, list, tuple, np.generic)):
            try:
                return np.asarray(x)
            except ValueError as e:
                raise EmbgradError(f"table {self.name!r}: cannot read {type(x).__name__} as an array: {e}") from None
        try:
            b = get_backend(x)
        except EmbgradError:
            raise EmbgradError(f"table {self.name!r}: expected a NumPy array, a list or a framework "
                               f"tensor, got {type(x).__name__}.") from None
        return b.ops.to_numpy(x)

    def __repr__(self) -> str:
        n_frozen = len(self.frozen_rows)
        extra = (f", frozen_rows={n_frozen}" if n_frozen else "") + (", lora" if self.lora else "") \
            + ("" if self.trainable else ", not trainable")
        return (f"Table({self.name!r}, num_rows={self.num_rows}, dim={self.dim}, dtype={self.dtype}, "
                f"backend={self._backend.name}{extra})")


def table(model_or_layer: Any, layer: Any = None) -> Table:
    """A :class:`Table` view of one embedding table of ``model_or_layer``.

    ``layer``: a name or layer object when the model has several embedding layers (names as in
    :func:`embgrad.capture`); may be omitted when there is exactly one, or when the model says
    which is its token embedding (Hugging Face ``get_input_embeddings()``, as
    :func:`embgrad.attribute` picks it).

    Raises:
        EmbgradError: no embedding layer, an unknown name, or several layers and no way to pick.
    """
    if isinstance(model_or_layer, Table):
        return model_or_layer
    backend = get_backend(model_or_layer)
    infos = select_layers(backend, model_or_layer, layer)
    if layer is None and len(infos) > 1:
        picked = input_embedding(model_or_layer, infos)
        infos = [picked] if picked is not None else infos
    if len(infos) > 1:
        names = ", ".join(repr(i.name) for i in infos)
        raise EmbgradError(f"{type(model_or_layer).__name__} has {len(infos)} embedding layers ({names}); "
                           f"pass layer=NAME to say which table you mean, e.g. layer={infos[0].name!r}.")
    return Table(infos[0], backend, model_or_layer)
