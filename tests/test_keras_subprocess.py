"""tf-keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``) and Keras 3 on PyTorch (``KERAS_BACKEND=torch``),
each in one subprocess (a Keras backend is fixed per process). Each checks capture against its
framework's own gradient and the bad-input refusals, then reports its numbers (captured gradients
and attribution scores), which must equal those of Keras 3 on TensorFlow in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # each subprocess pays one framework import (seconds)

# The same model and numbers in every flavour: ids -> Embedding -> mean -> Dense (no bias).
SCRIPT = r'''
import json, os, sys
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

V, D, C = 12, 3, 2
rng = np.random.default_rng(0)
W = rng.normal(size=(V, D)).astype("float32")
K = rng.normal(size=(D, C)).astype("float32")
ids = np.array([[0, 1, 0, 2], [5, 5, 11, 3], [7, 0, 0, 0]])
y = np.array([0, 1, 1])

def build():
    inp = keras.Input((4,), dtype="int32")
    emb = keras.layers.Embedding(V, D, name="tok")
    pooled = keras.layers.GlobalAveragePooling1D()(emb(inp))
    inner = keras.Model(inp, keras.layers.Dense(C, use_bias=False, name="head")(pooled), name="inner")
    outer = keras.Sequential([keras.Input((4,), dtype="int32"), inner], name="outer")
    emb.embeddings.assign(W)
    inner.get_layer("head").kernel.assign(K)
    return outer, emb

def loss_of(model, x, t):
    return total(keras.losses.sparse_categorical_crossentropy(t, model(x), from_logits=True))

def own_grad(model, table, x, t):
    """The framework's own dense gradient of the table."""
    if FLAVOUR == "tf_keras":
        with tf.GradientTape() as tape:
            loss = loss_of(model, x, t)
        return tf.convert_to_tensor(tape.gradient(loss, table)).numpy()
    table.value.grad = None
    loss_of(model, x, t).backward()
    g = table.value.grad.numpy().copy()
    table.value.grad = None
    return g

model, emb = build()
keys = sorted(emb.__dict__)
assert embgrad.backends.get_backend(model).name == "keras"
with embgrad.capture(model, layers="inner/tok") as cap:
    loss = loss_of(model, ids, y)
grads = cap.gradients(loss, sources=model.trainable_variables)
assert sorted(emb.__dict__) == keys and "call" not in emb.__dict__
g = grads["tok"]
rg, eg = g.weight_grad, g.per_example()
np.testing.assert_allclose(rg.to_dense().numpy(), own_grad(model, emb.embeddings, ids, y), atol=1e-6)
assert len(grads.sources) == 2
for b in range(len(ids)):
    ref = own_grad(model, emb.embeddings, ids[b:b + 1], y[b:b + 1])
    np.testing.assert_allclose(eg.to_dense().numpy()[b], ref, atol=1e-6)

if FLAVOUR == "torch":
    # the user's own backward inside the block: gradients() without a loss reuses it
    assert isinstance(emb, torch.nn.Module)
    with embgrad.capture(model) as cap:
        loss = loss_of(model, ids, y)
        loss.backward()
    np.testing.assert_allclose(cap.gradients()["tok"].weight_grad.numpy()[1], rg.numpy()[1], atol=1e-6)
    emb.embeddings.value.grad = None
    rev = keras.layers.ReversibleEmbedding(V, D, tie_weights=True, name="rev")
    with embgrad.capture(rev) as cap:
        h = rev(ids)
        loss = total(rev(h, reverse=True))
    rgrads = cap.gradients(loss)["rev"]
    assert rgrads.tied and len(rgrads.calls) == 1

errors = {}
for label, bad in (("range", np.array([[1, 2, 3, V]])), ("negative", np.array([[1, -1, 2, 3]])),
                   ("float", np.array([[1.5, 2.0, 3.0, 4.0]], dtype="float32"))):
    try:
        with embgrad.capture(emb):
            emb(bad)
        errors[label] = "no error"
    except EmbgradError as e:
        errors[label] = str(e)
    assert sorted(emb.__dict__) == keys
try:
    embgrad.capture(model, layers="tokk")
except EmbgradError as e:
    errors["name"] = str(e)
if FLAVOUR == "tf_keras":                   # Keras 2's sparse=True returns a SparseTensor
    sparse_emb = keras.layers.Embedding(V, D, sparse=True, name="sp")
    sparse_emb.build((None, 4))
    try:
        with embgrad.capture(sparse_emb):
            pass
    except EmbgradError as e:
        errors["sparse"] = str(e)
    assert "call" not in sparse_emb.__dict__
# attribution on the same model: scores, and integrated gradients' completeness gap
attr = {}
for method in ("saliency", "grad_x_input", "integrated_gradients", "smoothgrad"):
    a = embgrad.attribute(model, ids, target=y.tolist(), method=method, steps=16, progress=False)
    attr[method] = a.scores.tolist()
    if method == "integrated_gradients":
        attr["delta"] = a.delta.tolist()
print("RESULT " + json.dumps({
    "attr": attr,
    "rows": rg.numpy()[0].tolist(), "values": rg.numpy()[1].tolist(),
    "norms": eg.norms().detach().numpy().tolist() if FLAVOUR == "torch" else eg.norms().numpy().tolist(),
    "errors": errors, "backend": type(g.weight_grad.values).__module__}))
'''


FLAVOURS = {"tf_keras": {"TF_USE_LEGACY_KERAS": "1"}, "torch": {"KERAS_BACKEND": "torch"}}


def start_flavours(script: str):
    """One subprocess per Keras flavour running ``script``, all started at once (their imports
    overlap); yields them and kills any still running afterwards (a fixture body)."""
    started = {}
    for flavour, extra in FLAVOURS.items():
        env = dict(os.environ, EMBGRAD_FLAVOUR=flavour, TF_CPP_MIN_LOG_LEVEL="2", **extra)
        started[flavour] = subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield started
    for p in started.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def procs():
    """Both subprocesses started at once (their imports overlap), waited for by each test."""
    yield from start_flavours(SCRIPT)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-3000:] + err[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def _reference() -> dict:
    """The same model under Keras 3 on TensorFlow, in this process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    import embgrad

    V, D, C = 12, 3, 2
    rng = np.random.default_rng(0)
    W = rng.normal(size=(V, D)).astype("float32")
    K = rng.normal(size=(D, C)).astype("float32")
    ids = np.array([[0, 1, 0, 2], [5, 5, 11, 3], [7, 0, 0, 0]])
    y = np.array([0, 1, 1])
    inp = keras.Input((4,), dtype="int32")
    emb = keras.layers.Embedding(V, D, name="tok")
    out = keras.layers.Dense(C, use_bias=False, name="head")(keras.layers.GlobalAveragePooling1D()(emb(inp)))
    model = keras.Model(inp, out)
    emb.embeddings.assign(W)
    model.get_layer("head").kernel.assign(K)
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, model(ids), from_logits=True))
    g = cap.gradients(loss)["tok"]
    rows, values = g.weight_grad.numpy()
    attr = {method: embgrad.attribute(model, ids, target=y.tolist(), method=method, steps=16,
                                      progress=False).scores
            for method in ("saliency", "grad_x_input", "integrated_gradients", "smoothgrad")}
    return {"rows": rows.tolist(), "values": values, "norms": g.per_example().norms().numpy(), "attr": attr}


def _compare(result: dict, module: str) -> None:
    ref = _reference()
    assert result["rows"] == ref["rows"] == [0, 1, 2, 3, 5, 7, 11]
    np.testing.assert_allclose(np.array(result["values"]), ref["values"], atol=1e-6)
    np.testing.assert_allclose(np.array(result["norms"]), ref["norms"], rtol=1e-5)
    assert result["backend"].startswith(module)
    for method, scores in ref["attr"].items():       # attribution: the same scores in every flavour
        np.testing.assert_allclose(np.array(result["attr"][method]), scores, rtol=1e-4, atol=1e-6,
                                   err_msg=method)
    assert np.abs(result["attr"]["delta"]).max() < 0.05 * np.abs(np.array(result["attr"]["integrated_gradients"])).sum(1).max()
    errors = result["errors"]
    assert "id 12 at position (0, 3) is out of range for a table of 12 rows" in errors["range"]
    assert "id -1 at position (0, 1)" in errors["negative"]
    assert "float32" in errors["float"] and "integer" in errors["float"]
    assert "no embedding layer named 'tokk'" in errors["name"] and "'tok'" in errors["name"]


def test_tf_keras_legacy_same_as_keras3(procs):
    pytest.importorskip("tf_keras")
    result = _result(procs["tf_keras"])
    _compare(result, "tensorflow")
    assert "sparse=True" in result["errors"]["sparse"]


def test_keras3_on_torch_same_as_on_tensorflow(procs):
    pytest.importorskip("torch")
    _compare(_result(procs["torch"]), "torch")
