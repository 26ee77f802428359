"""Issue 12, items 8 and 9: sequence-first ids (the Opacus grid's batch_first=False modules)
both ways, scale_grad_by_freq per example, empty batches, rows_from_lookups shapes and key
overflow, EmbeddingBag offsets, meta tensors. Right values from per-example torch autograd."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError
from torch_helpers import dense_grad

V, D, T, B = 11, 4, 5, 3


class SeqModel(nn.Module):
    """Embedding -> a sequence module (sequence-first unless batch_first) -> a scalar per token."""

    def __init__(self, kind: str, batch_first: bool):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.kind, self.batch_first = kind, batch_first
        if kind in ("LSTM", "GRU", "RNN"):
            self.seq = getattr(nn, kind)(D, 3, batch_first=batch_first)
        elif kind == "TransformerEncoderLayer":
            self.seq = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0, batch_first=batch_first)
        else:   # MultiheadAttention
            self.seq = nn.MultiheadAttention(D, 2, batch_first=batch_first)

    def forward(self, x):
        h = self.emb(x)
        if self.kind == "MultiheadAttention":
            h = self.seq(h, h, h, need_weights=False)[0]
        else:
            h = self.seq(h)
            h = h[0] if isinstance(h, tuple) else h
        return torch.tanh(h).pow(2).sum()


KINDS = ["LSTM", "GRU", "RNN", "TransformerEncoderLayer", "MultiheadAttention"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_first_grid_both_ways(kind, batch_first):
    torch.manual_seed(0)
    model = SeqModel(kind, batch_first).eval()
    x = torch.randint(0, V, (B, T))
    bd = 0 if batch_first else 1
    xin = x if batch_first else x.t().contiguous()           # (T, B) for sequence-first
    ref = torch.stack([dense_grad(model, lambda i=i: model(xin.narrow(bd, i, 1)), model.emb.weight)
                       for i in range(B)])
    # naming the batch dimension: exact
    with embgrad.capture(model, batch_dim=bd) as cap:
        loss = model(xin)
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == B
    torch.testing.assert_close(pe.to_dense(), ref, atol=1e-5, rtol=1e-4)
    # not naming it: sequence-first modules make embgrad refuse rather than guess
    with embgrad.capture(model) as cap:
        loss = model(xin)
    g = cap.gradients(loss).only()
    if batch_first:
        torch.testing.assert_close(g.per_example().to_dense(), ref, atol=1e-5, rtol=1e-4)
    else:
        with pytest.raises(EmbgradError, match="sequence-first.*batch_dim=1"):
            g.per_example()
        torch.testing.assert_close(g.weight_grad.to_dense(), ref.sum(0), atol=1e-5, rtol=1e-4)


def test_batch_dim_validated():
    with pytest.raises(EmbgradError, match="batch_dim must be"):
        embgrad.capture(nn.Embedding(3, 2), batch_dim=-1)


def test_scale_grad_by_freq_per_example_uses_the_example_alone():
    emb = nn.Embedding(4, 2, scale_grad_by_freq=True)
    x = torch.tensor([[1], [1]])
    with embgrad.capture(emb) as cap:
        loss = emb(x).sum()                                   # an L1-like loss: gradient 1 per use
    g = cap.gradients(loss).only()
    pe = g.per_example()
    # each example's own gradient (PyTorch run on that example alone): row 1 = [1, 1]
    for i in range(2):
        ref = dense_grad(emb, lambda i=i: emb(x[i:i + 1]).sum(), emb.weight)
        torch.testing.assert_close(pe.example(i).to_dense(), ref)
    # the whole gradient stays PyTorch's (counts over the batch): row 1 = [1, 1] in all
    torch.testing.assert_close(g.weight_grad.to_dense(), dense_grad(emb, lambda: emb(x).sum(), emb.weight))
    torch.testing.assert_close(pe.sum().to_dense()[1], torch.tensor([2.0, 2.0]))

    torch.manual_seed(1)
    emb = nn.Embedding(V, D, scale_grad_by_freq=True)
    x = torch.randint(0, 4, (B, T))                          # repeats within and across examples
    w = torch.randn(B, T, D)
    with embgrad.capture(emb) as cap:
        loss = (emb(x) * w).sum()
    pe = cap.gradients(loss).only().per_example()
    ref = torch.stack([dense_grad(emb, lambda i=i: (emb(x[i:i + 1]) * w[i:i + 1]).sum(), emb.weight)
                       for i in range(B)])
    torch.testing.assert_close(pe.to_dense(), ref)


@pytest.mark.parametrize("shape", [(0, T), (B, 0)])
def test_empty_batches_give_empty_results(shape):
    model = SeqModel("GRU", True).eval()
    x = torch.zeros(shape, dtype=torch.long)
    if shape[1] == 0:
        model = nn.Embedding(V, D)
    with embgrad.capture(model) as cap:
        loss = model(x).sum() if isinstance(model, nn.Embedding) else model(x)
    g = cap.gradients(loss).only()
    pe = g.per_example()
    assert pe.batch_size == shape[0] and pe.nnz == 0
    torch.testing.assert_close(pe.norms(), torch.zeros(shape[0]))
    assert g.weight_grad.norm() == 0.0 and len(g.weight_grad) == 0
    assert pe.clip(1.0).sum().norm() == 0.0
    e = embgrad.rows_from_lookups(x, torch.zeros(*shape, D), V, per_example=True)
    assert e.batch_size == shape[0]
    torch.testing.assert_close(e.norms(), torch.zeros(shape[0]))


@pytest.mark.parametrize("shape", [(0, 4), (2, 0)])
def test_keras_empty_batches_give_empty_results(shape):
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    emb = keras.layers.Embedding(V, D, name="tok")
    x = np.zeros(shape, "int32")
    with embgrad.capture(emb) as cap:
        loss = tf.reduce_sum(emb(x))
    g = cap.gradients(loss)["tok"]
    pe = g.per_example()
    assert pe.batch_size == shape[0] and pe.nnz == 0
    np.testing.assert_array_equal(pe.norms().numpy(), np.zeros(shape[0]))
    assert g.weight_grad.norm() == 0.0


def test_rows_from_lookups_accepts_what_capture_accepts():
    torch.manual_seed(2)
    emb = nn.Embedding(V, D)
    x = torch.randint(0, V, (B, 2, 3))                        # more than 2 dims, as capture takes
    w = torch.randn(B, 2, 3, D)
    with embgrad.capture(emb) as cap:
        out = emb(x)
        loss = (out * w).sum()
    pe_cap = cap.gradients(loss).only().per_example()
    pe = embgrad.rows_from_lookups(x, w, V, per_example=True)
    torch.testing.assert_close(pe.to_dense(), pe_cap.to_dense())
    ref = torch.stack([dense_grad(emb, lambda i=i: (emb(x[i:i + 1]) * w[i:i + 1]).sum(), emb.weight)
                       for i in range(B)])
    torch.testing.assert_close(pe.to_dense(), ref)
    with pytest.raises(EmbgradError, match="ragged"):
        embgrad.rows_from_lookups([[1, 2], [3]], torch.ones(2, 2, D), V)
    with pytest.raises(EmbgradError, match="0-d"):
        embgrad.rows_from_lookups(torch.tensor(1), torch.ones(D), V)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_example_row_key_overflow_refused(framework):
    if framework == "torch":
        ids, g = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, 1)
    else:
        tf = pytest.importorskip("tensorflow")
        ids, g = tf.zeros((3, 1), tf.int64), tf.ones((3, 1, 1))
    with pytest.raises(EmbgradError, match="overflow int64"):
        embgrad.rows_from_lookups(ids, g, 2 ** 62, per_example=True)
    # the whole-table gradient needs no (example, row) key
    rg = embgrad.rows_from_lookups(ids, g, 2 ** 62)
    np.testing.assert_allclose(rg.numpy()[1], [[3.0]])


@pytest.mark.parametrize("offsets,match", [([0, 3, 1], "out of order"), ([0, -1], "not 0|negative"),
                                           ([1, 2], "first offset is 1"), ([0, 9], "past the end")])
def test_embedding_bag_bad_offsets_refused(offsets, match):
    bag = nn.EmbeddingBag(V, D)
    with pytest.raises(EmbgradError, match=match):
        with embgrad.capture(bag):
            bag(torch.tensor([1, 2, 3, 4]), torch.tensor(offsets))


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_scale_grad_by_freq_definition_and_warning(mode):
    bag = nn.EmbeddingBag(5, 1, mode=mode, scale_grad_by_freq=True)
    x = torch.tensor([[1, 2], [1, 3]])
    with pytest.warns(UserWarning, match="scale_grad_by_freq.*row 2 gets 0.5"):
        with embgrad.capture(bag) as cap:
            loss = bag(x).sum()
    got = cap.gradients(loss).only().weight_grad.to_dense().flatten()
    # the documented definition, as nn.Embedding computes it: each row divided by its count in
    # the mini-batch (checked against nn.Embedding with the same weights and the bag's reduction)
    emb = nn.Embedding(5, 1, scale_grad_by_freq=True)
    with torch.no_grad():
        emb.weight.copy_(bag.weight)
    scale = 0.5 if mode == "mean" else 1.0
    ref = dense_grad(emb, lambda: emb(x).sum() * scale, emb.weight).flatten()
    torch.testing.assert_close(got, ref)
    with warnings.catch_warnings():                       # once per layer
        warnings.simplefilter("error")
        with embgrad.capture(bag):
            bag(x)


def test_meta_tensors_refused_clearly():
    emb = nn.Embedding(5, 2, device="meta")
    with pytest.raises(EmbgradError, match="meta tensor.*to_empty"):
        with embgrad.capture(emb):
            emb(torch.tensor([[1]]))
    with pytest.raises(EmbgradError, match="meta tensor.*to_empty"):
        embgrad.table(emb).assign([1], np.ones((1, 2), np.float32))
    emb = nn.Embedding(5, 2)
    with pytest.raises(EmbgradError, match="meta tensor"):
        with embgrad.capture(emb):
            emb(torch.tensor([[1]], device="meta"))
