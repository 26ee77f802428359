"""Issue 12 (items 2, 7, 8): several forwards in one capture, gradients() twice, a loss from
outside the block, in-place ops on the lookup output, gradient checkpointing, torch.compile,
and inputs that got cryptic internal errors. Right values from plain torch autograd."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import embgrad
from embgrad import EmbgradError
from torch_helpers import dense_grad


class Small(nn.Module):
    def __init__(self, V=12, D=4):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        return torch.tanh(self.head(self.emb(x)).squeeze(-1)).pow(2).sum(1) * 3


def _ids(B, T=5, V=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _loop(model, xs, weight, fwd=None):
    fwd = fwd or (lambda x: model(x).sum())
    return torch.stack([dense_grad(model, lambda x=x: fwd(x), weight) for x in xs])


# ---------------------------------------------------------------- item 2: several forwards
def test_two_forwards_are_distinct_examples():
    torch.manual_seed(0)
    model = Small()
    a, b = _ids(3, seed=1), _ids(2, seed=2)
    with embgrad.capture(model) as cap:
        loss = model(a).sum() + model(b).sum()          # gradient accumulation
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 5
    ref = _loop(model, [a[i:i + 1] for i in range(3)] + [b[i:i + 1] for i in range(2)], model.emb.weight)
    torch.testing.assert_close(pe.to_dense(), ref)


def test_two_forwards_same_size_not_merged_and_mean():
    torch.manual_seed(1)
    model = Small()
    a, b = _ids(2, seed=3), _ids(2, seed=4)
    with embgrad.capture(model) as cap:
        loss = (model(a).sum() + model(b).sum()) / 4     # the mean over all 4 examples
    pe = cap.gradients(loss, loss_reduction="mean").only().per_example()
    ref = _loop(model, [a[:1], a[1:], b[:1], b[1:]], model.emb.weight)
    torch.testing.assert_close(pe.to_dense(), ref)


def test_same_examples_by_name_for_towers_run_as_separate_forwards():
    torch.manual_seed(2)
    model = Small()
    a, b = _ids(3, seed=5), _ids(3, T=4, seed=6)
    with embgrad.capture(model, forwards="same_examples") as cap:
        loss = (model(a) * model(b)).sum()               # example i is the pair (a_i, b_i)
    pe = cap.gradients(loss).only().per_example()
    assert pe.batch_size == 3
    ref = torch.stack([dense_grad(model, lambda i=i: (model(a[i:i + 1]) * model(b[i:i + 1])).sum(),
                                  model.emb.weight) for i in range(3)])
    torch.testing.assert_close(pe.to_dense(), ref)
    with embgrad.capture(model, forwards="same_examples") as cap:
        loss = model(a).sum() + model(b[:2]).sum()
    with pytest.raises(EmbgradError, match="same_examples.*different batch sizes"):
        cap.gradients(loss).only().per_example()
    with pytest.raises(EmbgradError, match="forwards must be"):
        embgrad.capture(model, forwards="siamese")


def test_calls_outside_the_models_forward_warn_what_was_assumed():
    torch.manual_seed(3)
    model = Small()
    a, b = _ids(2, seed=7), _ids(2, seed=8)
    with embgrad.capture(model) as cap:                  # the layer called directly, twice
        loss = (model.emb(a).sum(1) * model.emb(b).sum(1)).sum()
    g = cap.gradients(loss).only()
    with pytest.warns(UserWarning, match="assumed that those calls look up the SAME examples"):
        pe = g.per_example()
    ref = torch.stack([dense_grad(model, lambda i=i: (model.emb(a[i:i + 1]).sum(1)
                                                      * model.emb(b[i:i + 1]).sum(1)).sum(),
                                  model.emb.weight) for i in range(2)])
    torch.testing.assert_close(pe.to_dense(), ref)


# ---------------------------------------------------------------- item 7: gradients twice
def test_gradients_twice_is_refused_clearly_and_retain_graph_allows_it():
    model = Small()
    x = _ids(2)
    with embgrad.capture(model) as cap:
        loss = model(x).sum()
    g1 = cap.gradients(loss, retain_graph=True)
    g2 = cap.gradients(loss)
    torch.testing.assert_close(g1.only().weight_grad.to_dense(), g2.only().weight_grad.to_dense())
    with pytest.raises(EmbgradError, match="already called.*retain_graph=True"):
        cap.gradients(loss)


# ---------------------------------------------------------------- item 8
def test_loss_from_a_forward_before_the_block_is_refused():
    model = Small()
    x = _ids(2)
    out = model(x)
    with embgrad.capture(model) as cap:
        model(x)
    with pytest.raises(EmbgradError, match="does not depend on any lookup recorded"):
        cap.gradients(out.sum())


@pytest.mark.parametrize("op", ["imul", "relu_", "dropout_inplace", "iadd"])
def test_in_place_ops_on_the_lookup_output_match_autograd(op):
    torch.manual_seed(4)
    emb = nn.Embedding(6, 2)
    x = torch.tensor([[1, 2], [2, 3]])

    def fwd():
        e = emb(x)
        if op == "imul":
            e *= 2.0
        elif op == "relu_":
            e.relu_()
        elif op == "iadd":
            e += torch.ones(2)
        else:
            e = nn.Dropout(p=0.5, inplace=True).eval()(e)
            e.mul_(3.0)
        return (e * torch.arange(1.0, 3.0)).pow(2).sum()

    with embgrad.capture(emb) as cap:
        loss = fwd()
    g = cap.gradients(loss).only()
    torch.testing.assert_close(g.weight_grad.to_dense(), dense_grad(emb, fwd, emb.weight))
    pe = g.per_example()
    torch.testing.assert_close(pe.sum().to_dense(), dense_grad(emb, fwd, emb.weight))


def test_non_reentrant_checkpoint_recomputation_is_not_a_second_lookup():
    torch.manual_seed(5)

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Small()

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)

    model = Ckpt()
    x = _ids(3, seed=9)
    with embgrad.capture(model) as cap:
        loss = model(x).sum()
    g = cap.gradients(loss).only()
    assert len(g.calls) == 1
    torch.testing.assert_close(g.per_example().to_dense(),
                               _loop(model, [x[i:i + 1] for i in range(3)], model.inner.emb.weight))
    with embgrad.capture(model) as cap:                   # the user's own backward recomputes too
        loss = model(x).sum()
    loss.backward()
    model.zero_grad()
    torch.testing.assert_close(cap.gradients().only().weight_grad.to_dense(),
                               dense_grad(model, lambda: model(x).sum(), model.inner.emb.weight))


@pytest.mark.parametrize("reentrant", [None, False])
def test_hugging_face_gradient_checkpointing(reentrant):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = transformers.GPT2Model(cfg)
    kwargs = {} if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(**kwargs)
    model.train()
    ids = torch.randint(0, 40, (2, 6))

    def loss_of(sl=slice(None)):
        return model(input_ids=ids[sl]).last_hidden_state.pow(2).sum()

    with embgrad.capture(model) as cap:
        loss = loss_of()
    g = cap.gradients(loss)
    for name, w in (("wte", model.wte.weight), ("wpe", model.wpe.weight)):
        ref = torch.stack([dense_grad(model, lambda i=i: loss_of(slice(i, i + 1)), w) for i in range(2)])
        torch.testing.assert_close(g[name].per_example().to_dense(), ref, atol=1e-5, rtol=1e-4)


def test_torch_compile_named_in_the_message():
    model = Small()
    compiled = torch.compile(model, backend="eager")
    x = _ids(2)
    compiled(x)                                           # compiled before the capture
    with embgrad.capture(compiled) as cap:
        loss = compiled(x).sum()
    with pytest.raises(EmbgradError, match=r"torch.compile.*_orig_mod"):
        cap.gradients(loss)


def test_zero_d_ids_refused_clearly():
    emb = nn.Embedding(5, 2)
    with pytest.raises(EmbgradError, match="0-d ids"):
        with embgrad.capture(emb):
            emb(torch.tensor(3))


# ---------------------------------------------------------------- item 9: attribution corners
class Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x)).mean(1))


@pytest.mark.parametrize("method", ["saliency", "grad_x_input", "integrated_gradients", "smoothgrad"])
def test_attribute_inside_no_grad_equals_outside(method):
    torch.manual_seed(7)
    model = Clf().eval()
    x = _ids(2, T=4)
    kw = {"steps": 8} if method in ("integrated_gradients", "smoothgrad") else {}
    if method == "smoothgrad":
        kw["seed"] = 0
    ref = embgrad.attribute(model, x, 1, method=method, **kw)
    with torch.no_grad():
        got = embgrad.attribute(model, x, 1, method=method, **kw)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-7)


def test_float_baseline_is_a_constant_vector():
    torch.manual_seed(8)
    model = Clf().eval()
    x = _ids(2, T=4)
    got = embgrad.attribute(model, x, 0, baseline=0.25, steps=16)
    e = model.emb(x).detach()
    ref = embgrad.attribute(model, x, 0, baseline=torch.full_like(e, 0.25), steps=16)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-6)
    with pytest.raises(EmbgradError, match="finite"):
        embgrad.attribute(model, x, 0, baseline=float("nan"))
    with pytest.raises(EmbgradError, match="baseline of type"):
        embgrad.attribute(model, x, 0, baseline=object())


def test_hotflip_empty_candidates():
    model = Clf().eval()
    with pytest.raises(EmbgradError, match="empty.*candidates=None"):
        embgrad.hotflip(model, _ids(1, T=3), 0, candidates=[])
