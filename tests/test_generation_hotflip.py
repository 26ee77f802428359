"""HotFlip / GCG candidates at V = 128k (vocabulary in chunks, top-k per position), against the
one-hot gradient computed densely with torch autograd, and verification by real forward passes."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_generation import write_bpe_files  # noqa: E402

import embgrad  # noqa: E402
from embgrad.backends import get_backend  # noqa: E402
from embgrad.candidates import top_candidates, whole_word_ids  # noqa: E402
from embgrad.generation import hotflip_generation  # noqa: E402

V = 131072


@pytest.fixture(scope="module")
def big():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


PROMPTS = [[70000, 5, 129000, 17, 42], [99, 100001, 3]]
TARGETS = [[7, 131071, 11], [12, 13]]


def onehot_reference(model, prompt, target, k, sign):
    """The GCG way: the gradient of Σ log p(target) with respect to a one-hot (n × V) input."""
    W = model.transformer.wte.weight.detach()
    seq = torch.tensor([prompt + target[:-1]])
    onehot = torch.nn.functional.one_hot(seq, V).float().requires_grad_(True)
    lp = torch.log_softmax(model(inputs_embeds=onehot @ W).logits[0], -1)
    total = sum(lp[len(prompt) - 1 + j, y] for j, y in enumerate(target))
    (g1h,) = torch.autograd.grad(total, onehot)                      # (1, T, V)
    g = g1h[0, :len(prompt)].double()
    change = sign * (g - g.gather(1, torch.tensor(prompt)[:, None]))  # (E[v] - e_t) . g_t
    change[torch.arange(len(prompt)), torch.tensor(prompt)] = -np.inf
    change[:, 0] = -np.inf                                            # the pad / eos id 0 is excluded
    top = torch.topk(change.reshape(-1), k)
    return top.values.numpy() * sign, (top.indices // V).numpy(), (top.indices % V).numpy(), float(total.detach())


@pytest.mark.parametrize("direction", ["increase", "decrease"])
def test_hotflip_generation_at_128k_matches_onehot_gradient(big, direction):
    sign = 1.0 if direction == "increase" else -1.0
    r = hotflip_generation(big, PROMPTS, TARGETS, k=4, direction=direction, verify=True)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS, strict=False)):
        want_v, want_pos, want_new, total = onehot_reference(big, p, t, 4, sign)
        np.testing.assert_allclose(r.predicted[i], want_v, rtol=1e-4, atol=1e-6)
        assert r.positions[i].tolist() == want_pos.tolist() and r.new_ids[i].tolist() == want_new.tolist()
        assert r.output[i] == pytest.approx(total, abs=1e-5)
        for j in range(4):                       # verification = a real forward with the swapped prompt
            q = list(p)
            q[int(r.positions[i, j])] = int(r.new_ids[i, j])
            with torch.no_grad():
                lp = torch.log_softmax(big(torch.tensor([q + t[:-1]])).logits[0], -1)
            real = sum(float(lp[len(q) - 1 + jj, y]) for jj, y in enumerate(t))
            assert r.actual[i, j] == pytest.approx(real - total, abs=1e-5)


def test_top_candidates_chunking_is_exact():
    torch.manual_seed(1)
    emb = torch.nn.Embedding(V, 8)
    b = get_backend(emb)
    info = b.find_embeddings(emb)[next(iter(b.find_embeddings(emb)))]
    g = torch.randn(6, 8)
    cur = np.array([1, 2, 3, 4, 5, 6])
    cand = np.sort(np.random.default_rng(0).choice(V, 100000, replace=False)).astype(np.int64)
    full = (g.double() @ emb.weight.detach().double()[torch.from_numpy(cand)].T).numpy()
    full[np.isin(cand[None, :], cur[:, None]) & (cand[None, :] == cur[:, None])] = -np.inf
    want_i = np.argsort(-full, axis=1, kind="stable")[:, :7]
    for budget in (1 << 22, 20000, 2000):        # one chunk, 40 chunks, 400 chunks
        v, i = top_candidates(b, info, g, cur, cand, 7, budget=budget)
        np.testing.assert_allclose(v, np.take_along_axis(full, want_i, 1), rtol=1e-5)
        assert (i == cand[want_i]).all()


def test_whole_word_filter_from_the_tokenizer(tmp_path):
    vf, mf = write_bpe_files(tmp_path)
    tok = transformers.GPT2Tokenizer(vocab=vf, merges=mf)
    keep = whole_word_ids(tok, len(tok))
    kept = tok.convert_ids_to_tokens(np.flatnonzero(keep).tolist())
    assert {"Ġcat", "Ġpark", "Ġwonder"} <= set(kept)
    assert "f" not in kept and "<|endoftext|>" not in kept and "," not in kept
    for i in np.flatnonzero(keep):
        w = tok.decode([int(i)]).strip()
        assert w.isalpha() and tok(" " + w)["input_ids"] == [int(i)]


def test_hotflip_generation_filters_and_errors(tmp_path):
    vf, mf = write_bpe_files(tmp_path)
    tok = transformers.GPT2Tokenizer(vocab=vf, merges=mf)
    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                  eos_token_id=len(tok) - 1, bos_token_id=len(tok) - 1)
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    r = hotflip_generation(lm, ["the cat sat on the"], [" mat"], k=5, candidates="words", tokenizer=tok)
    keep = whole_word_ids(tok, len(tok))
    assert all(keep[n] for n in r.new_ids[0] if n >= 0)
    only_c = hotflip_generation(lm, ["the cat sat on the"], [" mat"], k=3, tokenizer=tok, verify=False,
                                candidates=lambda s: s.startswith("Ġc"))
    assert all(t.startswith("Ġc") for t in only_c.new_tokens[0])
    with pytest.raises(embgrad.EmbgradError, match="targets"):
        hotflip_generation(lm, ["the cat"], None, tokenizer=tok)
