"""Sparsity-preserving noise for the gradients of embedding tables: DP-SGD, DP-FEST, DP-AdaFEST.

Framework-neutral: everything here works on :class:`~embgrad.RowGrad` (any backend) and the
backend's tensor primitives; the randomness comes from a NumPy ``Generator`` (seeded from the
OS when none is given, like Opacus outside ``secure_mode``: not a cryptographically secure
generator). Nothing here creates a (V, D) tensor except :func:`dense_noise`, which is the dense
DP-SGD baseline by definition.

Methods (Ghazi, Huang, Kamath, Kumar, Manurangsi, Sinha, Zhang: "Sparsity-Preserving
Differentially Private Training of Large Embedding Models", NeurIPS 2023, arXiv 2311.08357):

- **DP-SGD** (Abadi et al. 2016): N(0, σ²C²) on every entry of the (V, D) table gradient.
- **DP-FEST**: a fixed set of k rows (the top-k by public counts, or by counts with Gaussian
  noise, chosen once); only those rows are updated and noised every step.
- **DP-AdaFEST**: every step, each example's row-contribution vector (1 on each distinct row it
  looked up) is clipped to L2 norm ``contribution_bound``; the vectors are summed, Gaussian noise
  N(0, σ_sel²·bound²) is added and the rows whose noisy count reaches ``threshold`` are kept. The
  gradient's noise N(0, σ_grad²C²) then goes only on the kept rows. Untouched rows pass the
  threshold with probability Φ̄(τ / (σ_sel·bound)) each; they are sampled without ever touching
  V (a binomial number of false positives, then that many distinct untouched rows).

The two steps are separately callable, so a distributed trainer can sum the counts over ranks
(e.g. ``embgrad.distributed.all_reduce_rows``) before :func:`select_rows`, and draw the noise
once, from the same seeded generator, on every rank.

The noise split ("budget fraction") follows zero-concentrated DP: a Gaussian mechanism with
noise multiplier σ costs ρ = 1/(2σ²); the selection gets the share ``selection_fraction`` of the
ρ of one step's equivalent Gaussian (σ_sel = σ/√f per table, times √(number of tables)), the
gradient the rest (σ_grad = σ/√(1−f)). The two Gaussians on one sampled batch are then exactly
one Gaussian mechanism of noise multiplier σ (see :mod:`embgrad.privacy.accounting`). TF
Privacy's ``sparse_selection_privacy_budget_fraction`` parametrizes the same split differently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backends import Backend, get_backend
from ..errors import EmbgradError
from ..sparse import ExampleGrads, RowGrad

__all__ = [
    "RowSelection",
    "contribution_counts",
    "dense_noise",
    "false_positive_probability",
    "gaussian_noise",
    "make_rng",
    "noise_rows",
    "select_rows",
    "split_noise_multiplier",
    "top_k_rows",
]


def make_rng(rng: Any = None) -> np.random.Generator:
    """A NumPy Generator from ``None`` (fresh OS entropy), an int seed or a Generator (returned
    as it is, so draws continue its stream).

    Raises:
        EmbgradError: ``rng`` is of another type.
    """
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise EmbgradError(f"rng must be None, an int seed or a numpy.random.Generator, got "
                       f"{type(rng).__name__}.")


def _check_nonneg(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(x)) or x < 0:
        raise EmbgradError(f"{what} must be a finite number >= 0, got {x!r}.")
    return float(x)


def _check_pos(x: Any, what: str) -> float:
    v = _check_nonneg(x, what)
    if v == 0:
        raise EmbgradError(f"{what} must be > 0, got {x!r}.")
    return v


def split_noise_multiplier(noise_multiplier: float, selection_fraction: float,
                           num_selections: int = 1) -> tuple[float, float]:
    """``(σ_selection, σ_gradient)`` whose composition equals one Gaussian of ``noise_multiplier``.

    Args:
        noise_multiplier: σ of the equivalent single Gaussian mechanism (per step).
        selection_fraction: f in (0, 1): the share of the step's privacy cost (ρ = 1/(2σ²),
            zero-concentrated DP) spent on row selection.
        num_selections: number of tables with their own selection (each gets f/num_selections).
    Returns:
        σ_sel = σ·√(num_selections/f) (noise on row counts, in units of ``contribution_bound``)
        and σ_grad = σ/√(1−f) (noise on the gradient, in units of the clipping norm C), so
        num_selections/σ_sel² + 1/σ_grad² = 1/σ².
    Raises:
        EmbgradError: σ ≤ 0, f outside (0, 1), num_selections < 1.
    """
    sigma = _check_pos(noise_multiplier, "noise_multiplier")
    f = _check_pos(selection_fraction, "selection_fraction")
    if not f < 1:
        raise EmbgradError(f"selection_fraction must be in (0, 1) (the share of the privacy budget "
                           f"spent on row selection), got {selection_fraction!r}.")
    if not isinstance(num_selections, (int, np.integer)) or num_selections < 1:
        raise EmbgradError(f"num_selections must be an int >= 1, got {num_selections!r}.")
    return sigma * math.sqrt(num_selections / f), sigma / math.sqrt(1.0 - f)


@dataclass(frozen=True)
class RowSelection:
    """Rows of one (V, D) table chosen to be updated (and noised) this step.

    ``rows``: int64 framework tensor (S,), unique, ascending. ``true_positives``: selected rows
    that some example looked up; ``false_positives``: selected rows nobody looked up (the price
    of privacy: they get pure noise). For a fixed DP-FEST set both counts are 0.
    """

    rows: Any
    num_rows: int
    true_positives: int = 0
    false_positives: int = 0
    _backend: Backend | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(np.asarray(self.rows.shape)[0]) if hasattr(self.rows, "shape") else len(self.rows)

    def numpy(self) -> np.ndarray:
        """``rows`` as NumPy int64 (S,)."""
        b = self._backend or get_backend(self.rows)
        return b.ops.to_numpy(self.rows)

    def __repr__(self) -> str:
        return (f"RowSelection(rows={len(self)} of {self.num_rows}, true_positives="
                f"{self.true_positives}, false_positives={self.false_positives})")


def contribution_counts(lookups: Any, num_rows: int | None = None, *,
                        contribution_bound: float = 1.0, ignore_index: int | None = None) -> RowGrad:
    """Per-row sums of the examples' clipped contribution vectors (DP-AdaFEST's counting step).

    Example b contributes 1 to each distinct row it looked up; that 0/1 vector is scaled to L2
    norm at most ``contribution_bound`` (each of its k_b rows gets min(1, bound/√k_b)), so adding
    or removing one example moves the counts by at most ``contribution_bound`` in L2 norm.

    Args:
        lookups: an :class:`~embgrad.ExampleGrads` (its (example, row) pairs), or ids (B, T)
            int (framework tensor or NumPy; each row of ids is one example).
        num_rows: V; required with ids, taken from the ExampleGrads otherwise.
        contribution_bound: the L2 bound C1 of one example's contribution vector (> 0).
        ignore_index: with ids, a padding id that counts for nothing.
    Returns:
        a :class:`~embgrad.RowGrad` with values (R, 1) float32: the touched rows and their
        counts. RowGrads add, so counts of several ranks sum with ``all_reduce_rows``.
    Raises:
        EmbgradError: ids not (B, T) integers, an id out of range, bad bound.
    """
    bound = _check_pos(contribution_bound, "contribution_bound")
    if isinstance(lookups, ExampleGrads):
        b = lookups._backend
        ex, rows = lookups.example_ids, lookups.rows     # unique (example, row) pairs
        V = lookups.num_rows
        batch = lookups.batch_size      # an int; a scalar tensor while tracing a tf.function
        like = lookups._base
    else:
        if num_rows is None:
            raise EmbgradError("contribution_counts(ids) needs num_rows= (the table's V).")
        ids = lookups
        if isinstance(ids, (np.ndarray, list, tuple)):
            raise EmbgradError("contribution_counts: give the ids as a framework tensor (torch.Tensor, "
                               "tf.Tensor, ...) or an ExampleGrads, not NumPy: the counts are a "
                               "RowGrad on the ids' framework and device.")
        b = get_backend(ids)
        ids_np = b.ops.to_numpy(ids)
        if ids_np.ndim != 2 or not np.issubdtype(ids_np.dtype, np.integer):
            raise EmbgradError(f"contribution_counts: ids must be (B, T) integers, got shape "
                               f"{ids_np.shape} dtype {ids_np.dtype}.")
        V = int(num_rows)
        B, T = ids_np.shape
        exn = np.repeat(np.arange(B, dtype=np.int64), T)
        flat = ids_np.reshape(-1).astype(np.int64)
        if ignore_index is not None:
            keep = flat != ignore_index
            exn, flat = exn[keep], flat[keep]
        if flat.size and (flat.min() < 0 or flat.max() >= V):
            bad = flat.min() if flat.min() < 0 else flat.max()
            raise EmbgradError(f"contribution_counts: id {bad} is out of range for a table of {V} "
                               f"rows (valid ids are 0..{V - 1}).")
        keys = np.unique(exn * V + flat)
        ex = b.ops.from_numpy(keys // V, like=ids)
        rows = b.ops.from_numpy(keys % V, like=ids)
        batch = B
        like = b.ops.cast(ids, "float32")
    n_pairs = b.ops.shape(rows)[0]
    if isinstance(n_pairs, int) and n_pairs == 0:
        return RowGrad(b.ops.cast(rows, "int64"), b.ops.zeros((0, 1), "float32", like), V, b)
    ones = b.ops.cast(ex, "float32") * 0.0 + 1.0
    k = b.ops.segment_sum(ones, ex, batch)                                   # (B,) distinct rows
    weight = b.ops.minimum(bound / b.ops.sqrt(b.ops.maximum(k, 1.0)), 1.0)           # (B,)
    uniq, inv = b.ops.unique(rows)
    counts = b.ops.segment_sum(b.ops.gather(weight, ex), inv, b.ops.shape(uniq)[0])
    return RowGrad(uniq, b.ops.reshape(counts, (-1, 1)), V, b)


def false_positive_probability(threshold: float, noise_std: float) -> float:
    """Φ̄(τ/σ): the chance that an untouched row's noisy count N(0, σ²) reaches ``threshold``.

    ``threshold`` τ and ``noise_std`` σ in count units; 0.0 when σ = 0.

    Raises:
        EmbgradError: ``threshold`` or ``noise_std`` is not a finite number >= 0.
    """
    t = _check_nonneg(threshold, "threshold")
    s = _check_nonneg(noise_std, "noise_std")
    if s == 0:
        return 0.0
    return 0.5 * math.erfc(t / (s * math.sqrt(2.0)))


def select_rows(counts: RowGrad, threshold: float, noise_std: float, rng: Any = None) -> RowSelection:
    """DP-AdaFEST's selection: rows whose count + N(0, noise_std²) reaches ``threshold``.

    Touched rows (those in ``counts``) get their Gaussian draw; the V − R untouched rows would
    pass with probability p = Φ̄(τ/σ) each, so their number is drawn as Binomial(V − R, p) and
    that many distinct untouched rows are drawn uniformly (distinct ranks among the untouched
    rows, mapped past the touched ones): O(R + selected) work, never O(V·D).

    Args:
        counts: (R, 1) counts from :func:`contribution_counts` (summed over ranks if distributed).
        threshold: τ in count units (≥ 0); e.g. a few times noise_std to keep false positives rare.
        noise_std: σ_sel·contribution_bound, the std of the noise on each count (≥ 0; 0 keeps
            exactly the rows with count ≥ τ: not private).
        rng: None, an int seed or a numpy Generator (same seed on every rank: same selection).
    Returns:
        :class:`RowSelection` (rows int64 framework tensor, sorted; its counts of true and
        false positives).
    Raises:
        EmbgradError: counts not a (R, 1) RowGrad, negative threshold or std; ``rng`` is not None,
            an int or a ``numpy.random.Generator``.
    """
    if not isinstance(counts, RowGrad) or counts.dim != 1:
        raise EmbgradError(f"select_rows() takes the (R, 1) counts RowGrad of contribution_counts(), "
                           f"got {counts!r}.")
    tau = _check_nonneg(threshold, "threshold")
    std = _check_nonneg(noise_std, "noise_std")
    g = make_rng(rng)
    b = counts._backend
    touched = np.asarray(b.ops.to_numpy(counts.rows), dtype=np.int64)
    c = np.asarray(b.ops.to_numpy(counts.values), dtype=np.float64).reshape(-1)
    noisy = c + g.standard_normal(c.shape[0]) * std if std > 0 else c
    tp = touched[noisy >= tau]
    V = counts.num_rows
    fp = _sample_untouched(touched, V, false_positive_probability(tau, std), g)
    rows = np.union1d(tp, fp)            # disjoint, sorted
    return RowSelection(b.ops.from_numpy(rows.astype(np.int64), like=counts.rows), V,
                        int(tp.shape[0]), int(fp.shape[0]), b)


def _sample_untouched(touched: np.ndarray, num_rows: int, p: float, g: np.random.Generator) -> np.ndarray:
    """Each of the rows not in ``touched`` (sorted, unique) independently with probability p:
    a Binomial count, then that many distinct ranks in [0, V − R), mapped to rows."""
    free = num_rows - touched.shape[0]
    if p <= 0 or free <= 0:
        return np.zeros(0, np.int64)
    n = int(g.binomial(free, p))
    if n == 0:
        return np.zeros(0, np.int64)
    ranks = np.sort(g.choice(free, size=n, replace=False)).astype(np.int64)
    # untouched row of rank r: r + #{touched rows t_j with t_j - j <= r}
    shifted = touched - np.arange(touched.shape[0], dtype=np.int64)
    return ranks + np.searchsorted(shifted, ranks, side="right")


def top_k_rows(counts: Any, k: int, *, noise_std: float = 0.0, rng: Any = None,
               like: Any = None) -> RowSelection:
    """DP-FEST's fixed row set: the k rows with the largest (noisy) counts, chosen once.

    Args:
        counts: public counts, a NumPy (V,) array (then ``noise_std`` may be 0: no privacy cost),
            or a :class:`~embgrad.RowGrad` (R, 1) of the training data's contribution counts
            summed over the dataset (then ``noise_std`` > 0 is needed for privacy; every one of
            the V rows gets noise, a (V,) float vector, never (V, D)).
        k: number of rows kept (1 ≤ k ≤ V).
        noise_std: std of the Gaussian added to every count (σ_topk · contribution_bound).
        like: a framework tensor whose backend/device the rows get (with NumPy counts).
    Returns:
        :class:`RowSelection` of k sorted rows.
    Raises:
        EmbgradError: ``k`` not an int in 1..V; NumPy counts not of shape (V,); ``noise_std``
            negative or not finite; ``like`` not a framework tensor; ``rng`` is not None, an int or
            a ``numpy.random.Generator``.
    """
    std = _check_nonneg(noise_std, "noise_std")
    g = make_rng(rng)
    if isinstance(counts, RowGrad):
        cb = counts._backend
        b: Backend | None = cb
        V = counts.num_rows
        dense = np.zeros(V, np.float64)
        dense[cb.ops.to_numpy(counts.rows)] = cb.ops.to_numpy(counts.values).reshape(-1)
        like = counts.rows
    else:
        dense = np.asarray(counts, dtype=np.float64)
        if dense.ndim != 1:
            raise EmbgradError(f"top_k_rows: counts must be a (V,) array, got shape {dense.shape}.")
        V = dense.shape[0]
        b = get_backend(like) if like is not None else None
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= V:
        raise EmbgradError(f"top_k_rows: k must be an int in 1..{V}, got {k!r}.")
    if std > 0:
        dense = dense + g.standard_normal(V) * std
    rows = np.sort(np.argpartition(-dense, k - 1)[:k]).astype(np.int64)
    out = rows if b is None else b.ops.from_numpy(rows, like=like)
    return RowSelection(out, V, 0, 0, b)


def gaussian_noise(shape: tuple[int, ...], std: float, like: Any, rng: Any = None) -> Any:
    """A framework float32 tensor of ``shape`` holding N(0, std²) draws, on ``like``'s device.

    Raises:
        EmbgradError: ``like`` is not a tensor of a supported framework; ``rng`` is not None, an int
            or a ``numpy.random.Generator``.
    """
    b = get_backend(like)
    g = make_rng(rng)
    return b.ops.from_numpy(g.standard_normal(shape, dtype=np.float32) * np.float32(std), like=like)


def noise_rows(grad: RowGrad, selection: Any, std: float, rng: Any = None) -> RowGrad:
    """The gradient restricted to the selected rows, plus N(0, std²) on each of their entries.

    Rows of ``grad`` outside the selection are dropped (DP-FEST/AdaFEST do not update them);
    selected rows ``grad`` does not hold get pure noise.

    Args:
        grad: the clipped, summed gradient of the table (R, D).
        selection: a :class:`RowSelection` or a sorted unique int64 framework tensor (S,).
        std: σ_grad · C (≥ 0), in the gradient's units.
    Returns:
        :class:`~embgrad.RowGrad` with rows = the selection, values (S, D) float32 or wider.
    Raises:
        EmbgradError: a selection of another table, std < 0 or not finite; ``rng`` is not None, an
            int or a ``numpy.random.Generator``.
    """
    s = _check_nonneg(std, "std")
    rows = selection.rows if isinstance(selection, RowSelection) else selection
    if isinstance(selection, RowSelection) and selection.num_rows != grad.num_rows:
        raise EmbgradError(f"noise_rows: the selection is of a table of {selection.num_rows} rows, "
                           f"the gradient of {grad.num_rows}.")
    b = grad._backend
    if isinstance(rows, (np.ndarray, list, tuple)):
        rows = b.ops.from_numpy(np.asarray(rows, dtype=np.int64), like=grad.values)
    rows = b.ops.cast(rows, "int64")
    S = b.ops.shape(rows)[0]          # an int; a scalar tensor while tracing a tf.function
    D = grad.dim
    dt = b.ops.dtype_name(grad.values)
    if isinstance(S, int) and S == 0:
        return RowGrad(rows, b.ops.zeros((0, D), dt, grad.values), grad.num_rows, b)
    # each gradient row's place among the selected rows; a sentinel row V past the end keeps
    # the gather in range for rows beyond the last selected one
    sentinel = b.ops.from_numpy(np.array([grad.num_rows], np.int64), like=grad.rows)
    pos = b.ops.searchsorted(rows, grad.rows)
    hit = b.ops.gather(b.ops.concat([rows, sentinel]), pos) == grad.rows
    values = b.ops.scatter_rows(b.ops.boolean_mask(pos, hit), b.ops.boolean_mask(grad.values, hit), S)
    if s > 0:
        values = values + b.ops.cast(gaussian_noise((S, D), s, grad.values, rng), dt)
    return RowGrad(rows, values, grad.num_rows, b)


def dense_noise(grad: RowGrad, std: float, rng: Any = None) -> Any:
    """Dense DP-SGD: the (V, D) gradient plus N(0, std²) on every entry (a (V, D) framework
    tensor of the gradient's dtype; memory O(V · D) by definition).

    Raises:
        EmbgradError: ``std`` negative or not finite; ``rng`` is not None, an int or a
            ``numpy.random.Generator``.
    """
    s = _check_nonneg(std, "std")
    dense = grad.to_dense()
    if s == 0:
        return dense
    b = grad._backend
    return dense + b.ops.cast(gaussian_noise(tuple(b.ops.shape(dense)), s, grad.values, rng), b.ops.dtype_name(dense))
