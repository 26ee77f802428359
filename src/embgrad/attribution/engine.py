"""The batching engine of attribution: (example, point) rows through the model in chunks of
``batch_size``, with the embedding layer's output replaced per chunk, and the gradients summed
per example."""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable

import numpy as np

from ..backends import Backend, EmbeddingInfo, get_backend
from ..capture import Capture, input_embedding, select_layers
from ..errors import EmbgradError
from .inputs import _Inputs
from .targets import _is_int, _Targets


class _Progress:
    """A transient ``rich`` progress bar that appears only when a run turns out slow and
    stderr is a terminal (never under captured output)."""

    def __init__(self, enabled: bool | None, total: int, what: str):
        self.on = (enabled is True) or (enabled is None and sys.stderr.isatty())
        self.force, self.total, self.what = enabled is True, total, what
        self.t0, self.done, self.task = time.perf_counter(), 0, None
        self.bar: Any = None   # a rich Progress once the work turns out slow

    def advance(self) -> None:
        self.done += 1
        if not self.on:
            return
        if self.bar is None:
            el = time.perf_counter() - self.t0
            if self.force or (el > 1.0 and el / self.done * self.total > 4.0):
                from rich.console import Console
                from rich.progress import Progress
                self.bar = Progress(transient=True, console=Console(stderr=True))
                self.bar.start()
                self.task = self.bar.add_task(self.what, total=self.total, completed=self.done)
        else:
            self.bar.update(self.task, completed=self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _refuse_jax(b: Backend, what: str) -> None:
    """Attribution (``attribute``, ``hotflip``, ``jacobian`` and their generation variants) runs
    the model with the layer's output replaced inside a tape or hooks; JAX (Flax NNX, Keras on
    JAX) has neither, and embgrad does not implement attribution there yet."""
    if b.ops.name == "jax":
        raise EmbgradError(
            f"{what} is not available for JAX models (Flax NNX, Keras on JAX) yet: embgrad's "
            "attribution needs a framework with a tape or hooks. On JAX, "
            "embgrad.value_and_gradients(loss_fn, model, x) gives each lookup's output gradient "
            "(grads[name].output_grad, (B, T, D)): saliency is its norm over D, gradient x input is "
            "(output_grad * model.<layer>(x)).sum(-1) for a loss_fn returning the target's score. For "
            "integrated gradients, SmoothGrad, HotFlip or Jacobians use the PyTorch or "
            "TensorFlow/Keras model.")


class _Engine:
    """Runs chunks of (example, point) rows through the model with the layer's output replaced.

    One :class:`Capture` is entered per chunk, its output replaced through the public
    :meth:`Capture.replacing` (its hooks removed after each forward, also on error), so nothing
    outlives a chunk but its results: memory is bounded by ``batch_size``.

    ``targets``: a prebuilt target object instead of ``target`` (what :mod:`embgrad.generation`
    passes: ``__call__(outputs, idx, like) -> (n, K)``, ``multi``, ``labels``);
    ``batched_vjp``: the K gradients as one batched backward pass (vmap), see the backends.
    """

    def __init__(self, model: Any, inputs: Any, layer: Any, forward: Callable | None,
                 target: Any, batch_size: int | None, progress: bool | None, what: str = "target",
                 call: int | None = None, who: str = "embgrad.attribute", *, targets: Any = None,
                 batched_vjp: bool = False):
        self.backend = b = get_backend(model)
        _refuse_jax(b, who)
        b.ops.eager_only("embgrad.attribute, hotflip and jacobian",
                     "Call them eagerly, outside the tf.function (they return NumPy scores).")
        self.model, self.forward, self.progress = model, forward, progress
        if call is not None and (not _is_int(call) or call < 0):
            raise EmbgradError(f"call must be None or the index (≥ 0) of the layer's lookup within one "
                               f"forward pass, got {call!r}.")
        self.call_index = None if call is None else int(call)
        self.info = _pick_layer(b, model, layer)
        self.inputs = _Inputs(inputs, b)
        self.B = self.inputs.batch
        self.targets = _Targets(target, self.B, b, what) if targets is None else targets
        self.cap = Capture(model, [self.info.layer])
        if batch_size is None:
            batch_size = int(min(512, max(1, 2 ** 20 // max(1, self.inputs.seq_len * self.info.dim))))
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise EmbgradError(f"batch_size must be a positive int (rows per forward pass), got {batch_size!r}.")
        self.batch_size = int(batch_size)
        self.evaluations = 0
        self.batched_vjp = batched_vjp
        random_layers = b.stochastic_layers(model)
        if random_layers:
            warnings.warn(
                f"{type(model).__name__} is in training mode with active dropout ({', '.join(random_layers[:3])}"
                f"{', ...' if len(random_layers) > 3 else ''}): every forward pass draws new masks, so "
                "gradients and attributions are random. Call model.eval() first (embgrad does not "
                "change the mode of your model).", stacklevel=3)
        coupling = b.coupling_layers(model)
        if coupling:
            warnings.warn(
                f"layers {', '.join(coupling)} couple the examples of a batch (BatchNorm in training "
                "mode): attributions then depend on which rows share a forward pass. Put the model "
                "in eval mode for attribution.", stacklevel=3)

    def run(self, idx: np.ndarray, point: Callable[[np.ndarray, slice, Any], Any] | None, grad: bool,
            consume: Callable[[slice, np.ndarray, Any, Any, list | None], None], what: str = "") -> None:
        """For each chunk of rows ``idx`` (example of each row, NumPy (N,)): run the model with the
        layer's output replaced by ``point(idx_chunk, slice, call)`` (None: keep it), and call
        ``consume(slice, idx_chunk, state, values (n, K), grads (list of K (n, T, D)) or None)``
        where ``state["call"]`` is the recorded call and ``state["x"]`` the layer output used."""
        N, bs = int(idx.shape[0]), self.batch_size
        bar = _Progress(self.progress, -(-N // bs), what or "embgrad")
        try:
            for start in range(0, N, bs):
                sl = slice(start, min(N, start + bs))
                self._chunk(idx[sl], sl, point, grad, consume)
                bar.advance()
        finally:
            bar.close()

    def _chunk(self, ix: np.ndarray, sl: slice, point: Callable[[np.ndarray, slice, Any], Any] | None,
               grad: bool, consume: Callable[[slice, np.ndarray, Any, Any, list | None], None]) -> None:
        b, info, n = self.backend, self.info, int(ix.shape[0])
        sub = self.inputs.take(ix)
        state: dict[str, Any] = {"call": None, "watch": None, "count": 0}

        def replace(call):
            k = state["count"]
            state["count"] = k + 1
            if self.call_index is None and k == 1:
                raise EmbgradError(
                    f"layer {info.name!r} was called more than once in one forward pass (e.g. a table "
                    "shared by an encoder and a decoder); attribution replaces one lookup per forward: "
                    "pass call=0 for the first lookup (call=1 for the second, ...), or forward= that "
                    "calls the layer once.")
            if k != (self.call_index or 0):
                return None
            state["call"] = call
            shape = b.ops.shape(call.output)
            if not shape or shape[0] != n:
                raise EmbgradError(
                    f"layer {info.name!r} returned shape {shape} for a chunk of {n} examples: its lookup "
                    "does not follow the batch (e.g. position embeddings looked up once per batch). "
                    "Attribute the token embedding layer instead.")
            x = point(ix, sl, call) if point is not None else None
            if x is not None and b.ops.shape(x) != shape:
                raise EmbgradError(f"layer {info.name!r}: the replacement of shape {b.ops.shape(x)} does not "
                                   f"match its output of shape {shape}.")
            if state["watch"] is not None:
                x = state["watch"](call.output if x is None else x)
            state["x"] = call.output if x is None else x
            return x

        def fn(watch):
            state["watch"] = watch
            with self.cap.replacing(replace), self.cap:
                out = self.inputs.call(self.forward, self.model, sub)
            if state["call"] is None:
                raise EmbgradError(
                    f"the forward pass called layer {info.name!r} {state['count']} times, so lookup "
                    f"call={self.call_index or 0} never happened: check that the inputs reach it, or "
                    "name the embedding layer the model uses with layer=.")
            return self.targets(out, ix, state["call"].ids)

        if grad:
            values, grads = b.value_and_grads_batched(fn) if self.batched_vjp else b.value_and_grads(fn)
        else:
            with b.ops.no_grad():
                values, grads = fn(None), None
        self.evaluations += n
        with b.ops.no_grad():
            consume(sl, ix, state, values, grads)

    # -------------------------------------------------------------- common passes
    def observe(self, grad: bool) -> dict[str, Any]:
        """The inputs as they are: ids (B, T), e (B, T, D), values NumPy (B, K) and, with
        ``grad``, the K gradients (B, T, D) at the input (accumulation dtype)."""
        b = self.backend
        parts: dict[str, list] = {"ids": [], "e": [], "values": [], "grads": []}

        def consume(sl, ix, state, values, grads):
            call = state["call"]
            parts["ids"].append(call.ids)
            parts["e"].append(state["x"] if not grad else _detached(b, state["x"]))
            parts["values"].append(_values_np(b, values))
            if grads is not None:
                parts["grads"].append([_acc(b, g) for g in grads])

        self.run(np.arange(self.B, dtype=np.int64), None, grad, consume, "forward")
        cat = (lambda xs: xs[0]) if len(parts["ids"]) == 1 else (lambda xs: b.ops.concat(xs, axis=0))
        obs = {"ids": cat(parts["ids"]), "e": cat(parts["e"]), "values": np.concatenate(parts["values"])}
        if grad:
            K = len(parts["grads"][0])
            obs["grads"] = [cat([g[k] for g in parts["grads"]]) for k in range(K)]
        ids_shape = b.ops.shape(obs["ids"])
        if b.ops.shape(obs["e"])[:-1] != ids_shape:
            raise EmbgradError(
                f"layer {self.info.name!r} maps ids of shape {ids_shape} to {b.ops.shape(obs['e'])}, not one "
                "vector per id; attribution needs a plain token embedding (not a bag / pooled lookup).")
        return obs

    def values_at(self, emb: Any) -> np.ndarray:
        """NumPy (B, K): target values with the layer output replaced by ``emb`` (B, T, D)."""
        b, out = self.backend, []

        def point(ix, sl, call):
            return b.ops.gather(emb, b.ops.from_numpy(ix, like=emb))

        self.run(np.arange(self.B, dtype=np.int64), point, False,
                 lambda sl, ix, st, v, g: out.append(_values_np(b, v)), "baseline")
        return np.concatenate(out)

    def accumulate(self, idx: np.ndarray, weights: np.ndarray, point: Callable, like: Any,
                   what: str) -> list[Any]:
        """K tensors (B, T, D): Σ over rows r of weights[r] · gradient at row r, per example."""
        b = self.backend
        acc: list[Any] = []
        dt = _acc_dtype(b, like)

        def consume(sl, ix, state, values, grads):
            it = b.ops.from_numpy(ix, like=like)
            w = _per_row(b, weights[sl], like, dt)
            for k, g in enumerate(grads):
                s = b.ops.segment_sum(b.ops.cast(g, dt) * w, it, self.B)
                if k < len(acc):
                    acc[k] = acc[k] + s
                else:
                    acc.append(s)

        self.run(idx, point, True, consume, what)
        return acc


def _per_row(b: Backend, v: np.ndarray, like: Any, dtype: str) -> Any:
    """NumPy (n,) as a framework tensor (n, 1, ..., 1) of ``dtype`` that scales the rows of
    tensors shaped like ``like``."""
    t = b.ops.cast(b.ops.from_numpy(np.asarray(v, dtype=np.float64), like=like), dtype)
    return b.ops.reshape(t, (-1,) + (1,) * (len(b.ops.shape(like)) - 1))


def _values_np(b: Backend, v: Any) -> np.ndarray:
    return np.asarray(b.ops.to_numpy(v), dtype=np.float64)


def _acc_dtype(b: Backend, x: Any) -> str:
    return "float64" if b.ops.dtype_name(x) == "float64" else "float32"


def _acc(b: Backend, g: Any) -> Any:
    return g if b.ops.dtype_name(g) in ("float32", "float64") else b.ops.cast(g, "float32")


def _detached(b: Backend, x: Any) -> Any:
    """A copy of ``x`` that records no gradient history (x may be a watched leaf)."""
    with b.ops.no_grad():
        return x * 1


def _pick_layer(b: Backend, model: Any, layer: Any) -> EmbeddingInfo:
    """The one embedding layer to attribute over: ``layer``, else the model's input embeddings
    (Hugging Face ``get_input_embeddings()``), else its only embedding layer."""
    if isinstance(layer, (list, tuple, set)):
        raise EmbgradError(f"attribution runs over one embedding layer; got layer={layer!r}. Pass one "
                           "name or layer object.")
    info: EmbeddingInfo | None
    if layer is not None:
        info = select_layers(b, model, layer)[0]
    else:
        found = select_layers(b, model, None)
        picked = input_embedding(model, found)
        if picked is None:
            raise EmbgradError(
                f"{type(model).__name__} has {len(found)} embedding layers "
                f"({', '.join(i.name for i in found)}) and no get_input_embeddings(): name the "
                "token embedding to attribute over with layer=NAME.")
        info = picked
    if info.kind != "embedding":
        raise EmbgradError(f"layer {info.name!r} is an embedding bag (its output pools several ids), so "
                           "there is no per-token vector to attribute to; use a plain embedding layer.")
    return info
