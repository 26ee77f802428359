"""The demo's tiny causal LM: trained in seconds on the demo sentences, its label token's
attributions point at the planted words; the section is in the demo report."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from embgrad.demo.data import demo_data, is_planted  # noqa: E402
from embgrad.demo.lm import SEPARATOR, generation_info, train_lm  # noqa: E402
from embgrad.report.demo import pick_test_sentences  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return demo_data(seed=0)


def test_tiny_lm_learns_the_label_and_attributions_point_at_planted_words(data):
    sentences = pick_test_sentences(data.test, seed=0)
    g = generation_info(data, sentences, steps=8)
    assert g.lm.accuracy > 0.9 and g.lm.losses[-1] < g.lm.losses[0]
    assert g.hits["grad_x_input"] >= 0.75 and g.hits["saliency"] >= 0.75
    r = g.result
    for i, toks in enumerate(sentences.tokens):            # sources: the sentence, then the separator
        assert r.source_tokens[i] == [*toks, SEPARATOR] and r.scores[i].shape == (1, len(toks) + 1)
        assert g.planted[i][:-1].tolist() == [is_planted(t) for t in toks]
    # planted words carry more |score| than the other words, over all sentences
    s = np.concatenate([np.abs(r.prompt_scores(i)[0][:-1]) for i in range(len(r))])
    p = np.concatenate([g.planted[i][:-1] for i in range(len(r))])
    assert s[p].mean() > 2 * s[~p].mean()


def test_lm_training_is_seeded(data):
    a, b = train_lm(data, seed=3, epochs=1), train_lm(data, seed=3, epochs=1)
    assert a.losses == b.losses
