"""embgrad.table on Gluon: read and assign rows of an Embedding's table, and freeze rows
through the gluon.Trainer (weight decay and momentum cannot move them)."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402
from gluon_helpers import LOSS, Classifier, ids, labels, make  # noqa: E402


def test_read_and_assign_rows():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    t = embgrad.table(model)
    assert (t.num_rows, t.dim, t.dtype, t.trainable) == (30, 6, "float32", True)
    w = model.emb.weight.data().asnumpy()
    np.testing.assert_array_equal(t[[3, 7]], w[[3, 7]])
    np.testing.assert_array_equal(t.numpy(), w)
    new = np.arange(12, dtype=np.float32).reshape(2, 6)
    previous = t.assign([4, 9], new)
    np.testing.assert_array_equal(previous, w[[4, 9]])
    after = model.emb.weight.data().asnumpy()
    np.testing.assert_array_equal(after[[4, 9]], new)
    np.testing.assert_array_equal(np.delete(after, [4, 9], 0), np.delete(w, [4, 9], 0))


@pytest.mark.parametrize("hybridize", [False, True])
def test_frozen_rows_stay_bit_identical_under_sgd_momentum_and_weight_decay(hybridize):
    x, y = ids(4, 5, 30, seed=2), labels(4, 3)
    model = make(Classifier(), x)
    if hybridize:
        model.hybridize()
    trainer = gluon.Trainer(model.collect_params(), "sgd",
                            {"learning_rate": 0.5, "momentum": 0.9, "wd": 0.1})
    t = embgrad.table(model)
    frozen = np.unique(x.asnumpy())[:3]                    # rows the batch really looks up
    guard = t.freeze(frozen, optimizer=trainer)
    np.testing.assert_array_equal(t.frozen_rows, frozen)
    before = model.emb.weight.data().asnumpy().copy()
    for _ in range(3):
        with autograd.record():
            loss = LOSS(model(x), y).sum()
        loss.backward()
        trainer.step(4)
    after = model.emb.weight.data().asnumpy()
    np.testing.assert_array_equal(after[frozen], before[frozen])
    moved = np.setdiff1d(np.arange(30), frozen)
    assert np.abs(after[moved] - before[moved]).max() > 1e-3   # the others trained (and decayed)
    guard.remove()
    assert "step" not in trainer.__dict__ and "update" not in trainer.__dict__
    with autograd.record():
        loss = LOSS(model(x), y).sum()
    loss.backward()
    trainer.step(4)
    assert np.abs(model.emb.weight.data().asnumpy()[frozen] - before[frozen]).max() > 0


def test_freeze_needs_the_trainer():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    with pytest.raises(EmbgradError, match="optimizer=trainer"):
        embgrad.table(model).freeze([1, 2])
    other = make(Classifier(), x)
    trainer = gluon.Trainer(other.collect_params(), "sgd", {"learning_rate": 0.1})
    with pytest.raises(EmbgradError, match="does not update this table"):
        embgrad.table(model).freeze([1, 2], optimizer=trainer)


def test_freeze_more_and_unfreeze_some():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    trainer = gluon.Trainer(model.collect_params(), "sgd", {"learning_rate": 0.1})
    t = embgrad.table(model)
    t.freeze([1, 2], optimizer=trainer)
    t.freeze([3])                                   # the trainer is remembered
    np.testing.assert_array_equal(t.frozen_rows, [1, 2, 3])
    t.unfreeze([1])
    np.testing.assert_array_equal(t.frozen_rows, [2, 3])
    assert "step" in trainer.__dict__
    t.unfreeze()
    assert t.frozen_rows.size == 0 and "step" not in trainer.__dict__
