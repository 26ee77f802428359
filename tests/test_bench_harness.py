"""The benchmark harness (benchmarks/harness.py) on a fake, NumPy-only benchmark module: every
method in its own process, the reference first, results checked before timing, a memory
budget enforced, and every failure reported with its reason instead of a number."""
from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
from harness import Case, Mismatch, compare, ratio, run_case, sparse_rows  # noqa: E402

FAKE = '''
import time
import numpy as np
from harness import Bench, Unsupported

def build(method, params):
    n = params["n"]
    x = np.arange(n, dtype=np.float64)
    if method in ("ref", "good"):
        return Bench(lambda: x * 2, lambda out: {"x": out, "g_rows": np.array([3, 1]),
                                                  "g_values": np.ones((2, 2))})
    if method == "slow":
        def run():
            time.sleep(0.02)
            return x * 2
        return Bench(run, lambda out: {"x": out}, evals=7, meta={"note": "slow"})
    if method == "wrong":
        return Bench(lambda: x * 2 + (x == 5), lambda out: {"x": out})
    if method == "disjoint":
        return Bench(lambda: x, lambda out: {"y": out})
    if method == "hog":
        def run():
            a = np.ones(params["hog_bytes"] // 8)      # touched: resident
            time.sleep(5)
            return a
        return Bench(run, lambda out: {"x": x * 2})
    if method == "nomem":
        def run():
            raise MemoryError("Unable to allocate 7.5 TiB for an array")
        return Bench(run, lambda out: {})
    if method == "sleepy":
        def run():
            time.sleep(30)
        return Bench(run, lambda out: {})
    if method == "crash":
        raise RuntimeError("the model exploded")
    raise Unsupported(f"no such method {method!r}: this fake benchmark only knows a few")
'''


@pytest.fixture()
def fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "fake_bench.py").write_text(textwrap.dedent(FAKE))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "fake_bench"


def _case(methods: tuple[str, ...], **kw) -> Case:
    base = dict(key="fake", title="fake benchmark", module="fake_bench",
                params={"n": 10, "hog_bytes": 400 * 2 ** 20}, methods=methods, reference="ref",
                ratio_to="good", budget_bytes=200 * 2 ** 20, time_limit_s=20.0, repeats=5,
                min_total_s=0.0)
    base.update(kw)
    return Case(**base)


def test_every_outcome_is_reported_with_its_reason(fake_module: str) -> None:
    methods = ("ref", "good", "slow", "wrong", "disjoint", "hog", "nomem", "crash", "nonesuch")
    cr = run_case(_case(methods), log=lambda _: None, jobs=3)
    by = {r.method: r for r in cr.results}
    assert [r.method for r in cr.results] == list(methods)
    assert by["ref"].status == "reference" and by["ref"].check == "is the reference"
    good = by["good"]
    assert good.status == "ok" and good.check.startswith("x, g: max rel err")
    assert len(good.times_s) >= 5 and good.median_s is not None and good.peak_bytes is not None
    slow = by["slow"]
    assert slow.status == "ok" and slow.evals == 7 and slow.meta["note"] == "slow"
    assert 0.02 <= slow.median_s < 1.0 and slow.median_cpu_s < slow.median_s   # sleeping costs no CPU
    assert ratio(cr, "slow") > 1.0
    assert by["wrong"].status == "mismatch" and "x: at (5,) got 11" in by["wrong"].reason
    assert by["disjoint"].status == "mismatch" and "none of the reference's arrays" in by["disjoint"].reason
    assert by["hog"].status == "over-budget" and "budget of 0.2 GiB" in by["hog"].reason
    assert by["nomem"].status == "oom" and "7.5 TiB" in by["nomem"].reason
    assert by["crash"].status == "error" and "RuntimeError: the model exploded" in by["crash"].reason
    assert by["nonesuch"].status == "unsupported" and "only knows a few" in by["nonesuch"].reason
    assert ratio(cr, "hog") is None
    # results.json round trip (run.py --merge re-renders a previous run from it)
    back = harness.CaseResult.from_json(json.loads(json.dumps(cr.to_json())))
    assert back.case == dataclasses.replace(cr.case, python=back.case.python)
    assert [dataclasses.asdict(r) for r in back.results] == [dataclasses.asdict(r) for r in cr.results]


def test_time_limit_and_unchecked_without_reference(fake_module: str) -> None:
    case = _case(("crash", "good", "sleepy"), reference="crash", time_limit_s=3.0)
    cr = run_case(case, log=lambda _: None, jobs=2)
    by = {r.method: r for r in cr.results}
    assert by["crash"].status == "error"
    assert by["good"].status == "ok" and by["good"].check == "unchecked: the reference method failed"
    assert by["sleepy"].status == "timeout" and "3 s" in by["sleepy"].reason


def test_compare_sparse_rows_on_the_union() -> None:
    ref = {"g_rows": np.array([1, 4]), "g_values": np.array([[1.0, 2.0], [3.0, 4.0]])}
    dense = np.zeros((6, 2))
    dense[[1, 4]] = ref["g_values"]
    rows, values = sparse_rows(dense)
    assert compare({"g_rows": rows, "g_values": values}, ref, 1e-6, 1e-9).startswith("g: ")
    # a row present on one side only counts as a mismatch (against zeros)
    extra = {"g_rows": np.array([1, 2, 4]), "g_values": np.array([[1.0, 2.0], [0.5, 0], [3.0, 4.0]])}
    with pytest.raises(Mismatch, match="g_values"):
        compare(extra, ref, 1e-6, 1e-9)
    # all-zero rows are dropped, order does not matter
    r, v = sparse_rows((np.array([4, 2, 1]), np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]])))
    assert r.tolist() == [1, 4] and v.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_compare_tolerance_is_relative_to_the_largest_value() -> None:
    ref = {"x": np.array([1000.0, 1e-3])}
    assert compare({"x": np.array([1000.0, 1.5e-3])}, ref, 1e-6, 1e-6)        # 5e-4 < 1e-6 · 1000
    with pytest.raises(Mismatch, match=r"x: at \(1,\)"):
        compare({"x": np.array([1000.0, 3e-3])}, ref, 1e-6, 1e-6)
    with pytest.raises(Mismatch, match="shape"):
        compare({"x": np.zeros(3)}, ref, 1e-6, 1e-6)


def test_child_usage_message() -> None:
    import subprocess

    out = subprocess.run([sys.executable, str(BENCH / "harness.py")], capture_output=True, text=True)
    assert out.returncode != 0 and "usage: harness.py SPEC.json" in out.stderr
    assert harness.HERE == BENCH


def test_xla_out_of_memory_counts_as_oom():
    exc = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 33280000000 bytes.")
    reason = harness._oom_reason(exc)
    assert reason is not None and "31.0 GiB" in reason
    assert harness._oom_reason(RuntimeError("INVALID_ARGUMENT: shapes differ")) is None
