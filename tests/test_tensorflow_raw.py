"""Raw TensorFlow: row_grad(IndexedSlices), rows_from_lookups on one's own tf.nn.embedding_lookup,
per-example gradients against tf.vectorized_map and a loop, graph mode, and the TF primitives."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import embgrad
from embgrad import EmbgradError
from embgrad.backends import get_backend

V, D, C = 40, 6, 3


def _model(seed=0):
    """A tiny raw-TF classifier: lookup -> mean -> dense. Returns (table, kernel, forward)."""
    rng = np.random.default_rng(seed)
    table = tf.Variable(rng.normal(size=(V, D)).astype(np.float32))
    kernel = tf.Variable(rng.normal(size=(D, C)).astype(np.float32))

    def forward(ids):
        looked = tf.nn.embedding_lookup(table, ids)               # (B, T, D)
        return looked, tf.reduce_mean(looked, 1) @ kernel         # (B, C)
    return table, kernel, forward


def _data(B=5, T=7, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T))
    ids[0, :3] = 4          # duplicates inside one example
    ids[1, 0] = 4           # ... and across examples
    return tf.constant(ids, tf.int64), tf.constant(rng.integers(0, C, B))


def _xent(logits, y):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)   # (B,)


def test_backend_is_tensorflow_for_raw_tensors():
    assert get_backend(tf.constant([1.0])).name == "tensorflow"
    assert get_backend(tf.Variable([1.0])).name == "tensorflow"
    assert get_backend(tf.IndexedSlices(tf.ones((1, 2)), tf.constant([0]))).name == "tensorflow"


def test_row_grad_of_indexed_slices_matches_dense_tape_gradient():
    table, _, forward = _model()
    ids, y = _data()
    with tf.GradientTape() as tape:
        _, logits = forward(ids)
        loss = tf.reduce_sum(_xent(logits, y))
    g = tape.gradient(loss, table)
    assert isinstance(g, tf.IndexedSlices)
    rg = embgrad.row_grad(g)
    rows, values = rg.numpy()
    assert rg.num_rows == V and rg.rows.dtype == tf.int64 and rg.values.dtype == tf.float32
    np.testing.assert_array_equal(rows, np.unique(ids.numpy()))            # unique, ascending
    np.testing.assert_allclose(rg.to_dense().numpy(), tf.convert_to_tensor(g).numpy(), atol=1e-6)
    # dense (V, D) tensor too: rows with any nonzero are kept
    dense = embgrad.row_grad(tf.convert_to_tensor(g))
    np.testing.assert_array_equal(dense.numpy()[0], rows)
    np.testing.assert_allclose(dense.numpy()[1], values, atol=1e-6)


def test_row_grad_never_densifies_a_huge_table():
    # a (10^12, 4) table would need 16 TB dense: only the 3 looked-up rows are ever touched
    huge = 10 ** 12
    g = tf.IndexedSlices(values=tf.constant([[1.0] * 4, [2.0] * 4, [3.0] * 4]),
                         indices=tf.constant([huge - 1, 7, huge - 1], tf.int64),
                         dense_shape=tf.constant([huge, 4], tf.int64))
    rg = embgrad.row_grad(g)
    rows, values = rg.numpy()
    np.testing.assert_array_equal(rows, [7, huge - 1])
    np.testing.assert_allclose(values, [[2.0] * 4, [4.0] * 4])
    assert rg.num_rows == huge and abs(rg.norm() - np.sqrt(4 * 4 + 16 * 4)) < 1e-5


def test_row_grad_bad_input():
    g = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 9]), tf.constant([5, 3]))
    with pytest.raises(EmbgradError, match="out of range"):
        embgrad.row_grad(g)
    with pytest.raises(EmbgradError, match="cannot tell the table size"):
        embgrad.row_grad(tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 1])))
    assert embgrad.row_grad(tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 1])), num_rows=4).num_rows == 4
    with pytest.raises(EmbgradError, match=r"\(V, D\)"):
        embgrad.row_grad(tf.ones((2, 3, 4)))


def test_rows_from_lookups_matches_tape_and_coalesces_float16():
    table, _, forward = _model()
    ids, y = _data()
    with tf.GradientTape(persistent=True) as tape:
        looked, logits = forward(ids)
        loss = tf.reduce_sum(_xent(logits, y))
    og = tape.gradient(loss, looked)
    rg = embgrad.rows_from_lookups(ids, og, V)
    np.testing.assert_allclose(rg.to_dense().numpy(), tf.convert_to_tensor(tape.gradient(loss, table)).numpy(),
                               atol=1e-6)
    half = embgrad.rows_from_lookups(ids, tf.cast(og, tf.float16), V)
    assert half.values.dtype == tf.float32                          # accumulated in float32
    np.testing.assert_allclose(half.values.numpy(), rg.values.numpy(), atol=2e-3)
    # ignore_index drops one id entirely; numpy ids are accepted too
    ig = embgrad.rows_from_lookups(ids.numpy(), og, V, ignore_index=4)
    assert 4 not in ig.numpy()[0].tolist()
    assert set(ig.numpy()[0].tolist()) == set(rg.numpy()[0].tolist()) - {4}


def _per_example_reference(forward, table, ids, y):
    """(B, V, D) dense per-example gradients by tf.vectorized_map over a per-example tape."""
    def one(args):
        x, t = args
        with tf.GradientTape() as tape:
            _, logits = forward(x[None])
            loss = tf.reduce_sum(_xent(logits, t[None]))
        return tf.convert_to_tensor(tape.gradient(loss, table))
    return tf.vectorized_map(one, (ids, y)).numpy()


def test_per_example_matches_vectorized_map_and_a_loop():
    table, _, forward = _model()
    ids, y = _data()
    with tf.GradientTape() as tape:
        looked, logits = forward(ids)
        loss = tf.reduce_sum(_xent(logits, y))
    eg = embgrad.rows_from_lookups(ids, tape.gradient(loss, looked), V, per_example=True)
    ref = _per_example_reference(forward, table, ids, y)
    np.testing.assert_allclose(eg.to_dense().numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(eg.norms().numpy(), np.linalg.norm(ref.reshape(len(ref), -1), axis=1), rtol=1e-5)
    flat = ref.reshape(len(ref), -1)
    np.testing.assert_allclose(eg.dot().numpy(), flat @ flat.T, rtol=1e-4, atol=1e-5)
    for b in range(len(ref)):                                  # the plain loop, one tape per example
        with tf.GradientTape() as t:
            _, logits = forward(ids[b:b + 1])
            loss = tf.reduce_sum(_xent(logits, y[b:b + 1]))
        rows, vals = eg.example(b).numpy()
        dense_b = tf.convert_to_tensor(t.gradient(loss, table)).numpy()
        np.testing.assert_array_equal(rows, np.unique(ids[b].numpy()))
        np.testing.assert_allclose(vals, dense_b[rows], atol=1e-6)
    clipped = eg.clip(0.1)
    assert float(tf.reduce_max(clipped.norms())) <= 0.1 + 1e-6
    np.testing.assert_allclose(eg.sum().to_dense().numpy(), ref.sum(0), atol=1e-5)


def test_graph_mode_matches_eager():
    table, _, forward = _model()
    ids, y = _data()

    @tf.function
    def step(ids, y):
        with tf.GradientTape(persistent=True) as tape:
            looked, logits = forward(ids)
            loss = tf.reduce_sum(_xent(logits, y))
        eg = embgrad.rows_from_lookups(ids, tape.gradient(loss, looked), V, per_example=True)
        rg = embgrad.row_grad(tape.gradient(loss, table))
        return rg.rows, rg.values, eg.norms(), eg.sum().values

    rows, values, norms, summed = step(ids, y)
    with tf.GradientTape(persistent=True) as tape:
        looked, logits = forward(ids)
        loss = tf.reduce_sum(_xent(logits, y))
    eager = embgrad.row_grad(tape.gradient(loss, table))
    eg = embgrad.rows_from_lookups(ids, tape.gradient(loss, looked), V, per_example=True)
    np.testing.assert_array_equal(rows.numpy(), eager.rows.numpy())
    np.testing.assert_allclose(values.numpy(), eager.values.numpy(), atol=1e-6)
    np.testing.assert_allclose(summed.numpy(), eager.values.numpy(), atol=1e-6)
    np.testing.assert_allclose(norms.numpy(), eg.norms().numpy(), rtol=1e-6)


def test_graph_mode_refuses_out_of_range_ids_at_run_time():
    @tf.function
    def f(ids, og):
        return embgrad.rows_from_lookups(ids, og, 5).values

    og = tf.ones((2, 3, 4))
    assert f(tf.constant([[0, 1, 2], [3, 4, 0]]), og).shape == (5, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of range for a table of 5 rows"):
        f(tf.constant([[0, 1, 2], [3, 5, 0]]), og)


def test_rows_from_lookups_bad_input():
    og = tf.ones((2, 3, 4))
    with pytest.raises(EmbgradError, match="out of range"):
        embgrad.rows_from_lookups(tf.constant([[0, 1, 2], [3, -1, 0]]), og, 5)   # no silent wrap
    with pytest.raises(EmbgradError, match="out of range"):
        embgrad.rows_from_lookups(tf.constant([[0, 1, 2], [3, 5, 0]]), og, 5)
    with pytest.raises(EmbgradError, match="integers"):
        embgrad.rows_from_lookups(tf.constant([[0.0, 1, 2], [3, 4, 0]]), og, 5)
    with pytest.raises(EmbgradError, match="NaN"):
        embgrad.rows_from_lookups(tf.constant([[0, 1, 2], [3, 4, 0]]), og * np.nan, 5)
    empty = embgrad.rows_from_lookups(tf.zeros((0, 3), tf.int32), tf.zeros((0, 3, 4)), 5,
                                      per_example=True)        # an empty batch: empty results
    assert empty.batch_size == 0 and empty.nnz == 0 and tuple(empty.norms().shape) == (0,)
    assert embgrad.rows_from_lookups(tf.zeros((2, 0), tf.int32), tf.zeros((2, 0, 4)), 5,
                                     per_example=True).norms().numpy().tolist() == [0.0, 0.0]
    with pytest.raises(EmbgradError, match="shape"):
        embgrad.rows_from_lookups(tf.constant([[0, 1]]), og, 5)


def test_tf_unique_is_sorted_with_inverse():
    b = get_backend(tf.constant([1]))
    x = tf.constant([5, 3, 5, 9, 0, 3], tf.int64)
    u, inv = b.ops.unique(x)
    np.testing.assert_array_equal(u.numpy(), [0, 3, 5, 9])
    np.testing.assert_array_equal(tf.gather(u, inv).numpy(), x.numpy())
    assert inv.dtype == tf.int64 and b.ops.argsort(x).dtype == tf.int64


def test_compiled_hot_path_is_correct_across_shapes_without_retracing_each():
    import functools

    from embgrad.backends.tensorflow import TensorFlowBackend
    from embgrad.sparse import _coalesce_lookups_impl, _norms_impl, coalesce_lookups

    b = TensorFlowBackend()                       # its own cache of compiled functions
    rng = np.random.default_rng(3)
    for n in range(1, 10):                        # a new number of lookups every call
        ids = rng.integers(0, 7, (n, 3))
        og = rng.normal(size=(n, 3, 2)).astype(np.float32)
        ex = tf.constant(np.repeat(np.arange(n), 3))
        eg = coalesce_lookups(b, ex, tf.constant(ids.ravel()), tf.constant(og.reshape(-1, 2)), 7, n, True)
        ref = np.zeros((n, 7, 2), np.float32)
        np.add.at(ref, (np.repeat(np.arange(n), 3), ids.ravel()), og.reshape(-1, 2))
        np.testing.assert_allclose(eg.to_dense().numpy(), ref, atol=1e-6)
    compiled = b.ops.compile(functools.partial(_coalesce_lookups_impl, b))
    assert isinstance(compiled.tf_function, tf.types.experimental.GenericFunction)
    assert compiled.tf_function.experimental_get_tracing_count() <= 3   # shapes generalise after a few
    # ints (batch and table sizes) go in as tensors: other sizes reuse the trace
    norms = b.ops.compile(functools.partial(_norms_impl, b))
    for n in range(1, 8):
        v = tf.ones((n, 2))
        np.testing.assert_allclose(norms(v, tf.range(n, dtype=tf.int64) % 2, 2).numpy(),
                                   np.sqrt([2.0 * ((n + 1) // 2), 2.0 * (n // 2)]))
    assert norms.tf_function.experimental_get_tracing_count() <= 3


def test_same_results_as_pytorch_on_random_lookups():
    torch = pytest.importorskip("torch")
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=10, deadline=None, derandomize=True)
    @given(B=st.integers(1, 5), T=st.integers(1, 6), V=st.integers(1, 9), seed=st.integers(0, 2**16))
    def check(B, T, V, seed):
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, V, (B, T))
        og = rng.normal(size=(B, T, 3)).astype(np.float32)
        e_tf = embgrad.rows_from_lookups(tf.constant(ids), tf.constant(og), V, per_example=True)
        e_pt = embgrad.rows_from_lookups(torch.tensor(ids), torch.tensor(og), V, per_example=True)
        for a, b in ((e_tf.example_ids, e_pt.example_ids), (e_tf.rows, e_pt.rows)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(e_tf.values.numpy(), e_pt.values.numpy(), atol=1e-6)
        np.testing.assert_allclose(e_tf.dot().numpy(), e_pt.dot().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(e_tf.clip(0.5).sum().values.numpy(), e_pt.clip(0.5).sum().values.numpy(),
                                   rtol=1e-5, atol=1e-6)
        r_tf, r_pt = e_tf.sum() + e_tf.example(0), e_pt.sum() + e_pt.example(0)
        np.testing.assert_array_equal(r_tf.rows.numpy(), r_pt.rows.numpy())
        np.testing.assert_allclose(r_tf.values.numpy(), r_pt.values.numpy(), atol=1e-5)

    check()


@pytest.mark.parametrize("framework", ["tensorflow", "torch"])
def test_every_lookup_ignored_gives_empty_results(framework):
    if framework == "torch":
        torch = pytest.importorskip("torch")
        ids, og = torch.tensor([[3, 3], [3, 3]]), torch.ones(2, 2, 4)
    else:
        ids, og = tf.constant([[3, 3], [3, 3]]), tf.ones((2, 2, 4))
    rg = embgrad.rows_from_lookups(ids, og, 10, ignore_index=3)
    pe = embgrad.rows_from_lookups(ids, og, 10, per_example=True, ignore_index=3)
    assert len(rg) == 0 and rg.norm() == 0.0 and pe.nnz == 0 and "rows=0 of 10" in repr(rg)
    np.testing.assert_array_equal(np.asarray(rg.to_dense()), np.zeros((10, 4)))
    np.testing.assert_array_equal(np.asarray(pe.norms()), [0.0, 0.0])
    assert len(pe.clip(1.0).sum()) == 0 and np.asarray(pe.dot()).tolist() == [[0.0, 0.0], [0.0, 0.0]]
