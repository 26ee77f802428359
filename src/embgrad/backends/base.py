"""The backend interface: two small interfaces, the only things the framework-neutral core needs.

1. :class:`TensorOps`, **tensor primitives** over the framework's own tensors (unique, segment
   sum, gather, scatter, casts, reductions, ...), in terms of which :mod:`embgrad.sparse`,
   :mod:`embgrad.tied`, :mod:`embgrad.privacy` and :mod:`embgrad.distributed` write the sparse
   algebra once (the discipline of einops' ``_backends.py``: one small documented method per
   primitive; what a framework lacks raises :class:`NotImplementedError` naming it).
2. :class:`ModelAdapter`, **model surgery, reversible**: find the embedding layers of a model
   (:meth:`ModelAdapter.find_embeddings`), install a tap that records every lookup and can
   replace its output (:meth:`ModelAdapter.install_tap`), remove every trace again
   (:meth:`Tap.remove`), differentiate a scalar with respect to the recorded outputs
   (:meth:`Tap.grad`, :meth:`ModelAdapter.value_and_grads`), and read, write and freeze table
   rows. It describes each layer in neutral terms (:class:`EmbeddingInfo`: pad id, frequency
   scaling, low-rank update...), so that the core never reads a framework's option names.

:func:`embgrad.backends.get_backend` returns the framework's :class:`ModelAdapter`; its
:class:`TensorOps` is ``adapter.ops``. The core calls ``backend.ops.segment_sum(...)`` for a
tensor primitive and ``backend.find_embeddings(...)`` for surgery.

Adding a framework
------------------
Write one :class:`TensorOps` file and one :class:`ModelAdapter` file, and register the adapter
in ``backends/__init__.py`` (``_CANDIDATES``: the module that must already be imported, and
where the adapter is)::

    backends/<framework>_ops.py   class <Framework>Ops(TensorOps)
    backends/<framework>.py       class <Framework>Backend(ModelAdapter), ops = <Framework>Ops()

Required (the base class raises :class:`NotImplementedError` naming the framework and the
method; ``tests/test_backend_interface.py`` checks every registered backend has them):

- :class:`TensorOps`: those in :data:`TensorOps.REQUIRED` (conversion ``to_numpy``,
  ``from_numpy``, ``dtype_name``, ``cast``; shapes ``reshape``, ``moveaxis``,
  ``broadcast_to``, ``arange``, ``zeros``, ``concat``; the sparse algebra ``unique``,
  ``segment_sum``, ``gather``, ``boolean_mask``, ``scatter_rows``, ``where``, ``argsort``,
  ``searchsorted``, ``repeat``, ``cumsum``; math ``sqrt``, ``sum``, ``minimum``, ``maximum``,
  ``minmax``, ``count_nonfinite``, ``matmul_t``, ``pick``, ``topk``; ``row_grad_parts``).
- :class:`ModelAdapter`: those in :data:`ModelAdapter.REQUIRED` (``is_appropriate``,
  ``find_embeddings``, ``install_tap``; a framework without hooks or a tape raises an
  :class:`~embgrad.EmbgradError` there naming its own entry point, as JAX does).

Optional, by feature (:data:`TensorOps.OPTIONAL`, :data:`ModelAdapter.OPTIONAL`; without them
that feature raises): ``assert_in_range`` (frameworks whose tensors can be traced, see
``traced``), ``matmul``, ``take_along_last``, ``gather_last`` (tied tables, :mod:`embgrad.tied`),
``log_probs_at`` (attribution of generated tokens); ``value_and_grads``, ``embed``
(attribution), ``table_variable``, ``table_gather``, ``table_write``, ``table_freeze``
(:func:`embgrad.table`), ``low_rank_factors`` (where the adapter sets
``EmbeddingInfo.low_rank``). Every other method has a default that fits a framework without
the feature (``shape``, ``no_grad``, ``compile``, ``traced``, ``gate``, ``install_forward_tap``,
``coupling_layers``, ``table_uses``, ...), overridden where the framework has it.

Tensors are always the framework's own; shapes in docstrings use B (batch), T (tokens per
example), D (embedding dim), V (table rows), N (entries), R (stored rows).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["TensorOps", "ModelAdapter", "Backend", "EmbeddingInfo", "LowRank", "Call", "Tap"]


@dataclass(frozen=True)
class LowRank:
    """A low-rank update the layer adds to its table at lookup time (LoRA, Hu et al. 2021,
    arXiv:2106.09685): it looks up ``W + scale · A @ B`` with A (V, rank) and B (rank, D); the
    factors themselves come from :meth:`ModelAdapter.low_rank_factors`."""

    scale: float
    rank: int


@dataclass(frozen=True, eq=False)
class EmbeddingInfo:
    """What the core needs to know about one embedding layer of a model, in neutral terms.

    ``kind`` is ``"embedding"`` (one vector per id) or ``"bag"`` (reduced bags of ids).
    Padding: ``pad_id`` is the id that marks padding (None: none); ``pad_receives_grad`` False
    where the framework gives the pad row no gradient and keeps it fixed (PyTorch's
    ``padding_idx``: the core drops its lookups and never re-initialises the row);
    ``pad_masked`` True where the layer tells the layers after it to skip pad positions (Keras's
    ``mask_zero``: attribution treats them as padding); ``padding`` says it in the framework's
    own words, for display ("padding_idx=0", "mask_zero", or ""). ``freq_scaled``: the
    framework divides each row's gradient by how often the row occurs in the mini-batch
    (PyTorch's ``scale_grad_by_freq``). ``low_rank``: a low-rank update added at lookup time
    (Keras's LoRA), or None. ``by_ids`` False for a layer that takes no ids but returns rows of
    its table by position (a sliced position table, Keras-Hub's ``PositionEmbedding``: the tap
    recovers the rows), True for a lookup of ids. ``options`` holds the backend's own
    framework-specific details; the core never reads it.
    """

    name: str
    layer: Any
    num_rows: int
    dim: int
    kind: str = "embedding"
    pad_id: int | None = None
    pad_receives_grad: bool = True
    pad_masked: bool = False
    padding: str = ""
    freq_scaled: bool = False
    low_rank: LowRank | None = None
    by_ids: bool = True
    tied: bool = False
    frozen: bool = False
    weight: Any = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        flags = [f for f in ("tied", "frozen", "freq_scaled") if getattr(self, f)]
        extra = f", {self.padding}" if self.padding else ""
        if self.low_rank is not None:
            extra += f", low_rank={self.low_rank.rank}"
        return (f"EmbeddingInfo({self.name!r}, {type(self.layer).__name__}, "
                f"num_rows={self.num_rows}, dim={self.dim}{extra}"
                + ("".join(", " + f for f in flags)) + ")")


@dataclass(eq=False)
class Call:
    """One recorded call (lookup) of one embedding layer during a forward pass.

    ``ids``: int tensor (B, T) of looked-up rows (for ragged bags: padded with -1,
    ``valid`` marks the real entries). ``output``: what the layer returned (the tensor the
    backend differentiates against). ``token_grad``: turns dLoss/d(output) into
    dLoss/d(looked-up vectors), (B, T, D); identity for plain embeddings.
    ``grad``: dLoss/d(output) once a backward pass produced it.

    Lookups broadcast over the batch (a position embedding looked up with ids of batch size 1,
    or without a batch dimension, and added to a (B, T, D) tensor): the tap sets
    ``batch_free`` ("one": the ids' batch dimension has size 1; "absent": 1-D ids with no batch
    dimension) and, wherever it sees the output combined with a batched tensor, gives that
    operation a per-example view of the output instead ((B, ...) broadcast of it) and appends
    it to ``views``. After the backward pass ``view_grads[k]`` holds dLoss/d(views[k]), whose
    sum over the batch is the part of ``grad`` that went through the views. ``other_use``: the
    output was also used where no view could be made (its gradient there has no per-example
    split; the core checks whether it is zero). The core turns these into per-example
    gradients with the batch size taken from the views, the other calls of the same forward and
    the forward's inputs (``Capture``), and refuses where the batch size cannot be known.
    ``forward``: which forward of the capture the call belongs to, ``batch_dim``: the ids'
    dimension that indexes the examples (both set by the core in ``on_call``, before the tap
    reads ``batch_free``).
    ``role``: ``"lookup"`` for an embedding call; ``"projection"`` for a call of a layer that
    multiplies by the same table (a tied output projection ``logits = h @ W.T``): then ``ids``
    is None, ``output`` the (B, S, V) product before any bias, scaling or softcapping is
    applied after it (or the layer's output where those only add a bias), and ``meta["input"]``
    the (B, S, D) input ``h``; ``meta["logit_grad"]``, when set, maps dLoss/d(output) to
    dLoss/d(h @ W.T) (e.g. through a softcap inside the layer).
    """

    info: EmbeddingInfo
    ids: Any
    output: Any
    valid: Any = None
    token_grad: Callable[[Any], Any] | None = None
    grad: Any = None
    grad_enabled: bool = True
    meta: dict = field(default_factory=dict)
    batch_free: str | None = None
    views: list = field(default_factory=list)
    view_grads: list = field(default_factory=list)
    other_use: bool = False
    forward: int = 0
    batch_dim: int = 0
    role: str = "lookup"


class Tap:
    """A reversible tap on some embedding layers, returned by :meth:`Backend.install_tap`."""

    #: True when one backward pass frees the graph (PyTorch, MXNet without retain_graph): a
    #: second ``gradients(loss)`` on the same capture is then refused with an EmbgradError.
    single_use: bool = False

    def remove(self) -> None:
        """Remove every hook / patch installed; idempotent; never raises on a clean model."""
        raise NotImplementedError

    def grad(self, loss: Any, calls: Sequence[Call], sources: Sequence[Any] | None = None,
             retain_graph: bool = False) -> tuple[list[Any], list[Any] | None]:
        """dLoss/d(call.output) for each call, and dLoss/d(source) for each source.

        Never writes any parameter's accumulated gradient. A call whose output the loss does
        not depend on may get None (the core then uses zeros, and refuses when no call is
        reached at all: a loss from a forward run outside the capture). Calls with ``views``
        get their ``view_grads`` set.
        """
        raise NotImplementedError



class TensorOps:
    """Tensor primitives over one framework's tensors: one subclass per framework
    (``embgrad/backends/<framework>_ops.py``), reached as ``backend.ops``.

    Tensors in and out are the framework's own. Shapes: N (entries), D (embedding dim), V
    (table rows), B (batch), S/T (positions), K (outputs); ids and indices are int64 unless
    said otherwise; floats keep their dtype unless said otherwise. :data:`REQUIRED` lists the
    methods every framework implements, :data:`OPTIONAL` those a feature needs; the base class
    raises :class:`NotImplementedError` naming the framework and the method for both. The
    other methods have defaults.
    """

    #: the framework's name, as in :attr:`ModelAdapter.name` (error messages)
    name: str = "base"

    #: the methods every framework implements (see the module docstring)
    REQUIRED: tuple[str, ...] = (
        "to_numpy", "from_numpy", "dtype_name", "cast", "reshape", "moveaxis", "broadcast_to",
        "arange", "zeros", "concat", "unique", "segment_sum", "gather", "boolean_mask",
        "scatter_rows", "where", "argsort", "searchsorted", "repeat", "cumsum", "sqrt", "sum",
        "minimum", "maximum", "minmax", "count_nonfinite", "matmul_t", "pick", "topk",
        "row_grad_parts")
    #: the methods a feature needs, without which that feature raises
    OPTIONAL: tuple[str, ...] = ("assert_in_range", "matmul", "take_along_last", "gather_last",
                                 "log_probs_at")

    @property
    def index_bits(self) -> int:
        """Bits of the widest non-negative integer index the framework has now (63 for int64;
        JAX without ``jax_enable_x64``: 31): how large a combined (example, row) key may get."""
        return 63

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(
            f"the {self.name} backend does not implement TensorOps.{method}(): write it in its "
            f"TensorOps subclass ({type(self).__module__}.{type(self).__qualname__}).")

    # ------------------------------------------------------------------ conversion, metadata
    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy (or view) of ``x``, detached; bfloat16 comes back as float32. A NumPy
        array passes through."""
        raise self._missing("to_numpy")

    def from_numpy(self, a: np.ndarray, like: Any = None) -> Any:
        """A framework tensor holding ``a`` (same shape and dtype) on the device of ``like``."""
        raise self._missing("from_numpy")

    def shape(self, x: Any) -> tuple[int, ...]:
        """The shape as Python ints (TensorFlow inside ``tf.function``: a dim unknown while
        tracing comes back as a scalar int64 tensor)."""
        return tuple(int(s) for s in x.shape)

    def dtype_name(self, x: Any) -> str:
        """'float16', 'bfloat16', 'float32', 'float64', 'int32', 'int64', 'bool', ..."""
        raise self._missing("dtype_name")

    def cast(self, x: Any, dtype: str) -> Any:
        """``x`` in dtype ``dtype`` (a name as :meth:`dtype_name` gives); same shape."""
        raise self._missing("cast")

    def is_integer(self, x: Any) -> bool:
        """True for an integer dtype."""
        return self.dtype_name(x).startswith(("int", "uint"))

    def is_floating(self, x: Any) -> bool:
        """True for a floating dtype (bfloat16 included)."""
        return self.dtype_name(x).startswith(("float", "bfloat"))

    # ------------------------------------------------------------------ construction, shape
    def reshape(self, x: Any, shape: Sequence[int]) -> Any:
        """``x`` with shape ``shape`` (one dim may be -1); same dtype."""
        raise self._missing("reshape")

    def moveaxis(self, x: Any, source: int, destination: int) -> Any:
        """``x`` with axis ``source`` moved to ``destination`` (NumPy's moveaxis)."""
        raise self._missing("moveaxis")

    def broadcast_to(self, x: Any, shape: Sequence[int]) -> Any:
        """``x`` broadcast to ``shape`` (NumPy rules; a view where the framework has one)."""
        raise self._missing("broadcast_to")

    def arange(self, n: int, like: Any) -> Any:
        """int64 (n,) ``0..n-1`` on the device of ``like``."""
        raise self._missing("arange")

    def zeros(self, shape: Sequence[int], dtype: str, like: Any) -> Any:
        """Zeros of ``shape`` and dtype ``dtype`` on the device of ``like``."""
        raise self._missing("zeros")

    def concat(self, xs: Sequence[Any], axis: int = 0) -> Any:
        """The tensors ``xs`` (same dtype, equal but for ``axis``) joined along ``axis``."""
        raise self._missing("concat")

    # ------------------------------------------------------------------ sparse algebra
    def unique(self, x: Any) -> tuple[Any, Any]:
        """Sorted unique values (U,) of int64 (N,) ``x`` and the inverse index (N,) int64:
        ``x == unique[inverse]``."""
        raise self._missing("unique")

    def segment_sum(self, data: Any, segment_ids: Any, num_segments: int) -> Any:
        """out[s] = sum of data[i] with segment_ids[i] == s: data (N, ...), int64 segment_ids
        (N,) in [0, num_segments) -> (num_segments, ...) in data's dtype; empty segments 0."""
        raise self._missing("segment_sum")

    def coalesce(self, keys: Any, values: Any) -> tuple[Any, Any]:
        """Sorted unique int64 keys (U,) of ``keys`` (N,) and the sums (U, ...) of the
        ``values`` (N, ...) sharing each key, in values' dtype. Default: :meth:`unique`, then
        :meth:`segment_sum`; a framework may sort instead (TensorFlow)."""
        uniq, inv = self.unique(keys)
        return uniq, self.segment_sum(values, inv, self.shape(uniq)[0])

    def row_sq_norms(self, x: Any) -> Any:
        """(N,) squared L2 norm of each row of (N, D) ``x``, in x's dtype. Default:
        ``sum(x * x, 1)``; a framework may avoid the (N, D) temporary (PyTorch)."""
        return self.sum(x * x, 1)

    def gather(self, x: Any, idx: Any) -> Any:
        """``x[idx]`` along axis 0: x (N, ...), int64 idx (M,) -> (M, ...)."""
        raise self._missing("gather")

    def boolean_mask(self, x: Any, mask: Any) -> Any:
        """``x[mask]`` along axis 0: x (N, ...), bool mask (N,) -> (count(mask), ...)."""
        raise self._missing("boolean_mask")

    def scatter_rows(self, rows: Any, values: Any, num_rows: int) -> Any:
        """Dense (num_rows, D) tensor with ``values`` (R, D) at unique int64 ``rows`` (R,),
        zeros elsewhere; values' dtype."""
        raise self._missing("scatter_rows")

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """Elementwise ``a`` where bool ``cond`` else ``b`` (broadcasting)."""
        raise self._missing("where")

    def argsort(self, x: Any) -> Any:
        """int64 (N,) indices that sort (N,) ``x`` ascending, stable (ties by position)."""
        raise self._missing("argsort")

    def searchsorted(self, sorted_seq: Any, values: Any, right: bool = False) -> Any:
        """int64 insertion points of ``values`` (M,) in ascending ``sorted_seq`` (N,): (M,)
        (NumPy's searchsorted, side 'right' when ``right``)."""
        raise self._missing("searchsorted")

    def repeat(self, x: Any, counts: Any) -> Any:
        """``np.repeat(x, counts)`` along axis 0: x (N, ...), int64 counts (N,) -> (sum(counts), ...)."""
        raise self._missing("repeat")

    def cumsum(self, x: Any) -> Any:
        """Inclusive cumulative sum along axis 0; x's shape and dtype."""
        raise self._missing("cumsum")

    def floordiv(self, x: Any, n: int) -> Any:
        """``x // n`` for a non-negative int64 tensor and a positive Python int, exactly
        (MXNet's arrays have no ``//``)."""
        return x // n

    # ------------------------------------------------------------------ reductions, math
    def sqrt(self, x: Any) -> Any:
        """Elementwise square root; x's shape and dtype."""
        raise self._missing("sqrt")

    def sum(self, x: Any, axis: int | None = None) -> Any:
        """Sum over ``axis`` (all axes when None: a scalar, shape (1,) in MXNet); x's dtype."""
        raise self._missing("sum")

    def minimum(self, x: Any, y: Any) -> Any:
        """Elementwise minimum of a tensor and a tensor or Python number (broadcasting)."""
        raise self._missing("minimum")

    def maximum(self, x: Any, y: Any) -> Any:
        """Elementwise maximum of a tensor and a tensor or Python number (broadcasting)."""
        raise self._missing("maximum")

    def max_abs(self, x: Any) -> float:
        """max |x| as a Python float (0.0 for an empty tensor)."""
        a = self.to_numpy(x)
        return float(np.abs(a).max()) if a.size else 0.0

    def minmax(self, x: Any) -> tuple[int, int]:
        """(min, max) of a non-empty int tensor, as Python ints."""
        raise self._missing("minmax")

    def count_nonfinite(self, x: Any) -> int:
        """How many entries of ``x`` are NaN or ±Inf (0 for an integer tensor); inside a traced
        ``tf.function``: 0 and a run-time assertion that there are none."""
        raise self._missing("count_nonfinite")

    def matmul(self, a: Any, b: Any, transpose_a: bool = False, transpose_b: bool = False) -> Any:
        """Batched matrix product over the last two axes (leading axes broadcast), with either
        factor transposed in its last two axes: (..., M, K) @ (..., K, N) -> (..., M, N)."""
        raise self._missing("matmul")

    def matmul_t(self, a: Any, b: Any) -> Any:
        """a @ b.T for a (N, D) and b (C, D): (N, C)."""
        raise self._missing("matmul_t")

    def take_along_last(self, x: Any, idx: Any) -> Any:
        """``out[b, s, n] = x[b, s, idx[b, n]]`` for x (B, S, V) and int64 idx (B, N): (B, S, N)."""
        raise self._missing("take_along_last")

    def gather_last(self, x: Any, idx: Any) -> Any:
        """``x[..., idx]``: the entries of the last axis at int64 (N,) ``idx``: (..., N)."""
        raise self._missing("gather_last")

    def pick(self, x: Any, idx: Any) -> Any:
        """``x[n, idx[n]]`` for x (N, C) and int64 idx (N,): (N,), differentiable in x."""
        raise self._missing("pick")

    def topk(self, x: Any, k: int) -> tuple[Any, Any]:
        """The k largest values along the last axis of x (..., C) and their int64 indices,
        both (..., k), largest first."""
        raise self._missing("topk")

    def log_probs_at(self, logits: Any, positions: Any, tokens: Any) -> Any:
        """``log_softmax(logits[n, positions[n, k]])[tokens[n, k]]`` for logits (N, T, V) and
        int64 positions, tokens (N, K): (N, K), float32 or wider, differentiable in logits
        (a causal language model's log-probability of token k of example n). Optional."""
        from ..errors import EmbgradError
        raise EmbgradError(f"the {self.name} backend has no log_probs_at: attribution of generated "
                           "tokens supports PyTorch and Keras/TensorFlow models.")

    def row_grad_parts(self, g: Any) -> tuple[Any, Any, int | None]:
        """``(ids (N,), values (N, D), num_rows or None)`` from a framework table gradient
        (sparse or dense; duplicates allowed), for :func:`embgrad.row_grad`."""
        raise self._missing("row_grad_parts")

    # ------------------------------------------------------------------ execution
    def no_grad(self) -> Any:
        """A context in which no autograd graph is recorded (the sparse algebra runs in it)."""
        import contextlib
        return contextlib.nullcontext()

    def compile(self, fn: Callable) -> Callable:
        """A compiled version of a pure function of tensors (tf.function in TensorFlow)."""
        return fn

    def compile_small(self, fn: Callable) -> Callable:
        """:meth:`compile` for a pure function of a few ops (default: the same). TensorFlow
        runs it as it is: calling a tf.function costs ~0.25 ms of CPU eagerly against ~0.02 ms
        per eager op, and inside the user's tf.function the ops join its graph anyway."""
        return self.compile(fn)

    def traced(self, x: Any) -> bool:
        """True when ``x`` has no value yet (a tensor traced inside ``tf.function``): checks
        that need values then become run-time assertions (:meth:`assert_in_range`)."""
        return False

    def eager_only(self, what: str, instead: str) -> None:
        """EmbgradError when called where tensors have no values (while a ``tf.function`` is
        traced): ``what`` needs values; ``instead`` names the eager (or in-graph) alternative."""

    def assert_in_range(self, ids: Any, num_rows: int, message: str) -> Any:
        """For traced int ``ids``: a run-time assertion that 0 <= ids < num_rows, failing
        with ``message`` when the graph runs. Returns a token for :meth:`gate`. Required where
        :meth:`traced` can be True."""
        raise self._missing("assert_in_range")

    def gate(self, x: Any, *tokens: Any) -> Any:
        """``x``, computed only after the run-time assertions ``tokens`` (from
        :meth:`assert_in_range`) passed, so that their message, not a kernel's, is the error."""
        return x


class ModelAdapter:
    """Model surgery for one framework: one subclass per framework in
    ``embgrad/backends/<framework>.py``; :func:`~embgrad.backends.get_backend` returns it.

    ``ops`` is the framework's :class:`TensorOps`. :data:`REQUIRED` lists the methods every
    framework implements, :data:`OPTIONAL` those a feature needs; the base class raises
    :class:`NotImplementedError` naming the framework and the method for both. The other
    methods have defaults.
    """

    name: str = "base"
    framework_module: str = ""
    #: the framework's tensor primitives
    ops: TensorOps = TensorOps()
    #: the methods every framework implements (see the module docstring)
    REQUIRED: tuple[str, ...] = ("is_appropriate", "find_embeddings", "install_tap")
    #: the methods a feature needs, without which that feature raises
    OPTIONAL: tuple[str, ...] = ("value_and_grads", "embed", "table_variable", "table_gather",
                                 "table_write", "table_freeze", "low_rank_factors")
    #: what find_embeddings looks for, for error messages ("torch.nn.Embedding and ...")
    searched_types: str = "embedding layers"
    #: the calling convention of models: True where a list, tuple or dict of inputs is ONE
    #: structured input, ``model(inputs)`` (Keras); False where a tuple is positional arguments
    #: and a dict keyword arguments (PyTorch, Gluon)
    structured_inputs: bool = False
    #: how a user switched gradient recording off, in this framework's words (messages)
    no_grad_hint: str = "gradient recording switched off"
    #: whether the tap gives a batch-free lookup's output per-example views where it meets the
    #: batch (PyTorch's tensor subclass); without them, a batch-size-1 lookup outside any forward
    #: of the model is refused (its batch size cannot be known)
    broadcast_views: bool = False
    #: which broadcasts of a batch-free lookup's output the tap can split by example (messages)
    broadcast_seen: str = "it sees none: this framework's tap cannot split a broadcast output"
    #: added to the core's refusal of a loss that reaches no recorded lookup ("" or led by a space)
    unreached_hint: str = ""
    #: how :meth:`embgrad.Capture.gradients` sees every use of a table when given the loss:
    #: "graph" (:meth:`table_uses` walks the autograd graph), "total" (the tape's total gradient
    #: of the table is compared with that of the recorded uses), or None (it cannot)
    table_check: str | None = None

    def _missing(self, method: str) -> NotImplementedError:
        return NotImplementedError(
            f"the {self.name} backend does not implement ModelAdapter.{method}(): write it in its "
            f"ModelAdapter subclass ({type(self).__module__}.{type(self).__qualname__}).")

    # ------------------------------------------------------------------ detection
    def is_appropriate(self, obj: Any) -> bool:
        """True if ``obj`` (tensor, model, layer, variable) belongs to this framework."""
        raise self._missing("is_appropriate")

    # ------------------------------------------------------------------ finding layers
    def find_embeddings(self, model: Any) -> dict[str, EmbeddingInfo]:
        """Every embedding layer of ``model`` (or ``model`` itself if it is one), by name."""
        raise self._missing("find_embeddings")

    def match_name(self, key: str, found: dict[str, EmbeddingInfo]) -> EmbeddingInfo | None:
        """The layer of ``found`` that a name which is not one of its keys means (a Keras
        path, a Gluon child path), or None."""
        return None

    def uncaptured_tables(self, model: Any) -> list[str]:
        """Layers of ``model`` that look like they hold embedding tables the tap cannot see
        (several tables read in one call), as ``"layer (var, var, ...)"`` for messages; [] by
        default."""
        return []

    def sequence_first_layers(self, model: Any) -> list[str]:
        """Names of layers that read their input sequence-first (time, batch, ...) by default
        (nn.LSTM/GRU/RNN/Transformer with batch_first=False): ids fed to such a model may be
        (T, B), so the core asks for ``batch_dim=`` instead of assuming dimension 0."""
        return []

    def coupling_layers(self, model: Any) -> list[str]:
        """Names of layers that couple examples of a batch (e.g. BatchNorm in training)."""
        return []

    def stochastic_layers(self, model: Any) -> list[str]:
        """Names of layers whose output is random in the model's current mode (e.g. Dropout in
        training mode): attribution warns, as its results would not be repeatable."""
        return []

    # ------------------------------------------------------------------ taps
    def install_tap(self, model: Any, infos: Sequence[EmbeddingInfo],
                    on_call: Callable[[Call], Any], active: Callable[[], bool] | None = None) -> Tap:
        """Record every call of the given layers. ``on_call(call)`` may return a tensor that
        replaces the layer's output (same shape), or None to keep it. ``active()``, asked at
        each call, says whether the call belongs to this tap's capture (False for a forward run in
        another thread or ``contextvars`` context): such calls pass through untouched, neither
        checked nor recorded. Taps of one layer are independent: removing them in any order
        leaves the layer exactly as it was."""
        raise self._missing("install_tap")

    def submodules(self, model: Any) -> dict[str, Any]:
        """Every named sub-layer of ``model`` (qualified name -> layer), for attribution to a
        composite module (a layer holding an embedding, e.g. a Hugging Face ``BertEmbeddings``).
        Empty where the backend cannot tap a module's output (:meth:`install_output_tap`)."""
        return {}

    def install_output_tap(self, module: Any, on_output: Callable[[Any], Any],
                           active: Callable[[], bool] | None = None) -> Tap:
        """Let ``on_output(output)`` see every output of ``module`` (a tensor (B, T, D)) and
        replace it: it returns a tensor of the same shape, or None to keep the output.
        ``active()`` as in :meth:`install_tap`. Removing the tap leaves the module as it was.
        Raises EmbgradError where the backend has no such tap (PyTorch only for now)."""
        from ..errors import EmbgradError
        raise EmbgradError(f"attribution to a composite module (or to several layers in one call) is "
                           f"implemented for PyTorch only for now, not for the {self.name} backend: "
                           "attribute to one embedding layer (layer=NAME).")

    def install_forward_tap(self, model: Any, on_start: Callable[[Any], None],
                            on_end: Callable[..., None]) -> Tap | None:
        """Tell the core where each forward of ``model`` starts and ends: ``on_start(shape)``
        when the model's outermost call begins (``shape``: the shape of its first input tensor,
        or None), ``on_end()`` when it returns or raises (``on_end(output)`` where the backend
        can split broadcast lookups by the output, see ``split_broadcast``).
        None when the backend cannot see forwards (the core then treats every call as one
        forward and warns where that assumption matters)."""
        return None

    def expand_hint(self, batch_size: Any) -> str:
        """How to give (1, T) position ids the batch dimension, in this framework's words."""
        return f"ids broadcast to ({batch_size}, T)"

    def compiled_hint(self, model: Any) -> str:
        """Why no lookup of ``model`` may have been seen (a compiled module that runs no hooks),
        with what to do instead, led by a space; "" when there is nothing to say."""
        return ""

    def in_backward(self) -> bool:
        """True while the framework runs a backward pass (a gradient-checkpointing
        recomputation calls the layers again there: not new lookups)."""
        return False

    # ------------------------------------------------------------------ differentiation
    def split_broadcast(self, tap: Tap | None, loss: Any, call: Call, output: Any,
                        batch_size: int) -> Any:
        """Per-example gradients (B, *call.output.shape) of a batch-free lookup's output, split
        by the forward's output ``output`` (B, ...) given ``loss``; None where the backend
        cannot (the default; Keras on TensorFlow can, eagerly)."""
        return None

    def broadcast_in_graph(self, call: Call) -> str | None:
        """Where :meth:`split_broadcast` cannot run (a traced function), whether the graph
        shows the batch-free lookup's output ``call.output`` being broadcast to a higher rank
        (a position table added to a (B, T, D) batch): a short description of the operation
        that does it, or None where none is seen (the default: the backend cannot tell).
        The core refuses such a call rather than read its ids as one id per example."""
        return None

    def scalar_loss(self, loss: Any) -> Any:
        """Validate that ``loss`` is a scalar tensor of this framework (else EmbgradError)."""
        return loss

    def table_weight(self, info: EmbeddingInfo) -> Any:
        """The layer's table variable now (it may have been built after the layer was found),
        or None."""
        return info.weight

    def accumulated_grad(self, info: EmbeddingInfo) -> Any:
        """The gradient a user's own backward accumulates for the table (torch ``weight.grad``),
        or None (none yet, or the framework keeps none)."""
        return None

    def table_uses(self, loss: Any, infos: Sequence[EmbeddingInfo], calls: Sequence[Call]) -> dict[str, str]:
        """Uses of each layer's table that ``loss`` depends on other than the recorded ``calls``
        (lookups and tied projections): ``{layer name: description}`` for the layers that have
        such a use (e.g. ``h @ emb.weight.T`` written by hand), empty when there is none.
        ``loss`` is None after the user's own backward. The default finds none (backends that
        can see their autograd graph override it)."""
        return {}

    def value_and_grads(self, fn: Callable[[Callable[[Any], Any]], Any]) -> tuple[Any, list[Any]]:
        """Run ``fn(watch)`` recording gradients; ``fn`` passes exactly one tensor x through
        ``watch`` (which returns the tensor to use in its place) and returns y (N, K).

        Returns ``(y, grads)``: y detached, and for each k the gradient of ``sum(y[:, k])``
        with respect to x (zeros where y does not depend on x), K backward passes over one
        forward. Never writes any parameter's accumulated gradient. Used by
        :mod:`embgrad.attribution` (integrated gradients, SmoothGrad, HotFlip, Jacobians).
        """
        raise self._missing("value_and_grads")

    def value_and_grads_batched(self, fn: Callable[[Callable[[Any], Any]], Any]) -> tuple[Any, list[Any]]:
        """As :meth:`value_and_grads`, the K vector-Jacobian products computed together as one
        batched backward pass (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. vmap
        over the K output directions) where the framework has one; else K backward passes."""
        return self.value_and_grads(fn)

    def embed(self, info: EmbeddingInfo, ids: Any) -> Any:
        """The layer's own output for int ids (...) -> (..., D), without recording gradients
        and without being recorded by a tap (includes any scaling the layer applies, e.g.
        Hugging Face ``embed_scale``)."""
        raise self._missing("embed")

    # ------------------------------------------------------------------ tables (embgrad.table)
    # Reading, writing and freezing rows of one embedding table; used by :mod:`embgrad.tables`.
    def low_rank_factors(self, info: EmbeddingInfo) -> tuple[Any, Any]:
        """The current factors (A (V, r), B (r, D)) of the layer's low-rank update
        (``info.low_rank``) as framework tensors. Required where a backend sets ``low_rank``."""
        raise self._missing("low_rank_factors")

    def table_variable(self, info: EmbeddingInfo) -> Any:
        """The framework's own parameter/variable holding the (V, D) table of ``info.layer``
        (for a Keras layer with LoRA: the base ``embeddings`` variable)."""
        raise self._missing("table_variable")

    def table_dtype(self, info: EmbeddingInfo) -> str:
        """The dtype name of the table variable ('float32', 'bfloat16', 'int8', ...)."""
        return self.ops.dtype_name(self.table_variable(info))

    def table_gather(self, info: EmbeddingInfo, rows: Any, effective: bool = False) -> Any:
        """Framework tensor (R, D): rows ``rows`` (int64 framework tensor (R,)) of the table,
        detached from autograd. ``effective``: the table the layer really looks up in (base +
        LoRA part in Keras); identical to the variable elsewhere."""
        raise self._missing("table_gather")

    def table_read(self, info: EmbeddingInfo, rows: np.ndarray, effective: bool = False) -> np.ndarray:
        """NumPy (R, D): rows ``rows`` (int64 NumPy (R,)) of the table."""
        var = self.table_variable(info)
        return self.ops.to_numpy(self.table_gather(info, self.ops.from_numpy(rows, like=var), effective))

    def table_write(self, info: EmbeddingInfo, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` (NumPy (R, D), already in the table's dtype or float32 for
        bfloat16) into rows ``rows`` (unique int64 NumPy (R,)) in place, through the framework's
        own assignment, without recording autograd history."""
        raise self._missing("table_write")

    def table_quantized(self, info: EmbeddingInfo) -> str | None:
        """Why float rows cannot be written into the table (it is quantized, or stored in a
        way embgrad cannot write), with what to do instead; None when they can."""
        return None

    def table_steps_changed(self, model: Any) -> None:
        """Frozen rows of a table of ``model`` changed: drop what was compiled with the old ones
        (Keras: the ``train_function`` that ``fit`` traced, which read the constraints)."""

    def table_freeze(self, info: EmbeddingInfo, rows: np.ndarray, optimizer: Any = None) -> Any:
        """Keep rows ``rows`` (unique int64 NumPy (R,)) out of training: mask their gradient
        (hook / constraint). ``optimizer``: where the framework needs it, the optimizer whose
        steps must also leave the rows alone (decoupled weight decay). Returns a handle whose
        ``remove()`` takes every trace away again."""
        raise self._missing("table_freeze")


#: what :func:`~embgrad.backends.get_backend` returns (a framework's :class:`ModelAdapter`,
#: whose ``ops`` are its :class:`TensorOps`); the name the core's type hints use
Backend = ModelAdapter
