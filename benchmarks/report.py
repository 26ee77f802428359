"""Rendering of benchmark results: Markdown tables for BENCHMARKS.md, rich tables for the console,
and the list of targets with what was measured against each.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from harness import MiB, CaseResult, MethodResult, ratio

HERE = Path(__file__).resolve().parent


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "—"
    if b < MiB:
        return f"{b / 1024:.0f} KiB"
    if b < 2 ** 30:
        return f"{b / MiB:.1f} MiB"
    return f"{b / 2 ** 30:.2f} GiB"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def _status_text(r: MethodResult) -> str:
    if r.measured:
        return r.check
    return f"**{r.status}**: {r.reason}"


def _row(cr: CaseResult, r: MethodResult) -> list[str]:
    t_ratio = ratio(cr, r.method, "median_s")
    m_ratio = ratio(cr, r.method, "peak_bytes")
    extra = f"{r.evals}" if r.evals is not None else None
    row = [f"`{r.method}`", fmt_time(r.median_s if r.measured else None), fmt_ratio(t_ratio),
           fmt_time(r.median_cpu_s if r.measured else None),
           fmt_bytes(r.peak_bytes if r.measured else None), fmt_ratio(m_ratio)]
    if any(x.evals is not None for x in cr.results):
        row.append(extra or "—")
    row.append(_status_text(r))
    return row


def case_markdown(cr: CaseResult) -> str:
    """One Markdown table: method, median time, ratio, CPU time, peak memory, ratio, check."""
    c = cr.case
    head = ["method", "median time", f"time / `{c.ratio_to}`", "CPU time", "peak memory",
            f"memory / `{c.ratio_to}`"]
    if any(x.evals is not None for x in cr.results):
        head.append("model evals")
    head.append(f"check against `{c.reference}` / status")
    lines = [f"### {c.title}", ""]
    lines.append(f"Case `{c.key}`; memory budget {fmt_bytes(c.budget_bytes)} per method; "
                 f"median of ≥ {c.repeats} timed calls after a checked warm-up call; peak memory "
                 "is what one call adds (see *How to read*)"
                 + ("; glibc malloc defaults." if c.malloc == "default" else "."))
    lines.append("")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for r in cr.results:
        lines.append("| " + " | ".join(_row(cr, r)).replace("\n", " ") + " |")
    for n in c.notes:
        lines += ["", n]
    return "\n".join(lines) + "\n"


def print_case(cr: CaseResult) -> None:
    """The same table on the console (rich)."""
    from rich.console import Console
    from rich.table import Table

    c = cr.case
    t = Table(title=c.title, title_justify="left")
    for h in ("method", "median", f"÷ {c.ratio_to}", "CPU", "peak mem", f"÷ {c.ratio_to}", "check / status"):
        t.add_column(h, overflow="fold")
    for r in cr.results:
        row = _row(cr, r)
        row = [row[0].strip("`")] + row[1:6] + [row[-1].replace("**", "")]
        t.add_row(*row)
    Console(width=160).print(t)


# ----------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """One target of issue 6 and what this run measured against it."""

    text: str
    measured: str
    met: bool | None       # None: could not be measured in this run
    reason: str = ""


def targets_markdown(targets: Iterable[Target]) -> str:
    lines = ["| target | measured in this run | verdict | why, where missed |",
             "|---|---|---|---|"]
    for t in targets:
        mark = {True: "met", False: "**missed**", None: "not measured"}[t.met]
        lines.append(f"| {t.text} | {t.measured} | {mark} | {t.reason} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- machine
def _pip_version(python: str, name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:   # noqa: BLE001
        return "not installed"


def machine_info() -> dict[str, Any]:
    """The machine, the versions and the date, for the header of BENCHMARKS.md."""
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=HERE.parent, timeout=10).stdout.strip()
    except Exception:   # noqa: BLE001
        commit = ""
    pkgs = ["embgrad", "torch", "tensorflow", "keras", "opacus", "captum", "backpack-for-pytorch",
            "transformers", "numpy"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem,
        "python": platform.python_version(), "platform": platform.platform(),
        "commit": commit,
        "versions": {p: _pip_version(sys.executable, p) for p in pkgs},
    }


def machine_markdown(info: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {x}" for k, x in info["versions"].items())
    extra = "".join(f", {k} {x}" for k, x in info.get("extra_versions", {}).items())
    commits = sorted(set((info.get("sections") or {}).values()) - {info["commit"]})
    by = info.get("sections") or {}
    older = "".join(f"; sections {', '.join(k for k, c in by.items() if c == old)} at commit `{old}`"
                    for old in commits)
    return (f"- **Date**: {info['date']} (commit `{info['commit']}`{older})\n"
            f"- **Machine**: {info['cpu']}, {info['cores']} cores, {fmt_bytes(info['memory_bytes'])} "
            f"RAM, {info['platform']}; shared with other processes (see *How to read*)\n"
            f"- **Versions**: Python {info['python']}, {v}{extra}\n")
