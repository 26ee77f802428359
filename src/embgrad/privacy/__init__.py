"""Differential privacy for models with embedding tables.

Framework-neutral core (over :class:`~embgrad.RowGrad`): sparsity-preserving noise — DP-FEST and
DP-AdaFEST (Ghazi et al., NeurIPS 2023, arXiv 2311.08357) — and dense DP-SGD noise, with
accounting by Google's dp-accounting. PyTorch: :func:`register_opacus` puts embgrad's samplers
for ``nn.Embedding`` / ``nn.EmbeddingBag`` under Opacus. Importing this module imports no
framework and not dp-accounting.
"""
from __future__ import annotations

import importlib.util
from typing import Any

from ..errors import EmbgradError
from .accounting import dp_event, epsilon, equivalent_noise_multiplier, noise_multiplier_for
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
    "false_positive_probability", "gaussian_noise", "make_private_keras", "noise_multiplier_for",
    "noise_rows", "register_opacus", "sparse_noise_optimizer",
    "select_rows", "split_noise_multiplier", "top_k_rows",
]


def register_opacus() -> Any:
    """Register embgrad's per-example samplers for ``nn.Embedding`` and ``nn.EmbeddingBag`` in
    Opacus (ghost clipping: norm samplers; hooks mode: grad samplers).

    Use as a context manager around ``PrivacyEngine.make_private(...)`` and training, or call it
    once and ``.remove()`` later; leaving restores Opacus's own samplers. Call it BEFORE
    ``make_private``: it also wraps Opacus's activation hook (each bag's batch size; a refusal of
    keyword ``per_sample_weights``, which Opacus does not capture). Over Opacus's own samplers it
    adds: no gradient for ``padding_idx`` (as torch), EmbeddingBag norms in ghost mode, ``max``
    mode, ``per_sample_weights``, ``include_last_offset``, sparse per-example norms (O(B·T·D)).
    Tied tables (one weight in two modules) are exact in hooks mode (Opacus sums the
    per-example gradients of both uses) and, for one ``nn.Embedding`` tied to one ``nn.Linear``
    (an output projection such as GPT-2's ``lm_head``), in ghost mode: the whole table's
    per-example norm sqrt(||A_b||² + ||L_b||² + 2<A_b, L_b>), the cross term from the lookups'
    output gradients and the projection's inputs and output gradients; other tyings are refused
    in ghost mode with an EmbgradError.

    Returns:
        an ``OpacusRegistration`` (``.remove()``, context manager).
    Raises:
        EmbgradError: torch or opacus not installed.
    Source: Opacus 1.6 ``opacus/grad_sample`` registries (Yousefpour et al. 2021); ghost
    clipping: Li et al. 2022, Bu et al. 2023.
    """
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("opacus") is None:
        raise EmbgradError("register_opacus() needs torch and opacus (pip install opacus==1.6.0).")
    from ..backends.torch_opacus import register_opacus as _register

    return _register()


def make_private_keras(model: Any, *, loss: Any, mechanism: Any, seed: int | None = None) -> Any:
    """A Keras 3 (TensorFlow backend) model that ``fit`` trains with DP-SGD.

    ``train_step`` (compiled by ``fit``): every example's whole-model gradient is clipped to
    ``mechanism.max_grad_norm`` (tables by embgrad's sparse per-example norms, other weights by
    ``tf.vectorized_map``), summed, noised — :class:`DPSGD`: N(0, (σC)²) on every entry, tables
    densified; :class:`DPAdaFEST`: noise only on the privately selected rows of each table (the
    other weights get N(0, (σ_grad·C)²)) — divided by the batch size and applied by the
    optimizer given to ``compile``. ``fit`` logs ``loss`` and ``max_norm`` (the batch's largest
    unclipped per-example norm; not private, for debugging). ε: :func:`epsilon` with
    ``sample_rate = batch_size / N`` and ``steps`` = ``optimizer.iterations`` (the Poisson
    accountant, as TF Privacy and Opacus report for shuffled fixed-size batches).

    Args:
        model: a Keras 3 model (TensorFlow backend) with embedding layers or not.
        loss: ``(y_true, y_pred) -> (B,)`` per-example losses, e.g.
            ``keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)``.
        mechanism: :class:`DPSGD` or :class:`DPAdaFEST`.
        seed: seeds the noise (None: fresh OS entropy).
    Returns:
        a ``keras.Model`` wrapping ``model`` (its weights are ``model``'s); compile and fit it.
    Raises:
        EmbgradError: a reducing loss, another mechanism, a tied table.
    Source: Abadi et al. 2016; DP-AdaFEST: Ghazi et al. 2023; TF Privacy's ``DPModel`` is the
    TF ≤ 2.15 equivalent.
    """
    from ..backends.keras_privacy import make_private_keras as _make

    return _make(model, loss=loss, mechanism=mechanism, seed=seed)


def sparse_noise_optimizer(optimizer: Any, mechanism: Any, tables: Any, rows: Any = None,
                           rng: Any = None) -> Any:
    """Opacus's DP optimizer with sparsity-preserving noise on embedding tables (PyTorch).

    Takes the ``DPOptimizer`` that ``PrivacyEngine.make_private`` returned (made with
    ``noise_multiplier = mechanism.noise_multiplier`` and ``max_grad_norm = mechanism.max_grad_norm``,
    inside :func:`register_opacus`) and returns a new optimizer (the given one is left as it was)
    that, at each step, gives each table in ``tables`` DP-AdaFEST noise (rows selected from the
    step's noisy contribution counts, which embgrad's samplers record) or DP-FEST noise (the fixed
    ``rows``), and every other parameter Opacus's Gaussian with σ_grad·C. Opacus's accountant keeps
    charging σ, the equivalent single Gaussian, so ``engine.get_epsilon`` stays right. With
    ``nn.Embedding(..., sparse=True)`` the table's gradient and update stay sparse (use SGD or
    SparseAdam). Use the returned optimizer in the training loop.

    Args:
        optimizer: Opacus ``DPOptimizer`` or ``DPOptimizerFastGradientClipping``.
        mechanism: :class:`DPAdaFEST` (``num_tables`` = len(tables)) or :class:`DPFEST`.
        tables: the ``nn.Embedding``/``nn.EmbeddingBag`` module(s) to noise sparsely.
        rows: DP-FEST only: one :class:`RowSelection` (:func:`top_k_rows`) per table.
        rng: seed or NumPy Generator for the selection and table noise.
    Raises:
        EmbgradError: σ or C differing from the optimizer's, a table not in the optimizer, a
            table looked up more than once per step (DP-AdaFEST counts need one lookup).
    Source: Ghazi et al. 2023 (arXiv 2311.08357); Opacus 1.6 ``DPOptimizer.add_noise``.
    """
    from ..backends.torch_opacus import sparse_noise_optimizer as _make

    return _make(optimizer, mechanism, tables, rows=rows, rng=rng)
