"""Issue 12 items 2-4 (Gluon): several forwards of a model inside one capture (each call of the
captured Block is one forward: distinct examples by default, ``forwards="same_examples"`` by
name, a warning for calls outside any forward), a loss that does not depend on the recorded
lookups refused with the same message as on every backend, and empty batches (MXNet makes them
under NumPy shape semantics) giving empty results with zero norms, as on PyTorch and Keras.
References: per-example loops of MXNet's own autograd (dense ``weight.grad()``)."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402

V, D = 12, 4


class Small(gluon.Block):
    def __init__(self, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.emb = nn.Embedding(V, D)
            self.head = nn.Dense(1, in_units=D, flatten=False)

    def forward(self, x):
        return (nd.tanh(self.head(self.emb(x)).squeeze(axis=-1)) ** 2).sum(axis=1) * 3


class SmallHybrid(gluon.HybridBlock):
    def __init__(self, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.emb = nn.Embedding(V, D)
            self.head = nn.Dense(1, in_units=D, flatten=False)

    def hybrid_forward(self, F, x):
        return (F.tanh(self.head(self.emb(x)).squeeze(axis=-1)) ** 2).sum(axis=1) * 3


def _ids(B, T=5, seed=0):
    return nd.array(np.random.RandomState(seed).randint(0, V, (B, T)), dtype="int64")


def _model(seed=0, hybrid=False):
    mx.random.seed(seed)
    m = SmallHybrid() if hybrid else Small()
    m.initialize(mx.init.Uniform(0.5))
    if hybrid:
        m.hybridize()
    m(_ids(1))
    return m


def _grad(model, fn):
    w = model.emb.weight
    w.zero_grad()
    with autograd.record():
        loss = fn()
    loss.backward()
    g = w.grad().asnumpy().copy()
    w.zero_grad()
    return g


def _loop(model, xs, fwd=None):
    fwd = fwd or (lambda x: model(x).sum())
    return np.stack([_grad(model, lambda x=x: fwd(x)) for x in xs])


@pytest.mark.parametrize("hybrid", [False, True])
def test_two_forwards_are_distinct_examples(hybrid):
    model = _model(0, hybrid)
    a, b = _ids(3, seed=1), _ids(2, seed=2)
    with embgrad.capture(model) as cap:
        with autograd.record():
            loss = model(a).sum() + model(b).sum()          # gradient accumulation
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 5
    ref = _loop(model, [a[i:i + 1] for i in range(3)] + [b[i:i + 1] for i in range(2)])
    np.testing.assert_allclose(pe.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-6)
    assert "forward" not in model.__dict__ and "forward" not in model.emb.__dict__


def test_two_forwards_same_size_not_merged_and_mean():
    model = _model(1)
    a, b = _ids(2, seed=3), _ids(2, seed=4)
    with embgrad.capture(model) as cap:
        with autograd.record():
            loss = (model(a).sum() + model(b).sum()) / 4
    pe = cap.gradients(loss, loss_reduction="mean").only().per_example()
    ref = _loop(model, [a[:1], a[1:], b[:1], b[1:]])
    np.testing.assert_allclose(pe.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-6)


def test_same_examples_by_name_for_towers_run_as_separate_forwards():
    model = _model(2)
    a, b = _ids(3, seed=5), _ids(3, T=4, seed=6)
    with embgrad.capture(model, forwards="same_examples") as cap:
        with autograd.record():
            loss = (model(a) * model(b)).sum()              # example i is the pair (a_i, b_i)
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 3
    ref = np.stack([_grad(model, lambda i=i: (model(a[i:i + 1]) * model(b[i:i + 1])).sum()) for i in range(3)])
    np.testing.assert_allclose(pe.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-6)
    with embgrad.capture(model, forwards="same_examples") as cap:
        with autograd.record():
            loss = model(a).sum() + model(b[:2]).sum()
    with pytest.raises(EmbgradError, match="same_examples.*different batch sizes"):
        cap.gradients(loss).only().per_example()


def test_calls_outside_the_models_forward_warn_what_was_assumed():
    model = _model(3)
    a, b = _ids(2, seed=7), _ids(2, seed=8)
    with embgrad.capture(model) as cap:                     # the layer called directly, twice
        with autograd.record():
            loss = (model.emb(a).sum(axis=1) * model.emb(b).sum(axis=1)).sum()
    g = cap.gradients(loss).only()
    with pytest.warns(UserWarning, match="ran outside any forward.*SAME examples"):
        pe = g.per_example()
    ref = np.stack([_grad(model, lambda i=i: (model.emb(a[i:i + 1]).sum(axis=1)
                                              * model.emb(b[i:i + 1]).sum(axis=1)).sum()) for i in range(2)])
    np.testing.assert_allclose(pe.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-6)


def test_forward_that_raises_ends_its_forward():
    model = _model(4)
    a = _ids(2, seed=9)
    with embgrad.capture(model) as cap:
        with autograd.record():
            with pytest.raises(EmbgradError, match="out of range"):
                model(nd.array([[V + 3, 0]], dtype="int64"))
            loss = model(a).sum()
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 2
    np.testing.assert_allclose(pe.to_dense().asnumpy(), _loop(model, [a[:1], a[1:]]), rtol=1e-5, atol=1e-6)
    assert "forward" not in model.__dict__


def test_embedding_captured_alone_counts_its_calls_as_forwards():
    model = _model(5)
    a, b = _ids(2, seed=10), _ids(3, seed=11)
    with embgrad.capture(model.emb) as cap:
        with autograd.record():
            loss = (model.emb(a) ** 2).sum() + (model.emb(b) ** 3).sum()
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 5
    ref = np.stack([_grad(model, lambda i=i: (model.emb(a[i:i + 1]) ** 2).sum()) for i in range(2)]
                   + [_grad(model, lambda i=i: (model.emb(b[i:i + 1]) ** 3).sum()) for i in range(3)])
    np.testing.assert_allclose(pe.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-6)
    assert "forward" not in model.emb.__dict__


# ---------------------------------------------------------------- item 3
def test_loss_from_a_forward_before_the_block_is_refused_and_partial_reach_is_zero():
    model = _model(6)
    x = _ids(2, seed=12)
    with autograd.record():
        old = model(x).sum()
    with embgrad.capture(model) as cap:
        with autograd.record():
            model(x)
    with pytest.raises(EmbgradError, match="does not depend on any lookup recorded in this capture"):
        cap.gradients(old)
    # a loss from the second forward only: the first forward's examples get zero gradients
    a, b = _ids(2, seed=13), _ids(3, seed=14)
    with embgrad.capture(model) as cap:
        with autograd.record():
            model(a)
            loss = model(b).sum()
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 5
    ref = _loop(model, [b[i:i + 1] for i in range(3)])
    np.testing.assert_allclose(pe.norms().asnumpy()[:2], [0.0, 0.0])
    np.testing.assert_allclose(pe.to_dense().asnumpy()[2:], ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- item 4
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batches_give_empty_results(shape):
    model = _model(7)
    with mx.util.np_shape(True):            # MXNet accepts empty arrays only with NumPy shapes
        x = nd.zeros(shape, dtype="int64")
        with embgrad.capture(model.emb) as cap:
            with autograd.record():
                loss = model.emb(x).sum()
        g = cap.gradients(loss).only()
        pe = g.per_example()
        assert pe.batch_size == shape[0] and pe.nnz == 0
        np.testing.assert_array_equal(pe.norms().asnumpy(), np.zeros(shape[0]))
        assert g.weight_grad.norm() == 0.0 and len(g.weight_grad) == 0
        assert pe.clip(1.0).sum().norm() == 0.0
