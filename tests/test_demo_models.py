"""The tiny demo classifiers: mask-aware pooling, seeding, training to high accuracy,
negation learned, in PyTorch and in Keras."""
from __future__ import annotations

import numpy as np
import pytest

from embgrad import EmbgradError
from embgrad.demo import demo_data, train

NEGATION = ["the movie was not good", "the movie was not bad", "the plot was good", "the plot was awful",
            "i thought the film was not terrible"]
NEGATION_LABELS = [0, 1, 1, 0, 1]


@pytest.fixture(scope="module")
def data():
    return demo_data(seed=0)


@pytest.fixture(scope="module")
def torch_trained(data):
    return train(data, "torch")


def test_torch_trains_to_high_accuracy_and_learns_negation(data, torch_trained):
    t = torch_trained
    assert t.test_accuracy >= 0.97 and len(t.losses) == 6 and t.losses[-1] < t.losses[0]
    probs = t.predict_proba(data.vocab.encode(NEGATION))
    assert probs.argmax(1).tolist() == NEGATION_LABELS
    assert np.allclose(probs.sum(1), 1.0)
    assert "test_accuracy" in repr(t)


def test_torch_pooling_ignores_padding(data, torch_trained):
    import torch
    ids = data.test.ids[:8]
    padded = np.concatenate([ids, np.zeros((8, 5), dtype=np.int64)], 1)
    with torch.no_grad():
        a, b = torch_trained.logits(ids), torch_trained.logits(padded)
    torch.testing.assert_close(a, b)
    assert torch_trained.model.embedding.padding_idx == 0


def test_torch_training_is_seeded_and_leaves_global_rng_alone(data):
    import torch
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = train(data, "torch", epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = train(data, "torch", epochs=1)
    c = train(data, "torch", epochs=1, seed=1)
    assert torch.equal(a.model.embedding.weight, b.model.embedding.weight)
    assert not torch.equal(a.model.embedding.weight, c.model.embedding.weight)
    assert all(p.grad is None for p in a.model.parameters()) and not a.model.training


def test_progress_callback_and_bad_arguments(data):
    seen = []
    train(data, "torch", epochs=2, progress=lambda e, n, loss: seen.append((e, n, loss > 0)))
    assert seen == [(1, 2, True), (2, 2, True)]
    with pytest.raises(EmbgradError, match="jax"):
        train(data, "jax")
    with pytest.raises(EmbgradError, match="epochs"):
        train(data, "torch", epochs=0)


def test_keras_trains_to_high_accuracy_and_learns_negation(data):
    pytest.importorskip("tensorflow")
    t = train(data, "tensorflow")
    assert t.framework == "tensorflow" and t.test_accuracy >= 0.97
    assert t.predict_proba(data.vocab.encode(NEGATION)).argmax(1).tolist() == NEGATION_LABELS
    # mask-aware pooling: extra PAD columns do not change the logits
    ids = data.test.ids[:8]
    padded = np.concatenate([ids, np.zeros((8, 5), dtype=np.int64)], 1)
    np.testing.assert_allclose(t.to_numpy(t.logits(ids)), t.to_numpy(t.logits(padded)), rtol=1e-5, atol=1e-6)
    emb = t.model.get_layer("embedding")
    assert emb.input_dim == len(data.vocab) and emb.mask_zero
    loss = t.loss(t.logits(ids), data.test.labels[:8], reduction="mean")
    assert 0 <= float(loss) < 0.5
