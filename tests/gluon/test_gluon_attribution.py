"""embgrad.attribute on a small Gluon text classifier, against the same quantities written by
hand with ``autograd.record()`` (gradients w.r.t. an attach_grad'ed copy of the embeddings)."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd, nd  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402
from gluon_helpers import Classifier, assert_unchanged, ids, make, snapshot  # noqa: E402

B, T, V, TARGET = 4, 6, 30, 2


def _head(model, e):
    """The classifier after its embedding, on given vectors e (B, T, D)."""
    return model.head(nd.mean(nd.tanh(e), axis=1))


def _grad_at(model, e, target):
    """d logit[target] / d e, by hand: (B, T, D) NumPy, and the logits NumPy (B,)."""
    e = e.copy()
    e.attach_grad()  # a leaf copy of the embedding output
    with autograd.record(train_mode=False):
        f = _head(model, e)[:, target]
        s = f.sum()
    (g,) = autograd.grad(s, [e], train_mode=False)       # writes no parameter's grad
    return g.asnumpy().astype(np.float64), f.asnumpy().astype(np.float64)


@pytest.fixture(params=[False, True], ids=["imperative", "hybridized"])
def setup(request):
    x = ids(B, T, V, seed=4)
    model = make(Classifier(V=V, C=3), x)
    if request.param:
        model.hybridize()
        model(x)
    return model, x


def test_saliency_and_grad_x_input_match_hand_written(setup):
    model, x = setup
    e = model.emb(x)
    g, f = _grad_at(model, e, TARGET)
    before = snapshot(model)      # after the hand-written part (it builds children's graphs)
    sal = embgrad.attribute(model, x, TARGET, method="saliency")
    gxi = embgrad.attribute(model, x, TARGET, method="grad_x_input")
    assert_unchanged(model, before)
    np.testing.assert_allclose(sal.scores, np.linalg.norm(g, axis=2), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gxi.scores, (g * e.asnumpy()).sum(2), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gxi.attributions.asnumpy(), g * e.asnumpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gxi.outputs, f, rtol=1e-5)
    np.testing.assert_array_equal(gxi.ids, x.asnumpy())


def test_integrated_gradients_match_hand_written_quadrature(setup):
    model, x = setup
    steps = 12
    e = model.emb(x).asnumpy().astype(np.float64)
    e0 = np.repeat(model.emb.weight.data().asnumpy()[[7]], B * T, 0).reshape(e.shape)
    nodes, weights = embgrad.attribution.quadrature("gauss_legendre", steps)
    avg = np.zeros_like(e)
    for a, w in zip(nodes, weights):
        g, _ = _grad_at(model, nd.array(e0 + a * (e - e0)), TARGET)
        avg += w * g
    ref = ((e - e0) * avg).sum(2)
    attr = embgrad.attribute(model, x, TARGET, method="integrated_gradients", baseline=7,
                             steps=steps, batch_size=10)      # chunks cut through examples
    np.testing.assert_allclose(attr.scores, ref, rtol=2e-4, atol=1e-6)
    _, f = _grad_at(model, nd.array(e), TARGET)
    _, f0 = _grad_at(model, nd.array(e0), TARGET)
    np.testing.assert_allclose(attr.outputs, f, rtol=1e-5)
    np.testing.assert_allclose(attr.baseline_outputs, f0, rtol=1e-5)
    # completeness: the scores add up to f(x) - f(baseline), up to the quadrature error
    np.testing.assert_allclose(attr.delta, attr.scores.sum(1) - (f - f0), atol=1e-6)
    assert np.abs(attr.delta).max() < 1e-3 * max(1.0, np.abs(f - f0).max())
    assert "<table" in attr.to_html() or "<div" in attr.to_html()


def test_per_example_targets_and_smoothgrad_run():
    x = ids(B, T, V, seed=5)
    model = make(Classifier(V=V, C=3), x)
    tgt = [0, 1, 2, 0]
    attr = embgrad.attribute(model, x, nd.array(tgt, dtype="int64"), method="grad_x_input")
    e = model.emb(x)
    for b, t in enumerate(tgt):
        g, _ = _grad_at(model, e, t)
        np.testing.assert_allclose(attr.scores[b], (g[b] * e.asnumpy()[b]).sum(1), rtol=1e-4, atol=1e-7)
    sg = embgrad.attribute(model, x, 1, method="smoothgrad", steps=4, noise=0.0)
    g, _ = _grad_at(model, e, 1)       # no noise: SmoothGrad is gradient x input
    np.testing.assert_allclose(sg.scores, (g * e.asnumpy()).sum(2), rtol=1e-4, atol=1e-7)


def test_attribution_bad_input():
    x = ids(2, 3, V)
    model = make(Classifier(V=V, C=3), x)
    with pytest.raises(EmbgradError, match="class index 5 is out of range"):
        embgrad.attribute(model, x, 5, method="saliency")
    # whole float ids (MXNet's convention) are the ids they say; fractional ones are refused
    np.testing.assert_array_equal(embgrad.attribute(model, x.astype("float32"), 0, method="saliency").scores,
                                  embgrad.attribute(model, x, 0, method="saliency").scores)
    frac = x.astype("float32").asnumpy()
    frac[0, 0] = 2.5
    with pytest.raises(EmbgradError, match="not a whole number"):
        embgrad.attribute(model, nd.array(frac, dtype="float32"), 0, method="saliency")
    with pytest.raises(EmbgradError, match="pad id"):
        embgrad.attribute(model, x, 0, baseline="pad")          # Gluon tables have no padding index


def test_jacobian_and_hotflip():
    x = ids(B, T, V, seed=6)
    model = make(Classifier(V=V, C=3), x)
    jac = embgrad.jacobian(model, x)                       # (K=3 classes, B, T, D)
    assert tuple(jac.shape) == (3, B, T, 6)
    e = model.emb(x)
    for k in range(3):
        g, _ = _grad_at(model, e, k)
        np.testing.assert_allclose(jac[k].asnumpy(), g, rtol=1e-4, atol=1e-7)
    hf = embgrad.hotflip(model, x, TARGET, k=3, verify=True)
    g, f = _grad_at(model, e, TARGET)
    W = model.emb.weight.data().asnumpy().astype(np.float64)
    for b in range(B):
        for pos, old, new, predicted, actual in hf.swaps(b):
            np.testing.assert_allclose(predicted, (W[new] - W[old]) @ g[b, pos], rtol=1e-4, atol=1e-7)
            xs = x.copy()
            xs[b, pos] = new
            _, f2 = _grad_at(model, model.emb(xs), TARGET)
            np.testing.assert_allclose(actual, f2[b] - f[b], rtol=1e-4, atol=1e-6)
