"""Gluon per-example gradients from one backward pass, against the usual Gluon answer: one
backward per example with ``grad_req='add'``; and the sparse algebra on MXNet arrays."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mxnet import autograd, nd  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402
from gluon_helpers import (LOSS, Classifier, TwoTower, assert_unchanged, ids, labels, make,  # noqa: E402
                           per_example_loop, snapshot)


def _check_against(pe, ref):
    """ExampleGrads ``pe`` against dense per-example gradients ``ref`` (B, V, D) NumPy."""
    B = ref.shape[0]
    flat = ref.reshape(B, -1)
    np.testing.assert_allclose(pe.to_dense().asnumpy(), ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(pe.norms().asnumpy(), np.linalg.norm(flat, axis=1), rtol=1e-4)
    np.testing.assert_allclose(pe.dot().asnumpy(), flat @ flat.T, rtol=1e-4, atol=1e-9)
    for b in (0, B - 1):
        rows, vals = pe.example(b).numpy()        # the rows b looked up (some may get 0)
        assert set(np.flatnonzero(np.abs(ref[b]).sum(1) > 0)) <= set(rows.tolist())
        np.testing.assert_allclose(vals, ref[b][rows], rtol=1e-4, atol=1e-7)
    c = 0.5 * float(np.median(np.linalg.norm(flat, axis=1)))
    clipped = ref * np.minimum(1.0, c / np.linalg.norm(flat, axis=1))[:, None, None]
    np.testing.assert_allclose(pe.clip(c).to_dense().asnumpy(), clipped, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("hybridize", [False, True])
def test_per_example_matches_one_backward_per_example(hybridize):
    B, T, V = 6, 5, 30
    x, y = ids(B, T, V, seed=7), labels(B, 3)
    model = make(Classifier(V=V), x)
    if hybridize:
        model.hybridize()
        model(x)
    before = snapshot(model)
    with embgrad.capture(model) as cap:
        with autograd.record():
            loss = LOSS(model(x), y).sum()
    g = cap.gradients(loss).only()
    pe = g.per_example()
    assert_unchanged(model, before)
    assert pe.batch_size == B and pe.nnz == sum(len(np.unique(r)) for r in x.asnumpy())
    ref = per_example_loop(model, lambda b: LOSS(model(x[b:b + 1]), y[b:b + 1]).sum(),
                           model.emb.weight, B)
    _check_against(pe, ref)
    np.testing.assert_allclose(pe.sum().to_dense().asnumpy(), g.weight_grad.to_dense().asnumpy(),
                               rtol=1e-5, atol=1e-7)


def test_mean_loss_gives_each_examples_own_gradient():
    B, T, V = 5, 4, 30
    x, y = ids(B, T, V, seed=8), labels(B, 3)
    model = make(Classifier(V=V), x)
    with embgrad.capture(model) as cap:
        with autograd.record():
            loss = LOSS(model(x), y).mean()
    g = cap.gradients(loss, loss_reduction="mean").only()
    ref = per_example_loop(model, lambda b: LOSS(model(x[b:b + 1]), y[b:b + 1]).sum(),
                           model.emb.weight, B)
    _check_against(g.per_example(), ref)
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), ref.sum(0) / B, rtol=1e-4, atol=1e-7)


def test_two_calls_and_sparse_grad_per_example():
    B = 4
    a, b2, y = ids(B, 5, 25, seed=1), ids(B, 3, 25, seed=2), labels(B, 2)
    model = make(TwoTower(), a, b2)
    with embgrad.capture(model, layers="words") as cap:
        with autograd.record():
            loss = LOSS(model(a, b2), y).sum()
    pe = cap.gradients(loss).only().per_example()
    ref = per_example_loop(model, lambda i: LOSS(model(a[i:i + 1], b2[i:i + 1]), y[i:i + 1]).sum(),
                           model.words.weight, B)
    _check_against(pe, ref)

    # sparse_grad=True: MXNet's sparse Embedding only supports grad_req='write', so the loop
    # reference reads each example's row_sparse gradient directly
    x, y = ids(B, 6, 30, seed=3), labels(B, 3)
    model = make(Classifier(V=30, sparse_grad=True), x)
    with embgrad.capture(model) as cap:
        with autograd.record():
            loss = LOSS(model(x), y).sum()
    pe = cap.gradients(loss).only().per_example()
    ref = []
    for i in range(B):
        with autograd.record():
            li = LOSS(model(x[i:i + 1]), y[i:i + 1]).sum()
        li.backward()
        ref.append(embgrad.row_grad(model.emb.weight.grad()).to_dense().asnumpy())
    _check_against(pe, np.stack(ref))


def test_rows_from_lookups_on_gluon_arrays():
    rng = np.random.RandomState(0)
    x = rng.randint(0, 12, size=(3, 5))
    og = rng.randn(3, 5, 4).astype(np.float32)
    rg = embgrad.rows_from_lookups(nd.array(x, dtype="int64"), nd.array(og), 12)
    dense = np.zeros((12, 4))
    np.add.at(dense, x.ravel(), og.reshape(-1, 4))
    np.testing.assert_allclose(rg.to_dense().asnumpy(), dense, rtol=1e-5, atol=1e-6)
    pe = embgrad.rows_from_lookups(nd.array(x, dtype="int64"), nd.array(og), 12, per_example=True,
                                   ignore_index=int(x[0, 0]))
    ref = np.zeros((3, 12, 4))
    for b in range(3):
        keep = x[b] != x[0, 0]
        np.add.at(ref[b], x[b][keep], og[b][keep])
    np.testing.assert_allclose(pe.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-6)
    s = rg + embgrad.rows_from_lookups(nd.array(x[:1], dtype="int64"), nd.array(og[:1]), 12)
    np.add.at(dense, x[0], og[0])
    np.testing.assert_allclose(s.to_dense().asnumpy(), dense, rtol=1e-5, atol=1e-6)
    with pytest.raises(EmbgradError, match="to_dense"):
        pe.to_dense(max_bytes=100)
    with pytest.raises(EmbgradError, match="out of range"):
        embgrad.rows_from_lookups(nd.array(x, dtype="int64"), nd.array(og), 5)


def test_int64_keys_beyond_float_precision():
    """Example-row keys B·V + row far above 2**53 stay exact (no float round trip)."""
    V = 2 ** 55
    rows = np.array([[V - 1, 5, V - 1], [3, V - 2, 3]], dtype=np.int64)
    og = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    pe = embgrad.rows_from_lookups(nd.array(rows, dtype="int64"), nd.array(og), V, per_example=True)
    got_ex = pe.example_ids.asnumpy()
    got_rows = pe.rows.asnumpy()
    np.testing.assert_array_equal(got_ex, [0, 0, 1, 1])
    np.testing.assert_array_equal(got_rows, [5, V - 1, 3, V - 2])
    np.testing.assert_allclose(pe.values.asnumpy(), [og[0, 1], og[0, 0] + og[0, 2],
                                                     og[1, 0] + og[1, 2], og[1, 1]])


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 6), V=st.integers(1, 9), D=st.integers(1, 3),
       seed=st.integers(0, 2 ** 16))
def test_property_per_example_sums_and_dots(B, T, V, D, seed):
    rng = np.random.RandomState(seed)
    x = rng.randint(0, V, size=(B, T))
    og = rng.randn(B, T, D).astype(np.float32)
    pe = embgrad.rows_from_lookups(nd.array(x, dtype="int64"), nd.array(og), V, per_example=True)
    ref = np.zeros((B, V, D))
    for b in range(B):
        np.add.at(ref[b], x[b], og[b])
    np.testing.assert_allclose(pe.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-5)
    flat = ref.reshape(B, -1)
    np.testing.assert_allclose(pe.dot().asnumpy(), flat @ flat.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pe.sum().to_dense().asnumpy(), ref.sum(0), rtol=1e-5, atol=1e-5)


def test_batchnorm_coupling_is_warned():
    from mxnet import gluon
    from mxnet.gluon import nn
    net = nn.HybridSequential()
    net.add(nn.Embedding(20, 4), nn.BatchNorm(axis=2), nn.Dense(2, flatten=True))
    x = ids(3, 5, 20)
    make(net, x)
    with embgrad.capture(net) as cap:
        with autograd.record():
            loss = (net(x) ** 2).sum()
    with pytest.warns(UserWarning, match="couple the examples.*BatchNorm"):
        cap.gradients(loss).only().per_example()
    assert isinstance(net[1], gluon.nn.BatchNorm)


def test_every_lookup_ignored_gives_empty_results_not_an_mxnet_error():
    ids, og = nd.array([[3, 3], [3, 3]], dtype="int64"), nd.ones((2, 2, 4))
    rg = embgrad.rows_from_lookups(ids, og, 10, ignore_index=3)
    pe = embgrad.rows_from_lookups(ids, og, 10, per_example=True, ignore_index=3)
    assert len(rg) == 0 and rg.norm() == 0.0 and pe.nnz == 0 and "rows=0 of 10" in repr(rg)
    np.testing.assert_array_equal(rg.to_dense().asnumpy(), np.zeros((10, 4)))
    np.testing.assert_array_equal(pe.norms().asnumpy(), [0.0, 0.0])
    assert len(pe.clip(1.0).sum()) == 0 and pe.dot().asnumpy().tolist() == [[0.0, 0.0], [0.0, 0.0]]
    mx.nd.waitall()                        # no failed asynchronous MXNet op left behind
