"""Issue 12 items 8 (Gluon): embgrad's own backward leaves BatchNorm's running statistics (which
MXNet updates in backward) and the user's own backward exactly as without embgrad; Dropout's
retain-graph trap is refused; a loss from a forward run before the capture is refused instead of
giving an all-zero gradient. References: the same steps without embgrad, and MXNet's own grads."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402


class _Net(gluon.Block):
    def __init__(self, dropout=False, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.emb = nn.Embedding(12, 4)
            self.bn = nn.BatchNorm(in_channels=4)
            self.drop = nn.Dropout(0.5) if dropout else None
            self.head = nn.Dense(2, in_units=4)

    def forward(self, x):
        h = self.bn(self.emb(x).mean(axis=1))
        return self.head(self.drop(h) if self.drop is not None else h)


X = nd.array([[1, 2, 3], [4, 5, 6], [7, 8, 1]], dtype="int64")


def _net(dropout=False):
    mx.random.seed(0)
    net = _Net(dropout)
    net.initialize(mx.init.Xavier())
    net(X)
    return net


def _state(net):
    params = list(net.collect_params().values())          # the same order in every _Net
    stats = {i: p.data().asnumpy().copy() for i, p in enumerate(params) if "running" in p.name}
    grads = {i: p.grad().asnumpy().copy() for i, p in enumerate(params) if p.grad_req != "null"}
    return stats, grads


def _step(with_embgrad):
    """One train-mode forward and the user's own backward (with embgrad: gradients() first,
    keeping the graph); returns the model's statistics and .grad, and embgrad's result."""
    net = _net()
    for p in net.collect_params().values():
        p.zero_grad()
    result = None
    if with_embgrad:
        with embgrad.capture(net) as cap:
            with autograd.record():
                loss = net(X).sum()
        result = cap.gradients(loss, retain_graph=True).only().weight_grad.to_dense().asnumpy()
    else:
        with autograd.record():
            loss = net(X).sum()
    loss.backward()
    return _state(net), result


def test_batchnorm_statistics_and_user_backward_as_without_embgrad():
    (stats_ref, grads_ref), _ = _step(False)
    (stats, grads), captured = _step(True)
    for k in stats_ref:
        np.testing.assert_array_equal(stats[k], stats_ref[k])      # updated once, by the user's backward
    for k in grads_ref:
        np.testing.assert_allclose(grads[k], grads_ref[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(captured, grads_ref[0], rtol=1e-5, atol=1e-6)   # the embedding's weight


def test_gradients_alone_leave_batchnorm_statistics():
    net = _net()
    before, _ = _state(net)
    with embgrad.capture(net) as cap:
        with autograd.record():
            loss = net(X).sum()
    after_forward, _ = _state(net)
    cap.gradients(loss)
    after, _ = _state(net)
    for k in before:
        np.testing.assert_array_equal(after[k], after_forward[k])


def test_dropout_retain_graph_then_backward_refused_and_the_safe_order_works():
    net = _net(dropout=True)
    with embgrad.capture(net) as cap:
        with autograd.record():
            loss = net(X).sum()
    with pytest.raises(EmbgradError, match="Dropout .* in training mode.*loss.backward\\(\\) first"):
        cap.gradients(loss, retain_graph=True)
    # the order the message gives: the user's backward, then gradients() without a loss
    for p in net.collect_params().values():
        p.zero_grad()
    loss.backward()
    own = net.emb.weight.grad().asnumpy().copy()
    got = cap.gradients().only().weight_grad.to_dense().asnumpy()
    np.testing.assert_allclose(got, own, rtol=1e-5, atol=1e-6)
    assert np.abs(own).sum() > 0 and not np.allclose(own[own != 0], 1.0)


def test_loss_from_a_forward_before_the_block_refused():
    net = _net()
    with autograd.record():
        old_loss = net(X).sum()
    with embgrad.capture(net) as cap:
        with autograd.record():
            net(X)
    with pytest.raises(EmbgradError, match="does not depend on any lookup recorded"):
        cap.gradients(old_loss)


def test_loss_reaching_only_some_layers_still_works():
    """Two tables, the loss uses one: the other's gradient is zero (not a refusal), and the
    used one's equals MXNet's own."""
    class Two(gluon.Block):
        def __init__(self, **kw):
            super().__init__(**kw)
            with self.name_scope():
                self.a = nn.Embedding(12, 3)
                self.b = nn.Embedding(12, 3)

        def forward(self, x):
            return self.a(x), self.b(x)

    net = Two()
    net.initialize()
    with embgrad.capture(net) as cap:
        with autograd.record():
            ya, _ = net(X)
            loss = (ya ** 2).sum()
    g = cap.gradients(loss, retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(g[net.a.name].weight_grad.to_dense().asnumpy(),
                               net.a.weight.grad().asnumpy(), rtol=1e-6)
    assert g[net.b.name].weight_grad.norm() == 0.0


def test_key_overflow_refused():
    ids = nd.zeros((3, 1), dtype="int64")
    with pytest.raises(EmbgradError, match="would overflow int64"):
        embgrad.rows_from_lookups(ids, nd.ones((3, 1, 1)), 2 ** 62, per_example=True)
    one = embgrad.rows_from_lookups(ids[:1], nd.ones((1, 1, 1)), 2 ** 62, per_example=True)
    np.testing.assert_allclose(one.norms().asnumpy(), [1.0])
