"""``embgrad explain`` on a causal language model saved locally (GPT-2 from its config, the
byte-level BPE tokenizer the tests write): --continuation and greedy, the page's numbers are
attribute_generation's, clear errors."""
from __future__ import annotations

import html
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_generation import write_bpe_files  # noqa: E402

import embgrad  # noqa: E402
from embgrad.cli import main  # noqa: E402
from embgrad.report.explain import load_model  # noqa: E402
from embgrad.report.generation import explain_generation  # noqa: E402


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, save_hf_model):
    vf, mf = write_bpe_files(tmp_path_factory.mktemp("bpe_cli"))
    tok = transformers.GPT2Tokenizer(vocab=vf, merges=mf)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  eos_token_id=len(tok) - 1, bos_token_id=len(tok) - 1,
                                  architectures=["GPT2LMHeadModel"])
    return save_hf_model("lm", transformers.GPT2LMHeadModel, cfg, tok)


def test_explain_continuation_page(lm_dir, tmp_path, capsys):
    out = tmp_path / "gen.html"
    rc = main(["explain", str(lm_dir), "the cat sat on the", "a <b>good</b> movie", "--continuation", " mat",
               "--steps", "8", "--out", str(out)])
    assert rc == 0
    page = out.read_text()
    assert "<b>good</b>" not in page and "&lt;b&gt;good&lt;/b&gt;" in page
    assert page.count('class="embgrad-matrix"') == 2 * 2                # 2 texts x 2 methods
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page
    printed = capsys.readouterr().out
    assert "→ “ mat”" in printed
    # the numbers on the page are attribute_generation's
    loaded = load_model(lm_dir)
    r = embgrad.attribute_generation(loaded.model, ["the cat sat on the"], [" mat"], method="grad_x_input",
                                     tokenizer=loaded.tokenizer)
    cells = re.findall(r'class="embgrad-cell" title="[^"]*" data-score="([^"]+)"', page)
    np.testing.assert_allclose([float(c) for c in cells[:r.scores[0].size]], r.scores[0].reshape(-1), atol=1e-6)


def test_explain_greedy_continuation(lm_dir):
    loaded = load_model(lm_dir)
    assert loaded.kind == "causal-lm"
    gx = explain_generation(loaded, ["the dog ran"], methods=("saliency",), max_new_tokens=3)
    enc = loaded.tokenizer(["the dog ran"], return_tensors="pt")
    want = loaded.model.generate(**enc, max_new_tokens=3, do_sample=False,
                                 pad_token_id=loaded.tokenizer.eos_token_id)[0, enc["input_ids"].shape[1]:]
    r = gx.results["saliency"]
    n = len(r.target_ids[0])
    assert r.target_ids[0].tolist() == want[:n].tolist()
    assert gx.continuation_text(0) == loaded.tokenizer.decode(want[:n])


def test_explain_generation_errors(lm_dir, tmp_path, capsys):
    assert main(["explain", str(lm_dir), "the cat", "--target", "0", "--out", str(tmp_path / "x.html")]) == 2
    assert "causal language model" in capsys.readouterr().err
    assert main(["explain", str(lm_dir), "the cat", "--method", "smoothgrad", "--out", str(tmp_path / "x.html")]) == 2
    assert "not available for a causal" in html.unescape(capsys.readouterr().err)
    assert main(["explain", str(lm_dir), "the cat", " ", "--out", str(tmp_path / "x.html")]) == 2
    assert "text #2 is empty" in capsys.readouterr().err      # numbered from 1, as the terminal table
