"""Tied tables in Keras 3 (TensorFlow): ReversibleEmbedding(reverse=True) as the tied projection
(with logit softcapping), whole-table per-example gradients against a per-example loop of
tf.GradientTape; a model or head layer that reads the table outside its lookups is flagged tied,
its weight_grad stays exact and its whole-table per-example gradients are refused (issue 12,
item 3), never a silent lookup-only answer."""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad
from embgrad import EmbgradError

V, D, B, T = 20, 4, 3, 5


def _data(seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (B, T))
    ids[0, 3:] = 0                                             # padding (mask_zero)
    targets = rng.integers(0, V, (B, T))
    weights = (ids != 0).astype("float32")                     # label masking: padded positions ignored
    weights[1, 2] = 0.0
    return ids, targets, weights


def _loop(loss_fn, var):
    out = []
    for b in range(B):
        with tf.GradientTape() as tape:
            loss = loss_fn(slice(b, b + 1))
        out.append(tf.convert_to_tensor(tape.gradient(loss, var)).numpy())
    return np.stack(out)


@pytest.mark.parametrize("soft_cap", [None, 3.0])
def test_reversible_embedding_whole_table_per_example(soft_cap):
    keras.utils.set_random_seed(4)
    emb = keras.layers.ReversibleEmbedding(V, D, tie_weights=True, name="tied", mask_zero=True,
                                           logit_soft_cap=soft_cap)
    mix = keras.layers.Dense(D, name="mix", activation="tanh")
    ids, targets, weights = _data()

    def loss_fn(i=slice(None)):
        h = mix(emb(ids[i]))
        logits = emb(h, reverse=True) + 0.5 * emb(mix(h), reverse=True)    # called twice
        xent = keras.losses.sparse_categorical_crossentropy(targets[i], logits, from_logits=True)
        return tf.reduce_sum(xent * weights[i])

    loss_fn()
    with embgrad.capture(emb) as cap:
        loss = loss_fn()
    g = cap.gradients(loss)["tied"]
    assert g.tied and len(g.projections) == 2
    ref = _loop(loss_fn, emb.embeddings)
    pe = g.per_example()
    flat = ref.reshape(B, -1)
    np.testing.assert_allclose(pe.norms().numpy(), np.linalg.norm(flat, axis=1), rtol=1e-5)
    clip = np.minimum(1.0, 0.2 / np.linalg.norm(flat, axis=1))
    np.testing.assert_allclose(pe.clip(0.2).sum().to_dense().numpy(), (ref * clip[:, None, None]).sum(0),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pe.dot().numpy(), flat @ flat.T, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), ref.sum(0), rtol=1e-4, atol=1e-6)
    lookup = g.per_example(part="lookup")
    assert not np.allclose(lookup.norms().numpy(), pe.norms().numpy(), rtol=1e-2)


class _Reads(keras.Model):
    """Issue 12 item 3: a model that reads ``self.emb.embeddings`` by hand."""

    def __init__(self):
        super().__init__()
        self.emb = keras.layers.Embedding(10, 2)

    def call(self, x):
        return keras.ops.matmul(keras.ops.mean(self.emb(x), axis=1), keras.ops.transpose(self.emb.embeddings))


class _Head(keras.layers.Layer):
    """A head layer that holds the Embedding layer and multiplies by its table."""

    def __init__(self, emb, **kw):
        super().__init__(**kw)
        self.emb = emb

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.emb.embeddings))


class _WithHead(keras.Model):
    def __init__(self):
        super().__init__()
        self.emb = keras.layers.Embedding(10, 2)
        self.head = _Head(self.emb)

    def call(self, x):
        return self.head(keras.ops.tanh(self.emb(x)))


@pytest.fixture
def fresh_keras_session():
    # Keras 3.15 leaves the name scope of a model whose layer holds another tracked layer
    # (_WithHead) open after its first call (without embgrad too): later layers' variable paths
    # would start with "__with_head/"; clear_session() resets Keras's global state
    yield
    keras.backend.clear_session()


@pytest.mark.parametrize("make", [_Reads, _WithHead])
def test_table_read_outside_lookups_is_tied_and_refused(make, fresh_keras_session):
    keras.utils.set_random_seed(0)
    model = make()
    x = np.array([[1, 2, 3], [4, 5, 6]])
    model(x)
    model.emb.embeddings.assign(np.random.default_rng(0).normal(size=(10, 2)).astype("float32"))

    def loss_fn():
        return tf.reduce_sum(model(x) ** 2)

    with embgrad.capture(model) as cap:
        loss = loss_fn()
    g = cap.gradients(loss).only()
    assert g.tied
    with tf.GradientTape() as tape:
        full = tf.convert_to_tensor(tape.gradient(loss_fn(), model.emb.embeddings)).numpy()
    np.testing.assert_allclose(g.weight_grad.to_dense().numpy(), full, rtol=1e-5, atol=1e-6)
    assert np.abs(g.lookup_grad.to_dense().numpy() - full).max() > 0.1 * np.abs(full).max()
    with pytest.raises(EmbgradError, match="part='lookup'"):
        g.per_example()
    lookup = g.per_example(part="lookup")                      # the lookup part, by name
    np.testing.assert_allclose(lookup.sum().to_dense().numpy(), g.lookup_grad.to_dense().numpy(), atol=1e-6)


def test_untied_table_is_not_flagged():
    keras.utils.set_random_seed(0)
    emb = keras.layers.Embedding(10, 2)
    x = np.array([[1, 2, 3], [4, 5, 6]])
    with embgrad.capture(emb) as cap:
        loss = tf.reduce_sum(emb(x) ** 2)
    g = cap.gradients(loss).only()
    assert not g.tied
    assert isinstance(g.per_example(), embgrad.ExampleGrads)


KERAS_TORCH = r'''
import numpy as np, torch, keras, embgrad
from embgrad import EmbgradError
V, D, B, T = 20, 4, 3, 5
keras.utils.set_random_seed(4)
emb = keras.layers.ReversibleEmbedding(V, D, tie_weights=True, name="tied", logit_soft_cap=3.0)
mix = keras.layers.Dense(D, name="mix", activation="tanh")
ids = np.random.default_rng(1).integers(0, V, (B, T))
targets = torch.tensor(np.random.default_rng(5).integers(0, V, (B, T)))
def loss_fn(i=slice(None)):
    logits = emb(mix(emb(ids[i])), reverse=True)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets[i].reshape(-1), reduction="sum")
loss_fn()
with embgrad.capture(emb) as cap:
    loss = loss_fn()
g = cap.gradients(loss)["tied"]
assert g.tied and len(g.projections) == 1
w = emb.embeddings.value
ref = torch.stack([torch.autograd.grad(loss_fn(slice(b, b + 1)), w)[0] for b in range(B)])
torch.testing.assert_close(g.per_example().norms(), ref.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)
torch.testing.assert_close(g.weight_grad.to_dense(), ref.sum(0), rtol=1e-5, atol=1e-7)

class R(keras.Model):
    def __init__(self):
        super().__init__()
        self.e = keras.layers.Embedding(10, 2)
    def call(self, x):
        return keras.ops.matmul(keras.ops.mean(self.e(x), axis=1), keras.ops.transpose(self.e.embeddings))
m = R()
x = np.array([[1, 2, 3], [4, 5, 6]])
m(x)
with embgrad.capture(m) as cap:
    out = (m(x) ** 2).sum()
g = cap.gradients(out).only()
assert g.tied
try:
    g.per_example()
    raise SystemExit("no error")
except EmbgradError as e:
    assert "part='lookup'" in str(e)
print("OK")
'''


@pytest.mark.slow
def test_keras_on_torch_reversible_embedding_and_hand_read(tmp_path):
    """Keras 3 on PyTorch (a subprocess: a Keras backend is fixed per process): the reverse call
    is the table's projection (whole-table norms equal a per-example autograd loop), and a
    hand-written read of the table is found in torch's autograd graph and refused."""
    import os
    import subprocess
    import sys

    script = tmp_path / "keras_torch_tied.py"
    script.write_text(KERAS_TORCH)
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
