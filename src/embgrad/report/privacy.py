"""The demo report's differential-privacy section: per-example norms → clipping → noise → ε,
on one training batch of the demo model, with :mod:`embgrad.privacy` (DP-AdaFEST) and
dp-accounting. Framework-neutral: everything goes through ``RowGrad`` / ``ExampleGrads``.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..demo.data import SentimentData
from ..demo.models import Trained
from .analysis import PerExampleInfo, capture_layer

__all__ = ["PrivacyInfo", "privacy_info", "TARGET_EPSILON"]

TARGET_EPSILON = 3.0


@dataclass(frozen=True, eq=False)
class PrivacyInfo:
    """One DP-AdaFEST step on a demo training batch, and what training privately would cost.

    ``max_norm`` C (the per-example section's clipping norm), ``clipped`` examples scaled down;
    ``noise_multiplier`` σ chosen so that ``epochs`` epochs of Poisson-sampled batches
    (``sample_rate`` = batch / dataset) spend ``target_epsilon`` at ``delta`` = 1/N (None when
    dp-accounting is not installed: then σ = 1 and ``epsilon`` is None); ``epsilon`` /
    ``epsilon_pld`` what dp-accounting's RDP / PLD accountants say for that σ. The step:
    ``touched`` rows looked up by the batch, ``selected`` rows kept by the noisy-count threshold
    ``threshold`` (of which ``false_positives`` nobody looked up), the clipped sum's norm
    ``signal_norm`` and its noise's norm ``noise_norm`` on the selected rows; ``dense_entries``
    the V·D Gaussians dense DP-SGD would draw instead of ``sparse_entries``.
    """

    batch_size: int
    dataset_size: int
    num_rows: int
    dim: int
    max_norm: float
    clipped: int
    epochs: int
    sample_rate: float
    delta: float
    target_epsilon: float | None
    noise_multiplier: float
    selection_noise_std: float
    gradient_noise_std: float
    threshold: float
    epsilon: float | None
    epsilon_pld: float | None
    touched: int
    selected: int
    false_positives: int
    signal_norm: float
    noise_norm: float
    dense_entries: int
    sparse_entries: int
    missing: str | None = None

    def __repr__(self) -> str:
        eps = "ε not computed" if self.epsilon is None else f"ε={self.epsilon:.2f}"
        return (f"PrivacyInfo(σ={self.noise_multiplier:.3g}, C={self.max_norm:.3g}, {eps}, "
                f"selected={self.selected} of {self.num_rows})")


def privacy_info(trained: Trained, batch: SentimentData, per_example: PerExampleInfo, dataset_size: int,
                 epochs: int, *, seed: int = 0, target_epsilon: float = TARGET_EPSILON) -> PrivacyInfo:
    """The privacy section for ``batch`` (the batch of the per-example section, clipped at its
    ``max_norm``): DP-AdaFEST (Ghazi et al. 2023, arXiv 2311.08357) with σ from
    :func:`embgrad.privacy.noise_multiplier_for` for ``target_epsilon`` over ``epochs`` epochs,
    δ = 1/``dataset_size``, the threshold at 3 selection-noise standard deviations."""
    from .. import privacy

    g = capture_layer(trained, trained.tensor(batch.ids), batch.labels)
    pe = g.per_example()
    C = float(per_example.max_norm)
    B, N = len(batch), int(dataset_size)
    q, delta = B / N, 1.0 / N
    steps = int(epochs) * math.ceil(N / B)
    missing = None
    if importlib.util.find_spec("dp_accounting") is None:
        missing = 'dp-accounting is not installed: pip install "embgrad[privacy]" for ε'

    def make(s: float, tau: float = 0.0) -> Any:
        return privacy.DPAdaFEST(noise_multiplier=s, max_grad_norm=C, threshold=tau)

    if missing is None:
        sigma = privacy.noise_multiplier_for(make, epsilon=target_epsilon, sample_rate=q, steps=steps, delta=delta)
    else:
        sigma = 1.0
    mech = make(sigma)
    mech = make(sigma, 3.0 * mech.selection_noise_std)       # τ does not change ε
    eps = eps_pld = None
    if missing is None:
        eps = privacy.epsilon(mech, sample_rate=q, steps=steps, delta=delta)
        eps_pld = privacy.epsilon(mech, sample_rate=q, steps=steps, delta=delta, accountant="pld")
    clipped_sum = pe.clip(C).sum()
    counts = privacy.contribution_counts(pe)
    rng = np.random.default_rng(seed)
    sel = mech.select(counts, rng)
    noised = privacy.noise_rows(clipped_sum, sel, mech.gradient_noise_std, rng)
    rows_s, vals_s = clipped_sum.numpy()
    rows_n, vals_n = noised.numpy()
    signal = np.zeros(vals_n.shape, dtype=np.float64)      # the clipped sum on the selected rows
    kept = np.isin(rows_s, rows_n)
    signal[np.searchsorted(rows_n, rows_s[kept])] = vals_s[kept]
    return PrivacyInfo(
        batch_size=B, dataset_size=N, num_rows=g.num_rows, dim=g.dim, max_norm=C,
        clipped=int((per_example.norms > C).sum()), epochs=int(epochs), sample_rate=q, delta=delta,
        target_epsilon=None if missing else target_epsilon, noise_multiplier=float(sigma),
        selection_noise_std=float(mech.selection_noise_std), gradient_noise_std=float(mech.gradient_noise_std),
        threshold=float(mech.threshold), epsilon=eps, epsilon_pld=eps_pld, touched=len(rows_s),
        selected=len(rows_n), false_positives=int(sel.false_positives),
        signal_norm=float(np.linalg.norm(vals_s.astype(np.float64))),
        noise_norm=float(np.linalg.norm(vals_n.astype(np.float64) - signal)),
        dense_entries=g.num_rows * g.dim, sparse_entries=len(rows_n) * g.dim, missing=missing)
