"""Hugging Face models (small random BERT, no download) and property-based tests."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import embgrad
from embgrad import EmbgradError
from torch_helpers import assert_unchanged, dense_grad, snapshot

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=24, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    model.eval()
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[2, 7:] = 0
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_hf_bert_finds_word_position_token_type(bert):
    batch = _batch()
    labels = torch.tensor([0, 1, 1])
    before = snapshot(bert)
    with embgrad.capture(bert) as cap:
        loss = bert(**batch, labels=labels).loss
    grads = cap.gradients(loss, loss_reduction="mean")
    assert_unchanged(bert, before)
    names = set(grads)
    assert {"bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
            "bert.embeddings.token_type_embeddings"} <= names
    for name in names:
        weight = bert.get_submodule(name).weight
        ref = dense_grad(bert, lambda: bert(**batch, labels=labels).loss, weight)
        torch.testing.assert_close(grads[name].weight_grad.to_dense(), ref, atol=1e-6, rtol=1e-5)
    word = grads["bert.embeddings.word_embeddings"]
    assert torch.equal(word.ids, batch["input_ids"]) and word.output_grad.shape == (3, 10, 16)


def test_hf_select_one_layer_and_per_example(bert):
    batch = _batch()
    labels = torch.tensor([0, 1, 1])
    with embgrad.capture(bert.bert, layers="embeddings.word_embeddings") as cap:
        loss = nn.functional.cross_entropy(bert(**batch).logits, labels, reduction="sum")
    grads = cap.gradients(loss)
    assert list(grads) == ["embeddings.word_embeddings"]
    pe = grads.only().per_example()
    w = bert.bert.embeddings.word_embeddings.weight
    for b in range(3):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        ref = dense_grad(bert, lambda: nn.functional.cross_entropy(bert(**one).logits, labels[b:b + 1],
                                                                   reduction="sum"), w)
        torch.testing.assert_close(pe.example(b).to_dense(), ref, atol=1e-6, rtol=1e-5)


def test_hf_out_of_range_token_is_named(bert):
    batch = _batch()
    batch["input_ids"][1, 4] = 150
    with pytest.raises(EmbgradError, match=r"word_embeddings.*id 150 at position \(1, 4\)"):
        with embgrad.capture(bert):
            bert(**batch)


# ---------------------------------------------------------------------------- properties
class Pool(nn.Module):
    def __init__(self, V, D, padding_idx):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.w = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return torch.tanh(self.emb(x) @ self.w).sum(1)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 7), V=st.integers(1, 30), D=st.integers(1, 5),
       pad=st.booleans(), dup=st.booleans(), seed=st.integers(0, 2 ** 16),
       reduction=st.sampled_from(["sum", "mean"]))
def test_property_matches_dense_and_loop(B, T, V, D, pad, dup, seed, reduction):
    torch.manual_seed(seed)
    model = Pool(V, D, 0 if pad else None)
    x = torch.randint(0, V, (B, T))
    if dup:
        x[:, -1] = x[:, 0]
    if pad and T > 1:
        x[0, 1] = 0
    before = snapshot(model)

    def loss_fn(xx=x):
        out = model(xx)
        return out.sum() if reduction == "sum" else out.mean()

    with embgrad.capture(model) as cap:
        loss = loss_fn()
    g = cap.gradients(loss, loss_reduction=reduction).only()
    assert_unchanged(model, before)
    ref = dense_grad(model, loss_fn, model.emb.weight)
    torch.testing.assert_close(g.weight_grad.to_dense(), ref, atol=1e-5, rtol=1e-5)
    pe = g.per_example()
    loop = torch.stack([dense_grad(model, lambda b=b: model(x[b:b + 1]).sum(), model.emb.weight)
                        for b in range(B)])
    torch.testing.assert_close(pe.to_dense(), loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pe.norms(), loop.flatten(1).norm(dim=1), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 5), V=st.integers(2, 12), bad=st.integers(-5, 30),
       raise_mid=st.booleans())
def test_property_model_untouched_on_errors(B, T, V, bad, raise_mid):
    model = Pool(V, 3, None)
    x = torch.randint(0, V, (B, T))
    x[0, 0] = bad
    before = snapshot(model)
    in_range = 0 <= bad < V
    try:
        with embgrad.capture(model) as cap:
            model(x)
            if raise_mid:
                raise KeyError("boom")
    except EmbgradError as e:
        assert not in_range and f"id {bad}" in str(e)
    except KeyError:
        assert in_range and raise_mid
    else:
        assert in_range and not raise_mid
    assert_unchanged(model, before)
