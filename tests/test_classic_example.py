"""The classic example, in PyTorch and TensorFlow/Keras alike: ids [0, 1, 0, 2] looked up in a
4-row table of ones, output-gradient weights [1, 2, 3, 4], give rows [0, 1, 2] with row norms
proportional to [4, 2, 4] (row 0: 1 + 3, row 1: 2, row 2: 4) and nothing for row 3."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import embgrad

IDS = [[0, 1, 0, 2]]
WEIGHTS = [1.0, 2.0, 3.0, 4.0]
D = 3


def _check(rg, eg):
    rows, values = rg.numpy()
    np.testing.assert_array_equal(rows, [0, 1, 2])                 # nothing for row 3
    norms = rg.row_norms().numpy()
    np.testing.assert_allclose(norms / norms[1], [2.0, 1.0, 2.0])  # ∝ [4, 2, 4]
    np.testing.assert_allclose(values, np.outer([4.0, 2.0, 4.0], np.ones(D)))
    assert rg.num_rows == 4
    np.testing.assert_allclose(rg.to_dense().numpy()[3], 0.0)
    # one example: its per-example gradient is the whole gradient
    ex_rows, ex_values = eg.example(0).numpy()
    np.testing.assert_array_equal(ex_rows, rows)
    np.testing.assert_allclose(ex_values, values)


def test_classic_example_pytorch():
    torch = pytest.importorskip("torch")
    emb = torch.nn.Embedding(4, D)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    ids = torch.tensor(IDS)
    with embgrad.capture(emb) as cap:
        loss = (emb(ids) * torch.tensor(WEIGHTS)[None, :, None]).sum()
    g = cap.gradients(loss, retain_graph=True)["Embedding"]
    _check(g.weight_grad, g.per_example())
    loss.backward()
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), emb.weight.grad.numpy())


def test_classic_example_tensorflow_keras():
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    emb = keras.layers.Embedding(4, D, embeddings_initializer="ones", name="table")
    ids = tf.constant(IDS)
    with embgrad.capture(emb) as cap:
        loss = tf.reduce_sum(emb(ids) * tf.constant(WEIGHTS)[None, :, None])
    g = cap.gradients(loss, sources=[emb.embeddings])
    _check(g["table"].weight_grad, g["table"].per_example())
    np.testing.assert_allclose(g["table"].weight_grad.to_dense().numpy(),
                               tf.convert_to_tensor(g.sources[0]).numpy())


def test_classic_example_raw_tensorflow():
    tf = pytest.importorskip("tensorflow")
    table = tf.Variable(tf.ones((4, D)))
    ids = tf.constant(IDS)
    with tf.GradientTape(persistent=True) as tape:
        looked = tf.nn.embedding_lookup(table, ids)
        loss = tf.reduce_sum(looked * tf.constant(WEIGHTS)[None, :, None])
    sliced = tape.gradient(loss, table)                      # a tf.IndexedSlices with a duplicate row
    _check(embgrad.row_grad(sliced), embgrad.rows_from_lookups(ids, tape.gradient(loss, looked), 4,
                                                               per_example=True))
