"""Issue 12 item 2 (Keras 3 on TensorFlow): several forwards of a model inside one capture.
Each call of the captured model is one forward (its ``call`` is tapped): by default each
forward's examples are distinct (gradient accumulation: B1 + B2 examples), the siamese meaning
("every forward looks up the same examples") is asked for by name, and calls made outside any
forward of the model get a warning that says what was assumed. Right values from a per-example
GradientTape loop; the same cases as the PyTorch tests in test_capture_safety.py. Also item 3:
a loss that does not depend on the recorded lookups is refused."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad
from embgrad import EmbgradError

V, D = 12, 4


class Small(keras.Model):
    def __init__(self):
        super().__init__()
        self.emb = keras.layers.Embedding(V, D, name="emb")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        return tf.reduce_sum(tf.tanh(self.head(self.emb(x))[..., 0]) ** 2, axis=1) * 3


def _ids(B, T=5, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    m = Small()
    m(_ids(1))
    return m


def _grad(model, fn):
    with tf.GradientTape() as tape:
        loss = fn()
    return tf.convert_to_tensor(tape.gradient(loss, model.emb.embeddings)).numpy()


def _loop(model, xs, fwd=None):
    fwd = fwd or (lambda x: tf.reduce_sum(model(x)))
    return np.stack([_grad(model, lambda x=x: fwd(x)) for x in xs])


def test_two_forwards_are_distinct_examples():
    model = _model(0)
    a, b = _ids(3, seed=1), _ids(2, seed=2)
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(model(a)) + tf.reduce_sum(model(b))     # gradient accumulation
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 5
    ref = _loop(model, [a[i:i + 1] for i in range(3)] + [b[i:i + 1] for i in range(2)])
    np.testing.assert_allclose(pe.to_dense().numpy(), ref, atol=1e-6)


def test_two_forwards_same_size_not_merged_and_mean():
    model = _model(1)
    a, b = _ids(2, seed=3), _ids(2, seed=4)
    with embgrad.capture(model) as cap:
        loss = (tf.reduce_sum(model(a)) + tf.reduce_sum(model(b))) / 4
    pe = cap.gradients(loss, loss_reduction="mean").only().per_example()
    ref = _loop(model, [a[:1], a[1:], b[:1], b[1:]])
    np.testing.assert_allclose(pe.to_dense().numpy(), ref, atol=1e-6)


def test_same_examples_by_name_for_towers_run_as_separate_forwards():
    model = _model(2)
    a, b = _ids(3, seed=5), _ids(3, T=4, seed=6)
    with embgrad.capture(model, forwards="same_examples") as cap:
        loss = tf.reduce_sum(model(a) * model(b))            # example i is the pair (a_i, b_i)
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 3
    ref = np.stack([_grad(model, lambda i=i: tf.reduce_sum(model(a[i:i + 1]) * model(b[i:i + 1])))
                    for i in range(3)])
    np.testing.assert_allclose(pe.to_dense().numpy(), ref, atol=1e-6)
    with embgrad.capture(model, forwards="same_examples") as cap:
        loss = tf.reduce_sum(model(a)) + tf.reduce_sum(model(b[:2]))
    with pytest.raises(EmbgradError, match="same_examples.*different batch sizes"):
        cap.gradients(loss).only().per_example()


def test_calls_outside_the_models_forward_warn_what_was_assumed():
    model = _model(3)
    a, b = _ids(2, seed=7), _ids(2, seed=8)
    with embgrad.capture(model) as cap:                      # the layer called directly, twice
        loss = tf.reduce_sum(tf.reduce_sum(model.emb(a), 1) * tf.reduce_sum(model.emb(b), 1))
    g = cap.gradients(loss).only()
    with pytest.warns(UserWarning, match="ran outside any forward.*SAME examples"):
        pe = g.per_example()
    ref = np.stack([_grad(model, lambda i=i: tf.reduce_sum(tf.reduce_sum(model.emb(a[i:i + 1]), 1)
                                                           * tf.reduce_sum(model.emb(b[i:i + 1]), 1)))
                    for i in range(2)])
    np.testing.assert_allclose(pe.to_dense().numpy(), ref, atol=1e-6)
    assert "call" not in model.__dict__ and "call" not in model.emb.__dict__   # taps removed


def test_forward_boundaries_inside_tf_function():
    model = _model(4)
    a, b = _ids(3, seed=9), _ids(2, seed=10)
    spec = tf.TensorSpec((None, 5), tf.int32)

    @tf.function(input_signature=[spec, spec])
    def norms(x, y):
        with embgrad.capture(model) as cap:
            loss = tf.reduce_sum(model(x)) + tf.reduce_sum(model(y))
        return cap.gradients(loss).only().per_example().norms()

    got = norms(tf.constant(a, tf.int32), tf.constant(b, tf.int32)).numpy()
    ref = _loop(model, [a[i:i + 1] for i in range(3)] + [b[i:i + 1] for i in range(2)])
    np.testing.assert_allclose(got, np.linalg.norm(ref.reshape(5, -1), axis=1), rtol=1e-5)


def test_forward_that_raises_ends_its_forward():
    model = _model(5)
    a = _ids(2, seed=11)
    with embgrad.capture(model) as cap:
        with pytest.raises(EmbgradError, match="out of range"):
            model(np.full((2, 5), V + 3))               # refused in the forward
        loss = tf.reduce_sum(model(a))
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 2
    np.testing.assert_allclose(pe.to_dense().numpy(), _loop(model, [a[:1], a[1:]]), atol=1e-6)


def test_loss_from_a_forward_before_the_block_is_refused():
    model = _model(6)
    x = _ids(2, seed=12)
    with tf.GradientTape() as tape:
        out = model(x)
        with embgrad.capture(model) as cap:
            model(x)
        loss = tf.reduce_sum(out)
    del tape
    with pytest.raises(EmbgradError, match="does not depend on any lookup recorded"):
        cap.gradients(loss)


KERAS_TORCH = r'''
import numpy as np, torch, keras, warnings
import embgrad
from embgrad import EmbgradError
V, D = 12, 4
class Small(keras.Model):
    def __init__(self):
        super().__init__()
        self.emb = keras.layers.Embedding(V, D, name="emb")
        self.head = keras.layers.Dense(1, name="head")
    def call(self, x):
        return (torch.tanh(self.head(self.emb(x))[..., 0]) ** 2).sum(1) * 3
def ids(B, T=5, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, T))
keras.utils.set_random_seed(0)
model = Small()
model(ids(1))
w = model.emb.embeddings.value
def grad(fn):
    return torch.autograd.grad(fn(), w)[0]
a, b = ids(3, seed=1), ids(2, seed=2)
with embgrad.capture(model) as cap:
    loss = model(a).sum() + model(b).sum()
pe = cap.gradients(loss).only().per_example()
assert pe.batch_size == 5
xs = [a[i:i + 1] for i in range(3)] + [b[i:i + 1] for i in range(2)]
ref = torch.stack([grad(lambda x=x: model(x).sum()) for x in xs])
torch.testing.assert_close(pe.to_dense(), ref)
c = ids(3, T=4, seed=3)
with embgrad.capture(model, forwards="same_examples") as cap:
    loss = (model(a) * model(c)).sum()
pe = cap.gradients(loss).only().per_example()
ref = torch.stack([grad(lambda i=i: (model(a[i:i + 1]) * model(c[i:i + 1])).sum()) for i in range(3)])
torch.testing.assert_close(pe.to_dense(), ref)
with embgrad.capture(model) as cap:
    loss = (model.emb(a).sum(1) * model.emb(c).sum(1)).sum()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cap.gradients(loss).only().per_example()
assert any("ran outside any forward" in str(x.message) for x in caught), [str(x.message) for x in caught]
old = model(a).sum()
with embgrad.capture(model) as cap:
    model(a)
try:
    cap.gradients(old)
    raise SystemExit("no error")
except EmbgradError as e:
    assert "does not depend on any lookup recorded" in str(e), e
assert "call" not in model.__dict__ and "call" not in model.emb.__dict__
print("OK")
'''


@pytest.mark.slow
def test_keras_on_torch_forwards(tmp_path):
    """Keras 3 on PyTorch (a subprocess: a Keras backend is fixed per process): the same cases
    against a per-example torch autograd loop."""
    import subprocess
    import sys

    script = tmp_path / "keras_torch_forwards.py"
    script.write_text(KERAS_TORCH)
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
