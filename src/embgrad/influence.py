"""``embgrad.influence``: training-data attribution (TracIn / TracInCP) over embedding gradients.

Which training examples made the model say this? TracIn (Pruthi et al., 2020, "Estimating
Training Data Influence by Tracing Gradient Descent", NeurIPS) scores a training example z
against a test example z' by the learning-rate weighted inner product of their loss gradients
summed over checkpoints c::

    TracInCP(z, z') = sum_c  lr_c · <g_c(z), g_c(z')>          g_c = ∇_θ L(θ_c; ·)

Here θ is the embedding tables (one or several embedding layers): a training example's
gradient holds only the T rows it looked up, so the inner products are cheap. Positive scores
are *proponents* (the training example pushed the model towards the test example's label),
negative ones *opponents*; ``TracInCP(z, z)`` is the *self-influence*, large for mislabelled or
atypical training data. Captum's equivalent is ``captum.influence.TracInCP`` (and
``TracInCPFast`` for the last layer); TRAK (Park et al., 2023) and LoGra project dense
gradients the same way :class:`Projection` projects sparse ones.

Two modes, one interface (:class:`ExactIndex`, :class:`ProjectedIndex`):

* **exact**: each example's sparse gradient is kept (memory O(N · T · D)) and scores are the
  sparse join :meth:`embgrad.ExampleGrads.dot`: no approximation, for sets that fit;
* **projected**: each example's gradient is sketched to k numbers by a seeded sparse
  Johnson–Lindenstrauss map (:class:`Projection`, never anything of size V × D), stored as
  float16/float32 shards on disk with a ``manifest.json``; scores are blocked matrix products,
  for millions of examples. Self-influence and the norms used for cosine scores stay exact.

>>> import embgrad.influence as inf                               # doctest: +SKIP
>>> train = inf.collect(model, train_loader, loss_fn, "runs/influence", k=1024)
>>> test = inf.collect(model, test_batches, loss_fn, like=train)    # same projection, in memory
>>> top = train.top(test, n=10)                                    # proponents / opponents
>>> ranking = train.self_influence().argsort()[::-1]                # suspicious examples first

Framework-neutral: gradients come from :func:`embgrad.capture`, the sketch runs on the
framework's own tensors through the backend primitives, storage and queries are NumPy.
"""
from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, get_backend
from .capture import capture
from .errors import EmbgradError
from .sparse import ExampleGrads

__all__ = [
    "Checkpoint",
    "ExactIndex",
    "Influences",
    "ProjectedIndex",
    "Projection",
    "collect",
    "load",
    "recall_at",
]

FORMAT = "embgrad-influence/1"
MANIFEST = "manifest.json"
_METRICS = ("dot", "cosine")
_DTYPES = ("float16", "float32")
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ----------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One model state of TracInCP: ``model`` (a framework model, never modified), ``lr`` the
    learning rate in force after it (its weight in the sum), ``name`` for the manifest.

    Give a separate model object per checkpoint (e.g. ``copy.deepcopy(model)`` then
    ``load_state_dict``): embgrad does not load weights into your model.
    """

    model: Any
    lr: float = 1.0
    name: str = ""

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {type(self.model).__name__}, lr={self.lr:g})"


def _checkpoints(checkpoints: Any) -> list[Checkpoint]:
    """A model, a Checkpoint, a (model, lr) pair, or a list of those -> a list of Checkpoints."""
    if (isinstance(checkpoints, tuple) and len(checkpoints) == 2 and isinstance(checkpoints[1], (int, float))
            and not isinstance(checkpoints[0], (Checkpoint, tuple))):
        items: list[Any] = [checkpoints]
    elif isinstance(checkpoints, (list, tuple)):
        items = list(checkpoints)
        if not items:
            raise EmbgradError("checkpoints is empty: pass a model, a Checkpoint(model, lr), or a list of them.")
    else:
        items = [checkpoints]
    out = []
    for i, c in enumerate(items):
        if isinstance(c, tuple) and len(c) == 2:
            c = Checkpoint(c[0], c[1])
        elif not isinstance(c, Checkpoint):
            c = Checkpoint(c)
        lr = c.lr
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise EmbgradError(f"checkpoint #{i} ({c.name or type(c.model).__name__}): the learning rate "
                               f"must be a positive finite number, got {lr!r}.")
        out.append(Checkpoint(c.model, float(lr), c.name or f"checkpoint-{i}"))
    return out


# ----------------------------------------------------------------------------- projection
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood, 2014) on uint64 arrays, wrapping."""
    z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class Projection:
    """A seeded sparse Johnson–Lindenstrauss sketch of embedding-table gradients to ``k`` numbers.

    The coordinate (layer ℓ, row r, dimension d) of a gradient goes, in each of ``density``
    blocks of ``m = k / density`` outputs, to one bucket with a random sign (the block
    construction of Kane & Nelson, 2014, "Sparser Johnson–Lindenstrauss Transforms", J. ACM
    61(1); ``density=1`` is CountSketch, Charikar et al. 2002; ``density=k`` a dense Rademacher
    matrix). Buckets and signs are a hash of (seed, layer ℓ, r, d, block), so the matrix
    P (k × V·D) is never stored: a batch's unique rows get their (D, density) buckets on the
    fly, and ``P · vec(G_b)`` costs O(T · D · density) per example, a scatter-add over the
    entries the example has. Hash, for u = SplitMix64::

        base(r) = u(u(u(seed) ^ crc32(str(ℓ))) ^ r)       (ℓ: the layer's position, 0, 1, ...)
        z       = u(base(r) ^ (d · density + i))            (block i)
        bucket  = i · m + (z >> 32) mod m,   sign = +1 if z is even else −1,   value ± 1/√density

    Guarantees, for fixed gradients x, y (vectors of all captured tables):

    * unbiased: E⟨Px, Py⟩ = ⟨x, y⟩, with Var⟨Px, Py⟩ = (‖x‖²‖y‖² + ⟨x, y⟩² − 2 Σ_i x_i² y_i²) / k
      ≤ 2 ‖x‖²‖y‖² / k for every density (the density buys concentration, not variance);
    * Johnson–Lindenstrauss (Kane & Nelson, Theorem 1.1): for ε, δ ∈ (0, 1/2), with
      k ≥ C ε⁻² log(1/δ) and density ≥ C ε⁻¹ log(1/δ), Pr[|‖Px‖² − ‖x‖²| > ε‖x‖²] < δ, so
      |⟨Px, Py⟩ − ⟨x, y⟩| ≤ ε ‖x‖ ‖y‖ with probability ≥ 1 − 2δ (polarization), and n points
      keep all pairwise inner products to ε with k = O(ε⁻² log n).

    The theorem assumes O(log(1/δ))-wise independent hashing; SplitMix64 is a pseudo-random
    stand-in (the unbiasedness and variance are checked empirically in the tests).

    Raises:
        EmbgradError: ``k`` or ``density`` not a positive int; ``k`` not a multiple of
            ``density``; ``seed`` not an int in [0, 2**63).
    """

    k: int = 1024
    seed: int = 0
    density: int = 4

    def __post_init__(self) -> None:
        for what, v in (("k", self.k), ("density", self.density)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise EmbgradError(f"Projection {what} must be a positive int, got {v!r}.")
        if self.k % self.density:
            raise EmbgradError(f"Projection k={self.k} must be a multiple of density={self.density} "
                               f"(k / density buckets per block); e.g. k={self.k - self.k % self.density}.")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2 ** 63:
            raise EmbgradError(f"Projection seed must be an int in [0, 2**63), got {self.seed!r}.")

    def tables(self, layer: int, rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Buckets int64 (R, dim · density) in [0, k) and signed values float32 (R, dim · density)
        (± 1/√density) of the coordinates of ``rows`` (int (R,)) of the ``layer``-th captured layer;
        column d · density + i is dimension d in block i."""
        s, m = self.density, self.k // self.density
        salt = np.uint64(zlib.crc32(str(int(layer)).encode("utf-8")))
        top = _splitmix64(_splitmix64(np.array([self.seed], np.uint64)) ^ salt)
        base = _splitmix64(top ^ np.asarray(rows, dtype=np.int64).astype(np.uint64))     # (R,)
        z = _splitmix64(base[:, None] ^ np.arange(dim * s, dtype=np.uint64)[None, :])    # (R, D·s)
        block = np.tile(np.arange(s, dtype=np.int64) * m, dim)
        buckets = block + ((z >> np.uint64(32)) % np.uint64(m)).astype(np.int64)
        signs = np.where(z & np.uint64(1), -1.0, 1.0).astype(np.float32) / np.float32(math.sqrt(s))
        return buckets, signs

    def matrix(self, layer: int, num_rows: int, dim: int, max_bytes: int = 2 ** 28) -> np.ndarray:
        """The dense (k, num_rows · dim) matrix P (float32), for checks on small tables.

        Raises:
            EmbgradError: it would take more than ``max_bytes`` bytes (4 · k · num_rows · dim).
        """
        need = 4 * self.k * num_rows * dim
        if need > max_bytes:
            raise EmbgradError(f"Projection.matrix would take {need / 2**20:.0f} MiB (> max_bytes="
                               f"{max_bytes}); it is meant for small tables only.")
        buckets, signs = self.tables(layer, np.arange(num_rows), dim)
        out = np.zeros((self.k, num_rows * dim), np.float32)
        cols = np.repeat(np.arange(num_rows * dim), self.density)
        np.add.at(out, (buckets.reshape(-1), cols), signs.reshape(-1))
        return out

    def project(self, layer: int, grads: ExampleGrads) -> Any:
        """P · vec(G_b) for each example b of the ``layer``-th captured layer (its position, which
        salts the hash): a float32 framework tensor (B, k) on the gradients' device, by one
        scatter-add of B · T · D · density values through the backend's segment sum.

        Raises:
            EmbgradError: the batch size of ``grads`` is not known (a ``tf.function`` traced
                without a fixed batch size).
        """
        b = get_backend(grads.values)
        B, D, k = len(grads), grads.dim, self.k
        if grads.nnz == 0:
            return b.ops.zeros((B, k), "float32", grads.values)
        rows = b.ops.to_numpy(grads.rows)
        uniq, inv = np.unique(rows, return_inverse=True)
        buckets, signs = self.tables(layer, uniq, D)
        like = grads.values
        inv_t = b.ops.from_numpy(inv.reshape(-1).astype(np.int64), like=like)
        bk = b.ops.gather(b.ops.from_numpy(buckets, like=like), inv_t)                 # (N, D·s)
        sg = b.ops.gather(b.ops.from_numpy(signs, like=like), inv_t)                   # (N, D·s)
        n, s = grads.nnz, self.density
        keys = b.ops.reshape(grads.example_ids, (n, 1)) * k + bk
        values = b.ops.cast(grads.values, "float32")
        data = b.ops.reshape(b.ops.reshape(values, (n, D, 1)) * b.ops.reshape(sg, (n, D, s)), (n * D * s,))
        return b.ops.reshape(b.ops.segment_sum(data, b.ops.reshape(keys, (n * D * s,)), B * k), (B, k))

    def to_json(self) -> dict[str, Any]:
        """The settings as the index manifest stores them: kind, k, seed, density."""
        return {"kind": "sparse-jl-block", "k": int(self.k), "seed": int(self.seed), "density": int(self.density)}


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class Influences:
    """Top training examples per query: ``proponents`` / ``opponents`` int64 (Q, n) training
    indices (most positive / most negative score first), their ``proponent_scores`` /
    ``opponent_scores`` float64 (Q, n), and the ``metric`` ("dot": TracInCP, "cosine")."""

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray
    metric: str

    def __repr__(self) -> str:
        q, n = self.proponents.shape
        return f"Influences({q} queries, top {n}, metric={self.metric!r})"


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q| for int (Q, n) index arrays (e.g.
    projected vs exact proponents: recall@n), a float in [0, 1].

    Raises:
        EmbgradError: ``found`` and ``truth`` have different Q, or ``truth`` is empty.
    """
    found, truth = np.asarray(found), np.asarray(truth)
    if found.shape[0] != truth.shape[0] or truth.size == 0:
        raise EmbgradError(f"recall_at needs (Q, n) arrays of the same Q, got {found.shape} and {truth.shape}.")
    hits = [len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------- indexes
class _Index:
    """What both modes share: a manifest, exact squared norms, and blocked top-n queries."""

    manifest: dict[str, Any]
    mode = ""

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    def __len__(self) -> int:
        return self.num_examples

    @property
    def lrs(self) -> np.ndarray:
        return np.array([c["lr"] for c in self.manifest["checkpoints"]], dtype=np.float64)

    def sqnorms(self) -> np.ndarray:
        """float64 (N, C): ‖g_c(z)‖² per example and checkpoint (exact, all captured layers)."""
        raise NotImplementedError

    def self_influence(self) -> np.ndarray:
        """float64 (N,): TracInCP(z, z) = Σ_c lr_c ‖g_c(z)‖², exact in both modes (Pruthi et al.
        2020, §3; Captum's ``TracInCP.self_influence``). High values flag mislabelled data."""
        return self.sqnorms() @ self.lrs

    def _blocks(self, query: _Index) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def _check_query(self, query: Any) -> _Index:
        if not isinstance(query, type(self)):
            raise EmbgradError(f"a {type(self).__name__} is queried with another {type(self).__name__} "
                               f"(collect the queries with like=this index), got {type(query).__name__}.")
        for key in ("layers", "checkpoints", "projection", "exact_rows"):
            a, b = self.manifest.get(key), query.manifest.get(key)
            if key == "layers":
                a = [(x["num_rows"], x["dim"]) for x in a or []]      # by position: Gluon names differ
                b = [(x["num_rows"], x["dim"]) for x in b or []]      # between instances of one model
            if key == "checkpoints":
                a = [x["lr"] for x in a or []]
                b = [x["lr"] for x in b or []]
            if a != b:
                raise EmbgradError(f"the query was collected with other {key} than this index: {b} vs {a}. "
                                   "Collect the queries with collect(..., like=index).")
        return query

    def scores(self, query: _Index, metric: str = "dot", max_bytes: int = 2 ** 30) -> np.ndarray:
        """float64 (Q, N): TracInCP scores of every query against every indexed example
        ("dot"), or their cosine (scores divided by both examples' exact gradient norms).

        Raises:
            EmbgradError: ``query`` is not an index of the same kind collected ``like`` this one
                (other layers, checkpoints, projection or exact rows); ``metric`` is neither
                "dot" nor "cosine"; Q · N · 8 > ``max_bytes`` (use :meth:`top`, which streams);
                two :class:`ExactIndex` both loaded from disk (no framework to compute in).
        """
        self._check_query(query)
        need = 8 * len(query) * self.num_examples
        if need > max_bytes:
            raise EmbgradError(f"scores() would allocate {need / 2**20:.0f} MiB for ({len(query)}, "
                               f"{self.num_examples}); use top(), which streams, or raise max_bytes.")
        out = np.empty((len(query), self.num_examples))
        for start, block in self._metric_blocks(query, metric):   # float32 (projected) into float64
            out[:, start:start + block.shape[1]] = block
        return out

    def _metric_blocks(self, query: _Index, metric: str) -> Iterator[tuple[int, np.ndarray]]:
        if metric not in _METRICS:
            raise EmbgradError(f"metric must be one of {_METRICS}, got {metric!r}.")
        qn = np.sqrt(query.self_influence()) if metric == "cosine" else None
        mine = np.sqrt(self.self_influence()) if metric == "cosine" else None
        for start, block in self._blocks(query):
            if qn is not None and mine is not None:
                denom = np.outer(qn, mine[start:start + block.shape[1]]).astype(block.dtype)
                block = np.divide(block, denom, out=np.zeros_like(block), where=denom > 0)
            yield start, block

    def top(self, query: _Index, n: int = 10, metric: str = "dot") -> Influences:
        """The ``n`` strongest proponents and opponents of each query among the indexed examples,
        streamed over blocks (memory O(Q · (n + block))).

        ``query``: an index of the same kind collected with ``like=self``; ``metric``: "dot"
        (the TracInCP score) or "cosine". Returns :class:`Influences` with ``min(n, N)``
        columns.

        Raises:
            EmbgradError: ``n`` not a positive int; a mismatched query or bad ``metric`` (as in
                :meth:`scores`); two :class:`ExactIndex` both loaded from disk.
        """
        self._check_query(query)
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise EmbgradError(f"n must be a positive int, got {n!r}.")
        n = min(int(n), self.num_examples)
        Q = len(query)
        best = [(np.empty((Q, 0), np.int64), np.empty((Q, 0)))] * 2     # (proponents, -opponents)
        for start, block in self._metric_blocks(query, metric):
            m = block.shape[1]
            for side in (0, 1):
                if m <= n:
                    part = np.broadcast_to(np.arange(m), block.shape)
                elif side == 0:                                            # the n largest of the block
                    part = np.argpartition(block, m - n, axis=1)[:, m - n:]
                else:                                                      # the n smallest
                    part = np.argpartition(block, n - 1, axis=1)[:, :n]
                vals = np.take_along_axis(block, part, 1).astype(np.float64) * (1.0 if side == 0 else -1.0)
                ids = np.concatenate([best[side][0], part + start], 1)
                vals = np.concatenate([best[side][1], vals], 1)
                if vals.shape[1] > n:
                    keep = np.argpartition(-vals, n - 1, axis=1)[:, :n]
                    ids, vals = np.take_along_axis(ids, keep, 1), np.take_along_axis(vals, keep, 1)
                best[side] = (ids, vals)
        out = []
        for ids, vals in best:
            order = np.lexsort((ids, -vals), axis=1) if Q else np.empty((0, 0), np.int64)
            out.append((np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)))
        return Influences(out[0][0], out[0][1], out[1][0], -out[1][1], metric)

    def __repr__(self) -> str:
        m = self.manifest
        ck = ", ".join(f"{c['name']}@{c['lr']:g}" for c in m["checkpoints"])
        layers = ", ".join(x["name"] for x in m["layers"])
        proj = m.get("projection")
        extra = f", k={proj['k']}, seed={proj['seed']}, {m['dtype']}" if proj else ""
        where = f", path={m['path']!r}" if m.get("path") else ""
        done = "" if m.get("complete", True) else ", INCOMPLETE"
        return (f"{type(self).__name__}({self.num_examples} examples, layers=[{layers}], "
                f"checkpoints=[{ck}]{extra}{where}{done})")


class ExactIndex(_Index):
    """Per-example sparse gradients kept exactly: for each checkpoint and layer the concatenated
    (example, row, values) entries (NumPy; memory O(N · T · D)). Scores are
    :meth:`embgrad.ExampleGrads.dot` on the framework of the query's (or the collection's)
    backend: exact TracInCP."""

    mode = "exact"

    def __init__(self, manifest: dict[str, Any], entries: dict[tuple[int, str], tuple[np.ndarray, ...]],
                 sq: np.ndarray, backend: Backend | None, like: Any = None):
        self.manifest = manifest
        self._entries = entries       # (checkpoint, layer) -> (example_ids, rows, values)
        self._sq = sq
        self._backend = backend
        self._like = like

    def sqnorms(self) -> np.ndarray:
        return self._sq

    def example_grads(self, checkpoint: int, layer: str, backend: Backend | None = None,
                      like: Any = None) -> ExampleGrads:
        """The stored per-example gradients of one checkpoint and layer as an
        :class:`embgrad.ExampleGrads` over all N examples (framework tensors; values float32).

        Raises:
            EmbgradError: the index was loaded from disk and neither ``backend`` nor a
                collected index says which framework to use.
            KeyError: ``checkpoint`` or ``layer`` is not in the index.
        """
        b = backend or self._backend
        if b is None:
            raise EmbgradError("this ExactIndex was loaded from disk and has no framework yet: query it "
                               "with an index collected from a model, or pass backend=.")
        like = like if like is not None else self._like
        ex, rows, values = self._entries[(checkpoint, layer)]
        info = next(x for x in self.manifest["layers"] if x["name"] == layer)
        return ExampleGrads(b.ops.from_numpy(ex, like=like), b.ops.from_numpy(rows, like=like),
                            b.ops.from_numpy(values, like=like), self.num_examples, info["num_rows"], b)

    def _blocks(self, query: _Index) -> Iterator[tuple[int, np.ndarray]]:
        assert isinstance(query, ExactIndex)
        b = query._backend or self._backend
        if b is None:
            raise EmbgradError("both ExactIndexes were loaded from disk: collect the queries from a model "
                               "(collect(..., like=index)) so that embgrad knows the framework to compute in.")
        like = query._like if query._backend is not None else self._like
        total = np.zeros((len(query), self.num_examples))
        for c, lr in enumerate(self.lrs):
            for x_q, x_mine in zip(query.manifest["layers"], self.manifest["layers"], strict=True):
                q = query.example_grads(c, x_q["name"], b, like)
                mine = self.example_grads(c, x_mine["name"], b, like)
                total += lr * b.ops.to_numpy(q.dot(mine)).astype(np.float64)
        yield 0, total

    def save(self, path: str | os.PathLike) -> Path:
        """Write this index to a directory (``manifest.json`` + ``exact.npz``); :func:`load` reads it.

        Raises:
            OSError: the directory cannot be created or written.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {"sqnorms": self._sq}
        for (c, layer), (ex, rows, values) in self._entries.items():
            for name, a in (("ex", ex), ("rows", rows), ("values", values)):
                arrays[f"{c}/{layer}/{name}"] = a
        np.savez(path / "exact.npz", **arrays)
        _write_manifest(path, {**self.manifest, "path": str(path)})
        return path


class ProjectedIndex(_Index):
    """Projected gradients: one row of ``C · k`` numbers per example (checkpoint c's block is
    √lr_c · P g_c(z)), in float16/float32 shards (NumPy memmaps on disk, or arrays in memory),
    plus exact squared norms. Scores are blocked matrix products."""

    mode = "projected"

    def __init__(self, manifest: dict[str, Any], shards: list[tuple[np.ndarray, np.ndarray]]):
        self.manifest = manifest
        self._shards = shards          # [(vectors (n, C·k), sqnorms (n, C))]

    @property
    def projection(self) -> Projection:
        p = self.manifest["projection"]
        return Projection(p["k"], p["seed"], p["density"])

    def sqnorms(self) -> np.ndarray:
        if not self._shards:
            return np.zeros((0, len(self.manifest["checkpoints"])))
        return np.concatenate([np.asarray(sq, dtype=np.float64) for _, sq in self._shards])

    def vectors(self) -> np.ndarray:
        """(N, C · k) float32: every stored row (in memory; prefer :meth:`top` for large N)."""
        if not self._shards:
            width = self.manifest.get("width") or self.projection.k
            return np.zeros((0, len(self.manifest["checkpoints"]) * width), np.float32)
        return np.concatenate([np.asarray(v, dtype=np.float32) for v, _ in self._shards])

    def _blocks(self, query: _Index, block_rows: int = 16384) -> Iterator[tuple[int, np.ndarray]]:
        assert isinstance(query, ProjectedIndex)
        q = query.vectors()
        start = 0
        for v, _ in self._shards:
            for s in range(0, v.shape[0], block_rows):
                part = np.asarray(v[s:s + block_rows], dtype=np.float32)
                yield start + s, q @ part.T
            start += v.shape[0]


# ----------------------------------------------------------------------------- storage
def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST)


def load(path: str | os.PathLike) -> ExactIndex | ProjectedIndex:
    """Open an index written by :func:`collect` (projected shards are memory-mapped read-only).

    Raises:
        EmbgradError: ``path`` holds no readable ``manifest.json``, or one of another format, or
            the collection was interrupted (resume it by calling :func:`collect` again with the
            same arguments).
        OSError: the shards or ``exact.npz`` named by the manifest are missing or unreadable.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        raise EmbgradError(f"{str(path)!r} holds no influence index ({MANIFEST} missing or unreadable); "
                           "write one with embgrad.influence.collect(..., path).") from None
    if manifest.get("format") != FORMAT:
        raise EmbgradError(f"{str(path)!r}: unknown index format {manifest.get('format')!r} (expected {FORMAT!r}).")
    if not manifest.get("complete"):
        raise EmbgradError(f"the index in {str(path)!r} is incomplete ({manifest['num_examples']} examples, "
                           f"{manifest['batches_done']} batches): call collect() again with the same "
                           "arguments to resume it.")
    if manifest["mode"] == "exact":
        z = np.load(path / "exact.npz")
        entries = {}
        for c in range(len(manifest["checkpoints"])):
            for layer in (x["name"] for x in manifest["layers"]):
                entries[(c, layer)] = tuple(z[f"{c}/{layer}/{n}"] for n in ("ex", "rows", "values"))
        return ExactIndex(manifest, entries, z["sqnorms"], None)
    shards = [(np.load(path / s["vectors"], mmap_mode="r")[:s["rows"]],
               np.load(path / s["sqnorms"], mmap_mode="r")[:s["rows"]]) for s in manifest["shards"]]
    return ProjectedIndex(manifest, shards)


class _ShardWriter:
    """Appends projected rows to fixed-size .npy shards (memmaps) and keeps the manifest in step:
    the manifest is rewritten (atomically) after the data it counts has been flushed."""

    def __init__(self, path: Path, manifest: dict[str, Any], width: int, C: int):
        self.path, self.manifest, self.width, self.C = path, manifest, width, C
        self.dtype = np.dtype(manifest["dtype"])
        self.size = int(manifest["shard_size"])
        self._open: tuple[Any, Any] | None = None
        self._open_index = -1
        self._last_sync = time.monotonic()

    def _shard(self, i: int) -> tuple[Any, Any]:
        shards = self.manifest["shards"]
        if i == len(shards):
            shards.append({"vectors": f"shard-{i:05d}.npy", "sqnorms": f"shard-{i:05d}.sqnorms.npy", "rows": 0})
            self._open = None
        s = shards[i]
        if self._open is None or self._open_index != i:
            mode = "r+" if (self.path / s["vectors"]).exists() else "w+"
            vec = np.lib.format.open_memmap(self.path / s["vectors"], mode=mode, dtype=self.dtype,
                                            shape=(self.size, self.width))
            sq = np.lib.format.open_memmap(self.path / s["sqnorms"], mode=mode, dtype=np.float64,
                                           shape=(self.size, self.C))
            self._open, self._open_index = (vec, sq), i
        return self._open

    def append(self, vectors: np.ndarray, sq: np.ndarray, batches: int = 1) -> None:
        pos = 0
        while pos < len(vectors):
            shards = self.manifest["shards"]
            i = len(shards) - 1 if shards and shards[-1]["rows"] < self.size else len(shards)
            vec, sqm = self._shard(i)
            at = self.manifest["shards"][i]["rows"]
            n = min(self.size - at, len(vectors) - pos)
            vec[at:at + n] = vectors[pos:pos + n]
            sqm[at:at + n] = sq[pos:pos + n]
            self.manifest["shards"][i]["rows"] = at + n
            pos += n
        self.manifest["num_examples"] += len(vectors)
        self.manifest["batches_done"] += batches
        if time.monotonic() - self._last_sync > 2.0:
            self.sync()

    def sync(self) -> None:
        if self._open is not None:
            for a in self._open:
                a.flush()
        _write_manifest(self.path, self.manifest)
        self._last_sync = time.monotonic()

    def finish(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Trim the last shard to its rows, mark complete, and return read-only memmaps."""
        self.sync()
        self._open = None
        for s in self.manifest["shards"]:
            if s["rows"] < self.size:
                for key in ("vectors", "sqnorms"):
                    full = np.load(self.path / s[key], mmap_mode="r")
                    part = np.array(full[:s["rows"]])
                    del full
                    np.save(self.path / (s[key] + ".tmp.npy"), part)
                    os.replace(self.path / (s[key] + ".tmp.npy"), self.path / s[key])
        self.manifest["complete"] = True
        _write_manifest(self.path, self.manifest)
        return [(np.load(self.path / s["vectors"], mmap_mode="r")[:s["rows"]],
                 np.load(self.path / s["sqnorms"], mmap_mode="r")[:s["rows"]]) for s in self.manifest["shards"]]


# ----------------------------------------------------------------------------- collection
LossFn = Callable[[Any, Any], Any]


def _batch_grads(ckpts: list[Checkpoint], batch: Any, loss_fn: LossFn, layers: Any,
                 reduction: str) -> list[dict[str, ExampleGrads]]:
    """Per checkpoint, the per-example gradients of every captured layer for one batch."""
    out = []
    for c in ckpts:
        with capture(c.model, layers) as cap:
            loss = loss_fn(c.model, batch)
        grads = cap.gradients(loss, loss_reduction=reduction)
        out.append({name: lg.per_example() for name, lg in grads.items()})
    sizes = {len(eg) for per in out for eg in per.values()}
    if len(sizes) != 1:
        raise EmbgradError(f"one batch gave per-example gradients of different batch sizes {sorted(sizes)} "
                           "across checkpoints or layers; loss_fn must see the same examples every time.")
    return out


def _layer_info(grads: list[dict[str, ExampleGrads]], ckpts: list[Checkpoint]) -> list[dict[str, Any]]:
    """The layers (first checkpoint's names) after checking every checkpoint has the same tables,
    position by position (names may differ: Gluon numbers its blocks per instance)."""
    first = grads[0]
    for c, per in zip(ckpts[1:], grads[1:], strict=True):
        if [(g.num_rows, g.dim) for g in per.values()] != [(g.num_rows, g.dim) for g in first.values()]:
            raise EmbgradError(f"checkpoint {c.name!r} has other embedding layers than {ckpts[0].name!r}: "
                               f"{[(n, g.num_rows, g.dim) for n, g in per.items()]} vs "
                               f"{[(n, g.num_rows, g.dim) for n, g in first.items()]}; TracInCP needs the same model "
                               "at every checkpoint.")
    return [{"name": n, "num_rows": g.num_rows, "dim": g.dim} for n, g in first.items()]


def _length(data: Any) -> int | None:
    try:
        n = len(data)
    except (TypeError, ValueError):   # generators; tf.data with unknown cardinality
        return None
    return int(n) if n >= 0 else None


def _progress(enabled: bool, total: int | None, description: str) -> Any:
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=False)
    bar.add_task(description, total=total, info="")
    return bar


def collect(checkpoints: Any, data: Iterable[Any], loss_fn: LossFn, path: str | os.PathLike | None = None, *,
            layers: Any = None, mode: str = "projected", k: int = 1024, seed: int = 0, density: int = 4,
            dtype: str = "float16", exact_rows: int | Mapping[str, Sequence[int]] = 0,
            loss_reduction: str = "sum", shard_size: int = 65536,
            like: _Index | None = None, progress: bool = True, resume: bool = True,
            description: str = "") -> ExactIndex | ProjectedIndex:
    """Stream ``data`` through :func:`embgrad.capture` at every checkpoint and index the
    per-example embedding gradients for TracInCP queries.

    ``checkpoints``: a model, a :class:`Checkpoint` ``(model, lr, name)``, a ``(model, lr)``
    pair, or a list of those (TracInCP sums ``lr_c ·`` inner products over them; one model = TracIn
    at one checkpoint, lr 1). ``data``: any iterable of batches (a torch ``DataLoader``, a
    ``tf.data.Dataset``, a list...), iterated once, in order. ``loss_fn(model, batch)``: the
    scalar loss of the batch, the *sum* of its examples' losses (or their mean, with
    ``loss_reduction="mean"``), computed the way the framework records gradients (MXNet Gluon:
    inside ``autograd.record()``). ``layers``: which embedding layers (as in :func:`embgrad.capture`;
    the gradient is the concatenation of all of them).

    ``mode``: "exact" (sparse per-example gradients kept, memory O(N · T · D)) or "projected"
    (:class:`Projection` with ``k``, ``seed``, ``density``; rows stored as ``dtype`` float16 or
    float32, ``C · k · itemsize`` bytes per example plus 8 · C for the exact squared norms).
    ``exact_rows`` (projected mode): H, or ``{layer: rows}``: rows kept exactly, outside the sketch
    (H: the H rows of each layer with the most gradient mass Σ‖g_r‖² in the first batch). Their
    part of every score is then exact and the sketch's error scales with the norms of the other
    rows only: worth it when a few rows (a [CLS] token, frequent words) carry most of the
    gradient. Costs H · D more numbers per example and checkpoint.
    ``like``: an index whose mode, projection, exact rows, layers and learning rates to reuse
    (for queries).

    ``path``: a directory to write (``manifest.json`` + shards of ``shard_size`` rows); None keeps
    the index in memory. With ``resume`` (default), a directory left by an interrupted call with
    the same settings is continued: its first ``batches_done`` batches are skipped (so ``data``
    must yield the same batches in the same order; a ``DataLoader`` without shuffling does).
    ``progress``: a ``rich`` progress bar on stderr.

    Returns an :class:`ExactIndex` or :class:`ProjectedIndex`.

    Raises:
        EmbgradError: no checkpoints, or a learning rate that is not a positive finite number;
            ``like`` not an index, or collected with other learning rates or layers; a bad
            ``mode``, ``dtype``, ``shard_size``, ``exact_rows`` (or ``exact_rows`` in exact
            mode, or naming layers or rows that were not captured) or projection settings (as
            :class:`Projection`); ``path`` a file, or a directory holding an index with other
            settings, an exact index, or any index with ``resume=False``; checkpoints or batches
            whose captured layers or batch sizes disagree; ``data`` yielding no batch; and what
            :func:`embgrad.capture` and ``per_example()`` raise for the model and loss.
    """
    ckpts = _checkpoints(checkpoints)
    if like is not None:
        if not isinstance(like, _Index):
            raise EmbgradError(f"like= takes an ExactIndex or ProjectedIndex, got {type(like).__name__}.")
        mode = like.mode
        if mode == "projected":
            p = like.manifest["projection"]
            k, seed, density = p["k"], p["seed"], p["density"]
            dtype = like.manifest["dtype"]
            exact_rows = like.manifest.get("exact_rows") or {}
        if layers is None:
            layers = _like_layers(like, [c.model for c in ckpts])
        lrs = [c.lr for c in ckpts]
        if lrs != list(like.lrs):
            raise EmbgradError(f"like= was collected with learning rates {list(like.lrs)} but these checkpoints "
                               f"have {lrs}; give the same checkpoints (models at the same states).")
    if mode not in ("exact", "projected"):
        raise EmbgradError(f"mode must be 'exact' or 'projected', got {mode!r}.")
    if dtype not in _DTYPES:
        raise EmbgradError(f"dtype must be one of {_DTYPES} (the stored projections), got {dtype!r}.")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise EmbgradError(f"shard_size must be a positive int (rows per shard), got {shard_size!r}.")
    proj = Projection(k, seed, density) if mode == "projected" else None
    heavy_spec = _exact_rows_spec(exact_rows, proj is not None)
    settings = {
        "format": FORMAT, "mode": mode, "model": type(ckpts[0].model).__name__,
        "checkpoints": [{"name": c.name, "lr": c.lr} for c in ckpts],
        "projection": proj.to_json() if proj else None, "dtype": dtype if proj else "float32",
        "loss_reduction": loss_reduction, "shard_size": shard_size, "exact_rows_requested": heavy_spec,
        "requested_layers": layers if layers is None or isinstance(layers, str) else
        [x if isinstance(x, str) else type(x).__name__ for x in layers],
        "layers_by_name": layers is None or isinstance(layers, str) or all(isinstance(x, str) for x in layers),
    }
    from . import __version__
    manifest: dict[str, Any] = {**settings, "layers": None, "num_examples": 0, "batches_done": 0,
                                "exact_rows": heavy_spec if isinstance(heavy_spec, list) else None,
                                "shards": [], "complete": False, "embgrad": __version__,
                                "path": str(path) if path is not None else None}
    out_dir = Path(path) if path is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise EmbgradError(f"path {str(out_dir)!r} is a file; the index needs a directory.")
        old_path = out_dir / MANIFEST
        if old_path.exists():
            try:
                old = json.loads(old_path.read_text())
            except ValueError:
                old = {}
            differs = {key: (old.get(key), v) for key, v in settings.items() if old.get(key) != v}
            if not resume:
                raise EmbgradError(f"{str(out_dir)!r} already holds an influence index; pass another path, "
                                   "delete it, or resume=True to continue it.")
            if differs:
                what = ", ".join(f"{key}: {a!r} there, {b!r} now" for key, (a, b) in differs.items())
                raise EmbgradError(f"{str(out_dir)!r} holds an index collected with other settings "
                                   f"({what}); pass another path or the same settings.")
            if mode == "exact":
                raise EmbgradError(f"{str(out_dir)!r} holds an exact index; exact indexes are written at the end "
                                   "and cannot be resumed: delete the directory or use mode='projected'.")
            manifest = old
            if manifest.get("complete"):
                return load(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    skip = int(manifest["batches_done"])
    C = len(ckpts)
    writer: _ShardWriter | None = None
    mem_vecs: list[np.ndarray] = []
    mem_sq: list[np.ndarray] = []
    exact: dict[tuple[int, str], list[list[np.ndarray]]] = {}
    backend: Backend | None = None
    like_t: Any = None
    offset = 0
    total = _length(data)
    desc = description or f"collecting gradients ({mode}{f', k={k}' if proj else ''}, {C} checkpoint{'s' * (C > 1)})"
    with _progress(progress, total, desc) as bar:
        try:
            for i, batch in enumerate(data):
                if i < skip:
                    if bar is not None:
                        bar.update(bar.task_ids[0], advance=1, info="skipping (resumed)")
                    continue
                grads = _batch_grads(ckpts, batch, loss_fn, layers, loss_reduction)
                info = _layer_info(grads, ckpts)
                if manifest["layers"] is None:
                    manifest["layers"] = info
                elif [(x["num_rows"], x["dim"]) for x in manifest["layers"]] != [
                        (x["num_rows"], x["dim"]) for x in info]:
                    raise EmbgradError(f"batch {i} captured layers {info}, earlier batches {manifest['layers']}.")
                names = [x["name"] for x in manifest["layers"]]
                grads = [dict(zip(names, per.values(), strict=True)) for per in grads]   # by position
                first = next(iter(grads[0].values()))
                B = len(first)
                backend = backend or get_backend(first.values)
                like_t = like_t if like_t is not None else first.values
                sq = np.zeros((B, C))
                for c, per in enumerate(grads):
                    for eg in per.values():
                        sq[:, c] += backend.ops.to_numpy(eg.norms()).astype(np.float64) ** 2
                if proj is not None:
                    if manifest["exact_rows"] is None:
                        manifest["exact_rows"] = _resolve_exact_rows(backend, grads, heavy_spec)
                    heavy = [np.asarray(r, np.int64) for r in manifest["exact_rows"]]
                    vec = np.concatenate([_project_batch(backend, proj, per, heavy) * np.float32(math.sqrt(ckpts[c].lr))
                                          for c, per in enumerate(grads)], axis=1)
                    manifest["width"] = vec.shape[1] // C
                    if writer is None and out_dir is not None:
                        writer = _ShardWriter(out_dir, manifest, vec.shape[1], C)
                    if writer is not None:
                        writer.append(vec, sq)
                    else:
                        mem_vecs.append(vec.astype(dtype))
                        mem_sq.append(sq)
                        manifest["num_examples"] += B
                        manifest["batches_done"] += 1
                else:
                    for c, per in enumerate(grads):
                        for name, eg in per.items():
                            parts = exact.setdefault((c, name), [[], [], []])
                            parts[0].append(backend.ops.to_numpy(eg.example_ids).astype(np.int64) + offset)
                            parts[1].append(backend.ops.to_numpy(eg.rows).astype(np.int64))
                            parts[2].append(backend.ops.to_numpy(eg.values).astype(np.float32))
                    mem_sq.append(sq)
                    manifest["num_examples"] += B
                    manifest["batches_done"] += 1
                offset += B
                if bar is not None:
                    bar.update(bar.task_ids[0], advance=1, info=f"{manifest['num_examples']:,} examples")
        finally:
            if writer is not None:
                writer.sync()
    if manifest["layers"] is None:
        raise EmbgradError("data yielded no batch: there is nothing to index.")
    if proj is not None:
        if writer is not None:
            return ProjectedIndex(manifest, writer.finish())
        manifest["complete"] = True
        shards = [(np.concatenate(mem_vecs), np.concatenate(mem_sq))] if mem_vecs else []
        return ProjectedIndex(manifest, shards)
    manifest["complete"] = True
    entries = {key: tuple(np.concatenate(p) for p in parts) for key, parts in exact.items()}
    index = ExactIndex(manifest, entries, np.concatenate(mem_sq), backend, like_t)
    if out_dir is not None:
        index.save(out_dir)
    return index


def _like_layers(like: _Index, models: list[Any]) -> Any:
    """The layers to capture for a query collected ``like`` an index: the index's layer names when
    every checkpoint's model has them all, else what the index was asked for by name (None: every
    layer)."""
    names = [x["name"] for x in like.manifest["layers"]]
    if all(set(names) <= set(get_backend(m).find_embeddings(m)) for m in models):
        return names
    req = like.manifest.get("requested_layers")
    if req is None or isinstance(req, str) or (isinstance(req, list) and like.manifest.get("layers_by_name")):
        return req
    raise EmbgradError(f"these models do not all have the index's layers {names} by name, and the index was "
                       "given layer objects: pass layers= (the same layers) to collect(..., like=index).")


def _exact_rows_spec(exact_rows: Any, projected: bool) -> Any:
    """``exact_rows`` checked: an int H >= 0, {layer name: sorted unique rows}, or (from a
    manifest) a list of sorted rows per layer position."""
    if isinstance(exact_rows, (int, np.integer)) and not isinstance(exact_rows, bool) and exact_rows >= 0:
        return int(exact_rows)
    if isinstance(exact_rows, list) and all(isinstance(v, list) for v in exact_rows):
        return [sorted({int(r) for r in v}) for v in exact_rows]
    if isinstance(exact_rows, Mapping) and all(isinstance(k, str) for k in exact_rows):
        try:
            out = {k: sorted({int(r) for r in v}) for k, v in exact_rows.items()}
        except (TypeError, ValueError):
            out = None
        if out is not None and all(r >= 0 for v in out.values() for r in v):
            if not projected and any(out.values()):
                raise EmbgradError("exact_rows applies to mode='projected' (exact mode keeps every row exactly).")
            return out
    raise EmbgradError(f"exact_rows must be an int >= 0 (how many heaviest rows per layer) or a mapping "
                       f"{{layer name: [row ids]}}, got {exact_rows!r}.")


def _resolve_exact_rows(b: Backend, grads: list[dict[str, ExampleGrads]], spec: Any) -> list[list[int]]:
    """Per layer position, the sorted rows kept exactly: given by name, or the H rows with the
    largest Σ‖g‖² over the first batch and every checkpoint."""
    if isinstance(spec, dict):
        unknown = set(spec) - set(grads[0])
        if unknown:
            raise EmbgradError(f"exact_rows names layers {sorted(unknown)} that were not captured; captured: "
                               f"{', '.join(grads[0])}.")
        out = []
        for name, eg in grads[0].items():
            rows = spec.get(name, [])
            if rows and rows[-1] >= eg.num_rows:
                raise EmbgradError(f"exact_rows: row {rows[-1]} is out of range for layer {name!r} of "
                                   f"{eg.num_rows} rows.")
            out.append(list(rows))
        return out
    H = int(spec)
    out = []
    for name, first in grads[0].items():
        mass = np.zeros(first.num_rows)
        for per in grads:
            eg = per[name]
            if H and eg.nnz:
                sq = b.ops.to_numpy(b.ops.sum(eg.values * eg.values, 1)).astype(np.float64)
                mass += np.bincount(b.ops.to_numpy(eg.rows), weights=sq, minlength=first.num_rows)
        top = np.argsort(-mass, kind="stable")[:H] if H else np.empty(0, np.int64)
        out.append(sorted(int(r) for r in top if mass[r] > 0))
    return out


def _project_batch(b: Backend, proj: Projection, per: dict[str, ExampleGrads],
                   heavy: list[np.ndarray]) -> np.ndarray:
    """float32 (B, k + Σ H_l · D_l): the sketch of every layer's rows outside ``heavy`` (summed over
    layers), then each layer's ``heavy`` rows exactly (B, H_l · D_l)."""
    sketch, dense = None, []
    for pos, eg in enumerate(per.values()):
        rows_h = heavy[pos]
        H = len(rows_h)
        if H and eg.nnz:
            rows = b.ops.to_numpy(eg.rows)
            at = np.searchsorted(rows_h, rows)
            hit = (at < H) & (rows_h[np.minimum(at, H - 1)] == rows)
            keep, take = b.ops.from_numpy(~hit, like=eg.rows), b.ops.from_numpy(hit, like=eg.rows)
            values = eg.values
            tail = ExampleGrads(b.ops.boolean_mask(eg.example_ids, keep), b.ops.boolean_mask(eg.rows, keep),
                                b.ops.boolean_mask(values, keep), len(eg), eg.num_rows, b)
            keys = (b.ops.boolean_mask(eg.example_ids, take) * H
                    + b.ops.from_numpy(at[hit].astype(np.int64), like=eg.rows))
            block = b.ops.segment_sum(b.ops.cast(b.ops.boolean_mask(values, take), "float32"), keys, len(eg) * H)
            dense.append(b.ops.to_numpy(b.ops.reshape(block, (len(eg), H * eg.dim))))
            part = proj.project(pos, tail)
        else:
            if H:
                dense.append(np.zeros((len(eg), H * eg.dim), np.float32))
            part = proj.project(pos, eg)
        sketch = part if sketch is None else sketch + part
    return np.concatenate([b.ops.to_numpy(sketch), *dense], axis=1)
