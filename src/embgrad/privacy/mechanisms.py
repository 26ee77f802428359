"""The three DP training mechanisms for embedding tables as small immutable configurations.

``DPSGD`` (dense noise), ``DPFEST`` (fixed rows), ``DPAdaFEST`` (rows selected privately every
step): each knows its noise multipliers and standard deviations, and :meth:`privatize` turns a
clipped, summed :class:`~embgrad.RowGrad` into the noised gradient. Accounting for all three:
:mod:`embgrad.privacy.accounting`. Source: Ghazi et al., arXiv 2311.08357 (NeurIPS 2023);
DP-SGD: Abadi et al. 2016 (Opacus's ``noise_multiplier`` and ``max_grad_norm`` mean the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import EmbgradError
from ..sparse import RowGrad
from .noise import (
    RowSelection,
    _check_nonneg,
    _check_pos,
    dense_noise,
    make_rng,
    noise_rows,
    select_rows,
    split_noise_multiplier,
)

__all__ = ["DPFEST", "DPSGD", "DPAdaFEST"]


class _FullGradientNoise:
    """Shared by DPSGD and DPFEST: the whole σ goes to the gradient, N(0, (σC)²) per entry."""

    noise_multiplier: float
    max_grad_norm: float

    @property
    def gradient_noise_multiplier(self) -> float:
        return float(self.noise_multiplier)

    @property
    def gradient_noise_std(self) -> float:
        """σ·C, the std of the noise on each gradient entry (the clipped SUM's units)."""
        return float(self.noise_multiplier * self.max_grad_norm)

    def step_noise_multipliers(self) -> list[float]:
        """The Gaussian mechanisms (noise multipliers) every step runs on the sampled batch."""
        return [self.gradient_noise_multiplier]


@dataclass(frozen=True)
class DPSGD(_FullGradientNoise):
    """Dense DP-SGD: N(0, (σC)²) on all V·D entries every step.

    ``noise_multiplier`` σ (Opacus's ``noise_multiplier``), ``max_grad_norm`` C (the per-example
    clipping norm of the whole model's gradient, Opacus's ``max_grad_norm``).

    Raises:
        EmbgradError: ``noise_multiplier`` negative or not finite; ``max_grad_norm`` not > 0.
    """

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        _check_nonneg(self.noise_multiplier, "noise_multiplier")
        _check_pos(self.max_grad_norm, "max_grad_norm")

    def privatize(self, grad: RowGrad, rng: Any = None) -> Any:
        """The dense (V, D) noised gradient (a framework tensor): ``grad`` + N(0, (σC)²) everywhere.

        Raises:
            EmbgradError: ``rng`` is not None, an int or a ``numpy.random.Generator``.
        """
        return dense_noise(grad, self.gradient_noise_std, rng)


@dataclass(frozen=True)
class DPFEST(_FullGradientNoise):
    """DP-FEST: only a fixed set of rows is updated and noised (N(0, (σC)²) on each entry).

    ``selection_noise_multiplier``: None when the rows were chosen from public counts (no privacy
    cost); else σ_topk of the one-off Gaussian on the training data's counts
    (:func:`~embgrad.privacy.top_k_rows` with ``noise_std = σ_topk · contribution_bound``),
    charged once by the accountant.

    Raises:
        EmbgradError: ``noise_multiplier`` negative or not finite; ``max_grad_norm`` or a given
            ``selection_noise_multiplier`` not > 0.
    """

    noise_multiplier: float
    max_grad_norm: float
    selection_noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        _check_nonneg(self.noise_multiplier, "noise_multiplier")
        _check_pos(self.max_grad_norm, "max_grad_norm")
        if self.selection_noise_multiplier is not None:
            _check_pos(self.selection_noise_multiplier, "selection_noise_multiplier")

    def privatize(self, grad: RowGrad, selection: RowSelection | Any, rng: Any = None) -> RowGrad:
        """``grad`` on the fixed rows only, plus N(0, (σC)²) on each of their entries.

        ``selection``: the :class:`~embgrad.privacy.RowSelection` of :func:`~embgrad.privacy.top_k_rows`
        or a sorted unique int64 (S,) tensor. Returns a :class:`~embgrad.RowGrad` (S, D).

        Raises:
            EmbgradError: a selection of another table; ``rng`` of another type.
        """
        return noise_rows(grad, selection, self.gradient_noise_std, rng)


@dataclass(frozen=True)
class DPAdaFEST:
    """DP-AdaFEST: per step, rows are selected by thresholding noisy contribution counts, and
    the gradient noise goes only on the selected rows.

    Args:
        noise_multiplier: σ of the one Gaussian mechanism the step is equivalent to (what the
            accountant, Opacus's included, is given).
        max_grad_norm: C, the per-example clipping norm of the whole model's gradient.
        threshold: τ, in count units: a row is kept when its noisy count is ≥ τ.
        selection_fraction: share of each step's privacy cost spent on selection (0 < f < 1).
        contribution_bound: C1, the L2 bound of one example's 0/1 row-contribution vector.
        num_tables: tables with their own selection in the model (the selection budget is
            shared between them).

    Raises:
        EmbgradError: ``noise_multiplier``, ``max_grad_norm`` or ``contribution_bound`` not > 0;
            ``threshold`` negative; ``selection_fraction`` outside (0, 1); ``num_tables`` < 1.
    """

    noise_multiplier: float
    max_grad_norm: float
    threshold: float
    selection_fraction: float = 0.5
    contribution_bound: float = 1.0
    num_tables: int = 1

    def __post_init__(self) -> None:
        _check_pos(self.noise_multiplier, "noise_multiplier")
        _check_pos(self.max_grad_norm, "max_grad_norm")
        _check_nonneg(self.threshold, "threshold")
        _check_pos(self.contribution_bound, "contribution_bound")
        split_noise_multiplier(self.noise_multiplier, self.selection_fraction, self.num_tables)

    @property
    def selection_noise_multiplier(self) -> float:
        """σ_sel = σ·√(num_tables/f): the noise on each table's counts, in units of C1."""
        return split_noise_multiplier(self.noise_multiplier, self.selection_fraction, self.num_tables)[0]

    @property
    def gradient_noise_multiplier(self) -> float:
        """σ_grad = σ/√(1−f): the noise on the selected rows' gradient, in units of C."""
        return split_noise_multiplier(self.noise_multiplier, self.selection_fraction, self.num_tables)[1]

    @property
    def selection_noise_std(self) -> float:
        return self.selection_noise_multiplier * float(self.contribution_bound)

    @property
    def gradient_noise_std(self) -> float:
        return self.gradient_noise_multiplier * float(self.max_grad_norm)

    def step_noise_multipliers(self) -> list[float]:
        return [self.selection_noise_multiplier] * int(self.num_tables) + [self.gradient_noise_multiplier]

    def select(self, counts: RowGrad, rng: Any = None) -> RowSelection:
        """:func:`~embgrad.privacy.select_rows` with this mechanism's threshold and noise.

        Raises:
            EmbgradError: ``counts`` is not an (R, 1) :class:`~embgrad.RowGrad`; ``rng`` of another type.
        """
        return select_rows(counts, self.threshold, self.selection_noise_std, rng)

    def privatize(self, grad: RowGrad, counts: RowGrad, rng: Any = None) -> RowGrad:
        """Select rows from ``counts`` (:func:`~embgrad.privacy.contribution_counts`, summed over
        the batch and ranks), then ``grad`` on those rows plus N(0, (σ_grad·C)²) on each entry.
        Returns a :class:`~embgrad.RowGrad` on the selected rows, (S, D).

        Raises:
            EmbgradError: ``counts`` is not an (R, 1) :class:`~embgrad.RowGrad` of a table of
                ``grad``'s size; ``rng`` of another type.
        """
        if not isinstance(counts, RowGrad):
            raise EmbgradError("DPAdaFEST.privatize needs counts= from contribution_counts().")
        if counts.num_rows != grad.num_rows:
            raise EmbgradError(f"counts are of a table of {counts.num_rows} rows, the gradient of "
                               f"{grad.num_rows}.")
        g = make_rng(rng)   # one stream: an int seed must not restart it for the gradient noise
        return noise_rows(grad, self.select(counts, g), self.gradient_noise_std, g)
