"""embgrad.jacobian: gradients of several outputs w.r.t. the embedding outputs, (K, B, T, D),
against torch.func and per-output autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError
from test_attribution import IDS, MASK, Toy, inputs
from torch_helpers import assert_unchanged, snapshot


@pytest.fixture(scope="module")
def toy():
    return Toy(seed=3).eval()


def test_jacobian_matches_torch_func(toy):
    e = toy.emb(IDS).detach()
    ref = torch.func.jacrev(lambda x: toy.head(x, MASK.float()))(e)       # (B, C, B, T, D)
    ref = torch.einsum("bcbtd->cbtd", ref)                                  # examples are independent
    before = snapshot(toy)
    jac = embgrad.jacobian(toy, inputs())
    assert tuple(jac.shape) == (3, 3, 6, 6) and not jac.requires_grad
    torch.testing.assert_close(jac, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embgrad.jacobian(toy, inputs(), batch_size=1), jac)
    torch.testing.assert_close(embgrad.jacobian(toy, inputs(), outputs=[2, 0]), jac[[2, 0]])
    assert_unchanged(toy, before)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.emb = nn.Embedding(40, 5)
        self.a = nn.Linear(5, 2)
        self.b = nn.Linear(5, 1)

    def forward(self, ids):
        h = torch.tanh(self.emb(ids)).mean(1)
        return {"sentiment": self.a(h), "score": self.b(h ** 2)[:, 0]}


def test_jacobian_of_several_heads():
    model = TwoHeads()
    ids = IDS.clamp(max=39)
    heads = [lambda o: o["sentiment"][:, 1], lambda o: o["score"]]
    jac = embgrad.jacobian(model, ids, outputs=heads)
    e = model.emb(ids).detach().requires_grad_(True)
    for k, fn in enumerate(heads):
        h = torch.tanh(e).mean(1)
        out = {"sentiment": model.a(h), "score": model.b(h ** 2)[:, 0]}
        (g,) = torch.autograd.grad(fn(out).sum(), e)
        torch.testing.assert_close(jac[k], g)
    with pytest.raises(EmbgradError, match="not \\(batch, classes\\)"):
        embgrad.jacobian(model, ids)                    # a dict output needs callables


def test_jacobian_bad_outputs(toy):
    with pytest.raises(EmbgradError, match="out of range"):
        embgrad.jacobian(toy, inputs(), outputs=[0, 7])
    with pytest.raises(EmbgradError, match="one scalar per example"):
        embgrad.jacobian(toy, inputs(), outputs=[lambda o: o[:, :2]])
