"""Embedding tables as data, next to their gradients.

- :func:`table` gives a :class:`Table` view of one embedding table of a model: read rows
  (NumPy out), write rows in place through the framework's own assignment (returning what was
  there, so it can be undone), and freeze rows so that training leaves them bit-identical.
- :func:`load_vectors` streams a word2vec (text or binary) or GloVe file, keeps only the
  words of the model's vocabulary and returns them as :class:`Vectors` with a
  :class:`VectorsReport`; :meth:`Table.assign_vectors` puts them into the table.
- :func:`regularize` adds an L1/L2 penalty's gradient to a :class:`~embgrad.RowGrad` on the
  rows the batch touched only (lazy regularisation), so the gradient stays sparse.

Framework-neutral: the backend reads, writes and guards rows (``Backend.table_*``); this
module checks the input and keeps the book of frozen rows. Shapes: V table rows, D dim.
"""
from __future__ import annotations

import codecs
import gzip
import io
import math
import weakref
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from ._weak import WeakIdMap
from .backends import Backend, EmbeddingInfo, get_backend
from .capture import input_embedding, select_layers
from .errors import EmbgradError
from .sparse import RowGrad

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
        return bool(self.info.options.get("lora"))

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
        boolean (V,) mask also work. ``effective``: the rows the layer looks up (LoRA)."""
        rows, shape = self._rows(ids, "ids")
        out = self._backend.table_read(self.info, rows.reshape(-1), effective) if rows.size else \
            np.zeros((0, self.dim), np.float32)
        return out.reshape(shape + (self.dim,))

    def __getitem__(self, ids: Any) -> np.ndarray:
        return self.read(ids)

    def numpy(self, effective: bool = False) -> np.ndarray:
        """The whole (V, D) table as NumPy (a copy)."""
        return self.read(slice(None), effective)

    # ------------------------------------------------------------------ write
    def assign(self, ids: Any, vectors: Any, *, force: bool = False) -> np.ndarray:
        """Write ``vectors`` into rows ``ids`` in place and return what the rows held before.

        ``ids``: an int (then ``vectors`` is (D,)) or unique ids (R,) (then (R, D)), also a
        slice or boolean mask. ``vectors``: floating NumPy / framework tensor / nested lists,
        finite and within the table dtype's range (cast to it). Refuses a quantized table, and
        unless ``force``, a frozen table (not trainable) or rows frozen with :meth:`freeze`.
        ``table.assign(ids, previous)`` undoes it.
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

    def assign_vectors(self, vectors: "Vectors", *, missing: str | Callable[[int, int], Any] = "keep",
                       seed: int | None = 0, skip_frozen: bool = False, force: bool = False) -> Written:
        """Put pretrained :class:`Vectors` (from :func:`load_vectors`) into their rows.

        ``missing``: what rows without a vector get: ``"keep"`` (their current values),
        ``"zeros"``, ``"normal"`` / ``"uniform"`` (zero mean, the standard deviation of the
        loaded vectors; seeded by ``seed``), or a callable ``(n, D) -> (n, D)`` array. The
        ``padding_idx`` row is never re-initialised. ``skip_frozen``: leave frozen rows alone
        instead of refusing. Returns :class:`Written`; ``table.assign(*written)`` undoes it.
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
            if self.info.padding_idx is not None:
                others = others[others != self.info.padding_idx]
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
        """Unfreeze rows ``ids`` (None: every frozen row, removing the hook/constraint)."""
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
        self._backend.eager_only(
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
        return b.to_numpy(x)

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


# ============================================================================ pretrained vectors
@dataclass(frozen=True)
class VectorsReport:
    """What :func:`load_vectors` found: counts, examples of missing words and duplicates."""

    path: str
    format: str
    dim: int
    vectors_read: int           # vectors in the file (read)
    header_count: int | None    # what the word2vec header announced
    vocab_size: int             # ids in the vocabulary
    found: int                  # vocabulary ids that got a vector
    missing: int                # vocabulary ids without one
    missing_examples: tuple[str, ...]
    duplicates: int             # vectors skipped because their id already had one (first wins)
    duplicate_examples: tuple[str, ...]

    @property
    def coverage(self) -> float:
        """found / vocab_size."""
        return self.found / self.vocab_size if self.vocab_size else 0.0

    def __str__(self) -> str:
        lines = [f"{self.path} ({self.format}, dim {self.dim}): {self.vectors_read} vectors read",
                 f"  found {self.found} of {self.vocab_size} vocabulary ids ({100 * self.coverage:.1f}%)",
                 f"  missing {self.missing}" + (f", e.g. {', '.join(map(repr, self.missing_examples))}"
                                                if self.missing_examples else "")]
        if self.duplicates:
            lines.append(f"  duplicates {self.duplicates} (first kept), e.g. "
                         f"{', '.join(map(repr, self.duplicate_examples))}")
        return "\n".join(lines)


class Vectors:
    """Pretrained vectors for the vocabulary ids found in a file, in file order.

    ``ids`` int64 (F,) vocabulary ids (unique), ``vectors`` float32 (F, D), ``words`` the F
    words as written in the file, ``report`` a :class:`VectorsReport`.
    """

    __slots__ = ("ids", "vectors", "words", "report")

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, words: tuple[str, ...], report: VectorsReport):
        self.ids = ids
        self.vectors = vectors
        self.words = words
        self.report = report

    @property
    def dim(self) -> int:
        return self.report.dim

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        r = self.report
        return (f"Vectors({len(self)} of {r.vocab_size} vocabulary ids, dim={r.dim}, "
                f"missing={r.missing}, duplicates={r.duplicates}, from {Path(r.path).name!r})")


_FORMATS = ("auto", "word2vec_text", "word2vec_binary", "glove")
_CHUNK_BYTES = 1 << 20      # lines (or binary records) parsed at once: memory stays O(this + found)
_MAX_WORD_BYTES = 1 << 16
_MAX_DIM = 1 << 20  # a header announcing more dimensions per vector is damaged (real ones: < 20k)


def _fail(path: Any, where: str, problem: str) -> EmbgradError:
    return EmbgradError(f"{path}, {where}: {problem}")


def _vocab_lookup(vocab: Any) -> tuple[dict[str, int], bool]:
    """``vocab`` as {word: id}, and whether it says to lowercase (a lowercasing tokenizer)."""
    lower = False
    if not isinstance(vocab, (Mapping, list, tuple)) and callable(getattr(vocab, "get_vocab", None)):
        lower = bool(getattr(vocab, "do_lower_case", False))
        vocab = vocab.get_vocab()
    if isinstance(vocab, Mapping):
        out = {}
        for w, i in vocab.items():
            if not isinstance(w, str) or not isinstance(i, (int, np.integer)) or isinstance(i, bool) or i < 0:
                raise EmbgradError(f"vocab must map words (str) to ids (int >= 0), got {w!r}: {i!r}.")
            out[w] = int(i)
        return out, lower
    if isinstance(vocab, (list, tuple)):
        out = {}
        for i, w in enumerate(vocab):
            if not isinstance(w, str):
                raise EmbgradError(f"a vocab list must hold words (str); entry {i} is {w!r}.")
            if w in out:
                raise EmbgradError(f"the vocab list holds {w!r} twice (ids {out[w]} and {i}); each word "
                                   "needs one id. Pass a dict word -> id if that is intended.")
            out[w] = i
        return out, lower
    raise EmbgradError(f"vocab must be a dict word -> id, a list of words (index = id) or a Hugging Face "
                       f"tokenizer (with get_vocab()), got {type(vocab).__name__}.")


def _open(path: Any) -> Any:
    p = Path(path)
    if not p.exists():
        raise EmbgradError(f"{path}: no such file; check the path of the vectors file.")
    if p.is_dir():
        raise EmbgradError(f"{path} is a directory, not a vectors file.")
    try:
        f: io.BufferedIOBase = open(p, "rb")
        magic = f.read(2)
        f.seek(0)
        if magic == b"\x1f\x8b":
            f.close()
            f = gzip.open(p, "rb")
        return f
    except OSError as e:
        raise EmbgradError(f"{path}: cannot read it ({e}).") from None


def _is_binary(sample: bytes, dim: int) -> bool:
    """True when bytes after a word2vec header are raw float32, not text: control bytes, invalid
    UTF-8, or a first record that is not a word followed by ``dim`` numbers (raw floats can be
    printable ASCII, e.g. 161.177 is the bytes 'Z-!C')."""
    if any(b < 32 and b not in (9, 10, 13) for b in sample):
        return True
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return True
    if b"\n" not in sample:        # a first line longer than the sample: text by the checks above
        return False
    line = sample.split(b"\n", 1)[0].rstrip(b"\r").split()
    if len(line) != dim + 1:
        return True
    try:
        [float(x) for x in line[1:]]
    except ValueError:
        return True
    return False


def _header(first: bytes) -> tuple[int, int] | None:
    """(count, dim) if the first line is a word2vec header 'count dim'."""
    fields = first.split()
    if len(fields) == 2 and all(f.isdigit() for f in fields):
        return int(fields[0]), int(fields[1])
    return None


def _decode(raw: bytes, path: Any, where: str, encoding: str, unicode_errors: str) -> str:
    try:
        return raw.decode(encoding, unicode_errors)
    except UnicodeDecodeError as e:
        bad = raw[max(0, e.start - 8):e.end + 8]
        raise _fail(path, where, f"bytes {bad!r} are not valid {encoding} ({e.reason} at byte "
                    f"{e.start}); pass encoding='latin-1' or unicode_errors='replace' if the file "
                    "is otherwise right.") from None
    except LookupError:
        raise EmbgradError(f"unknown encoding={encoding!r} or unicode_errors={unicode_errors!r}.") from None


def _parse_line(path: Any, lineno: int, word: str, rest: str, dim: int, dim_from: str) -> tuple[str, np.ndarray]:
    """One text line, slowly and precisely: (word, (D,) float32) or an EmbgradError saying why."""
    fields = rest.split()
    if len(fields) > dim:
        extra = fields[:-dim]
        if not all(_is_number(x) for x in extra):   # a word with spaces in it (GloVe 840B has some)
            word, fields = " ".join([word] + extra), fields[-dim:]
    if len(fields) != dim:
        raise _fail(path, f"line {lineno}", f"{len(fields)} numbers after {word!r}, expected {dim} "
                    f"({dim_from}).")
    for k, x in enumerate(fields):
        if not _is_number(x):
            raise _fail(path, f"line {lineno}", f"{x[:40]!r} (number {k + 1} of the vector of "
                        f"{word!r}) is not a number.")
    return word, np.array(fields, dtype=np.float32)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return "_" not in s


def _text_chunks(f: Any, path: Any, dim: int | None, lineno: int, dim_from: str, encoding: str,
                 unicode_errors: str) -> Iterator[tuple[list[str], list[int], np.ndarray]]:
    """Chunks ``(words, line numbers, (n, D) float32)`` of a text vectors file, streamed.

    Fast path: NumPy's C ``loadtxt`` parses a chunk of lines; when it objects, the chunk is
    parsed line by line to name the line and the problem (or accept words with spaces).
    """
    while True:
        raw = f.readlines(_CHUNK_BYTES)
        if not raw:
            return
        words: list[str] = []
        rests: list[str] = []
        locs: list[int] = []
        for b in raw:
            lineno += 1
            try:
                s = b.decode(encoding, unicode_errors)
            except (UnicodeDecodeError, LookupError):    # the message (where, why) is built only now
                s = _decode(b, path, f"line {lineno}", encoding, unicode_errors)
            w, sep, rest = s.partition(" ")
            if not sep:
                w, sep, rest = s.partition("\t")
            if not rest.strip():
                if not s.strip():
                    continue                       # blank line
                raise _fail(path, f"line {lineno}", f"{w.strip()[:40]!r} has no vector (expected a word "
                            f"followed by {dim or 'its'} numbers).")
            if not w:
                raise _fail(path, f"line {lineno}", "the line starts with a space: no word before the numbers.")
            if dim is None:
                dim = len(rest.split())
            words.append(w)
            rests.append(rest)
            locs.append(lineno)
        if not words:
            continue
        assert dim is not None   # set from the first line with a vector
        try:
            vecs = np.loadtxt(rests, dtype=np.float32, comments=None, ndmin=2, quotechar=None)
            ok = vecs.shape == (len(words), dim)
        except ValueError:
            ok = False
        if not ok:   # line by line; nothing sized by dim is allocated before a line has dim numbers
            parsed = [_parse_line(path, ln, w, rest, dim, dim_from)
                      for w, rest, ln in zip(words, rests, locs, strict=True)]
            words = [w for w, _ in parsed]
            vecs = np.stack([v for _, v in parsed])
        yield words, locs, vecs


def _binary_chunks(f: Any, path: Any, count: int, dim: int, encoding: str, unicode_errors: str,
                   offset: int, check_tail: bool) -> Iterator[tuple[list[str], list[int], np.ndarray]]:
    """Chunks ``(words, record numbers, (n, D) float32)`` of a word2vec binary file, streamed:
    each record is a word, a space and D little-endian float32 (then an optional newline).
    ``check_tail``: refuse data after the ``count`` records (the header lied)."""
    nbytes = 4 * dim
    buf = b""
    pos = 0
    rec = 0

    def more() -> bool:
        nonlocal buf, pos, offset
        data = f.read(1 << 20)
        if not data:
            return False
        offset += pos
        buf = buf[pos:] + data
        pos = 0
        return True

    words: list[str] = []
    locs: list[int] = []
    parts: list[bytes] = []
    while rec < count:
        sp = buf.find(b" ", pos)
        while sp < 0:
            if len(buf) - pos > _MAX_WORD_BYTES:
                raise _fail(path, f"record {rec + 1} (byte {offset + _word_start(buf, pos)})",
                            f"no space after a word within {_MAX_WORD_BYTES} bytes: not a word2vec binary "
                            "file, or it is corrupt (try format='word2vec_text' or 'glove').")
            if not more():
                left = buf[pos:]
                what = ("the file ends" if not left.strip() else
                        f"the file ends inside record {rec + 1} ({left[:20]!r}...)")
                raise _fail(path, f"record {rec + 1} (byte {offset + _word_start(buf, pos)})",
                            f"{what} after {rec} vectors, but the header announced {count}: the file "
                            "is truncated or the header lies about the count.")
            sp = buf.find(b" ", pos)
        while len(buf) < sp + 1 + nbytes:
            start = sp - pos
            if not more():
                wb = buf[pos:sp].lstrip(b"\r\n")
                raise _fail(path, f"record {rec + 1} (byte {offset + _word_start(buf, pos)})",
                            f"truncated: the vector of {wb[:40]!r} needs {nbytes} bytes ({dim} float32), "
                            f"only {len(buf) - sp - 1} remain.")
            sp = pos + start
        wb = buf[pos:sp].lstrip(b"\r\n")
        rec += 1
        if not wb:
            raise _fail(path, f"record {rec} (byte {offset + _word_start(buf, pos)})", "empty word before the vector.")
        try:
            words.append(wb.decode(encoding, unicode_errors))
        except (UnicodeDecodeError, LookupError):
            words.append(_decode(wb, path, f"record {rec} (byte {offset + _word_start(buf, pos)})",
                                 encoding, unicode_errors))
        locs.append(rec)
        parts.append(buf[sp + 1:sp + 1 + nbytes])
        pos = sp + 1 + nbytes
        if len(words) * nbytes >= _CHUNK_BYTES:
            yield words, locs, np.frombuffer(b"".join(parts), dtype="<f4").reshape(-1, dim).astype(np.float32)
            words, locs, parts = [], [], []
    if words:
        yield words, locs, np.frombuffer(b"".join(parts), dtype="<f4").reshape(-1, dim).astype(np.float32)
    if not check_tail:
        return
    tail = buf[pos:pos + 4096] + (f.read(4096) if len(buf) - pos < 4096 else b"")
    if tail.strip():
        raise _fail(path, f"after record {count} (byte {offset + _word_start(buf, pos)})",
                    f"the header announced {count} vectors but more data follows ({tail.strip()[:20]!r}...): "
                    "the header lies about the count.")


def _word_start(buf: bytes, pos: int) -> int:
    """Where the word of the record at ``pos`` starts (past the previous record's newline)."""
    seg = buf[pos:pos + 8]
    return pos + len(seg) - len(seg.lstrip(b"\r\n"))


def load_vectors(path: str | Path, vocab: Any, *, format: str = "auto", encoding: str = "utf-8",
                 unicode_errors: str = "strict", lowercase: bool | None = None,
                 transform: Callable[[str], str | None] | None = None,
                 max_vectors: int | None = None) -> Vectors:
    """Pretrained vectors for the words of ``vocab`` from a word2vec or GloVe file, streamed.

    ``vocab``: a dict word -> id, a list of words (index = id) or a Hugging Face tokenizer
    (``get_vocab()``). ``format``: ``"auto"`` (a ``count dim`` header means word2vec, binary
    when raw floats follow; no header means GloVe), ``"word2vec_text"``, ``"word2vec_binary"``
    or ``"glove"``; gzip-compressed files are read as they are. ``lowercase``: lowercase the
    file's words before lookup (None: as the tokenizer does, ``do_lower_case``).
    ``transform``: maps a file word to a vocabulary key (None to skip it), after lowercasing.
    ``max_vectors``: read only the first so many vectors.

    The file is read in chunks; only the vectors of vocabulary words are kept, so memory is
    O(found · D), never the file. The first vector of an id wins; later ones count as
    duplicates. Malformed files raise :class:`EmbgradError` naming the file, the line (or
    binary record and byte) and the problem.
    """
    if format not in _FORMATS:
        raise EmbgradError(f"format={format!r}: choose one of {', '.join(map(repr, _FORMATS))}.")
    if max_vectors is not None and (not isinstance(max_vectors, int) or max_vectors <= 0):
        raise EmbgradError(f"max_vectors must be a positive int or None, got {max_vectors!r}.")
    lookup, tok_lower = _vocab_lookup(vocab)
    if not lookup:
        raise EmbgradError("vocab is empty: there are no words to look up.")
    lower = tok_lower if lowercase is None else bool(lowercase)
    with _open(path) as f:
        try:
            return _load(f, path, lookup, lower, transform, format, encoding, unicode_errors, max_vectors)
        except (OSError, EOFError, zlib.error) as e:   # gzip damage, I/O errors
            raise EmbgradError(f"{path}: cannot read it to the end ({type(e).__name__}: {e}); the file "
                               "is damaged or truncated.") from None


def _load(f: Any, path: Any, lookup: dict[str, int], lower: bool, transform: Any, format: str,
          encoding: str, unicode_errors: str, max_vectors: int | None) -> Vectors:
    first = f.readline(_MAX_WORD_BYTES)
    bom = len(codecs.BOM_UTF8) if first.startswith(codecs.BOM_UTF8) else 0   # saved by some editors
    first = first[bom:]
    if not first.strip():
        rest = f.read(1 << 16)
        raise _fail(path, "line 1", "the file is empty." if not first + rest else
                    "the first line is blank; a vectors file starts with a header or a vector.")
    header = _header(first)
    count: int | None
    dim: int | None
    if header is not None:       # refuse a damaged header before reading anything it sizes
        count, dim = header
        if not 0 < dim <= _MAX_DIM:
            raise _fail(path, "line 1", f"the header announces dimension {dim}; vectors need at least 1 "
                        f"and at most {_MAX_DIM:,} (the header is damaged, or this is not a vectors file).")
        if count <= 0:
            raise _fail(path, "line 1", f"the header announces {count} vectors; the file holds none.")
    if format == "auto":
        fmt = "glove"
        if header is not None:
            at = f.tell()
            sample = f.read(40 * header[1] + 256)     # a text line of dim numbers fits
            f.seek(at)
            fmt = "word2vec_binary" if _is_binary(sample, header[1]) else "word2vec_text"
    else:
        fmt = format
    shown = first.decode("utf-8", "replace").strip()[:60]
    if fmt.startswith("word2vec") and header is None:
        raise _fail(path, "line 1", f"{shown!r} is not a word2vec header 'count dim' (two integers); "
                    "a GloVe file has no header: pass format='glove' (or 'auto').")
    if fmt == "glove" and header is not None:
        raise _fail(path, "line 1", f"{shown!r} looks like a word2vec header, not a GloVe "
                    "vector; pass format='word2vec_text' or 'word2vec_binary' (or 'auto').")
    count, dim = header if header is not None else (None, None)
    limit = max_vectors if max_vectors is not None else None
    if fmt == "word2vec_binary":
        assert count is not None and dim is not None   # word2vec formats have a header (checked above)
        n = count if limit is None else min(count, limit)
        chunks = _binary_chunks(f, path, n, dim, encoding, unicode_errors, offset=bom + len(first),
                                check_tail=limit is None)
        where = "record"
    else:
        if fmt == "glove":
            f.seek(bom)
        chunks = _text_chunks(f, path, dim, 1 if fmt == "word2vec_text" else 0,
                              "the header's dimension" if dim else "the dimension of line 1",
                              encoding, unicode_errors)
        where = "line"

    cap = len(set(lookup.values()))
    buf = np.empty((min(cap, 1 << 14), 0), np.float32)
    ids: list[int] = []
    found_words: list[str] = []
    seen: set[int] = set()
    dups: list[str] = []
    n_dups = 0
    read = last = extra_at = 0
    for words, locs, vecs in chunks:
        if limit is not None and read + len(words) > limit:
            words, locs, vecs = words[:limit - read], locs[:limit - read], vecs[:limit - read]
        if buf.shape[1] != vecs.shape[1]:
            dim = vecs.shape[1]
            buf = np.empty((buf.shape[0], dim), np.float32)
        finite = np.isfinite(vecs).all(1)
        if not finite.all():
            k = int(np.argmin(finite))
            raise _fail(path, f"{where} {locs[k]}", f"the vector of {words[k]!r} holds NaN/Inf (or a value "
                        "beyond float32's range).")
        take: list[int] = []
        for k, w in enumerate(words):
            key = w.lower() if lower else w
            if transform is not None:
                key = transform(key)
            i = lookup.get(key) if key is not None else None
            if i is None:
                continue
            if i in seen:
                n_dups += 1
                if len(dups) < 5:
                    dups.append(w)
                continue
            seen.add(i)
            take.append(k)
            ids.append(i)
            found_words.append(w)
        if take:
            start = len(ids) - len(take)
            if len(ids) > buf.shape[0]:
                buf.resize((min(cap, max(2 * buf.shape[0], len(ids))), buf.shape[1]), refcheck=False)
            buf[start:len(ids)] = vecs[take]
        if count is not None and read <= count < read + len(words):
            extra_at = locs[count - read]              # the first vector beyond the header's count
        read += len(words)
        last = locs[-1]
        if limit is not None and read >= limit:
            break
    if fmt == "word2vec_text" and limit is None and count is not None and read != count:
        at = extra_at if read > count else last + 1
        raise _fail(path, f"line {at}", f"the header announced {count} vectors but the file holds "
                    f"{read}: the header lies about the count, or the file is truncated.")
    if read == 0:
        raise _fail(path, f"{where} 1", "the file holds no vectors.")
    dim = buf.shape[1]
    buf.resize((len(ids), dim), refcheck=False)
    id_arr = np.array(ids, dtype=np.int64)
    all_ids = np.array(sorted(set(lookup.values())), dtype=np.int64)
    missing_ids = all_ids[~np.isin(all_ids, id_arr)]
    by_id: dict[int, str] = {}
    for w, i in lookup.items():
        by_id.setdefault(i, w)
    report = VectorsReport(
        path=str(path), format=fmt, dim=dim, vectors_read=read, header_count=count,
        vocab_size=len(all_ids), found=len(ids), missing=len(missing_ids),
        missing_examples=tuple(by_id[int(i)] for i in missing_ids[:10]),
        duplicates=n_dups, duplicate_examples=tuple(dups))
    return Vectors(id_arr, buf, tuple(found_words), report)


# ============================================================================ regularisation
def regularize(row_grad: RowGrad, table: Any, *, l1: float = 0.0, l2: float = 0.0, layer: Any = None) -> RowGrad:
    """``row_grad`` plus the gradient of ``l1·Σ|E_r| + l2·Σ E_r²`` over the rows it touches.

    Lazy regularisation, as sparse optimizers do: only the R rows in ``row_grad.rows`` are
    penalised, so the result stays a sparse (R, D) gradient. Putting ``l1 * sum(|E|)`` into the
    loss instead gives every one of the V rows a gradient (dense, and it shrinks rows the batch
    never saw); on the touched rows both agree. Same coefficients as
    ``keras.regularizers.L1L2``; PyTorch's ``weight_decay=wd`` corresponds to ``l2=wd/2``.
    The L1 subgradient at 0 is 0. ``table``: a :class:`Table`, or a model/layer (with
    ``layer=``) whose table the gradient belongs to.
    """
    if not isinstance(row_grad, RowGrad):
        raise EmbgradError(f"regularize() takes a RowGrad (e.g. grads['emb'].weight_grad), got "
                           f"{type(row_grad).__name__}; convert a framework gradient with embgrad.row_grad(g).")
    for name, v in (("l1", l1), ("l2", l2)):
        if not isinstance(v, (int, float, np.floating)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise EmbgradError(f"regularize(): {name} must be a finite number >= 0, got {v!r}.")
    t = table if isinstance(table, Table) else _table_of(table, layer)
    if row_grad.num_rows != t.num_rows or (row_grad._size() != 0 and row_grad.dim != t.dim):
        raise EmbgradError(f"regularize(): the gradient is of a ({row_grad.num_rows}, {row_grad.dim}) table "
                           f"but table {t.name!r} is ({t.num_rows}, {t.dim}); pass the table it belongs to.")
    if row_grad._size() == 0 or (l1 == 0 and l2 == 0):
        return row_grad
    b = row_grad._backend
    dt = b.dtype_name(row_grad.values)
    E = b.cast(t._backend.table_gather(t.info, row_grad.rows), dt)
    values = row_grad.values
    if l1:
        values = values + float(l1) * (b.cast(E > 0, dt) - b.cast(E < 0, dt))
    if l2:
        values = values + (2.0 * float(l2)) * E
    return RowGrad(row_grad.rows, values, row_grad.num_rows, b)


_table_of = table
