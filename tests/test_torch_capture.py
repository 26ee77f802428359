"""PyTorch capture: every result checked against PyTorch's own dense weight.grad."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError
from torch_helpers import assert_unchanged, dense_grad, snapshot

torch.manual_seed(0)


class Classifier(nn.Module):
    """embedding -> mean pool -> linear, the demo's shape."""

    def __init__(self, V=50, D=8, C=3, **emb_kwargs):
        super().__init__()
        self.emb = nn.Embedding(V, D, **emb_kwargs)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def _loss(model, x, y, reduction="sum"):
    return nn.functional.cross_entropy(model(x), y, reduction=reduction)


def _xy(B=6, T=7, V=50, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, C, (B,), generator=g)


def test_import_loads_no_framework():
    code = ("import sys, embgrad, embgrad.backends, embgrad.sparse, embgrad.capture\n"
            "bad = [m for m in ('torch', 'tensorflow', 'keras', 'mxnet', 'jax') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_weight_grad_matches_dense_and_writes_no_grad():
    model = Classifier()
    x, y = _xy()
    before = snapshot(model)
    with embgrad.capture(model) as cap:
        loss = _loss(model, x, y)
    grads = cap.gradients(loss)
    assert_unchanged(model, before)          # no .grad written, hooks gone
    g = grads["emb"]
    assert g is grads.only()
    assert g.ids is x and tuple(g.output_grad.shape) == (6, 7, 8)
    rg = g.weight_grad
    assert rg.rows.dtype == torch.int64 and rg.values.dtype == torch.float32
    assert torch.equal(rg.rows, torch.unique(x))
    ref = dense_grad(model, lambda: _loss(model, x, y), model.emb.weight)
    torch.testing.assert_close(rg.to_dense(), ref)
    torch.testing.assert_close(torch.tensor(rg.norm()), ref.norm())
    torch.testing.assert_close(rg.row_norms(), ref[rg.rows].norm(dim=1))
    rows, vals = rg.numpy()
    assert rows.tolist() == torch.unique(x).tolist() and vals.shape == (len(rows), 8)
    assert "RowGrad(rows=" in repr(rg) and "emb" in repr(g)


def test_output_grad_is_dloss_dlookup():
    model = Classifier()
    x, y = _xy()
    with embgrad.capture(model) as cap:
        loss = _loss(model, x, y)
    og = cap.gradients(loss, retain_graph=True)["emb"].output_grad
    e = model.emb(x).detach().requires_grad_()
    ref, = torch.autograd.grad(nn.functional.cross_entropy(model.head(e.mean(1)), y, reduction="sum"), e)
    torch.testing.assert_close(og, ref)


def test_gradients_after_user_backward_no_second_pass():
    model = Classifier()
    x, y = _xy()
    with embgrad.capture(model) as cap:
        loss = _loss(model, x, y)
        loss.backward()                       # the user's own training step
    rg = cap.gradients().only().weight_grad
    torch.testing.assert_close(rg.to_dense(), model.emb.weight.grad)
    model.zero_grad(set_to_none=True)


def test_gradients_without_loss_or_backward_is_clear():
    model = Classifier()
    x, y = _xy()
    with embgrad.capture(model) as cap:
        _loss(model, x, y)
    with pytest.raises(EmbgradError, match="backward"):
        cap.gradients()


def test_padding_idx_gets_no_gradient_also_per_example():
    model = Classifier(padding_idx=0)
    x, y = _xy()
    x[:, -2:] = 0
    with embgrad.capture(model) as cap:
        loss = _loss(model, x, y)
    g = cap.gradients(loss).only()
    assert 0 not in g.weight_grad.rows.tolist()
    ref = dense_grad(model, lambda: _loss(model, x, y), model.emb.weight)
    assert ref[0].abs().sum() == 0
    torch.testing.assert_close(g.weight_grad.to_dense(), ref)
    assert 0 not in g.per_example().rows.tolist()


def test_scale_grad_by_freq_matches_torch():
    model = Classifier(scale_grad_by_freq=True, V=10)
    x, y = _xy(V=10)
    with embgrad.capture(model) as cap:
        loss = _loss(model, x, y)
    rg = cap.gradients(loss).only().weight_grad
    torch.testing.assert_close(rg.to_dense(), dense_grad(model, lambda: _loss(model, x, y), model.emb.weight))


def test_max_norm_warns_once_and_matches():
    model = Classifier(max_norm=0.5)
    x, y = _xy()
    with pytest.warns(UserWarning, match="IN PLACE"):
        with embgrad.capture(model) as cap:
            loss = _loss(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with embgrad.capture(model) as cap:
            loss = _loss(model, x, y)
    rg = cap.gradients(loss).only().weight_grad
    torch.testing.assert_close(rg.to_dense(), dense_grad(model, lambda: _loss(model, x, y), model.emb.weight))


def test_sparse_true_matches_coalesced_sparse_grad():
    model = Classifier(sparse=True)
    x, y = _xy()
    with embgrad.capture(model) as cap:
        loss = _loss(model, x, y)
    rg = cap.gradients(loss).only().weight_grad
    model.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()
    ref = model.emb.weight.grad.coalesce()
    assert torch.equal(rg.rows, ref.indices()[0])
    torch.testing.assert_close(rg.values, ref.values())
    via_row_grad = embgrad.row_grad(model.emb.weight.grad)
    torch.testing.assert_close(via_row_grad.values, rg.values)
    model.zero_grad(set_to_none=True)


def test_frozen_table_still_gives_output_grads():
    model = Classifier()
    model.emb.weight.requires_grad_(False)
    x, y = _xy()
    before = snapshot(model)
    with embgrad.capture(model) as cap:
        loss = _loss(model, x, y)
    g = cap.gradients(loss).only()
    assert g.frozen
    assert_unchanged(model, before)
    assert not model.emb.weight.requires_grad
    e = model.emb(x).detach().requires_grad_()
    ref, = torch.autograd.grad(nn.functional.cross_entropy(model.head(e.mean(1)), y, reduction="sum"), e)
    torch.testing.assert_close(g.output_grad, ref)
    # the gradient the table would get if it were trainable
    full = dense_grad(model, lambda: _loss(model, x, y), model.emb.weight)
    torch.testing.assert_close(g.weight_grad.to_dense(), full)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["2d", "offsets"])
def test_embedding_bag_modes(mode, layout):
    torch.manual_seed(1)
    V, D = 30, 5
    bag = nn.EmbeddingBag(V, D, mode=mode)
    head = nn.Linear(D, 2)
    model = nn.ModuleDict({"bag": bag, "head": head})
    use_psw = mode == "sum"
    if layout == "2d":
        inp = torch.randint(0, V, (4, 6))
        inp[0, :3] = 7                                  # duplicates inside a bag
        offsets = None
        psw = torch.rand(4, 6) if use_psw else None
        B = 4
    else:
        inp = torch.randint(0, V, (13,))
        inp[2:5] = 9
        offsets = torch.tensor([0, 3, 3, 8, 10])       # includes an empty bag
        psw = torch.rand(13) if use_psw else None
        B = 5
    y = torch.randint(0, 2, (B,))

    def loss_fn():
        return nn.functional.cross_entropy(head(bag(inp, offsets, per_sample_weights=psw)), y, reduction="sum")

    with embgrad.capture(model) as cap:
        loss = loss_fn()
    g = cap.gradients(loss).only()
    assert g.name == "bag" and g.ids.shape[0] == B
    ref = dense_grad(model, loss_fn, bag.weight)
    torch.testing.assert_close(g.weight_grad.to_dense(), ref)
    # per-example: an example is a bag; compare with one backward per bag
    pe = g.per_example()
    for b in range(B):
        def one(b=b):
            out = head(bag(inp, offsets, per_sample_weights=psw))
            return nn.functional.cross_entropy(out[b:b + 1], y[b:b + 1], reduction="sum")
        torch.testing.assert_close(pe.example(b).to_dense(), dense_grad(model, one, bag.weight))


def test_embedding_bag_padding_idx_mean():
    bag = nn.EmbeddingBag(20, 4, mode="mean", padding_idx=0)
    inp = torch.tensor([[1, 2, 0, 0], [3, 0, 3, 4]])
    with embgrad.capture(bag) as cap:
        loss = (bag(inp) ** 2).sum()
    rg = cap.gradients(loss).only().weight_grad
    torch.testing.assert_close(rg.to_dense(), dense_grad(bag, lambda: (bag(inp) ** 2).sum(), bag.weight))
    assert 0 not in rg.rows.tolist()


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, a, b):
        return self.head(self.emb(a).mean(1) * self.emb(b).mean(1)).squeeze(-1)


def test_layer_called_twice_records_both_and_sums():
    model = Siamese()
    a, _ = _xy(B=5, T=4, V=40)
    b, _ = _xy(B=5, T=6, V=40, seed=3)
    with embgrad.capture(model) as cap:
        loss = model(a, b).sum()
    g = cap.gradients(loss).only()
    assert len(g.calls) == 2 and g.ids is a and g.calls[1][0] is b
    ref = dense_grad(model, lambda: model(a, b).sum(), model.emb.weight)
    torch.testing.assert_close(g.weight_grad.to_dense(), ref)
    pe = g.per_example()
    for i in range(5):
        r = dense_grad(model, lambda i=i: model(a[i:i + 1], b[i:i + 1]).sum(), model.emb.weight)
        torch.testing.assert_close(pe.example(i).to_dense(), r)


class TiedLM(nn.Module):
    def __init__(self, V=30, D=6):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, V, bias=False)
        self.proj.weight = self.emb.weight           # tied output projection

    def forward(self, x):
        return self.proj(torch.tanh(self.emb(x)))


def test_tied_table_whole_by_default_lookup_part_by_name():
    model = TiedLM()
    x, _ = _xy(B=3, T=5, V=30)
    y = torch.randint(0, 30, (3, 5))

    def loss_fn(m=model):
        return nn.functional.cross_entropy(m(x).reshape(-1, 30), y.reshape(-1), reduction="sum")

    with embgrad.capture(model) as cap:
        loss = loss_fn()
    g = cap.gradients(loss).only()
    assert g.tied and "tied=True" in repr(g)
    full = dense_grad(model, loss_fn, model.emb.weight)
    # the projection part alone: the same loss with the lookup detached from the table
    e = nn.functional.embedding(x, model.emb.weight.detach())
    w = model.emb.weight.detach().clone().requires_grad_()
    proj_part, = torch.autograd.grad(
        nn.functional.cross_entropy(nn.functional.linear(torch.tanh(e), w).reshape(-1, 30), y.reshape(-1),
                                    reduction="sum"), w)
    torch.testing.assert_close(g.lookup_grad.to_dense() + proj_part, full)
    torch.testing.assert_close(g.weight_grad.to_dense(), full)            # the whole table by default
    torch.testing.assert_close(g.per_example(part="lookup").sum().to_dense(), g.lookup_grad.to_dense())


def test_no_grad_forward_is_a_clear_error():
    model = Classifier()
    x, y = _xy()
    with embgrad.capture(model) as cap:
        with torch.no_grad():
            model(x)
    with pytest.raises(EmbgradError, match="no_grad"):
        cap.gradients(torch.tensor(1.0, requires_grad=True))


def test_layer_never_looked_up_is_a_clear_error():
    model = Classifier()
    with embgrad.capture(model) as cap:
        loss = model.head(torch.randn(2, 8)).sum()
    with pytest.raises(EmbgradError, match="no lookup"):
        cap.gradients(loss)
    x, _ = _xy()
    model(x)                                    # a forward after the block is not recorded
    with pytest.raises(EmbgradError, match="after the block"):
        cap.gradients(loss)


def test_gradients_before_forward():
    cap = embgrad.capture(Classifier())
    with pytest.raises(EmbgradError, match="before any forward"):
        cap.gradients(torch.tensor(0.0))


def test_loss_must_be_scalar_and_reduction_known():
    model = Classifier()
    x, y = _xy()
    with embgrad.capture(model) as cap:
        out = model(x)
    with pytest.raises(EmbgradError, match="scalar"):
        cap.gradients(out)
    with pytest.raises(EmbgradError, match="loss_reduction"):
        cap.gradients(out.sum(), loss_reduction="avg")


@pytest.mark.parametrize("bad,match", [(-1, "id -1"), (50, "id 50")])
def test_out_of_range_ids_caught_before_torch(bad, match):
    model = Classifier()
    x, y = _xy()
    x[2, 3] = bad
    before = snapshot(model)
    with pytest.raises(EmbgradError, match=match) as ei:
        with embgrad.capture(model):
            model(x)
    msg = str(ei.value)
    assert "'emb'" in msg and "(2, 3)" in msg and "50 rows" in msg
    assert_unchanged(model, before)


def test_float_ids_and_empty_batch():
    model = Classifier()
    with pytest.raises(EmbgradError, match="dtype torch.float32"):
        with embgrad.capture(model):
            model.emb(torch.zeros(2, 3))
    with embgrad.capture(model) as cap:                  # an empty batch: empty results
        out = model.emb(torch.zeros(0, 3, dtype=torch.long))
    pe = cap.gradients(out.sum()).only().per_example()
    assert pe.batch_size == 0 and pe.norms().shape == (0,)


def test_nan_output_grad_named():
    model = Classifier()
    x, y = _xy()
    with embgrad.capture(model) as cap:
        loss = (model(x) * float("nan")).sum()
    with pytest.raises(EmbgradError, match=r"'emb'.*NaN/Inf"):
        cap.gradients(loss)


def test_unknown_layer_and_model_without_embeddings():
    model = Classifier()
    with pytest.raises(EmbgradError, match=r"closest names: 'emb'"):
        embgrad.capture(model, layers="embb")
    with pytest.raises(EmbgradError, match="Embedding"):
        embgrad.capture(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(EmbgradError, match="not an embedding layer"):
        embgrad.capture(model, layers=[model.head])
    assert embgrad.capture(model, layers=[model.emb]).layers[0].name == "emb"


def test_model_untouched_when_forward_raises():
    model = Classifier()
    model.eval()
    x, y = _xy()
    before = snapshot(model)

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with embgrad.capture(model):
            model(x)
            raise Boom("user code failed mid-forward")
    assert_unchanged(model, before)
    assert not model.training


def test_batchnorm_in_training_warns_on_per_example():
    model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 1))
    x = torch.randint(0, 20, (5, 3))
    with embgrad.capture(model) as cap:
        loss = model(x).sum()
    g = cap.gradients(loss).only()
    with pytest.warns(UserWarning, match="BatchNorm"):
        g.per_example()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_accumulates_in_float32(dtype):
    emb = nn.Embedding(40, 8).to(dtype)
    x = torch.randint(0, 40, (4, 9))
    x[:, :3] = 5                                  # many duplicates of one row
    with embgrad.capture(emb) as cap:
        loss = emb(x).float().pow(2).sum()
    g = cap.gradients(loss).only()
    assert g.output_grad.dtype == dtype
    assert g.weight_grad.values.dtype == torch.float32
    assert g.per_example().values.dtype == torch.float32
    ref = torch.zeros(40, 8).index_add_(0, x.reshape(-1), g.output_grad.float().reshape(-1, 8))
    torch.testing.assert_close(g.weight_grad.to_dense(), ref)
