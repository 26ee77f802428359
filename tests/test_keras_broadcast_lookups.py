"""Issue 12 item 1 (Keras): a position embedding looked up with ids of batch size 1 and
broadcast over the batch (the pattern of Keras-Hub's PositionEmbedding / TokenAndPositionEmbedding).

keras-hub is not a dependency of this project (``pip install keras-hub`` would add
tensorflow-text, sentencepiece and kagglehub to the environment for two layers), so the pattern is
reproduced with a plain ``keras.layers.Embedding`` looking up ``positions[None]``. TensorFlow has
no tensor subclass through which embgrad could split the broadcast (1, T, D) output by example,
so per_example() of such a layer refuses with an EmbgradError saying how to pass the ids, never a
batch of 1; with the positions broadcast to (B, T) by the model, the per-example gradients are
exact: checked against a per-example GradientTape loop."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad
from embgrad import EmbgradError

V, P, D = 10, 4, 2
X = np.array([[1, 2, 3], [4, 5, 6]])


class TokAndPos(keras.Model):
    def __init__(self, expand):
        super().__init__()
        self.expand = expand
        self.tok = keras.layers.Embedding(V, D, name="tok")
        self.pos = keras.layers.Embedding(P, D, name="pos")

    def call(self, x):
        positions = keras.ops.arange(keras.ops.shape(x)[1])[None]          # (1, T)
        if self.expand:
            positions = keras.ops.broadcast_to(positions, keras.ops.shape(x))  # (B, T)
        return self.tok(x) + self.pos(positions)


def _loss(model, x):
    return tf.reduce_sum(model(x) ** 2)


def _model(expand):
    keras.utils.set_random_seed(0)
    m = TokAndPos(expand)
    m(X)
    return m


def test_batch_one_positions_refused_not_a_batch_of_one():
    model = _model(expand=False)
    with embgrad.capture(model) as cap:
        loss = _loss(model, X)
    g = cap.gradients(loss)
    with pytest.raises(EmbgradError, match=r"layer 'pos'.*no batch dimension.*keras.ops.broadcast_to\(ids, \(2, T\)\)"):
        g["pos"].per_example()
    # the summed gradient needs no examples: it is exact
    table = model.pos.embeddings
    with tf.GradientTape() as tape:
        ref_loss = _loss(model, X)
    ref = tf.convert_to_tensor(tape.gradient(ref_loss, table)).numpy()
    np.testing.assert_allclose(g["pos"].weight_grad.to_dense().numpy(), ref, atol=1e-6)


def test_broadcast_positions_exact_per_example():
    model = _model(expand=True)
    with embgrad.capture(model) as cap:
        loss = _loss(model, X)
    pe = cap.gradients(loss)["pos"].per_example()
    table = model.pos.embeddings
    ref = []
    for b in range(len(X)):
        with tf.GradientTape() as tape:
            lb = _loss(model, X[b:b + 1])
        ref.append(tf.convert_to_tensor(tape.gradient(lb, table)).numpy())
    ref = np.stack(ref)
    np.testing.assert_allclose(pe.to_dense().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(pe.norms().numpy(), np.linalg.norm(ref.reshape(len(X), -1), axis=1), rtol=1e-5)
