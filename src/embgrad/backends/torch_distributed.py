"""torch.distributed collectives behind :mod:`embgrad.distributed` (gloo on CPU, NCCL on GPU).

Everything here works on plain torch tensors; :mod:`embgrad.distributed` turns them into
``RowGrad`` / ``ExampleGrads``. The transport is torch.distributed's own collectives
(``all_gather``, ``all_to_all_single``, ``all_reduce``, ``broadcast``); embgrad only decides what
goes into them.

Every collective call here is preceded by one small ``all_gather`` of per-rank metadata
(sizes, the table's shape and dtype, and an error flag), so that a rank whose input is wrong
makes EVERY rank raise ``EmbgradError`` at the same point instead of leaving the others
waiting in a collective until the process group's timeout.

Rows travel packed with their values: int64 row ids (and example ids) are reinterpreted bit
for bit as 2 float32 (or 1 float64) columns beside the D values, so one collective moves both.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import EmbgradError
from .torch import TorchBackend

__all__ = [
    "SPARSE_METHODS",
    "Comm",
    "RowShards",
    "ShardedEmbedding",
    "agree_on_seed",
    "all_reduce_sum",
    "choose_method",
    "comm",
    "exchange_rows",
    "route_lookups",
]

_DTYPE_CODES = {torch.float32: 1, torch.float64: 2}
_TB = TorchBackend()
SPARSE_METHODS = ("all_gather", "all_to_all")
# The sparse exchange chosen by method="auto": benchmarks/dist_exchange.py measures both; the
# padded all_gather (one collective less, one coalesce) was faster or within noise at V = 10^6
# and 10^7, all_to_all ahead only at V = 10^5 (BENCHMARKS.md, section 7).
DEFAULT_SPARSE = "all_gather"


@dataclass(frozen=True)
class Comm:
    """A process group as embgrad uses it: this rank, the group's size, the device its
    collectives need (CPU for gloo, the current CUDA device for NCCL)."""

    group: Any
    rank: int
    size: int
    device: torch.device

    def global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


def comm(group: Any = None) -> Comm:
    """The :class:`Comm` of ``group`` (``None``: the default group).

    Raises:
        EmbgradError: torch.distributed is not initialized, or this process is not in ``group``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise EmbgradError(
            "embgrad.distributed needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPU) first, or launch "
            "the script with torchrun, which sets the rendezvous variables.")
    rank = dist.get_rank(group)
    if rank < 0:
        raise EmbgradError("this process is not a member of the process group it was given; call "
                           "embgrad.distributed only on the ranks of that group.")
    backend = str(dist.get_backend(group)).lower()
    device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
              else torch.device("cpu"))
    return Comm(group, rank, dist.get_world_size(group), device)


def gather_meta(c: Comm, fields: Sequence[int], error: str | None, what: str) -> np.ndarray:
    """(P, 1 + len(fields)) int64: every rank's ``[error flag, *fields]``.

    One ``all_gather`` of a few int64. When any rank flags an error every rank raises here,
    the flagging rank with its own message, the others naming it: nobody is left waiting in a
    later collective.
    """
    t = torch.tensor([1 if error else 0, *fields], dtype=torch.int64, device=c.device)
    out = [torch.empty_like(t) for _ in range(c.size)]
    dist.all_gather(out, t, group=c.group)
    meta = torch.stack(out).cpu().numpy()
    if error:
        raise EmbgradError(f"{what}, rank {c.rank}: {error}")
    bad = np.flatnonzero(meta[:, 0])
    if len(bad):
        raise EmbgradError(
            f"{what}: rank(s) {', '.join(map(str, bad))} refused their input (their own error says "
            f"why); rank {c.rank} stops too, so that no rank waits in a collective.")
    return meta[:, 1:]


# ---------------------------------------------------------------------- packing rows with values
def _int_cols(dtype: torch.dtype) -> int:
    return 8 // torch.empty((), dtype=dtype).element_size()


def pack(ints: Sequence[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """(N, k·len(ints) + D): int64 (N,) columns reinterpreted bit for bit in ``values``' dtype."""
    n = values.shape[0]
    k = _int_cols(values.dtype)
    if n == 0:   # (an empty tensor may have stride 0, which view() refuses)
        return values.new_empty((0, k * len(ints) + values.shape[1]))
    cols = [i.to(torch.int64).contiguous().view(values.dtype).reshape(n, k) for i in ints]
    return torch.cat([*cols, values], 1)


def unpack(buf: torch.Tensor, n_ints: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The inverse of :func:`pack`: the int64 columns and the (N, D) values."""
    k = _int_cols(buf.dtype)
    ints = [buf[:, i * k:(i + 1) * k].contiguous().view(torch.int64).reshape(-1)
            for i in range(n_ints)]
    return ints, buf[:, n_ints * k:]


def coalesce(rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique sorted rows and the sums of their values, in the order the entries come
    (entry n added before entry n+1: the same order on every rank)."""
    if rows.shape[0] == 0:
        return rows, values
    uniq, inv = _TB.ops.unique(rows)
    return uniq, _TB.ops.segment_sum(values, inv, uniq.shape[0])


# ---------------------------------------------------------------------- all_reduce_rows
def choose_method(counts: np.ndarray, num_rows: int, dim: int, itemsize: int) -> str:
    """``"dense"`` when the padded sparse gather would put more bytes on the wire than a ring
    all-reduce of the dense (V, D + 1) table, else :data:`DEFAULT_SPARSE`.

    Per rank, the gather sends (P - 1) · R_max · (D·s + 8) bytes (R_max: the largest rank's
    row count, s: bytes per value, 8 for the row id), the ring all-reduce 2 (P - 1) / P · V ·
    (D + 1) · s. So dense wins when P · R_max · (D·s + 8) > 2 · V · (D + 1) · s: with D = 64,
    float32, when P · R_max > 1.98 · V (each of 2 ranks touching ~99% of the table, each of 4
    ~50%)."""
    P = len(counts)
    r_max = int(counts.max()) if P else 0
    sparse = P * r_max * (dim * itemsize + 8)
    dense = 2 * num_rows * (dim + 1) * itemsize
    return "dense" if sparse > dense else DEFAULT_SPARSE


def _block_bounds(num_rows: int, size: int) -> torch.Tensor:
    """(P + 1,) balanced contiguous blocks: rank j owns rows [floor(jV/P), floor((j+1)V/P))."""
    return torch.div(torch.arange(size + 1, dtype=torch.int64) * num_rows, size, rounding_mode="floor")


def exchange_rows(c: Comm, rows: torch.Tensor, values: torch.Tensor, num_rows: int, method: str,
                  what: str = "embgrad.distributed.all_reduce_rows",
                  ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The coalesced sum over ranks of (rows (R,), values (R, D)): ``(rows, values, method)``.

    ``rows`` unique and sorted on every rank; ``method`` in ``auto``, ``all_gather``,
    ``all_to_all``, ``dense`` (see :func:`embgrad.distributed.all_reduce_rows`).
    """
    dev_in = values.device
    rows = rows.to(c.device)
    values = values.to(c.device)
    R, D = int(rows.shape[0]), int(values.shape[1])
    V = int(num_rows)
    # a2a splits of this rank's rows over the row blocks (the "all_to_all" method's first step)
    bounds = _block_bounds(V, c.size).to(c.device)
    splits = torch.diff(torch.searchsorted(rows, bounds)).cpu().tolist() if R else [0] * c.size
    code = _DTYPE_CODES.get(values.dtype, 0)
    meta = gather_meta(c, [R, V, D, code, *splits], None, what)
    counts, Vs, Ds, codes = meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3]
    for name, col, mine in (("num_rows", Vs, V), ("dim", Ds, D), ("dtype", codes, code)):
        if (col != mine).any():
            desc = {1: "float32", 2: "float64"} if name == "dtype" else {}
            per = ", ".join(f"rank {r}: {desc.get(int(v), int(v))}" for r, v in enumerate(col))
            raise EmbgradError(
                f"{what}: the ranks' RowGrads disagree on {name} "
                f"({per}); every rank must pass the gradient of the same (V, D) table, in the "
                "same dtype.")
    if method == "auto":
        method = choose_method(counts, V, D, values.element_size())
    if counts.sum() == 0:
        out_rows, out_vals = rows[:0], values[:0]
    elif method == "dense":
        out_rows, out_vals = _dense(c, rows, values, V)
    elif method == "all_gather":
        out_rows, out_vals = _gathered(c, rows, values, counts)
    else:
        out_rows, out_vals = _two_phase(c, rows, values, meta[:, 4:], what)
    return out_rows.to(dev_in), out_vals.to(dev_in), method


def _dense(c: Comm, rows: torch.Tensor, values: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense all-reduce of a (V, D + 1) buffer; the last column counts the ranks holding each row,
    so the result has exactly the union of the ranks' rows (also rows that sum to zero)."""
    D = values.shape[1]
    buf = torch.zeros((V, D + 1), dtype=values.dtype, device=c.device)
    buf[rows, :D] = values
    buf[rows, D] = 1
    dist.all_reduce(buf, group=c.group)
    out_rows = torch.nonzero(buf[:, D]).reshape(-1)
    return out_rows, buf.index_select(0, out_rows)[:, :D].contiguous()


def _gathered(c: Comm, rows: torch.Tensor, values: torch.Tensor,
              counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad every rank's packed rows to the largest count, one ``all_gather``, coalesce in rank order."""
    r_max = int(counts.max())
    payload = pack([rows], values)
    if payload.shape[0] < r_max:
        payload = torch.cat([payload, payload.new_zeros((r_max - payload.shape[0], payload.shape[1]))])
    out = [torch.empty_like(payload) for _ in range(c.size)]
    dist.all_gather(out, payload, group=c.group)
    allrows = torch.cat([o[:int(n)] for o, n in zip(out, counts, strict=True)])
    (rows_all,), vals_all = unpack(allrows, 1)
    return coalesce(rows_all, vals_all)


def _two_phase(c: Comm, rows: torch.Tensor, values: torch.Tensor, splits: np.ndarray,
               what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse reduce-scatter then all-gather, both with ``all_to_all_single``'s uneven splits:
    rank j receives every rank's rows of block j, coalesces them, and sends the sums to all."""
    payload = pack([rows], values)
    recv = splits[:, c.rank]
    buf = payload.new_empty((int(recv.sum()), payload.shape[1]))
    dist.all_to_all_single(buf, payload, output_split_sizes=[int(x) for x in recv],
                           input_split_sizes=[int(x) for x in splits[c.rank]], group=c.group)
    (block_rows,), block_vals = unpack(buf, 1)
    block_rows, block_vals = coalesce(block_rows, block_vals)       # source-rank order
    mine = pack([block_rows], block_vals)
    sizes = gather_meta(c, [mine.shape[0]], None, what)[:, 0]
    out = payload.new_empty((int(sizes.sum()), payload.shape[1]))
    dist.all_to_all_single(out, mine.repeat(c.size, 1), output_split_sizes=[int(x) for x in sizes],
                           input_split_sizes=[mine.shape[0]] * c.size, group=c.group)
    (out_rows,), out_vals = unpack(out, 1)
    return out_rows, out_vals.contiguous()        # blocks arrive in order: rows already sorted


def all_reduce_sum(c: Comm, x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a small dense tensor (a (B,) vector, a (B1, B2) matrix), a copy."""
    buf = x.detach().to(c.device).clone()
    dist.all_reduce(buf, group=c.group)
    return buf.to(x.device)


def agree_on_seed(c: Comm, seed: int | None) -> int:
    """One seed on every rank: group rank 0's fresh random seed (``seed=None``), or ``seed``
    checked equal on every rank.

    Raises:
        EmbgradError: the ranks passed different seeds (their noise would differ).
    """
    if seed is not None and (not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 63):
        err: str | None = f"seed must be an int in [0, 2**63) or None, got {seed!r}"
    else:
        err = None
    fresh = secrets.randbits(63) if c.rank == 0 else 0
    meta = gather_meta(c, [0 if seed is None else 1, int(seed or 0), fresh], err,
                       "embgrad.distributed seed")
    given, seeds = meta[:, 0], meta[:, 1]
    if given.any():
        if not given.all() or (seeds != seeds[0]).any():
            per = ", ".join(f"rank {r}: {int(s) if g else None}"
                            for r, (g, s) in enumerate(zip(given, seeds, strict=True)))
            raise EmbgradError(
                f"embgrad.distributed: the ranks passed different noise seeds ({per}); the noise "
                "must be drawn once for the whole batch, so pass the same seed on every rank, or "
                "seed=None on every rank (rank 0 then draws one and sends it to the others).")
        return int(seeds[0])
    return int(meta[0, 2])


# ---------------------------------------------------------------------- row-sharded tables
_HASH_MULT = 2654435761        # Knuth's multiplicative hash (a prime near 2^32 / golden ratio)


class RowShards:
    """Which rank owns which rows of a (V, D) table split over P ranks.

    ``"contiguous"``: rank j owns rows [floor(jV/P), floor((j+1)V/P)) (TorchRec's row-wise
    sharding, with balanced blocks). ``"hashed"``: row r belongs to rank
    ``((r · 2654435761) mod 2^32) · P >> 32`` (Fibonacci hashing: consecutive hot ids land on
    different ranks); its owner keeps its rows in ascending order.
    """

    def __init__(self, num_rows: int, size: int, scheme: str):
        self.num_rows, self.size, self.scheme = int(num_rows), int(size), scheme
        self._bounds = _block_bounds(self.num_rows, self.size)
        self._rows: dict[int, torch.Tensor] = {}

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) int64 owning rank of each global row id."""
        if self.scheme == "contiguous":
            return torch.searchsorted(self._bounds[1:].to(ids.device), ids, right=True)
        h = (ids.to(torch.int64) * _HASH_MULT) & 0xFFFFFFFF
        return torch.div(h * self.size, 1 << 32, rounding_mode="floor")

    def rows_of(self, rank: int) -> torch.Tensor:
        """(V_rank,) int64 ascending global rows owned by ``rank``."""
        if rank not in self._rows:
            if self.scheme == "contiguous":
                self._rows[rank] = torch.arange(int(self._bounds[rank]), int(self._bounds[rank + 1]))
            else:
                all_rows = torch.arange(self.num_rows)
                self._rows[rank] = all_rows[self.owner(all_rows) == rank]
        return self._rows[rank]

    def to_local(self, ids: torch.Tensor, rank: int) -> torch.Tensor:
        """Positions of global rows ``ids`` (all owned by ``rank``) in that rank's shard."""
        if self.scheme == "contiguous":
            return ids - int(self._bounds[rank])
        return torch.searchsorted(self.rows_of(rank).to(ids.device), ids)

    def to_global(self, local: torch.Tensor, rank: int) -> torch.Tensor:
        """Global row ids of positions ``local`` in ``rank``'s shard."""
        if self.scheme == "contiguous":
            return local + int(self._bounds[rank])
        return self.rows_of(rank).to(local.device).index_select(0, local)


def route_lookups(c: Comm, shards: RowShards, example_ids: torch.Tensor, ids: torch.Tensor,
                  values: torch.Tensor, batch_size: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Send each lookup (example id, global row id, (D,) values) to the rank owning its row
    with one ``all_to_all_single`` of uneven splits.

    ``example_ids`` are local to this rank (0..batch_size-1). Returns ``(example_ids,
    local_rows, values, batch_sizes)`` of the lookups this rank owns, in source-rank order, with
    GLOBAL example ids (rank r's examples come after those of ranks 0..r-1), and the (P,)
    batch sizes of all ranks.
    """
    dev_in = values.device
    ids, example_ids, values = ids.to(c.device), example_ids.to(c.device), values.to(c.device)
    owner = shards.owner(ids)
    order = torch.argsort(owner, stable=True)
    send = torch.bincount(owner, minlength=c.size).cpu().tolist()
    code = _DTYPE_CODES.get(values.dtype, 0)
    meta = gather_meta(c, [batch_size, shards.num_rows, int(values.shape[1]), code, *send], None,
                       "embgrad.distributed.sharded_example_grads")
    for name, col in (("num_rows", meta[:, 1]), ("dim", meta[:, 2]), ("dtype", meta[:, 3])):
        if (col != col[0]).any():
            raise EmbgradError(
                f"embgrad.distributed.sharded_example_grads: the ranks disagree on the table's "
                f"{name} ({', '.join(f'rank {r}: {int(v)}' for r, v in enumerate(col))}); every "
                "rank must pass lookups of the same (V, D) table in the same dtype.")
    payload = pack([example_ids.index_select(0, order), ids.index_select(0, order)],
                   values.index_select(0, order))
    recv = meta[:, 4 + c.rank]
    buf = payload.new_empty((int(recv.sum()), payload.shape[1]))
    dist.all_to_all_single(buf, payload, output_split_sizes=[int(x) for x in recv],
                           input_split_sizes=send, group=c.group)
    (ex, rows), vals = unpack(buf, 2)
    sizes = meta[:, 0]
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
    src = torch.repeat_interleave(torch.arange(c.size), torch.from_numpy(recv.astype(np.int64)))
    ex = ex + offsets.index_select(0, src).to(ex.device)
    local = shards.to_local(rows, c.rank)
    return ex.to(dev_in), local.to(dev_in), vals.contiguous().to(dev_in), sizes


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with uneven splits whose backward sends the gradients back the
    way the values came (the splits swapped). torch's own autograd version,
    ``torch.distributed.nn.functional.all_to_all_single``, is deprecated in 2.13 for a private
    module, so this is its few lines over the public collective."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv,
                               input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send,
                               input_split_sizes=ctx.recv, group=ctx.group)
        return back, None, None, None


class ShardedEmbedding(torch.nn.Module):
    """An embedding table split by rows over the ranks: each rank holds ``weight``, the
    (V_rank, D) rows that ``sharding`` gives it, and ``forward(ids)`` returns the (…, D) vectors
    of ANY global ids, fetched from their owners (TorchRec's row-wise sharded embedding,
    routed by hand with two ``all_to_all_single``; the second is differentiable, so
    ``loss.backward()`` brings each lookup's gradient back to the shard that owns its row).

    ``forward`` is a collective: every rank of ``sharding.group`` calls it, in the same order,
    and so also ``backward``.
    """

    def __init__(self, sharding: Any, embedding_dim: int, *, dtype: torch.dtype | None = None,
                 device: Any = None):
        super().__init__()
        if not hasattr(sharding, "_shards"):
            raise EmbgradError(f"ShardedEmbedding takes an embgrad.distributed.RowSharding, got "
                               f"{type(sharding).__name__}.")
        self.sharding = sharding
        self.num_embeddings = int(sharding.num_rows)
        self.embedding_dim = int(embedding_dim)
        n_local = int(sharding._shards.rows_of(sharding.rank).shape[0])
        self.weight = torch.nn.Parameter(torch.empty((n_local, self.embedding_dim), dtype=dtype,
                                                     device=device))
        torch.nn.init.normal_(self.weight)       # as nn.Embedding

    @classmethod
    def from_full(cls, weight: torch.Tensor, sharding: Any) -> ShardedEmbedding:
        """This rank's shard of a full (V, D) table (e.g. pretrained vectors), copied."""
        if weight.dim() != 2 or weight.shape[0] != sharding.num_rows:
            raise EmbgradError(f"ShardedEmbedding.from_full: weight must be ({sharding.num_rows}, D), "
                               f"got {tuple(weight.shape)}.")
        emb = cls(sharding, int(weight.shape[1]), dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            rows = sharding._shards.rows_of(sharding.rank).to(weight.device)
            emb.weight.copy_(weight.detach().index_select(0, rows))
        return emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shards, c = self.sharding._shards, comm(self.sharding.group)
        error = None
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
            error = f"ids must be an integer torch tensor, got {getattr(ids, 'dtype', type(ids))}"
            flat = torch.zeros(0, dtype=torch.int64)
        else:
            flat = ids.reshape(-1).to(torch.int64)
            if flat.numel():
                lo, hi = int(flat.min()), int(flat.max())
                if lo < 0 or hi >= self.num_embeddings:
                    error = (f"id {lo if lo < 0 else hi} is out of range for a table of "
                             f"{self.num_embeddings} rows (valid ids 0..{self.num_embeddings - 1})")
        dev = self.weight.device
        if error is None:
            flat = flat.to(c.device)
            owner = shards.owner(flat)
            order = torch.argsort(owner, stable=True)
            send = torch.bincount(owner, minlength=c.size).cpu().tolist()
        else:
            order, send = flat[:0], [0] * c.size
        meta = gather_meta(c, send, error, "embgrad.distributed.ShardedEmbedding")
        recv = [int(x) for x in meta[:, c.rank]]
        wanted = flat.new_empty(sum(recv))
        dist.all_to_all_single(wanted, flat.index_select(0, order), output_split_sizes=recv,
                               input_split_sizes=send, group=c.group)
        local = shards.to_local(wanted, c.rank).to(dev)
        found = torch.nn.functional.embedding(local, self.weight).to(c.device)
        back = _AllToAll.apply(found, recv, send, c.group)
        out = back.index_select(0, torch.argsort(order))
        return out.reshape(*ids.shape, self.embedding_dim).to(dev)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.sharding.scheme!r}, "
                f"local_rows={self.weight.shape[0]} (rank {self.sharding.rank} of {self.sharding.size})")
