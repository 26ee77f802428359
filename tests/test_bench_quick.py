"""`make bench QUICK=1`'s code path end to end: benchmarks/run.py --quick runs every section on
small sizes, each method in its own process, and writes BENCHMARKS.md and results.json — so the
harness and every benchmark module cannot rot. (Timings are not checked: quick runs methods two
at a time on small sizes.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # 10+ minutes on a loaded 2-core machine (every section): `make test-slow`

pytest.importorskip("torch")
pytest.importorskip("opacus")

#: methods that may be reported as unsupported in quick mode, with words their reason must hold
MAY_BE_UNSUPPORTED = {
    "tf_privacy": "TensorFlow Privacy",
    "backpack": "BackPACK",
    "opacus_ghost": "Parameter tying is not supported",   # Opacus refuses the tied GPT-2 table
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    out = tmp_path_factory.mktemp("bench-quick")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (json.loads((out / "results.json").read_text()), (out / "BENCHMARKS.md").read_text(),
            proc.stdout)


def _results(data: dict) -> list[tuple[str, dict]]:
    return [(case["case"]["key"], r) for cases in data["sections"].values() for case in cases
            for r in case["results"]]


def test_every_section_ran_and_every_method_is_checked(quick_run) -> None:
    data, md, _ = quick_run
    assert data["quick"] is True
    assert {"per_example", "per_example_tf", "weight_grad", "attribution", "similarity"} <= set(data["sections"])
    seen = set()
    for key, r in _results(data):
        seen.add(r["method"])
        status = r["status"]
        if status == "unsupported" and (r["method"] in MAY_BE_UNSUPPORTED or "venv-gluon" in r["reason"]):
            word = MAY_BE_UNSUPPORTED.get(r["method"], "venv-gluon")
            assert word in r["reason"], (key, r)
            continue
        assert status in ("ok", "reference"), (key, r["method"], status, r["reason"])
        assert r["median_s"] > 0 and len(r["times_s"]) >= 5 and r["peak_bytes"] is not None, (key, r)
        assert r["check"] == "is the reference" or "max rel err" in r["check"], (key, r)
    assert {"embgrad", "plain", "loop", "vmap", "opacus_hooks", "opacus_ghost", "vectorized_map",
            "dense", "torch_sparse", "tf_densify", "row_grad", "captum_lig", "captum_tracin"} <= seen


def test_markdown_has_tables_targets_and_machine(quick_run) -> None:
    data, md, _ = quick_run
    assert md.startswith("# embgrad benchmarks (quick sizes)")
    for needle in ("## Targets", "## How to read these tables", "**Machine**", "**Versions**",
                   "1. Per-example embedding gradients (PyTorch)", "2. Weight-gradient extraction",
                   "3. Attribution", "4. Gradient similarity", "| `embgrad` |", "time / `embgrad`"):
        assert needle in md, needle
    # quick sizes measure no target, and say so
    assert data["targets"] and all(t["met"] is None for t in data["targets"])
    assert md.count("quick sizes: targets are for the full sizes") == len(data["targets"])


def test_quick_never_touches_the_committed_results(quick_run) -> None:
    _, _, stdout = quick_run
    assert "wrote " in stdout and str(ROOT / "BENCHMARKS.md") not in stdout
