"""Privacy accounting for DP-SGD, DP-FEST and DP-AdaFEST with Google's ``dp-accounting``.

One training step on a Poisson-sampled batch (rate q) runs the mechanism's Gaussians (DP-AdaFEST:
one per table's selection, one for the gradient) on the same batch; ``steps`` such steps compose.
The Rényi accountant (Mironov 2017; Mironov, Talwar, Zhang 2019) is given exactly that event;
the PLD accountant (Doroshenko et al. 2022), which takes only a single Gaussian under Poisson
sampling, is given the one Gaussian the step's Gaussians are together: with per-coordinate
sensitivity-normalised noise multipliers σ_i on one input, the joint release is one Gaussian
mechanism of σ = (Σ σ_i⁻²)^(−1/2) (exact, not a bound). DP-FEST's private top-k selection is a
one-off Gaussian on the full data (no sampling), composed once.

Opacus's accountants (``opacus.accountants.RDPAccountant``) take ``noise_multiplier`` = σ of
:func:`equivalent_noise_multiplier`.
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import EmbgradError

__all__ = ["dp_event", "epsilon", "equivalent_noise_multiplier", "noise_multiplier_for"]


def _dp() -> Any:
    try:
        import dp_accounting  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise EmbgradError("privacy accounting needs dp-accounting: pip install 'embgrad[privacy]' "
                           "(dp-accounting==0.6.0).") from e
    return dp_accounting


def equivalent_noise_multiplier(mechanism: Any) -> float:
    """σ of the one Gaussian a step of ``mechanism`` is: (Σ_i σ_i⁻²)^(−1/2); 0.0 when a step
    adds no noise."""
    sig = mechanism.step_noise_multipliers()
    if any(s <= 0 for s in sig):
        return 0.0
    return 1.0 / math.sqrt(sum(s ** -2 for s in sig))


def _check(sample_rate: float, steps: int) -> None:
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise EmbgradError(f"sample_rate must be in (0, 1] (expected batch size / dataset size), "
                           f"got {sample_rate!r}.")
    if not isinstance(steps, int) or steps < 0:
        raise EmbgradError(f"steps must be an int >= 0, got {steps!r}.")


def dp_event(mechanism: Any, *, sample_rate: float, steps: int, fold: bool = False) -> Any:
    """The ``dp_accounting.DpEvent`` of ``steps`` Poisson-sampled steps of ``mechanism``.

    ``fold=True`` gives each step as its one equivalent Gaussian (what PLD accepts).

    Raises:
        EmbgradError: a mechanism without noise (σ = 0 is not private); ``sample_rate`` outside
            (0, 1] or ``steps`` not an int >= 0; dp-accounting not installed (the ``privacy`` extra).
    """
    _check(sample_rate, steps)
    dp = _dp()
    sig = mechanism.step_noise_multipliers()
    if any(s <= 0 for s in sig):
        raise EmbgradError(f"{mechanism!r} adds no noise: it is not differentially private (ε = ∞).")
    if fold or len(sig) == 1:
        step = dp.GaussianDpEvent(equivalent_noise_multiplier(mechanism))
    else:
        step = dp.ComposedDpEvent([dp.GaussianDpEvent(s) for s in sig])
    event = dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(float(sample_rate), step), steps)
    once = getattr(mechanism, "selection_noise_multiplier", None)
    if type(mechanism).__name__ == "DPFEST" and once is not None:
        event = dp.ComposedDpEvent([dp.GaussianDpEvent(float(once)), event])
    return event


def epsilon(mechanism: Any, *, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε of ``steps`` Poisson-sampled steps of ``mechanism`` at ``delta``.

    Args:
        mechanism: :class:`DPSGD`, :class:`DPFEST` or :class:`DPAdaFEST`.
        sample_rate: q = expected batch size / dataset size (Opacus's ``sample_rate``).
        steps: training steps taken.
        delta: δ in (0, 1), e.g. 1/N.
        accountant: ``"rdp"`` (dp-accounting's RdpAccountant) or ``"pld"`` (PLDAccountant,
            tighter).
    Returns:
        ε as a float.
    Raises:
        EmbgradError: bad δ or accountant name; see :func:`dp_event`.
    """
    if not (isinstance(delta, float) and 0 < delta < 1):
        raise EmbgradError(f"delta must be a float in (0, 1), e.g. 1/N; got {delta!r}.")
    dp = _dp()
    if accountant == "rdp":
        acc = dp.rdp.RdpAccountant()
        acc.compose(dp_event(mechanism, sample_rate=sample_rate, steps=steps))
    elif accountant == "pld":
        acc = dp.pld.PLDAccountant()
        acc.compose(dp_event(mechanism, sample_rate=sample_rate, steps=steps, fold=True))
    else:
        raise EmbgradError(f"accountant must be 'rdp' or 'pld', got {accountant!r}.")
    return float(acc.get_epsilon(delta))


_epsilon_of = epsilon   # noise_multiplier_for's parameter is named epsilon


def noise_multiplier_for(make: Any, *, epsilon: float, sample_rate: float, steps: int, delta: float,
                         accountant: str = "rdp", low: float = 0.3, high: float = 100.0,
                         tol: float = 1e-3) -> float:
    """The smallest noise multiplier σ (to relative ``tol``) whose mechanism ``make(σ)`` spends
    at most ``epsilon`` over ``steps`` steps: bisection on :func:`epsilon` (as Opacus's
    ``get_noise_multiplier``).

    Args:
        make: ``σ -> mechanism``, e.g. ``lambda s: DPAdaFEST(s, 1.0, threshold=5.0)``.
        epsilon: the target ε (> 0); the other arguments as in :func:`epsilon`.
    Returns:
        σ as a float.
    Raises:
        EmbgradError: ε unreachable below ``high`` or bad arguments.
    """
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise EmbgradError(f"epsilon must be > 0, got {epsilon!r}.")

    def eps(s: float) -> float:
        return _epsilon_of(make(s), sample_rate=sample_rate, steps=steps, delta=delta,
                           accountant=accountant)

    if eps(high) > epsilon:
        raise EmbgradError(f"ε={epsilon} needs a noise multiplier above {high} for {steps} steps at "
                           f"sampling rate {sample_rate}; take fewer steps or a smaller rate.")
    lo, hi = low, high
    if eps(lo) <= epsilon:
        return lo
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if eps(mid) <= epsilon else (mid, hi)
    return hi
