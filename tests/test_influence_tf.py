"""embgrad.influence on Keras 3 / TensorFlow, fed by a tf.data.Dataset: exact TracInCP scores equal
inner products of per-example gradients from one tf.GradientTape per example (the reference), and
projected rows equal the documented matrix applied to them."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad.influence as inf
from embgrad.demo import demo_data
from embgrad.demo.models import keras_classifier

N, Q = 24, 4


def loss_fn(model, batch):
    x, y = batch
    per = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
    return tf.reduce_sum(per)


def dense_grads(model, ids, labels):
    """(n, V·D) float64: one tape per example, the table's gradient densified."""
    table = model.get_layer("embedding").embeddings
    out = []
    for x, y in zip(ids, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(model, (tf.constant(x[None]), tf.constant(y[None])))
        g = tape.gradient(loss, table)
        out.append(tf.convert_to_tensor(g).numpy().reshape(-1).astype(np.float64))
    return np.stack(out)


def test_keras_tf_data_exact_and_projected_match_per_example_tapes():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("Keras runs on another backend here")
    data = demo_data(seed=0, n_train=200, n_test=20)
    models = [keras_classifier(len(data.vocab), dim=8, seed=s) for s in (0, 1)]
    ids, labels = data.train.ids[:N].astype(np.int32), data.train.labels[:N]
    ds = tf.data.Dataset.from_tensor_slices((ids, labels)).batch(10)          # 3 batches, the last short
    q_ds = tf.data.Dataset.from_tensor_slices((data.test.ids[:Q].astype(np.int32), data.test.labels[:Q])).batch(Q)
    ckpts = [inf.Checkpoint(models[0], 0.5), inf.Checkpoint(models[1], 2.0)]
    exact = inf.collect(ckpts, ds, loss_fn, mode="exact", progress=False)
    q = inf.collect(ckpts, q_ds, loss_fn, like=exact, progress=False)
    G = [dense_grads(m, ids, labels) for m in models]
    H = [dense_grads(m, data.test.ids[:Q].astype(np.int32), data.test.labels[:Q]) for m in models]
    ref = 0.5 * H[0] @ G[0].T + 2.0 * H[1] @ G[1].T
    np.testing.assert_allclose(exact.scores(q), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(exact.self_influence(), 0.5 * (G[0] ** 2).sum(1) + 2.0 * (G[1] ** 2).sum(1), rtol=1e-4)
    proj = inf.collect(ckpts, ds, loss_fn, k=64, dtype="float32", progress=False)
    V, D = models[0].get_layer("embedding").embeddings.shape
    P = inf.Projection(64).matrix(0, V, D).astype(np.float64)
    want = np.concatenate([np.sqrt(0.5) * G[0] @ P.T, np.sqrt(2.0) * G[1] @ P.T], 1)
    np.testing.assert_allclose(proj.vectors(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
