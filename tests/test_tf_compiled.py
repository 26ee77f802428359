"""Issue 12 item 5: every public sparse operation works inside a compiled ``tf.function``
whose input signature has ``None`` dims (unknown batch and length), or refuses with an
``EmbgradError`` naming the eager alternative. Reference values: dense NumPy scatter-adds of the
same output gradients (per example, a loop over examples), independent of embgrad's sparse code,
and TensorFlow's own ``GradientTape`` gradient of an ``embedding_lookup``."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import embgrad
from embgrad import EmbgradError

V, D = 50, 3
SIGS = {"(None, 4)": (None, 4), "(None,)": (None,), "(None, None)": (None, None)}


def _data(sig, seed=0):
    rng = np.random.default_rng(seed)
    shape = (5, 4) if len(sig) == 2 else (7,)
    ids = rng.integers(0, V, shape)
    ids.flat[:3] = 7                     # a row repeated inside and across examples
    return ids, rng.normal(size=shape + (D,)).astype(np.float32)


def _dense(ids, g):
    out = np.zeros((V, D), np.float64)
    np.add.at(out, ids.reshape(-1), g.reshape(-1, D))
    return out


def _per_example(ids, g):
    B = ids.shape[0]
    return np.stack([_dense(ids[b:b + 1], g[b:b + 1]) for b in range(B)])


def _fn(sig, body):
    return tf.function(body, input_signature=[tf.TensorSpec(sig, tf.int64),
                                              tf.TensorSpec(sig + (D,), tf.float32)])


@pytest.mark.parametrize("name", list(SIGS))
def test_rows_from_lookups_and_row_ops_compiled(name):
    sig = SIGS[name]

    def body(ids, g):
        r = embgrad.rows_from_lookups(ids, g, V)
        return (r.rows, r.values, r.to_dense(), r.norm(), r.clip_by_norm(1.0).to_dense(),
                r.clip_by_norm(1e6).to_dense(), r.clip_rows(0.5).to_dense(), r.row_norms(),
                (r + r).to_dense(), r.scale(3.0).to_dense())

    f = _fn(sig, body)
    for seed in (0, 1):                              # two batch sizes, one trace
        ids, g = _data(sig, seed)
        if seed == 1:
            ids, g = ids[:3], g[:3]
        rows, values, dense, norm, clip1, clipbig, cliprows, row_norms, doubled, scaled = f(ids, g)
        ref = _dense(ids, g)
        touched = np.flatnonzero(np.abs(ref).sum(1) > 0)
        np.testing.assert_array_equal(rows.numpy(), np.unique(ids))
        np.testing.assert_allclose(dense.numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(float(norm), np.linalg.norm(ref), rtol=1e-5)
        np.testing.assert_allclose(clip1.numpy(), ref / max(1.0, np.linalg.norm(ref)), atol=1e-6)
        np.testing.assert_allclose(clipbig.numpy(), ref, atol=1e-5)
        rn = np.linalg.norm(ref, axis=1, keepdims=True)
        np.testing.assert_allclose(cliprows.numpy(), ref * np.minimum(1, 0.5 / np.maximum(rn, 1e-30)), atol=1e-6)
        np.testing.assert_allclose(np.sort(row_norms.numpy()), np.sort(rn[touched, 0]), rtol=1e-5)
        np.testing.assert_allclose(doubled.numpy(), 2 * ref, atol=1e-5)
        np.testing.assert_allclose(scaled.numpy(), 3 * ref, atol=1e-5)
    assert f.experimental_get_tracing_count() == 1


def test_rows_from_lookups_compiled_matches_gradient_tape():
    """The compiled result against TensorFlow's own IndexedSlices gradient of the table."""
    ids, _ = _data((None, None))
    table = tf.Variable(np.random.default_rng(3).normal(size=(V, D)).astype(np.float32))
    w = tf.constant(np.random.default_rng(4).normal(size=(D,)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int64)])
    def step(x):
        with tf.GradientTape() as tape:
            looked = tf.nn.embedding_lookup(table, x)
            tape.watch(looked)
            loss = tf.reduce_sum(tf.sin(looked) * w)
        g_out, g_table = tape.gradient(loss, [looked, table])
        r = embgrad.rows_from_lookups(x, g_out, V)
        return r.to_dense(), tf.convert_to_tensor(g_table), embgrad.row_grad(g_table).to_dense()

    mine, own, coalesced = step(ids)
    np.testing.assert_allclose(mine.numpy(), own.numpy(), atol=1e-5)
    np.testing.assert_allclose(coalesced.numpy(), own.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["(None, 4)", "(None, None)"])
def test_example_grads_compiled(name):
    sig = SIGS[name]

    def body(ids, g):
        pe = embgrad.rows_from_lookups(ids, g, V, per_example=True)
        return (pe.norms(), pe.clip(1.0).sum().to_dense(), pe.scale(2.0).norms(), pe.dot(),
                pe.example(1).to_dense(), pe.example(-1).to_dense(), pe.sum().to_dense(),
                pe.clip(1.0).dot(pe))

    f = _fn(sig, body)
    for seed in (0, 2):
        ids, g = _data(sig, seed)
        if seed == 2:
            ids, g = ids[:3], g[:3]
        norms, clipped, scaled, gram, ex1, exlast, total, gram2 = f(ids, g)
        pe = _per_example(ids, g)
        flat = pe.reshape(len(ids), -1)
        ref_norms = np.linalg.norm(flat, axis=1)
        np.testing.assert_allclose(norms.numpy(), ref_norms, rtol=1e-5)
        factor = np.minimum(1.0, 1.0 / ref_norms)
        np.testing.assert_allclose(clipped.numpy(), (pe * factor[:, None, None]).sum(0), atol=1e-5)
        np.testing.assert_allclose(scaled.numpy(), 2 * ref_norms, rtol=1e-5)
        np.testing.assert_allclose(gram.numpy(), flat @ flat.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gram2.numpy(), (flat * factor[:, None]) @ flat.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ex1.numpy(), pe[1], atol=1e-6)
        np.testing.assert_allclose(exlast.numpy(), pe[-1], atol=1e-6)
        np.testing.assert_allclose(total.numpy(), pe.sum(0), atol=1e-5)


def test_example_index_out_of_range_checked_when_run():
    f = _fn((None, 4), lambda ids, g: embgrad.rows_from_lookups(ids, g, V, per_example=True).example(4).to_dense())
    ids, g = _data((None, 4))
    np.testing.assert_allclose(f(ids, g).numpy(), _per_example(ids, g)[4], atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="example index 4 is out of range"):
        f(ids[:2], g[:2])


def test_shape_mismatch_checked_when_run():
    f = tf.function(lambda ids, g: embgrad.rows_from_lookups(ids, g, V).values,
                    input_signature=[tf.TensorSpec((None, None), tf.int64),
                                     tf.TensorSpec((None, None, D), tf.float32)])
    ids, g = _data((None, None))
    with pytest.raises(tf.errors.InvalidArgumentError, match="output_grad must have shape"):
        f(ids, g[:, :3])
    for _ in range(5):        # the checks run before the kernels they guard, every time
        with pytest.raises(tf.errors.InvalidArgumentError, match="output_grad must have shape"):
            f(ids, g[:, :3])
        with pytest.raises(tf.errors.InvalidArgumentError, match="embgrad: an id is out of range"):
            f(ids + V, g)


@pytest.mark.parametrize("what, match", [
    (lambda r, pe: len(r), r"tf.shape\(g.rows\)\[0\]"),
    (lambda r, pe: r.numpy(), "use g.rows and g.values"),
    (lambda r, pe: len(pe), "input_signature with a fixed batch size, or call it eagerly"),
    (lambda r, pe: pe.to_dense(), "input_signature with a fixed batch size, or call it eagerly"),
])
def test_eager_only_operations_refuse_inside_tf_function(what, match):
    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.int64), tf.TensorSpec((None, 4, D), tf.float32)])
    def f(ids, g):
        r = embgrad.rows_from_lookups(ids, g, V)
        pe = embgrad.rows_from_lookups(ids, g, V, per_example=True)
        what(r, pe)
        return r.values

    ids, g = _data((None, 4))
    with pytest.raises(EmbgradError, match=match):
        f(ids, g)


def test_repr_inside_tf_function():
    seen = []

    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.int64), tf.TensorSpec((None, 4, D), tf.float32)])
    def f(ids, g):
        r = embgrad.rows_from_lookups(ids, g, V)
        seen.append(repr(r))
        return r.values

    f(*_data((None, 4)))
    assert seen == [f"RowGrad(rows=? of {V}, dim={D}, traced, dtype=float32, backend=tensorflow)"]


keras = pytest.importorskip("keras")


def test_regularize_and_capture_compiled_against_tape():
    """regularize() and a capture's RowGrad ops inside a compiled step with unknown batch and
    length, against the dense TensorFlow gradient of the same loss plus the L1/L2 term."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(V, D, name="emb"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    l1, l2 = 0.01, 0.05

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32)])
    def step(x):
        with embgrad.capture(model) as cap:
            loss = tf.reduce_sum(model(x) ** 2)
        g = cap.gradients(loss)["emb"].weight_grad
        reg = embgrad.regularize(g, model, l1=l1, l2=l2)
        return reg.to_dense(), reg.clip_by_norm(0.1).to_dense(), reg.norm(), g.clip_rows(0.01).to_dense()

    table = model.get_layer("emb").embeddings
    for shape in ((4, 6), (2, 9)):
        x = np.random.default_rng(shape[0]).integers(0, V, shape).astype(np.int32)
        dense, clipped, norm, rows_clipped = step(x)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x) ** 2)
        ref = tf.convert_to_tensor(tape.gradient(loss, table)).numpy()
        E = table.numpy()
        touched = np.zeros(V, bool)
        touched[np.unique(x)] = True
        ref_reg = ref + touched[:, None] * (l1 * np.sign(E) + 2 * l2 * E)
        np.testing.assert_allclose(dense.numpy(), ref_reg, atol=1e-6)
        np.testing.assert_allclose(float(norm), np.linalg.norm(ref_reg), rtol=1e-5)
        np.testing.assert_allclose(clipped.numpy(), ref_reg * min(1, 0.1 / np.linalg.norm(ref_reg)), atol=1e-6)
        rn = np.linalg.norm(ref, axis=1, keepdims=True)
        np.testing.assert_allclose(rows_clipped.numpy(), ref * np.minimum(1, 0.01 / np.maximum(rn, 1e-30)), atol=1e-6)
    assert step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("op", ["read", "read_int", "numpy", "assign", "freeze", "attribute", "hotflip",
                                "jacobian"])
def test_value_operations_refuse_inside_tf_function_naming_the_eager_way(op):
    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(V, D, name="emb"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    model(np.zeros((1, 2), np.int32))
    t = embgrad.table(model)
    before = t.numpy()
    ops = {
        "read": lambda x: t.read(x),
        "read_int": lambda x: t.read(3),
        "numpy": lambda x: t.numpy(),
        "assign": lambda x: t.assign([1], np.ones((1, D), np.float32)),
        "freeze": lambda x: t.freeze([1]),
        "attribute": lambda x: embgrad.attribute(model, x, 0, method="saliency"),
        "hotflip": lambda x: embgrad.hotflip(model, x, 0),
        "jacobian": lambda x: embgrad.jacobian(model, x),
    }

    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32)])
    def f(x):
        ops[op](x)
        return tf.constant(0)

    with pytest.raises(EmbgradError, match="runs eagerly only.*(outside the tf.function|eagerly, outside)"):
        f(np.array([[1, 2]], np.int32))
    assert t.frozen_rows.size == 0 and model.get_layer("emb").embeddings.constraint is None
    np.testing.assert_array_equal(t.numpy(), before)


@pytest.mark.parametrize("ids", [
    lambda: tf.ragged.constant([[1, 2], [3]], dtype=tf.int64),
    lambda: tf.sparse.from_dense(tf.constant([[1, 0], [2, 3]], tf.int64)),
])
def test_ragged_and_sparse_ids_refused_clearly(ids):
    with pytest.raises(EmbgradError, match="takes dense tensors.*default_value=PAD"):
        embgrad.rows_from_lookups(ids(), tf.ones((2, 2, D)), V)


def test_key_overflow_refused_eagerly_and_when_the_traced_batch_is_known():
    """(example, row) keys example * V + row must fit int64: refused eagerly; inside a
    tf.function with an unknown batch, checked when it runs (before a wrong result)."""
    ids, g = tf.zeros((3, 1), tf.int64), tf.ones((3, 1, 1))
    with pytest.raises(EmbgradError, match="would overflow int64"):
        embgrad.rows_from_lookups(ids, g, 2 ** 62, per_example=True)

    @tf.function(input_signature=[tf.TensorSpec((None, 1), tf.int64), tf.TensorSpec((None, 1, 1), tf.float32)])
    def f(i, gg):
        return embgrad.rows_from_lookups(i, gg, 2 ** 62, per_example=True).norms()

    np.testing.assert_allclose(f(ids[:1], g[:1]).numpy(), [1.0])     # 1 x 2**62 fits
    with pytest.raises(tf.errors.InvalidArgumentError, match="would overflow int64"):
        f(ids, g)
