"""attribute_generation on a Keras causal LM (TensorFlow backend: embedding -> causal self-attention
-> dense logits), against hand-written tf.GradientTape per target."""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("these tests run Keras on the TensorFlow backend", allow_module_level=True)

import embgrad  # noqa: E402
from embgrad.attribution import quadrature  # noqa: E402

V, D = 40, 8


class TinyCausalLM(keras.Model):
    """ids (B, T) -> logits (B, T, V); ``head(e)`` is the same map from the looked-up vectors."""

    def __init__(self):
        super().__init__()
        self.emb = keras.layers.Embedding(V, D, embeddings_initializer=keras.initializers.RandomNormal(seed=0),
                                          name="tokens")
        self.att = keras.layers.MultiHeadAttention(2, 4, kernel_initializer=keras.initializers.GlorotNormal(1))
        self.out = keras.layers.Dense(V, kernel_initializer=keras.initializers.GlorotNormal(2))

    def head(self, e):
        return self.out(tf.tanh(e + self.att(e, e, use_causal_mask=True)))

    def call(self, ids):
        return self.head(self.emb(ids))


@pytest.fixture(scope="module")
def lm():
    m = TinyCausalLM()
    m(np.zeros((1, 3), np.int32))
    return m


PROMPTS = [[3, 4, 5, 6], [7, 8]]
TARGETS = [[9, 10], [11, 12, 13]]


def tape_reference(lm, p, t, method, steps=16):
    ids = tf.constant([p + t[:-1]])
    e = lm.emb(ids)
    rows = []
    for j, y in enumerate(t):
        pos = len(p) - 1 + j

        def grad(x, pos=pos, y=y):
            with tf.GradientTape() as tape:
                tape.watch(x)
                lp = tf.nn.log_softmax(lm.head(x)[0, pos])[y]
            return tape.gradient(lp, x)
        if method == "grad_x_input":
            rows.append(tf.reduce_sum(grad(e) * e, -1)[0].numpy())
        else:
            nodes, w = quadrature("gauss_legendre", steps)
            g = sum(float(wk) * grad(float(a) * e) for a, wk in zip(nodes, w, strict=True))
            rows.append(tf.reduce_sum(g * e, -1)[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("method", ["grad_x_input", "integrated_gradients"])
def test_keras_causal_lm_matches_gradient_tape(lm, method):
    r = embgrad.attribute_generation(lm, PROMPTS, TARGETS, method=method, steps=16)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS, strict=True)):
        ref = tape_reference(lm, p, t, method)
        future = np.arange(ref.shape[1])[None, :] > (len(p) - 1 + np.arange(len(t)))[:, None]
        assert np.abs(ref[future]).max() < 1e-6                      # the reference is causal too
        np.testing.assert_allclose(r.scores[i], np.where(future, 0, ref), atol=1e-5)
        if r.delta is not None:
            assert np.abs(r.delta[i]).max() < 1e-3


def test_keras_batched_equals_alone_and_greedy(lm):
    r = embgrad.attribute_generation(lm, PROMPTS, None, method="grad_x_input", max_new_tokens=3)
    for i, p in enumerate(PROMPTS):
        alone = embgrad.attribute_generation(lm, [p], [r.target_ids[i].tolist()], method="grad_x_input")
        np.testing.assert_allclose(r.scores[i], alone.scores[0], atol=1e-6)
        seq = list(p)
        for _ in range(3):                                            # greedy by hand
            seq.append(int(np.argmax(lm(tf.constant([seq]))[0, -1])))
        assert r.target_ids[i].tolist() == seq[len(p):]


def test_keras_softmax_output_is_refused():
    inp = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(V, D)(inp)
    probs = keras.layers.Dense(V, activation="softmax")(x)
    model = keras.Model(inp, probs)
    with pytest.raises(embgrad.EmbgradError, match="probabilities"):
        embgrad.attribute_generation(model, [[1, 2]], [[3]])
