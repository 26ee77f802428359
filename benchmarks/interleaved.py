"""Per-example norms + clipped sum against the plain step, methods interleaved in one run.

The tables of sections 1 run every method in its own process, one after the other: on this
shared 2-core machine the load of other jobs moves between them, and a ratio of two medians
taken minutes apart moves with it. Here the methods whose ratio is a target alternate instead,
so that the load hits both sides alike:

* **TensorFlow (Keras 3 on TensorFlow), tf-keras (``TF_USE_LEGACY_KERAS=1``) and Keras 3 on
  PyTorch (``KERAS_BACKEND=torch``)**: one child process per flavour (a Keras backend is fixed
  per process); each round times every method for a few calls in turn; medians over rounds.
  ``plain``: ``tape.gradient(loss, model.trainable_variables)`` (``loss.backward()`` on torch),
  ``embgrad``: ``capture`` + ``gradients(loss)`` + ``per_example().norms()`` +
  ``.clip(C).sum()``; ``_compiled``: the same step inside one ``tf.function``.
* **PyTorch with glibc's default malloc** (a fresh process, as a script or a short job runs):
  ``embgrad`` and ``plain`` alternate as *fresh processes* (no ``MALLOC_*`` settings), each
  timing a number of calls after warm-up; medians over processes. Page faults per call
  (``ru_minflt``) show what the allocator costs.

Times are medians of wall time and of the process's CPU time (``time.process_time``: both
cores count; less sensitive to other processes than wall time). Ratios are embgrad / plain.
Data as in section 1 (V = 50,000, D = 128, B = 64, T = 128, Zipf ids, PAD = 0); the PyTorch
model is section 1's demo classifier, the Keras one (all three flavours alike) embedding →
global average pooling → dense.

Run alone: ``python benchmarks/interleaved.py [--quick]``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Keras flavour -> environment of its child process
FLAVOURS = {
    "keras_tf": ("Keras 3 on TensorFlow", {}),
    "tf_keras": ("tf-keras (Keras 2)", {"TF_USE_LEGACY_KERAS": "1"}),
    "keras_torch": ("Keras 3 on PyTorch", {"KERAS_BACKEND": "torch"}),
}


def _sizes(quick: bool) -> dict:
    if quick:
        return {"vocab": 5000, "dim": 32, "batch": 16, "length": 16, "rounds": 3, "calls": 3,
                "procs": 2, "proc_calls": 5}
    return {"vocab": 50_000, "dim": 128, "batch": 64, "length": 128, "rounds": 15, "calls": 5,
            "procs": 6, "proc_calls": 40}


# ----------------------------------------------------------------------------- children
def _time_interleaved(methods: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict:
    """Each round: every method ``calls`` times in turn; medians over rounds (per call)."""
    for fn in methods.values():     # warm-up (traces, caches)
        for _ in range(3):
            fn()
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m, fn in methods.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall[m].append((time.perf_counter() - t0) / calls)
            cpu[m].append((time.process_time() - c0) / calls)
    return {m: {"wall_s": statistics.median(wall[m]), "cpu_s": statistics.median(cpu[m])} for m in methods}


def _keras_child(flavour: str, p: dict) -> dict:
    """Plain and embgrad steps of one Keras flavour, interleaved."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from models import labels, zipf_ids

    import embgrad

    x_np = zipf_ids(p["batch"], p["length"], p["vocab"], seed=0).astype(np.int32)
    y_np = labels(p["batch"], 2, seed=0)
    if flavour == "keras_torch":
        import keras
        import torch
        total = keras.ops.sum
    else:
        import tensorflow as tf
        if flavour == "tf_keras":
            keras = tf.keras
        else:
            import keras
        total = tf.reduce_sum
    keras.utils.set_random_seed(0)
    inp = keras.Input((p["length"],), dtype="int32")
    emb = keras.layers.Embedding(p["vocab"], p["dim"], name="embedding")
    pooled = keras.layers.GlobalAveragePooling1D()(emb(inp))
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(pooled))
    if flavour == "keras_torch":
        x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    else:
        x, y = tf.constant(x_np), tf.constant(y_np)

    def loss_of(xx: Any, yy: Any) -> Any:
        return total(keras.losses.sparse_categorical_crossentropy(yy, model(xx), from_logits=True))

    def per_example(xx: Any, yy: Any, max_norm: Any) -> tuple[Any, Any, Any]:
        with embgrad.capture(model) as cap:
            loss = loss_of(xx, yy)
        pe = cap.gradients(loss).only().per_example()
        clipped = pe.clip(max_norm).sum()
        return pe.norms(), clipped.rows, clipped.values

    norms = per_example(x, y, 1.0)[0]
    norms = norms.detach().numpy() if flavour == "keras_torch" else norms.numpy()
    max_norm = float(np.median(norms))     # about half the examples clipped
    methods: dict[str, Callable[[], Any]] = {}
    if flavour == "keras_torch":
        params = [v.value for v in model.trainable_variables]

        def plain() -> Any:
            loss_of(x, y).backward()
            grads = [q.grad for q in params]
            for q in params:
                q.grad = None
            return grads

        methods = {"plain": plain, "embgrad": lambda: per_example(x, y, max_norm)}
    else:
        variables = model.trainable_variables

        def plain_step(xx: Any, yy: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_of(xx, yy)
            return tape.gradient(loss, variables)

        plain_c = tf.function(plain_step)
        embgrad_c = tf.function(lambda xx, yy: per_example(xx, yy, max_norm))
        methods = {"plain": lambda: plain_step(x, y), "embgrad": lambda: per_example(x, y, max_norm),
                   "plain_compiled": lambda: plain_c(x, y), "embgrad_compiled": lambda: embgrad_c(x, y)}
    return _time_interleaved(methods, p["rounds"], p["calls"])


def _torch_child(method: str, p: dict) -> dict:
    """One method of the PyTorch classifier in this (fresh) process: median per call and page
    faults per call over ``proc_calls`` calls after a warm-up."""
    import resource

    sys.path.insert(0, str(HERE))
    import per_example as pe

    s = pe._Setup(pe.classifier_params(p["vocab"], p["dim"], p["batch"], p["length"]))
    run = pe._BUILDERS[method](s).run
    for _ in range(3):
        run()
    wall, cpu = [], []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(p["proc_calls"]):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / p["proc_calls"]
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "faults": faults}


# ----------------------------------------------------------------------------- parent
def _child(args: list[str], env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra, PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(Path(__file__)), "--child", *args], env=env,
                         capture_output=True, text=True, cwd=str(ROOT), timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (out.stderr or out.stdout).strip().splitlines()
    return {"error": tail[-1] if tail else f"exit code {out.returncode}"}


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def main(quick: bool = False) -> dict:
    """Run every measurement; returns ``{"rows": [...], "markdown": str, "ratios": {...}}``."""
    p = _sizes(quick)
    rows: list[dict] = []
    ratios: dict[str, float] = {}
    for key, (label, env) in FLAVOURS.items():
        res = _child(["keras", key, json.dumps(p)], env)
        if "error" in res:
            rows.append({"setting": label, "pair": "—", "embgrad": "—", "plain": "—",
                         "ratio_cpu": "—", "ratio_wall": "—", "note": "error: " + res["error"][:200]})
            continue
        for suffix, what in (("", "eager"), ("_compiled", "compiled (tf.function)")):
            if "embgrad" + suffix not in res:
                continue
            e, q = res["embgrad" + suffix], res["plain" + suffix]
            rc, rw = e["cpu_s"] / q["cpu_s"], e["wall_s"] / q["wall_s"]
            ratios[f"{key}{suffix}"] = rc
            rows.append({"setting": label, "pair": what,
                         "embgrad": f"{_ms(e['cpu_s'])} ({_ms(e['wall_s'])})",
                         "plain": f"{_ms(q['cpu_s'])} ({_ms(q['wall_s'])})",
                         "ratio_cpu": f"{rc:.2f}×", "ratio_wall": f"{rw:.2f}×", "note": ""})
    per: dict[str, list[dict]] = {"embgrad": [], "plain": []}
    for _ in range(p["procs"]):
        for method in ("embgrad", "plain"):
            r = _child(["torch", method, json.dumps(p)], {})
            if "error" not in r:
                per[method].append(r)
    if per["embgrad"] and per["plain"]:
        med = {m: {k: statistics.median(r[k] for r in per[m]) for k in ("wall_s", "cpu_s", "faults")}
               for m in per}
        e, q = med["embgrad"], med["plain"]
        ratios["torch_default_malloc"] = e["cpu_s"] / q["cpu_s"]
        ratios["torch_default_malloc_wall"] = e["wall_s"] / q["wall_s"]
        rows.append({"setting": "PyTorch, glibc malloc defaults (fresh processes)", "pair": "eager",
                     "embgrad": f"{_ms(e['cpu_s'])} ({_ms(e['wall_s'])})",
                     "plain": f"{_ms(q['cpu_s'])} ({_ms(q['wall_s'])})",
                     "ratio_cpu": f"{e['cpu_s'] / q['cpu_s']:.2f}×",
                     "ratio_wall": f"{e['wall_s'] / q['wall_s']:.2f}×",
                     "note": (f"page faults per call: embgrad {e['faults']:.0f}, plain {q['faults']:.0f}; "
                              f"{len(per['embgrad'])} + {len(per['plain'])} processes, alternating")})
    else:
        rows.append({"setting": "PyTorch, glibc malloc defaults (fresh processes)", "pair": "eager",
                     "embgrad": "—", "plain": "—", "ratio_cpu": "—", "ratio_wall": "—",
                     "note": "error: a child failed"})
    load = os.getloadavg()[0]
    md = [f"V = {p['vocab']:,}, D = {p['dim']}, B = {p['batch']}, T = {p['length']}; per call: CPU "
          f"time (wall time in brackets), medians of {p['rounds']} interleaved rounds of {p['calls']} "
          f"calls (Keras), of {p['procs']} alternating fresh processes × {p['proc_calls']} calls "
          f"(PyTorch). *ratio* = embgrad / plain. Load average when it finished: {load:.1f} "
          "(2 cores, shared). The two-thread PyTorch steps swing most under this load: two runs of "
          "this section on 2026-11-29, 40 minutes apart, gave 1.73× and 0.54× for PyTorch with "
          "default malloc (CPU time; page faults per call 3,328 vs 2,167, then 1,150 vs 924) and "
          "1.24× and 1.75× for Keras 3 on PyTorch; the TensorFlow ratios stayed within 0.4×.", "",
          "| setting | step | embgrad | plain | ratio (CPU) | ratio (wall) | note |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['setting']} | {r['pair']} | {r['embgrad']} | {r['plain']} | "
                  f"{r['ratio_cpu']} | {r['ratio_wall']} | {r['note']} |")
    return {"rows": rows, "ratios": ratios, "markdown": "\n".join(md), "load": load}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, name, params = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        out = _keras_child(name, params) if kind == "keras" else _torch_child(name, params)
        print("RESULT " + json.dumps(out), flush=True)
    else:
        res = main("--quick" in sys.argv)
        print(res["markdown"])
