"""The demo data: seeded grammar, planted words, negation, vocabulary and encoding."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from embgrad import EmbgradError
from embgrad.demo import LABELS, NEGATIVE, POSITIVE, Vocab, demo_data, is_planted
from embgrad.demo.data import build_vocab, make_sentences


@pytest.fixture(scope="module")
def data():
    return demo_data(seed=0)


def _implied_label(tokens) -> int:
    """The label the planted words imply (all planted words of a sentence agree)."""
    votes = set()
    for t in tokens:
        negated = t.startswith("not_")
        word = t[4:] if negated else t
        if word in POSITIVE or word in NEGATIVE:
            votes.add(int((word in POSITIVE) != negated))
    assert len(votes) == 1, tokens
    return votes.pop()


def test_seeded_and_reproducible(data):
    again = demo_data(seed=0)
    assert again.train.texts == data.train.texts
    np.testing.assert_array_equal(again.train.ids, data.train.ids)
    np.testing.assert_array_equal(again.test.labels, data.test.labels)
    assert again.vocab == data.vocab
    other = demo_data(seed=1)
    assert other.train.texts != data.train.texts


def test_shapes_pad_and_vocab(data):
    v = data.vocab
    assert (v.PAD, v.UNK) == (0, 1) and v.tokens[:2] == ("<pad>", "<unk>")
    for split in (data.train, data.test):
        assert split.ids.dtype == np.int64 and split.ids.shape == split.planted.shape
        assert split.labels.shape == (len(split),) and set(np.unique(split.labels)) == {0, 1}
        lengths = split.mask.sum(1)
        assert all(lengths[i] == len(split.tokens[i]) for i in range(len(split)))
        # right padding: once PAD, always PAD
        assert not (np.diff(split.mask.astype(int), axis=1) > 0).any()
        assert v.decode(split.ids[:5]) == [list(t) for t in split.tokens[:5]]
    assert 0.4 < data.train.labels.mean() < 0.6
    assert len(LABELS) == 2


def test_labels_follow_planted_words_including_negation(data):
    for split in (data.train, data.test):
        implied = np.array([_implied_label(t) for t in split.tokens])
        np.testing.assert_array_equal(implied ^ split.flipped, split.labels)
    assert not data.test.flipped.any()
    assert 0 < data.train.flipped.mean() < 0.05
    negated = [t for t in data.train.tokens if any(x.startswith("not_") for x in t)]
    assert len(negated) > 0.1 * len(data.train)
    assert "not_good" in data.vocab and "not_bad" in data.vocab


def test_planted_positions_mark_label_words(data):
    split = data.test
    for b, toks in enumerate(split.tokens):
        marked = [t for t, p in zip(toks, split.planted[b]) if p]
        assert marked and all(is_planted(t) for t in marked)
        assert all(not is_planted(t) for t, p in zip(toks, split.planted[b]) if not p)
    assert not split.planted[~split.mask].any()
    assert is_planted("not_good") and is_planted("awful") and not is_planted("movie")


def test_tokenizer_merges_negation_and_maps_unknown_words(data):
    v = data.vocab
    assert v.tokenize("The movie was NOT good") == ["the", "movie", "was", "not_good"]
    # "not" before a word without a not_ token stays two tokens
    assert v.tokenize("not movie") == ["not", "movie"]
    ids = v.encode(["the movie was not good", "a zorblax film"], max_len=6)
    assert ids.shape == (2, 6) and ids.dtype == np.int64
    assert ids[0, 3] == v.id("not_good") and ids[1, 1] == v.UNK and ids[0, 4:].tolist() == [0, 0]


def test_encode_errors_are_clear(data):
    v = data.vocab
    with pytest.raises(EmbgradError, match="text #2 is empty"):   # numbered from 1, as the CLI's texts
        v.encode(["good", "   "])
    with pytest.raises(EmbgradError, match="text #2 has 4 tokens, more than max_len=2"):
        v.encode(["good", "the movie was good"], max_len=2)
    with pytest.raises(EmbgradError, match="list"):
        v.encode("the movie")
    with pytest.raises(EmbgradError, match="<pad>"):
        Vocab(("a", "b"))
    with pytest.raises(EmbgradError, match="label_noise"):
        demo_data(label_noise=0.7)
    with pytest.raises(EmbgradError, match="n > 0"):
        make_sentences(0)


def test_token_frequencies_have_a_long_tail(data):
    counts = data.token_counts
    assert counts.shape == (len(data.vocab),) and counts[0] == 0
    real = counts[2:]
    assert real.max() > 20 * real.min() > 0
    assert build_vocab(["b a", "a"]).tokens == ("<pad>", "<unk>", "a", "b")


def test_import_demo_report_and_cli_loads_no_framework():
    code = ("import sys, embgrad.demo, embgrad.demo.models, embgrad.cli, embgrad.report.html, "
            "embgrad.report.explain, embgrad.report.console, embgrad.report.browser; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'mxnet', 'transformers', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
