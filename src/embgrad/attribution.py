"""Attribution over embeddings: which input tokens drove an output.

Every method runs through the gradient of a target output with respect to the *output* of an
embedding layer (the looked-up vectors e, shape (B, T, D)):

* ``saliency``: ‖∂f/∂e_t‖₂ per token;
* ``grad_x_input``: ∂f/∂e_t · e_t per token (sign kept);
* ``integrated_gradients``: (e − e₀) · ∫₀¹ ∂f/∂e(e₀ + α(e − e₀)) dα, by a quadrature ``rule``
  whose weights sum to 1; ``delta`` is the completeness gap Σ_t score_t − (f(e) − f(e₀));
  ``steps="auto"`` refines a nested rule (every evaluation reused) only for the examples whose
  gap is still above ``tolerance``;
* ``smoothgrad``: the gradient averaged over ``steps`` noisy copies e + ε (ε scaled to the
  table's typical row norm), reported as gradient × input (Smilkov et al. 2017, "SmoothGrad");
* ``smoothgrad_sq`` and ``vargrad``: the mean of the squares, and the variance, of the
  per-sample gradient × (noisy) input a_s = ∂f/∂e(e + ε_s) ⊙ (e + ε_s) over the ``steps`` samples —
  Captum's ``NoiseTunnel(InputXGradient)`` with ``nt_type="smoothgrad_sq"`` / ``"vargrad"``
  (Adebayo et al. 2018, "Local explanation methods for deep neural networks lack sensitivity
  to parameter values");
* ``gradient_shap``: E[∂f/∂e(e₀ + α(e + ε − e₀)) ⊙ (e + ε − e₀)] over α ~ U(0, 1) and input
  noise ε (``noise``, default 0 as Captum's ``stdevs``), ``steps`` samples per example —
  Captum's ``LayerGradientShap`` with one baseline (Lundberg & Lee 2017, "A unified approach to
  interpreting model predictions"); it converges to integrated gradients as ``steps`` grows.

``multiply_by_inputs=False`` (integrated gradients, gradient SHAP) leaves out the final
multiplication by (e − e₀): Captum's "global" attribution, the path-averaged gradient itself.

How: the layer's output is replaced per forward call (``Capture._replace``, as Captum's
``LayerIntegratedGradients`` does with a forward hook), and all (example, step) points go
through the model in chunks of ``batch_size`` rows; the gradients are summed per example with a
segment sum. No Python loop runs over examples, steps inside a chunk, or vocabulary rows.
Framework-neutral: everything framework-specific is a primitive of the backend.

Also here: :func:`hotflip` (first-order token swaps from one gradient) and :func:`jacobian`
(gradients of several outputs, (K, B, T, D)).
"""
from __future__ import annotations

import inspect
import math
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, TypeGuard

import numpy as np

from .backends import Backend, EmbeddingInfo, get_backend
from .candidates import top_candidates, whole_word_ids
from .capture import Capture, input_embedding, select_layers
from .errors import EmbgradError, closest_names

__all__ = ["attribute", "Attribution", "hotflip", "HotFlip", "jacobian", "quadrature",
           "METHODS", "RULES"]

METHODS = ("saliency", "grad_x_input", "integrated_gradients", "smoothgrad", "smoothgrad_sq", "vargrad",
           "gradient_shap")
#: the methods that sample noise (``steps`` = samples, ``noise``, ``seed``)
_NOISY = ("smoothgrad", "smoothgrad_sq", "vargrad", "gradient_shap")
RULES = ("gauss_legendre", "trapezoid", "left", "right", "middle")
# steps="auto": the nested rule used for each rule, and its first number of points
_NESTED = {"gauss_legendre": "trapezoid", "trapezoid": "trapezoid", "left": "left", "right": "right",
           "middle": "middle"}
_AUTO_START = {"trapezoid": 9, "left": 8, "right": 8, "middle": 9}


# ----------------------------------------------------------------------------- quadrature
def quadrature(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes α (n,) in [0, 1] and weights (n,) summing to 1 of an n-point rule on [0, 1].

    ``gauss_legendre``: exact for polynomials of degree ≤ 2n − 1 (Captum's "gausslegendre");
    ``trapezoid``: α = 0, 1/(n−1), ..., 1 with halved end weights (n ≥ 2; Captum's
    "riemann_trapezoid" weights sum to (n−1)/n instead of 1); ``left``/``right``/``middle``:
    Riemann sums with n equal steps (as Captum's riemann_left/right/middle).
    """
    if rule not in RULES:
        raise EmbgradError(f"unknown quadrature rule {rule!r}; choose one of {', '.join(RULES)} "
                           f"(closest: {closest_names(str(rule), RULES)}).")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < (2 if rule == "trapezoid" else 1):
        need = 2 if rule == "trapezoid" else 1
        raise EmbgradError(f"rule {rule!r} needs an integer number of steps ≥ {need}, got {n!r}.")
    n = int(n)
    if rule == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1.0 + x), 0.5 * w
    w = np.full(n, 1.0 / n)
    if rule == "trapezoid":
        w = np.full(n, 1.0 / (n - 1))
        w[[0, -1]] *= 0.5
        return np.linspace(0.0, 1.0, n), w
    offset = {"left": 0.0, "middle": 0.5, "right": 1.0}[rule]
    return (np.arange(n) + offset) / n, w


def refine(rule: str, n: int) -> tuple[int, np.ndarray, float, float]:
    """One nested refinement of the n-point ``rule`` (trapezoid, left, right, middle):
    ``(n_next, new_nodes, new_weight, old_scale)`` such that the n_next-point rule is
    ``old_scale`` × (the n-point rule) + ``new_weight`` × Σ over ``new_nodes`` — so a running
    weighted sum of gradients is refined by evaluating only the new nodes. Trapezoid and
    left/right halve the step; middle divides it by three (the old midpoints stay midpoints).
    """
    if rule == "trapezoid":
        m = n - 1
        return 2 * m + 1, (2 * np.arange(m) + 1) / (2 * m), 1.0 / (2 * m), 0.5
    if rule in ("left", "right"):
        return 2 * n, (2 * np.arange(n) + 1) / (2 * n), 1.0 / (2 * n), 0.5
    if rule == "middle":
        i = np.arange(3 * n)
        i = i[i % 3 != 1]
        return 3 * n, (2 * i + 1) / (6 * n), 1.0 / (3 * n), 1.0 / 3.0
    raise EmbgradError(f"rule {rule!r} has no nested refinement; use trapezoid, left, right or middle.")


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False, repr=False)
class Attribution:
    """The result of :func:`attribute`.

    ``scores``: NumPy (B, T), one number per token (sign kept; padding positions are 0), or
    (K, B, T) for K targets. ``attributions``: framework tensor (B, T, D) (or (K, B, T, D)),
    float32 or wider: the per-coordinate attributions (the gradient itself for saliency).
    ``delta``: NumPy (B,) (or (K, B)) completeness gap Σ_t scores − (f(input) − f(baseline))
    for integrated gradients, else None. ``tokens``: list of token lists, or None. ``ids``:
    NumPy (B, T) looked-up ids. ``mask``: NumPy bool (B, T), False at padding.
    ``outputs`` / ``baseline_outputs``: f at the input / baseline, NumPy (B,) (or (K, B)).
    ``steps``: NumPy int (B,) steps (noise samples for SmoothGrad) behind each example's
    result; ``evaluations``: example rows that went through the model (forward, or forward and
    backward), all passes included; ``converged``: NumPy bool (B,) for ``steps="auto"``. ``target``: what
    was attributed for a single target ("class 2", "per-example", a callable's name); None for
    several (see ``targets``).
    """

    method: str
    scores: np.ndarray
    attributions: Any
    delta: np.ndarray | None
    tokens: list[list[str]] | None
    ids: np.ndarray
    mask: np.ndarray
    layer: str
    targets: tuple[str, ...] | None
    baseline: str | None
    rule: str | None
    steps: np.ndarray | None
    evaluations: int
    outputs: np.ndarray
    baseline_outputs: np.ndarray | None = None
    converged: np.ndarray | None = None
    target: str | None = None

    def _rows(self) -> tuple[list[list[str]], np.ndarray, np.ndarray, list[str]]:
        toks = self.tokens or [[f"[{i}]" for i in row] for row in self.ids.tolist()]
        scores = self.scores if self.targets is None else self.scores.reshape(-1, self.scores.shape[-1])
        K = 1 if self.targets is None else len(self.targets)
        B = self.ids.shape[0]
        labels = []
        delta = None if self.delta is None else self.delta.reshape(K, B)
        outputs = np.asarray(self.outputs, dtype=np.float64).reshape(K, B)
        for k in range(K):
            for b in range(B):
                lab = f"#{b}" + ("" if self.targets is None else f" · {self.targets[k]}")
                lab += f" · f={outputs[k, b]:.3g}"
                if delta is not None:
                    lab += f" · Δ={delta[k, b]:.1e}"
                labels.append(lab)
        return toks * K, scores, np.tile(self.mask, (K, 1)), labels

    def to_html(self, title: str | None = None, scale: str = "row") -> str:
        """A self-contained HTML fragment: a colour legend, then the token heatmap, one row per
        example (and target) labelled with the example, the target (for several targets), the
        explained output ``f`` and the completeness gap ``Δ`` (integrated gradients); every token
        escaped, hovering a token shows its position and score."""
        from ._html import color_legend, token_heatmap
        toks, scores, mask, labels = self._rows()
        if title is None:
            title = f"{self.method} on {self.layer}" + (f" ({self.rule}, {self._steps_text()} steps)"
                                                         if self.method == "integrated_gradients" else "")
            if self.target is not None:
                title += f" · target: {self.target}"
        legend = color_legend(None if scale == "row" else float(np.abs(scores).max(initial=0.0)),
                              positive="raises the target output f", negative="lowers it")
        return token_heatmap(toks, scores, mask=mask, labels=labels, title=title, scale=scale, legend=legend)

    def _repr_html_(self) -> str:
        return self.to_html()

    def _steps_text(self) -> str:
        if self.steps is None:
            return "-"
        lo, hi = int(self.steps.min()), int(self.steps.max())
        return str(lo) if lo == hi else f"{lo}-{hi}"

    def __repr__(self) -> str:
        parts = [self.method, f"layer={self.layer!r}", f"scores={tuple(self.scores.shape)}"]
        if self.targets is not None:
            parts.append(f"targets={list(self.targets)}")
        if self.rule is not None:
            parts.append(f"rule={self.rule}")
        if self.steps is not None:
            parts.append(f"steps={self._steps_text()}")
        parts.append(f"evaluations={self.evaluations}")
        if self.delta is not None:
            parts.append(f"max|delta|={float(np.abs(self.delta).max()):.2e}")
        return f"Attribution({', '.join(parts)})"


@dataclass(frozen=True, eq=False, repr=False)
class HotFlip:
    """The result of :func:`hotflip`: for each example its k best single-token swaps.

    NumPy arrays (B, k): ``positions``, ``old_ids``, ``new_ids``, ``predicted`` (first-order
    change of the target, (e_new − e_old) · g), ``actual`` (the change measured by a real
    forward pass, with ``verify=True``; else None). ``output``: NumPy (B,) target at the input.
    Slots past the number of admissible swaps hold position −1 and a NaN prediction.
    ``old_tokens`` / ``new_tokens``: strings when a tokenizer or vocabulary was given.
    """

    positions: np.ndarray
    old_ids: np.ndarray
    new_ids: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray | None
    output: np.ndarray
    direction: str
    layer: str
    old_tokens: list[list[str]] | None = None
    new_tokens: list[list[str]] | None = None

    def swaps(self, b: int) -> list[tuple[int, int, int, float, float | None]]:
        """Example b's swaps as ``(position, old_id, new_id, predicted, actual)`` tuples."""
        out = []
        for j in range(self.positions.shape[1]):
            if self.positions[b, j] < 0:
                continue
            act = None if self.actual is None else float(self.actual[b, j])
            out.append((int(self.positions[b, j]), int(self.old_ids[b, j]), int(self.new_ids[b, j]),
                        float(self.predicted[b, j]), act))
        return out

    def __repr__(self) -> str:
        B, k = self.positions.shape
        best = ""
        if B and k and self.positions[0, 0] >= 0:
            p, o, n = int(self.positions[0, 0]), int(self.old_ids[0, 0]), int(self.new_ids[0, 0])
            if self.old_tokens is not None and self.new_tokens is not None:
                best = f", best #0: {self.old_tokens[0][0]!r}->{self.new_tokens[0][0]!r} at {p}"
            else:
                best = f", best #0: {o}->{n} at {p}"
            best += f" ({self.predicted[0, 0]:+.3g} predicted" + (
                "" if self.actual is None else f", {self.actual[0, 0]:+.3g} actual") + ")"
        return f"HotFlip({self.direction}, layer={self.layer!r}, examples={B}, k={k}{best})"


# ----------------------------------------------------------------------------- inputs
class _Inputs:
    """The model's inputs (tensor, tuple or dict); rows of the batched entries can be taken."""

    def __init__(self, inputs: Any, backend: Backend):
        self.backend = backend
        if isinstance(inputs, Mapping):
            self.kind, items = "dict", list(dict(inputs).items())
        elif isinstance(inputs, (tuple, list)):
            self.kind, items = "tuple", list(enumerate(inputs))
        else:
            self.kind, items = "tensor", [(0, inputs)]
        self.items = items
        sizes = [s for s in (self._rows(v) for _, v in items) if s is not None]
        if not sizes:
            raise EmbgradError(
                f"inputs must hold the model's input tensors (ids, attention mask, ...) with a batch "
                f"dimension, got {type(inputs).__name__} with no array entry.")
        self.batch = max(sizes)
        if self.batch < 1:
            raise EmbgradError("inputs hold an empty batch (0 examples); pass at least one example.")
        self.batched = [self._rows(v) == self.batch for _, v in items]
        seq = [tuple(v.shape) for (_, v), bt in zip(items, self.batched, strict=True) if bt and len(v.shape) >= 2]
        self.seq_len = int(seq[0][1]) if seq else 1

    @staticmethod
    def _rows(v: Any) -> int | None:
        shape = getattr(v, "shape", None)
        if shape is None or callable(v) or len(shape) == 0:
            return None
        try:
            return int(shape[0])
        except (TypeError, ValueError):
            return None

    def get(self, key: str) -> Any:
        return dict(self.items).get(key) if self.kind == "dict" else None

    def take(self, idx: np.ndarray) -> Any:
        """The inputs of examples ``idx`` (NumPy int64 (n,)), broadcast entries unchanged."""
        b = self.backend
        out = []
        for (k, v), batched in zip(self.items, self.batched, strict=True):
            if batched:
                v = v[idx] if isinstance(v, np.ndarray) else b.gather(v, b.from_numpy(idx, like=v))
            out.append((k, v))
        if self.kind == "dict":
            return dict(out)
        if self.kind == "tuple":
            return tuple(v for _, v in out)
        return out[0][1]

    def call(self, forward: Callable | None, model: Any, inputs: Any) -> Any:
        """Run ``model`` (or ``forward(model, ...)``) on ``inputs`` by the framework's calling
        convention: Keras takes a list, tuple or dict as ONE structured input (``model(inputs)``);
        elsewhere a tuple is positional arguments and a dict keyword arguments."""
        if self.kind == "tensor" or self.backend.structured_inputs:
            return model(inputs) if forward is None else forward(model, inputs)
        if forward is None:
            return model(**inputs) if self.kind == "dict" else model(*inputs)
        return forward(model, **inputs) if self.kind == "dict" else forward(model, *inputs)


# ----------------------------------------------------------------------------- targets
def _logits(outputs: Any) -> Any:
    """The tensor a class index refers to: ``.logits`` of a Hugging Face output, ``["logits"]``
    of a mapping, the first element of a tuple, or the outputs themselves."""
    lg = getattr(outputs, "logits", None)
    if lg is not None:
        return lg
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    return outputs


def _short_repr(x: Any, n: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 4] + " ...]"


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _nargs(fn: Callable) -> int:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return 1
    return 2 if len(params) >= 2 and params[1].default is inspect.Parameter.empty else 1


class _Targets:
    """What to differentiate: K scalars per example, evaluated on a chunk's outputs."""

    def __init__(self, spec: Any, batch: int, backend: Backend, what: str = "target"):
        self.backend, self.batch, self.what = backend, batch, what
        self.all_columns = False
        per_example_lists = what == "target"     # jacobian's outputs=[...] lists several outputs
        if isinstance(spec, str) and spec == "all":
            self.items, self.multi, self.all_columns = [], True, True
            self.labels: tuple[str, ...] = ("all",)
            return
        if isinstance(spec, Mapping):
            # {label: target}: several targets, unambiguous whatever their number
            if not spec:
                raise EmbgradError(f"{what}={{}} asks for no output; pass at least one label: target.")
            self.items, self.multi = [self._one(t) for t in spec.values()], True
            self.labels = tuple(str(k) for k in spec)
            return
        if isinstance(spec, (list, tuple)) and per_example_lists:
            # a list is one class per example, whatever its length (its meaning must not change
            # with the batch size); several targets are asked for by a dict
            if not spec or not all(_is_int(t) for t in spec) or len(spec) != batch:
                raise EmbgradError(
                    f"{what}={_short_repr(spec)} is a list of {len(spec)} item(s) for a batch of {batch} "
                    f"examples: a list (or (B,) tensor) gives one class index per example, so it needs "
                    f"{batch} ints. For several targets at once pass a dict {{label: target}}, e.g. "
                    f"{what}={{'negative': 0, 'positive': 1}}.")
            self.items, self.multi = [self._one(np.asarray(spec))], False
        elif isinstance(spec, (list, tuple)):
            if not spec:
                raise EmbgradError(f"{what}=[] asks for no output; pass a class index, a (B,) list of "
                                   "indices, a callable, or a non-empty list of targets.")
            self.items, self.multi = [self._one(t) for t in spec], True
        else:
            self.items, self.multi = [self._one(spec)], False
        self.labels = tuple(lab for _, _, lab in self.items)

    def _one(self, t: Any) -> tuple[str, Any, str]:
        if t is None:
            return ("output", None, "output")
        if callable(t) and not hasattr(t, "shape"):
            return ("callable", (t, _nargs(t)), getattr(t, "__name__", "callable"))
        if _is_int(t):
            return ("index", int(t), f"class {int(t)}")
        if isinstance(t, (bool, np.bool_)) or isinstance(t, (float, str)):
            raise EmbgradError(f"{self.what}={t!r} is not a class index; pass an int, a (B,) list of "
                               "ints, or a callable outputs -> (B,) scalars.")
        a = t if isinstance(t, np.ndarray) else (np.asarray(t) if isinstance(t, (list, tuple))
                                                 else self.backend.to_numpy(t))
        if a.ndim == 0 and np.issubdtype(a.dtype, np.integer):
            return ("index", int(a), f"class {int(a)}")
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or a.shape[0] != self.batch:
            raise EmbgradError(
                f"{self.what} of shape {a.shape} and dtype {a.dtype} does not fit a batch of "
                f"{self.batch} examples: pass one class index, {self.batch} integer indices (one per "
                "example), or a callable outputs -> (B,) scalars.")
        return ("per_example", a.astype(np.int64), "per-example")

    def __call__(self, outputs: Any, idx: np.ndarray, like: Any) -> Any:
        """(n, K) target values of a chunk whose rows are examples ``idx``."""
        b, n = self.backend, int(idx.shape[0])
        if self.all_columns:
            lg = self._logit_matrix(outputs, n, None)
            return b.reshape(lg, (n, -1))
        cols = []
        for kind, val, lab in self.items:
            if kind == "callable":
                fn, nargs = val
                v = fn(outputs, b.from_numpy(idx, like=like)) if nargs == 2 else fn(outputs)
                shape = b.shape(v) if hasattr(v, "shape") else None
                if shape not in ((n,), (n, 1)):
                    raise EmbgradError(
                        f"the {self.what} callable {lab!r} returned {shape if shape is not None else type(v).__name__} "
                        f"for a chunk of {n} examples; it must return one scalar per example, shape ({n},).")
            elif kind == "output":
                lg = self._logit_matrix(outputs, n, None)
                if b.shape(lg)[1] != 1:
                    raise EmbgradError(
                        f"the model returns {b.shape(lg)[1]} outputs per example, so {self.what}=None is "
                        "ambiguous: pass a class index, (B,) indices, or a callable outputs -> (B,).")
                v = lg[:, 0]
            else:
                lg = self._logit_matrix(outputs, n, val)
                col = np.full(n, val, np.int64) if kind == "index" else val[idx]
                v = b.pick(lg, b.from_numpy(col, like=lg))
            cols.append(b.reshape(v, (n, 1)))
        return cols[0] if len(cols) == 1 else b.concat(cols, axis=1)

    def _logit_matrix(self, outputs: Any, n: int, index: Any) -> Any:
        b = self.backend
        lg = _logits(outputs)
        shape = b.shape(lg) if hasattr(lg, "shape") else None
        if shape is None or not shape or shape[0] != n or len(shape) > 2:
            raise EmbgradError(
                f"the model's output {type(outputs).__name__} of shape {shape} is not (batch, classes) "
                f"for a chunk of {n} examples; pass {self.what} as a callable outputs -> (B,) scalars "
                "(e.g. lambda out: out[:, 0, 3]), or forward= returning the logits.")
        if len(shape) == 1:
            lg = b.reshape(lg, (n, 1))
        C = b.shape(lg)[1]
        if index is not None:
            lo, hi = (index, index) if np.ndim(index) == 0 else (int(index.min()), int(index.max()))
            if lo < 0 or hi >= C:
                raise EmbgradError(f"{self.what} class index {hi if hi >= C else lo} is out of range: "
                                   f"the model returns {C} outputs per example (valid 0..{C - 1}).")
        return lg


# ----------------------------------------------------------------------------- engine
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


class _Engine:
    """Runs chunks of (example, point) rows through the model with the layer's output replaced.

    One :class:`Capture` is entered per chunk (its hooks removed after each forward, also on
    error), so nothing outlives a chunk but its results: memory is bounded by ``batch_size``.
    """

    def __init__(self, model: Any, inputs: Any, layer: Any, forward: Callable | None,
                 target: Any, batch_size: int | None, progress: bool | None, what: str = "target",
                 call: int | None = None):
        self.backend = b = get_backend(model)
        b.eager_only("embgrad.attribute, hotflip and jacobian",
                     "Call them eagerly, outside the tf.function (they return NumPy scores).")
        self.model, self.forward, self.progress = model, forward, progress
        if call is not None and (not _is_int(call) or call < 0):
            raise EmbgradError(f"call must be None or the index (≥ 0) of the layer's lookup within one "
                               f"forward pass, got {call!r}.")
        self.call_index = None if call is None else int(call)
        self.info = _pick_layer(b, model, layer)
        self.inputs = _Inputs(inputs, b)
        self.B = self.inputs.batch
        self.targets = _Targets(target, self.B, b, what)
        self.cap = Capture(model, [self.info.layer])
        if batch_size is None:
            batch_size = int(min(512, max(1, 2 ** 20 // max(1, self.inputs.seq_len * self.info.dim))))
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise EmbgradError(f"batch_size must be a positive int (rows per forward pass), got {batch_size!r}.")
        self.batch_size = int(batch_size)
        self.evaluations = 0
        self.batched_vjp = False         # the K gradients as one batched backward (vmap), see backends
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
            shape = b.shape(call.output)
            if not shape or shape[0] != n:
                raise EmbgradError(
                    f"layer {info.name!r} returned shape {shape} for a chunk of {n} examples: its lookup "
                    "does not follow the batch (e.g. position embeddings looked up once per batch). "
                    "Attribute the token embedding layer instead.")
            x = point(ix, sl, call) if point is not None else None
            if x is not None and b.shape(x) != shape:
                raise EmbgradError(f"layer {info.name!r}: the replacement of shape {b.shape(x)} does not "
                                   f"match its output of shape {shape}.")
            if state["watch"] is not None:
                x = state["watch"](call.output if x is None else x)
            state["x"] = call.output if x is None else x
            return x

        def fn(watch):
            state["watch"] = watch
            self.cap._replace = replace
            with self.cap:
                out = self.inputs.call(self.forward, self.model, sub)
            self.cap.calls = []
            if state["call"] is None:
                raise EmbgradError(
                    f"the forward pass called layer {info.name!r} {state['count']} times, so lookup "
                    f"call={self.call_index or 0} never happened: check that the inputs reach it, or "
                    "name the embedding layer the model uses with layer=.")
            return self.targets(out, ix, state["call"].ids)

        if grad:
            values, grads = b.value_and_grads_batched(fn) if self.batched_vjp else b.value_and_grads(fn)
        else:
            with b.no_grad():
                values, grads = fn(None), None
        self.evaluations += n
        with b.no_grad():
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
        cat = (lambda xs: xs[0]) if len(parts["ids"]) == 1 else (lambda xs: b.concat(xs, axis=0))
        obs = {"ids": cat(parts["ids"]), "e": cat(parts["e"]), "values": np.concatenate(parts["values"])}
        if grad:
            K = len(parts["grads"][0])
            obs["grads"] = [cat([g[k] for g in parts["grads"]]) for k in range(K)]
        ids_shape = b.shape(obs["ids"])
        if b.shape(obs["e"])[:-1] != ids_shape:
            raise EmbgradError(
                f"layer {self.info.name!r} maps ids of shape {ids_shape} to {b.shape(obs['e'])}, not one "
                "vector per id; attribution needs a plain token embedding (not a bag / pooled lookup).")
        return obs

    def values_at(self, emb: Any) -> np.ndarray:
        """NumPy (B, K): target values with the layer output replaced by ``emb`` (B, T, D)."""
        b, out = self.backend, []

        def point(ix, sl, call):
            return b.gather(emb, b.from_numpy(ix, like=emb))

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
            it = b.from_numpy(ix, like=like)
            w = _per_row(b, weights[sl], like, dt)
            for k, g in enumerate(grads):
                s = b.segment_sum(b.cast(g, dt) * w, it, self.B)
                if k < len(acc):
                    acc[k] = acc[k] + s
                else:
                    acc.append(s)

        self.run(idx, point, True, consume, what)
        return acc


def _per_row(b: Backend, v: np.ndarray, like: Any, dtype: str) -> Any:
    """NumPy (n,) as a framework tensor (n, 1, ..., 1) of ``dtype`` that scales the rows of
    tensors shaped like ``like``."""
    t = b.cast(b.from_numpy(np.asarray(v, dtype=np.float64), like=like), dtype)
    return b.reshape(t, (-1,) + (1,) * (len(b.shape(like)) - 1))


def _values_np(b: Backend, v: Any) -> np.ndarray:
    return np.asarray(b.to_numpy(v), dtype=np.float64)


def _acc_dtype(b: Backend, x: Any) -> str:
    return "float64" if b.dtype_name(x) == "float64" else "float32"


def _acc(b: Backend, g: Any) -> Any:
    return g if b.dtype_name(g) in ("float32", "float64") else b.cast(g, "float32")


def _detached(b: Backend, x: Any) -> Any:
    """A copy of ``x`` that records no gradient history (x may be a watched leaf)."""
    with b.no_grad():
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


def _mask(eng: _Engine, ids: np.ndarray, mask: Any) -> np.ndarray:
    """NumPy bool (B, T): False at padding (attention mask 0, or Keras mask_zero ids 0)."""
    if mask is None:
        mask = eng.inputs.get("attention_mask")
    if mask is None and eng.info.options.get("mask_zero"):
        return ids != 0
    if mask is None:
        return np.ones(ids.shape, dtype=bool)
    m = mask if isinstance(mask, np.ndarray) else eng.backend.to_numpy(mask)
    if m.shape != ids.shape:
        raise EmbgradError(f"layer {eng.info.name!r}: the mask has shape {m.shape} but the looked-up ids "
                           f"have shape {ids.shape}; pass a (B, T) attention mask (1 = token, 0 = padding).")
    return m.astype(bool)


def _tokens(tokens: Any, ids: np.ndarray, what: str = "tokens") -> list[list[str]] | None:
    """Token strings per example from a tokenizer, a vocabulary (id -> str), a callable
    (list of ids -> list of str) or given lists."""
    if tokens is None:
        return None
    rows = ids.tolist()
    if hasattr(tokens, "convert_ids_to_tokens"):
        return [list(map(str, tokens.convert_ids_to_tokens(r))) for r in rows]
    if callable(tokens):
        return [list(map(str, tokens(r))) for r in rows]
    if hasattr(tokens, "tokens") and not isinstance(tokens, (list, tuple)):   # embgrad.demo Vocab
        tokens = tokens.tokens
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], (list, tuple)):
        if len(tokens) != len(rows) or any(len(t) != len(r) for t, r in zip(tokens, rows, strict=True)):
            raise EmbgradError(f"{what}: got {len(tokens)} token lists of lengths "
                               f"{[len(t) for t in tokens][:5]}, but the ids are {ids.shape}; pass one "
                               "string per id (padding included), or a tokenizer.")
        return [list(map(str, t)) for t in tokens]
    try:
        return [[str(tokens[i]) for i in r] for r in rows]
    except (IndexError, KeyError, TypeError) as e:
        raise EmbgradError(f"{what}: could not map the ids through {type(tokens).__name__} ({e}); pass "
                           "a tokenizer, a vocabulary (id -> token), or lists of token strings.") from None


def _known_pad_id(model: Any, info: EmbeddingInfo) -> int | None:
    """The pad id the model declares: Hugging Face ``config.pad_token_id``, the layer's padding
    index, or 0 for a Keras ``mask_zero`` layer; None if there is none."""
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad_id is None:
        pad_id = info.padding_idx
    if pad_id is None and info.options.get("mask_zero"):
        pad_id = 0
    return pad_id


def _pad_id(model: Any, info: EmbeddingInfo, pad_id: int | None) -> int:
    if pad_id is None:
        pad_id = _known_pad_id(model, info)
    if pad_id is None:
        raise EmbgradError(f"baseline='pad' needs the pad id: layer {info.name!r} has no padding index and "
                           "the model has no config.pad_token_id. Pass pad_id=ID, or baseline=ID.")
    return int(pad_id)


def _baseline(eng: _Engine, baseline: Any, obs: dict, pad_id: int | None) -> tuple[Any, str]:
    """The baseline's layer output e₀ (B, T, D) and a description."""
    b, info, e, ids = eng.backend, eng.info, obs["e"], obs["ids"]
    if baseline is None or (isinstance(baseline, str) and baseline == "zeros"):
        return b.zeros(b.shape(e), b.dtype_name(e), e), "zeros"
    if isinstance(baseline, (float, np.floating)) and not isinstance(baseline, bool):
        # a constant vector: every coordinate of every position equals ``baseline``
        if not np.isfinite(baseline):
            raise EmbgradError(f"baseline={baseline!r} must be finite (a constant vector).")
        return b.zeros(b.shape(e), b.dtype_name(e), e) + float(baseline), f"constant {float(baseline):g}"
    if isinstance(baseline, str):
        if baseline != "pad":
            raise EmbgradError(f"baseline={baseline!r} is not known; pass None/'zeros', 'pad', an int id, "
                               "or an id tensor shaped like the ids.")
        bid, desc = _pad_id(eng.model, info, pad_id), "pad"
        base_ids = np.full(b.shape(ids), bid, np.int64)
    elif _is_int(baseline):
        bid, desc = int(baseline), f"id {int(baseline)}"
        base_ids = np.full(b.shape(ids), bid, np.int64)
    else:
        if not (b.is_appropriate(baseline) or isinstance(baseline, np.ndarray)):
            raise EmbgradError(
                f"baseline of type {type(baseline).__name__} is not known; pass None/'zeros', 'pad', an int "
                "id, a float (a constant vector), or an id tensor shaped like the ids.")
        arr = baseline if isinstance(baseline, np.ndarray) else b.to_numpy(baseline)
        e_shape, ids_shape = tuple(b.shape(e)), tuple(b.shape(ids))
        B = e_shape[0]
        if np.issubdtype(arr.dtype, np.floating) and arr.shape in (e_shape, (1,) + e_shape[1:]):
            t = baseline if not isinstance(baseline, np.ndarray) else b.from_numpy(arr, like=e)
            if arr.shape[0] != B:          # one (1, T, D) baseline broadcast over the batch
                t = b.gather(t, b.from_numpy(np.zeros(B, np.int64), like=e))
            return b.cast(t, b.dtype_name(e)), "embedding"
        if not np.issubdtype(arr.dtype, np.integer) or arr.shape not in (ids_shape, (1,) + ids_shape[1:]):
            raise EmbgradError(
                f"layer {info.name!r}: baseline of shape {arr.shape} and dtype {arr.dtype} must be integer "
                f"ids shaped like the inputs' ids {ids_shape} or (1, {', '.join(map(str, ids_shape[1:]))}) "
                f"for all examples, or float vectors shaped like the embeddings {e_shape} or "
                f"(1, {', '.join(map(str, e_shape[1:]))}), or a float constant.")
        base_ids, desc = np.broadcast_to(arr.astype(np.int64), ids_shape).copy(), "ids"
    lo, hi = int(base_ids.min()), int(base_ids.max())
    if lo < 0 or hi >= info.num_rows:
        raise EmbgradError(f"layer {info.name!r}: baseline id {lo if lo < 0 else hi} is out of range for a "
                           f"table of {info.num_rows} rows (valid 0..{info.num_rows - 1}).")
    base = b.embed(info, b.cast(b.from_numpy(base_ids, like=ids), b.dtype_name(ids)))
    return b.cast(base, b.dtype_name(e)), desc


def _typical_row_norm(eng: _Engine, like: Any) -> float:
    """Median L2 norm of the layer's output over up to 4096 evenly spaced table rows."""
    b, V = eng.backend, eng.info.num_rows
    ids = np.unique(np.linspace(0, V - 1, min(V, 4096)).astype(np.int64))
    vec = b.to_numpy(b.embed(eng.info, b.cast(b.from_numpy(ids, like=like), b.dtype_name(like))))
    return float(np.median(np.linalg.norm(vec.astype(np.float64).reshape(len(ids), -1), axis=1)))


# ----------------------------------------------------------------------------- attribute
def attribute(model: Any, inputs: Any, target: Any, method: str = "integrated_gradients",
              layer: Any = None, baseline: Any = None, steps: int | str = 50,
              rule: str = "gauss_legendre", forward: Callable | None = None,
              batch_size: int | None = None, *, tolerance: float = 0.01, max_steps: int = 256,
              noise: float | None = None, seed: int = 0, mask: Any = None, pad_id: int | None = None,
              tokens: Any = None, progress: bool | None = None, call: int | None = None,
              multiply_by_inputs: bool = True) -> Attribution:
    """Attribute a target output of ``model`` to the tokens of ``inputs``.

    Args:
        inputs: the model's inputs: an ids tensor (B, T), a tuple, or a dict of keyword
            arguments (e.g. a Hugging Face ``input_ids``/``attention_mask`` encoding).
        target: a class index; a (B,) list/tensor of indices, one per example (a list always
            means this, so it must have B ints); a callable ``outputs -> (B,)`` (or
            ``(outputs, example_index) -> (B,)``); None for a model with one output; or several
            targets as a dict ``{label: target}`` (each value any of the above), which share
            every forward pass and give scores (K, B, T).
        method: one of :data:`METHODS`.
        layer: the token embedding (name or object); default ``get_input_embeddings()``, else
            the model's only embedding layer.
        baseline: None/"zeros" (zero vectors), "pad" (``pad_id``, else ``config.pad_token_id``,
            else the layer's padding index), an int id, ids shaped like the inputs (B, T) or one
            row (1, T) for every example, float vectors (B, T, D) or (1, T, D), or a float
            constant (every coordinate). Integrated gradients and gradient SHAP.
        steps: quadrature points (noise samples for SmoothGrad), or "auto": a nested rule is
            refined round by round (step halved; a third for "middle"), every evaluation
            reused, only for the examples whose |delta| > ``tolerance`` ·
            max(|f(input) − f(baseline)|, 1e-4), up to ``max_steps`` points. Gauss–Legendre
            nodes are not nested, so the default rule runs as the trapezoid rule (9, 17, 33, 65,
            ... points) under "auto"; ``.rule`` says which rule ran.
        rule: see :func:`quadrature`.
        forward: ``forward(model, **inputs) -> outputs``; default ``model(**inputs)``.
        batch_size: rows (example × step) per forward pass; default from T · D.
        noise, seed: the noise's norm per vector as a fraction of the table's median row norm
            (SmoothGrad family: default 0.1; gradient SHAP: default 0, Captum's ``stdevs=0``).
        multiply_by_inputs: integrated gradients and gradient SHAP only: False leaves out the
            multiplication by (e − e₀) (Captum's "global" attribution); ``delta`` is then still
            the completeness gap of the multiplied ("local") attributions, the quadrature's error.
        mask: (B, T), 1 = token, 0 = padding; default ``inputs["attention_mask"]`` (or ids ≠ 0
            for a Keras ``mask_zero`` layer). Padding scores are 0.
        tokens: a tokenizer, a vocabulary (id -> str) or token lists, for ``.tokens`` and HTML.
        progress: a rich progress bar on stderr (None: only when slow and on a terminal).
        call: which lookup of the layer to attribute when one forward calls it several times
            (e.g. a table shared by encoder and decoder); None requires a single lookup.

    Returns an :class:`Attribution`; ``EmbgradError`` on bad input, before the model runs
    where it can be checked.
    """
    if method not in METHODS:
        raise EmbgradError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} "
                           f"(closest: {closest_names(str(method), METHODS)}).")
    auto = isinstance(steps, str)
    if auto and steps != "auto":
        raise EmbgradError(f"steps={steps!r}: pass an int or 'auto'.")
    if auto and method != "integrated_gradients":
        raise EmbgradError(f"steps='auto' refines integrated gradients by their completeness gap; "
                           f"method={method!r} needs an int number of steps.")
    if method == "integrated_gradients":
        quadrature(rule, 2 if isinstance(steps, str) else steps)                     # validates rule and steps
        start = _AUTO_START[_NESTED[rule]]
        if auto and (not _is_int(max_steps) or max_steps < start or not tolerance > 0):
            raise EmbgradError(f"steps='auto' needs tolerance > 0 and max_steps ≥ {start}, got "
                               f"tolerance={tolerance!r}, max_steps={max_steps!r}.")
    if noise is None:
        noise = 0.0 if method == "gradient_shap" else 0.1
    if method in _NOISY and (not _is_int(steps) or steps < 1 or not noise >= 0):
        raise EmbgradError(f"{method} needs steps (noise samples) ≥ 1 and noise ≥ 0, got "
                           f"steps={steps!r}, noise={noise!r}.")
    if not multiply_by_inputs and method not in ("integrated_gradients", "gradient_shap"):
        raise EmbgradError(f"multiply_by_inputs=False applies to integrated_gradients and gradient_shap "
                           f"(Captum's global attribution); method={method!r} has no such choice.")
    eng = _Engine(model, inputs, layer, forward, target, batch_size, progress, call=call)
    b = eng.backend
    obs = eng.observe(grad=method in ("saliency", "grad_x_input"))
    ids_np = b.to_numpy(obs["ids"]).astype(np.int64)
    m = _mask(eng, ids_np, mask)
    e = obs["e"]
    nd = len(b.shape(e))
    with b.no_grad():
        mt = b.reshape(b.cast(b.from_numpy(m, like=e), _acc_dtype(b, e)), b.shape(e)[:-1] + (1,))
    fx = obs["values"]
    extra: dict[str, Any] = {"baseline_outputs": None, "converged": None}
    delta = base_desc = used_rule = steps_used = None
    K = fx.shape[1]
    B = eng.B

    if method in ("saliency", "grad_x_input"):
        with b.no_grad():
            if method == "saliency":
                attr = [g * mt for g in obs["grads"]]
                sc = [b.to_numpy(b.sqrt(b.sum(a * a, axis=nd - 1))) for a in attr]
            else:
                attr = [g * b.cast(e, _acc_dtype(b, g)) * mt for g in obs["grads"]]
                sc = [b.to_numpy(b.sum(a, axis=nd - 1)) for a in attr]
    elif method == "smoothgrad":
        sigma = float(noise) * _typical_row_norm(eng, obs["ids"]) / math.sqrt(eng.info.dim)
        rng = np.random.default_rng(seed)
        S = int(steps)
        eshape = tuple(b.shape(e))[1:]
        idx = np.repeat(np.arange(B, dtype=np.int64), S)

        def point(ix, sl, call):
            eps = rng.standard_normal((len(ix),) + eshape, dtype=np.float32) * np.float32(sigma)
            return b.gather(e, b.from_numpy(ix, like=e)) + b.cast(b.from_numpy(eps, like=e), b.dtype_name(e))

        gbar = eng.accumulate(idx, np.full(len(idx), 1.0 / S), point, e, "smoothgrad")
        with b.no_grad():
            attr = [g * b.cast(e, _acc_dtype(b, g)) * mt for g in gbar]
            sc = [b.to_numpy(b.sum(a, axis=nd - 1)) for a in attr]
        steps_used = np.full(B, S, np.int64)
    elif method in ("smoothgrad_sq", "vargrad", "gradient_shap"):
        S = int(steps)
        sigma = float(noise) * _typical_row_norm(eng, obs["ids"]) / math.sqrt(eng.info.dim) if noise else 0.0
        rng = np.random.default_rng(seed)
        eshape = tuple(b.shape(e))[1:]
        idx = np.repeat(np.arange(B, dtype=np.int64), S)
        dt = _acc_dtype(b, e)
        shap = method == "gradient_shap"
        if shap:
            e0, base_desc = _baseline(eng, baseline, obs, pad_id)
            alpha = rng.uniform(0.0, 1.0, len(idx))
        diffs: dict[int, Any] = {}

        def point(ix, sl, call):
            x = b.gather(e, b.from_numpy(ix, like=e))
            if sigma:
                eps = rng.standard_normal((len(ix),) + eshape, dtype=np.float32) * np.float32(sigma)
                x = x + b.cast(b.from_numpy(eps, like=e), b.dtype_name(e))
            if not shap:
                return x
            x0 = b.gather(e0, b.from_numpy(ix, like=e))
            diffs[sl.start] = b.cast(x - x0, dt)           # the noisy input minus its baseline
            return x0 + _per_row(b, alpha[sl], e, b.dtype_name(e)) * (x - x0)

        first: list[Any] = []
        second: list[Any] = []

        def consume(sl, ix, state, values, grads):
            it = b.from_numpy(ix, like=e)
            times = diffs.pop(sl.start) if shap else b.cast(state["x"], dt)
            for k, g in enumerate(grads):
                a = b.cast(g, dt) * (times if (multiply_by_inputs or not shap) else 1.0)
                s1 = b.segment_sum(a, it, B)
                s2 = None if shap else b.segment_sum(a * a, it, B)
                if k < len(first):
                    first[k] = first[k] + s1
                    if s2 is not None:
                        second[k] = second[k] + s2
                else:
                    first.append(s1)
                    if s2 is not None:
                        second.append(s2)

        eng.run(idx, point, True, consume, method)
        with b.no_grad():
            mean = [f / float(S) for f in first]
            if method == "smoothgrad_sq":
                attr = [q / float(S) * mt for q in second]
            elif method == "vargrad":
                attr = [(q / float(S) - m1 * m1) * mt for q, m1 in zip(second, mean, strict=True)]
            else:
                attr = [m1 * mt for m1 in mean]
            sc = [b.to_numpy(b.sum(a, axis=nd - 1)) for a in attr]
        steps_used = np.full(B, S, np.int64)
        if shap:
            f0 = eng.values_at(e0)
            extra["baseline_outputs"] = f0
            if multiply_by_inputs:
                delta = (np.stack([si.reshape(B, -1).sum(1) for si in sc], axis=1) - (fx - f0)).T
    else:
        e0, base_desc = _baseline(eng, baseline, obs, pad_id)
        with b.no_grad():
            diff = b.cast(e, _acc_dtype(b, e)) - b.cast(e0, _acc_dtype(b, e))
        f0 = eng.values_at(e0)
        extra["baseline_outputs"] = f0
        used_rule = rule
        scale = np.abs(fx - f0)

        def integrate(examples: np.ndarray, nodes: np.ndarray, w: np.ndarray) -> list[Any]:
            idx = np.repeat(examples, len(nodes))
            alpha = np.tile(nodes, len(examples))

            def point(ix, sl, call):
                it = b.from_numpy(ix, like=e)
                a = _per_row(b, alpha[sl], e, b.dtype_name(e))
                return b.gather(e0, it) + a * b.cast(b.gather(diff, it), b.dtype_name(e))

            return eng.accumulate(idx, np.tile(w, len(examples)), point, e,
                                  f"integrated gradients ({len(nodes)} points)")

        def finish(acc: list[Any]) -> tuple[list[Any], list[np.ndarray], np.ndarray]:
            with b.no_grad():
                at = [g * diff * mt for g in acc]
                s = [b.to_numpy(b.sum(a, axis=nd - 1)) for a in at]
            d = np.stack([si.reshape(B, -1).sum(1) for si in s], axis=1) - (fx - f0)
            if not multiply_by_inputs:     # the global attribution: the path-averaged gradient
                with b.no_grad():
                    at = [g * mt for g in acc]
                    s = [b.to_numpy(b.sum(a, axis=nd - 1)) for a in at]
            return at, s, d

        everyone = np.arange(B, dtype=np.int64)
        if not auto:
            attr, sc, dl = finish(integrate(everyone, *quadrature(rule, int(steps))))
            steps_used = np.full(B, int(steps), np.int64)
        else:
            used_rule = _NESTED[rule]
            n = _AUTO_START[used_rule]
            acc = integrate(everyone, *quadrature(used_rule, n))
            steps_used = np.full(B, n, np.int64)
            tol = float(tolerance) * np.maximum(scale, 1e-4)
            while True:
                attr, sc, dl = finish(acc)
                ok = (np.abs(dl) <= tol).all(axis=1)
                active = everyone[~ok]
                n_next, nodes, w_new, keep = refine(used_rule, n)
                if not active.size or n_next > max_steps:
                    break
                new = integrate(active, nodes, np.full(len(nodes), w_new))
                sel = np.ones(B, np.float64)
                sel[active] = keep                    # the old sum of active examples is rescaled
                with b.no_grad():
                    st = _per_row(b, sel, e, _acc_dtype(b, e))
                    acc = [a * st + nw for a, nw in zip(acc, new, strict=True)]
                steps_used[active] = n = n_next
            extra["converged"] = ok
            if not ok.all():
                bad = np.flatnonzero(~ok)
                warnings.warn(
                    f"steps='auto': {bad.size} of {B} examples (e.g. #{int(bad[0])}) still have a completeness "
                    f"gap above tolerance={tolerance} with {int(steps_used.max())} points (max_steps="
                    f"{max_steps}; worst |delta| {float(np.abs(dl).max()):.3g}); raise max_steps, or check "
                    "the model for non-smooth parts (e.g. ReLU kinks, argmax).", stacklevel=2)
        delta = dl.T                                     # (K, B)

    scores = np.stack([np.asarray(s, dtype=np.float64).astype(np.float32) for s in sc])   # (K, B, T)
    with b.no_grad():
        if K == 1:
            attributions = attr[0]
        else:
            attributions = b.concat([b.reshape(a, (1,) + tuple(b.shape(a))) for a in attr], axis=0)
    single = not eng.targets.multi
    out_vals = fx.T
    base_vals = extra["baseline_outputs"].T if extra["baseline_outputs"] is not None else None
    if single:
        scores, out_vals = scores[0], out_vals[0]
        delta = None if delta is None else delta[0]
        base_vals = None if base_vals is None else base_vals[0]
    return Attribution(
        method=method, scores=scores, attributions=attributions, delta=delta,
        tokens=_tokens(tokens, ids_np), ids=ids_np, mask=m, layer=eng.info.name,
        targets=None if single else eng.targets.labels, baseline=base_desc, rule=used_rule,
        steps=steps_used, evaluations=eng.evaluations, outputs=out_vals,
        baseline_outputs=base_vals, converged=extra["converged"],
        target=eng.targets.labels[0] if single else None)


# ----------------------------------------------------------------------------- jacobian
def jacobian(model: Any, inputs: Any, outputs: Any = None, *, layer: Any = None,
             forward: Callable | None = None, batch_size: int | None = None,
             call: int | None = None) -> Any:
    """Gradients of several outputs with respect to the embedding layer's output.

    ``outputs``: None (every column of the model's (B, C) output), or a list of targets as in
    :func:`attribute` (class indices, (B,) index lists, callables ``outputs -> (B,)`` picking
    other heads). Returns a framework tensor (K, B, T, D): one forward per chunk of
    ``batch_size`` examples, K backward passes over it.
    """
    spec = "all" if outputs is None else (list(outputs) if isinstance(outputs, (list, tuple)) else [outputs])
    eng = _Engine(model, inputs, layer, forward, spec, batch_size, None, "outputs", call=call)
    b = eng.backend
    obs = eng.observe(grad=True)
    with b.no_grad():
        return b.concat([b.reshape(g, (1,) + tuple(b.shape(g))) for g in obs["grads"]], axis=0)


# ----------------------------------------------------------------------------- hotflip
def _candidate_ids(candidates: Any, V: int, tokenizer: Any, exclude: set[int]) -> np.ndarray:
    """Sorted int64 ids allowed as replacements."""
    if candidates is None:
        keep = np.ones(V, dtype=bool)
    elif isinstance(candidates, str):
        if candidates != "words":
            raise EmbgradError(f"candidates={candidates!r}: pass 'words', ids, a (V,) bool mask, or a "
                               "callable token -> bool.")
        if tokenizer is None:
            raise EmbgradError("candidates='words' needs tokenizer= (to read the vocabulary's strings).")
        keep = whole_word_ids(tokenizer, V)
    elif callable(candidates):
        if tokenizer is None:
            raise EmbgradError("a callable candidates filter is called on token strings: pass tokenizer= "
                               "(a tokenizer or a vocabulary), or give candidate ids instead.")
        keep = np.array([bool(candidates(s)) for s in _vocab_strings(tokenizer, V)], dtype=bool)
    else:
        arr = np.asarray(candidates)
        if arr.size == 0:
            raise EmbgradError(f"candidates={candidates!r} is empty, so there is no replacement token to "
                               "try: pass at least one candidate id, or candidates=None for every id.")
        if arr.dtype == bool:
            if arr.shape != (V,):
                raise EmbgradError(f"a candidates mask must be bool ({V},), got shape {arr.shape}.")
            keep = arr.copy()
        elif np.issubdtype(arr.dtype, np.integer) and arr.ndim == 1:
            if arr.size and (arr.min() < 0 or arr.max() >= V):
                raise EmbgradError(f"candidate id {int(arr.max() if arr.max() >= V else arr.min())} is out of "
                                   f"range for a table of {V} rows.")
            keep = np.zeros(V, dtype=bool)
            keep[arr] = True
        else:
            raise EmbgradError(f"candidates of dtype {arr.dtype} and shape {arr.shape}: pass 1-D int ids, a "
                               f"({V},) bool mask, 'words', or a callable token -> bool.")
    if exclude:
        keep[np.array(sorted(i for i in exclude if 0 <= i < V), dtype=np.int64)] = False
    ids = np.flatnonzero(keep).astype(np.int64)
    if not ids.size:
        raise EmbgradError("the candidates filter leaves no replacement token; loosen it.")
    return ids


def _vocab_strings(tokenizer: Any, V: int) -> list[str]:
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(s) for s in tokenizer.convert_ids_to_tokens(list(range(V)))]
    if hasattr(tokenizer, "tokens") and not isinstance(tokenizer, (list, tuple)):
        tokenizer = tokenizer.tokens
    strs = [str(tokenizer[i]) for i in range(min(V, len(tokenizer)))]
    return strs + [""] * (V - len(strs))


def hotflip(model: Any, inputs: Any, target: Any, k: int = 10, layer: Any = None,
            candidates: Any = None, *, direction: str = "decrease", verify: bool = False,
            tokenizer: Any = None, positions: Any = None, forward: Callable | None = None,
            batch_size: int | None = None, mask: Any = None, call: int | None = None) -> HotFlip:
    """HotFlip (Ebrahimi et al., 2018): the k single-token swaps per example that most lower
    (``direction="decrease"``) or raise (``"increase"``) the target, to first order.

    From one gradient g = ∂f/∂e at the input, swapping token t to v changes f by about
    (E[v] − e_t) · g_t, where E[v] is the layer's output for v; scored for every admissible
    position and candidate, chunked over positions. ``candidates``: None (all ids but the
    tokenizer's special tokens / the pad id), ``"words"`` (alphabetic whole-word tokens),
    ids, a (V,) bool mask, or a callable token string -> bool (with ``tokenizer``).
    ``positions``: (B, T) bool of positions that may change (default: non-padding, non-special
    tokens). ``verify``: run the swapped inputs through the model and report ``actual``.
    """
    if direction not in ("decrease", "increase"):
        raise EmbgradError(f"direction must be 'decrease' or 'increase', got {direction!r}.")
    if not _is_int(k) or k < 1:
        raise EmbgradError(f"k must be a positive int (swaps per example), got {k!r}.")
    eng = _Engine(model, inputs, layer, forward, target, batch_size, None, call=call)
    if eng.targets.multi:
        raise EmbgradError("hotflip takes one target (a class index, (B,) indices or a callable), not a list.")
    b, info = eng.backend, eng.info
    obs = eng.observe(grad=True)
    e, g, ids = obs["e"], obs["grads"][0], obs["ids"]
    ids_np = b.to_numpy(ids).astype(np.int64)
    if ids_np.ndim != 2:
        raise EmbgradError(f"hotflip needs (B, T) ids, layer {info.name!r} looked up {ids_np.shape}.")
    B, T = ids_np.shape
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    pid = _known_pad_id(model, info)
    exclude = special | ({int(pid)} if pid is not None else set())
    cand = _candidate_ids(candidates, info.num_rows, tokenizer, exclude)
    if positions is None:
        allowed = _mask(eng, ids_np, mask) & ~np.isin(ids_np, np.array(sorted(exclude), dtype=np.int64))
    else:
        allowed = np.asarray(positions if isinstance(positions, np.ndarray) else b.to_numpy(positions), dtype=bool)
        if allowed.shape != (B, T):
            raise EmbgradError(f"positions must be bool (B, T) = {(B, T)}, got {allowed.shape}.")
    sign = -1.0 if direction == "decrease" else 1.0
    kk = int(min(k, cand.size))                                  # best candidates kept per position
    with b.no_grad():
        D = info.dim
        gf = b.reshape(g, (B * T, D))
        base = b.to_numpy(b.sum(b.reshape(b.cast(e, _acc_dtype(b, g)), (B * T, D)) * gf, axis=1))
        at = np.flatnonzero(allowed.reshape(-1))                 # only admissible positions are scored
        best_v = np.full((B * T, kk), -np.inf)
        best_i = np.zeros((B * T, kk), np.int64)
        if at.size:
            gsel = b.cast(b.gather(gf, b.from_numpy(at, like=gf)), _acc_dtype(b, g))
            v, i = top_candidates(b, info, gsel, ids_np.reshape(-1)[at], cand, kk, sign)
            best_v[at], best_i[at] = v, np.maximum(i, 0)
        best_i = np.searchsorted(cand, best_i)                   # candidate ids -> their index in cand
    gain = best_v - sign * base[:, None]                         # sign · predicted change
    gain[~allowed.reshape(-1)] = -np.inf
    gain[best_v < -1e29] = -np.inf
    gain = gain.reshape(B, T * kk)
    if T * kk < k:                                               # fewer (position, token) pairs than k
        gain = np.concatenate([gain, np.full((B, k - T * kk), -np.inf)], axis=1)
    order = np.argsort(-gain, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(gain, order, 1)
    ok = np.isfinite(top)
    order = np.where(ok, order, 0)
    pos = np.where(ok, order // kk, -1)
    new = np.where(ok, cand[best_i.reshape(B, T * kk)[np.arange(B)[:, None], order]], -1)
    old = np.where(ok, ids_np[np.arange(B)[:, None], np.maximum(pos, 0)], -1)
    predicted = np.where(ok, sign * top, np.nan)
    actual = None
    if verify:
        actual = np.full((B, k), np.nan)
        rows_b, rows_j = np.nonzero(ok)
        if rows_b.size:
            actual[rows_b, rows_j] = _verify(eng, e, rows_b, pos[rows_b, rows_j], new[rows_b, rows_j]) \
                - obs["values"][rows_b, 0]
    old_tok = new_tok = None
    if tokenizer is not None:
        old_tok = _tokens(tokenizer, np.maximum(old, 0))
        new_tok = _tokens(tokenizer, np.maximum(new, 0))
    return HotFlip(positions=pos, old_ids=old, new_ids=new, predicted=predicted, actual=actual,
                   output=obs["values"][:, 0], direction=direction, layer=info.name,
                   old_tokens=old_tok, new_tokens=new_tok)


def _verify(eng: _Engine, e: Any, ex: np.ndarray, pos: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Target values (R,) with example ex[r]'s token at pos[r] swapped to new[r] (a real forward
    through the model with the layer's output swapped at that one position)."""
    b, out = eng.backend, []
    T = b.shape(e)[1]
    uniq, inv = np.unique(new, return_inverse=True)
    table = b.cast(b.embed(eng.info, b.from_numpy(uniq.astype(np.int64), like=e)), b.dtype_name(e))

    def point(ix, sl, call):
        x = b.gather(e, b.from_numpy(ix, like=e))
        onehot = np.zeros((len(ix), T, 1), np.float32)
        onehot[np.arange(len(ix)), pos[sl], 0] = 1.0
        oh = b.cast(b.from_numpy(onehot, like=e), b.dtype_name(e))
        vec = b.reshape(b.gather(table, b.from_numpy(inv[sl].astype(np.int64), like=e)), (len(ix), 1, -1))
        return x * (1 - oh) + vec * oh

    eng.run(ex.astype(np.int64), point, False, lambda sl, ix, st, v, g: out.append(_values_np(b, v)[:, 0]),
            "hotflip verify")
    return np.concatenate(out)
