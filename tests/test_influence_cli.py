"""``embgrad influence``: the page on the demo (flipped labels found by self-influence) and on a
local Hugging Face classifier with a training file (scores checked against per-example autograd)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from embgrad import EmbgradError
from embgrad.cli import main

torch = pytest.importorskip("torch")

from embgrad.report.influence import model_influence, read_training_file


def test_demo_page_lists_proponents_and_flipped_labels(tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["influence", "--tests", "2", "--out", str(out), "--k", "512"]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"flipped labels in the top 5% by self-influence: (\d+) of (\d+)", printed)
    assert found and int(found[1]) >= 0.8 * int(found[2]) > 0
    page = out.read_text()
    assert 'data-section="test-0"' in page and 'data-section="test-1"' in page
    assert 'data-section="self-influence"' in page and page.count('<span class="bad">flipped</span>') == int(found[1])
    assert "<script" not in page and "http" not in page.split("<footer>")[0]


def test_demo_page_escapes_user_sentences_and_exact_mode(tmp_path):
    out = tmp_path / "p.html"
    assert main(["influence", "--exact", "--out", str(out), "the <script>x</script> was good"]) == 0
    page = out.read_text()
    assert "&lt;script&gt;x&lt;/script&gt; was good" in page and "<script>" not in page
    assert "exact sparse inner products" in page


def test_cli_refuses_model_without_training_file(capsys):
    assert main(["influence", "--model", "somewhere"]) == 2
    assert "--model and --train go together" in capsys.readouterr().err


@pytest.fixture(scope="module")
def classifier_dir(bert_classifier):
    """One BERT layer, no dropout (conftest.py's bert_classifier)."""
    return bert_classifier(("negative", "positive"), layers=1, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)


def test_hugging_face_classifier_scores_equal_per_example_autograd(classifier_dir, tmp_path, capsys):
    from embgrad.report.explain import load_model

    lines = ["positive\ta wonderful film", "negative\tdull and long", "the music was fine",
             "1\tgreat acting", "negative\ta boring plot with a weak end", "what a film"]
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    tests = ["a great film", "boring"]
    page = model_influence(classifier_dir, train_file, tests, mode="exact", batch_size=4, progress=False)
    # reference: one autograd pass per example, dense gradient of the word-embedding table
    loaded = load_model(classifier_dir)
    model, tok = loaded.model, loaded.tokenizer
    table = model.get_input_embeddings().weight

    def grad(text: str, label: int) -> np.ndarray:
        enc = tok([text], return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.tensor([label]), reduction="sum")
        return torch.autograd.grad(loss, table)[0].flatten().double().numpy()

    texts, ys = read_training_file(train_file, ("negative", "positive"))
    assert ys[:2] == [1, 0] and ys[2] is None and ys[3] == 1
    with torch.no_grad():
        pred = [int(model(**tok([t], return_tensors="pt")).logits.argmax()) for t in texts]
        pred_test = [int(model(**tok([t], return_tensors="pt")).logits.argmax()) for t in tests]
    labels = [y if y is not None else p for y, p in zip(ys, pred)]
    G = np.stack([grad(t, y) for t, y in zip(texts, labels)])
    Q = np.stack([grad(t, y) for t, y in zip(tests, pred_test)])
    ref = Q @ G.T
    inf_ = page.influences
    np.testing.assert_allclose(inf_.proponent_scores, np.sort(ref, 1)[:, ::-1][:, :5], rtol=1e-4,
                               atol=1e-6 * np.abs(ref).max())
    np.testing.assert_array_equal(inf_.proponents, np.argsort(-ref, 1, kind="stable")[:, :5])
    np.testing.assert_allclose(page.self_influence, (G ** 2).sum(1), rtol=1e-4)
    assert page.train_labels[2] == ("negative", "positive")[labels[2]]
    out = tmp_path / "hf.html"
    import transformers
    transformers.utils.logging.enable_progress_bar()        # as in a fresh process
    capsys.readouterr()
    assert main(["influence", "--model", str(classifier_dir), "--train", str(train_file), "--out", str(out),
                 *tests]) == 0
    assert "BertForSequenceClassification" in out.read_text()
    assert "Loading weights" not in capsys.readouterr().err  # transformers' own bar, before embgrad's output


def test_bad_training_files(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("neutral\tsomething\n", encoding="utf-8")
    with pytest.raises(EmbgradError, match="unknown label 'neutral'"):
        read_training_file(bad, ("negative", "positive"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(EmbgradError, match="holds no sentence"):
        read_training_file(empty, ("negative", "positive"))
    with pytest.raises(EmbgradError, match="cannot read"):
        read_training_file(tmp_path / "missing.txt", ("negative", "positive"))
