"""Tied tables in PyTorch: per-example gradients of the WHOLE table (lookups + the output
projection that shares it + their cross term), against torch.func per-example gradients of the
full table and a per-example autograd loop; uses of the table outside lookups that embgrad cannot
see are flagged tied and refused (issue 12, item 3), never a silent lookup-only answer."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import embgrad
from embgrad import EmbgradError
from torch_helpers import assert_unchanged, snapshot

V, D = 30, 6


class TiedLM(nn.Module):
    """Input embedding tied to an output head with a bias, logit scaling and softcapping."""

    def __init__(self, bias=True, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=bias)
        self.head.weight = self.emb.weight

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x)))
        logits = self.head(h) / 0.7                       # logit scaling
        return 5.0 * torch.tanh(logits / 5.0)             # softcapping (Gemma-style)


def _data(B=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (B, T), generator=g)
    x[0, 3:] = 0                                          # padding
    y = torch.randint(0, V, (B, T), generator=g)
    y[1, 2] = -100                                        # an ignored label
    y[0, 3:] = -100
    return x, y


def _ce(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                       reduction="sum", ignore_index=-100)


def _func_per_example(model, x, y, name="emb.weight"):
    """torch.func per-example gradients (B, V, D) of the full (tied) table."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xb, yb):
        return _ce(functional_call(model, p, (xb[None],)), yb[None])
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)[name]


def _clipped_sum(pe, c):
    n = pe.flatten(1).norm(dim=1)
    return (pe * torch.clamp(c / n, max=1.0)[:, None, None]).sum(0)


def test_whole_table_per_example_equals_torch_func():
    torch.manual_seed(0)
    model = TiedLM().double()
    x, y = _data()
    before = snapshot(model)
    with embgrad.capture(model) as cap:
        loss = _ce(model(x), y)
    g = cap.gradients(loss).only()
    assert_unchanged(model, before)
    assert g.tied and len(g.projections) == 1
    ref = _func_per_example(model, x, y)                      # (B, V, D)
    pe = g.per_example()
    torch.testing.assert_close(pe.norms(), ref.flatten(1).norm(dim=1))
    torch.testing.assert_close(pe.to_dense(), ref)
    torch.testing.assert_close(pe.example(2).to_dense(), ref[2])
    torch.testing.assert_close(pe.clip(1.5).sum().to_dense(), _clipped_sum(ref, 1.5))
    torch.testing.assert_close(pe.clip(1.5).norms(), torch.clamp(ref.flatten(1).norm(dim=1), max=1.5))
    f = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(pe.scale(f).sum().to_dense(), (ref * f[:, None, None]).sum(0))
    flat = ref.flatten(1)
    torch.testing.assert_close(pe.dot(), flat @ flat.T)
    clipped = (ref * torch.clamp(0.5 / flat.norm(dim=1), max=1)[:, None, None]).flatten(1)
    torch.testing.assert_close(pe.dot(pe.clip(0.5)), flat @ clipped.T)
    # the whole table's gradient by default, the lookup part by name
    full, = torch.autograd.grad(_ce(model(x), y), model.emb.weight)
    torch.testing.assert_close(g.weight_grad.to_dense(), full)
    torch.testing.assert_close(pe.sum().to_dense(), full)
    lookup = g.per_example(part="lookup")
    assert isinstance(lookup, embgrad.ExampleGrads)
    torch.testing.assert_close(lookup.sum().to_dense(), g.lookup_grad.to_dense())
    torch.testing.assert_close(pe.dot(lookup), flat @ lookup.to_dense().flatten(1).T)
    assert not torch.allclose(g.lookup_grad.to_dense(), full)


def test_mean_reduction_and_called_several_times():
    torch.manual_seed(1)

    class TwoCalls(TiedLM):
        def forward(self, x):                              # the embedding and the head twice each
            a = self.head(torch.tanh(self.emb(x)))
            b = self.head(torch.tanh(self.mix(self.emb(x.flip(1)))))
            return a + 0.5 * b

    model = TwoCalls(bias=False).double()
    x, y = _data(B=3, T=4, seed=3)
    with embgrad.capture(model) as cap:
        loss = _ce(model(x), y) / 3
    g = cap.gradients(loss, loss_reduction="mean").only()
    assert len(g.calls) == 2 and len(g.projections) == 2
    ref = _func_per_example(model, x, y)
    pe = g.per_example()
    torch.testing.assert_close(pe.norms(), ref.flatten(1).norm(dim=1))
    torch.testing.assert_close(pe.sum().to_dense(), ref.sum(0))
    torch.testing.assert_close(g.weight_grad.to_dense(), ref.sum(0) / 3)


class HandProjection(nn.Module):
    """Issue 12 item 3's model: the table read outside its lookups, `h @ emb.weight.T`."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 2)

    def forward(self, x):
        return self.emb(x).mean(1) @ self.emb.weight.t()


def test_hand_written_projection_is_flagged_tied_and_refused():
    """Issue 12 item 3: `self.emb(x).mean(1) @ self.emb.weight.t()` reads the table outside its
    lookups; weight_grad is the exact whole table, per_example() refuses with the fix."""
    torch.manual_seed(0)
    f = HandProjection()
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with embgrad.capture(f) as cap:
        out = f(x)
    g = cap.gradients((out ** 2).sum()).only()
    assert g.tied
    full, = torch.autograd.grad((f(x) ** 2).sum(), f.emb.weight)
    torch.testing.assert_close(g.weight_grad.to_dense(), full)
    assert (g.lookup_grad.to_dense() - full).norm() > 0.1   # the lookup part alone is not the gradient
    with pytest.raises(EmbgradError, match=r"nn\.Linear that shares the table.*part='lookup'"):
        g.per_example()
    with pytest.raises(EmbgradError, match="'table'.*'lookup'"):
        g.per_example(part="whole")
    # the lookup part, asked for by name, is still exact
    torch.testing.assert_close(g.per_example(part="lookup").sum().to_dense(), g.lookup_grad.to_dense())


def test_embedding_captured_alone_finds_the_head_read_as_unknown():
    """Capturing only the embedding module hides the head: the graph shows the extra use."""
    torch.manual_seed(0)
    model = TiedLM(bias=False)
    x, y = _data()
    with embgrad.capture(model.emb) as cap:
        loss = _ce(model(x), y)
    g = cap.gradients(loss).only()
    assert g.tied
    with pytest.raises(EmbgradError, match="pass the whole model"):
        g.per_example().norms()


def test_two_embedding_modules_sharing_one_table():
    """Encoder and decoder embeddings sharing one weight (BART/T5 style) plus a tied head."""
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Embedding(V, D)
            self.dec = nn.Embedding(V, D)
            self.dec.weight = self.enc.weight
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.enc.weight

        def forward(self, src, tgt):
            ctx = self.enc(src).mean(1, keepdim=True)
            return self.head(torch.tanh(self.dec(tgt) + ctx))

    torch.manual_seed(0)
    model = EncDec().double()
    src, y = _data(B=3, T=4, seed=5)
    tgt = torch.randint(0, V, (3, 4))
    with embgrad.capture(model) as cap:
        loss = _ce(model(src, tgt), y)
    grads = cap.gradients(loss)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def lossf(p, s, t, yb):
        return _ce(functional_call(model, p, (s[None], t[None])), yb[None])
    ref = vmap(grad(lossf), in_dims=(None, 0, 0, 0))(params, src, tgt, y)["enc.weight"]
    for name in ("enc", "dec"):
        assert grads[name].tied
        torch.testing.assert_close(grads[name].per_example().norms(), ref.flatten(1).norm(dim=1))
        torch.testing.assert_close(grads[name].weight_grad.to_dense(), ref.sum(0))


transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _lm_batch(B=3, T=8, V=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0                                       # right padding in example 2
    labels = ids.clone()
    labels[mask == 0] = -100
    return ids, mask, labels


def _shifted_ce(logits, labels):
    return _ce(logits[:, :-1].float(), labels[:, 1:])


def _loop_per_example(model, weight, ids, mask, labels, autocast=None):
    """Per-example gradients of the full table by a loop of autograd over single examples."""
    out = []
    for i in range(ids.shape[0]):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
        g, = torch.autograd.grad(_shifted_ce(logits, labels[i:i + 1]), weight)
        out.append(g)
    return torch.stack(out)


def test_hf_gpt2_tied_wte_lm_head():
    model = _gpt2()
    wte = model.transformer.wte
    assert model.get_output_embeddings().weight is wte.weight
    ids, mask, labels = _lm_batch()
    with embgrad.capture(model, layers="transformer.wte") as cap:
        loss = _shifted_ce(model(input_ids=ids, attention_mask=mask).logits, labels)
    g = cap.gradients(loss).only()
    assert g.tied
    ref = _loop_per_example(model, wte.weight, ids, mask, labels)
    pe = g.per_example()
    torch.testing.assert_close(pe.norms(), ref.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pe.clip(0.3).sum().to_dense(), _clipped_sum(ref, 0.3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g.weight_grad.to_dense(), ref.sum(0), rtol=1e-4, atol=1e-6)
    flat = ref.flatten(1)
    torch.testing.assert_close(pe.dot(), flat @ flat.T, rtol=1e-4, atol=1e-6)


def test_hf_gpt2_mixed_precision_bf16():
    model = _gpt2()
    wte = model.transformer.wte
    ids, mask, labels = _lm_batch(seed=4)
    with embgrad.capture(model, layers="transformer.wte") as cap:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = _shifted_ce(logits, labels)
    g = cap.gradients(loss).only()
    assert g.projections[0][1].dtype == torch.bfloat16          # the logit gradient stays bf16 ...
    norms = g.per_example().norms()
    assert norms.dtype == torch.float32                          # ... embgrad accumulates in float32
    ref = _loop_per_example(model, wte.weight, ids, mask, labels, autocast=torch.bfloat16)
    torch.testing.assert_close(norms, ref.float().flatten(1).norm(dim=1), rtol=3e-2, atol=1e-3)


def test_hf_bert_masked_lm_decoder_with_bias():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(cfg).eval()
    word = model.bert.embeddings.word_embeddings
    assert model.get_output_embeddings().weight is word.weight
    g0 = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (3, 7), generator=g0)
    mask = torch.ones_like(ids)
    ids[1, 5:] = 0
    mask[1, 5:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]                                 # masked-LM: a few labelled positions
    labels[0, 4] = ids[0, 4]
    ids[:, 2] = 3                                            # the [MASK] id

    def loss_of(i, j):
        logits = model(input_ids=ids[i:j], attention_mask=mask[i:j]).logits
        return _ce(logits, labels[i:j])

    with embgrad.capture(model, layers="bert.embeddings.word_embeddings") as cap:
        loss = loss_of(0, 3)
    g = cap.gradients(loss).only()
    assert g.tied
    ref = torch.stack([torch.autograd.grad(loss_of(i, i + 1), word.weight)[0] for i in range(3)])
    pe = g.per_example()
    torch.testing.assert_close(pe.norms(), ref.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pe.clip(0.2).sum().to_dense(), _clipped_sum(ref, 0.2), rtol=1e-4, atol=1e-6)
    # the lookup part alone differs: the decoder's part is large
    assert not torch.allclose(g.per_example(part="lookup").norms(), pe.norms(), rtol=1e-2)


def test_projection_on_flattened_positions_is_refused():
    class Flat(TiedLM):
        def forward(self, x):
            h = torch.tanh(self.emb(x))
            return self.head(h.reshape(-1, D)).reshape(x.shape[0], x.shape[1], V)

    model = Flat(bias=False)
    x, y = _data(B=2, T=3)
    with embgrad.capture(model) as cap:
        loss = _ce(model(x), y)
    g = cap.gradients(loss).only()
    with pytest.raises(EmbgradError, match=r"not flattened to \(B\*T, D\)"):
        g.per_example()
    full, = torch.autograd.grad(_ce(model(x), y), model.emb.weight)
    torch.testing.assert_close(g.weight_grad.to_dense(), full)     # the sum needs no examples


def test_users_own_backward_without_the_loss():
    """gradients() without the loss after loss.backward(): the table's accumulated gradient
    (what that backward added to weight.grad) shows a read outside the lookups; a tied nn.Linear
    head is recognised and exact."""
    torch.manual_seed(0)
    f = HandProjection()
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with embgrad.capture(f) as cap:
        (f(x) ** 2).sum().backward()
    g = cap.gradients().only()
    assert g.tied
    torch.testing.assert_close(g.weight_grad.to_dense(), f.emb.weight.grad)
    with pytest.raises(EmbgradError, match="total gradient differs"):
        g.per_example()
    f.emb.weight.grad = torch.ones_like(f.emb.weight)      # an earlier accumulated gradient
    with embgrad.capture(f) as cap:
        (f(x) ** 2).sum().backward()
    g = cap.gradients().only()
    assert g.tied
    with pytest.raises(EmbgradError, match="lookup_grad"):
        g.weight_grad

    model = TiedLM().double()
    xs, ys = _data()
    with embgrad.capture(model) as cap:
        _ce(model(xs), ys).backward()
    g = cap.gradients().only()
    ref = _func_per_example(model, xs, ys)
    torch.testing.assert_close(g.per_example().norms(), ref.flatten(1).norm(dim=1))
    torch.testing.assert_close(g.weight_grad.to_dense(), model.emb.weight.grad)
