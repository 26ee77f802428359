"""embgrad.influence on MXNet Gluon: exact TracInCP scores equal inner products of per-example
table gradients from one autograd pass per example; projected rows equal the documented matrix
applied to them."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import embgrad.influence as inf  # noqa: E402
from gluon_helpers import Classifier, ids, labels, make  # noqa: E402

V, D, C = 30, 6, 3
loss_obj = gluon.loss.SoftmaxCrossEntropyLoss()


def loss_fn(model, batch):
    x, y = batch
    return loss_obj(model(x), y).sum()


def recorded_loss(model, batch):
    with autograd.record():          # Gluon records a graph only inside autograd.record()
        return loss_fn(model, batch)


def dense_grads(model, x, y):
    table = model.emb.weight
    out = []
    for b in range(x.shape[0]):
        with autograd.record():
            loss = loss_fn(model, (x[b:b + 1], y[b:b + 1]))
        loss.backward()
        out.append(table.grad().asnumpy().reshape(-1).astype(np.float64))
        table.zero_grad()
    return np.stack(out)


def test_gluon_exact_and_projected_match_per_example_autograd():
    models = [make(Classifier(V=V, D=D, C=C), ids(2, 5, V)) for _ in range(2)]
    x, y = ids(12, 5, V, seed=3), labels(12, C, seed=4)
    xq, yq = ids(3, 5, V, seed=5), labels(3, C, seed=6)
    G = [dense_grads(m, x, y) for m in models]            # before collect: its grads are not touched
    H = [dense_grads(m, xq, yq) for m in models]
    batches = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 12, 5)]
    ckpts = [inf.Checkpoint(models[0], 0.5), inf.Checkpoint(models[1], 2.0)]
    exact = inf.collect(ckpts, batches, recorded_loss, mode="exact", progress=False)
    q = inf.collect(ckpts, [(xq, yq)], recorded_loss, like=exact, progress=False)
    ref = 0.5 * H[0] @ G[0].T + 2.0 * H[1] @ G[1].T
    np.testing.assert_allclose(exact.scores(q), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    proj = inf.collect(ckpts, batches, recorded_loss, k=32, dtype="float32", progress=False)
    P = inf.Projection(32).matrix(0, V, D).astype(np.float64)
    want = np.concatenate([np.sqrt(0.5) * G[0] @ P.T, np.sqrt(2.0) * G[1] @ P.T], 1)
    np.testing.assert_allclose(proj.vectors(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
