"""embgrad past one machine: embedding gradients over ``torch.distributed``.

Three uses, one transport (``torch.distributed``'s own collectives: gloo on CPU, NCCL on GPU):

* **Data parallel, sparse exchange**: :func:`all_reduce_rows` gives every rank the coalesced
  sum of all ranks' :class:`~embgrad.RowGrad`, moving only rows (or, when the rows are dense
  enough, one dense all-reduce). The sparse counterpart of DDP's dense gradient all-reduce.
* **Differential privacy across ranks**: :func:`noisy_clipped_sum` clips each rank's own
  examples locally, reduces the clipped sums sparsely and adds the noise ONCE for the whole
  batch (the same draw on every rank, from a seed the ranks agree on), with
  :mod:`embgrad.privacy`'s DP-SGD, DP-FEST and DP-AdaFEST, so the result is the one a single
  process holding the global batch would compute: same ε. Opacus's counterpart is
  ``DistributedDPOptimizer``, which adds dense noise on rank 0 before a dense all-reduce.
* **Row-sharded tables** (TorchRec's row-wise sharding): :class:`RowSharding` says which rank
  owns which rows; ``ShardedEmbedding`` (a ``torch.nn.Module``, imported with torch when first
  asked for) looks ids up in the sharded table; :func:`sharded_example_grads` routes each
  lookup's gradient to the owner of its row with ``all_to_all_single``;
  :class:`ShardedExampleGrads` gives exact per-example norms with one all-reduce of a (B,) vector
  of partial squared norms, clipped sums that stay on their shard, and ``dot()`` by reducing a
  (B1, B2) matrix.

``import embgrad.distributed`` imports no framework: torch is imported when a function is called.
Every function here is a collective: call it on every rank of the group, in the same order.
A rank whose input is wrong makes every rank raise :class:`~embgrad.EmbgradError` at the same
point (the first collective carries an error flag), instead of leaving the others waiting; a
rank that dies or never arrives is caught by the process group's ``timeout=``
(``init_process_group(..., timeout=datetime.timedelta(seconds=...))``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backends import Backend
from .errors import EmbgradError
from .sparse import ExampleGrads, RowGrad, coalesce_lookups

__all__ = [
    "RowSharding",
    "ShardedEmbedding",  # noqa: F822 - a torch.nn.Module, given by __getattr__ (imports torch)
    "ShardedExampleGrads",
    "all_reduce_rows",
    "noisy_clipped_sum",
    "sharded_example_grads",
]

METHODS = ("auto", "all_gather", "all_to_all", "dense")


def __getattr__(name: str) -> Any:
    # ShardedEmbedding is a torch.nn.Module: imported (with torch) only when asked for
    if name == "ShardedEmbedding":
        return _td().ShardedEmbedding
    raise AttributeError(f"module 'embgrad.distributed' has no attribute {name!r}")


def _td() -> Any:
    """The torch.distributed backend module (imports torch on first use)."""
    from .backends import torch_distributed
    return torch_distributed


def _torch_backend() -> Backend:
    from .backends.torch import TorchBackend
    return TorchBackend()


def _check_row_grad(row_grad: Any, what: str) -> str | None:
    """Why ``row_grad`` cannot be exchanged, or None."""
    if not isinstance(row_grad, RowGrad):
        return f"{what} takes an embgrad.RowGrad, got {type(row_grad).__name__}"
    if row_grad._backend.name != "torch":
        return (f"{what} works over torch.distributed, so the RowGrad must hold torch tensors; this "
                f"one is on the {row_grad._backend.name} backend")
    dt = str(row_grad.values.dtype)
    if dt not in ("torch.float32", "torch.float64"):
        return f"the RowGrad's values are {dt}; embgrad's RowGrads are float32 or float64"
    return None


def all_reduce_rows(row_grad: RowGrad, group: Any = None, *, method: str = "auto") -> RowGrad:
    """The coalesced sum of every rank's ``RowGrad``, on every rank (a collective).

    Args:
        row_grad: this rank's gradient of a (V, D) table: rows (R,) int64, values (R, D)
            float32/float64, torch tensors (on CPU for gloo, on the GPU for NCCL).
        group: a ``torch.distributed`` process group; ``None`` is the default group.
        method: how the rows travel:

            * ``"all_gather"``: every rank's packed (row, values) entries padded to the largest
              rank's count R_max, one ``all_gather`` (gloo's needs equal sizes), then coalesced
              in rank order. Sends (P − 1) · R_max · (D·s + 8) bytes per rank (s: bytes per value).
            * ``"all_to_all"``: ``all_to_all_single`` with uneven splits, twice: rank j gets every
              rank's rows of the j-th block of V/P rows and sums them (a sparse reduce-scatter),
              then sends its sums to all (a sparse all-gather). Fewer bytes when ranks share rows,
              one more collective.
            * ``"dense"``: one ``all_reduce`` of a dense (V, D + 1) buffer (the extra column counts
              the ranks holding each row). Sends 2 (P − 1) / P · V · (D + 1) · s bytes per rank
              (ring all-reduce).
            * ``"auto"`` (default): ``"dense"`` when P · R_max · (D·s + 8) > 2 · V · (D + 1) · s,
              i.e. when the padded gather would put more bytes on the wire than the ring
              all-reduce. At D = 64 in float32 the switch lies at P · R_max ≈ 1.98 · V: two ranks
              each holding 99% of the table's rows, four ranks each holding 50%. Else
              ``"all_gather"``, the sparse method measured faster (``benchmarks/dist_exchange.py``).

    Returns:
        A ``RowGrad`` of the same table: rows (U,) int64 unique ascending (the union of the ranks'
        rows), values (U, D) in the input dtype, on ``row_grad``'s device; identical on every rank.
        The sparse methods add each row's values in rank order (rank 0's first), so the result
        equals ``g0 + g1 + ... + g_{P-1}`` computed in one process bit for bit; ``"dense"``
        sums in gloo's/NCCL's order (equal to rounding).

    Raises:
        EmbgradError: on every rank, when torch.distributed is not initialized, when any rank
            passes something other than a torch ``RowGrad``, or the ranks disagree on V, D or
            the dtype, or ``method`` is unknown.

    Source: the sparse all-gather of row gradients is what TensorFlow's
    ``IndexedSlices`` all-reduce and Horovod's ``sparse_as_dense=False`` do; the dense switch
    follows the bytes each would put on the wire.
    """
    td = _td()
    c = td.comm(group)
    error = _check_row_grad(row_grad, "embgrad.distributed.all_reduce_rows")
    if error is None and method not in METHODS:
        error = f"method={method!r} is not one of {', '.join(map(repr, METHODS))}"
    return _reduce(td, c, row_grad, method, error, "embgrad.distributed.all_reduce_rows")


def _reduce(td: Any, c: Any, row_grad: Any, method: str, error: str | None, what: str) -> RowGrad:
    """all_reduce_rows on a known Comm; ``error`` (this rank's refusal) makes every rank raise."""
    if error is not None:   # take part in the first collective, so that every rank raises together
        td.gather_meta(c, [0] * (4 + c.size), error, what)
    rows, values, _ = td.exchange_rows(c, row_grad.rows, row_grad.values, row_grad.num_rows, method,
                                       what)
    return RowGrad(rows, values, row_grad.num_rows, row_grad._backend)


# ---------------------------------------------------------------------------- DP across ranks
def noisy_clipped_sum(grads: ExampleGrads, mechanism: Any, *, selection: Any = None,
                      group: Any = None, seed: int | None = None) -> Any:
    """DP-SGD's noisy clipped sum of a batch spread over ranks, on every rank (a collective).

    Each rank holds its own examples' per-example gradients ``grads``. Every example is clipped
    to L2 norm ``mechanism.max_grad_norm`` on its own rank (``grads.clip(C)``); the clipped sums
    are reduced with :func:`all_reduce_rows` (sparse); for DP-AdaFEST, each rank's
    :func:`embgrad.privacy.contribution_counts` are reduced the same way BEFORE the threshold;
    then the mechanism's ``privatize`` runs on every rank with one NumPy ``Generator`` seeded
    identically everywhere, so the noise is drawn once for the whole batch (not once per rank)
    and every rank returns the same result: the one a single process holding the global batch
    gets from ``mechanism.privatize(clipped global sum, [counts | selection],
    numpy.random.default_rng(seed))``. The privacy accounting is therefore that of one process
    with the global batch: :func:`embgrad.privacy.epsilon` (or Opacus's accountant) with the
    GLOBAL batch's sampling rate gives ε.

    Args:
        grads: this rank's torch ``ExampleGrads`` (batch size B_r, may differ between ranks, may
            be 0).
        mechanism: :class:`embgrad.privacy.DPSGD`, :class:`~embgrad.privacy.DPFEST` or
            :class:`~embgrad.privacy.DPAdaFEST`, the same on every rank.
        selection: DP-FEST only: its fixed rows (a ``RowSelection`` or sorted int64 tensor), the
            same on every rank (chosen once, e.g. by :func:`embgrad.privacy.top_k_rows`).
        group: the process group (``None``: default).
        seed: the noise seed, the same int on every rank; ``None`` (default): rank 0 draws one
            from the OS's randomness and sends it to the others.

    Returns:
        DP-SGD: the dense (V, D) noised gradient (a torch tensor, as ``DPSGD.privatize``);
        DP-FEST / DP-AdaFEST: a ``RowGrad`` of the selected rows. Identical on every rank.

    Raises:
        EmbgradError: on every rank, if any rank's input is bad (not a torch ``ExampleGrads``,
            an unknown mechanism, DP-FEST without ``selection``, different seeds, different
            tables).

    Sources: DP-SGD, Abadi et al. 2016 (arXiv 1607.00133); DP-FEST / DP-AdaFEST, Ghazi et al.
    2023 (arXiv 2311.08357); Opacus ``DistributedDPOptimizer``: noise once, on rank 0, before a
    dense all-reduce (here: the same draw on every rank after a sparse one).
    """
    from . import privacy

    td = _td()
    c = td.comm(group)
    what = "embgrad.distributed.noisy_clipped_sum"
    error = None
    total: Any = None
    counts: Any = None
    adafest = isinstance(mechanism, privacy.DPAdaFEST)
    try:
        if not isinstance(grads, ExampleGrads) or grads._backend.name != "torch":
            raise EmbgradError(f"noisy_clipped_sum takes a torch embgrad.ExampleGrads, got "
                               f"{type(grads).__name__}")
        if not isinstance(mechanism, (privacy.DPSGD, privacy.DPFEST, privacy.DPAdaFEST)):
            raise EmbgradError(f"mechanism must be embgrad.privacy.DPSGD, DPFEST or DPAdaFEST, got "
                               f"{type(mechanism).__name__}")
        if isinstance(mechanism, privacy.DPFEST) and selection is None:
            raise EmbgradError("DPFEST needs selection=, its fixed rows (the same on every rank)")
        total = grads.clip(mechanism.max_grad_norm).sum()
        if isinstance(mechanism, privacy.DPAdaFEST):
            counts = privacy.contribution_counts(grads, contribution_bound=mechanism.contribution_bound)
    except EmbgradError as e:
        error = str(e)
    total = _reduce(td, c, total, "auto", error, what)
    if adafest:       # the mechanism is the same on every rank, so is this branch
        counts = _reduce(td, c, counts, "auto", None, what)
    rng = np.random.default_rng(td.agree_on_seed(c, seed))
    if adafest:
        return mechanism.privatize(total, counts, rng)
    if isinstance(mechanism, privacy.DPFEST):
        return mechanism.privatize(total, selection, rng)
    return mechanism.privatize(total, rng)


# ---------------------------------------------------------------------------- row sharding
class RowSharding:
    """A (V, D) table split by rows over the ranks of a process group.

    ``scheme="contiguous"``: rank j owns the rows [floor(jV/P), floor((j+1)V/P)) (TorchRec's
    row-wise sharding, balanced); ``"hashed"``: row r belongs to rank
    ``((r · 2654435761) mod 2^32) · P >> 32`` (multiplicative hashing: frequent low ids spread
    over the ranks), each rank keeping its rows in ascending order.

    ``local_rows``: (V_rank,) int64, the global ids of this rank's rows, in the order of its
    shard (position i of the local table holds global row ``local_rows[i]``).

    Raises:
        EmbgradError: torch.distributed not initialized, V < P, an unknown scheme, or a hashed
            table of 2^31 rows or more.
    """

    __slots__ = ("_shards", "group", "num_rows", "rank", "scheme", "size")

    def __init__(self, num_rows: int, *, scheme: str = "contiguous", group: Any = None):
        td = _td()
        c = td.comm(group)
        if not isinstance(num_rows, (int, np.integer)) or num_rows < c.size:
            raise EmbgradError(f"RowSharding: num_rows must be an int ≥ the group's {c.size} ranks, "
                               f"got {num_rows!r}.")
        if scheme not in ("contiguous", "hashed"):
            raise EmbgradError(f"RowSharding: scheme={scheme!r}; use 'contiguous' or 'hashed'.")
        if scheme == "hashed" and num_rows >= 2 ** 31:
            raise EmbgradError(f"RowSharding: the hashed scheme takes tables below 2^31 rows, got "
                               f"{num_rows}; use scheme='contiguous'.")
        self.num_rows, self.scheme, self.group = int(num_rows), scheme, group
        self.rank, self.size = c.rank, c.size
        self._shards = td.RowShards(self.num_rows, c.size, scheme)

    @property
    def local_rows(self) -> Any:
        """(V_rank,) int64 torch tensor: the global row ids this rank owns, ascending."""
        return self._shards.rows_of(self.rank)

    @property
    def num_local_rows(self) -> int:
        return int(self.local_rows.shape[0])

    def owner(self, ids: Any) -> Any:
        """The owning rank of each global row id (an int64 torch tensor shaped like ``ids``)."""
        return self._shards.owner(ids.reshape(-1)).reshape(ids.shape)

    def to_global(self, local: Any) -> Any:
        """Global row ids of positions ``local`` (int64) in this rank's shard."""
        return self._shards.to_global(local, self.rank)

    def __repr__(self) -> str:
        return (f"RowSharding(num_rows={self.num_rows}, scheme={self.scheme!r}, rank={self.rank} "
                f"of {self.size}, local_rows={self.num_local_rows})")


def sharded_example_grads(ids: Any, output_grad: Any, sharding: RowSharding, *,
                          ignore_index: int | None = None) -> ShardedExampleGrads:
    """Per-example gradients of a row-sharded table, each rank holding its own rows (a collective).

    Each rank passes its own examples' lookups: ``ids`` (B_r, T) (or (N,): one lookup per
    example) int, global row ids, and ``output_grad`` (B_r, T, D) = dLoss/d(looked-up vectors);
    B_r may differ between ranks and may be 0. Every lookup's (example, row, (D,) gradient) is sent
    to the rank owning its row with one ``all_to_all_single`` (uneven splits); examples are
    numbered globally, rank 0's first (``batch_offset`` says where this rank's start).

    Returns:
        :class:`ShardedExampleGrads`: on each rank the global batch's per-example gradients
        restricted to the rank's rows.

    Raises:
        EmbgradError: ``sharding`` is not a :class:`RowSharding` (on this rank only: without it
            there is no group to tell); torch.distributed not initialized; on every rank, if any
            rank's ids or gradients are not torch tensors, the ids are not integers, out of
            [0, V), shaped unlike ``output_grad``, or its gradients hold NaN/Inf, or the ranks
            disagree on V/D.
    """
    if not isinstance(sharding, RowSharding):   # (without it, no group to tell the others)
        raise EmbgradError(f"sharding must be an embgrad.distributed.RowSharding, got "
                           f"{type(sharding).__name__}.")
    td = _td()
    c = td.comm(sharding.group)
    import torch
    error = None
    B, D = 0, 0
    ex = flat = grads = None
    try:
        if not isinstance(ids, torch.Tensor) or not isinstance(output_grad, torch.Tensor):
            raise EmbgradError("ids and output_grad must be torch tensors")
        if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
            raise EmbgradError(f"ids have dtype {ids.dtype}; pass integer ids (ids.long())")
        if ids.dim() not in (1, 2) or tuple(output_grad.shape[:-1]) != tuple(ids.shape) \
                or output_grad.dim() != ids.dim() + 1:
            raise EmbgradError(f"ids must be (B, T) or (N,) and output_grad ids.shape + (D,); got "
                               f"{tuple(ids.shape)} and {tuple(output_grad.shape)}")
        B = int(ids.shape[0])
        T = int(ids.shape[1]) if ids.dim() == 2 else 1
        D = int(output_grad.shape[-1])
        flat = ids.reshape(-1).to(torch.int64)
        grads = output_grad.detach().reshape(-1, D)
        if grads.dtype not in (torch.float32, torch.float64):
            grads = grads.float()
        ex = torch.div(torch.arange(B * T, device=flat.device), T, rounding_mode="floor")
        if ignore_index is not None:
            keep = flat != ignore_index
            flat, grads, ex = flat[keep], grads[keep], ex[keep]
        if flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= sharding.num_rows:
                raise EmbgradError(f"id {lo if lo < 0 else hi} is out of range for a table of "
                                   f"{sharding.num_rows} rows (valid ids 0..{sharding.num_rows - 1})")
            if not bool(torch.isfinite(grads).all()):
                raise EmbgradError("output_grad holds NaN/Inf values; the loss or model diverged")
    except EmbgradError as e:
        error = str(e)
    if error is not None:
        td.gather_meta(c, [0] * (4 + c.size), error, "embgrad.distributed.sharded_example_grads")
    ex, local, vals, sizes = td.route_lookups(c, sharding._shards, ex, flat, grads, B)
    b = _torch_backend()
    total = int(sizes.sum())
    local_grads = coalesce_lookups(b, ex, local, vals, max(sharding.num_local_rows, 1), total, True)
    assert isinstance(local_grads, ExampleGrads)
    return ShardedExampleGrads(local_grads, sharding, tuple(int(s) for s in sizes))


class ShardedExampleGrads:
    """Per-example gradients of a row-sharded table: on each rank, the GLOBAL batch's examples
    restricted to the rows this rank owns.

    ``local``: an ``ExampleGrads`` with ``batch_size`` = the global batch B (all ranks'
    examples, rank 0's first) and ``num_rows`` = this shard's row count, rows numbered within
    the shard (``sharding.to_global`` maps them back). ``batch_sizes``: each rank's B_r.

    Every method that needs all shards (``norms``, ``clip``, ``dot``) is a collective: call it on
    every rank. ``sum()`` is local: the clipped sum of a shard's rows stays on the shard.
    """

    __slots__ = ("_norms", "batch_sizes", "local", "sharding")

    def __init__(self, local: ExampleGrads, sharding: RowSharding, batch_sizes: tuple[int, ...],
                 norms: Any = None):
        self.local = local
        self.sharding = sharding
        self.batch_sizes = batch_sizes
        self._norms = norms

    @property
    def batch_size(self) -> int:
        """The global batch size B (every rank's examples)."""
        return int(sum(self.batch_sizes))

    @property
    def batch_offset(self) -> int:
        """Index of this rank's first example in the global batch."""
        return int(sum(self.batch_sizes[:self.sharding.rank]))

    def partial_squared_norms(self) -> Any:
        """(B,) float: each example's squared norm over THIS shard's rows only (no collective)."""
        b = self.local._backend
        v = self.local.values
        return b.ops.segment_sum(b.ops.sum(v * v, 1), self.local.example_ids, self.batch_size)

    def norms(self) -> Any:
        """(B,) exact per-example L2 norms over the whole table: one all-reduce (sum) of the
        shards' partial squared norms, then a square root. B floats cross the wire, never rows.
        A collective. A torch tensor of the gradients' dtype.

        Raises:
            EmbgradError: torch.distributed is no longer initialized, or this process is not in
                the sharding's group.
        """
        if self._norms is None:
            c = _td().comm(self.sharding.group)
            self._norms = _td().all_reduce_sum(c, self.partial_squared_norms()).sqrt()
        return self._norms

    def clip(self, max_norm: float) -> ShardedExampleGrads:
        """Example b scaled by ``min(1, max_norm / norm_b)`` with the exact global norms
        (DP-SGD clipping); every shard scales its own entries. A collective (the norms).

        Raises:
            EmbgradError: ``max_norm`` is not a positive finite number (checked on this rank,
                before the collective); torch.distributed not initialized.
        """
        if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
            raise EmbgradError(f"max_norm must be a positive finite number, got {max_norm!r}.")
        norms = self.norms()
        factor = (max_norm / norms.clamp(min=1e-30)).clamp(max=1.0)
        return ShardedExampleGrads(self.local.scale(factor), self.sharding, self.batch_sizes,
                                   norms * factor)

    def sum(self) -> RowGrad:
        """The sum over the global batch of this shard's rows: a ``RowGrad`` of the local shard
        (rows numbered within it, ``num_rows`` = the shard's size). Local, no collective."""
        return self.local.sum()

    def dot(self, other: ShardedExampleGrads | None = None) -> Any:
        """(B1, B2) inner products <G_i, H_j> over the whole table: each shard's partial matrix
        from its own rows, summed with one all-reduce. A collective. A float32 (float64)
        torch tensor.

        Raises:
            EmbgradError: ``other`` is not a :class:`ShardedExampleGrads` of a table sharded the
                same way (V, scheme, ranks) and of the same D; torch.distributed not initialized.
        """
        other = self if other is None else other
        if not isinstance(other, ShardedExampleGrads):
            raise EmbgradError(f"dot() takes another ShardedExampleGrads, got {type(other).__name__}.")
        s, o = self.sharding, other.sharding
        if (s.num_rows, s.scheme, s.size) != (o.num_rows, o.scheme, o.size):
            raise EmbgradError(f"dot() needs gradients of the same sharded table: {s!r} vs {o!r}.")
        c = _td().comm(s.group)
        return _td().all_reduce_sum(c, self.local.dot(other.local))

    def __repr__(self) -> str:
        return (f"ShardedExampleGrads(batch_size={self.batch_size}, rank={self.sharding.rank} of "
                f"{self.sharding.size}, local_pairs={self.local.nnz}, local_rows="
                f"{self.sharding.num_local_rows} of {self.sharding.num_rows}, dim={self.local.dim})")
