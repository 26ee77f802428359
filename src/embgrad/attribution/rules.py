"""Quadrature rules on [0, 1] for integrated gradients: :func:`quadrature` (nodes and weights
of an n-point rule) and :func:`refine` (one nested refinement, for ``steps="auto"``)."""
from __future__ import annotations

import numpy as np

from ..errors import EmbgradError, closest_names

__all__ = ["RULES", "quadrature", "refine"]

RULES = ("gauss_legendre", "trapezoid", "left", "right", "middle")
# steps="auto": the nested rule used for each rule, and its first number of points
_NESTED = {"gauss_legendre": "trapezoid", "trapezoid": "trapezoid", "left": "left", "right": "right",
           "middle": "middle"}
_AUTO_START = {"trapezoid": 9, "left": 8, "right": 8, "middle": 9}


def quadrature(rule: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes α (n,) in [0, 1] and weights (n,) summing to 1 of an n-point rule on [0, 1].

    ``gauss_legendre``: exact for polynomials of degree ≤ 2n − 1 (Captum's "gausslegendre");
    ``trapezoid``: α = 0, 1/(n−1), ..., 1 with halved end weights (n ≥ 2; Captum's
    "riemann_trapezoid" weights sum to (n−1)/n instead of 1); ``left``/``right``/``middle``:
    Riemann sums with n equal steps (as Captum's riemann_left/right/middle).

    Raises:
        EmbgradError: an unknown ``rule`` (the closest names are given), or ``n`` not an int
            ≥ 1 (≥ 2 for the trapezoid rule).
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

    Raises:
        EmbgradError: ``rule`` has no nested refinement (``gauss_legendre``).
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
