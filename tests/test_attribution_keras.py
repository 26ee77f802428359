"""embgrad.attribute / jacobian / hotflip on a small Keras text classifier (TensorFlow backend),
against hand-written tf.GradientTape computations."""
from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("these tests run Keras on the TensorFlow backend", allow_module_level=True)

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402
from embgrad.attribution import quadrature  # noqa: E402

V, D, C = 30, 8, 3
IDS = np.array([[4, 9, 3, 17, 0, 0], [2, 23, 8, 8, 21, 5], [11, 6, 0, 0, 0, 0]], dtype=np.int32)
MASK = IDS != 0


class TextClassifier(keras.Model):
    """ids (B, T) -> logits (B, C): Embedding(mask_zero) -> tanh Dense per token -> masked mean
    -> Dense. ``head(e, ids)`` is the same map from the looked-up vectors."""

    def __init__(self):
        super().__init__()
        init = keras.initializers.RandomNormal(stddev=1.0, seed=0)
        self.emb = keras.layers.Embedding(V, D, mask_zero=True, embeddings_initializer=init, name="tokens")
        self.mix = keras.layers.Dense(D, activation="tanh", kernel_initializer=keras.initializers.GlorotNormal(1))
        self.out = keras.layers.Dense(C, kernel_initializer=keras.initializers.GlorotNormal(2))

    def head(self, e, ids):
        m = tf.cast(tf.not_equal(ids, 0), e.dtype)[..., None]
        h = self.mix(e) * m
        return self.out(tf.reduce_sum(h, 1) / tf.reduce_sum(m, 1))

    def call(self, ids):
        return self.head(self.emb(ids), ids)


@pytest.fixture(scope="module")
def model():
    m = TextClassifier()
    m(IDS)
    return m


def tape_grad(model, e, target):
    """Hand-written: d logits[b, target[b]] / d e with a GradientTape."""
    e = tf.convert_to_tensor(e)
    with tf.GradientTape() as tape:
        tape.watch(e)
        y = tf.gather(model.head(e, tf.constant(np.resize(IDS, (e.shape[0], IDS.shape[1])))), target, batch_dims=1)
    return tape.gradient(y, e).numpy()


def test_saliency_grad_x_input_match_tape(model):
    target = np.array([0, 2, 1])
    e = model.emb(IDS).numpy()
    g = tape_grad(model, e, target) * MASK[..., None]
    sal = embgrad.attribute(model, IDS, target, method="saliency")
    gxi = embgrad.attribute(model, tf.constant(IDS), list(target), method="grad_x_input")
    assert sal.layer == "tokens"
    np.testing.assert_allclose(sal.scores, np.linalg.norm(g, axis=-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gxi.scores, (g * e).sum(-1), rtol=1e-5, atol=1e-6)
    assert isinstance(gxi.attributions, tf.Tensor) and tuple(gxi.attributions.shape) == (3, 6, D)
    assert (sal.scores[~MASK] == 0).all()                  # mask_zero padding scores 0


@pytest.mark.parametrize("rule", ["gauss_legendre", "trapezoid"])
def test_integrated_gradients_match_tape(model, rule):
    target = np.array([1, 1, 2])
    e = model.emb(IDS).numpy()
    base = model.emb(np.full_like(IDS, 7)).numpy()
    nodes, w = quadrature(rule, 6)
    total = sum(wi * tape_grad(model, (base + a * (e - base)).astype(np.float32), target) for a, wi in zip(nodes, w))
    ref = ((e - base) * total).sum(-1) * MASK
    attr = embgrad.attribute(model, IDS, target, baseline=7, steps=6, rule=rule, batch_size=5)
    np.testing.assert_allclose(attr.scores, ref, rtol=1e-4, atol=1e-6)
    f = lambda x: tf.gather(model.head(tf.constant(x), IDS), target, batch_dims=1).numpy()
    np.testing.assert_allclose(attr.delta, attr.scores.sum(1) - (f(e) - f(base)), atol=1e-5)
    auto = embgrad.attribute(model, IDS, target, steps="auto", tolerance=1e-3, max_steps=129)
    assert auto.converged.all() and np.abs(auto.delta).max() <= 1e-3 * np.abs(auto.outputs - auto.baseline_outputs).max()


def test_smoothgrad_matches_tape_loop(model):
    e = model.emb(IDS).numpy()
    attr = embgrad.attribute(model, IDS, 0, method="smoothgrad", steps=3, noise=0.3, seed=5)
    table = model.emb.embeddings.numpy()
    sigma = 0.3 * np.median(np.linalg.norm(table, axis=1)) / np.sqrt(D)
    rng = np.random.default_rng(5)
    eps = rng.standard_normal((9, 6, D), dtype=np.float32) * np.float32(sigma)    # example-major
    noisy = np.repeat(e, 3, axis=0) + eps
    ids3 = np.repeat(IDS, 3, axis=0)
    x = tf.constant(noisy)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(model.head(x, ids3)[:, 0])
    g = tape.gradient(y, x).numpy().reshape(3, 3, 6, D).mean(1)
    np.testing.assert_allclose(attr.scores, (g * e).sum(-1) * MASK, rtol=1e-4, atol=1e-6)


def test_jacobian_and_hotflip_match_tape(model):
    e = tf.constant(model.emb(IDS).numpy())
    with tf.GradientTape() as tape:
        tape.watch(e)
        y = model.head(e, IDS)
    jac = tape.batch_jacobian(y, e).numpy()                 # (B, C, T, D)
    ours = embgrad.jacobian(model, IDS)
    np.testing.assert_allclose(ours.numpy(), jac.transpose(1, 0, 2, 3), rtol=1e-5, atol=1e-6)
    flips = embgrad.hotflip(model, IDS, 1, k=4, verify=True)
    g, en = jac[:, 1], e.numpy()
    table = model.emb.embeddings.numpy()
    pred = np.einsum("btd,vd->btv", g, table) - (g * en).sum(-1)[..., None]
    for b in range(3):
        for p, old, new, predicted, actual in flips.swaps(b):
            assert MASK[b, p] and old == IDS[b, p] and new not in (0, old)
            np.testing.assert_allclose(predicted, pred[b, p, new], rtol=1e-4, atol=1e-6)
            swapped = IDS[b:b + 1].copy()
            swapped[0, p] = new
            np.testing.assert_allclose(actual, model(swapped).numpy()[0, 1] - model(IDS[b:b + 1]).numpy()[0, 1],
                                       rtol=1e-4, atol=1e-5)
        allowed = pred[b].copy()
        allowed[~MASK[b]] = np.inf
        allowed[:, 0] = np.inf
        allowed[np.arange(6), IDS[b]] = np.inf
        best = np.sort(allowed.ravel())[:4]
        np.testing.assert_allclose(flips.predicted[b], best, rtol=1e-4, atol=1e-6)


def test_model_untouched_and_errors(model):
    weights = [w.numpy().copy() for w in model.weights]
    trainable = [l.trainable for l in model._flatten_layers()]
    embgrad.attribute(model, IDS, 0, steps=4)
    embgrad.attribute(model, IDS, 0, method="smoothgrad", steps=2)
    for w, before in zip(model.weights, weights):
        np.testing.assert_array_equal(w.numpy(), before)
    assert [l.trainable for l in model._flatten_layers()] == trainable
    assert "call" not in model.emb.__dict__                 # the tap's shadow is gone
    with pytest.raises(EmbgradError, match="out of range.*3 outputs"):
        embgrad.attribute(model, IDS, 5, method="saliency")
    with pytest.raises(EmbgradError, match="no embedding layer named 'token'"):
        embgrad.attribute(model, IDS, 0, layer="token")
    with pytest.raises(EmbgradError, match="out of range for a table"):
        embgrad.attribute(model, IDS + 40, 0, method="saliency")
    # composite modules and several layers in one call: PyTorch only for now, said plainly
    with pytest.raises(EmbgradError, match=r"no embedding layer named 'dense'.*tokens.*composite module.*PyTorch only"):
        embgrad.attribute(model, IDS, 0, layer="dense")
    with pytest.raises(EmbgradError, match="several layers in one call is implemented for PyTorch only"):
        embgrad.attribute(model, IDS, 0, layer=["tokens", "tokens"])


def test_several_inputs_follow_keras_calling_convention():
    """The README's [tokens, price] model: a list of inputs is ONE structured input, model(inputs),
    for attribute and hotflip; a dict of named inputs too. Checked against a GradientTape."""
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    price = keras.Input((1,), name="price")
    emb = keras.layers.Embedding(40, 6, name="words", embeddings_initializer=keras.initializers.RandomNormal(seed=3))
    x = keras.layers.GlobalAveragePooling1D()(emb(tokens))
    out = keras.layers.Dense(2, kernel_initializer=keras.initializers.GlorotNormal(4))(
        keras.layers.Concatenate()([x, price]))
    m = keras.Model([tokens, price], out)
    ids = np.array([[3, 7, 9, 1, 2], [5, 5, 8, 30, 12]], dtype=np.int32)
    p = np.array([[0.5], [-2.0]], dtype=np.float32)

    e = emb(ids)
    with tf.GradientTape() as tape:        # the same model from the looked-up vectors
        tape.watch(e)
        y = m.layers[-1](keras.layers.Concatenate()([tf.reduce_mean(e, 1), p]))[:, 1]
    g = tape.gradient(y, e).numpy()
    a = embgrad.attribute(m, [ids, p], 1, method="grad_x_input")
    np.testing.assert_allclose(a.scores, (g * e.numpy()).sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.outputs, m([ids, p]).numpy()[:, 1], rtol=1e-6)
    named = keras.Model({"tokens": tokens, "price": price}, out)
    d = embgrad.attribute(named, {"tokens": ids, "price": p}, 1, method="grad_x_input")
    np.testing.assert_allclose(d.scores, a.scores, rtol=1e-6, atol=1e-7)
    flips = embgrad.hotflip(m, [ids, p], 1, k=1, verify=True)
    assert flips.actual is not None and np.isfinite(flips.actual).all()
