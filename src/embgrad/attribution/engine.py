"""The batching engine of attribution: (example, point) rows through the model in chunks of
``batch_size``, with the embedding layer's output replaced per chunk, and the gradients summed
per example."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..backends import Backend, EmbeddingInfo, get_backend
from ..capture import Capture, input_embedding, select_layers
from ..errors import EmbgradError
from .inputs import _Inputs
from .sites import _Site
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

    ``sites=True`` (:func:`embgrad.attribute`): ``layer`` may also name a composite module or
    several layers (:mod:`embgrad.attribution.sites`). With L sites the engine's "layer output"
    is the L outputs (B, T, D) side by side, (B, L·T, D): the points are built for all of them
    before the forward, watched as ONE tensor and split between the sites (so every backend's
    one-tensor ``value_and_grads`` serves), and ids are side by side too, (B, L·T).
    """

    def __init__(self, model: Any, inputs: Any, layer: Any, forward: Callable | None,
                 target: Any, batch_size: int | None, progress: bool | None, what: str = "target",
                 call: int | None = None, who: str = "embgrad.attribute", *, targets: Any = None,
                 batched_vjp: bool = False, sites: bool = False):
        self.backend = b = get_backend(model)
        _refuse_jax(b, who)
        b.ops.eager_only("embgrad.attribute, hotflip and jacobian",
                     "Call them eagerly, outside the tf.function (they return NumPy scores).")
        self.model, self.forward, self.progress = model, forward, progress
        if call is not None and (not _is_int(call) or call < 0):
            raise EmbgradError(f"call must be None or the index (≥ 0) of the layer's lookup within one "
                               f"forward pass, got {call!r}.")
        self.call_index = None if call is None else int(call)
        if sites:
            from .sites import pick_sites
            self.sites = pick_sites(b, model, layer)
        else:
            info = _pick_layer(b, model, layer)
            self.sites = [_Site(info.name, info)]
        self.info = self.sites[0].info
        #: the plain case: one embedding layer, replaced at its lookup (where the point may be
        #: built from the call); else composite modules or several layers (see the class doc)
        self.plain = len(self.sites) == 1 and self.sites[0].module is None
        self.T: int | None = None          # tokens per site, known after the first pass (not plain)
        self._inner: Callable | None = None   # replaces the token lookups inside composites
        self.inputs = _Inputs(inputs, b)
        self.B = self.inputs.batch
        self.targets = _Targets(target, self.B, b, what) if targets is None else targets
        layers: list[Any] = []
        for site in self.sites:
            if all(site.info.layer is not x for x in layers):
                layers.append(site.info.layer)
        self.cap = Capture(model, layers)
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
        b, n, sites = self.backend, int(ix.shape[0]), self.sites
        L = len(sites)
        sub = self.inputs.take(ix)
        state: dict[str, Any] = {"call": None, "watch": None, "count": {}, "ids": [None] * L,
                                 "outs": [None] * L, "X": None, "x": None}

        def check(si: int, output: Any) -> tuple[int, ...]:
            shape = b.ops.shape(output)
            if not shape or shape[0] != n:
                raise EmbgradError(
                    f"layer {sites[si].name!r} returned shape {shape} for a chunk of {n} examples: its lookup "
                    "does not follow the batch (e.g. position embeddings looked up once per batch: pass "
                    "position_ids of shape (B, T) in the inputs). Attribute the token embedding layer instead.")
            return shape

        def take(si: int, output: Any, call: Any) -> Any:
            """Site l's output seen in the forward: the replacement (or None to keep it)."""
            shape = check(si, output)
            if self.plain:
                x = point(ix, sl, call) if point is not None else None
                if x is not None and b.ops.shape(x) != shape:
                    raise EmbgradError(f"layer {sites[si].name!r}: the replacement of shape {b.ops.shape(x)} does "
                                       f"not match its output of shape {shape}.")
                if state["watch"] is not None:
                    x = state["watch"](output if x is None else x)
                state["x"] = output if x is None else x
                return x
            if state["outs"][si] is not None:
                raise EmbgradError(f"module {sites[si].name!r} ran more than once in one forward pass; "
                                   "attribution replaces its output once per forward.")
            state["outs"][si] = output
            X = state["X"]
            if X is None:
                return None
            T = self.T
            assert T is not None                 # set by the first pass (observe)
            x = X[:, si * T:(si + 1) * T]
            if b.ops.shape(x) != shape:
                raise EmbgradError(
                    f"layer {sites[si].name!r} returned {shape} in this pass and {tuple(b.ops.shape(x))} in the first: "
                    "attribution to several layers needs every output to keep its (B, T, D) shape.")
            return x

        def replace(call):
            name = call.info.name
            k = state["count"].get(name, 0)
            state["count"][name] = k + 1
            if self.call_index is None and k == 1:
                raise EmbgradError(
                    f"layer {name!r} was called more than once in one forward pass (e.g. a table "
                    "shared by an encoder and a decoder); attribution replaces one lookup per forward: "
                    "pass call=0 for the first lookup (call=1 for the second, ...), or forward= that "
                    "calls the layer once.")
            if k != (self.call_index or 0):
                return None
            out = None
            for si, site in enumerate(sites):
                if site.info.layer is not call.info.layer:
                    continue
                state["ids"][si] = call.ids
                if state["call"] is None:
                    state["call"] = call
                if site.module is None:
                    out = take(si, call.output, call)
                elif self._inner is not None:
                    out = self._inner(ix, sl, call)
            return out

        def fn(watch):
            state["watch"] = watch
            if not self.plain and point is not None:
                X = point(ix, sl, None)                      # (n, L·T, D): every site's point
                state["X"] = X if watch is None else watch(X)
            with contextlib.ExitStack() as stack:
                stack.enter_context(self.cap.replacing(replace))
                stack.enter_context(self.cap)
                for si, site in enumerate(sites):
                    if site.module is not None:
                        stack.enter_context(self._output_tap(site.module, functools.partial(take, si, call=None)))
                out = self.inputs.call(self.forward, self.model, sub)
            for si, site in enumerate(sites):
                if state["ids"][si] is None:
                    name = site.info.name
                    raise EmbgradError(
                        f"the forward pass called layer {name!r} {state['count'].get(name, 0)} times, so lookup "
                        f"call={self.call_index or 0} never happened: check that the inputs reach it, or "
                        "name the embedding layer the model uses with layer=.")
                if site.module is not None and state["outs"][si] is None:
                    raise EmbgradError(f"module {site.name!r} did not run in the forward pass, though its "
                                       f"embedding layer {site.info.name!r} did; attribute to a module the "
                                       "forward calls.")
            if not self.plain:
                ids = state["ids"]
                for si in range(L):
                    if tuple(b.ops.shape(ids[si])) != tuple(b.ops.shape(state["outs"][si]))[:-1]:
                        raise EmbgradError(
                            f"layer {sites[si].name!r} maps ids of shape {tuple(b.ops.shape(ids[si]))} to "
                            f"{tuple(b.ops.shape(state['outs'][si]))}, not one vector per id.")
                shapes = {tuple(b.ops.shape(o))[1:] for o in state["outs"]}
                if len(shapes) != 1:
                    raise EmbgradError(
                        f"layers {[s.name for s in sites]} return outputs of shapes "
                        f"{[tuple(b.ops.shape(o)) for o in state['outs']]}: attribution to several layers in one "
                        "call needs outputs of one shape (B, T, D).")
                self.T = int(b.ops.shape(state["outs"][0])[1])
                state["ids_all"] = ids[0] if L == 1 else b.ops.concat(list(ids), axis=1)
                state["x"] = state["X"] if state["X"] is not None else (
                    state["outs"][0] if L == 1 else b.ops.concat(list(state["outs"]), axis=1))
            else:
                state["ids_all"] = state["call"].ids
            return self.targets(out, ix, state["call"].ids)

        if grad:
            values, grads = b.value_and_grads_batched(fn) if self.batched_vjp else b.value_and_grads(fn)
        else:
            with b.ops.no_grad():
                values, grads = fn(None), None
        self.evaluations += n
        with b.ops.no_grad():
            consume(sl, ix, state, values, grads)

    @contextlib.contextmanager
    def _output_tap(self, module: Any, on_output: Callable[[Any], Any]) -> Iterator[None]:
        """A composite module's output seen (and replaced) by ``on_output`` while the block runs,
        in this engine's context only (a forward of the model in another thread is untouched)."""
        token = _RUNNING.set(self)
        tap = None
        try:
            tap = self.backend.install_output_tap(module, on_output, active=lambda: _RUNNING.get() is self)
            yield
        finally:
            if tap is not None:
                tap.remove()
            _RUNNING.reset(token)

    # -------------------------------------------------------------- common passes
    def observe(self, grad: bool) -> dict[str, Any]:
        """The inputs as they are: ids (B, T), e (B, T, D), values NumPy (B, K) and, with
        ``grad``, the K gradients (B, T, D) at the input (accumulation dtype)."""
        b = self.backend
        parts: dict[str, list] = {"ids": [], "e": [], "values": [], "grads": []}

        if grad and not self.plain:
            # several sites (or a composite): their outputs first, then the gradient at them as
            # one watched point (one more pass over the examples)
            first = self.observe(False)
            e = first["e"]
            obs = self.observe_at(e, grad=True)
            obs["ids"], obs["e"] = first["ids"], e
            return obs

        def consume(sl, ix, state, values, grads):
            parts["ids"].append(state["ids_all"])
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

    def observe_at(self, emb: Any, grad: bool) -> dict[str, Any]:
        """Values NumPy (B, K) and, with ``grad``, the K gradients (B, L·T, D) with the sites'
        outputs replaced by ``emb`` (B, L·T, D)."""
        b = self.backend
        values: list[np.ndarray] = []
        grads: list[list[Any]] = []

        def point(ix, sl, call):
            return b.ops.gather(emb, b.ops.from_numpy(ix, like=emb))

        def consume(sl, ix, state, v, g):
            values.append(_values_np(b, v))
            if g is not None:
                grads.append([_acc(b, x) for x in g])

        self.run(np.arange(self.B, dtype=np.int64), point, grad, consume, "gradient")
        obs: dict[str, Any] = {"values": np.concatenate(values)}
        if grad:
            cat = (lambda xs: xs[0]) if len(grads) == 1 else (lambda xs: b.ops.concat(xs, axis=0))
            obs["grads"] = [cat([g[k] for g in grads]) for k in range(len(grads[0]))]
        return obs

    def composite_output(self, si: int, ids: Any) -> Any:
        """Site l's (a composite module's) output (B, T, D) with the lookup of its token
        embedding replaced by that of ``ids`` (B, T), every other input unchanged: the module's
        output at baseline ids (what Captum's ``LayerIntegratedGradients`` runs the model on
        the baselines for)."""
        b, info, out = self.backend, self.sites[si].info, []
        emb = b.embed(info, ids)

        def inner(ix, sl, call):
            x = b.ops.gather(emb, b.ops.from_numpy(ix, like=emb))
            return b.ops.cast(x, b.ops.dtype_name(call.output))

        self._inner = inner
        try:
            self.run(np.arange(self.B, dtype=np.int64), None, False,
                     lambda sl, ix, st, v, g: out.append(st["outs"][si]), "baseline")
        finally:
            self._inner = None
        return out[0] if len(out) == 1 else b.ops.concat(out, axis=0)

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


#: the engine running a forward in this thread / context (its composite taps act only there)
_RUNNING: contextvars.ContextVar[Any] = contextvars.ContextVar("embgrad_attribution_engine", default=None)


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
