"""The benchmark harness: every method in its own subprocess, checked, warmed up, repeated.

A benchmark module (``per_example``, ``weight_grad``, ...) describes its cases with
:class:`Case` and builds one method at a time in a child process with
``build(method, params) -> Bench``. For each case the harness

1. runs the case's *reference* method first, in its own process, and stores its result;
2. runs every other method in its own process: build (model, data), one warm-up call whose
   result is checked against the reference, then at least ``repeats`` timed calls (median);
3. measures the method's peak memory per call: the process's peak resident set size
   (``VmHWM``) during the timed calls minus its resident size before them (after the warm-up,
   a garbage collection and ``malloc_trim``), or, where the framework pools freed memory out
   of the RSS's sight (TensorFlow), its allocator's peak above its level before them,
   whichever is larger;
4. enforces a memory budget (the parent kills a child whose RSS exceeds it) and a time limit,
   and reports a method that cannot run (unsupported, out of memory, over budget, timed out,
   wrong answer) with the reason instead of a number.

Run a child by hand: ``python benchmarks/harness.py SPEC.json`` (what the parent does).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
GiB = 2 ** 30
MiB = 2 ** 20


#: glibc malloc as a long-running training process has it: glibc raises its mmap threshold to
#: the size of the largest block freed so far (up to 32 MiB) and its trim threshold to twice
#: that. A fresh process (each benchmark child) has not freed a large block yet, so every
#: temporary above 128 KiB is a fresh mmap whose pages fault in one by one — a cost of the
#: kernel's page-fault handler, not of the method (measured ~1,200 faults, 2.7 ms per call for
#: embgrad at V=50k). Every child of a "steady" case gets the same settings.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2 ** 20)}


class Unsupported(Exception):
    """Raised by ``build`` when a method cannot run on this case (the message says why)."""


class Mismatch(Exception):
    """A method's result differs from the reference's (the message says where and by how much)."""


# ----------------------------------------------------------------------------- descriptions
@dataclass(frozen=True)
class Bench:
    """One method, built in a child process.

    ``run()``: the timed call; returns whatever ``result`` needs. ``result(out)``: a dict of
    NumPy arrays compared against the reference (outside the timing). ``evals``: model
    evaluations per call, where that is a figure of merit (attribution), else None.
    ``meta``: extra facts (small JSON-able values) recorded in results.json.
    """

    run: Callable[[], Any]
    result: Callable[[Any], dict[str, np.ndarray]]
    evals: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One table of BENCHMARKS.md: the same inputs, several methods, one reference.

    ``module``: benchmark module name (a file in benchmarks/). ``params``: JSON-able sizes
    handed to ``build``. ``methods``: method names, in table order; ``reference``: the one
    whose result the others are checked against (it runs first); ``ratio_to``: the method the
    ratios are taken against (embgrad). ``budget_bytes``: the memory budget per method.
    ``tolerance``: ``(rtol, atol)`` of the check, atol relative to the largest reference value. ``python``: interpreter for the children.
    """

    key: str
    title: str
    module: str
    params: dict[str, Any]
    methods: tuple[str, ...]
    reference: str
    ratio_to: str = "embgrad"
    budget_bytes: int = 6 * GiB
    time_limit_s: float = 900.0
    repeats: int = 5
    min_total_s: float = 1.0          # keep repeating fast methods until this much time is timed
    tolerance: tuple[float, float] = (1e-4, 1e-6)
    python: str = sys.executable
    notes: tuple[str, ...] = ()
    skip: dict[str, str] = field(default_factory=dict)   # method -> reason, decided up front
    malloc: str = "steady"            # glibc malloc settings of the children: "steady" or "default"


@dataclass
class MethodResult:
    """What one method did on one case (one row of a table)."""

    method: str
    status: str                      # ok | reference | unsupported | over-budget | oom | timeout | mismatch | error
    reason: str = ""
    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    median_cpu_s: float | None = None
    peak_bytes: int | None = None    # method's own peak per call (see the module docstring)
    base_bytes: int | None = None    # RSS before the timed calls (model, data, imports, warm-up)
    evals: int | None = None
    check: str = ""
    wall_s: float = 0.0              # the child's whole run (setup + warm-up + repeats)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.status in ("ok", "reference") and self.median_s is not None


@dataclass
class CaseResult:
    case: Case
    results: list[MethodResult]

    def get(self, method: str) -> MethodResult | None:
        return next((r for r in self.results if r.method == method), None)

    def to_json(self) -> dict[str, Any]:
        c = dataclasses.asdict(self.case)
        c.pop("python", None)
        return {"case": c, "results": [dataclasses.asdict(r) for r in self.results]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CaseResult":
        """The inverse of :meth:`to_json` (for re-rendering a previous run's results)."""
        c = dict(d["case"])
        c["methods"], c["tolerance"] = tuple(c["methods"]), tuple(c["tolerance"])
        c["notes"] = tuple(c.get("notes", ()))
        known = {f.name for f in dataclasses.fields(Case)}
        return cls(Case(**{k: v for k, v in c.items() if k in known}),
                   [MethodResult(**r) for r in d["results"]])


# ----------------------------------------------------------------------------- memory helpers
def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS`` / ``VmHWM`` of a process, in bytes ({} if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _settle() -> int:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``), so
    that what the next calls allocate shows up in the RSS; returns the RSS then."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _proc_status().get("VmRSS", 0)


class _TensorFlowPool:
    """TensorFlow keeps freed CPU memory in its own allocator, out of the RSS's sight: its
    allocator statistics give the peak bytes allocated above the level at ``reset``."""

    def __init__(self, tf: Any):
        self.tf = tf
        tf.config.experimental.get_memory_info("CPU:0")      # raises where unsupported

    def reset(self) -> int:
        self.tf.config.experimental.reset_memory_stats("CPU:0")
        return int(self.tf.config.experimental.get_memory_info("CPU:0")["current"])

    def peak(self, start: int) -> int:
        return int(self.tf.config.experimental.get_memory_info("CPU:0")["peak"]) - start


def _allocator_pool() -> _TensorFlowPool | None:
    """The pooling allocator of a loaded framework that reports its own peak, if any."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return None
    try:
        return _TensorFlowPool(tf)
    except Exception:   # noqa: BLE001 - no statistics on this build: the RSS alone
        return None


def _oom_reason(exc: BaseException) -> str | None:
    text = f"{type(exc).__name__}: {exc}"
    keys = ("can't allocate memory", "out of memory", "OOM", "Cannot allocate memory",
            "ResourceExhausted", "DefaultCPUAllocator", "MemoryError", "bad_alloc",
            "RESOURCE_EXHAUSTED: Out of memory")     # the last: XLA (JAX)
    if not (isinstance(exc, MemoryError) or any(k in text for k in keys)):
        return None
    m = re.search(r"(?:tried to allocate|Out of memory allocating) (\d+) bytes", text)
    if m:
        return (f"the allocator refused {int(m.group(1)) / GiB:.1f} GiB in one piece "
                f"({text.splitlines()[0][:160]})")
    return text.splitlines()[0][:300]


def where_raised(exc: BaseException, skip: tuple[str, ...] = ("/torch/",)) -> str:
    """``path:line `code``` of the innermost frame of ``exc`` outside ``skip`` (for reasons)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not any(k in f.filename for k in skip)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename.split('site-packages/')[-1]}:{f.lineno} `{(f.line or '').strip()}`"


# ----------------------------------------------------------------------------- result checks
def sparse_rows(dense_or_pair: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, values)`` of the rows holding any nonzero, from a dense (V, D) array or a
    ``(rows, values)`` pair (rows whose values are all zero are dropped there too)."""
    if isinstance(dense_or_pair, tuple):
        rows, values = (np.asarray(a) for a in dense_or_pair)
    else:
        values = np.asarray(dense_or_pair)
        rows = np.arange(values.shape[0])
    keep = np.any(values != 0, axis=1)
    rows, values = rows[keep].astype(np.int64), values[keep]
    order = np.argsort(rows, kind="stable")
    return rows[order], values[order]


def compare(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], rtol: float, atol: float) -> str:
    """Raise :class:`Mismatch` unless every array that ``got`` shares with ``ref`` matches.

    A method returns what it computes (``plain`` has no per-example norms); at least one key
    must be shared. Keys ending in ``_rows`` pair with the same key ending in ``_values``
    (sparse gradients): values are compared on the union of both sides' rows, a row missing
    on one side counting as zeros. Returns a one-line summary of what was checked.
    """
    worst = 0.0
    shared = [k for k in ref if k in got and not k.endswith("_values")]
    if not shared:
        raise Mismatch(f"result has none of the reference's arrays ({', '.join(ref)}); got {', '.join(got)}")
    for key in shared:
        r, g = ref[key], got[key]
        if key.endswith("_rows"):
            vkey = key[:-5] + "_values"
            union = np.union1d(g, r)
            gd, rd = _on_rows(g, got[vkey], union), _on_rows(r, ref[vkey], union)
            g, r, key = gd, rd, vkey
        g, r = np.asarray(g, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if g.shape != r.shape:
            raise Mismatch(f"{key}: shape {g.shape} != reference {r.shape}")
        err = np.abs(g - r)
        floor = atol * (float(np.abs(r).max()) if r.size else 0.0)   # atol is relative to the largest |r|
        scale = floor + rtol * np.abs(r)
        if not np.all(err <= scale):
            i = np.unravel_index(int(np.argmax(err - scale)), err.shape)
            raise Mismatch(f"{key}: at {tuple(int(k) for k in i)} got {g[i]:.6g}, reference {r[i]:.6g} "
                           f"(max abs error {err.max():.3g}, rtol={rtol}, atol={atol})")
        denom = np.maximum(np.abs(r), max(floor, 1e-30))
        worst = max(worst, float((err / denom).max()) if err.size else 0.0)
    names = ", ".join(k[:-5] if k.endswith("_rows") else k for k in shared)
    return f"{names}: max rel err {worst:.1e}"


def _on_rows(rows: np.ndarray, values: np.ndarray, union: np.ndarray) -> np.ndarray:
    out = np.zeros((len(union),) + tuple(values.shape[1:]), dtype=np.float64)
    out[np.searchsorted(union, rows)] = values
    return out


# ----------------------------------------------------------------------------- child process
def _child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out_path = Path(spec["out"])
    res: dict[str, Any] = {"method": spec["method"], "status": "error", "reason": ""}
    t_start = time.perf_counter()

    def finish() -> None:
        res["wall_s"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(res))

    try:
        sys.path.insert(0, str(HERE))
        import importlib

        # the benchmark modules `from harness import Unsupported`: make that this very module
        # (run as __main__), so that their exceptions are the classes caught here
        sys.modules.setdefault("harness", sys.modules[__name__])
        mod = importlib.import_module(spec["module"])
        try:
            bench: Bench = mod.build(spec["method"], spec["params"])
        except Unsupported as e:
            res.update(status="unsupported", reason=str(e))
            return finish()
        res["evals"] = bench.evals
        res["meta"] = bench.meta
        # warm-up call, whose result is checked before anything is timed
        t0, c0 = time.perf_counter(), time.process_time()
        out = bench.run()
        warm_s, warm_cpu = time.perf_counter() - t0, time.process_time() - c0
        got = bench.result(out)
        del out
        if spec["reference_path"]:
            ref = dict(np.load(spec["reference_path"]))
            rtol, atol = spec["tolerance"]
            res["check"] = compare(got, ref, rtol, atol)
        else:
            np.savez(spec["save_reference"], **got)
            res["check"] = "is the reference"
        del got
        # memory: what the timed calls add on top of the settled process (one-time costs of
        # the first call, e.g. thread pools, are not the method's per-call memory)
        base = _settle()
        can_reset = _reset_peak()
        pool = _allocator_pool()
        pool_start = pool.reset() if pool else 0
        times, cpus = [], []
        repeats = int(spec["repeats"])
        min_total = float(spec.get("min_total_s", 1.0))
        while len(times) < repeats or (sum(times) < min_total and len(times) < 50):
            t0, c0 = time.perf_counter(), time.process_time()
            out = bench.run()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            del out
        rss_peak = max(_proc_status().get("VmHWM", 0) - base, 0)
        pool_peak = max(pool.peak(pool_start), 0) if pool else None
        res.update(status="reference" if not spec["reference_path"] else "ok",
                   times_s=times, cpu_s=cpus, warmup_s=warm_s, warmup_cpu_s=warm_cpu,
                   median_s=statistics.median(times), median_cpu_s=statistics.median(cpus),
                   base_bytes=base, peak_bytes=max(rss_peak, pool_peak or 0),
                   rss_peak_bytes=rss_peak, pool_peak_bytes=pool_peak, peak_exact=can_reset)
    except Unsupported as e:            # found out only when run (e.g. vmap cannot trace the model)
        res.update(status="unsupported", reason=str(e))
    except Mismatch as e:
        res.update(status="mismatch", reason=f"result differs from the reference: {e}")
    except BaseException as e:  # noqa: BLE001 - every failure is reported, none is fatal
        oom = _oom_reason(e)
        if oom:
            res.update(status="oom", reason=f"out of memory: {oom}")
        else:
            res.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                       traceback=traceback.format_exc()[-3000:])
    finish()


# ----------------------------------------------------------------------------- parent side
def _cpu_busy(window: float = 0.3) -> float:
    """Fraction of all CPUs busy over ``window`` seconds (from /proc/stat)."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle
    try:
        t1, i1 = snap()
        time.sleep(window)
        t2, i2 = snap()
        return 1.0 - (i2 - i1) / max(t2 - t1, 1)
    except OSError:
        return 0.0


def wait_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait_s``) until other processes leave the CPUs mostly idle.

    Returns the busy fraction seen last (recorded with each result: this machine is shared).
    """
    deadline = time.monotonic() + max_wait_s
    busy = _cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = _cpu_busy()
    return busy


def _watch(proc: subprocess.Popen, budget: int, limit_s: float) -> tuple[str | None, int]:
    """Poll a child until it exits; kill it over budget / time. Returns (why killed, max RSS)."""
    start = time.monotonic()
    max_rss = 0
    while proc.poll() is None:
        rss = _proc_status(proc.pid).get("VmRSS", 0)
        max_rss = max(max_rss, rss)
        why = None
        if rss > budget:
            why = "over-budget"
        elif time.monotonic() - start > limit_s:
            why = "timeout"
        if why:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return why, max_rss
        time.sleep(0.02)
    return None, max_rss


def run_method(case: Case, method: str, workdir: Path, reference: Path | None,
               quiet_wait_s: float = 0.0, log: Callable[[str], None] = print) -> MethodResult:
    """Run one method of ``case`` in a fresh child process and return its result."""
    if method in case.skip:
        return MethodResult(method, "unsupported", case.skip[method])
    out = workdir / f"{case.key}.{method}.json"
    save_ref = workdir / f"{case.key}.reference.npz"
    spec = {
        "module": case.module, "method": method, "params": case.params, "out": str(out),
        "reference_path": str(reference) if reference else None,
        "save_reference": str(save_ref), "tolerance": list(case.tolerance),
        "repeats": case.repeats, "min_total_s": case.min_total_s,
    }
    spec_path = workdir / f"{case.key}.{method}.spec.json"
    spec_path.write_text(json.dumps(spec))
    busy = wait_quiet(quiet_wait_s) if quiet_wait_s > 0 else None
    env = dict(os.environ, PYTHONHASHSEED="0", TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    if case.malloc == "steady":
        env.update(STEADY_MALLOC)
    log_path = workdir / f"{case.key}.{method}.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([case.python, str(HERE / "harness.py"), str(spec_path)],
                                stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=str(HERE.parent))
        killed, max_rss = _watch(proc, case.budget_bytes, case.time_limit_s)
    if killed == "over-budget":
        r = MethodResult(method, "over-budget",
                         f"exceeded the memory budget of {case.budget_bytes / GiB:.1f} GiB "
                         f"(resident {max_rss / GiB:.2f} GiB when stopped)")
    elif killed == "timeout":
        r = MethodResult(method, "timeout", f"did not finish within the time limit of {case.time_limit_s:.0f} s")
    elif not out.exists():
        tail = log_path.read_text()[-500:].strip().splitlines()
        r = MethodResult(method, "error", f"child exited with code {proc.returncode}: "
                         f"{tail[-1] if tail else 'no output'}")
        if proc.returncode in (-9, 137):
            r = MethodResult(method, "oom", "killed by the operating system (out of memory)")
    else:
        d = json.loads(out.read_text())
        known = {f.name for f in dataclasses.fields(MethodResult)}
        r = MethodResult(**{k: v for k, v in d.items() if k in known})
        r.meta = dict(r.meta or {})
        for k in ("warmup_s", "warmup_cpu_s", "peak_exact", "rss_peak_bytes", "pool_peak_bytes", "traceback"):
            if k in d:
                r.meta[k] = d[k]
    if busy is not None:
        r.meta["cpu_busy_before"] = round(busy, 2)
    r.meta["max_rss_bytes"] = max_rss
    log(_one_line(case, r))
    return r


def _one_line(case: Case, r: MethodResult) -> str:
    if r.measured:
        return (f"  {case.key:<28} {r.method:<26} {r.median_s * 1e3:10.2f} ms  "
                f"{(r.peak_bytes or 0) / MiB:9.1f} MiB  {r.check}")
    return f"  {case.key:<28} {r.method:<26} {r.status}: {r.reason[:150]}"


def run_case(case: Case, quiet_wait_s: float = 0.0, log: Callable[[str], None] = print,
             jobs: int = 1) -> CaseResult:
    """Run the reference, then every other method of ``case``, each in its own process.

    ``jobs`` > 1 runs that many methods at once (quick mode: the processes then share the
    CPUs, so times are not comparable; full runs use 1).
    """
    from concurrent.futures import ThreadPoolExecutor

    log(f"[{case.key}] {case.title}")
    with tempfile.TemporaryDirectory(prefix=f"bench-{case.key}-") as tmp:
        work = Path(tmp)
        ref_res = run_method(case, case.reference, work, None, quiet_wait_s, log)
        ref_path = work / f"{case.key}.reference.npz"
        have_ref = ref_path.exists()

        def one(m: str) -> MethodResult:
            r = run_method(case, m, work, ref_path if have_ref else None, quiet_wait_s, log)
            if not have_ref and r.status == "reference":
                r.status, r.check = "ok", "unchecked: the reference method failed"
            return r

        others = [m for m in case.methods if m != case.reference]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = dict(zip(others, pool.map(one, others)))
        results[case.reference] = ref_res
    return CaseResult(case, [results[m] for m in case.methods])


def ratio(cr: CaseResult, method: str, what: str = "median_s") -> float | None:
    """``method``'s figure divided by the ``ratio_to`` method's (None if either is missing)."""
    a, b = cr.get(method), cr.get(cr.case.ratio_to)
    if not a or not b or not a.measured or not b.measured:
        return None
    x, y = getattr(a, what), getattr(b, what)
    if x is None or y is None or y == 0:
        return None if y != 0 else math.inf
    return x / y


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: harness.py SPEC.json (run by benchmarks/run.py)")
    _child(sys.argv[1])
