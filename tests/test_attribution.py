"""embgrad.attribute on small PyTorch models: every method against hand-written autograd and
per-example loops, quadrature rules, baselines, targets, padding, chunking, adaptive steps,
the model left untouched, HTML output and the errors."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError
from embgrad.attribution import RULES, attribute, quadrature, refine
from torch_helpers import assert_unchanged, snapshot

V, D, C = 40, 6, 3


class Toy(nn.Module):
    """ids (B, T) [+ attention_mask] -> logits (B, C): embedding -> tanh MLP per token -> masked
    mean -> linear. ``head(e, mask)`` is the same map from the looked-up vectors."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def head(self, e, mask):
        h = torch.tanh(self.mix(e)) * mask[..., None]
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))

    def forward(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return self.head(self.emb(input_ids), mask.to(self.emb.weight.dtype))


@pytest.fixture(scope="module")
def toy():
    return Toy().eval()


IDS = torch.tensor([[5, 9, 3, 17, 0, 0], [2, 33, 8, 8, 21, 4], [11, 6, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


def inputs():
    return {"input_ids": IDS, "attention_mask": MASK}


def grad_at(model, e, mask, target):
    """Hand-written: d logits[b, target[b]] / d e, for e (N, T, D)."""
    e = e.detach().clone().requires_grad_(True)
    out = model.head(e, mask.float())
    out.gather(1, target[:, None]).sum().backward()
    return e.grad


def ig_loop(model, b, target, base, n, rule):
    """Hand-written integrated gradients for example b, one step at a time."""
    e = model.emb(IDS[b:b + 1]).detach()
    m = MASK[b:b + 1]
    nodes, w = quadrature(rule, n)
    total = torch.zeros_like(e)
    for a, wi in zip(nodes, w):
        total += float(wi) * grad_at(model, base + float(a) * (e - base), m, torch.tensor([target]))
    return ((e - base) * total)[0].sum(-1) * m[0]


# ----------------------------------------------------------------------------- quadrature
@pytest.mark.parametrize("rule", RULES)
def test_quadrature_weights_sum_to_one_and_integrate(rule):
    for n in (2, 3, 8, 33):
        a, w = quadrature(rule, n)
        assert a.shape == w.shape == (n,)
        assert abs(w.sum() - 1) < 1e-12 and ((a >= 0) & (a <= 1)).all()
    # convergence on a smooth integrand: ∫ cos = sin(1)
    errs = [abs(np.dot(quadrature(rule, n)[1], np.cos(quadrature(rule, n)[0])) - np.sin(1)) for n in (4, 16)]
    assert errs[1] < errs[0] / 3


def test_gauss_legendre_exact_and_peer_nodes():
    a, w = quadrature("gauss_legendre", 5)
    for deg in range(10):                                   # exact up to degree 2n - 1
        assert abs(np.dot(w, a ** deg) - 1 / (deg + 1)) < 1e-12
    from captum.attr._utils.approximation_methods import approximation_parameters
    for ours, theirs in [("gauss_legendre", "gausslegendre"), ("left", "riemann_left"),
                         ("right", "riemann_right"), ("middle", "riemann_middle"),
                         ("trapezoid", "riemann_trapezoid")]:
        sizes, alphas = approximation_parameters(theirs)
        a, w = quadrature(ours, 7)
        np.testing.assert_allclose(a, alphas(7), atol=1e-6)
        scale = 7 / 6 if ours == "trapezoid" else 1.0      # Captum's trapezoid weights sum to 6/7
        np.testing.assert_allclose(w, np.array(sizes(7)) * scale, atol=1e-12)


@pytest.mark.parametrize("rule,n", [("trapezoid", 9), ("left", 8), ("right", 8), ("middle", 9)])
def test_nested_refinement_reuses_every_node(rule, n):
    for _ in range(3):
        a, w = quadrature(rule, n)
        n2, new, w_new, keep = refine(rule, n)
        a2, w2 = quadrature(rule, n2)
        both = np.concatenate([a, new])
        weights = np.concatenate([keep * w, np.full(len(new), w_new)])
        order = np.argsort(both)
        np.testing.assert_allclose(both[order], a2, atol=1e-12)
        np.testing.assert_allclose(weights[order], w2, atol=1e-12)
        n = n2
    with pytest.raises(EmbgradError, match="nested"):
        refine("gauss_legendre", 8)


def test_quadrature_errors():
    with pytest.raises(EmbgradError, match="gauss_legendre"):
        quadrature("gauss", 4)
    with pytest.raises(EmbgradError, match="≥ 2"):
        quadrature("trapezoid", 1)
    with pytest.raises(EmbgradError, match="integer"):
        quadrature("left", 2.5)


# ----------------------------------------------------------------------------- methods vs autograd
def test_saliency_and_grad_x_input_match_autograd(toy):
    target = torch.tensor([0, 2, 1])
    e = toy.emb(IDS).detach()
    g = grad_at(toy, e, MASK, target) * MASK[..., None]
    sal = attribute(toy, inputs(), target, method="saliency")
    gxi = attribute(toy, inputs(), target.tolist(), method="grad_x_input")
    np.testing.assert_allclose(sal.scores, g.norm(dim=-1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gxi.scores, (g * e).sum(-1).numpy(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gxi.attributions, g * e)
    assert sal.delta is None and sal.evaluations == 3
    assert (sal.scores[MASK.numpy() == 0] == 0).all()
    np.testing.assert_allclose(sal.outputs, toy(**inputs()).gather(1, target[:, None])[:, 0].detach().numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("rule,n", [("gauss_legendre", 6), ("trapezoid", 5), ("left", 4),
                                    ("right", 4), ("middle", 3)])
def test_integrated_gradients_match_loop(toy, rule, n):
    attr = attribute(toy, inputs(), 1, steps=n, rule=rule, batch_size=4)   # chunks mix examples
    refs = []
    for b in range(3):
        ref = ig_loop(toy, b, 1, torch.zeros(1, 6, D), n, rule).detach().numpy()
        np.testing.assert_allclose(attr.scores[b], ref, rtol=1e-5, atol=1e-6)
        refs.append(ref)
    assert attr.evaluations == 3 * n + 3 + 3 and (attr.steps == n).all()
    # delta is the completeness gap: the loop's scores against the model's own outputs at the
    # input and at the (zero) baseline
    with torch.no_grad():
        f_x = toy.head(toy.emb(IDS), MASK.float())[:, 1].numpy()
        f_0 = toy.head(torch.zeros(3, 6, D), MASK.float())[:, 1].numpy()
    np.testing.assert_allclose(attr.outputs, f_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attr.baseline_outputs, f_0, rtol=1e-5, atol=1e-6)
    gap = np.stack(refs).sum(1) - (f_x - f_0)
    np.testing.assert_allclose(attr.delta, gap, atol=1e-5)


@pytest.mark.parametrize("baseline", ["pad", 7, "ids"])
def test_integrated_gradients_baselines(toy, baseline):
    base_ids = torch.full_like(IDS, 0 if baseline == "pad" else 7)
    if baseline == "ids":
        base_ids = torch.randint(1, V, IDS.shape, generator=torch.Generator().manual_seed(1))
        baseline = base_ids
    attr = attribute(toy, inputs(), 2, baseline=baseline, steps=8)
    base_e = toy.emb(base_ids).detach()
    for b in range(3):
        ref = ig_loop(toy, b, 2, base_e[b:b + 1], 8, "gauss_legendre")
        np.testing.assert_allclose(attr.scores[b], ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    f0 = toy.head(base_e, MASK.float())[:, 2].detach().numpy()
    np.testing.assert_allclose(attr.baseline_outputs, f0, rtol=1e-5, atol=1e-6)


def test_completeness_gap_shrinks_with_steps(toy):
    gaps = [np.abs(attribute(toy, inputs(), 0, steps=n, rule=r).delta).max()
            for r in ("gauss_legendre", "trapezoid") for n in (2, 8, 32)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[3] > gaps[4] > gaps[5]
    assert gaps[2] < 1e-5


def test_padding_gives_the_same_scores_as_each_example_alone(toy):
    for method in ("saliency", "grad_x_input", "integrated_gradients"):
        batch = attribute(toy, inputs(), [0, 1, 2], method=method, steps=8)
        for b in range(3):
            n = int(MASK[b].sum())
            alone = attribute(toy, {"input_ids": IDS[b:b + 1, :n], "attention_mask": MASK[b:b + 1, :n]},
                              [0, 1, 2][b], method=method, steps=8)
            np.testing.assert_allclose(batch.scores[b, :n], alone.scores[0], rtol=1e-5, atol=1e-6)
            assert (batch.scores[b, n:] == 0).all()
            if batch.delta is not None:
                assert abs(batch.delta[b] - alone.delta[0]) < 1e-5


def test_batch_size_does_not_change_results(toy):
    for method in ("integrated_gradients", "smoothgrad"):
        ref = attribute(toy, inputs(), 1, method=method, steps=5)
        for bs in (1, 4, 7):
            other = attribute(toy, inputs(), 1, method=method, steps=5, batch_size=bs)
            np.testing.assert_allclose(other.scores, ref.scores, rtol=1e-5, atol=1e-6)


def test_smoothgrad_matches_loop_and_scales_noise_to_rows(toy):
    e = toy.emb(IDS).detach()
    attr = attribute(toy, inputs(), 2, method="smoothgrad", steps=4, noise=0.2, seed=3)
    sigma = 0.2 * np.median(toy.emb.weight.detach().norm(dim=1).numpy()) / np.sqrt(D)
    rng = np.random.default_rng(3)
    for b in range(3):                                     # noise drawn example by example
        gsum = torch.zeros_like(e[b:b + 1])
        for _ in range(4):
            eps = torch.from_numpy(rng.standard_normal((1, 6, D), dtype=np.float32) * np.float32(sigma))
            gsum += grad_at(toy, e[b:b + 1] + eps, MASK[b:b + 1], torch.tensor([2])) / 4
        ref = (gsum * e[b:b + 1])[0].sum(-1) * MASK[b]
        np.testing.assert_allclose(attr.scores[b], ref.numpy(), rtol=1e-4, atol=1e-6)
    # without noise SmoothGrad is gradient x input
    plain = attribute(toy, inputs(), 2, method="smoothgrad", steps=2, noise=0.0)
    np.testing.assert_allclose(plain.scores, attribute(toy, inputs(), 2, method="grad_x_input").scores,
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- targets
def test_targets_int_list_tensor_callable(toy):
    per = attribute(toy, inputs(), [2, 0, 1], steps=6)
    as_tensor = attribute(toy, inputs(), torch.tensor([2, 0, 1]), steps=6)
    as_callable = attribute(toy, inputs(), lambda out, ex: out.gather(1, torch.tensor([2, 0, 1])[ex][:, None])[:, 0],
                            steps=6, batch_size=5)
    np.testing.assert_allclose(as_tensor.scores, per.scores)
    np.testing.assert_allclose(as_callable.scores, per.scores, rtol=1e-6, atol=1e-7)
    one = attribute(toy, inputs(), 1, steps=6)
    fn = attribute(toy, inputs(), lambda out: out[:, 1], steps=6)
    np.testing.assert_allclose(fn.scores, one.scores, rtol=1e-6)


def test_several_targets_share_the_forward(toy):
    multi = attribute(toy, inputs(), {"class 0": 0, "class 1": 1}, steps=6)        # 2 targets (B = 3)
    assert multi.scores.shape == (2, 3, 6) and multi.delta.shape == (2, 3)
    assert multi.targets == ("class 0", "class 1")
    assert tuple(multi.attributions.shape) == (2, 3, 6, D)
    for k in (0, 1):
        single = attribute(toy, inputs(), k, steps=6)
        np.testing.assert_allclose(multi.scores[k], single.scores, rtol=1e-5, atol=1e-7)
        assert multi.evaluations == single.evaluations       # one forward for both targets
    # K == B: a list of B ints means one class per example (API.md); a dict asks for K targets
    three = attribute(toy, inputs(), {"neg": 0, "pos": 1, "other": 2}, steps=6)
    assert three.scores.shape == (3, 3, 6) and three.targets == ("neg", "pos", "other")
    np.testing.assert_allclose(three.scores[1], attribute(toy, inputs(), 1, steps=6).scores, rtol=1e-5, atol=1e-7)
    assert attribute(toy, inputs(), [0, 1, 2], steps=6).scores.shape == (3, 6)
    with pytest.raises(EmbgradError, match="no output"):
        attribute(toy, inputs(), {}, steps=6)
    mixed = attribute(toy, inputs(), {"margin": lambda o: o[:, 0] - o[:, 1], "per-example": [2, 2, 0]},
                      method="grad_x_input")
    assert mixed.scores.shape == (2, 3, 6) and mixed.targets == ("margin", "per-example")
    assert "margin" in mixed.to_html() and "per-example" in mixed.to_html()
    # a list is one class per example whatever its length: another length is refused, not re-meant
    for bad in ([0, 1], [0, 1, 2, 0], [lambda o: o[:, 0]]):
        with pytest.raises(EmbgradError, match="one class index per example.*pass a dict"):
            attribute(toy, inputs(), bad, steps=6)


# ----------------------------------------------------------------------------- adaptive steps
class Sharp(Toy):
    """Toy with a steep nonlinearity: examples with large embeddings need many steps."""

    def head(self, e, mask):
        h = torch.tanh(3 * self.mix(e)) * mask[..., None]
        return self.out(h.sum(1) / mask.sum(1, keepdim=True))


def test_auto_steps_refine_only_hard_examples():
    model = Sharp(seed=2).eval()
    with torch.no_grad():
        model.emb.weight[30:] *= 0.05                      # rows 30.. give nearly linear examples
    ids = torch.tensor([[31, 32, 33, 34], [1, 2, 3, 4], [35, 36, 37, 38]])
    auto = attribute(model, ids, 0, steps="auto", tolerance=1e-2, max_steps=256)
    fixed = attribute(model, ids, 0, steps=128)
    assert auto.converged.all() and auto.rule == "trapezoid"
    assert auto.steps[0] == auto.steps[2] == 9 and auto.steps[1] > 9
    assert auto.evaluations == auto.steps.sum() + 2 * 3          # nested: no evaluation wasted
    assert auto.evaluations < fixed.evaluations / 2
    tol = 1e-2 * np.abs(auto.outputs - auto.baseline_outputs)
    assert (np.abs(auto.delta) <= np.maximum(tol, 1e-7)).all()
    np.testing.assert_allclose(auto.scores, fixed.scores, atol=5e-3 * np.abs(fixed.scores).max())
    with pytest.warns(UserWarning, match="tolerance"):
        hard = attribute(model, ids[1:2], 0, steps="auto", tolerance=1e-9, max_steps=16)
    assert not hard.converged.any() and hard.steps[0] == 9         # 17 points would exceed 16
    mid = attribute(model, ids, 0, steps="auto", rule="middle", tolerance=1e-3, max_steps=300)
    assert mid.rule == "middle" and set(mid.steps) <= {9, 27, 81, 243} and mid.converged.all()


# ----------------------------------------------------------------------------- model untouched
def test_model_untouched_and_no_grad_written(toy):
    model = Toy(seed=1)
    model.train()                                           # a training-mode model stays in it
    model.out.weight.grad = torch.ones_like(model.out.weight)
    before = snapshot(model)
    for method in ("saliency", "grad_x_input", "integrated_gradients", "smoothgrad"):
        attribute(model, inputs(), 0, method=method, steps=3)
    embgrad.jacobian(model, inputs())
    embgrad.hotflip(model, inputs(), 0, k=2, verify=True)
    assert_unchanged(model, before)
    assert model.emb.weight.grad is None


def test_model_untouched_when_forward_raises(toy):
    before = snapshot(toy)
    calls = {"n": 0}

    def forward(model, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom in the middle")
        return model(**kw)

    with pytest.raises(RuntimeError, match="boom"):
        attribute(toy, inputs(), 0, forward=forward, steps=4)
    assert_unchanged(toy, before)
    attribute(toy, inputs(), 0, steps=2)                    # and it still works afterwards


# ----------------------------------------------------------------------------- result, HTML
def test_repr_tokens_and_html_escapes(toy):
    vocab = [f"w{i}" for i in range(V)]
    vocab[5] = "<script>alert(1)</script>"
    attr = attribute(toy, inputs(), 0, steps=4, tokens=vocab)
    assert attr.tokens[0][:2] == ["<script>alert(1)</script>", "w9"]
    r = repr(attr)
    assert "integrated_gradients" in r and "steps=4" in r and "max|delta|" in r
    html = attr.to_html()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html == attr._repr_html_()
    assert f"{float(attr.scores[0, 1])!r}" in html          # hover shows the exact score
    assert html.count('class="embgrad-tok"') == int(MASK.sum())  # padding is left out
    assert "rgb(" in html


def test_heatmap_colours_diverge():
    from embgrad._html import NEGATIVE_RGB, POSITIVE_RGB, score_colors, token_heatmap
    cols = score_colors(np.array([1.0, -1.0, 0.0]), 1.0)
    assert cols[0][0] == "rgb({},{},{})".format(*POSITIVE_RGB)
    assert cols[1][0] == "rgb({},{},{})".format(*NEGATIVE_RGB)
    assert cols[2][0] == "rgb(255,255,255)"
    out = token_heatmap([["a", "&b"]], [[0.5, -0.25]], labels=["<x>"], title="T&T")
    assert "&amp;b" in out and "&lt;x&gt;" in out and "T&amp;T" in out


# ----------------------------------------------------------------------------- errors
def test_bad_input_errors(toy):
    with pytest.raises(EmbgradError, match="integrated_gradients"):
        attribute(toy, inputs(), 0, method="integrated_gradient")
    with pytest.raises(EmbgradError, match="out of range.*3 outputs"):
        attribute(toy, inputs(), 3, method="saliency")
    with pytest.raises(EmbgradError, match="does not fit a batch of 3"):
        attribute(toy, inputs(), torch.tensor([[0, 1, 2]]), method="saliency")
    with pytest.raises(EmbgradError, match="one scalar per example"):
        attribute(toy, inputs(), lambda out: out, method="saliency")
    with pytest.raises(EmbgradError, match="ambiguous"):
        attribute(toy, inputs(), None, method="saliency")
    with pytest.raises(EmbgradError, match="shaped like the inputs"):
        attribute(toy, inputs(), 0, baseline=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(EmbgradError, match="baseline id 99 is out of range"):
        attribute(toy, inputs(), 0, baseline=99)
    with pytest.raises(EmbgradError, match="'auto'"):
        attribute(toy, inputs(), 0, steps="many")
    with pytest.raises(EmbgradError, match="smoothgrad"):
        attribute(toy, inputs(), 0, method="smoothgrad", steps="auto")
    with pytest.raises(EmbgradError, match="mask has shape"):
        attribute(toy, inputs(), 0, method="saliency", mask=np.ones((3, 2)))
    with pytest.raises(EmbgradError, match="batch_size"):
        attribute(toy, inputs(), 0, batch_size=0)
    with pytest.raises(EmbgradError, match="no embedding layer named 'embb'.*'emb'"):
        attribute(toy, inputs(), 0, layer="embb")
    with pytest.raises(EmbgradError, match="out of range for a table"):
        attribute(toy, {"input_ids": IDS + 100}, 0, method="saliency")


def test_pad_baseline_needs_a_pad_id():
    model = Toy()
    model.emb.padding_idx = None
    with pytest.raises(EmbgradError, match="pad_id="):
        attribute(model, inputs(), 0, baseline="pad", steps=2)
    a = attribute(model, inputs(), 0, baseline="pad", pad_id=0, steps=2)
    b = attribute(model, inputs(), 0, baseline=0, steps=2)
    np.testing.assert_allclose(a.scores, b.scores)


class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(V, D)
        self.pos = nn.Embedding(8, D)
        self.out = nn.Linear(D, 2)

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[1])[None])            # (1, T, D): once per batch
        return self.out(torch.tanh(self.words(ids) + pos).mean(1))


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.out = nn.Linear(D, 1)

    def forward(self, a, b):
        return self.out(torch.tanh(self.emb(a)).mean(1) * torch.tanh(self.emb(b)).mean(1))


def test_layer_choice_and_call_errors():
    torch.manual_seed(0)
    model = TwoTables()
    with pytest.raises(EmbgradError, match="2 embedding layers.*layer=NAME"):
        attribute(model, IDS, 0)
    attr = attribute(model, IDS, 0, layer="words", steps=4)
    assert attr.layer == "words" and np.abs(attr.delta).max() < 1e-4
    with pytest.raises(EmbgradError, match="does not follow the batch"):
        attribute(model, IDS, 0, layer="pos", steps=4)
    siam = Siamese()
    with pytest.raises(EmbgradError, match="call=0"):
        attribute(siam, (IDS, IDS.flip(0)), None, steps=4)
    first = attribute(siam, (IDS, IDS.flip(0)), None, steps=16, call=0)
    second = attribute(siam, (IDS, IDS.flip(0)), None, steps=16, call=1)
    np.testing.assert_array_equal(first.ids, IDS.numpy())
    np.testing.assert_array_equal(second.ids, IDS.flip(0).numpy())
    assert np.abs(first.delta).max() < 1e-4 and np.abs(second.delta).max() < 1e-4
    with pytest.raises(EmbgradError, match="call=2 never happened"):
        attribute(siam, (IDS, IDS), None, call=2, method="saliency")


def test_progress_bar_only_when_asked_or_slow_on_a_terminal(toy, capsys, monkeypatch):
    from embgrad.attribution import _Progress
    quiet = _Progress(None, total=100, what="x")              # captured stderr is not a terminal
    quiet.t0 -= 60                                              # even a slow run stays quiet
    quiet.advance()
    assert quiet.bar is None
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    slow = _Progress(None, total=100, what="x")
    slow.advance()
    assert slow.bar is None                                     # fast so far: no bar
    slow.t0 -= 60
    slow.advance()
    assert slow.bar is not None
    slow.close()
    attribute(toy, inputs(), 0, steps=4, progress=True)         # forced: runs and cleans up
    assert capsys.readouterr().out == ""                        # never on stdout


def test_dropout_in_training_mode_warns():
    model = nn.Sequential(nn.Embedding(V, D), nn.Dropout(0.5), nn.Flatten(), nn.Linear(6 * D, 2))
    ids = IDS.clamp(min=1)
    with pytest.warns(UserWarning, match="dropout.*model.eval"):
        attribute(model, ids, 0, method="saliency")
    assert model.training                                        # the mode is left as it was
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribute(model.eval(), ids, 0, method="saliency")


def test_accumulates_in_float32_or_wider():
    m32 = Toy().eval()
    for dtype, tol in ((torch.float64, 1e-6), (torch.bfloat16, 5e-2)):
        model = Toy().to(dtype).eval()
        for method in ("grad_x_input", "integrated_gradients"):
            ours = attribute(model, inputs(), 1, method=method, steps=8)
            ref = attribute(m32, inputs(), 1, method=method, steps=8)
            assert ours.attributions.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            np.testing.assert_allclose(ours.scores, ref.scores, atol=tol * np.abs(ref.scores).max())


# ----------------------------------------------------------------------------- Captum parity (issue 20)
class Linear(nn.Module):
    """Linear in the looked-up vectors: f = W · mean_t(e_t) (+ b), so ∂f/∂e is constant and the
    noise methods have closed forms."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.emb = nn.Embedding(V, D)
        self.out = nn.Linear(D, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, input_ids):
        return self.out(self.emb(input_ids).mean(1))


def test_integrated_gradients_global_attribution(toy):
    """multiply_by_inputs=False: the path-averaged gradient itself (Captum's global attribution);
    multiplied by (e − e₀) it is the local one, and delta is the same completeness gap."""
    local = attribute(toy, inputs(), 1, steps=16)
    glob = attribute(toy, inputs(), 1, steps=16, multiply_by_inputs=False)
    e = toy.emb(IDS).detach()
    np.testing.assert_allclose((glob.attributions * e).sum(-1).numpy(), local.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(glob.delta, local.delta, rtol=1e-6, atol=1e-7)
    with pytest.raises(EmbgradError, match="multiply_by_inputs=False applies to"):
        attribute(toy, inputs(), 1, method="saliency", multiply_by_inputs=False)


def test_baselines_broadcast_over_the_batch(toy):
    row = torch.tensor([[7, 7, 7, 7, 7, 7]])
    full = attribute(toy, inputs(), 1, steps=8, baseline=row.expand(3, 6).clone())
    np.testing.assert_allclose(attribute(toy, inputs(), 1, steps=8, baseline=row).scores, full.scores, rtol=1e-6)
    vec = toy.emb(row).detach()                                    # (1, T, D)
    np.testing.assert_allclose(attribute(toy, inputs(), 1, steps=8, baseline=vec).scores, full.scores,
                               rtol=1e-5, atol=1e-7)
    const = attribute(toy, inputs(), 1, steps=8, baseline=1e-5)      # a float constant vector
    ref = attribute(toy, inputs(), 1, steps=8, baseline=torch.full((1, 6, D), 1e-5))
    np.testing.assert_allclose(const.scores, ref.scores, rtol=1e-6, atol=1e-8)
    with pytest.raises(EmbgradError, match=r"\(1, 6\) for all examples"):
        attribute(toy, inputs(), 1, steps=8, baseline=torch.tensor([[7, 7]]))


def test_noise_tunnel_variants_closed_form():
    """On a model linear in e, ∂f/∂e = G is constant, so with noise ε ~ N(0, σ²) per coordinate:
    smoothgrad_sq = E[(G ⊙ (e + ε))²] = (G ⊙ e)² + G²σ²  and  vargrad = G²σ² (summed over D)."""
    torch.manual_seed(0)
    m = Linear().eval()
    ids = torch.tensor([[3, 8, 1, 30], [12, 12, 5, 9]])
    e = m.emb(ids).detach().double()
    G = (m.out.weight[2] / ids.shape[1]).detach().double()           # ∂f_2/∂e_t for every t
    table = m.emb.weight.detach().double()
    sigma = 0.3 * float(np.median(np.linalg.norm(table.numpy(), axis=1))) / np.sqrt(D)   # noise=0.3
    S = 4000
    sq = attribute(m, ids, 2, method="smoothgrad_sq", steps=S, noise=0.3, seed=1)
    var = attribute(m, ids, 2, method="vargrad", steps=S, noise=0.3, seed=1)
    exp_var = float((G * G).sum() * sigma ** 2)
    exp_sq = ((G * e) ** 2).sum(-1).numpy() + exp_var
    # the estimators' relative standard error is about sqrt(2/S) per coordinate; 5 of them
    np.testing.assert_allclose(var.scores, exp_var, rtol=5 * np.sqrt(2 / S))
    np.testing.assert_allclose(sq.scores, exp_sq, rtol=5 * np.sqrt(2 / S))
    zero = attribute(m, ids, 2, method="vargrad", steps=3, noise=0.0)
    np.testing.assert_allclose(zero.scores, 0.0, atol=1e-6)     # E[a²] − E[a]² in float32


def test_gradient_shap_converges_to_integrated_gradients(toy):
    """GradientSHAP with one baseline and no input noise is Monte-Carlo integrated gradients
    (α ~ U(0, 1)): on a linear model it is exact for any α; on the MLP it converges as steps grow."""
    lin = Linear().eval()
    ids = torch.tensor([[3, 8, 1, 30], [12, 12, 5, 9]])
    ig = attribute(lin, ids, 0, steps=4)
    shap = attribute(lin, ids, 0, method="gradient_shap", steps=3)
    np.testing.assert_allclose(shap.scores, ig.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shap.delta, 0.0, atol=1e-5)
    ref = attribute(toy, inputs(), 1, steps=64, baseline="pad")
    mc = attribute(toy, inputs(), 1, method="gradient_shap", steps=3000, baseline="pad", seed=0)
    assert mc.baseline == "pad" and mc.steps.tolist() == [3000] * 3
    scale = np.abs(ref.scores).max()
    assert np.abs(mc.scores - ref.scores).max() < 0.05 * scale
    glob = attribute(toy, inputs(), 1, method="gradient_shap", steps=50, multiply_by_inputs=False, seed=0)
    assert glob.delta is None and glob.scores.shape == (3, 6)


def test_to_html_shows_legend_target_and_output(toy):
    a = attribute(toy, inputs(), 2, method="grad_x_input")
    html = a.to_html()
    assert a.target == "class 2" and "target: class 2" in html
    assert "blue lowers it" in html and "raises the target output f" in html       # the legend
    for b in range(3):
        assert f"#{b} · f={a.outputs[b]:.3g}" in html
