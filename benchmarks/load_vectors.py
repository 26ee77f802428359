"""Benchmark: ``embgrad.load_vectors`` streams a 1-million-line vectors file in bounded memory.

Writes a GloVe text file and a word2vec binary file (dim 50) into a temporary directory, then
loads each, in its own process, for a 30 000-word vocabulary (a BERT-sized tokenizer; 2 000 with ``--quick``) at two
file sizes, reporting wall time, throughput and the peak memory the load added (``VmHWM``
reset after the imports, minus the resident size before the load). Bounded means: the peak
does not grow with the file, only with what is found (found × dim × 4 bytes). For contrast, the
whole-file way (``numpy.loadtxt`` of every vector, then picking the vocabulary's rows) at the
larger text size.

Run standalone (``python benchmarks/load_vectors.py [--quick]``) or through
``benchmarks/run.py``, which calls :func:`main`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 50
VOCAB = 30_000
POOL = 4096          # distinct vectors, reused: generating the file stays fast

_CHILD = r"""
import json, os, sys, time
import numpy as np
import embgrad

def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

path, method, vocab_size, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
vocab = {f"w{i}": k for k, i in enumerate(range(0, 2 * vocab_size, 2))}   # every other word is in the file
vocab["[PAD]"] = len(vocab)
try:
    with open("/proc/self/clear_refs", "w") as f:    # reset the peak (VmHWM) to the current RSS
        f.write("5")
except OSError:
    pass
base = rss("VmRSS")
t0 = time.perf_counter()
if method == "embgrad":
    v = embgrad.load_vectors(path, vocab)
    found, lines = len(v), v.report.vectors_read
else:   # the whole-file way: every vector into memory, then the vocabulary's rows
    words = np.loadtxt(path, usecols=0, dtype=str, comments=None)
    mat = np.loadtxt(path, usecols=range(1, dim + 1), dtype=np.float32, comments=None)
    pos = {w: i for i, w in enumerate(words)}
    keep = [(k, pos[w]) for w, k in vocab.items() if w in pos]
    out = mat[[p for _, p in keep]]
    found, lines = len(keep), len(words)
elapsed = time.perf_counter() - t0
print("@@" + json.dumps({"time_s": elapsed, "peak_bytes": rss("VmHWM") - base, "found": found,
                         "lines": lines}))
"""


def _pool(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((POOL, DIM)).astype(np.float32)


def write_glove(path: Path, lines: int, pool: np.ndarray) -> None:
    """``lines`` lines ``w<i> v1 ... v50`` (4 decimals), written in 1 MB-ish blocks."""
    rows = [" ".join(f"{x:.4f}" for x in r) for r in pool]
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, lines, 10_000):
            f.write("".join(f"w{i} {rows[i % POOL]}\n" for i in range(start, min(lines, start + 10_000))))


def write_word2vec_binary(path: Path, lines: int, pool: np.ndarray) -> None:
    """word2vec.c layout: header, then ``word<space><50 float32 LE>\\n`` per word."""
    rows = [r.astype("<f4").tobytes() for r in pool]
    with open(path, "wb") as f:
        f.write(f"{lines} {DIM}\n".encode())
        for start in range(0, lines, 10_000):
            f.write(b"".join(b"w%d " % i + rows[i % POOL] + b"\n"
                             for i in range(start, min(lines, start + 10_000))))


def _measure(path: Path, method: str, vocab: int) -> dict:
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), method, str(vocab), str(DIM)],
                          capture_output=True, text=True, env=env, timeout=3600)
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    if proc.returncode != 0 or not marker:
        raise RuntimeError(f"{method} on {path.name} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(marker[-1][2:])


def main(quick: bool = False) -> dict:
    """Run the benchmark; returns ``{"rows": [...], "markdown": str, "bounded": bool, ...}``."""
    sizes = (20_000, 80_000) if quick else (250_000, 1_000_000)
    vocab = 2_000 if quick else VOCAB     # found in full in both files
    pool = _pool(np.random.default_rng(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="embgrad-bench-vectors-") as tmp:
        for fmt, writer, name in (("glove (text)", write_glove, "vectors.txt"),
                                  ("word2vec binary", write_word2vec_binary, "vectors.bin")):
            for n in sizes:
                path = Path(tmp) / f"{n}-{name}"
                t0 = time.perf_counter()
                writer(path, n, pool)
                gen_s = time.perf_counter() - t0
                r = _measure(path, "embgrad", vocab)
                rows.append({"format": fmt, "method": "embgrad.load_vectors", "lines": n,
                             "file_MB": round(path.stat().st_size / 2**20, 1), "found": r["found"],
                             "time_s": round(r["time_s"], 2),
                             "lines_per_s": int(n / r["time_s"]),
                             "peak_MB": round(r["peak_bytes"] / 2**20, 1),
                             "found_matrix_MB": round(r["found"] * DIM * 4 / 2**20, 1),
                             "generate_s": round(gen_s, 1)})
                if fmt.startswith("glove") and n == sizes[-1]:
                    w = _measure(path, "whole_file", vocab)
                    rows.append({"format": fmt, "method": "numpy.loadtxt whole file", "lines": n,
                                 "file_MB": rows[-1]["file_MB"], "found": w["found"],
                                 "time_s": round(w["time_s"], 2), "lines_per_s": int(n / w["time_s"]),
                                 "peak_MB": round(w["peak_bytes"] / 2**20, 1),
                                 "found_matrix_MB": rows[-1]["found_matrix_MB"], "generate_s": ""})
                path.unlink()
    ours = [r for r in rows if r["method"] == "embgrad.load_vectors"]
    growth = {}
    for fmt in {r["format"] for r in ours}:
        small, large = [r for r in ours if r["format"] == fmt]
        growth[fmt] = round(large["peak_MB"] / max(small["peak_MB"], 0.1), 2)
    # bounded: 4x the lines may not cost more than 1.5x the peak (it is the found matrix + one chunk)
    bounded = all(g <= 1.5 for g in growth.values())
    head = list(rows[0])
    md = [f"A vocabulary of {vocab + 1} words (every other word of the file's first {2 * vocab} lines, "
          f"and one missing word), dim {DIM}. *peak_MB*: the most memory the load added (VmHWM after "
          "a reset, minus RSS before); *found_matrix_MB*: what the result itself needs.", "",
          "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    md += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    md += ["", "Peak growth from the smaller to the 4x larger file (bounded memory means about 1): "
           + ", ".join(f"{k}: {v}x" for k, v in sorted(growth.items()))
           + (" — bounded." if bounded else " — NOT bounded."), ""]
    return {"rows": rows, "peak_growth": growth, "bounded": bounded, "quick": quick,
            "markdown": "\n".join(md)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 000 and 80 000 lines instead of 250 000 and 1 000 000")
    out = main(ap.parse_args().quick)
    print(out["markdown"])
