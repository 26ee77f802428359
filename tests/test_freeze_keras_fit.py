"""Issue 12 item 4 (Keras): rows frozen with ``embgrad.table(model).freeze`` stay bit-identical
through ``fit`` whether they were frozen before the first ``fit`` or after it (when ``fit`` has
already compiled its train step), with Adam, AdamW (decoupled weight decay), SGD with momentum and
RMSprop, and through an eager custom loop; the other rows train; unfreezing after ``fit`` lets
them move again."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad

V, D, T = 12, 3, 4
FROZEN = [2, 3]
X = np.random.default_rng(0).integers(0, V, (16, T))
X[:, 0] = 2                                   # the frozen rows are looked up by every example
X[:, 1] = 3
Y = np.random.default_rng(1).integers(0, 2, 16)
OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.1),
    "adamw": lambda: keras.optimizers.AdamW(0.1, weight_decay=0.05),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.1),
}


def _model(opt):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((T,), dtype="int32"), keras.layers.Embedding(V, D, name="e"),
                          keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    m.compile(optimizer=OPTIMIZERS[opt](), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def _fit(m, epochs):
    m.fit(X, Y, epochs=epochs, batch_size=8, verbose=0, shuffle=False)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("when", ["before_fit", "after_fit"])
def test_frozen_rows_bit_identical_through_fit(opt, when):
    m = _model(opt)
    t = embgrad.table(m)
    if when == "after_fit":
        _fit(m, 1)                            # fit has compiled its train step
    t.freeze(FROZEN)
    frozen_before, table_before = t.read(FROZEN), t.numpy()
    _fit(m, 3)                                # 6 steps
    np.testing.assert_array_equal(t.read(FROZEN), frozen_before)
    others = np.setdiff1d(np.unique(X), FROZEN)
    assert np.abs(t.numpy()[others] - table_before[others]).min() > 0     # the rest trains
    t.unfreeze()
    _fit(m, 1)
    assert np.abs(t.read(FROZEN) - frozen_before).max() > 0              # and moves again


def test_frozen_rows_bit_identical_in_an_eager_loop_frozen_mid_training():
    m = _model("adamw")
    opt = keras.optimizers.AdamW(0.1, weight_decay=0.05)
    t = embgrad.table(m)

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(Y, m(X), from_logits=True))
        opt.apply(tape.gradient(loss, m.trainable_variables), m.trainable_variables)

    step()
    t.freeze(FROZEN)
    before = t.read(FROZEN)
    for _ in range(5):
        step()
    np.testing.assert_array_equal(t.read(FROZEN), before)
