"""Issue 12 item 4 (Gluon): rows frozen after a ``gluon.Trainer`` has already stepped stay
bit-identical through 5 more steps, for Adam and SGD with weight decay, SGD with momentum,
RMSprop and NAG, dense and row_sparse gradients; the other looked-up rows train. Without
``optimizer=`` Gluon has no gradient hooks, so freeze() refuses and says what to pass."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402
from gluon_helpers import LOSS, Classifier, ids, labels, make  # noqa: E402

OPTIMIZERS = {
    "adam_wd": ("adam", {"learning_rate": 0.1, "wd": 0.01}),
    "sgd_momentum_wd": ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.01}),
    "rmsprop": ("rmsprop", {"learning_rate": 0.1}),
    "nag": ("nag", {"learning_rate": 0.1, "momentum": 0.9}),
}


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_rows_frozen_after_the_first_step_stay_bit_identical(opt, sparse_grad):
    x, y = ids(8, 5, 30), labels(8, 3)
    model = make(Classifier(sparse_grad=sparse_grad), x)
    name, kw = OPTIMIZERS[opt]
    trainer = gluon.Trainer(model.collect_params(), name, dict(kw))

    def step():
        with autograd.record():
            loss = LOSS(model(x), y).sum()
        loss.backward()
        trainer.step(8)

    step()                                             # training has started
    t = embgrad.table(model)
    looked = np.unique(x.asnumpy().astype(np.int64))
    frozen = [int(looked[0]), int(looked[1]), 29]
    t.freeze(frozen, optimizer=trainer)
    before, table_before = t.read(frozen), t.numpy()
    for _ in range(5):
        step()
    np.testing.assert_array_equal(t.read(frozen), before)
    others = np.setdiff1d(looked, frozen)
    assert np.abs(t.numpy()[others] - table_before[others]).min() > 0
    t.unfreeze()


def test_freeze_without_the_trainer_refused():
    x = ids(2, 4, 30)
    model = make(Classifier(), x)
    with pytest.raises(EmbgradError, match="pass optimizer=trainer"):
        embgrad.table(model).freeze([1, 2])
