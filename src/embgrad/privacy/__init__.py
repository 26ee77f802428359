"""Differential privacy for models with embedding tables.

Framework-neutral core (over :class:`~embgrad.RowGrad`): sparsity-preserving noise — DP-FEST and
DP-AdaFEST (Ghazi et al., NeurIPS 2023, arXiv 2311.08357) — and dense DP-SGD noise, with
accounting by Google's dp-accounting. PyTorch: :func:`register_opacus` puts embgrad's samplers
for ``nn.Embedding`` / ``nn.EmbeddingBag`` under Opacus. Importing this module imports no
framework and not dp-accounting.
"""
from __future__ import annotations

from .accounting import dp_event, epsilon, equivalent_noise_multiplier
from .mechanisms import DPFEST, DPSGD, DPAdaFEST
from .noise import (
    RowSelection,
    contribution_counts,
    dense_noise,
    false_positive_probability,
    gaussian_noise,
    noise_rows,
    select_rows,
    split_noise_multiplier,
    top_k_rows,
)

__all__ = [
    "DPFEST", "DPSGD", "DPAdaFEST", "RowSelection",
    "contribution_counts", "dense_noise", "dp_event", "epsilon", "equivalent_noise_multiplier",
    "false_positive_probability", "gaussian_noise", "noise_rows", "select_rows",
    "split_noise_multiplier", "top_k_rows",
]
