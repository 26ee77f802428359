"""``attribute``: the attribution methods over an embedding layer's output (see
:mod:`embgrad.attribution`), one function per method in a registry ``{name: _Method}``.

A method gets a :class:`_Job` (the engine, the pass at the input, the options) and returns a
:class:`_Out` (per-target attributions and scores, and what it measured: completeness gap,
baseline outputs, steps); :func:`attribute` validates the options, runs the method and builds
the :class:`Attribution`.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, overload

import numpy as np

from ..errors import EmbgradError, closest_names
from .engine import _acc_dtype, _Engine, _per_row
from .inputs import _baseline, _mask, _tokens, _typical_row_norm
from .results import Attribution, LayerAttributions
from .rules import _AUTO_START, _NESTED, quadrature, refine
from .targets import _is_int

__all__ = ["METHODS", "attribute"]


@dataclass
class _Job:
    """What a method works from: the engine, the pass at the input (``obs``: ids, ``e``
    (B, T, D), ``values`` NumPy (B, K), ``grads`` when the method asked for them), the padding
    mask as a (B, T, 1) tensor ``mt`` of the accumulation dtype, and the options of
    :func:`attribute`."""

    eng: _Engine
    obs: dict[str, Any]
    mt: Any
    baseline: Any
    steps: Any
    rule: str
    tolerance: float
    max_steps: int
    noise: float
    seed: int
    pad_id: int | None
    multiply_by_inputs: bool

    @property
    def e(self) -> Any:
        return self.obs["e"]

    @property
    def fx(self) -> np.ndarray:
        return self.obs["values"]

    @property
    def nd(self) -> int:
        return len(self.eng.backend.ops.shape(self.e))


@dataclass
class _Out:
    """What a method returns: K attributions (B, T, D) and K score arrays NumPy (B, T); the
    completeness gap (K, B), the baseline's description and outputs (B, K), the rule that ran,
    the steps per example (B,) and whether each converged (``steps="auto"``), where they apply."""

    attr: list[Any]
    scores: list[np.ndarray]
    delta: np.ndarray | None = None
    baseline: str | None = None
    baseline_outputs: np.ndarray | None = None
    rule: str | None = None
    steps: np.ndarray | None = None
    converged: np.ndarray | None = None


class _Method(NamedTuple):
    """A registered method: ``run(job) -> _Out``; ``grad_at_input``: it needs the gradient at
    the input from the first pass; ``noisy``: ``steps`` counts noise samples (``noise``,
    ``seed``); ``global_choice``: ``multiply_by_inputs=False`` applies."""

    run: Callable[[_Job], _Out]
    grad_at_input: bool = False
    noisy: bool = False
    global_choice: bool = False


def _sum_last(job: _Job, attr: list[Any]) -> list[np.ndarray]:
    b = job.eng.backend
    return [b.ops.to_numpy(b.ops.sum(a, axis=job.nd - 1)) for a in attr]


def _saliency(job: _Job) -> _Out:
    """‖∂f/∂e_t‖₂ per token (Simonyan et al. 2014; Captum's ``Saliency`` with ``abs``, as a norm)."""
    b = job.eng.backend
    with b.ops.no_grad():
        attr = [g * job.mt for g in job.obs["grads"]]
        sc = [b.ops.to_numpy(b.ops.sqrt(b.ops.sum(a * a, axis=job.nd - 1))) for a in attr]
    return _Out(attr, sc)


def _grad_x_input(job: _Job) -> _Out:
    """∂f/∂e_t · e_t per token (Shrikumar et al. 2016; Captum's ``InputXGradient``)."""
    b, e = job.eng.backend, job.e
    with b.ops.no_grad():
        attr = [g * b.ops.cast(e, _acc_dtype(b, g)) * job.mt for g in job.obs["grads"]]
        sc = _sum_last(job, attr)
    return _Out(attr, sc)


def _sigma(job: _Job) -> float:
    """The noise's standard deviation per coordinate: ``noise`` × the table's median row norm / √D."""
    eng = job.eng
    return float(job.noise) * _typical_row_norm(eng, job.obs["ids"]) / math.sqrt(eng.info.dim)


def _smoothgrad(job: _Job) -> _Out:
    """The gradient averaged over ``steps`` noisy copies e + ε, times the input (Smilkov et al.
    2017; Captum's ``NoiseTunnel(Saliency)`` × input)."""
    eng, e = job.eng, job.e
    b, B = eng.backend, eng.B
    sigma = _sigma(job)
    rng = np.random.default_rng(job.seed)
    S = int(job.steps)
    eshape = tuple(b.ops.shape(e))[1:]
    idx = np.repeat(np.arange(B, dtype=np.int64), S)

    def point(ix, sl, call):
        eps = rng.standard_normal((len(ix),) + eshape, dtype=np.float32) * np.float32(sigma)
        return b.ops.gather(e, b.ops.from_numpy(ix, like=e)) + b.ops.cast(b.ops.from_numpy(eps, like=e),
                                                                           b.ops.dtype_name(e))

    gbar = eng.accumulate(idx, np.full(len(idx), 1.0 / S), point, e, "smoothgrad")
    with b.ops.no_grad():
        attr = [g * b.ops.cast(e, _acc_dtype(b, g)) * job.mt for g in gbar]
        sc = _sum_last(job, attr)
    return _Out(attr, sc, steps=np.full(B, S, np.int64))


def _sampled(kind: str, job: _Job) -> _Out:
    """``smoothgrad_sq`` / ``vargrad``: the mean of the squares, the variance, of the
    per-sample gradient × (noisy) input over ``steps`` samples (Captum's
    ``NoiseTunnel(InputXGradient)``, Adebayo et al. 2018); ``gradient_shap``: the mean of
    ∂f/∂e(e₀ + α(e + ε − e₀)) ⊙ (e + ε − e₀), α ~ U(0, 1) (Captum's ``LayerGradientShap``,
    Lundberg & Lee 2017)."""
    eng, e, mt = job.eng, job.e, job.mt
    b, B = eng.backend, eng.B
    S = int(job.steps)
    sigma = _sigma(job) if job.noise else 0.0
    rng = np.random.default_rng(job.seed)
    eshape = tuple(b.ops.shape(e))[1:]
    idx = np.repeat(np.arange(B, dtype=np.int64), S)
    dt = _acc_dtype(b, e)
    shap = kind == "gradient_shap"
    multiply = job.multiply_by_inputs
    out = _Out([], [], steps=np.full(B, S, np.int64))
    if shap:
        e0, out.baseline = _baseline(eng, job.baseline, job.obs, job.pad_id)
        alpha = rng.uniform(0.0, 1.0, len(idx))
    diffs: dict[int, Any] = {}

    def point(ix, sl, call):
        x = b.ops.gather(e, b.ops.from_numpy(ix, like=e))
        if sigma:
            eps = rng.standard_normal((len(ix),) + eshape, dtype=np.float32) * np.float32(sigma)
            x = x + b.ops.cast(b.ops.from_numpy(eps, like=e), b.ops.dtype_name(e))
        if not shap:
            return x
        x0 = b.ops.gather(e0, b.ops.from_numpy(ix, like=e))
        diffs[sl.start] = b.ops.cast(x - x0, dt)           # the noisy input minus its baseline
        return x0 + _per_row(b, alpha[sl], e, b.ops.dtype_name(e)) * (x - x0)

    first: list[Any] = []
    second: list[Any] = []

    def consume(sl, ix, state, values, grads):
        it = b.ops.from_numpy(ix, like=e)
        times = diffs.pop(sl.start) if shap else b.ops.cast(state["x"], dt)
        for k, g in enumerate(grads):
            a = b.ops.cast(g, dt) * (times if (multiply or not shap) else 1.0)
            s1 = b.ops.segment_sum(a, it, B)
            s2 = None if shap else b.ops.segment_sum(a * a, it, B)
            if k < len(first):
                first[k] = first[k] + s1
                if s2 is not None:
                    second[k] = second[k] + s2
            else:
                first.append(s1)
                if s2 is not None:
                    second.append(s2)

    eng.run(idx, point, True, consume, kind)
    with b.ops.no_grad():
        mean = [f / float(S) for f in first]
        if kind == "smoothgrad_sq":
            attr = [q / float(S) * mt for q in second]
        elif kind == "vargrad":
            attr = [(q / float(S) - m1 * m1) * mt for q, m1 in zip(second, mean, strict=True)]
        else:
            attr = [m1 * mt for m1 in mean]
        out.attr, out.scores = attr, _sum_last(job, attr)
    if shap:
        f0 = eng.values_at(e0)
        out.baseline_outputs = f0
        if multiply:
            out.delta = (np.stack([si.reshape(B, -1).sum(1) for si in out.scores], axis=1) - (job.fx - f0)).T
    return out


def _integrated_gradients(job: _Job) -> _Out:
    """(e − e₀) · ∫₀¹ ∂f/∂e(e₀ + α(e − e₀)) dα by a quadrature rule, with its completeness gap
    (Sundararajan et al. 2017; Captum's ``LayerIntegratedGradients``); ``steps="auto"`` refines
    a nested rule for the examples whose gap is above ``tolerance``."""
    eng, e, mt, fx = job.eng, job.e, job.mt, job.fx
    b, B = eng.backend, eng.B
    e0, base_desc = _baseline(eng, job.baseline, job.obs, job.pad_id)
    with b.ops.no_grad():
        diff = b.ops.cast(e, _acc_dtype(b, e)) - b.ops.cast(e0, _acc_dtype(b, e))
    f0 = eng.values_at(e0)
    out = _Out([], [], baseline=base_desc, baseline_outputs=f0, rule=job.rule)
    scale = np.abs(fx - f0)

    def integrate(examples: np.ndarray, nodes: np.ndarray, w: np.ndarray) -> list[Any]:
        idx = np.repeat(examples, len(nodes))
        alpha = np.tile(nodes, len(examples))

        def point(ix, sl, call):
            it = b.ops.from_numpy(ix, like=e)
            a = _per_row(b, alpha[sl], e, b.ops.dtype_name(e))
            return b.ops.gather(e0, it) + a * b.ops.cast(b.ops.gather(diff, it), b.ops.dtype_name(e))

        return eng.accumulate(idx, np.tile(w, len(examples)), point, e,
                              f"integrated gradients ({len(nodes)} points)")

    def finish(acc: list[Any]) -> tuple[list[Any], list[np.ndarray], np.ndarray]:
        with b.ops.no_grad():
            at = [g * diff * mt for g in acc]
            s = _sum_last(job, at)
        d = np.stack([si.reshape(B, -1).sum(1) for si in s], axis=1) - (fx - f0)
        if not job.multiply_by_inputs:     # the global attribution: the path-averaged gradient
            with b.ops.no_grad():
                at = [g * mt for g in acc]
                s = _sum_last(job, at)
        return at, s, d

    everyone = np.arange(B, dtype=np.int64)
    if not isinstance(job.steps, str):
        out.attr, out.scores, dl = finish(integrate(everyone, *quadrature(job.rule, int(job.steps))))
        out.steps = np.full(B, int(job.steps), np.int64)
    else:
        out.rule = used_rule = _NESTED[job.rule]
        n = _AUTO_START[used_rule]
        acc = integrate(everyone, *quadrature(used_rule, n))
        steps_used = np.full(B, n, np.int64)
        tol = float(job.tolerance) * np.maximum(scale, 1e-4)
        while True:
            out.attr, out.scores, dl = finish(acc)
            ok = (np.abs(dl) <= tol).all(axis=1)
            active = everyone[~ok]
            n_next, nodes, w_new, keep = refine(used_rule, n)
            if not active.size or n_next > job.max_steps:
                break
            new = integrate(active, nodes, np.full(len(nodes), w_new))
            sel = np.ones(B, np.float64)
            sel[active] = keep                    # the old sum of active examples is rescaled
            with b.ops.no_grad():
                st = _per_row(b, sel, e, _acc_dtype(b, e))
                acc = [a * st + nw for a, nw in zip(acc, new, strict=True)]
            steps_used[active] = n = n_next
        out.steps, out.converged = steps_used, ok
        if not ok.all():
            bad = np.flatnonzero(~ok)
            warnings.warn(
                f"steps='auto': {bad.size} of {B} examples (e.g. #{int(bad[0])}) still have a completeness "
                f"gap above tolerance={job.tolerance} with {int(steps_used.max())} points (max_steps="
                f"{job.max_steps}; worst |delta| {float(np.abs(dl).max()):.3g}); raise max_steps, or check "
                "the model for non-smooth parts (e.g. ReLU kinks, argmax).", stacklevel=3)
    out.delta = dl.T                                     # (K, B)
    return out


#: every method of :func:`attribute`, by name (the order of :data:`METHODS`)
_METHODS: dict[str, _Method] = {
    "saliency": _Method(_saliency, grad_at_input=True),
    "grad_x_input": _Method(_grad_x_input, grad_at_input=True),
    "integrated_gradients": _Method(_integrated_gradients, global_choice=True),
    "smoothgrad": _Method(_smoothgrad, noisy=True),
    "smoothgrad_sq": _Method(functools.partial(_sampled, "smoothgrad_sq"), noisy=True),
    "vargrad": _Method(functools.partial(_sampled, "vargrad"), noisy=True),
    "gradient_shap": _Method(functools.partial(_sampled, "gradient_shap"), noisy=True, global_choice=True),
}
METHODS = tuple(_METHODS)
#: the methods that sample noise (``steps`` = samples, ``noise``, ``seed``)
_NOISY = tuple(name for name, m in _METHODS.items() if m.noisy)


@overload
def attribute(model: Any, inputs: Any, target: Any, method: str = ..., *, layer: list[Any] | tuple[Any, ...],
              baseline: Any = ..., steps: int | str = ..., rule: str = ..., forward: Callable | None = ...,
              batch_size: int | None = ..., tolerance: float = ..., max_steps: int = ...,
              noise: float | None = ..., seed: int = ..., mask: Any = ..., pad_id: int | None = ...,
              tokens: Any = ..., progress: bool | None = ..., call: int | None = ...,
              multiply_by_inputs: bool = ...) -> LayerAttributions: ...


@overload
def attribute(model: Any, inputs: Any, target: Any, method: str = ..., layer: Any = ..., baseline: Any = ...,
              steps: int | str = ..., rule: str = ..., forward: Callable | None = ...,
              batch_size: int | None = ..., *, tolerance: float = ..., max_steps: int = ...,
              noise: float | None = ..., seed: int = ..., mask: Any = ..., pad_id: int | None = ...,
              tokens: Any = ..., progress: bool | None = ..., call: int | None = ...,
              multiply_by_inputs: bool = ...) -> Attribution: ...


def attribute(model: Any, inputs: Any, target: Any, method: str = "integrated_gradients",
              layer: Any = None, baseline: Any = None, steps: int | str = 50,
              rule: str = "gauss_legendre", forward: Callable | None = None,
              batch_size: int | None = None, *, tolerance: float = 0.01, max_steps: int = 256,
              noise: float | None = None, seed: int = 0, mask: Any = None, pad_id: int | None = None,
              tokens: Any = None, progress: bool | None = None, call: int | None = None,
              multiply_by_inputs: bool = True) -> Attribution | LayerAttributions:
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
            the model's only embedding layer. Also (PyTorch only for now): a *composite* module
            holding the token embedding, by name (a unique suffix will do, e.g. "embeddings") or
            object, whose whole output (B, T, D) is attributed as one input, e.g. a Hugging Face
            ``BertEmbeddings`` (word + position + token-type embeddings, LayerNorm) as Captum's
            ``LayerIntegratedGradients(model, model.bert.embeddings)``; its id baselines are
            turned into its output by a forward with its token lookup given those ids. Or a list
            of layers (embedding layers or composites, outputs of one shape (B, T, D)) moved
            along ONE path at once, as Captum's ``LayerIntegratedGradients`` with a list of
            layers: the result is then a :class:`LayerAttributions` (layer name ->
            :class:`Attribution`, one completeness ``delta`` for all layers together), and
            ``baseline`` may be a dict ``{layer name: baseline}``. Composites and several
            layers take saliency, grad_x_input, integrated_gradients and gradient_shap
            (noise=0). A name that is none of these raises, listing the valid names.
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

    Returns an :class:`Attribution` (a :class:`LayerAttributions` for a list of layers).

    Raises:
        EmbgradError: on bad input, before the model runs where it can be checked: an unknown
            ``method`` or ``rule``, ``steps``/``noise``/``tolerance``/``max_steps`` out of range,
            ``multiply_by_inputs=False`` for a method without that choice, a target that does not
            fit the batch or the model's output, an unknown or unfit layer (an embedding bag, a
            lookup not following the batch, several lookups without ``call=``), a baseline or
            mask of the wrong shape, dtype or range, a model traced in graph mode
            (``tf.function``).
    """
    if method not in METHODS:
        raise EmbgradError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} "
                           f"(closest: {closest_names(str(method), METHODS)}).")
    spec = _METHODS[method]
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
    if spec.noisy and (not _is_int(steps) or steps < 1 or not noise >= 0):
        raise EmbgradError(f"{method} needs steps (noise samples) ≥ 1 and noise ≥ 0, got "
                           f"steps={steps!r}, noise={noise!r}.")
    if not multiply_by_inputs and not spec.global_choice:
        choices = " and ".join(n for n, m in _METHODS.items() if m.global_choice)
        raise EmbgradError(f"multiply_by_inputs=False applies to {choices} "
                           f"(Captum's global attribution); method={method!r} has no such choice.")
    eng = _Engine(model, inputs, layer, forward, target, batch_size, progress, call=call, sites=True)
    if not eng.plain and spec.noisy and (method != "gradient_shap" or noise):
        raise EmbgradError(
            f"method={method!r} scales its noise by the embedding table's row norms, which a composite module or "
            "several layers do not have; use integrated_gradients, saliency, grad_x_input or gradient_shap "
            "(noise=0) there, or attribute to one embedding layer.")
    b = eng.backend
    obs = eng.observe(grad=spec.grad_at_input)
    ids_np = b.ops.to_numpy(obs["ids"]).astype(np.int64)
    L = len(eng.sites)
    T = ids_np.shape[1] // L
    m = _mask(eng, ids_np[:, :T], mask)
    if L > 1:
        m = np.tile(m, (1, L))
    e = obs["e"]
    with b.ops.no_grad():
        mt = b.ops.reshape(b.ops.cast(b.ops.from_numpy(m, like=e), _acc_dtype(b, e)), b.ops.shape(e)[:-1] + (1,))
    job = _Job(eng, obs, mt, baseline=baseline, steps=steps, rule=rule, tolerance=tolerance,
               max_steps=max_steps, noise=float(noise), seed=seed, pad_id=pad_id,
               multiply_by_inputs=multiply_by_inputs)
    res = spec.run(job)
    K = obs["values"].shape[1]
    scores = np.stack([np.asarray(s, dtype=np.float64).astype(np.float32) for s in res.scores])   # (K, B, T)
    with b.ops.no_grad():
        if K == 1:
            attributions = res.attr[0]
        else:
            attributions = b.ops.concat([b.ops.reshape(a, (1,) + tuple(b.ops.shape(a))) for a in res.attr], axis=0)
    single = not eng.targets.multi
    delta = res.delta
    out_vals = obs["values"].T
    base_vals = res.baseline_outputs.T if res.baseline_outputs is not None else None
    if single:
        scores, out_vals = scores[0], out_vals[0]
        delta = None if delta is None else delta[0]
        base_vals = None if base_vals is None else base_vals[0]

    def result(name: str, sc: np.ndarray, at: Any, ids: np.ndarray, mask_: np.ndarray, dl: Any) -> Attribution:
        return Attribution(
            method=method, scores=sc, attributions=at, delta=dl,
            tokens=_tokens(tokens, ids), ids=ids, mask=mask_, layer=name,
            targets=None if single else eng.targets.labels, baseline=res.baseline, rule=res.rule,
            steps=res.steps, evaluations=eng.evaluations, outputs=out_vals,
            baseline_outputs=base_vals, converged=res.converged,
            target=eng.targets.labels[0] if single else None)

    if L == 1:
        return result(eng.sites[0].name, scores, attributions, ids_np, m, delta)
    by_layer = {}
    for si, site in enumerate(eng.sites):
        cols = slice(si * T, (si + 1) * T)
        sc = scores[..., cols]
        at = attributions[..., cols, :]
        by_layer[site.name] = result(site.name, sc, at, ids_np[:, cols], m[:, cols], None)
    return LayerAttributions(by_layer=by_layer, method=method, delta=delta, outputs=out_vals,
                             baseline_outputs=base_vals, evaluations=eng.evaluations)
