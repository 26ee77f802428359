"""Issue 12 item 8: Keras converts ids to its Input's dtype before any layer sees them (floats
truncated, int64 wrapped into int32, bools looked up as rows 0/1). embgrad checks the ids where
they enter the model and refuses those, naming the Input; integer ids given to a model whose
Input is float32 (Keras's default) get a message that points at that Input's dtype; TF
SparseTensor ids are refused clearly. Valid ids give the framework's own gradient (GradientTape)."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import embgrad
from embgrad import EmbgradError

V, D = 10, 2


def _functional(dtype="int32"):
    inp = keras.Input((2,), dtype=dtype, name="ids")
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(V, D, name="e")(inp)))
    return keras.Model(inp, out)


def _sequential(dtype="int32"):
    return keras.Sequential([keras.Input((2,), dtype=dtype, name="ids"), keras.layers.Embedding(V, D, name="e"),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])


MODELS = {"functional": _functional, "sequential": _sequential}
BAD = {
    "fractional float": (lambda: np.array([[1.0, 3.7]]), r"id 3.7 at position \(0, 1\) is not a whole number.*truncate"),
    "fractional tf float": (lambda: tf.constant([[1.0, 3.7]]), r"id 3.7.* is not a whole number"),
    "nan": (lambda: np.array([[1.0, np.nan]]), "not a whole number"),
    "int64 past int32": (lambda: np.array([[1, 2 ** 32 + 3]], np.int64), r"id 4294967299 .*does not fit in int32.*wrap"),
    "bool": (lambda: np.array([[True, False]]), "bool values.*rows 0 and 1"),
    "sparse": (lambda: tf.sparse.from_dense(tf.constant([[1, 0]], tf.int64)), "tf.SparseTensor.*tf.sparse.to_dense"),
}


def _built(make):
    model = make()
    model(np.array([[1, 2]], np.int32))
    return model


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("bad", list(BAD))
def test_ids_keras_would_convert_are_refused_at_the_models_entry(kind, bad):
    model = _built(MODELS[kind])
    layer = model.get_layer("e")
    keys, model_keys = sorted(layer.__dict__), sorted(model.__dict__)
    x, match = BAD[bad]
    with pytest.raises(EmbgradError, match=f"Input 'ids' \\(dtype int32\\).*{match}"):
        with embgrad.capture(model):
            model(x())
    assert sorted(layer.__dict__) == keys and sorted(model.__dict__) == model_keys


@pytest.mark.parametrize("kind", list(MODELS))
def test_valid_ids_at_the_entry_match_gradient_tape(kind):
    """Whole floats (converted exactly), int64 within int32 and plain int32 all pass, and the
    captured gradient equals TensorFlow's own."""
    model = _built(MODELS[kind])
    table = model.get_layer("e").embeddings
    ref_ids = np.array([[1, 3], [3, 9]], np.int32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(ref_ids) ** 2)
    ref = tf.convert_to_tensor(tape.gradient(loss, table)).numpy()
    for x in (ref_ids, ref_ids.astype(np.int64), ref_ids.astype(np.float64), tf.constant(ref_ids, tf.int64)):
        with embgrad.capture(model) as cap:
            loss = tf.reduce_sum(model(x) ** 2)
        np.testing.assert_allclose(cap.gradients(loss)["e"].weight_grad.to_dense().numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("kind", list(MODELS))
def test_integer_ids_into_a_float_input_point_at_the_input(kind):
    model = _built(lambda: MODELS[kind]("float32"))
    with pytest.raises(EmbgradError, match=r"ids have dtype float32.*If you passed integer ids: the model's "
                                           r"Input 'ids' has a floating-point dtype.*dtype='int32'"):
        with embgrad.capture(model):
            model(np.array([[1, 3]], np.int32))


def test_float_ids_into_a_traced_model_are_refused_by_dtype():
    model = _built(_functional)

    @tf.function(input_signature=[tf.TensorSpec((None, 2), tf.float32)])
    def f(x):
        with embgrad.capture(model):
            return model(x)

    with pytest.raises(EmbgradError, match="float32 ids inside a tf.function.*integer input_signature"):
        f(np.array([[1.0, 3.0]], np.float32))


def test_another_threads_forward_is_not_checked():
    """The entry check belongs to the capture's own context (a forward of the same model in
    another thread behaves as Keras does)."""
    import threading

    model = _built(_functional)
    out = []
    with embgrad.capture(model):
        t = threading.Thread(target=lambda: out.append(model(np.array([[1.0, 3.7]])).numpy()))
        t.start()
        t.join(30)
    ref = model(np.array([[1, 3]], np.int32)).numpy()
    np.testing.assert_allclose(out[0], ref)      # Keras's own truncation, untouched


def test_subclassed_model_sparse_ids_refused_at_the_layer():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.e = keras.layers.Embedding(V, D, name="e")

        def call(self, x):
            return self.e(x)

    model = Sub()
    model(np.array([[1, 2]]))
    with pytest.raises(EmbgradError, match="Keras layer 'e': ids are a tf.SparseTensor"):
        with embgrad.capture(model):
            model(tf.sparse.from_dense(tf.constant([[1, 0]], tf.int64)))


@pytest.mark.parametrize("sources, match", [
    (["kernel"], r"sources\[0\] must be a variable.*got str 'kernel'.*names are not looked up"),
    ("kernel", "got the string 'kernel'; names are not looked up"),
    ([None], r"sources\[0\] must be a variable or tensor of the model, got NoneType"),
    ([1.0], r"sources\[0\] must be a variable or tensor of the model, got float"),
])
def test_sources_that_are_not_variables_refused(sources, match):
    model = _built(_functional)
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(model(np.array([[1, 2]], np.int32)))
    with pytest.raises(EmbgradError, match=match):
        cap.gradients(loss, sources=sources)


def test_sources_variables_match_gradient_tape():
    model = _built(_functional)
    x = np.array([[1, 2], [3, 3]], np.int32)
    with embgrad.capture(model) as cap:
        loss = tf.reduce_sum(model(x) ** 2)
    got = cap.gradients(loss, sources=model.trainable_variables).sources
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x) ** 2)
    ref = tape.gradient(loss, model.trainable_variables)
    for a, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(r).numpy(), atol=1e-6)
