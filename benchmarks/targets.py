"""The targets of issues 6 and 3 (TensorFlow), evaluated on one run's results: what was
measured, met or missed.

A target whose cases did not run (quick sizes, a section not present) is "not measured";
a missed target keeps its measured figure, and the reason is filled in from what the run
shows (e.g. which method failed) — BENCHMARKS.md states it plainly.
"""
from __future__ import annotations

import dataclasses

from typing import Any

from harness import CaseResult, MethodResult, ratio
from report import Target, fmt_bytes, fmt_ratio, fmt_time


def _get(results: dict[str, CaseResult], key: str, method: str) -> tuple[CaseResult | None, MethodResult | None]:
    cr = results.get(key)
    return cr, (cr.get(method) if cr else None)


def _why(r: MethodResult | None) -> str:
    if r is None:
        return "did not run"
    return r.status if r.measured else f"{r.status}: {r.reason[:160]}"


def _faster(results: dict[str, CaseResult], key: str, peer: str, factor: float, text: str,
            method: str = "embgrad") -> Target:
    """``method`` at least ``factor``× faster than ``peer`` (peer time / method time)."""
    cr, p = _get(results, key, peer)
    _, e = _get(results, key, method)
    if cr is None:
        return Target(text, "—", None)
    if e is None or not e.measured:
        return Target(text, f"{method} did not run ({_why(e)})", False, f"{method} failed")
    if p is None or not p.measured:
        # a peer that cannot run at all (over budget, unsupported) is not a slower peer to divide by
        return Target(text, f"`{peer}` has no time: {_why(p)}", None)
    x = p.median_s / e.median_s
    return Target(text, f"`{peer}` {fmt_time(p.median_s)} / {method} {fmt_time(e.median_s)} = {fmt_ratio(x)}",
                  x >= factor)


def evaluate(results: dict[str, CaseResult], quick: bool,
             external: dict[str, Any] | None = None) -> list[Target]:
    """Issue 6's, 3's and 19's targets on the cases of this run (quick cases measure none);
    ``external``: the external sections' results (the interleaved ratios of issue 19)."""
    pe = "pe_classifier_50k"
    t: list[Target] = []

    # 1. per-example, classifier V=50k: the headline is a fresh process with glibc's defaults
    t.append(_ratio_target(results, pe + "_default_malloc", "embgrad", "plain",
                           "Per-example norms + clipped sum ≤ 1.0× plain forward+backward (classifier, "
                           "V=50k, glibc malloc defaults: a fresh process)"))
    inter = _interleaved_targets(external or {})
    if inter and t[0].met is False and inter[0].met:
        # the same target measured twice: with glibc's defaults the page faults are bimodal
        # across fresh processes (BENCHMARKS.md, the headline's reason), so one process's
        # ratio below 1 is no verdict while another measurement of the same target is above it
        inter[0] = dataclasses.replace(inter[0], met=False, reason=(
            "not reliably met: the headline row above measures the same target above 1.0× in this "
            "run; with glibc's defaults a fresh process either re-faults its pages on every call or "
            "never (bimodal), and these alternating processes happened not to."))
    t.extend(inter)
    t.append(_ratio_target(results, pe, "embgrad", "plain",
                           "Per-example norms + clipped sum ≤ 1.0× plain forward+backward (classifier, "
                           "V=50k, malloc thresholds of a long-running process)"))
    for peer, factor, name in (("vmap", 100, "torch.func vmap"), ("opacus_hooks", 100, "Opacus hooks"),
                               ("loop", 30, "the per-example loop"), ("opacus_ghost", 1.5, "Opacus ghost clipping")):
        t.append(_faster(results, pe, peer, factor,
                         f"Per-example: ≥ {factor:g}× faster than {name} (classifier, V=50k)"))

    # 1. V=1M: embgrad finishes, vmap and Opacus hooks exceed memory
    t.append(_finishes_where_peers_cannot(
        results, "pe_classifier_1m", "embgrad", ("vmap", "opacus_hooks"),
        "Per-example at V=1M: embgrad finishes while vmap and Opacus hooks exceed memory"))

    t.extend(_tensorflow_targets(results))
    t.extend(_jax_targets(results))

    # 2. weight gradient at V=1M: ≥ 10x less peak memory than densifying
    for key, dense, fw in (("wg_tf_1m", "tf_densify", "TensorFlow, densifying IndexedSlices"),
                           ("wg_torch_1m", "dense", "PyTorch, dense weight.grad")):
        text = f"Weight gradient at V=1M: ≥ 10× less peak memory than densifying ({fw})"
        e, d, missing = _measured_pair(results, key, "embgrad", dense, text)
        if missing:
            t.append(missing)
        else:
            x = ratio(results[key], dense, "peak_bytes")
            t.append(Target(text, f"`{dense}` {fmt_bytes(d.peak_bytes)} / embgrad {fmt_bytes(e.peak_bytes)} "
                                  f"= {fmt_ratio(x)}", x is not None and x >= 10))

    # 3. attribution
    t.append(_ratio_target(results, "ig_minilm", "embgrad", "captum_lig",
                           "Integrated gradients ≤ 1.0× Captum LayerIntegratedGradients' time (same rule and steps)"))
    key = "ig_adaptive"
    text = "Adaptive steps reach the same worst completeness gap with ≥ 2× fewer model evaluations"
    cr, fixed = _get(results, key, "embgrad_fixed")
    _, auto = _get(results, key, "embgrad")
    if cr is None:
        t.append(Target(text, "—", None))
    elif not (auto and auto.measured and fixed and fixed.measured and auto.evals and fixed.evals):
        t.append(Target(text, f"adaptive: {_why(auto)}; fixed: {_why(fixed)}", False))
    else:
        x = fixed.evals / auto.evals
        gaps = (f"worst gap: adaptive {auto.meta.get('worst_gap', float('nan')):.2g}, fixed "
                f"{fixed.meta.get('steps', ['?'])[0]} points {fixed.meta.get('worst_gap', float('nan')):.2g}")
        same = fixed.meta.get("worst_gap", 1.0) <= auto.meta.get("worst_gap", 0.0)   # fixed reached it
        t.append(Target(text, f"{fixed.evals} / {auto.evals} evaluations = {x:.2f}× ({gaps})", x >= 2 and same))

    # 4. similarity
    t.append(_faster(results, "similarity", "dense", 50,
                     "Similarity matrix: ≥ 50× faster than the dense route (V=50k)"))
    # issue 18: attribution for generating language models
    t.append(_faster(results, "gen_ig", "captum", 10,
                     "Generation attribution: ≥ 10× faster than Captum LLMGradientAttribution (8 prompts, "
                     "25 targets, IG 32 steps), equal results"))
    t.append(_smaller(results, "hotflip_128k", "onehot",
                      "HotFlip/GCG candidates at V=128k: less peak memory than the one-hot gradient, equal top-k"))
    # 10. tied tables (issue 14): GPT-2's wte = lm_head, whole-table norms + clipped sum
    t.append(_ratio_target(results, "tied_gpt2", "embgrad", "plain",
                           "Tied table (GPT-2 wte = lm_head, V=50,257): whole-table per-example norms + "
                           "clipped sum ≤ 1.3× plain forward+backward", most=1.3))
    if quick:
        return [Target(x.text, "quick sizes: targets are for the full sizes", None) for x in t]
    return [_with_reason(x, results) for x in t]


def _smaller(results: dict[str, CaseResult], key: str, peer: str, text: str, method: str = "embgrad") -> Target:
    """``method``'s peak memory below ``peer``'s (its result checked equal by the harness)."""
    e, p, missing = _measured_pair(results, key, method, peer, text)
    if missing:
        return missing
    if not e.peak_bytes or not p.peak_bytes:
        return Target(text, "peak memory not measured", None)
    return Target(text, f"`{peer}` {fmt_bytes(p.peak_bytes)} / {method} {fmt_bytes(e.peak_bytes)}, time "
                        f"`{peer}` {fmt_time(p.median_s)} / {method} {fmt_time(e.median_s)}",
                  e.peak_bytes < p.peak_bytes)


def _measured_pair(results: dict[str, CaseResult], key: str, method: str, peer: str,
                   text: str) -> tuple[MethodResult | None, MethodResult | None, Target | None]:
    """``(method's result, peer's result, None)`` when both were measured in case ``key``, else
    ``(None, None, the Target saying why not)``."""
    cr, p = _get(results, key, peer)
    _, e = _get(results, key, method)
    if cr is None:
        return None, None, Target(text, "—", None)
    if not (e and e.measured and p and p.measured):
        return None, None, Target(text, f"{method}: {_why(e)}; {peer}: {_why(p)}", False)
    return e, p, None


def _finishes_where_peers_cannot(results: dict[str, CaseResult], key: str, method: str,
                                 peers: tuple[str, ...], text: str) -> Target:
    """``method`` measured in case ``key`` while every one of ``peers`` ran out of memory."""
    if key not in results:
        return Target(text, "—", None)
    _, e = _get(results, key, method)
    found = {m: _get(results, key, m)[1] for m in peers}
    exceeded = {m: (r is not None and r.status in ("over-budget", "oom")) for m, r in found.items()}
    measured = (f"{method}: {fmt_time(e.median_s) if e and e.measured else _why(e)}; "
                + "; ".join(f"{m}: {r.status if r else 'did not run'}" for m, r in found.items())
                + f" (budget {fmt_bytes(results[key].case.budget_bytes)})")
    return Target(text, measured, bool(e and e.measured and all(exceeded.values())))


def _ratio_target(results: dict[str, CaseResult], key: str, method: str, peer: str, text: str,
                  most: float = 1.0) -> Target:
    """``method``'s time over ``peer``'s at most ``most`` (both in case ``key``)."""
    e, p, missing = _measured_pair(results, key, method, peer, text)
    if missing:
        return missing
    x = e.median_s / p.median_s
    return Target(text, f"`{method}` {fmt_time(e.median_s)} / `{peer}` {fmt_time(p.median_s)} = {x:.2f}×",
                  x <= most)


#: issue 19's ratios from the interleaved section: (key in its "ratios", at most, text)
_INTERLEAVED = (
    ("torch_default_malloc", 1.0, "PyTorch per-example norms + clipped sum ≤ 1.0× the plain step, "
     "glibc malloc defaults, fresh processes alternating (CPU time, V=50k)"),
    ("keras_tf_compiled", 1.5, "TensorFlow (Keras 3) per-example, both compiled: ≤ 1.5× the plain step "
     "in tf.function, interleaved (CPU time, V=50k)"),
    ("keras_tf", 1.5, "TensorFlow (Keras 3) per-example, both eager: ≤ 1.5× the plain GradientTape "
     "step, interleaved (CPU time, V=50k)"),
    ("tf_keras_compiled", 1.5, "tf-keras (Keras 2) per-example, both compiled: ≤ 1.5× the plain step "
     "in tf.function, interleaved (CPU time, V=50k)"),
    ("keras_torch", 1.5, "Keras 3 on PyTorch per-example: ≤ 1.5× the plain step, interleaved "
     "(CPU time, V=50k)"),
)


def _interleaved_targets(external: dict[str, Any]) -> list[Target]:
    """Issue 19's ratios as measured by the interleaved section (benchmarks/interleaved.py)."""
    sec = external.get("interleaved")
    if not sec:
        return []
    ratios = sec.get("result", {}).get("ratios", {}) if sec.get("status") == "ok" else {}
    out = []
    for key, most, text in _INTERLEAVED:
        x = ratios.get(key)
        if x is None:
            out.append(Target(text, f"not measured ({sec.get('status')}: {sec.get('reason', 'no ratio')})"[:200],
                              None))
        else:
            out.append(Target(text, f"embgrad / plain = {x:.2f}× (section 12)", x <= most))
    return out


def _tensorflow_targets(results: dict[str, CaseResult]) -> list[Target]:
    """Issues 3 and 19's targets for the TensorFlow per-example path (demo Keras classifier).

    The issue compares the per-example step with "a plain GradientTape step" and measured its
    prototype with the sparse algebra under ``tf.function``; all three pairings are reported, so
    that the one that meets the target is not the only one shown."""
    key = "tf_pe_classifier_50k"
    t = [
        _ratio_target(results, key, "embgrad_compiled", "plain",
                      "TensorFlow per-example norms + clipped sum, compiled with tf.function, ≤ 1.0× "
                      "a plain (eager) GradientTape step (V=50k)"),
        _ratio_target(results, key, "embgrad", "plain",
                      "TensorFlow per-example, both eager: ≤ 1.5× the plain GradientTape step (V=50k)",
                      most=1.5),
        _ratio_target(results, key, "embgrad_compiled", "plain_compiled",
                      "TensorFlow per-example, both compiled: ≤ 1.5× the plain step in tf.function (V=50k)",
                      most=1.5),
    ]
    t.append(_faster(results, key, "vectorized_map", 100,
                     "TensorFlow per-example: ≥ 100× faster than tf.vectorized_map (V=50k; both compiled)",
                     method="embgrad_compiled"))
    t.append(_finishes_where_peers_cannot(
        results, "tf_pe_classifier_1m", "embgrad_compiled", ("vectorized_map",),
        "TensorFlow per-example at V=1M: embgrad finishes while tf.vectorized_map exceeds memory"))
    return t


def _jax_targets(results: dict[str, CaseResult]) -> list[Target]:
    """Issue 21's targets for JAX (Flax NNX demo classifier; every method jitted)."""
    key = "jax_pe_classifier_50k"
    return [
        _ratio_target(results, key, "embgrad", "plain",
                      "JAX per-example norms + clipped sum ≤ 1.2× the plain jitted nnx.value_and_grad step "
                      "(V=50k)", most=1.2),
        _ratio_target(results, "jax_pe_classifier_1m", "embgrad", "plain",
                      "JAX per-example norms + clipped sum ≤ 1.2× the plain jitted nnx.value_and_grad step "
                      "(V=1M)", most=1.2),
        _faster(results, key, "vmap", 100, "JAX per-example: ≥ 100× faster than jax.vmap(jax.grad) (V=50k)"),
        _finishes_where_peers_cannot(
            results, "jax_pe_classifier_1m", "embgrad", ("vmap",),
            "JAX per-example at V=1M: embgrad finishes while jax.vmap(jax.grad) exceeds memory"),
    ]


#: (words of a target, the cause found by profiling) for the targets whose reason is static
_REASONS = (
    (("HotFlip/GCG candidates at V=128k",),
     "The figure is the whole call's peak above the resident size after the warm-up call and a "
     "malloc_trim: embgrad's call (forward and backward through the 131k-logit head, then the candidate "
     "search) keeps about 200 MB more of freed blocks between calls, trimmed before the timed call and "
     "faulted back in it. Profiled with /proc VmHWM after a warm call, one process each, model and data "
     "included: one-hot 1,020 MB absolute peak, embgrad 877 MB. The candidate search itself holds the "
     "kept (P, k) candidates plus one chunk of at most 2^22 elements (16 MB of embeddings, 8 MB of "
     "scores); the one-hot method holds (P, V) one-hot inputs and their gradient."),
    (("faster than Captum LLMGradientAttribution",),
     "The K = 25 targets' rows of the Jacobian need K backward passes per (example, step) row whatever the "
     "method (summing the targets into one backward mixes them); embgrad saves the K − 1 repeated forward "
     "passes per row and Captum's per-target calls, not the backward passes. Profiled on this GPT-2 "
     "(64 rows × 40 tokens): one forward 14 ms, one backward to the embeddings 14 ms, so the floor of the "
     "ratio is about K·(F + B) / (F + K·B) ≈ 2 on a compute-bound CPU model; the rest of the measured "
     "ratio is Captum's per-call overhead. One batched backward (vjp='vmap', is_grads_batched) does the "
     "same work in one call: faster than the loop with few targets, slower with 25 on this CPU (the vmap'd "
     "attention backward)."),
    (("faster than torch.func vmap", "faster than Opacus hooks"),
     "The dense peers' cost at V=50k is writing and reducing B·V·D = 1.6 GB of per-example "
     "gradients, bounded by this machine's memory bandwidth; the ratio grows with V (at V=1M "
     "they cannot run at all)."),
    (("less peak memory than densifying",),
     "embgrad's peak is its temporaries over the looked-up rows (several copies of B·T·D floats: "
     "output gradient, coalesced values), independent of V; the dense gradient is V·D floats, so "
     "the ratio grows linearly with V (see the 5M table)."),
    (("Captum LayerIntegratedGradients",),
     "Both evaluate the same B·steps interpolated rows through MiniLM in chunks of the same size; "
     "the model's forward and backward are nearly all of the time, so the two are within the "
     "machine's noise of each other."),
    (("Adaptive steps",),
     "The trapezoid rule's error falls as 1/n², so the fewest fixed points that reach the adaptive "
     "run's worst gap are close to the points the slowest example needed; adaptive steps save only "
     "the difference on the examples that converged in earlier rounds."),
    (("per-example, both eager",),
     "Profiled on the demo classifier in CPU time (process_time, stable under load), one step split "
     "into stages (issue 19): plain forward 5.3 ms + backward 2.9 ms; embgrad forward 5.2 ms, "
     "gradients() 5.5 ms (the tape's backward plus the NaN check and the check that no other read of "
     "the table is missed: a fingerprint of the tape's total gradient of the table and of the "
     "lookups'), per_example() 3.2 ms (the coalesce below), norms 0.8 ms, clip + clipped sum 2.1 ms. "
     "Eagerly every op is dispatched from Python (~0.02 ms each; a tf.function call ~0.25 ms, so "
     "the few-op steps now run as eager ops). The per-example work itself is the compiled row's "
     "~3 ms; plain TF returns the table's gradient as uncoalesced IndexedSlices, so there is no "
     "dense (V, D) cost for embgrad to save. Compile the step (embgrad works inside tf.function)."),
    (("per-example, both compiled",),
     "Profiled in CPU time, stage by stage inside one tf.function (demo classifier, V=50k): plain "
     "step 2.3 ms; capture + the tape's gradient of the lookups +0.0 ms; the (example, row) coalesce "
     "+1.5 ms (it was +2.7 ms before issue 19: now one stable sort of the ~6,250 keys, a gather of "
     "the (6,251 × 128) lookup gradients in sorted order and a sorted segment sum, instead of two "
     "tf.unique and TensorFlow's UnsortedSegmentSum, which adds one row at a time); norms +0.3 "
     "ms; clip + clipped sum +1.4 ms (scale, sort of the pairs' rows, sparse segment sum into ~2,700 "
     "rows). Each pass over the (lookups × D) float32 gradients costs 0.2-0.5 ms of CPU in "
     "TensorFlow's CPU kernels here (a gather of 6,251 rows ~0.5 ms, squares and row sums ~0.5 ms, "
     "is_finite + all ~0.6 ms, replaced by one reduce_sum ~0.4 ms), and the norms and the clipped "
     "sum need about six such passes and two sorts, about 3 ms, more than the whole plain compiled "
     "step, which coalesces nothing (its IndexedSlices keep every lookup). XLA (jit_compile) needs "
     "static shapes (the pair count is data-dependent) and its CPU scatter was no faster when "
     "padded (issue 3's profile)."),
    (("Keras 3 on PyTorch per-example",),
     "Not profiled in this session: the step is PyTorch's (the same sparse algebra as the PyTorch "
     "rows) under Keras 3's eager dispatch; two runs gave 1.24× and 1.75× (the two-thread PyTorch "
     "steps swing most on this loaded VM)."),
    (("faster than tf.vectorized_map",),
     "tf.vectorized_map writes B·V·D = 1.6 GB of per-example gradients at V=50k, bounded by memory "
     "bandwidth; embgrad's compiled step is the model's forward and backward (about the plain "
     "compiled step) plus the sparse algebra, mostly segment sums over (lookups × D) float32 "
     "values (~2 ms of CPU each on TensorFlow's kernel). Measured alternatives were not faster: "
     "scatter_nd, sort + sparse_segment_sum, sorted segment_sum, XLA scatter, a sparse one-hot "
     "matmul, a dense (example, row) presence map, a sort-based unique. The ratio grows with V: at "
     "V=1M vectorized_map runs out of memory. Issue 19's sort-based coalesce measured 126× in a run "
     "at load ~14 and 76× in the next, at load ~20 (embgrad_compiled 14.1 then 23.4 ms, "
     "vectorized_map 1.78 then 1.79 s): the short compiled step suffers most from other jobs."),
    (("Similarity",),
     "embgrad's time is two captures (2,048 + 128 examples of 128 tokens) and a join whose pairs on "
     "frequent tokens go through a dense product; see the similarity table."),
)


def _with_reason(t: Target, results: dict[str, CaseResult]) -> Target:
    """A missed target with the reason this run's own figures show (profiled causes)."""
    if t.met is not False or t.reason:
        return t

    def secs(key: str, method: str) -> str:
        r = _get(results, key, method)[1]
        return fmt_time(r.median_s) if r and r.measured else (r.status if r else "not run")

    why = ""
    if t.text.startswith(("Per-example norms + clipped sum ≤ 1.0×", "PyTorch per-example norms")):
        why = ("Profiled (issue 19): with glibc's default malloc the cost is page faults, and it is "
               "bimodal across fresh processes: a process either re-faults about 3,300-3,700 pages "
               "(13-15 MiB) on every call or none. strace shows the heap grown with brk and trimmed "
               "back several times per call: glibc's trim threshold is twice the largest block freed "
               "so far, about 8.4 MiB after a 4 MiB (64 × 128 × 128 float32) temporary, and one "
               "step's temporaries exceed it; plain frees its 25.6 MB dense (V, D) gradient, which "
               "lifts the threshold to ~51 MiB, so its heap stays. In a faulting process the faults "
               "fall on the model's own tensors (2,016 in the forward: the embedding output and the "
               "masked product; 1,024 for autograd's output gradient) and 612 on embgrad's pair "
               "values; none in the norms or the clipped sum. embgrad's own temporaries were cut "
               "(no (pairs × D) squares for the norms; one sort instead of two uniques), but the "
               "model's re-faulted activations are the allocator's doing, not work embgrad can drop "
               "without holding memory across calls or changing malloc settings. Plain grows with V, "
               f"embgrad does not: at V=1M plain {secs('pe_classifier_1m', 'plain')}, embgrad "
               f"{secs('pe_classifier_1m', 'embgrad')}.")
    else:
        why = next((text for keys, text in _REASONS if any(k in t.text for k in keys)), "")
    return Target(t.text, t.measured, t.met, why)


