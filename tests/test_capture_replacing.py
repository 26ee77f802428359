"""Capture.replacing: the public output-replacement hook (what integrated gradients needs).

References: PyTorch's own autograd on a plain function of the replaced vectors (the model
written out by hand, no hook), and the dense table gradient of that function."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError
from torch_helpers import assert_unchanged, snapshot

V, D, C = 30, 6, 3


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, C)

    def head_of(self, e):                      # the model after the lookup, written out
        return self.head(torch.tanh(e).mean(1))

    def forward(self, x):
        return self.head_of(self.emb(x))


def _ids(B=4, T=5, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_replacement_is_used_recorded_and_differentiated():
    model, x = Model(), _ids()
    before = snapshot(model)
    point = torch.randn(4, 5, D, generator=torch.Generator().manual_seed(1))
    seen = []

    def fn(call):
        seen.append((call.info.name, tuple(call.ids.shape), tuple(call.output.shape)))
        return point

    cap = embgrad.capture(model, layers="emb")
    with cap.replacing(fn), cap:
        out = model(x)
        loss = out[:, 1].sum()
    assert seen == [("emb", (4, 5), (4, 5, D))]
    # the model went on with the replacement: its output is the head at `point`
    torch.testing.assert_close(out, model.head_of(point), rtol=0, atol=0)
    call = cap.calls[0]
    assert call.output is not None and torch.equal(call.output, point)
    g = cap.gradients(loss)["emb"]
    # reference: autograd of the hand-written function at the replaced point
    p = point.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model.head_of(p)[:, 1].sum(), p)
    torch.testing.assert_close(g.output_grad, ref, rtol=1e-6, atol=1e-7)
    # the table's gradient at that point: the output gradients scattered onto the looked-up rows
    dense = torch.zeros(V, D).index_add_(0, x.reshape(-1), ref.reshape(-1, D))
    torch.testing.assert_close(g.weight_grad.to_dense(), dense, rtol=1e-5, atol=1e-6)
    assert_unchanged(model, before)


def test_replacement_that_depends_on_the_output_and_none_keeps_it():
    model, x = Model(), _ids()
    cap = embgrad.capture(model)
    with cap.replacing(lambda call: 0.5 * call.output), cap:
        loss = model(x)[:, 0].sum()
    g = cap.gradients(loss)["emb"]
    e = model.emb(x).detach().requires_grad_(True)
    (ref,) = torch.autograd.grad(model.head_of(e * 0.5)[:, 0].sum(), e, retain_graph=True)
    # d loss / d(replacement) = d loss / d(e/2) = 2 · d loss / d e
    torch.testing.assert_close(g.output_grad, 2 * ref, rtol=1e-5, atol=1e-7)
    with cap.replacing(lambda call: None), cap:
        out = model(x)
    torch.testing.assert_close(out, model.head_of(model.emb(x)), rtol=0, atol=0)


def test_replacement_ends_with_the_block_also_on_error():
    model, x = Model(), _ids()
    before = snapshot(model)
    cap = embgrad.capture(model)
    with pytest.raises(RuntimeError, match="boom"):
        with cap.replacing(lambda call: torch.zeros_like(call.output)), cap:
            raise RuntimeError("boom")
    with cap:                                  # no replacement any more
        out = model(x)
    torch.testing.assert_close(out, model.head_of(model.emb(x)), rtol=0, atol=0)
    assert_unchanged(model, before)


def test_bad_replacements_are_named():
    model, x = Model(), _ids()
    cap = embgrad.capture(model)
    with pytest.raises(EmbgradError, match=r"layer 'emb'.*shape \(4, 5, 7\).*\(4, 5, 6\)"):
        with cap.replacing(lambda call: torch.zeros(4, 5, 7)), cap:
            model(x)
    with pytest.raises(EmbgradError, match="callable"):
        cap.replacing(3)                       # type: ignore[arg-type]
    with pytest.raises(EmbgradError, match="do not nest"):
        with cap.replacing(lambda call: None):
            with cap.replacing(lambda call: None):
                pass
    with cap:                                  # both blocks left: nothing replaced
        model(x)
