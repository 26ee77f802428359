"""Gluon capture: ids, output gradients and table gradients, checked against MXNet's own
``weight.grad()`` (dense, and row_sparse with ``sparse_grad=True``); the model untouched."""
from __future__ import annotations

import subprocess
import sys

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402
from gluon_helpers import (LOSS, Classifier, TwoTower, assert_unchanged, dense_grads,  # noqa: E402
                           ids, labels, make, per_example_loop, snapshot)


def _record(model, *inputs, y, layers=None):
    """The Gluon way: forward and loss inside autograd.record(), inside a capture."""
    with embgrad.capture(model, layers=layers) as cap:
        with autograd.record():
            loss = LOSS(model(*inputs), y).sum()
    return cap, loss


def _capture(model, *inputs, y, layers=None, **kw):
    cap, loss = _record(model, *inputs, y=y, layers=layers)
    return cap, cap.gradients(loss, **kw)


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("hybridize", [False, True])
def test_weight_grad_matches_gluon_and_leaves_model_alone(sparse_grad, hybridize):
    x, y = ids(5, 7, 30), labels(5, 3)
    model = make(Classifier(sparse_grad=sparse_grad), x)
    if hybridize:
        model.hybridize()
        model(x)                                  # builds the cached graph
    before = snapshot(model)
    cap, grads = _capture(model, x, y=y)
    assert_unchanged(model, before)               # no grad written, forward and flags restored
    g = grads.only()
    assert g is grads[model.emb.name] and g.name == model.emb.name
    assert (g.num_rows, g.dim, g.tied, g.frozen) == (30, 6, False, False)
    assert g.ids is x and isinstance(g.output_grad, nd.NDArray)
    assert tuple(g.output_grad.shape) == (5, 7, 6)
    rg = g.weight_grad
    assert isinstance(rg.values, nd.NDArray) and rg.rows.dtype == np.int64
    assert rg.values.dtype == np.float32
    rows, values = rg.numpy()
    np.testing.assert_array_equal(rows, np.unique(x.asnumpy()))
    ref, = dense_grads(model, lambda: LOSS(model(x), y).sum(), [model.emb.weight])
    np.testing.assert_allclose(rg.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rg.norm(), np.linalg.norm(ref), rtol=1e-5)
    np.testing.assert_allclose(rg.row_norms().asnumpy(), np.linalg.norm(ref[rows], axis=1), rtol=1e-5)
    # dLoss/d(looked-up vectors), reconstructed into the table, is the table gradient
    dense = np.zeros((30, 6))
    np.add.at(dense, x.asnumpy().ravel(), g.output_grad.asnumpy().reshape(-1, 6))
    np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-7)


def test_row_grad_of_gluons_row_sparse_gradient():
    x, y = ids(4, 6, 30, seed=3), labels(4, 3)
    model = make(Classifier(sparse_grad=True), x)
    with autograd.record():
        loss = LOSS(model(x), y).sum()
    loss.backward()
    wg = model.emb.weight.grad()
    assert wg.stype == "row_sparse"
    rg = embgrad.row_grad(wg)
    _, grads = _capture(model, x, y=y)
    mine = grads.only().weight_grad
    np.testing.assert_array_equal(rg.numpy()[0], mine.numpy()[0])
    np.testing.assert_allclose(rg.numpy()[1], mine.numpy()[1], rtol=1e-5, atol=1e-7)
    dense = embgrad.row_grad(wg.tostype("default"))           # dense (V, D) input as well
    np.testing.assert_array_equal(dense.numpy()[0], np.unique(x.asnumpy()))
    zero = embgrad.row_grad(nd.zeros((30, 6)))                # all-zero gradient
    assert zero.norm() == 0.0 and zero.to_dense().shape == (30, 6)
    with pytest.raises(EmbgradError, match=r"\(V, D\)"):
        embgrad.row_grad(nd.zeros((30,)))
    with pytest.raises(EmbgradError, match="num_rows=7"):
        embgrad.row_grad(wg, num_rows=7)


def test_user_backward_then_gradients_without_loss():
    """The Gluon training loop: loss.backward() (the user's own), then cap.gradients()."""
    x, y = ids(3, 5, 30), labels(3, 3)
    model = make(Classifier(), x)
    cap, loss = _record(model, x, y=y)
    with pytest.raises(EmbgradError, match="no backward pass"):
        cap.gradients()
    loss.backward()
    g = cap.gradients().only()
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(),
                               model.emb.weight.grad().asnumpy(), rtol=1e-5, atol=1e-7)


def test_block_with_two_calls_and_two_tables():
    a, b, y = ids(4, 6, 25, seed=1), ids(4, 3, 25, seed=2), labels(4, 2)
    model = make(TwoTower(), a, b)
    before = snapshot(model)
    cap, grads = _capture(model, a, b, y=y)
    assert_unchanged(model, before)
    assert set(grads) == {model.words.name, model.pos.name}
    words = grads[model.words.name]
    assert len(words.calls) == 2 and words.ids is a and words.calls[1][0] is b
    ref_w, ref_p = dense_grads(model, lambda: LOSS(model(a, b), y).sum(),
                               [model.words.weight, model.pos.weight])
    np.testing.assert_allclose(words.weight_grad.to_dense().asnumpy(), ref_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads[model.pos.name].weight_grad.to_dense().asnumpy(), ref_p,
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(EmbgradError, match="exactly one"):
        grads.only()
    # selecting by Gluon name, by child path, by object
    for sel in (model.pos.name, "pos", model.pos):
        _, one = _capture(model, a, b, y=y, layers=sel)
        assert list(one) == [sel if isinstance(sel, str) else model.pos.name]   # the name given
        assert one[model.pos.name] is one.only()


def test_grad_req_add_and_accumulated_grads_untouched():
    x, y = ids(3, 4, 30), labels(3, 3)
    model = make(Classifier(), x)
    for p in model.collect_params().values():
        p.grad_req = "add"
    with autograd.record():
        LOSS(model(x), y).sum().backward()             # something accumulated already
    model.head.bias.grad_req = "null"                   # and one frozen parameter
    before = snapshot(model)
    _capture(model, x, y=y)
    assert_unchanged(model, before)
    assert model.emb.weight.grad_req == "add" and model.head.bias.grad_req == "null"


def test_frozen_and_tied_tables():
    x, y = ids(3, 4, 30), labels(3, 3)
    model = make(Classifier(), x)
    model.emb.weight.grad_req = "null"
    _, grads = _capture(model, x, y=y)
    g = grads.only()
    assert g.frozen                                       # lookups still have a gradient:
    model.emb.weight.grad_req = "write"                   # the one MXNet gives the table when trained
    ref, = dense_grads(model, lambda: LOSS(model(x), y).sum(), [model.emb.weight])
    assert np.abs(ref).sum() > 0
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-7)

    class TiedLM(gluon.Block):
        def __init__(self, **kw):
            super().__init__(**kw)
            with self.name_scope():
                self.emb = nn.Embedding(20, 4)
                self.out = nn.Dense(20, in_units=4, params=self.emb.params)   # shares the table
        def forward(self, x):
            return self.out(self.emb(x).mean(axis=1))

    class UntiedLM(gluon.Block):    # the same function, the output layer holding its own copy
        def __init__(self, **kw):
            super().__init__(**kw)
            with self.name_scope():
                self.emb = nn.Embedding(20, 4)
                self.out = nn.Dense(20, in_units=4)
        def forward(self, x):
            return self.out(self.emb(x).mean(axis=1))

    x2, y2 = ids(3, 4, 20), labels(3, 20)
    lm = make(TiedLM(), x2)
    _, grads = _capture(lm, x2, y=y2)
    g = grads.only()
    assert g.tied and "tied=True" in repr(g)
    # the table's gradient through its lookups: in the untied copy, that is the embedding's own
    untied = make(UntiedLM(), x2)
    untied.emb.weight.set_data(lm.emb.weight.data().copy())
    untied.out.weight.set_data(lm.emb.weight.data().copy())
    untied.out.bias.set_data(lm.out.bias.data().copy())
    ref, = dense_grads(untied, lambda: LOSS(untied(x2), y2).sum(), [untied.emb.weight])
    assert np.abs(ref).sum() > 0
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-7)


def test_sources_return_parameter_gradients():
    x, y = ids(3, 4, 30), labels(3, 3)
    model = make(Classifier(), x)
    before = snapshot(model)
    _, grads = _capture(model, x, y=y, sources=[model.head.weight])
    assert_unchanged(model, before)
    ref, = dense_grads(model, lambda: LOSS(model(x), y).sum(), [model.head.weight])
    np.testing.assert_allclose(grads.sources[0].asnumpy(), ref, rtol=1e-5, atol=1e-7)


def test_unused_lookup_gets_zero_gradient():
    class Unused(gluon.Block):
        def __init__(self, **kw):
            super().__init__(**kw)
            with self.name_scope():
                self.emb = nn.Embedding(10, 3)
                self.head = nn.Dense(2, in_units=3)
        def forward(self, x):
            self.emb(x[:, :1])                         # looked up, never used
            return self.head(self.emb(x).sum(axis=1))

    x = ids(2, 3, 10)
    model = make(Unused(), x)
    _, grads = _capture(model, x, y=labels(2, 2))
    g = grads.only()
    assert len(g.calls) == 2 and float(nd.abs(g.calls[0][1]).sum().asscalar()) == 0.0
    ref, = dense_grads(model, lambda: LOSS(model(x), labels(2, 2)).sum(), [model.emb.weight])
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-7)


def test_ids_with_more_dims_and_int32():
    x3 = nd.array(np.random.RandomState(0).randint(0, 30, size=(2, 3, 4)), dtype="int32")
    emb = nn.Embedding(30, 5)
    emb.initialize()
    with embgrad.capture(emb) as cap:
        with autograd.record():
            loss = (emb(x3) ** 2).sum()
    g = cap.gradients(loss).only()
    ref, = dense_grads(emb, lambda: (emb(x3) ** 2).sum(), [emb.weight])
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), ref, rtol=1e-5)
    pe = g.per_example()
    assert pe.batch_size == 2                          # (B, T, K) ids: B examples of T*K lookups
    np.testing.assert_allclose(pe.sum().to_dense().asnumpy(), ref, rtol=1e-5)


# ------------------------------------------------------------------------------- bad input
def test_out_of_range_ids_refused_not_clipped():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    before = snapshot(model)
    bad = x.copy()
    bad[1, 2] = 30
    with pytest.raises(EmbgradError, match=r"id 30 at position \(1, 2\).*30 rows.*clip"):
        with embgrad.capture(model):
            with autograd.record():
                model(bad)
    assert_unchanged(model, before)                    # restored after the error mid-forward
    bad[1, 2] = -1
    with pytest.raises(EmbgradError, match=r"id -1"):
        with embgrad.capture(model):
            model(bad)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_whole_float_ids_accepted_as_mxnet_makes_them(dtype):
    """``nd.array([...])`` makes float32 ids: whole-valued ones exactly representable in their
    dtype are the ids they say, checked against MXNet's own dense gradient and a per-example
    loop with the same ids as int64."""
    x, y = ids(4, 5, 30), labels(4, 3)
    model = make(Classifier(), x)
    xf = x.astype(dtype)
    cap, g = _capture(model, xf, y=y)
    g = g.only()
    ref = dense_grads(model, lambda: LOSS(model(x), y).sum(), [model.emb.weight])[0]
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), ref, atol=1e-5)
    pe = per_example_loop(model, lambda b: LOSS(model(x[b:b + 1]), y[b:b + 1]).sum(), model.emb.weight, 4)
    np.testing.assert_allclose(g.per_example().to_dense().asnumpy(), pe, atol=1e-5)
    assert np.dtype(g.ids.dtype) == np.int64
    np.testing.assert_array_equal(g.ids.asnumpy(), x.asnumpy())


@pytest.mark.parametrize("bad, match", [
    (2.5, r"id 2.5 at position \(1, 2\) is not a whole number.*truncate"),
    (float("nan"), "not a whole number"),
    (2.0 ** 24 + 2, r"at or past 2\*\*24.*float32 cannot hold every integer"),
    (float("inf"), r"at or past 2\*\*24"),
])
def test_inexact_float_ids_refused(bad, match):
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    before = snapshot(model)
    xf = x.astype("float32").asnumpy()
    xf[1, 2] = bad
    with pytest.raises(EmbgradError, match=match):
        with embgrad.capture(model):
            with autograd.record():
                model(nd.array(xf, dtype="float32"))
    assert_unchanged(model, before)


def test_float16_ids_past_2048_refused():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    xf = x.astype("float16").asnumpy()
    xf[0, 0] = 2050
    with pytest.raises(EmbgradError, match=r"at or past 2\*\*11.*float16"):
        with embgrad.capture(model):
            model(nd.array(xf, dtype="float16"))


def test_results_keyed_by_the_name_the_user_gave():
    """capture(net, layers="emb") (the child's attribute name) gives results under "emb"; the
    block's own name ("embedding0"-style) still finds them."""
    x, y = ids(3, 4, 30), labels(3, 3)
    model = make(Classifier(), x)
    own = model.emb.name
    _, g = _capture(model, x, y=y, layers="emb")
    assert list(g) == ["emb"] and g["emb"] is g[own] and own != "emb"
    ref = dense_grads(model, lambda: LOSS(model(x), y).sum(), [model.emb.weight])[0]
    np.testing.assert_allclose(g["emb"].weight_grad.to_dense().asnumpy(), ref, atol=1e-5)
    _, g2 = _capture(model, x, y=y, layers=own)
    assert list(g2) == [own]


def test_unknown_layer_and_no_embedding():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    with pytest.raises(EmbgradError, match=r"no embedding layer named 'embeding'.*closest"):
        embgrad.capture(model, layers="embeding")
    dense = nn.Dense(3, in_units=4)
    dense.initialize()
    with pytest.raises(EmbgradError, match="no embedding layer.*gluon.nn.Embedding"):
        embgrad.capture(dense)
    with pytest.raises(EmbgradError, match="not an embedding layer"):
        embgrad.capture(model, layers=model.head)


@pytest.mark.filterwarnings("ignore:Cannot decide type")
def test_symbol_block_refused_with_advice(tmp_path):
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    model.hybridize()
    model(x)
    model.export(str(tmp_path / "clf"))
    sb = gluon.SymbolBlock.imports(str(tmp_path / "clf-symbol.json"), ["data"],
                                   str(tmp_path / "clf-0000.params"))
    with pytest.raises(EmbgradError, match="SymbolBlock.*exported from"):
        embgrad.capture(sb)


def test_forward_or_loss_not_recorded():
    x, y = ids(2, 4, 30), labels(2, 3)
    model = make(Classifier(), x)
    with embgrad.capture(model) as cap:
        loss = LOSS(model(x), y).sum()                  # no autograd.record()
    with pytest.raises(EmbgradError, match=r"gradients disabled \(outside `with autograd.record\(\):`"):
        cap.gradients(loss)
    with embgrad.capture(model) as cap:
        with autograd.record():
            out = model(x)
        loss = LOSS(out, y).sum()                       # loss outside record
    with pytest.raises(EmbgradError, match="not recorded.*autograd.record"):
        cap.gradients(loss)
    with pytest.raises(EmbgradError, match="scalar"):
        with embgrad.capture(model) as cap:
            with autograd.record():
                loss = LOSS(model(x), y)
        cap.gradients(loss)


def test_nested_capture_of_same_layer_refused_and_model_restored():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    before = snapshot(model)
    with embgrad.capture(model):
        with pytest.raises(EmbgradError, match="do not nest"):
            with embgrad.capture(model):
                pass
    assert_unchanged(model, before)


def test_import_embgrad_loads_no_mxnet():
    code = ("import sys, embgrad, embgrad.backends, embgrad.sparse, embgrad.capture\n"
            "assert 'mxnet' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_second_differentiation_of_a_freed_graph_explains_retain_graph():
    x, y = ids(2, 4, 30), labels(2, 3)
    model = make(Classifier(), x)
    cap, loss = _record(model, x, y=y)
    first = cap.gradients(loss, retain_graph=True).only().weight_grad
    second = cap.gradients(loss).only().weight_grad             # frees the graph
    np.testing.assert_allclose(first.to_dense().asnumpy(), second.to_dense().asnumpy())
    with pytest.raises(EmbgradError, match="already freed.*retain_graph=True"):
        cap.gradients(loss)
    cap, loss = _record(model, x, y=y)
    loss.backward()                                               # the user's own backward
    assert cap.gradients().only().weight_grad.norm() > 0
    with pytest.raises(EmbgradError, match="already freed"):
        cap.gradients(loss)


def test_model_restored_when_user_code_raises_mid_forward():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    model.hybridize()
    model(x)
    before = snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with embgrad.capture(model):
            with autograd.record():
                model(x)
                1 / 0
    assert_unchanged(model, before)
    assert model._active and "forward" not in model.emb.__dict__


def test_float16_table_accumulates_in_float32():
    x = ids(3, 4, 30)
    emb = nn.Embedding(30, 4, dtype="float16")
    emb.initialize()
    with embgrad.capture(emb) as cap:
        with autograd.record():
            loss = (emb(x).astype("float32") ** 2).sum()
    g = cap.gradients(loss).only()
    assert g.output_grad.dtype == np.float16 and g.weight_grad.values.dtype == np.float32
    ref = np.zeros((30, 4))
    np.add.at(ref, x.asnumpy().ravel(), 2 * emb(x).asnumpy().astype(np.float64).reshape(-1, 4))
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), ref, rtol=2e-3, atol=1e-3)


def test_numpy_mode_gluon():
    """Gluon's NumPy interface (npx.set_np): mxnet.numpy arrays in and out."""
    from mxnet import np as mnp, npx
    npx.set_np()
    try:
        emb = nn.Embedding(20, 3)
        head = nn.Dense(2, in_units=3, flatten=False)
        net = nn.HybridSequential()
        net.add(emb, head)
        net.initialize()
        x = mnp.array(np.random.RandomState(0).randint(0, 20, size=(3, 4)), dtype="int64")
        with embgrad.capture(net) as cap:
            with autograd.record():
                loss = (net(x) ** 2).sum()
        g = cap.gradients(loss, retain_graph=True).only()
        assert isinstance(g.output_grad, mnp.ndarray)
        loss.backward()
        np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), emb.weight.grad().asnumpy(),
                                   rtol=1e-5, atol=1e-7)
        assert g.per_example().batch_size == 3
    finally:
        npx.reset_np()


def test_contrib_sparse_embedding():
    """gluon.contrib.nn.SparseEmbedding (row_sparse weight, needs a Trainer to look up)."""
    from mxnet.gluon.contrib.nn import SparseEmbedding
    emb = SparseEmbedding(20, 3)
    emb.initialize()
    gluon.Trainer(emb.collect_params(), "sgd", {"learning_rate": 0.1})
    x = ids(3, 4, 20, seed=9)
    with embgrad.capture(emb) as cap:
        with autograd.record():
            loss = (emb(x) ** 2).sum()
    g = cap.gradients(loss, retain_graph=True).only()
    assert g.name == emb.name and g.num_rows == 20
    loss.backward()
    assert emb.weight.grad().stype == "row_sparse"
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), emb.weight.grad().asnumpy(),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(EmbgradError, match="row_sparse"):
        embgrad.table(emb).assign([1], np.zeros((1, 3), np.float32))
