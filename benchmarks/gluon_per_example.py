"""Per-example embedding gradients in MXNet Gluon, norms + clipped sum: embgrad against the
usual Gluon answer, one backward pass per example with ``grad_req='add'`` bookkeeping.

The DP-SGD task of ``per_example.py`` on the same data (Zipf ids, right-padded): for B
examples, each example's gradient norm ‖G_b‖ and Σ_b min(1, C/‖G_b‖) G_b, C the median norm.
The model: embedding → mask-aware mean pool → dense (hybridized, as Gluon users train).
Methods, each in its own process run by the harness with the ``.venv-gluon`` interpreter
(MXNet 1.9 needs numpy<1.24):

* ``embgrad``: one forward inside ``embgrad.capture``, ``cap.gradients(loss)``,
  ``per_example().norms()`` and ``.clip(C).sum()``;
* ``plain``: one forward + ``loss.backward()`` (the floor: no per-example anything);
* ``loop_add``: the reference: the embedding's ``grad_req='add'`` (every other parameter
  frozen), one forward + backward per example, each example's gradient read off as the
  difference of the accumulated ``weight.grad()`` (dense (V, D) per step).

Run alone, in .venv-gluon or the main venv (the children always use .venv-gluon):
``python benchmarks/gluon_per_example.py [--quick]``; ``main(quick) -> dict`` for run.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import GiB, Bench, Case, Unsupported, run_case, sparse_rows  # noqa: E402
from models import PAD, labels, zipf_ids  # noqa: E402

METHODS = ("embgrad", "plain", "loop_add")
REFERENCE = "loop_add"
GLUON_PYTHON = HERE.parent / ".venv-gluon" / "bin" / "python"


# ----------------------------------------------------------------------------- cases
def params(vocab: int, dim: int = 128, batch: int = 64, length: int = 64) -> dict:
    return {"vocab": vocab, "dim": dim, "batch": batch, "length": length, "classes": 2, "seed": 0}


def make_case(key: str, p: dict, budget: int, time_limit: float = 900.0, repeats: int = 5,
              methods: tuple[str, ...] = METHODS) -> Case:
    title = (f"Gluon per-example gradients, norms + clipped sum: classifier (embedding → mean pool "
             f"→ dense, hybridized), V={p['vocab']:,}, D={p['dim']}, B={p['batch']}, T={p['length']}")
    skip = {} if GLUON_PYTHON.exists() else {
        m: "no .venv-gluon (build it with `make test-gluon`)" for m in methods}
    return Case(key=key, title=title, module="gluon_per_example", params=p, methods=methods,
                reference=REFERENCE, budget_bytes=budget, time_limit_s=time_limit, repeats=repeats,
                tolerance=(2e-4, 1e-6), python=str(GLUON_PYTHON), skip=skip,
                notes=("MXNet 1.9.1 (CPU), its own venv .venv-gluon",))


def cases(quick: bool) -> list[Case]:
    """The classifier at issue 2's sizes (V=50k; V=1M), or small sizes for a quick run."""
    if quick:
        return [make_case("gluon_pe_quick", params(5000, 32, 16, 16), 2 * GiB, 120)]
    return [make_case("gluon_pe_50k", params(50_000), 8 * GiB),
            # the loop reference moves dense (V, D) = 512 MB arrays per example: minutes a pass
            make_case("gluon_pe_1m", params(1_000_000), 8 * GiB, time_limit=2400.0, repeats=1)]


# ----------------------------------------------------------------------------- setup (child)
class _Setup:
    """Model, inputs, loss and the clipping bound C of one case (identical in every process)."""

    def __init__(self, p: dict):
        import mxnet as mx
        from mxnet import autograd, gluon, nd

        mx.random.seed(p["seed"])
        self.mx, self.autograd, self.nd, self.p = mx, autograd, nd, p
        B, T, V, D = p["batch"], p["length"], p["vocab"], p["dim"]
        ids = zipf_ids(B, T, V, seed=p["seed"])
        self.x = nd.array(ids, dtype="int64")
        self.mask = nd.array(ids != PAD, dtype="float32")
        self.y = nd.array(labels(B, p["classes"], seed=p["seed"]))
        self.model = _classifier(gluon, V, D, p["classes"])
        self.model.initialize(mx.init.Normal(0.1))
        self.model.hybridize()
        self.model(self.x, self.mask)
        self.emb = self.model.embedding
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        self.max_norm = self._median_norm()

    def loss(self, x: Any, mask: Any, y: Any) -> Any:
        return self.loss_fn(self.model(x, mask), y).sum()

    def _median_norm(self) -> float:
        import embgrad

        with embgrad.capture(self.model) as cap:
            with self.autograd.record():
                loss = self.loss(self.x, self.mask, self.y)
        norms = cap.gradients(loss).only().per_example().norms()
        return float(np.median(norms.asnumpy()))


def _classifier(gluon: Any, V: int, D: int, C: int) -> Any:
    class Classifier(gluon.HybridBlock):
        """embedding → mask-aware mean pool → dense (the demo classifier's shape)."""

        def __init__(self, **kw: Any):
            super().__init__(**kw)
            with self.name_scope():
                self.embedding = gluon.nn.Embedding(V, D)
                self.out = gluon.nn.Dense(C, in_units=D)

        def hybrid_forward(self, F: Any, x: Any, mask: Any) -> Any:
            e = F.broadcast_mul(self.embedding(x), F.expand_dims(mask, axis=2))
            pooled = F.broadcast_div(F.sum(e, axis=1), F.maximum(F.sum(mask, axis=1, keepdims=True), 1))
            return self.out(pooled)

    return Classifier()


def _result(norms: np.ndarray, rows: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    rows, values = sparse_rows((rows, values))
    return {"norms": np.asarray(norms, dtype=np.float64), "clipped_rows": rows, "clipped_values": values}


# ----------------------------------------------------------------------------- methods (child)
def _embgrad(s: _Setup) -> Bench:
    import embgrad

    def run() -> Any:
        with embgrad.capture(s.model) as cap:
            with s.autograd.record():
                loss = s.loss(s.x, s.mask, s.y)
        pe = cap.gradients(loss, loss_reduction="sum").only().per_example()
        norms, clipped = pe.norms(), pe.clip(s.max_norm).sum()
        norms.wait_to_read()
        clipped.values.wait_to_read()
        return norms, clipped

    def result(out: Any) -> dict[str, np.ndarray]:
        norms, clipped = out
        return _result(norms.asnumpy(), *clipped.numpy())

    return Bench(run, result)


def _plain(s: _Setup) -> Bench:
    w = s.emb.weight

    def run() -> Any:
        with s.autograd.record():
            loss = s.loss(s.x, s.mask, s.y)
        loss.backward()
        g = w.grad()
        g.wait_to_read()
        return g

    def result(g: Any) -> dict[str, np.ndarray]:
        rows, values = sparse_rows(g.asnumpy())
        return {"grad_rows": rows, "grad_values": values}

    return Bench(run, result)


def _loop_add(s: _Setup) -> Bench:
    nd = s.nd
    for name, prm in s.model.collect_params().items():
        prm.grad_req = "add" if prm is s.emb.weight else "null"
    w = s.emb.weight
    B = s.p["batch"]

    def per_example(clip: bool) -> tuple[np.ndarray, Any]:
        w.zero_grad()
        prev = nd.zeros(w.shape)
        acc = nd.zeros(w.shape)
        norms = np.empty(B)
        for b in range(B):
            sl = slice(b, b + 1)
            with s.autograd.record():
                loss = s.loss(s.x[sl], s.mask[sl], s.y[sl])
            loss.backward()                        # adds example b's gradient into weight.grad()
            total = w.grad()
            g = total - prev                       # the bookkeeping: this example's share
            prev = total.copy()
            n = float(nd.norm(g).asscalar())
            norms[b] = n
            acc += g * (min(1.0, s.max_norm / max(n, 1e-30)) if clip else 1.0)
        acc.wait_to_read()
        return norms, acc

    def result(out: Any) -> dict[str, np.ndarray]:
        norms, acc = out
        rows, values = sparse_rows(acc.asnumpy())
        res = _result(norms, rows, values)
        _, total = per_example(clip=False)        # the unclipped sum: reference for `plain`
        res["grad_rows"], res["grad_values"] = sparse_rows(total.asnumpy())
        return res

    return Bench(lambda: per_example(clip=True), result)


_BUILDERS: dict[str, Callable[[_Setup], Bench]] = {
    "embgrad": _embgrad, "plain": _plain, "loop_add": _loop_add,
}


def build(method: str, p: dict) -> Bench:
    """Build ``method`` on the case ``p`` (called in the child process, in .venv-gluon)."""
    if method not in _BUILDERS:
        raise Unsupported(f"unknown method {method!r}")
    try:
        import mxnet as mx
    except ImportError as e:
        raise Unsupported(f"mxnet does not import here ({e}); run in .venv-gluon") from None
    s = _Setup(p)
    bench = _BUILDERS[method](s)
    meta = {"max_norm": s.max_norm, "mxnet": mx.__version__, "lookups": int(s.mask.sum().asscalar())}
    return Bench(bench.run, bench.result, bench.evals, {**bench.meta, **meta})


# ----------------------------------------------------------------------------- entry points
def _summary(cr: Any) -> dict:
    out = {"title": cr.case.title, "params": cr.case.params, "methods": {}}
    base = cr.get("embgrad")
    for r in cr.results:
        row = {"status": r.status, "median_s": r.median_s, "peak_bytes": r.peak_bytes,
               "check": r.check or r.reason}
        if base is not None and base.measured and r.measured and base.median_s:
            row["time_vs_embgrad"] = r.median_s / base.median_s
        out["methods"][r.method] = row
    return out


def main(quick: bool = False) -> dict:
    """Run every case (each method in its own .venv-gluon process). Returns a JSON-able dict:
    ``{"markdown": the cases' tables (report.case_markdown), "cases": {case key: {"title",
    "params", "methods": {method: {status, median_s, peak_bytes, check, time_vs_embgrad}}}}}``."""
    from report import case_markdown

    results = [run_case(c, quiet_wait_s=0 if quick else 20) for c in cases(quick)]
    return {"markdown": "\n".join(case_markdown(cr) for cr in results),
            "cases": {cr.case.key: _summary(cr) for cr in results}}


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    args = ap.parse_args(argv)
    print(json.dumps(main(args.quick)["cases"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
