"""Benchmark: training-data attribution over embedding gradients (``embgrad.influence``, issue 17).

1. **Collect** N training examples of a BERT-style encoder built from a config (random weights,
   V = 30,522, Zipf token ids, padded) through ``influence.collect`` at k = 1024 (projected,
   float16 shards on disk), against one plain forward + backward of the same batches over every
   parameter (``torch.autograd.grad``: what a training step costs). Both run in the same
   process, alternately, on one intra-op thread (on this shared 2-core VM, two threads made
   small scatter-adds 100× slower); the ratio is of their medians. Also: the part of the
   collect time that is capture + per-example coalescing alone (no projection, no writes).
   100,000 examples are extrapolated from N (time is linear in N: the same batch shape again).
2. **Disk per example**: bytes of the shard files / N.
3. **Query**: 1,000 test examples against a 100,000-row index (float16, k = 1024; rows are random:
   the blocked matmul does not care where they came from), top-10 proponents and opponents.
4. **Recall@10** of projected against exact proponents on the BERT gradients (Q test × N train).
5. **Self-influence on the demo data**: the fraction of deliberately flipped training labels in
   the top 5 % by self-influence (TracInCP over three checkpoints), for five seeds.

Run standalone (``python benchmarks/influence.py [--quick]``) or via ``benchmarks/run.py``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EXACT_ROWS = 8       # rows kept exactly outside the sketch (the [CLS] row and the most frequent words)
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def _bert_setup(n: int, batch: int, length: int, seed: int = 0, cls: bool = True):
    import torch
    from models import labels, torch_bert, zipf_ids

    model = torch_bert(vocab=30522, dim=128, layers=2, heads=2, classes=2, max_len=length, seed=seed)
    ids = torch.from_numpy(zipf_ids(n, length, 30522, seed=seed))
    if cls:                  # every input starts with [CLS] (id 101), as a BERT tokenizer's do
        ids[:, 0] = 101
    y = torch.from_numpy(labels(n, 2, seed=seed))
    batches = [({"input_ids": ids[i:i + batch], "attention_mask": (ids[i:i + batch] != 0).long()}, y[i:i + batch])
               for i in range(0, n, batch)]
    return model, batches


def _loss(model, b):
    import torch
    x, y = b
    return torch.nn.functional.cross_entropy(model(**x).logits, y, reduction="sum")


def _plain(model, batches) -> float:
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    for b in batches:
        torch.autograd.grad(_loss(model, b), params)
    return time.perf_counter() - t0


def _capture_only(model, batches, layer) -> float:
    import embgrad
    t0 = time.perf_counter()
    for b in batches:
        with embgrad.capture(model, layers=layer) as cap:
            loss = _loss(model, b)
        cap.gradients(loss).only().per_example().norms()
    return time.perf_counter() - t0


def _collect(model, batches, layer, path: Path, k: int, exact_rows: int = EXACT_ROWS) -> tuple[float, int]:
    import shutil

    import embgrad.influence as inf
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    inf.collect(model, batches, _loss, path, layers=layer, k=k, exact_rows=exact_rows, progress=False)
    seconds = time.perf_counter() - t0
    disk = sum(f.stat().st_blocks * 512 for f in path.iterdir())
    return seconds, disk


def collect_section(n: int, batch: int, length: int, k: int, repeats: int) -> dict:
    import torch
    from models import BERT_LAYER
    torch.set_num_threads(1)
    model, batches = _bert_setup(n, batch, length)
    layer = BERT_LAYER
    with tempfile.TemporaryDirectory(prefix="embgrad-bench-influence-") as tmp:
        path = Path(tmp) / "index"
        _plain(model, batches[:2])                       # warm-up
        _collect(model, batches[:2], layer, path, k)
        plain, coll, cap, disk = [], [], [], 0
        for _ in range(repeats):
            plain.append(_plain(model, batches))
            s, disk = _collect(model, batches, layer, path, k)
            coll.append(s)
            cap.append(_capture_only(model, batches, layer))
    p, c, a = statistics.median(plain), statistics.median(coll), statistics.median(cap)
    return {"n": n, "batch": batch, "length": length, "k": k, "repeats": repeats,
            "plain_ms_per_example": 1e3 * p / n, "collect_ms_per_example": 1e3 * c / n,
            "capture_ms_per_example": 1e3 * a / n, "ratio": c / p, "capture_ratio": a / p,
            "disk_bytes_per_example": disk / n, "extrapolated_100k_s": c / n * 100_000,
            "plain_100k_s": p / n * 100_000}


def query_section(rows: int, queries: int, k: int) -> dict:
    import embgrad.influence as inf

    rng = np.random.default_rng(0)
    manifest = {"format": inf.FORMAT, "mode": "projected", "model": "random rows", "checkpoints": [{"name": "c", "lr": 1.0}],
                "projection": inf.Projection(k).to_json(), "dtype": "float16", "layers": [{"name": "e", "num_rows": 1, "dim": 1}],
                "num_examples": rows, "batches_done": 1, "shards": [], "complete": True}
    shard = 65536
    shards = []
    for s in range(0, rows, shard):
        m = min(shard, rows - s)
        shards.append((rng.standard_normal((m, k), dtype=np.float32).astype(np.float16), np.ones((m, 1))))
    index = inf.ProjectedIndex(dict(manifest), shards)
    query = inf.ProjectedIndex({**manifest, "num_examples": queries},
                               [(rng.standard_normal((queries, k), dtype=np.float32), np.ones((queries, 1)))])
    index.top(query, n=10)                               # warm-up (page-in)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        index.top(query, n=10)
        times.append(time.perf_counter() - t0)
    return {"rows": rows, "queries": queries, "k": k, "seconds": statistics.median(times)}


def recall_section(n: int, q: int, k: int, length: int, variants: bool = True) -> dict:
    import torch
    from models import BERT_LAYER

    import embgrad.influence as inf
    torch.set_num_threads(1)
    model, batches = _bert_setup(n + q, 32, length, seed=1)
    train_b, test_b = batches[: n // 32], batches[n // 32:]
    out = {"n": n, "q": q, "k": k}
    exact = inf.collect(model, train_b, _loss, layers=BERT_LAYER, mode="exact", progress=False)
    qe = inf.collect(model, test_b, _loss, like=exact, progress=False)
    te = exact.top(qe, n=10)
    for density, rows in ((4, EXACT_ROWS), (4, 0), (1, EXACT_ROWS)) if variants else ((4, EXACT_ROWS),):
        proj = inf.collect(model, train_b, _loss, layers=BERT_LAYER, k=k, density=density, exact_rows=rows,
                           progress=False)
        qp = inf.collect(model, test_b, _loss, like=proj, progress=False)
        tp = proj.top(qp, n=10)
        out[f"recall_d{density}_h{rows}"] = inf.recall_at(tp.proponents, te.proponents)
        out[f"recall_opp_d{density}_h{rows}"] = inf.recall_at(tp.opponents, te.opponents)
    if not variants:          # --quick: the main setting only
        nan = float("nan")
        out.update({f"recall{o}_d{d}_h{h}": nan for o in ("", "_opp") for d, h in ((4, 0), (1, EXACT_ROWS))})
        out["recall_nocls"] = nan
        return out
    # the same without [CLS]: random first tokens, whose rows carry most of each gradient
    model, batches = _bert_setup(n + q, 32, length, seed=1, cls=False)
    train_b, test_b = batches[: n // 32], batches[n // 32:]
    exact = inf.collect(model, train_b, _loss, layers=BERT_LAYER, mode="exact", progress=False)
    te = exact.top(inf.collect(model, test_b, _loss, like=exact, progress=False), n=10)
    proj = inf.collect(model, train_b, _loss, layers=BERT_LAYER, k=k, exact_rows=EXACT_ROWS, progress=False)
    tp = proj.top(inf.collect(model, test_b, _loss, like=proj, progress=False), n=10)
    out["recall_nocls"] = inf.recall_at(tp.proponents, te.proponents)
    return out


def flipped_section(seeds: tuple[int, ...]) -> dict:
    import torch

    import embgrad.influence as inf
    from embgrad.demo import demo_data, train
    from embgrad.demo.models import _one_thread

    res = []
    with _one_thread():
        for seed in seeds:
            data = demo_data(seed=seed)
            ck = [inf.Checkpoint(train(data, "torch", epochs=e, seed=seed).model, 0.02) for e in (2, 4, 6)]
            X, Y = torch.as_tensor(data.train.ids), torch.as_tensor(data.train.labels)
            bs = [(X[i:i + 128], Y[i:i + 128]) for i in range(0, len(X), 128)]
            idx = inf.collect(ck, bs, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="sum"),
                              k=1024, progress=False)
            si = idx.self_influence()
            top = np.argsort(-si)[: round(0.05 * len(si))]
            res.append((int(data.train.flipped[top].sum()), int(data.train.flipped.sum())))
    return {"seeds": list(seeds), "found": [f for f, _ in res], "flipped": [t for _, t in res],
            "fraction": sum(f for f, _ in res) / max(1, sum(t for _, t in res))}


def main(quick: bool = False) -> dict:
    """Run every part; returns ``{"markdown": ..., "collect": ..., ...}`` for run.py."""
    if quick:
        col = collect_section(n=64, batch=32, length=16, k=1024, repeats=1)
        qry = query_section(rows=2000, queries=50, k=1024)
        rec = recall_section(n=64, q=32, k=1024, length=16, variants=False)
        flp = flipped_section((0,))
    else:
        col = collect_section(n=4096, batch=64, length=64, k=1024, repeats=3)
        qry = query_section(rows=100_000, queries=1000, k=1024)
        rec = recall_section(n=2048, q=128, k=1024, length=64)
        flp = flipped_section((0, 1, 2, 3, 4))
    ok_ratio, ok_recall = col["ratio"] <= 1.5, rec[f"recall_d4_h{EXACT_ROWS}"] >= 0.9
    md = [
        f"BERT-style encoder from a config (V=30,522, hidden 128, 2 layers, random weights), Zipf token ids, "
        f"T={col['length']} (padded, [CLS] first), batches of {col['batch']}, projection k={col['k']} (density 4, "
        f"the {EXACT_ROWS} heaviest rows kept exactly: `exact_rows={EXACT_ROWS}`), "
        f"float16 shards on disk; one intra-op thread for both sides; the 2-core VM was shared with other "
        f"developers' processes (ratios measured in the same process, alternately, median of {col['repeats']}).",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| collect, per example | {col['collect_ms_per_example']:.2f} ms | |",
        f"| plain forward + backward (all parameters), per example | {col['plain_ms_per_example']:.2f} ms | |",
        f"| **collect / plain** | **{col['ratio']:.2f}×** | ≤ 1.5× {'✅' if ok_ratio else '❌'} |",
        f"| of which capture + per-example (no projection, no writes) / plain | {col['capture_ratio']:.2f}× | |",
        f"| disk per example | {col['disk_bytes_per_example']:.0f} bytes | |",
        f"| 100,000 examples (extrapolated from N={col['n']:,}: same batches, linear in N) | "
        f"{col['extrapolated_100k_s'] / 60:.1f} min (plain: {col['plain_100k_s'] / 60:.1f} min) | |",
        f"| query: {qry['queries']:,} test × {qry['rows']:,} rows, top-10 proponents + opponents | "
        f"{qry['seconds']:.1f} s | |",
        f"| recall@10 projected vs exact (density 4, exact_rows={EXACT_ROWS}), {rec['q']} test × {rec['n']:,} "
        f"training | {rec[f'recall_d4_h{EXACT_ROWS}']:.3f} (opponents {rec[f'recall_opp_d4_h{EXACT_ROWS}']:.3f}) | "
        f"≥ 0.9 {'✅' if ok_recall else '❌'} |",
        f"| recall@10, density 4, no exact rows (pure sketch) | {rec['recall_d4_h0']:.3f} (opponents "
        f"{rec['recall_opp_d4_h0']:.3f}) | |",
        f"| recall@10, density 1 (CountSketch), exact_rows={EXACT_ROWS} | {rec[f'recall_d1_h{EXACT_ROWS}']:.3f} "
        f"(opponents {rec[f'recall_opp_d1_h{EXACT_ROWS}']:.3f}) | |",
        f"| recall@10 on inputs without [CLS] (exact_rows={EXACT_ROWS}) | {rec['recall_nocls']:.3f} | |",
        f"| demo: flipped labels in the top 5% by self-influence (seeds {', '.join(map(str, flp['seeds']))}) | "
        f"{sum(flp['found'])} / {sum(flp['flipped'])} = {flp['fraction']:.0%} | |",
        "",
        "The 100,000-example collection was not run end to end on this shared VM: its time is N's "
        "time scaled by 100,000 / N (each batch is the same work), and the query and disk figures are "
        "measured at 100,000 rows directly.",
        "",
        "Why exact rows: in BERT the [CLS] row's gradient is most of every example's gradient (the pooler "
        "reads position 0), so all pairs' scores are close and the ranking lives in the small remainder; a "
        "k-dimensional sketch's error is ~‖x‖‖y‖/√k of the *whole* gradients (the variance in the "
        "`Projection` docstring), larger than those differences. Keeping the 8 heaviest rows exactly leaves "
        "the sketch only the remainder's norm. Without [CLS] (random Zipf ids), each example's first token "
        "carries its gradient and differs between examples: then top-10 sets are decided by near-ties that no "
        "k=1024 sketch resolves (last row).",
    ]
    return {"markdown": "\n".join(md), "collect": col, "query": qry, "recall": rec, "flipped": flp,
            "targets": {"ratio<=1.5": ok_ratio, "recall>=0.9": ok_recall}}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    out = main(ap.parse_args().quick)
    print(out["markdown"])
    print(json.dumps({k: v for k, v in out.items() if k != "markdown"}, indent=1, default=str))
