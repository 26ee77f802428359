"""embgrad.table on tf-keras (Keras 2) and on Keras 3 with the PyTorch backend, each in its own
subprocess (a Keras backend is fixed per process): read, assign in place and undo, frozen rows
bit-identical under Adam with weight decay, lazy regularisation against the framework's own
gradient of the dense penalty."""
from __future__ import annotations

import subprocess

import pytest
from test_keras_subprocess import _result, start_flavours   # flavour subprocesses, RESULT parsing

pytestmark = pytest.mark.slow   # each subprocess pays one framework import (seconds)

SCRIPT = r'''
import json, os
import numpy as np
FLAVOUR = os.environ["EMBGRAD_FLAVOUR"]
if FLAVOUR == "tf_keras":
    import tensorflow as tf
    keras = tf.keras
    total = tf.reduce_sum
else:
    import keras, torch
    total = keras.ops.sum
import embgrad
from embgrad import EmbgradError

V, D, C, B, T = 20, 4, 3, 8, 5
rng = np.random.default_rng(0)
x = rng.integers(0, 15, (B, T))           # rows 15..19 never looked up
y = rng.integers(0, C, B)
keras.utils.set_random_seed(0)
inp = keras.Input((T,), dtype="int32")
emb = keras.layers.Embedding(V, D, name="tok")
model = keras.Model(inp, keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(emb(inp))))
out = {}

t = embgrad.table(model)
var = t.variable
assert var is emb.embeddings, (type(var), type(emb.embeddings))
W = np.array(emb.embeddings.numpy() if FLAVOUR == "tf_keras" else keras.ops.convert_to_numpy(emb.embeddings))
np.testing.assert_array_equal(t[[3, 1]], W[[3, 1]])
prev = t.assign([3, 1], np.full((2, D), 0.25))
now = t.numpy()
assert (now[[3, 1]] == 0.25).all() and np.array_equal(np.delete(now, [1, 3], 0), np.delete(W, [1, 3], 0))
assert t.variable is var
t.assign([3, 1], prev)
np.testing.assert_array_equal(t.numpy(), W)

def loss_fn(penalty=None):
    loss = total(keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True))
    return loss if penalty is None else loss + penalty(var)

def grads_of(fn, variables):
    if FLAVOUR == "tf_keras":
        with tf.GradientTape() as tape:
            loss = fn()
        return [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
    for v in variables:
        v.value.grad = None
    fn().backward()
    gs = [v.value.grad.clone() for v in variables]
    for v in variables:
        v.value.grad = None
    return gs

# frozen rows under Adam with (decoupled) weight decay, in a custom loop
frozen = [0, 2, 5]
before = t.numpy()
t.freeze(frozen)
opt = keras.optimizers.AdamW(0.05, weight_decay=0.1) if FLAVOUR == "torch" else keras.optimizers.Adam(0.05)
for _ in range(3):
    variables = model.trainable_variables
    opt.apply_gradients(zip(grads_of(loss_fn, variables), variables))
after = t.numpy()
out["frozen_identical"] = bool(np.array_equal(after[frozen], before[frozen]))
out["others_moved"] = bool((after[[1, 4, 6]] != before[[1, 4, 6]]).any(1).all())
t.unfreeze()
out["constraint_removed"] = var.constraint is None

# lazy regularisation equals the framework's gradient of the dense penalty on touched rows
with embgrad.capture(model) as cap:
    loss = loss_fn()
g = cap.gradients(loss).only().weight_grad
lazy = embgrad.regularize(g, t, l1=0.01, l2=0.05)
dense = grads_of(lambda: loss_fn(keras.regularizers.L1L2(l1=0.01, l2=0.05)), [var])[0]
dense = dense.numpy() if FLAVOUR == "tf_keras" else dense.detach().numpy()
rows, values = lazy.numpy()
out["regularize_max_err"] = float(np.abs(values - dense[rows]).max())
out["untouched_dense_nonzero"] = bool((dense[15:] != 0).any(1).all()) and int(rows.max()) < 15
try:
    t.assign([1], np.zeros((1, 3)))
except EmbgradError as e:
    out["error"] = str(e)
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def procs():
    """Both subprocesses started at once (their imports overlap), waited for by each test."""
    yield from start_flavours(SCRIPT)


def _check(proc: subprocess.Popen) -> None:
    r = _result(proc)
    assert r["frozen_identical"] and r["others_moved"] and r["constraint_removed"]
    assert r["regularize_max_err"] < 1e-5 and r["untouched_dense_nonzero"]
    assert "vectors have shape (1, 3) but 1 id of a table of dimension 4" in r["error"]


def test_tables_on_tf_keras(procs):
    pytest.importorskip("tf_keras")
    _check(procs["tf_keras"])


def test_tables_on_keras3_with_torch(procs):
    pytest.importorskip("torch")
    _check(procs["torch"])
