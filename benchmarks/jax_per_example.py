"""Per-example embedding gradients in JAX (Flax NNX), norms + clipped sum: embgrad's
``value_and_gradients`` against the plain compiled ``nnx.value_and_grad`` step, ``jax.vmap`` of
per-example gradients (jax_privacy's way) and a per-example loop (the reference), on the demo
classifier (``nnx.Embed`` → mask-aware mean pool → ``nnx.Linear``).

* ``embgrad``: one ``jax.jit``-ed step: ``embgrad.value_and_gradients``, ``per_example().norms()``
  and ``.clip(C).sum()`` (a sparse RowGrad with static shape);
* ``plain``: the jitted ``nnx.value_and_grad`` of the loss over every parameter (the table's
  gradient is a dense (V, D) array: JAX has no sparse gradients) — the floor;
* ``vmap``: jitted ``jax.vmap(jax.grad(...))`` over the batch: (B, V, D) per-example gradients of
  the table, their norms and the clipped sum;
* ``loop``: per example, jitted ``jax.grad`` with respect to the rows it looked up (a sub-table),
  B calls (the reference).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench, Case, GiB, Unsupported, sparse_rows  # noqa: E402
from models import PAD, labels, zipf_ids  # noqa: E402

METHODS = ("embgrad", "plain", "vmap", "loop")

NOTES = ("Every method is one `jax.jit`-compiled function (compiled in the warm-up call, not timed); "
         "JAX on the CPU (XLA), float32. `plain` is `nnx.value_and_grad` over all parameters: JAX "
         "has no sparse gradients, so the table's gradient is a dense (V, D) scatter-add, which "
         "embgrad never forms.",
         "Timed on a 2-core VM shared with other engineers' jobs: wall times swing between runs, "
         "so read the ratios of methods in the same run.")


def _params(vocab: int, dim: int = 128, batch: int = 64, length: int = 128) -> dict:
    return {"vocab": vocab, "dim": dim, "batch": batch, "length": length, "classes": 2, "seed": 0}


def _case(key: str, p: dict, budget: int, limit: float) -> Case:
    title = (f"Per-example gradients, norms + clipped sum (JAX, Flax NNX): demo classifier, "
             f"V={p['vocab']:,}, D={p['dim']}, B={p['batch']}, T={p['length']}")
    return Case(key, title, "jax_per_example", p, METHODS, reference="loop", budget_bytes=budget,
                time_limit_s=limit, tolerance=(2e-4, 1e-6), notes=NOTES)


def cases(quick: bool) -> list[Case]:
    """Issue 21: the NNX demo classifier at V=50k and 1M (D=128, B=64, T=128)."""
    if quick:
        return [_case("jax_pe_classifier_quick", _params(5000, 32, 16, 16), 2 * GiB, 120.0)]
    return [_case("jax_pe_classifier_50k", _params(50_000), 8 * GiB, 900.0),
            _case("jax_pe_classifier_1m", _params(1_000_000), 8 * GiB, 900.0)]


def classifier(vocab: int, dim: int, classes: int, seed: int) -> Any:
    """The demo classifier in Flax NNX: embedding → mask-aware mean pool → linear."""
    import jax.numpy as jnp
    from flax import nnx

    class Classifier(nnx.Module):
        def __init__(self) -> None:
            rngs = nnx.Rngs(seed)
            self.embedding = nnx.Embed(vocab, dim, rngs=rngs)
            self.out = nnx.Linear(dim, classes, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            mask = (x != PAD).astype(jnp.float32)[..., None]
            pooled = (self.embedding(x) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
            return self.out(pooled)

    return Classifier()


def loss_fn(model: Any, x: Any, y: Any) -> Any:
    import jax
    import jax.numpy as jnp

    lp = jax.nn.log_softmax(model(x))
    return -jnp.take_along_axis(lp, y[:, None], axis=1).sum()


class _Setup:
    def __init__(self, p: dict):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        self.jax, self.jnp, self.nnx = jax, jnp, nnx
        self.p = p
        self.model = classifier(p["vocab"], p["dim"], p["classes"], p["seed"])
        self.graphdef, self.state = nnx.split(self.model)
        self.x = jnp.asarray(zipf_ids(p["batch"], p["length"], p["vocab"], seed=p["seed"]).astype(np.int32))
        self.y = jnp.asarray(labels(p["batch"], p["classes"], seed=p["seed"]).astype(np.int32))
        self.max_norm = self._median_norm()

    def _median_norm(self) -> float:
        """C = the median per-example norm, so that about half the examples are clipped."""
        import embgrad

        s = self

        @s.jax.jit
        def norms(state: Any, x: Any, y: Any) -> Any:
            _, grads = embgrad.value_and_gradients(loss_fn, s.nnx.merge(s.graphdef, state), x, y)
            return grads["embedding"].per_example().norms()

        return float(np.median(np.asarray(norms(s.state, s.x, s.y))))


def _embgrad(s: _Setup) -> Bench:
    import embgrad

    C = s.max_norm

    @s.jax.jit
    def step(state: Any, x: Any, y: Any) -> Any:
        loss, grads = embgrad.value_and_gradients(loss_fn, s.nnx.merge(s.graphdef, state), x, y)
        pe = grads["embedding"].per_example()
        clipped = pe.clip(C).sum()
        return pe.norms(), clipped.rows, clipped.values

    def run() -> Any:
        return s.jax.block_until_ready(step(s.state, s.x, s.y))

    def result(out: Any) -> dict[str, np.ndarray]:
        norms, rows, values = (np.asarray(a) for a in out)
        keep = rows < s.p["vocab"]          # the padded slots of the static-shape result
        rows, values = sparse_rows((rows[keep], values[keep]))
        return {"norms": norms, "clipped_rows": rows, "clipped_values": values}

    return Bench(run, result)


def _plain(s: _Setup) -> Bench:
    nnx = s.nnx

    @s.jax.jit
    def step(state: Any, x: Any, y: Any) -> Any:
        return nnx.value_and_grad(loss_fn)(nnx.merge(s.graphdef, state), x, y)

    def run() -> Any:
        return s.jax.block_until_ready(step(s.state, s.x, s.y))

    def result(out: Any) -> dict[str, np.ndarray]:
        _, grads = out
        rows, values = sparse_rows(np.asarray(grads["embedding"]["embedding"][...]))
        return {"grad_rows": rows, "grad_values": values}

    return Bench(run, result)


def _table_loss(s: _Setup) -> tuple[Callable[[Any, Any, Any], Any], Any]:
    """loss(table, x, y) for a single batch, the rest of the model fixed."""
    nnx = s.nnx
    graphdef, table, rest = nnx.split(s.model, nnx.PathContains("embedding"), ...)

    def loss(tab: Any, x: Any, y: Any) -> Any:
        return loss_fn(nnx.merge(graphdef, tab, rest), x, y)

    return loss, table


def _vmap(s: _Setup) -> Bench:
    jax, jnp = s.jax, s.jnp
    loss, table = _table_loss(s)
    C = s.max_norm

    @jax.jit
    def step(tab: Any, x: Any, y: Any) -> Any:
        per = jax.vmap(jax.grad(lambda t, x1, y1: loss(t, x1[None], y1[None])), in_axes=(None, 0, 0))(tab, x, y)
        g = per["embedding"]["embedding"][...]                                    # (B, V, D)
        norms = jnp.sqrt(jnp.sum(g * g, axis=(1, 2)))
        factor = jnp.minimum(C / jnp.maximum(norms, 1e-30), 1.0)
        return norms, jnp.tensordot(factor, g, axes=1)

    def run() -> Any:
        return jax.block_until_ready(step(table, s.x, s.y))

    def result(out: Any) -> dict[str, np.ndarray]:
        norms, clipped = out
        rows, values = sparse_rows(np.asarray(clipped))
        return {"norms": np.asarray(norms), "clipped_rows": rows, "clipped_values": values}

    return Bench(run, result)


def _loop(s: _Setup) -> Bench:
    """The reference: per example b, ``jax.grad`` of the loss with respect to a table holding
    only the rows b looked up (its ids remapped to them): JAX's own autodiff, one example at a
    time, exact, and O(rows · D) instead of a dense (V, D) gradient per example (which at
    V = 1M would take minutes per call on this machine)."""
    jax, jnp, nnx = s.jax, s.jnp, s.nnx
    graphdef, table, rest = nnx.split(s.model, nnx.PathContains("embedding"), ...)
    full = np.asarray(table["embedding"]["embedding"][...])
    C = s.max_norm
    xs, ys = np.asarray(s.x), np.asarray(s.y)

    def loss_sub(sub: Any, x1: Any, y1: Any) -> Any:
        tab = jax.tree_util.tree_map(lambda _: sub, table)          # the (R, D) sub-table
        return loss_fn(nnx.merge(graphdef, tab, rest), x1[None], y1[None])

    grad_sub = jax.jit(jax.grad(loss_sub))
    # PAD (row 0) always first, so that the remapped ids keep PAD = 0 for the model's padding mask
    per_rows = [np.union1d([PAD], xs[b]) for b in range(s.p["batch"])]

    def per_example(clip: bool) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        norms = np.zeros(s.p["batch"], np.float32)
        parts_r, parts_v = [], []
        for b, rows in enumerate(per_rows):
            local = np.searchsorted(rows, xs[b]).astype(np.int32)      # ids -> positions in rows
            g = np.asarray(grad_sub(jnp.asarray(full[rows]), jnp.asarray(local), jnp.asarray(ys[b])))
            n = float(np.sqrt(np.sum(g.astype(np.float64) ** 2)))
            norms[b] = n
            parts_r.append(rows)
            parts_v.append(g * (min(1.0, C / max(n, 1e-30)) if clip else 1.0))
        rows_all = np.concatenate(parts_r)
        uniq, inv = np.unique(rows_all, return_inverse=True)
        vals = np.zeros((len(uniq), s.p["dim"]), np.float64)
        np.add.at(vals, inv, np.concatenate(parts_v))
        return norms, (uniq, vals.astype(np.float32))

    def result(out: Any) -> dict[str, np.ndarray]:
        norms, clipped = out
        res = {"norms": norms}
        res["clipped_rows"], res["clipped_values"] = sparse_rows(clipped)
        _, total = per_example(clip=False)          # the unclipped sum: reference for `plain`
        res["grad_rows"], res["grad_values"] = sparse_rows(total)
        return res

    return Bench(lambda: per_example(clip=True), result)


_BUILDERS: dict[str, Callable[[_Setup], Bench]] = {
    "embgrad": _embgrad, "plain": _plain, "vmap": _vmap, "loop": _loop,
}


def build(method: str, params: dict) -> Bench:
    """Build ``method`` on the case ``params`` (called in the child process)."""
    if method not in _BUILDERS:
        raise Unsupported(f"unknown method {method!r}")
    try:
        import flax  # noqa: F401
        import jax  # noqa: F401
    except ImportError as e:
        raise Unsupported(f"JAX/Flax are not installed ({e}): pip install -c constraints.txt -e '.[jax]'") from None
    s = _Setup(params)
    bench = _BUILDERS[method](s)
    return Bench(bench.run, bench.result, bench.evals, {"max_norm": s.max_norm})
