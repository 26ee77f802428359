"""The synthetic-sentiment criterion: on the built-in demo task (planted label words, negation
merged into one token), integrated gradients put a planted word on top for at least 90% of the
correctly classified test sentences, in PyTorch and in Keras."""
from __future__ import annotations

import numpy as np
import pytest

import embgrad
from embgrad.demo.data import demo_data
from embgrad.demo.models import train


@pytest.fixture(scope="module")
def data():
    return demo_data(seed=0, n_train=800, n_test=200)


def planted_on_top(trained, data) -> tuple[float, np.ndarray, embgrad.Attribution]:
    test = data.test
    pred = trained.predict_proba(test.ids).argmax(1)
    right = np.flatnonzero(pred == test.labels)
    ids = trained.tensor(test.ids[right])
    attr = embgrad.attribute(trained.model, ids, pred[right], steps=16, tokens=data.vocab)
    scores = np.where(test.mask[right], attr.scores, -np.inf)
    top = scores.argmax(1)
    hit = test.planted[right][np.arange(len(right)), top]
    return float(hit.mean()), right, attr


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_integrated_gradients_find_planted_words(data, framework):
    if framework == "tensorflow":
        pytest.importorskip("tensorflow")
    else:
        pytest.importorskip("torch")
    trained = train(data, framework, epochs=4, seed=0)
    rate, right, attr = planted_on_top(trained, data)
    n_right = len(right)
    assert n_right >= 0.9 * len(data.test)
    assert rate >= 0.9, f"{framework}: a planted word is on top for only {rate:.0%} of {n_right} sentences"
    assert np.abs(attr.delta).max() < 1e-3 * max(1.0, np.abs(attr.outputs).max())
    # tokens= named each looked-up id; the reference is the data's own words (unknown ones as
    # <unk>), then padding
    for i, b in enumerate(right):
        words = list(data.test.tokens[b])
        assert attr.tokens[i] == [w if w in data.vocab else "<unk>" for w in words] \
            + ["<pad>"] * (len(attr.tokens[i]) - len(words)), (i, b)
