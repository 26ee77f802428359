"""embgrad tables on Gluon, beyond reading and SGD (test_gluon_tables.py): frozen rows under Adam
with weight decay, lazy regularisation against MXNet autograd of the dense penalty, pretrained
vectors into a (float16) table, and the refusals (frozen, row_sparse, bad vectors)."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402
from gluon_helpers import LOSS, Classifier, ids, labels, make  # noqa: E402


def test_frozen_rows_bit_identical_under_adam_with_weight_decay():
    x, y = ids(6, 5, 30, seed=3), labels(6, 3)
    model = make(Classifier(), x)
    trainer = gluon.Trainer(model.collect_params(), "adam", {"learning_rate": 0.05, "wd": 0.1})
    t = embgrad.table(model)
    frozen = np.unique(x.asnumpy())[:4].astype(np.int64)
    before = t.numpy()
    t.freeze(frozen, optimizer=trainer)
    for _ in range(3):
        with autograd.record():
            loss = LOSS(model(x), y).sum()
        loss.backward()
        trainer.step(6)
    after = t.numpy()
    np.testing.assert_array_equal(after[frozen], before[frozen])
    touched = np.setdiff1d(np.unique(x.asnumpy()).astype(np.int64), frozen)
    assert (after[touched] != before[touched]).any(1).all()
    t.unfreeze()


@pytest.mark.parametrize("l1, l2", [(0.01, 0.0), (0.02, 0.05)])
def test_regularize_equals_the_dense_penalty_on_touched_rows(l1, l2):
    x, y = ids(4, 5, 20, seed=4), labels(4, 3)                 # rows 20..29 never looked up
    model = make(Classifier(), x)
    W = model.emb.weight
    with embgrad.capture(model) as cap:
        with autograd.record():
            loss = LOSS(model(x), y).sum()
    g = cap.gradients(loss).only().weight_grad
    lazy = embgrad.regularize(g, embgrad.table(model), l1=l1, l2=l2)
    with autograd.record():
        w = W.data()
        dense_loss = LOSS(model(x), y).sum() + l1 * nd.abs(w).sum() + l2 * (w * w).sum()
    dense_loss.backward()
    dense = W.grad().asnumpy()
    rows, values = lazy.numpy()
    np.testing.assert_allclose(values, dense[rows], rtol=1e-5, atol=1e-6)
    assert rows.max() < 20 and (dense[20:] != 0).any(1).all()   # the dense penalty touches every row


def test_pretrained_vectors_into_float16_table(tmp_path):
    vecs = np.random.RandomState(0).standard_normal((3, 6)).astype(np.float32)
    p = tmp_path / "v.txt"
    p.write_text("".join(f"{w} " + " ".join(repr(float(v)) for v in row) + "\n"
                         for w, row in zip(["a", "b", "zz"], vecs)))
    vectors = embgrad.load_vectors(p, ["<pad>", "a", "b", "c"])
    emb = nn.Embedding(4, 6, dtype="float16")
    emb.initialize()
    t = embgrad.table(emb)
    assert t.dtype == "float16"
    written = t.assign_vectors(vectors, missing="zeros")
    got = emb.weight.data().asnumpy()
    np.testing.assert_array_equal(got[[1, 2]], vecs[:2].astype(np.float16))
    assert (got[[0, 3]] == 0).all()
    t.assign(*written)
    with pytest.raises(EmbgradError, match="does not fit the table's dtype float16"):
        t.assign([1], np.full((1, 6), 1e6))


def test_refusals_frozen_row_sparse_and_bad_vectors():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    model.emb.weight.grad_req = "null"
    t = embgrad.table(model)
    assert not t.trainable
    with pytest.raises(EmbgradError, match="is frozen \\(not trainable\\)"):
        t.assign([1], np.zeros((1, 6)))
    t.assign([1], np.zeros((1, 6)), force=True)
    assert (model.emb.weight.data().asnumpy()[1] == 0).all()
    model.emb.weight.grad_req = "write"
    with pytest.raises(EmbgradError, match="the vector for id 2 holds NaN/Inf"):
        t.assign([1, 2], np.array([[0.0] * 6, [np.inf] * 6]))
    from mxnet.gluon.contrib.nn import SparseEmbedding
    sparse = SparseEmbedding(10, 3)
    sparse.initialize()
    with pytest.raises(EmbgradError, match="cannot write float rows into it: its weight is stored row_sparse"):
        embgrad.table(sparse).assign([0], np.zeros((1, 3)))
