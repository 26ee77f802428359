"""Keras 3 DP-SGD (embgrad.privacy.make_private_keras) on TensorFlow: one compiled ``fit`` step
with noise 0 equals a per-example GradientTape loop (clip each example's whole-model gradient,
sum, divide by the batch); the noise has the right standard deviation; DP-AdaFEST updates only
selected rows; ε from dp-accounting."""
from __future__ import annotations

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad
from embgrad import privacy

T, B = 5, 8
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def _model(V=30, D=4):
    keras.utils.set_random_seed(0)
    ids = keras.Input((T,), dtype="int32", name="ids")
    cat = keras.Input((1,), dtype="int32", name="cat")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(V, D, name="tok")(ids))
    c = keras.layers.Flatten()(keras.layers.Embedding(7, 3, name="cat_emb")(cat))
    h = keras.layers.Dense(6, activation="tanh")(keras.layers.Concatenate()([h, c]))
    return keras.Model([ids, cat], keras.layers.Dense(3)(h))


def _data(V=30, n=B, seed=0):
    g = np.random.default_rng(seed)
    ids = g.integers(0, V, (n, T)).astype("int32")
    ids[0, :3] = 4
    cat = g.integers(0, 7, (n, 1)).astype("int32")
    return [ids, cat], (np.arange(n) % 3).astype("int32")


def _loop_update(model, x, y, C):
    """Reference: per-example tape gradients of the whole model, clipped Opacus's way, summed,
    divided by the batch; SGD with lr 1."""
    ws = [w.numpy() for w in model.trainable_variables]
    tot = [np.zeros_like(w) for w in ws]
    for b in range(len(y)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(LOSS(y[b:b + 1], model([x[0][b:b + 1], x[1][b:b + 1]], training=True)))
        gs = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, model.trainable_variables)]
        n = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in gs))
        f = min(1.0, C / (n + 1e-6))
        tot = [t + f * g for t, g in zip(tot, gs)]
    return [w - t / len(y) for w, t in zip(ws, tot)]


@pytest.mark.parametrize("C", [0.05, 100.0])
def test_fit_step_with_no_noise_equals_the_per_example_loop(C):
    model = _model()
    x, y = _data()
    want = _loop_update(model, x, y, C)
    dp = privacy.make_private_keras(model, loss=LOSS, mechanism=privacy.DPSGD(0.0, C), seed=0)
    dp.compile(keras.optimizers.SGD(1.0))
    hist = dp.fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    for w, v in zip(model.trainable_variables, want):
        np.testing.assert_allclose(w.numpy(), v, atol=2e-7, rtol=1e-5)
    assert hist.history["max_norm"][0] > 0


def test_dense_noise_has_the_right_std():
    V, C, sigma = 3000, 0.5, 0.8
    model = _model(V=V, D=8)
    x, y = _data(V=V)
    dp0 = privacy.make_private_keras(model, loss=LOSS, mechanism=privacy.DPSGD(0.0, C), seed=0)
    w0 = [w.numpy() for w in model.trainable_variables]
    dp0.compile(keras.optimizers.SGD(1.0))
    dp0.fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    clean = model.get_layer("tok").embeddings.numpy()
    for w, v in zip(model.trainable_variables, w0):
        w.assign(v)
    dp = privacy.make_private_keras(model, loss=LOSS, mechanism=privacy.DPSGD(sigma, C), seed=1)
    dp.compile(keras.optimizers.SGD(1.0))
    dp.fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    noise = (clean - model.get_layer("tok").embeddings.numpy()) * B      # N(0, (σC)²) per entry
    n, std = noise.size, sigma * C
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)


def test_adafest_updates_only_selected_rows():
    V, C = 500, 0.5
    model = _model(V=V)
    x, y = _data(V=V)
    before = model.get_layer("tok").embeddings.numpy()
    dense_before = model.layers[-1].kernel.numpy()
    # a threshold no count reaches (noise std 1.41): no table row changes; other weights do
    m = privacy.DPAdaFEST(noise_multiplier=1.0, max_grad_norm=C, threshold=1e3, selection_fraction=0.5,
                          num_tables=2)
    dp = privacy.make_private_keras(model, loss=LOSS, mechanism=m, seed=0)
    dp.compile(keras.optimizers.SGD(1.0))
    dp.fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_array_equal(model.get_layer("tok").embeddings.numpy(), before)
    assert not np.array_equal(model.layers[-1].kernel.numpy(), dense_before)
    # a threshold of 0: every touched row passes w.p. >= 1/2 and about half the untouched rows
    m0 = privacy.DPAdaFEST(noise_multiplier=1.0, max_grad_norm=C, threshold=0.0, selection_fraction=0.5,
                           num_tables=2)
    dp = privacy.make_private_keras(model, loss=LOSS, mechanism=m0, seed=0)
    dp.compile(keras.optimizers.SGD(1.0))
    dp.fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    moved = np.any(model.get_layer("tok").embeddings.numpy() != before, axis=1).sum()
    assert abs(moved - V / 2) < 5 * math.sqrt(V / 4) + len(np.unique(x[0]))
    eps = privacy.epsilon(m0, sample_rate=B / 1000, steps=int(dp.optimizer.iterations), delta=1e-3)
    assert 0 < eps < float("inf")


def test_bad_inputs():
    model = _model()
    with pytest.raises(embgrad.EmbgradError, match="reduction=None"):
        privacy.make_private_keras(model, loss=keras.losses.SparseCategoricalCrossentropy(),
                                   mechanism=privacy.DPSGD(1.0, 1.0))
    with pytest.raises(embgrad.EmbgradError, match="num_tables=2"):
        privacy.make_private_keras(model, loss=LOSS, mechanism=privacy.DPAdaFEST(1.0, 1.0, threshold=3.0))
    with pytest.raises(embgrad.EmbgradError, match="DPSGD or DPAdaFEST"):
        privacy.make_private_keras(model, loss=LOSS, mechanism=privacy.DPFEST(1.0, 1.0))
