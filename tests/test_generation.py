"""embgrad.attribute_generation on causal LMs (GPT-2 built from its config, random weights),
against Captum's LLMGradientAttribution / LayerIntegratedGradients / LayerGradientXActivation,
torch.autograd per target, running each prompt alone, and Hugging Face generate()."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import embgrad  # noqa: E402
from embgrad import EmbgradError  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "to", "park", "a", "good", "bad", "movie", "was",
         "great", "awful", "plot", "and", "it"]
PARTIAL = ["wonder", "terr", "brill"]           # "wonderful", "terrible", "brilliant" split in pieces


def write_bpe_files(directory) -> tuple[str, str]:
    """A byte-level BPE vocabulary (all 256 byte symbols + left-anchored merges of WORDS) and its
    merges file, in GPT-2's format."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    merges: list[str] = []
    for w in WORDS + PARTIAL:
        cur = "Ġ"
        for ch in w:
            pair = f"{cur} {ch}"
            if pair not in merges:
                merges.append(pair)
            cur += ch
            vocab.setdefault(cur, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    vf, mf = directory / "vocab.json", directory / "merges.txt"
    vf.write_text(json.dumps(vocab))
    mf.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(vf), str(mf)


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    return write_bpe_files(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def tok(bpe_files):
    t = transformers.GPT2Tokenizer(vocab=bpe_files[0], merges=bpe_files[1])
    t.pad_token = t.eos_token
    return t


def gpt2(vocab: int, dtype=torch.float32, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=layers, n_head=4,
                                  bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def model(tok):
    return gpt2(len(tok))


PROMPTS = ["the cat sat on the", "a good movie", "the dog ran to the park and it was"]
CONTS = [" mat and", " was great", " good"]


def captum_llm(model, tok, prompt, cont, method, baseline_id, steps=16):
    from captum.attr import (
        LayerGradientXActivation,
        LayerIntegratedGradients,
        LLMGradientAttribution,
        TextTokenInput,
    )
    layer = model.transformer.wte
    inner = LayerIntegratedGradients(model, layer) if method == "ig" else LayerGradientXActivation(model, layer)
    llm = LLMGradientAttribution(inner, tok)
    inp = TextTokenInput(prompt, tok, baselines=baseline_id)
    kw = {"n_steps": steps, "method": "gausslegendre"} if method == "ig" else {}
    return llm.attribute(inp, target=torch.tensor(tok.encode(cont)), **kw).token_attr.detach().numpy()


def test_integrated_gradients_match_captum_llm_gradient_attribution(model, tok):
    """Captum interpolates the prompt only (earlier targets stay): interpolate='prompt'."""
    base = 3
    r = embgrad.attribute_generation(model, PROMPTS, CONTS, tokenizer=tok, baseline=base, steps=16,
                                     interpolate="prompt")
    for i, (p, c) in enumerate(zip(PROMPTS, CONTS, strict=False)):
        ref = captum_llm(model, tok, p, c, "ig", base)
        n = r.n_prompt(i)
        assert ref.shape == (len(tok.encode(c)), n)
        np.testing.assert_allclose(r.scores[i][:, :n], ref, atol=1e-5, rtol=0)
        assert np.all(r.scores[i][:, n:] == 0)                    # earlier targets did not move
    assert r.forward_passes == 3                                  # input, baseline, one chunk of points


def test_grad_x_input_matches_captum_layer_gradient_x_activation(model, tok):
    r = embgrad.attribute_generation(model, PROMPTS, CONTS, method="grad_x_input", tokenizer=tok)
    for i, (p, c) in enumerate(zip(PROMPTS, CONTS, strict=False)):
        ref = captum_llm(model, tok, p, c, "gxa", 0)
        np.testing.assert_allclose(r.prompt_scores(i), ref, atol=1e-5, rtol=0)


def test_integrated_gradients_over_all_sources_match_captum_layer_ig_per_target(model, tok):
    """interpolate='all': target j's row is layer IG of log p_j on prompt + targets[:j]."""
    from captum.attr import LayerIntegratedGradients
    base = 5
    r = embgrad.attribute_generation(model, PROMPTS, CONTS, tokenizer=tok, baseline=base, steps=24,
                                     rule="trapezoid")
    for i, (p, c) in enumerate(zip(PROMPTS, CONTS, strict=False)):
        pid, tid = tok.encode(p), tok.encode(c)
        for j, y in enumerate(tid):
            seq = torch.tensor([pid + tid[:j]])

            def f(ids, y=y):
                return torch.log_softmax(model(ids).logits[:, -1], -1)[:, y]
            lig = LayerIntegratedGradients(f, model.transformer.wte)
            a, _ = lig.attribute(seq, baselines=torch.full_like(seq, base), n_steps=24, method="riemann_trapezoid",
                                 return_convergence_delta=True)
            ref = a.sum(-1)[0].detach().numpy()
            # Captum's trapezoid weights sum to (n-1)/n, embgrad's to 1 (see quadrature())
            np.testing.assert_allclose(r.scores[i][j, :len(ref)] * 23 / 24, ref, atol=1e-5, rtol=0)
            assert np.all(r.scores[i][j, len(ref):] == 0)


def test_completeness_and_log_probs(model, tok):
    r = embgrad.attribute_generation(model, PROMPTS, CONTS, tokenizer=tok, steps=64)
    for i, (p, c) in enumerate(zip(PROMPTS, CONTS, strict=False)):
        pid, tid = tok.encode(p), tok.encode(c)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([pid + tid])).logits[0], -1)
        want = [float(lp[len(pid) - 1 + j, y]) for j, y in enumerate(tid)]
        np.testing.assert_allclose(r.log_probs[i], want, atol=1e-5)
        np.testing.assert_allclose(r.scores[i].sum(1), r.log_probs[i] - r.baseline_log_probs[i], atol=1e-4)
        assert np.abs(r.delta[i]).max() < 1e-4
        assert r.scores[i].shape == (len(tid), len(pid) + len(tid) - 1)


def test_saliency_matches_autograd_per_target(model, tok):
    r = embgrad.attribute_generation(model, PROMPTS, CONTS, method="saliency", tokenizer=tok)
    for i, (p, c) in enumerate(zip(PROMPTS, CONTS, strict=False)):
        pid, tid = tok.encode(p), tok.encode(c)
        seq = torch.tensor([pid + tid[:-1]])
        e = model.transformer.wte(seq).detach().requires_grad_(True)
        lp = torch.log_softmax(model(inputs_embeds=e).logits[0], -1)
        for j, y in enumerate(tid):
            (g,) = torch.autograd.grad(lp[len(pid) - 1 + j, y], e, retain_graph=True)
            np.testing.assert_allclose(r.scores[i][j], g[0].norm(dim=-1).numpy(), atol=1e-6)


@pytest.mark.parametrize("method", ["saliency", "grad_x_input", "integrated_gradients"])
def test_batched_equals_each_prompt_alone_left_or_right_padded(model, tok, method):
    outs = []
    for side in ("left", "right"):
        tok.padding_side = side
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        outs.append(embgrad.attribute_generation(model, dict(enc), CONTS, method=method, tokenizer=tok, steps=8))
    tok.padding_side = "right"
    for i, (p, c) in enumerate(zip(PROMPTS, CONTS, strict=False)):
        alone = embgrad.attribute_generation(model, [p], [c], method=method, tokenizer=tok, steps=8)
        for r in outs:
            np.testing.assert_allclose(r.scores[i], alone.scores[0], atol=2e-6, rtol=0)
            if r.delta is not None:
                np.testing.assert_allclose(r.delta[i], alone.delta[0], atol=2e-6)


def test_vmap_vjp_equals_loop_and_small_chunks(model, tok):
    a = embgrad.attribute_generation(model, PROMPTS, CONTS, tokenizer=tok, steps=8, vjp="loop")
    b = embgrad.attribute_generation(model, PROMPTS, CONTS, tokenizer=tok, steps=8, vjp="vmap", batch_size=5)
    for x, y in zip(a.scores, b.scores, strict=False):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)
    assert b.forward_passes == 2 + -(-3 * 8 // 5)


def test_greedy_targets_are_generate_and_attributed(model, tok):
    enc = tok(PROMPTS[:1], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    want = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)[0, n:]
    r = embgrad.attribute_generation(model, PROMPTS[:1], None, method="grad_x_input", max_new_tokens=6,
                                     eos_token_id=[], tokenizer=tok)
    assert r.generated and r.target_ids[0].tolist() == want.tolist()
    forced = embgrad.attribute_generation(model, PROMPTS[:1], [want.tolist()], method="grad_x_input", tokenizer=tok)
    np.testing.assert_allclose(r.scores[0], forced.scores[0], atol=1e-7)


def test_plain_torch_module_returning_logits():
    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.emb = torch.nn.Embedding(20, 8)
            self.rnn = torch.nn.GRU(8, 16, batch_first=True)
            self.out = torch.nn.Linear(16, 20)

        def forward(self, ids):
            return self.out(self.rnn(self.emb(ids))[0])

    lm = TinyLM().eval()
    ids = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    r = embgrad.attribute_generation(lm, ids, [[8, 9], [10, 11, 12]], mask=ids != 0, method="grad_x_input")
    for i, (p, t) in enumerate([([3, 4, 5], [8, 9]), ([6, 7], [10, 11, 12])]):
        seq = torch.tensor([p + t[:-1]])
        e = lm.emb(seq).detach().requires_grad_(True)
        lp = torch.log_softmax(lm.out(lm.rnn(e)[0])[0], -1)
        for j, y in enumerate(t):
            (g,) = torch.autograd.grad(lp[len(p) - 1 + j, y], e, retain_graph=True)
            np.testing.assert_allclose(r.scores[i][j], (g * e).sum(-1)[0].detach().numpy(), atol=1e-6)


def test_bidirectional_model_is_refused():
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    torch.manual_seed(0)
    bert = transformers.BertForMaskedLM(cfg).eval()
    with pytest.raises(EmbgradError, match="not causal"):
        embgrad.attribute_generation(bert, [[2, 5, 7]], [[8, 9]], method="saliency",
                                     layer="bert.embeddings.word_embeddings")


def test_bad_inputs_raise_clear_errors(model, tok):
    with pytest.raises(EmbgradError, match="2 target sequences for 3 prompts"):
        embgrad.attribute_generation(model, PROMPTS, CONTS[:2], tokenizer=tok)
    with pytest.raises(EmbgradError, match="out of range"):
        embgrad.attribute_generation(model, [[1, 2]], [[len(tok) + 5]])
    with pytest.raises(EmbgradError, match="no target token"):
        embgrad.attribute_generation(model, [[1, 2]], [[]])
    with pytest.raises(EmbgradError, match="need tokenizer"):
        embgrad.attribute_generation(model, ["text"], [[1]])
    with pytest.raises(EmbgradError, match="unknown method"):
        embgrad.attribute_generation(model, [[1, 2]], [[3]], method="smoothgrad")
    with pytest.raises(EmbgradError, match="one list"):
        embgrad.attribute_generation(model, [[1, 2], [3]], [4, 5])
    with pytest.raises(EmbgradError, match="probabilities"):
        embgrad.attribute_generation(model, [[1, 2]], [[3]], forward=lambda m, **kw: m(**kw).logits.softmax(-1))


def test_html_view_escapes_tokens(model):
    vocab = [f"<b>{i}</b>" for i in range(model.config.vocab_size)]
    r = embgrad.attribute_generation(model, [[1, 2, 3]], [[4, 5]], method="grad_x_input", tokenizer=vocab)
    page = r.to_html()
    assert "<b>1</b>" not in page and "&lt;b&gt;1&lt;/b&gt;" in page
    assert page.count('class="embgrad-cell"') == 3 + 4          # target 0 sees 3 sources, target 1 sees 4
    assert "GenerationAttribution(grad_x_input" in repr(r)
