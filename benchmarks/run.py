"""`make bench`: every benchmark of issue 6 in one run → BENCHMARKS.md and benchmarks/results.json.

Sections (each a module of benchmarks/, each method of each case in its own process):

1. per-example gradients, norms + clipped sum (``per_example``: PyTorch; ``per_example_tf``:
   TensorFlow; ``gluon_per_example``: MXNet Gluon, its methods run in ``.venv-gluon``);
2. weight-gradient extraction (``weight_grad``);
3. attribution: integrated gradients on MiniLM (``attribution``);
4. gradient similarity (``similarity``);
5. loading pretrained vectors (``load_vectors``, when present);
7. embgrad.distributed over gloo: bytes and time of the sparse exchange vs a dense all-reduce,
   row-sharded norms (``dist_exchange``);
8. differentially private training of a recommender, and Opacus with embgrad's samplers (``privacy``);
10. tied tables: whole-table per-example norms + clipped sum of GPT-2's wte = lm_head (``tied``);
11. JAX (Flax NNX): per-example norms + clipped sum vs the plain jitted step and vmap (``jax``).

``--quick`` runs the same code on small sizes (a test runs it so the harness cannot rot);
its outputs go to ``build/bench-quick/`` unless ``--out`` says otherwise, so the committed
full-size BENCHMARKS.md is only rewritten by a full run.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from harness import CaseResult, run_case  # noqa: E402
from report import (case_markdown, machine_info, machine_markdown, print_case,  # noqa: E402
                    targets_markdown)
from targets import evaluate  # noqa: E402

#: section key -> (title, module whose ``cases(quick)`` lists its cases)
SECTIONS: dict[str, tuple[str, str]] = {
    "per_example": ("1. Per-example embedding gradients (PyTorch)", "per_example"),
    "per_example_tf": ("1. Per-example embedding gradients (TensorFlow)", "per_example_tf"),
    # its methods run with .venv-gluon's interpreter (Case.python; skipped with the reason if absent)
    "gluon": ("1. Per-example embedding gradients (MXNet Gluon)", "gluon_per_example"),
    "weight_grad": ("2. Weight-gradient extraction", "weight_grad"),
    "attribution": ("3. Attribution: integrated gradients on MiniLM", "attribution"),
    "similarity": ("4. Gradient similarity", "similarity"),
    "generation": ("9. Attribution for language models that generate (causal LMs)", "generation"),
    "tied": ("10. Tied tables: GPT-2's input embedding shared with its output head (PyTorch)", "tied"),
    "jax": ("11. Per-example embedding gradients (JAX, Flax NNX)", "jax_per_example"),
}
#: sections run by a module's own ``main(quick) -> dict`` (``{"markdown": ..., ...}``), in a subprocess
EXTERNAL: dict[str, tuple[str, str]] = {
    "load_vectors": ("5. Loading pretrained vectors", "load_vectors"),
    "influence": ("6. Training-data attribution (embgrad.influence, TracInCP)", "influence"),
    "distributed": ("7. Past one machine: sparse gradient exchange over torch.distributed (gloo)",
                    "dist_exchange"),
    "privacy": ("8. Differentially private training: DP-SGD, DP-FEST, DP-AdaFEST, Opacus", "privacy"),
    "interleaved": ("12. Per-example cost against the plain step, methods interleaved (issue 19)",
                    "interleaved"),
}


def _section_cases(module: str, quick: bool) -> list:
    if not (HERE / f"{module}.py").exists():
        return []
    return importlib.import_module(module).cases(quick)


def _run_external(key: str, module: str, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``module.main(quick)`` in a subprocess and return its dict."""
    path = HERE / f"{module}.py"
    if not path.exists():
        return {"status": "unavailable", "reason": f"benchmarks/{module}.py does not exist yet"}
    python = sys.executable
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module} as m; "
            f"print('@@RESULT@@' + json.dumps(m.main({quick!r}), default=str))")
    log(f"[{key}] {module}.main(quick={quick}) in {python}")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                              timeout=600 if quick else 3600,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2"))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": "did not finish in time"}
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": "error", "reason": f"exit code {proc.returncode}: {tail[0][:300]}"}
    out = json.loads(marker[-1][len("@@RESULT@@"):])
    log(f"  done in {time.perf_counter() - t0:.1f} s")
    return {"status": "ok", "result": out}


def _external_markdown(title: str, res: dict[str, Any]) -> str:
    lines = [f"## {title}", ""]
    if res["status"] != "ok":
        return "\n".join(lines + [f"Not run: **{res['status']}**: {res['reason']}", ""]) + "\n"
    out = res["result"]
    md = out.get("markdown") if isinstance(out, dict) else None
    if md:
        return "\n".join(lines + [md.strip(), ""]) + "\n"
    rows = out.get("rows") if isinstance(out, dict) else None
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        head = list(rows[0])
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(str(r.get(h, "")) for h in head) + " |" for r in rows]
        return "\n".join(lines + [""]) + "\n"
    return "\n".join(lines + ["```json", json.dumps(out, indent=2, default=str)[:6000], "```", ""]) + "\n"


HOW_TO_READ = """\
## How to read these tables

- Every method of every case ran in **its own process**, so its peak memory is its own:
  *peak memory* is what one call adds on top of the settled process: the peak resident set
  size (`VmHWM`, reset before the timed calls) minus the resident size before them (after the
  warm-up call, a garbage collection and `malloc_trim`); for TensorFlow, which keeps freed
  memory in its own allocator out of the RSS's sight, its allocator's peak if that is larger.
- The children run with glibc's malloc set as a long-running training process has it
  (`MALLOC_MMAP_THRESHOLD_`=32 MiB, `MALLOC_TRIM_THRESHOLD_`=64 MiB: where glibc's own dynamic
  thresholds end up once a large block has been freed). In a fresh process every temporary
  above 128 KiB is a fresh `mmap` whose pages fault in one by one; that measures the kernel's
  page-fault handler in this VM, not the method. The table marked *glibc malloc defaults*
  repeats the V=50k classifier case without these settings, to show that cost.
- Before anything is timed, one warm-up call's **result is checked against the reference**
  method of the case (named in the last column; the framework's own autograd or a
  per-example loop). A method whose result differs is reported as a *mismatch*, not timed.
- Times are the **median of at least 5 calls** (more for fast methods, until 1 s is timed);
  *CPU time* is the process's CPU time per call (both cores count), less sensitive than wall
  time to other processes on this shared machine.
- *time / embgrad* and *memory / embgrad* are ratios to embgrad in the same run: above 1 means
  embgrad is faster or smaller. A method that cannot run is reported with the reason:
  *over-budget* (the parent stopped it when its memory passed the case's budget), *oom*,
  *unsupported*, *timeout* or *error*.
- The machine has 2 cores shared with other developers' processes; each method waited (up to
  15 s) for the CPUs to be idle before it started, but other work may still have overlapped.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the embgrad benchmarks → BENCHMARKS.md + results.json")
    ap.add_argument("--quick", action="store_true", help="small sizes, same code (< 3 minutes)")
    ap.add_argument("--only", default="", help="comma-separated section keys: "
                    + ", ".join(list(SECTIONS) + list(EXTERNAL)))
    ap.add_argument("--out", default=None, help="directory for BENCHMARKS.md and results.json "
                    "(default: the repository root + benchmarks/; build/bench-quick/ with --quick)")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: write BENCHMARKS.md again from the existing results.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other sections of the existing results.json (with --only: re-run some)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="methods run at once (default 1; 2 with --quick, whose times are not for reading)")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="seconds to wait for idle CPUs before each method (default 15; 0 with --quick)")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    unknown = only - set(SECTIONS) - set(EXTERNAL)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(list(SECTIONS) + list(EXTERNAL))}")
    if args.out:
        md_path, json_path = Path(args.out) / "BENCHMARKS.md", Path(args.out) / "results.json"
    elif args.quick:
        md_path, json_path = ROOT / "build/bench-quick/BENCHMARKS.md", ROOT / "build/bench-quick/results.json"
    else:
        md_path, json_path = ROOT / "BENCHMARKS.md", HERE / "results.json"
    jobs = args.jobs if args.jobs is not None else (2 if args.quick else 1)
    quiet = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 15.0)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}" if msg.startswith("[") else msg, flush=True)

    info = machine_info()
    results: dict[str, list[CaseResult]] = {}
    if args.render:
        args.merge, only = True, {""}            # every section from results.json, none run
    for key, (title, module) in SECTIONS.items():
        if only and key not in only:
            continue
        cases = _section_cases(module, args.quick)
        if args.quick:      # the minimum of 5 timed calls, without topping fast methods up to 1 s
            cases = [dataclasses.replace(c, min_total_s=0.0) for c in cases]
        if not cases:
            log(f"[{key}] skipped: benchmarks/{module}.py not present")
        results[key] = [run_case(c, quiet_wait_s=quiet, log=log, jobs=jobs) for c in cases]
    external: dict[str, dict[str, Any]] = {}
    for key, (title, module) in EXTERNAL.items():
        if only and key not in only:
            continue
        external[key] = _run_external(key, module, args.quick, log)
    info["sections"] = {k: info["commit"] for k in list(results) + list(external)}
    previous: dict[str, Any] = {}
    if args.merge and json_path.exists():
        previous = json.loads(json_path.read_text())
        old_commits = previous.get("machine", {}).get("sections") or {
            k: previous.get("machine", {}).get("commit", "?")
            for k in list(previous.get("sections", {})) + list(previous.get("external", {}))}
        info["sections"] = {**old_commits, **info["sections"]}
        if args.render:
            info = {**previous["machine"], "sections": old_commits}
        for key, crs in previous.get("sections", {}).items():
            results.setdefault(key, [CaseResult.from_json(c) for c in crs])
        for key, res in previous.get("external", {}).items():
            external.setdefault(key, res)
        results = {k: results[k] for k in SECTIONS if k in results}
    flat = {cr.case.key: cr for crs in results.values() for cr in crs}
    targets = evaluate(flat, args.quick, external)
    elapsed = previous.get("elapsed_s", 0.0) if args.render else time.perf_counter() - t0

    md = [f"# embgrad benchmarks{' (quick sizes)' if args.quick else ''}", "",
          "Produced by `make bench` (`benchmarks/run.py`"
          f"{' --quick' if args.quick else ''}) in {elapsed / 60:.1f} minutes"
          + (f" (sections {', '.join(sorted(only - {''}))} re-run with --merge into a run of "
             f"{previous.get('elapsed_s', 0) / 60:.0f} minutes started {previous.get('machine', {}).get('date', '?')})"
             if previous and not args.render else "") + ". "
          "Reproduce with `make bench`; `make bench ARGS=--quick` runs the same code on small sizes.",
          "", machine_markdown(info), "## Targets", "",
          targets_markdown(targets), HOW_TO_READ]
    for key, (title, _) in SECTIONS.items():
        if key not in results:
            continue
        md += [f"## {title}", ""]
        if not results[key]:
            md += ["Not run: the benchmark module is not present yet.", ""]
        for cr in results[key]:
            md.append(case_markdown(cr))
    for key, (title, _) in EXTERNAL.items():
        if key in external:
            md.append(_external_markdown(title, external[key]))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(md))
    json_path.write_text(json.dumps({
        "quick": args.quick, "machine": info, "elapsed_s": elapsed,
        "targets": [t.__dict__ for t in targets],
        "sections": {k: [cr.to_json() for cr in v] for k, v in results.items()},
        "external": external,
    }, indent=1, default=str))
    for crs in results.values():
        for cr in crs:
            print_case(cr)
    print(f"wrote {md_path} and {json_path} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
