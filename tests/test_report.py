"""The demo report: every section's numbers checked against the framework's own autograd and
a per-example loop, the HTML page (sections, escaping, no external URL) and its figures."""
from __future__ import annotations

import base64
import dataclasses
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from embgrad import EmbgradError
from embgrad.report.analysis import top_is_planted
from embgrad.report.demo import pick_test_sentences, report_steps, run_demo
from embgrad.report.html import SECTIONS, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo():
    steps: list[str] = []
    out = run_demo("torch", step=steps.append)
    assert len(steps) == report_steps("torch"), steps     # the CLI's progress bar total
    return out


@pytest.fixture(scope="module")
def page(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(demo[0], out)


def _dense_example_grads(trained, ids, labels):
    """(B, V, D) per-example gradients of the table by a plain loop over examples."""
    import torch
    w = trained.model.embedding.weight
    out = []
    for b in range(len(labels)):
        loss = trained.loss(trained.logits(torch.as_tensor(ids[b:b + 1])), labels[b:b + 1])
        out.append(torch.autograd.grad(loss, w)[0])
    return torch.stack(out).numpy().astype(np.float64)


def test_weight_and_per_example_sections_match_autograd_and_a_loop(demo):
    results, trained, data = demo
    w, pe = results.weight, results.per_example
    batch = data.train.subset(np.arange(w.batch_size))
    assert w.max_abs_diff == 0.0 and pe.sum_diff < 1e-5
    # rows touched: exactly the distinct non-PAD ids of the batch
    np.testing.assert_array_equal(w.rows, np.unique(batch.ids[batch.mask]))
    assert w.counts.sum() == batch.mask.sum()
    dense = _dense_example_grads(trained, batch.ids[:16], batch.labels[:16])
    np.testing.assert_allclose(pe.norms[:16], np.sqrt((dense ** 2).sum((1, 2))), rtol=1e-4, atol=1e-7)
    total = _dense_example_grads(trained, batch.ids, batch.labels).sum(0)
    np.testing.assert_allclose(w.row_norms, np.linalg.norm(total[w.rows], axis=1), rtol=1e-4, atol=1e-6)
    # clipping: nothing above max_norm, examples below it unchanged
    assert pe.clipped.max() <= pe.max_norm * (1 + 1e-5)
    small = pe.norms <= pe.max_norm
    np.testing.assert_allclose(pe.clipped[small], pe.norms[small], rtol=1e-5)
    # the examples with the largest gradients are the ones whose label noise flipped
    assert all(flipped for *_, flipped in pe.top(5)) and pe.flipped.any()
    t = pe.timing
    assert min(t.plain_ms, t.capture_ms, t.per_example_ms) > 0 and t.batch_size == w.batch_size


def test_similarity_is_the_inner_product_of_loop_gradients(demo):
    results, trained, data = demo
    s = results.similarity
    batch = data.train.subset(np.arange(12))
    q = data.test.subset([data.test.texts.index(s.query_text)])
    gq = _dense_example_grads(trained, q.ids, q.labels)[0]
    gb = _dense_example_grads(trained, batch.ids, batch.labels)
    np.testing.assert_allclose(s.scores[:12], (gb * gq).sum((1, 2)), rtol=1e-4, atol=1e-7)
    pro, opp = s.proponents(3), s.opponents(3)
    assert pro[0][1] >= pro[-1][1] > 0 > opp[-1][1] >= opp[0][1]


def test_attribution_and_hotflip_sections(demo):
    results, trained, data = demo
    a, h = results.attribution, results.hotflip
    assert set(a.scores) == {"saliency", "grad_x_input", "integrated_gradients"}
    assert a.share["integrated_gradients"] >= 0.9 and a.test_share["integrated_gradients"] >= 0.9
    assert a.test_share["grad_x_input"] >= 0.9
    # saliency of a mean-pooled model is the same for every token of a sentence: it ranks nothing
    sal = np.where(a.mask, a.scores["saliency"], np.nan)
    np.testing.assert_allclose(np.nanmax(sal, 1), np.nanmin(sal, 1), rtol=1e-5)
    assert a.share["saliency"] == 0.0 and a.max_delta < 1e-3
    assert len(a.texts) == 12 and sum(any(t.startswith("not_") for t in toks) for toks in a.tokens) == 6
    assert len(h.rows) == 6
    for r in h.rows:
        # the model is linear in each embedding: the first-order prediction is the real effect
        assert r.predicted == pytest.approx(r.actual, rel=1e-4, abs=1e-4) and r.actual < 0
        ids = data.vocab.encode([r.new_text.replace("not ", "not_")], max_len=data.train.ids.shape[1])
        margin = np.diff(trained.to_numpy(trained.logits(ids))[0])[0]
        sign = 1 if r.before == "positive" else -1
        assert sign * margin == pytest.approx(r.margin + r.actual, rel=1e-4, abs=1e-4)


def test_top_is_planted_counts_ties_as_misses():
    mask = np.array([[1, 1, 1, 0]], bool)
    planted = np.array([[0, 1, 0, 0]], bool)
    assert top_is_planted(np.array([[0.1, 0.9, 0.2, 5.0]]), mask, planted).tolist() == [True]
    assert top_is_planted(np.array([[0.9, 0.9, 0.2, 0.0]]), mask, planted).tolist() == [False]
    assert top_is_planted(np.array([[0.9, 0.1, 0.2, 0.0]]), mask, planted).tolist() == [False]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.srcs, self.tags, self.hrefs = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(a.get("data-section"))
        if "src" in a:
            self.srcs.append(a["src"])
        if "href" in a:
            self.hrefs.append(a["href"])


def test_page_has_every_section_figures_and_no_external_reference(page):
    text = page.read_text(encoding="utf-8")
    p = _Collect()
    p.feed(text)
    assert p.sections == [key for key, _ in SECTIONS]
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert all(h.startswith("#") for h in p.hrefs)
    outside_images = re.sub(r'src="data:image/png;base64,[A-Za-z0-9+/=]*"', 'src=""', text)
    assert not re.search(r"(https?:|ftp:|//[a-z0-9])", outside_images, re.I), "an external reference in the page"
    assert "url(" not in text and "@import" not in text
    assert len(p.srcs) == 5
    assert sorted(f.name for f in page.parent.iterdir()) == ["index.html"]   # one file to mail
    for src in p.srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert b"matplotlib.org" not in data
    assert text.count('class="embgrad-tok embgrad-mark"') >= 3 * 12  # planted words marked, 3 methods


def test_report_leaves_matplotlib_state_alone(demo, tmp_path):
    """Figures are drawn on their own Figure + Agg canvas: a user's backend, rcParams and
    pyplot figures are as they were."""
    import sys

    import matplotlib
    with matplotlib.rc_context({"font.size": 13.0, "axes.spines.top": True, "axes.titleweight": "normal"}):
        backend = matplotlib.get_backend()
        before = dict(matplotlib.rcParams)
        had_pyplot = "matplotlib.pyplot" in sys.modules
        write_report(demo[0], tmp_path / "r")
        after = dict(matplotlib.rcParams)
        assert [k for k in before if before[k] != after[k]] == []
        assert matplotlib.get_backend() == backend
    if had_pyplot:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
    else:
        assert "matplotlib.pyplot" not in sys.modules


def test_data_text_is_escaped(demo, tmp_path):
    results = demo[0]
    texts = list(results.per_example.texts)
    texts[results.per_example.top(1)[0][0]] = "<script>alert(1)</script>"   # a text the page shows
    pe = dataclasses.replace(results.per_example, texts=tuple(texts))
    evil = dataclasses.replace(results, per_example=pe)
    text = write_report(evil, tmp_path).read_text(encoding="utf-8")
    assert "<script>" not in text and "&lt;script&gt;" in text


def test_out_must_be_a_directory(demo, tmp_path):
    f = tmp_path / "file.html"
    f.write_text("x")
    with pytest.raises(EmbgradError, match="is a file"):
        write_report(demo[0], f)


def test_pick_test_sentences_is_seeded_and_half_negated(demo):
    data = demo[2]
    a, b = pick_test_sentences(data.test), pick_test_sentences(data.test)
    assert a.texts == b.texts and len(a) == 12
    assert pick_test_sentences(data.test, seed=1).texts != a.texts


def test_keras_report_sections(tmp_path):
    pytest.importorskip("tensorflow")
    steps: list[str] = []
    results, trained, data = run_demo("tensorflow", step=steps.append)
    assert len(steps) == report_steps("tensorflow"), steps
    p = _Collect()
    p.feed(write_report(results, tmp_path).read_text(encoding="utf-8"))
    assert p.sections == [key for key, _ in SECTIONS]
    assert results.model.framework == "tensorflow" and results.model.layers[0].padding == "mask_zero"
    assert "Functional" not in results.model.model_type or "(a Keras Functional model)" in results.model.model_type
    assert results.weight.received == int((results.weight.row_norms > 0).sum()) < len(results.weight.rows)
    # equal to TensorFlow's own dense gradient to float32 rounding: embgrad's coalescing sums a
    # row's lookups in another order (a sorted segment sum) than tf.convert_to_tensor(IndexedSlices)
    w = results.weight
    assert w.max_abs_diff <= 16 * np.finfo(np.float32).eps * float(w.row_norms.max())
    assert results.per_example.sum_diff < 1e-5
    assert results.attribution.test_share["integrated_gradients"] >= 0.9
    assert all(r.predicted == pytest.approx(r.actual, rel=1e-4, abs=1e-4) for r in results.hotflip.rows)
    assert np.isfinite(results.similarity.scores).all()


# ----------------------------------------------------------------------------- issue 20: the face
def test_ties_are_named_and_grouped():
    from embgrad.report.analysis import top_is_tied
    from embgrad.report.console import group_ties
    mask = np.array([[True, True, True, False]] * 2)
    assert top_is_tied(np.array([[0.5, 0.5, 0.1, 9.0], [0.5, 0.4, 0.1, 9.0]]), mask).tolist() == [True, False]
    entries = [(3, "the", 0.25), (3, "cat", 0.25 * (1 + 1e-9)), (1, "dog", 0.25), (3, "sofa", 0.1)]
    assert group_ties(entries) == [(3, ["the", "cat"], 0.25), (1, ["dog"], 0.25), (3, ["sofa"], 0.1)]


def test_terminal_says_ties_where_a_method_ranks_nothing(demo):
    from rich.console import Console

    from embgrad.report.console import attribution_table
    results = demo[0]
    assert results.attribution.test_ties["saliency"] == 1.0        # mean pooling: every token alike
    assert results.attribution.test_ties["integrated_gradients"] < 0.5
    console = Console(record=True, width=200)
    console.print(attribution_table(results.attribution, results.hotflip))
    text = console.export_text()
    saliency = next(line for line in text.splitlines() if "saliency" in line)
    assert "ties" in saliency and "100%" in saliency


def test_rows_with_gradient_count_nonzero_rows(demo):
    w = demo[0].weight
    assert w.received == int((w.row_norms > 0).sum())
    assert w.received == len(w.rows) - int(np.any(w.rows == 0) and w.row_norms[w.rows == 0][0] == 0)


def test_keras_model_named_by_its_own_name():
    from embgrad.report.analysis import _model_name

    class Functional:        # Keras's class for models built with the functional API
        name = "demo_classifier"

    class Classifier:
        name = "whatever"
    assert _model_name(Functional()) == "demo_classifier (a Keras Functional model)"
    assert _model_name(Classifier()) == "Classifier"


def test_figures_labels_do_not_overlap_and_clipped_examples_sit_on_the_line(demo):
    from embgrad.report.figures import norms_axes, rows_axes
    results = demo[0]
    fig = rows_axes(results.weight, label=12)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) >= 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert fig.axes[0].get_title() == f"{results.weight.received} of {results.weight.num_rows} rows received gradient"
    pe = results.per_example
    ax = norms_axes(pe).axes[0]
    spikes = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    (segment,) = spikes[0].get_segments()
    assert np.allclose(segment[:, 0], pe.max_norm)                 # on the line, not in a bin to its right
    assert segment[:, 1].max() == int((pe.norms > pe.max_norm).sum())
    edges = np.array([p.get_x() for p in ax.patches if hasattr(p, "get_width") and p.get_width() > 0])
    assert np.isclose(edges, pe.max_norm).any()                    # max_norm is a bin edge


def test_privacy_section_clip_noise_epsilon(demo, page):
    """Issue 15: the report's DP section. The clipped sum equals a per-example loop of torch
    autograd (each example's dense table gradient clipped to C); ε from Opacus's own RDP
    accountant for the chosen σ is within the target; the noise norm fits its std."""
    import torch
    results, trained, data = demo
    p = results.privacy
    batch = data.train.subset(np.arange(p.batch_size))
    ids = trained.tensor(batch.ids)
    total = torch.zeros_like(trained.model.embedding.weight)
    for b in range(p.batch_size):
        g = torch.autograd.grad(trained.loss(trained.logits(ids[b:b + 1]), batch.labels[b:b + 1]),
                                trained.model.embedding.weight)[0]
        total += g * min(1.0, p.max_norm / float(g.norm()))
    assert p.signal_norm == pytest.approx(float(total.norm()), rel=1e-4)
    if p.epsilon is not None:
        accountants = pytest.importorskip("opacus.accountants")
        rdp = accountants.RDPAccountant()
        rdp.history = [(p.noise_multiplier, p.sample_rate, p.epochs * int(np.ceil(p.dataset_size / p.batch_size)))]
        assert rdp.get_epsilon(p.delta) == pytest.approx(p.epsilon, rel=0.05)
        assert p.epsilon <= p.target_epsilon * 1.001
    expected = p.gradient_noise_std * np.sqrt(p.sparse_entries)
    assert abs(p.noise_norm - expected) < 5 * p.gradient_noise_std      # chi with S·D degrees of freedom
    assert 0 < p.selected <= p.num_rows and p.sparse_entries == p.selected * p.dim
    text = page.read_text(encoding="utf-8")
    assert 'data-section="privacy"' in text and "register_opacus" in text
