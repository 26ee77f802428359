"""Benchmark: embgrad.distributed over gloo on this machine (issue 16).

1. **Sparse exchange vs dense all-reduce** of one step's embedding gradient, data parallel:
   V = 10^5, 10^6, 10^7 rows, D = 64, B = 256 examples per rank, T = 32 lookups each (ids drawn
   from a Zipf(1.1) law over the V rows, a different sample per rank), 2 and 4 processes.
   Methods: ``all_reduce_rows(method="all_gather")`` (padded all_gather),
   ``method="all_to_all"`` (two all_to_all_single), and the peer: what DDP does with a dense
   embedding gradient, ``torch.distributed.all_reduce`` of the (V, D) float32 tensor.
2. **Row-sharded per-example norms**: a V = 10^6 table split over the ranks, the global batch
   routed to the shards once; then exact per-example norms by one all-reduce of the (B,) partial
   squared norms (embgrad) vs gathering every shard's (example, row) entries to every rank and
   computing the norms there.

*Bytes sent* are MEASURED: the bytes each rank's process wrote to its sockets during the call
(``wchar`` of ``/proc/self/io``, which counts gloo's ``writev`` on its TCP pairs), minus what a
bare barrier writes, averaged over ranks and calls. *Time* is the median over calls of the
slowest rank's wall time (each call between barriers). Every method's result is checked against
the dense all-reduce before anything is timed.

Run standalone (``python benchmarks/dist_exchange.py [--quick]``) or through
``benchmarks/run.py`` (section ``distributed``), which calls :func:`main`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

D, B, T, ZIPF = 64, 256, 32, 1.1


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def zipf_ids(rng: np.random.Generator, V: int, n: int) -> np.ndarray:
    """``n`` ids in [0, V) with P(id = k) ∝ 1 / (k + 1)^1.1 (inverse CDF, exact, no rejection)."""
    cdf = np.cumsum(1.0 / np.arange(1, V + 1, dtype=np.float64) ** ZIPF)
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), V - 1)


def _measure(dist: Any, fn: Any, reps: int, idle: int) -> tuple[float, float, Any]:
    """(median wall s of the slowest rank, mean bytes this rank wrote, last result)."""
    import torch
    times, sent, out = [], [], None
    for _ in range(reps):
        dist.barrier()
        w0, t0 = _wchar(), time.perf_counter()
        out = fn()
        t = torch.tensor([time.perf_counter() - t0])
        w = _wchar() - w0
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
        sent.append(w - idle)
    return statistics.median(times), float(np.mean(sent)), out


def _rank(rank: int, size: int, port: int, V: int, reps: dict, out: str, dense_ok: bool,
          norms: bool) -> None:
    import torch
    import torch.distributed as dist

    import embgrad
    from embgrad import distributed as edist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=600))
    res: dict[str, Any] = {}
    try:
        rng = np.random.default_rng(1000 * size + rank)
        ids = torch.from_numpy(zipf_ids(rng, V, B * T).reshape(B, T))
        grads = torch.from_numpy(rng.standard_normal((B, T, D), dtype=np.float32))
        g = embgrad.rows_from_lookups(ids, grads, V)
        res["rows"] = len(g)
        # what a barrier alone writes (subtracted from every measurement)
        w0 = _wchar()
        for _ in range(5):
            dist.barrier()
        idle = (_wchar() - w0) // 5
        def dense() -> Any:
            buf = g.to_dense()
            dist.all_reduce(buf)
            return buf
        ref = dense() if dense_ok else None
        for method in ("all_gather", "all_to_all"):
            got = edist.all_reduce_rows(g, method=method)
            res[method + "_rows"] = len(got)
            if ref is not None:   # checked against the dense all-reduce before timing
                assert torch.equal(torch.nonzero(ref.abs().sum(1)).reshape(-1), got.rows)
                np.testing.assert_allclose(ref.index_select(0, got.rows).numpy(), got.values.numpy(),
                                           rtol=1e-5, atol=1e-5)
            del got
        del ref
        if dense_ok:
            res["dense"] = _measure(dist, dense, reps["dense"], idle)[:2]
        for method in ("all_gather", "all_to_all"):
            res[method] = _measure(dist, lambda m=method: edist.all_reduce_rows(g, method=m),
                                   reps["sparse"], idle)[:2]
        if norms:   # row-sharded norms: all-reduce of (B,) vs gathering the entries
            sh = edist.RowSharding(V)
            ex = edist.sharded_example_grads(ids, grads, sh)
            ref_norms = ex.norms().clone()

            def gathered() -> Any:
                loc = ex.local
                packed = torch.cat([loc.example_ids.view(torch.float32).reshape(-1, 2),
                                    loc.values], 1)
                n = torch.tensor([packed.shape[0]])
                counts = [torch.zeros_like(n) for _ in range(size)]
                dist.all_gather(counts, n)
                m = int(max(int(c) for c in counts))
                pad = torch.cat([packed, packed.new_zeros((m - packed.shape[0], packed.shape[1]))])
                parts = [torch.empty_like(pad) for _ in range(size)]
                dist.all_gather(parts, pad)
                allp = torch.cat([p[:int(c)] for p, c in zip(parts, counts, strict=True)])
                exs = allp[:, :2].contiguous().view(torch.int64).reshape(-1)
                sq = (allp[:, 2:] ** 2).sum(1)
                return torch.zeros(ex.batch_size).index_add_(0, exs, sq).sqrt()

            def reduced() -> Any:
                ex._norms = None    # recompute: the all-reduce of the partial squared norms
                return ex.norms()
            np.testing.assert_allclose(gathered().numpy(), ref_norms.numpy(), rtol=1e-5)
            res["norms_allreduce"] = _measure(dist, reduced, reps["sparse"], idle)[:2]
            res["norms_gather"] = _measure(dist, gathered, reps["sparse"], idle)[:2]
            res["shard_pairs"] = ex.local.nnz
    except BaseException as e:   # noqa: BLE001 - reported in the table
        res["error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(size: int, V: int, reps: dict, dense_ok: bool, norms: bool) -> list[dict]:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(size, _free_port(), V, reps, out, dense_ok, norms), nprocs=size)
        return [pickle.loads((Path(out) / f"{r}.pkl").read_bytes()) for r in range(size)]


def _mb(x: float) -> str:
    if x >= 2 ** 30:
        return f"{x / 2 ** 30:.3g} GiB"
    return f"{x / 2 ** 20:.3g} MiB" if x >= 2 ** 20 else f"{x / 1024:.3g} KiB"


def main(quick: bool = False) -> dict:
    # --quick (run by tests/test_bench_quick.py): one small case, same code
    sizes = [10 ** 4] if quick else [10 ** 5, 10 ** 6, 10 ** 7]
    norm_V = sizes[0] if quick else 10 ** 6
    reps = {"sparse": 2, "dense": 1} if quick else {"sparse": 7, "dense": 3}
    rows, norm_rows, notes = [], [], []
    for size in ((2,) if quick else (2, 4)):
        for V in sizes:
            need = 2 * size * V * D * 4          # per rank: the dense gradient + gloo's buffers
            dense_ok = need < 0.7 * _mem_available()
            if not dense_ok:
                notes.append(f"V={V:.0e}, {size} processes: the dense all-reduce was not run: it "
                             f"needs about {need / 2**30:.1f} GiB ({size} ranks × a {V * D * 4 / 2**30:.1f} "
                             f"GiB (V, D) float32 gradient, its copy and gloo's buffers) and "
                             f"{_mem_available() / 2**30:.1f} GiB was available on this shared 24 GiB machine.")
            t0 = time.perf_counter()
            res = run_case(size, V, reps, dense_ok, V == norm_V)
            errs = [r["error"] for r in res if "error" in r]
            if errs:
                notes.append(f"V={V:.0e}, {size} processes: error: {errs[0]}")
                continue
            mean = {k: (statistics.mean(r[k][0] for r in res), statistics.mean(r[k][1] for r in res))
                    for k in ("all_gather", "all_to_all", "dense") if k in res[0]}
            row = {"V": V, "procs": size, "rows per rank (mean)": int(np.mean([r["rows"] for r in res])),
                   "rows after reduce": res[0]["all_gather_rows"]}
            for k, (t, b) in mean.items():
                row[f"{k} time ms"] = round(t * 1e3, 2)
                row[f"{k} bytes"] = int(b)
            if "dense" in mean:
                best = min(mean["all_gather"][1], mean["all_to_all"][1])
                row["dense / sparse bytes"] = round(mean["dense"][1] / best, 1)
                row["dense / sparse time"] = round(mean["dense"][0] / min(mean["all_gather"][0],
                                                                          mean["all_to_all"][0]), 1)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            if "norms_allreduce" in res[0]:
                n = {k: (statistics.mean(r[k][0] for r in res), statistics.mean(r[k][1] for r in res))
                     for k in ("norms_allreduce", "norms_gather")}
                norm_rows.append({"V": V, "procs": size, "global batch": B * size,
                                  "pairs per shard (mean)": int(np.mean([r["shard_pairs"] for r in res])),
                                  "all-reduce time ms": round(n["norms_allreduce"][0] * 1e3, 3),
                                  "all-reduce bytes": int(n["norms_allreduce"][1]),
                                  "gather time ms": round(n["norms_gather"][0] * 1e3, 2),
                                  "gather bytes": int(n["norms_gather"][1]),
                                  "gather / all-reduce bytes": round(n["norms_gather"][1] / n["norms_allreduce"][1], 1),
                                  "gather / all-reduce time": round(n["norms_gather"][0] / n["norms_allreduce"][0], 1)})
    out = {"rows": rows, "norm_rows": norm_rows, "notes": notes}
    out["markdown"] = render(out)
    return out


def render(out: dict) -> str:
    """The section's markdown from :func:`main`'s measured rows (also re-renders stored results)."""
    rows, norm_rows, notes = out["rows"], out["norm_rows"], out["notes"]
    md = [("Bytes are measured on the sockets (`/proc/self/io` wchar of each rank, gloo's writes), "
          "per rank and call; times are wall time of the slowest rank, median of the calls, on 2 "
          "shared cores (4 processes share them too, so times at 4 processes include waiting for "
          "a CPU). Zipf(1.1) ids, D=64, B=256 per rank, T=32."), "",
          _table(rows, ["V", "procs", "rows per rank (mean)", "rows after reduce",
                        "all_gather time ms", "all_gather bytes", "all_to_all time ms",
                        "all_to_all bytes", "dense time ms", "dense bytes",
                        "dense / sparse bytes", "dense / sparse time"]), ""]
    at = [r for r in rows if r["V"] == 10 ** 6 and "dense / sparse bytes" in r]
    if at:
        worst = min(r["dense / sparse bytes"] for r in at)
        md += [f"**Target ≥ 100× fewer bytes than the dense all-reduce at V = 10^6: "
               f"{'met' if worst >= 100 else 'MISSED'}** (measured "
               + ", ".join(f"{r['dense / sparse bytes']}× with {r['procs']} processes" for r in at)
               + ").", ""]
    md += [("Row-sharded table, exact per-example norms of the global batch (embgrad: one all-reduce "
           "of the (B,) partial squared norms; peer: gather every shard's (example, row) entries "
           "to every rank):"), "", _table(norm_rows, list(norm_rows[0]) if norm_rows else [])]
    if notes:
        md += ["", *[f"- {n}" for n in notes]]
    return "\n".join(md)


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(no results)"

    def fmt(c: str, v: Any) -> str:
        if v is None or v == "":
            return "—"
        return _mb(v) if c.endswith("bytes") and isinstance(v, int) else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(fmt(c, r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(main(a.quick)["markdown"])
