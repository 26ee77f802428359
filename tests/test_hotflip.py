"""embgrad.hotflip on a small PyTorch model: first-order swap scores against a dense brute force,
top-k order, candidates and positions filters, verification by real forward passes, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import embgrad
from embgrad import EmbgradError
from test_attribution import IDS, MASK, V, Toy, inputs
from torch_helpers import assert_unchanged, snapshot


@pytest.fixture(scope="module")
def toy():
    return Toy(seed=5).eval()


class FakeTokenizer:
    """Just what hotflip reads from a Hugging Face tokenizer."""

    def __init__(self):
        self.vocab = ["[PAD]", "[CLS]", "[SEP]"] + [("##" if i % 4 == 0 else "") + f"w{i}" for i in range(3, V)]
        self.all_special_ids = [0, 1, 2]

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]


def brute_force(model, target):
    """Dense (B, T, V) first-order changes (E[v] - e_t) . g_t of logit ``target``."""
    e = model.emb(IDS).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model.head(e, MASK.float())[:, target].sum(), e)
    with torch.no_grad():
        return (torch.einsum("btd,vd->btv", g, model.emb.weight) - (g * e).sum(-1, keepdim=True)).numpy()


def admissible(pred, exclude, special=(0,)):
    """Infinity where a swap is not allowed: padding or special positions, the same token,
    excluded candidates."""
    out = pred.copy()
    out[MASK.numpy() == 0] = np.inf
    B, T, _ = out.shape
    out[np.arange(B)[:, None], np.arange(T)[None], IDS.numpy()] = np.inf
    out[:, :, exclude] = np.inf
    out[np.isin(IDS.numpy(), special)] = np.inf
    return out


def test_hotflip_scores_match_brute_force(toy):
    before = snapshot(toy)
    pred = brute_force(toy, 1)
    flips = embgrad.hotflip(toy, inputs(), 1, k=5, verify=True)
    allowed = admissible(pred, [0])                        # the padding index is never a candidate
    for b in range(3):
        best = np.sort(allowed[b].ravel())[:5]
        np.testing.assert_allclose(flips.predicted[b], best, rtol=1e-5, atol=1e-6)
        for p, old, new, predicted, actual in flips.swaps(b):
            assert old == IDS[b, p] and new != old and MASK[b, p]
            np.testing.assert_allclose(predicted, pred[b, p, new], rtol=1e-5, atol=1e-6)
            swapped = IDS[b:b + 1].clone()
            swapped[0, p] = new
            with torch.no_grad():
                real = toy(swapped, MASK[b:b + 1])[0, 1] - toy(IDS[b:b + 1], MASK[b:b + 1])[0, 1]
            np.testing.assert_allclose(actual, float(real), rtol=1e-5, atol=1e-6)
    assert (np.diff(flips.predicted, axis=1) >= 0).all()   # most lowering first
    up = embgrad.hotflip(toy, inputs(), 1, k=3, direction="increase")
    for b in range(3):
        best = -np.sort(-np.where(np.isinf(allowed[b]), -np.inf, pred[b]).ravel())[:3]
        np.testing.assert_allclose(up.predicted[b], best, rtol=1e-5, atol=1e-6)
    assert up.actual is None and "increase" in repr(up)
    assert_unchanged(toy, before)


def test_hotflip_candidates_and_positions(toy):
    tok = FakeTokenizer()
    pred = brute_force(toy, 0)
    words = embgrad.hotflip(toy, inputs(), 0, k=4, candidates=lambda s: not s.startswith("##"), tokenizer=tok)
    exclude = [0, 1, 2] + [i for i in range(3, V) if i % 4 == 0]
    allowed = admissible(pred, exclude, special=[0, 1, 2])
    for b in range(3):
        np.testing.assert_allclose(words.predicted[b], np.sort(allowed[b].ravel())[:4], rtol=1e-5, atol=1e-6)
        assert all(not tok.vocab[n].startswith("##") and n > 2 for n in words.new_ids[b])
    assert words.new_tokens[0][0] == tok.vocab[words.new_ids[0, 0]]
    only = embgrad.hotflip(toy, inputs(), 0, k=3, candidates=[7, 8, 9])
    assert set(only.new_ids.ravel()) <= {7, 8, 9}
    mask = np.zeros(V, bool)
    mask[[7, 8, 9]] = True
    np.testing.assert_array_equal(embgrad.hotflip(toy, inputs(), 0, k=3, candidates=mask).new_ids, only.new_ids)
    pos = np.zeros((3, 6), bool)
    pos[:, 1] = True
    at1 = embgrad.hotflip(toy, inputs(), 0, k=2, positions=pos)
    assert (at1.positions == 1).all()
    # one candidate, k swaps at k different positions
    one = embgrad.hotflip(toy, inputs(), 0, k=3, candidates=[7], verify=True)
    allowed = admissible(pred, [i for i in range(V) if i != 7])
    for b in range(3):
        best = np.sort(allowed[b].ravel())[:3]
        n = int(np.isfinite(best).sum())                    # example 2 has only 2 tokens
        assert n == min(3, int(MASK[b].sum()))
        np.testing.assert_allclose(one.predicted[b], np.where(np.isfinite(best), best, np.nan), rtol=1e-5, atol=1e-6)
        assert (one.new_ids[b, :n] == 7).all() and len(set(one.positions[b, :n])) == n
    # fewer admissible swaps than k: the rest are marked
    tiny = embgrad.hotflip(toy, inputs(), 0, k=3, candidates=[7], positions=pos, verify=True)
    assert tiny.positions.shape == (3, 3)
    assert (tiny.positions[:, 1:] == -1).all() and np.isnan(tiny.predicted[:, 1:]).all()
    assert np.isnan(tiny.actual[:, 1:]).all() and np.isfinite(tiny.actual[:, 0]).all()
    assert len(tiny.swaps(0)) == 1


def test_hotflip_errors(toy):
    with pytest.raises(EmbgradError, match="direction"):
        embgrad.hotflip(toy, inputs(), 0, direction="down")
    with pytest.raises(EmbgradError, match="positive int"):
        embgrad.hotflip(toy, inputs(), 0, k=0)
    with pytest.raises(EmbgradError, match="no replacement"):
        embgrad.hotflip(toy, inputs(), 0, candidates=[0])
    with pytest.raises(EmbgradError, match="tokenizer="):
        embgrad.hotflip(toy, inputs(), 0, candidates="words")
    with pytest.raises(EmbgradError, match="one class index per example"):
        embgrad.hotflip(toy, inputs(), [0, 1])
    with pytest.raises(EmbgradError, match="one target"):
        embgrad.hotflip(toy, inputs(), {"a": 0, "b": 1})
    with pytest.raises(EmbgradError, match="out of range"):
        embgrad.hotflip(toy, inputs(), 0, candidates=[V + 3])
