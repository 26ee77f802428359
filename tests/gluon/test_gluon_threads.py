"""Issue 12 item 6 (Gluon): a forward of the captured model in another thread is not recorded
(captures are per thread / contextvars context); the capture's own gradient equals MXNet's."""
from __future__ import annotations

import threading

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd  # noqa: E402

import embgrad  # noqa: E402
from gluon_helpers import LOSS, Classifier, dense_grads, ids, labels, make  # noqa: E402


def test_forward_in_another_thread_is_not_recorded():
    x, y = ids(4, 5, 30), labels(4, 3)
    other = ids(7, 5, 30, seed=3)
    model = make(Classifier(), x)
    ref_other = model(other).asnumpy()
    seen = []
    with embgrad.capture(model) as cap:
        t = threading.Thread(target=lambda: seen.append(model(other).asnumpy()))
        t.start()
        t.join(60)
        with autograd.record():
            loss = LOSS(model(x), y).sum()
    np.testing.assert_allclose(seen[0], ref_other, rtol=1e-6)
    assert len(cap.calls) == 1
    g = cap.gradients(loss).only()
    assert g.per_example().batch_size == 4
    ref = dense_grads(model, lambda: LOSS(model(x), y).sum(), [model.emb.weight])[0]
    np.testing.assert_allclose(g.weight_grad.to_dense().asnumpy(), ref, rtol=1e-5, atol=1e-6)
    assert "forward" not in model.emb.__dict__
