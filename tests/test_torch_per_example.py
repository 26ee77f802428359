"""Per-example gradients from one backward pass, checked against a per-example loop,
torch.func (vmap(grad)) and Opacus, plus the sparse operations of ExampleGrads."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError


class Classifier(nn.Module):
    def __init__(self, V=40, D=6, C=3, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def _data(B=8, T=5, V=40, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    x[:, 0] = 3                                   # a row shared by every example
    x[0, 1:3] = 4                                 # a row repeated inside one example
    return x, torch.randint(0, C, (B,), generator=g)


def _loop(model, x, y, reduction="sum"):
    """Dense per-example gradients with one backward per example: (B, V, D)."""
    out = []
    for b in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[b:b + 1]), y[b:b + 1], reduction="sum").backward()
        out.append(model.emb.weight.grad.clone())
    model.zero_grad(set_to_none=True)
    return torch.stack(out)


def _capture(model, x, y, reduction="sum"):
    with embgrad.capture(model) as cap:
        loss = nn.functional.cross_entropy(model(x), y, reduction=reduction)
    return cap.gradients(loss, loss_reduction=reduction).only()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_example_matches_loop(reduction):
    torch.manual_seed(0)
    model = Classifier(padding_idx=0)
    x, y = _data()
    x[1, -1] = 0
    g = _capture(model, x, y, reduction)
    pe = g.per_example()
    ref = _loop(model, x, y)
    torch.testing.assert_close(pe.to_dense(), ref)
    torch.testing.assert_close(pe.norms(), ref.flatten(1).norm(dim=1))
    for b in range(len(x)):
        torch.testing.assert_close(pe.example(b).to_dense(), ref[b])
    torch.testing.assert_close(pe.example(-1).to_dense(), ref[-1])
    # sum() equals weight_grad (sum loss) / B · weight_grad (mean loss)
    scale = len(x) if reduction == "mean" else 1
    torch.testing.assert_close(pe.sum().to_dense(), g.weight_grad.to_dense() * scale)
    # (example, row) pairs are unique and sorted
    keys = pe.example_ids * 40 + pe.rows
    assert torch.equal(keys, torch.unique(keys))
    assert "ExampleGrads(batch_size=8" in repr(pe)


def test_clip_dot_and_dense():
    torch.manual_seed(1)
    model = Classifier()
    x, y = _data()
    pe = _capture(model, x, y).per_example()
    ref = _loop(model, x, y)
    norms = ref.flatten(1).norm(dim=1)
    C = float(norms.median())
    clipped = pe.clip(C)
    factor = torch.clamp(C / norms, max=1.0)
    torch.testing.assert_close(clipped.to_dense(), ref * factor[:, None, None])
    assert float(clipped.norms().max()) <= C * (1 + 1e-5)
    torch.testing.assert_close(clipped.sum().to_dense(), (ref * factor[:, None, None]).sum(0))
    flat = ref.flatten(1)
    torch.testing.assert_close(pe.dot(), flat @ flat.T)
    # against another batch (a join on rows, never densified)
    x2, y2 = _data(B=3, seed=5)
    pe2 = _capture(model, x2, y2).per_example()
    flat2 = _loop(model, x2, y2).flatten(1)
    torch.testing.assert_close(pe.dot(pe2), flat @ flat2.T)
    with pytest.raises(EmbgradError, match="max_bytes"):
        pe.to_dense(max_bytes=1000)
    with pytest.raises(EmbgradError, match="positive"):
        pe.clip(-1.0)
    with pytest.raises(EmbgradError, match="out of range"):
        pe.example(8)


def test_clip_and_scale_are_lazy_and_compose():
    """clip()/scale() keep a per-example factor: values, norms, sum, example and dot all see it,
    whether the factor is applied first (values) or fused (sum, norms)."""
    torch.manual_seed(2)
    model = Classifier(padding_idx=0)
    x, y = _data()
    pe = _capture(model, x, y).per_example()
    ref = _loop(model, x, y)
    norms = ref.flatten(1).norm(dim=1)
    C = float(norms.median())
    f = torch.clamp(C / norms, max=1.0) * torch.linspace(-2.0, 2.0, len(x))   # negative factors too
    lazy = pe.clip(C).scale(torch.linspace(-2.0, 2.0, len(x)))
    want = ref * f[:, None, None]
    torch.testing.assert_close(lazy.norms(), want.flatten(1).norm(dim=1))     # from pe's norms, O(B)
    torch.testing.assert_close(lazy.sum().to_dense(), want.sum(0))            # fused weighted sum
    torch.testing.assert_close(lazy.example(2).to_dense(), want[2])
    torch.testing.assert_close(lazy.dot(), want.flatten(1) @ want.flatten(1).T)
    torch.testing.assert_close(lazy.to_dense(), want)                          # values applied once
    pairs = want[lazy.example_ids, lazy.rows]      # the loop's gradient at each stored (example, row)
    torch.testing.assert_close(lazy.values, pairs)
    torch.testing.assert_close(lazy.values, pairs)  # a second access does not apply the factors again
    fresh = pe.scale(0.5).clip(C)                 # norms computed after the factor
    torch.testing.assert_close(fresh.norms(), torch.clamp(0.5 * norms, max=C))
    torch.testing.assert_close(pe.to_dense(), ref)                             # pe itself unchanged
    with pytest.raises(EmbgradError, match=r"\(8,\) tensor"):
        pe.scale(torch.ones(3))


def test_dot_chunked_equals_unchunked(monkeypatch):
    import embgrad.sparse as sp
    torch.manual_seed(2)
    model = Classifier(V=15)
    x, y = _data(B=10, T=9, V=15)
    pe = _capture(model, x, y).per_example()
    full = pe.dot()
    monkeypatch.setattr(sp, "_PAIR_CHUNK", 7)     # force many tiny chunks
    torch.testing.assert_close(pe.dot(), full)


def test_matches_torch_func_vmap():
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(3)
    model = Classifier()
    x, y = _data()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xb, yb):
        out = functional_call(model, p, (xb[None],))
        return nn.functional.cross_entropy(out, yb[None], reduction="sum")

    ref = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)["emb.weight"]
    pe = _capture(model, x, y).per_example()
    torch.testing.assert_close(pe.to_dense(), ref)


def test_matches_opacus_grad_sample():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(4)
    model = Classifier()
    x, y = _data()
    gsm = opacus.GradSampleModule(Classifier(), loss_reduction="sum")
    gsm._module.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    ref = gsm._module.emb.weight.grad_sample
    pe = _capture(model, x, y).per_example()
    torch.testing.assert_close(pe.to_dense(), ref)
    gsm._close() if hasattr(gsm, "_close") else None


def test_rows_from_lookups_and_row_grad_low_level():
    ids = torch.tensor([[0, 1, 0, 2]])
    og = torch.ones(1, 4, 3) * torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None]
    rg = embgrad.rows_from_lookups(ids, og, 4)
    assert rg.rows.tolist() == [0, 1, 2]
    torch.testing.assert_close(rg.values, torch.tensor([[4.0] * 3, [2.0] * 3, [4.0] * 3]))
    pe = embgrad.rows_from_lookups(ids.reshape(-1), og.reshape(4, 3), 4, per_example=True)
    assert pe.batch_size == 4 and pe.nnz == 4
    ign = embgrad.rows_from_lookups(ids, og, 4, ignore_index=0)
    assert ign.rows.tolist() == [1, 2]
    dense = rg.to_dense()
    assert embgrad.row_grad(dense).rows.tolist() == [0, 1, 2]
    sp = dense.to_sparse()
    torch.testing.assert_close(embgrad.row_grad(sp).to_dense(), dense)
    dup = torch.sparse_coo_tensor(torch.tensor([[2, 0, 2]]), torch.ones(3, 3), (4, 3),
                                  check_invariants=True)  # uncoalesced
    assert embgrad.row_grad(dup).values[1].tolist() == [2.0, 2.0, 2.0]
    s = rg + embgrad.rows_from_lookups(torch.tensor([[3]]), torch.ones(1, 1, 3), 4)
    assert s.rows.tolist() == [0, 1, 2, 3]
    with pytest.raises(EmbgradError, match="id 4 is out of range"):
        embgrad.rows_from_lookups(torch.tensor([[4]]), torch.ones(1, 1, 3), 4)
    with pytest.raises(EmbgradError, match="shape"):
        embgrad.rows_from_lookups(ids, torch.ones(1, 3, 3), 4)
    with pytest.raises(EmbgradError, match="integers"):
        embgrad.rows_from_lookups(ids.float(), og, 4)
    with pytest.raises(EmbgradError, match="NaN"):
        embgrad.rows_from_lookups(ids, og * float("nan"), 4)
    with pytest.raises(EmbgradError, match="different tables"):
        rg + embgrad.rows_from_lookups(ids, og, 5)
    with pytest.raises(EmbgradError, match="num_rows"):
        embgrad.row_grad(dense, num_rows=7)
