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

How: the layer's output is replaced per forward call (:meth:`embgrad.capture.Capture.replacing`,
as Captum's ``LayerIntegratedGradients`` does with a forward hook), and all (example, step) points go
through the model in chunks of ``batch_size`` rows; the gradients are summed per example with a
segment sum. No Python loop runs over examples, steps inside a chunk, or vocabulary rows.
Framework-neutral: everything framework-specific is a primitive of the backend.

Also here: :func:`hotflip` (first-order token swaps from one gradient) and :func:`jacobian`
(gradients of several outputs, (K, B, T, D)).
"""
from __future__ import annotations

# The parts: rules (quadrature), engine (chunked runs through the model), sites (which layers
# or composite modules), targets, inputs (mask, tokens, baselines), methods (attribute), swaps
# (hotflip), jacobians, results (Attribution, LayerAttributions, HotFlip). The private helpers
# imported from here before the package split stay importable (F401).
from .engine import _acc_dtype, _Engine, _per_row, _pick_layer, _Progress  # noqa: F401
from .inputs import _baseline, _known_pad_id, _tokens  # noqa: F401
from .jacobians import jacobian
from .methods import METHODS, attribute
from .results import Attribution, HotFlip, LayerAttributions
from .rules import RULES, quadrature, refine
from .swaps import _vocab_strings, hotflip  # noqa: F401
from .targets import _is_int, _logits  # noqa: F401

__all__ = ["attribute", "Attribution", "LayerAttributions", "hotflip", "HotFlip", "jacobian", "quadrature",
           "refine", "METHODS", "RULES"]
