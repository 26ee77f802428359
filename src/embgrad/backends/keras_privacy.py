"""DP-SGD for Keras 3 models on TensorFlow: a ``keras.Model`` whose compiled ``train_step``
clips every example's whole-model gradient and adds Gaussian noise (dense, or sparsity-preserving
DP-AdaFEST on the embedding tables), usable with ``fit``.

Per-example gradient norms: each embedding table's from embgrad's sparse per-example gradients
(one capture of the batch's forward); the other (small) weights' from ``tf.vectorized_map`` of the
per-example gradient (Agarwal et al. 2019's vectorized per-example gradients, as TF Privacy's
``DPModel`` does). The whole-model norm of example b is the root of the sum of squares; example b
is scaled by min(1, C / (norm_b + 1e-6)) (Opacus's factor), the scaled gradients are summed
(tables stay sparse), noise N(0, (σC)²) is added and the sum divided by the batch size.
Source: Abadi et al. 2016 (DP-SGD); DP-AdaFEST: Ghazi et al. 2023 (arXiv 2311.08357).
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from ..capture import capture
from ..errors import EmbgradError
from ..privacy.mechanisms import DPSGD, DPAdaFEST
from ..privacy.noise import contribution_counts, make_rng, noise_rows
from ..sparse import RowGrad
from . import get_backend

__all__ = ["DPKerasModel"]


class DPKerasModel(keras.Model):
    """``inner`` trained with DP-SGD by ``fit``; built by :func:`embgrad.privacy.make_private_keras`."""

    def __init__(self, inner: Any, loss: Any, mechanism: Any, seed: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.inner = inner
        self.per_example_loss = loss
        self.mechanism = mechanism
        self._gen = (tf.random.Generator.from_seed(seed) if seed is not None
                     else tf.random.Generator.from_non_deterministic_state())
        self._np_rng = make_rng(seed)
        infos = get_backend(inner).find_embeddings(inner)
        self._tables = {name: info for name, info in infos.items() if not info.frozen}
        if isinstance(mechanism, DPAdaFEST) and mechanism.num_tables != len(self._tables):
            raise EmbgradError(
                f"the DPAdaFEST mechanism was made for num_tables={mechanism.num_tables}, but the model "
                f"trains {len(self._tables)} tables ({', '.join(self._tables)}); each runs its own "
                f"selection, so pass num_tables={len(self._tables)} (the selection budget is shared).")
        for name, info in self._tables.items():
            if info.tied:
                raise EmbgradError(f"DP training of Keras model: table {name!r} is tied (its weights "
                                   "are used outside its lookups); untie it.")

    def call(self, inputs: Any, training: bool = False) -> Any:
        return self.inner(inputs, training=training)

    # ---------------------------------------------------------------- one DP-SGD step
    def _per_example_losses(self, x: Any, y: Any) -> Any:
        out = self.per_example_loss(y, self.inner(x, training=True))
        if len(out.shape) != 1:
            raise EmbgradError(f"the DP loss must return one loss per example, shape (B,), got "
                               f"{out.shape}; use a Keras loss with reduction=None.")
        return out

    def clipped_sum(self, x: Any, y: Any) -> tuple[list[Any], Any, dict, Any]:
        """The clipped per-example gradients summed: (grads per trainable variable, with
        RowGrads for the tables), the (B,) norms, the tables' ExampleGrads, the losses."""
        C = float(self.mechanism.max_grad_norm)
        table_vars = {id(info.weight): name for name, info in self._tables.items()}
        variables = self.inner.trainable_variables
        others = [v for v in variables if id(v) not in table_vars]
        with capture(self.inner, layers=list(self._tables) or None) as cap:
            losses = self._per_example_losses(x, y)
            loss = tf.reduce_sum(losses)
        grads = cap.gradients(loss, loss_reduction="sum") if self._tables else {}
        per_ex = {name: grads[name].per_example() for name in self._tables}
        sq = tf.zeros_like(losses)
        for pe in per_ex.values():
            sq = sq + tf.cast(tf.square(pe.norms()), sq.dtype)
        other_pe: list[Any] = []
        if others:
            def one(args: Any) -> Any:
                xb, yb = args
                xb = tf.nest.map_structure(lambda t: t[None], xb)
                yb = tf.nest.map_structure(lambda t: t[None], yb)
                with tf.GradientTape() as tape:
                    lb = tf.reduce_sum(self._per_example_losses(xb, yb))
                gs = tape.gradient(lb, others)
                return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                        for v, g in zip(others, gs, strict=True)]
            other_pe = tf.vectorized_map(one, (x, y))
            for g in other_pe:
                sq = sq + tf.cast(tf.reduce_sum(tf.reshape(tf.square(g), (tf.shape(g)[0], -1)), 1), sq.dtype)
        norms = tf.sqrt(sq)
        factor = tf.minimum(1.0, C / (norms + 1e-6))
        out: list[Any] = []
        it = iter(other_pe)
        for v in variables:
            if id(v) in table_vars:
                pe = per_ex[table_vars[id(v)]]
                out.append(pe._scaled(tf.cast(factor, pe.values.dtype)).sum())
            else:
                g = next(it)
                out.append(tf.tensordot(tf.cast(factor, g.dtype), g, 1))
        return out, norms, per_ex, losses

    def train_step(self, data: Any) -> dict:
        x, y = data[0], data[1]
        grads, norms, per_ex, losses = self.clipped_sum(x, y)
        m = self.mechanism
        batch = tf.cast(tf.shape(losses)[0], tf.float32)
        table_vars = {id(info.weight): name for name, info in self._tables.items()}
        final = []
        for v, g in zip(self.inner.trainable_variables, grads, strict=True):
            if isinstance(g, RowGrad):
                if isinstance(m, DPAdaFEST):
                    g = self._adafest(g, per_ex[table_vars[id(v)]], v)
                    final.append(tf.IndexedSlices(g.values / batch, g.rows, tf.shape(v, out_type=tf.int64)))
                    continue
                g = tf.tensor_scatter_nd_add(tf.zeros(v.shape, g.values.dtype),
                                             tf.reshape(g.rows, (-1, 1)), g.values)
            std = m.gradient_noise_std
            if std > 0:
                g = g + self._gen.normal(tf.shape(g), dtype=g.dtype) * std
            final.append(g / tf.cast(batch, g.dtype))
        self.optimizer.apply(final, self.inner.trainable_variables)
        return {"loss": tf.reduce_mean(losses), "max_norm": tf.reduce_max(norms)}

    def _adafest(self, g: RowGrad, pe: Any, v: Any) -> RowGrad:
        """Counts, selection and noise of the core (NumPy selection through tf.py_function)."""
        m = self.mechanism
        counts = contribution_counts(pe, contribution_bound=m.contribution_bound)
        V = int(v.shape[0])

        def select(rows: Any, vals: Any) -> Any:
            c = RowGrad(tf.convert_to_tensor(rows), tf.convert_to_tensor(vals), V)
            return m.select(c, self._np_rng).rows

        sel = tf.reshape(tf.py_function(select, [counts.rows, counts.values], tf.int64), (-1,))
        kept = noise_rows(g, sel, 0.0)
        noise = self._gen.normal(tf.shape(kept.values), dtype=kept.values.dtype) * m.gradient_noise_std
        return RowGrad(kept.rows, kept.values + noise, V)


def make_private_keras(model: Any, *, loss: Any, mechanism: Any, seed: int | None = None) -> DPKerasModel:
    """See :func:`embgrad.privacy.make_private_keras`."""
    if not isinstance(mechanism, (DPSGD, DPAdaFEST)):
        raise EmbgradError(f"make_private_keras: mechanism must be DPSGD or DPAdaFEST, got {mechanism!r}.")
    if isinstance(loss, keras.losses.Loss) and loss.reduction not in (None, "none"):
        raise EmbgradError(f"make_private_keras: the loss must give one value per example: pass "
                           f"{type(loss).__name__}(reduction=None), got reduction={loss.reduction!r}.")
    return DPKerasModel(model, loss, mechanism, seed)
