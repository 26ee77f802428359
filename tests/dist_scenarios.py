"""What each rank runs in tests/test_distributed.py (spawned processes import this module), and
the data and noise mechanisms both the ranks and the single-process references use."""
from __future__ import annotations

import time
from typing import Any

import torch

import embgrad
from embgrad import distributed as edist

V, D, T, PAD, C = 50, 6, 7, 0, 0.8
# uneven batches; with 4 ranks, rank 1 holds no example at all (no lookups)
SIZES = {2: [5, 3], 4: [5, 0, 3, 4]}


def global_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: ids (B, T) (Zipf-like: low ids frequent, PAD=0 ignored) and
    output gradients (B, T, D) float32, the same in every process."""
    g = torch.Generator().manual_seed(1234 + size)
    B = sum(SIZES[size])
    ids = (torch.rand(B, T, generator=g) ** 3 * V).long()
    grads = torch.randn(B, T, D, generator=g)
    return ids, grads


def local_batch(size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, grads = global_batch(size)
    lo = sum(SIZES[size][:rank])
    hi = lo + SIZES[size][rank]
    return ids[lo:hi], grads[lo:hi]


def empty_row_grad(num_rows: int = V) -> embgrad.RowGrad:
    return embgrad.RowGrad(torch.empty(0, dtype=torch.int64), torch.empty(0, D), num_rows)


def row_grad_of(ids: torch.Tensor, grads: torch.Tensor) -> embgrad.RowGrad:
    if ids.shape[0] == 0:
        return empty_row_grad()
    return embgrad.rows_from_lookups(ids, grads, V, ignore_index=PAD)


def example_grads_of(ids: torch.Tensor, grads: torch.Tensor) -> embgrad.ExampleGrads:
    if ids.shape[0] == 0:
        e = torch.empty(0, dtype=torch.int64)
        return embgrad.ExampleGrads(e, e, torch.empty(0, D), 0, V)
    out = embgrad.rows_from_lookups(ids, grads, V, per_example=True, ignore_index=PAD)
    assert isinstance(out, embgrad.ExampleGrads)
    return out


# ---------------------------------------------------------------- DP mechanisms (embgrad.privacy)
def mechanisms() -> dict[str, tuple[Any, Any, int]]:
    """name -> (mechanism, DP-FEST selection or None, seed)."""
    from embgrad import privacy
    return {
        "dpsgd": (privacy.DPSGD(noise_multiplier=1.1, max_grad_norm=C), None, 7),
        "fest": (privacy.DPFEST(noise_multiplier=0.9, max_grad_norm=C),
                 torch.tensor([1, 2, 3, 5, 8, 13, 21, 34]), 9),
        "adafest": (privacy.DPAdaFEST(noise_multiplier=1.0, max_grad_norm=C, threshold=1.5), None, 11),
    }


def dense_np(x: Any) -> tuple:
    """A RowGrad's (rows, values), or a dense tensor as (all rows, values)."""
    if isinstance(x, embgrad.RowGrad):
        return _np(x)
    return (torch.arange(x.shape[0]).numpy(), x.numpy().copy())


def _np(rg: embgrad.RowGrad) -> tuple:
    return tuple(x.copy() for x in rg.numpy())


def _caught(f) -> Any:
    try:
        f()
    except Exception as e:   # noqa: BLE001 - what the test checks
        return ("raised", type(e).__name__, str(e))
    return ("returned",)


# ---------------------------------------------------------------- what every rank runs
def scenarios(rank: int, size: int) -> dict[str, Any]:
    from embgrad.backends import torch_distributed as td

    out: dict[str, Any] = {}
    ids, grads = local_batch(size, rank)
    rg = row_grad_of(ids, grads)
    out["local"] = _np(rg)
    for method in ("auto", "all_gather", "all_to_all", "dense"):
        out[f"reduce/{method}"] = _np(edist.all_reduce_rows(rg, method=method))
    # rows dense enough that "auto" takes the dense all-reduce: every rank touches every row
    small = embgrad.rows_from_lookups(torch.arange(12).repeat(3), torch.randn(36, D), 12)
    c = td.comm(None)
    r, v, m = td.exchange_rows(c, small.rows, small.values, 12, "auto")
    out["dense_auto"] = (m, r.numpy().copy(), v.numpy().copy(), _np(small))
    out["float64"] = _np(edist.all_reduce_rows(
        embgrad.RowGrad(rg.rows, rg.values.double(), V)))
    # a subgroup of the even ranks: only they exchange, the others stay out
    evens = list(range(0, size, 2))
    sub = torch.distributed.new_group(evens)
    if rank in evens:
        out["subgroup"] = _np(edist.all_reduce_rows(rg, group=sub, method="all_to_all"))
        out["subgroup_gather"] = _np(edist.all_reduce_rows(rg, group=sub))
    # bad input on one rank: every rank raises EmbgradError, at once
    t0 = time.monotonic()
    bad = embgrad.RowGrad(rg.rows, rg.values, V + 1) if rank == size - 1 else rg
    out["err/num_rows"] = _caught(lambda: edist.all_reduce_rows(bad))
    out["err/not_rowgrad"] = _caught(lambda: edist.all_reduce_rows(
        rg.values if rank == 0 else rg))
    out["err/seconds"] = time.monotonic() - t0

    # DP across ranks
    ex = example_grads_of(ids, grads)
    for name, (mech, selection, seed) in mechanisms().items():
        out[f"dp/{name}"] = dense_np(edist.noisy_clipped_sum(ex, mech, selection=selection, seed=seed))
    dpsgd = mechanisms()["dpsgd"][0]
    out["dp/fresh_seed"] = dense_np(edist.noisy_clipped_sum(ex, dpsgd))
    out["err/seeds"] = _caught(lambda: edist.noisy_clipped_sum(ex, dpsgd, seed=rank))
    out["err/mechanism"] = _caught(lambda: edist.noisy_clipped_sum(
        ex, "dp-sgd" if rank == 0 else dpsgd, seed=3))

    # row-sharded tables
    for scheme in ("contiguous", "hashed"):
        sh = edist.RowSharding(V, scheme=scheme)
        g = edist.sharded_example_grads(ids, grads, sh, ignore_index=PAD)
        clipped = g.clip(C)
        s = clipped.sum()
        out[f"shard/{scheme}"] = {
            "local_rows": sh.local_rows.numpy().copy(),
            "norms": g.norms().numpy().copy(),
            "clipped_norms": clipped.norms().numpy().copy(),
            "sum_rows": sh.to_global(s.rows).numpy().copy(),
            "sum_values": s.values.numpy().copy(),
            "dot": g.dot().numpy().copy(),
            # against another batch: the last 3 lookups of each example
            "dot_other": g.dot(edist.sharded_example_grads(ids[:, -3:], grads[:, -3:], sh,
                                                           ignore_index=PAD)).numpy().copy(),
            "offset": g.batch_offset, "batch": g.batch_size, "repr": repr(g),
        }
    # every id in rank 0's rows: the other shards receive no lookup at all
    sh = edist.RowSharding(V)
    first = int(sh._shards.rows_of(0)[-1]) + 1
    g = edist.sharded_example_grads(ids % first, grads, sh)
    out["shard/one_owner"] = {"norms": g.norms().numpy().copy(), "pairs": g.local.nnz,
                              "sum_rows": sh.to_global(g.sum().rows).numpy().copy(),
                              "sum_values": g.sum().values.numpy().copy()}
    out["err/shard_ids"] = _caught(lambda: edist.sharded_example_grads(
        ids + (V if rank == 0 else 0), grads, sh))

    # ShardedEmbedding: the lookup equals the full table's; backward brings each shard its rows'
    # gradient; its output gradient feeds sharded_example_grads
    full = torch.randn(V, D, generator=torch.Generator().manual_seed(5))
    for scheme in ("contiguous", "hashed"):
        sh = edist.RowSharding(V, scheme=scheme)
        emb = edist.ShardedEmbedding.from_full(full, sh)
        vec = emb(ids)
        loss = (vec * grads).sum()
        (og,) = torch.autograd.grad(loss, vec, retain_graph=True)
        loss.backward()
        out[f"emb/{scheme}"] = {"lookup_equal": torch.equal(vec, full[ids]), "shape": tuple(vec.shape),
                                "og_equal": torch.equal(og, grads), "repr": repr(emb),
                                "weight_grad": emb.weight.grad.numpy().copy(),
                                "local_rows": sh.local_rows.numpy().copy()}
    out["err/emb_ids"] = _caught(lambda: emb(ids + (V if rank == 1 else 0)))

    # a rank that raises in its own code never reaches the collective: the others get an error
    # from the group's timeout (3 s here) instead of waiting forever
    short = torch.distributed.new_group(timeout=__import__("datetime").timedelta(seconds=3))
    t0 = time.monotonic()
    if rank == size - 1:   # with 2 ranks: stuck in its own code past the timeout; with 4: exits
        if size == 2:
            time.sleep(4.5)
        out["dies"] = ("raised", "RuntimeError", "the user's forward failed on this rank")
    else:
        out["dies"] = _caught(lambda: edist.all_reduce_rows(rg, group=short))
    out["dies/seconds"] = time.monotonic() - t0
    return out
