"""Sparse regularisation and clipping of RowGrad (PyTorch): embgrad.regularize against the
dense penalty in the loss, clip_by_norm against torch.nn.utils.clip_grad_norm_, clip_rows
against a per-row loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import embgrad
from embgrad import EmbgradError


class Model(nn.Module):
    def __init__(self, V=60, D=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.out = nn.Linear(D, 3)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


def _data(B=6, T=5, V=30):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)


@pytest.mark.parametrize("l1, l2", [(0.01, 0.0), (0.0, 0.05), (0.02, 0.03)])
def test_lazy_penalty_equals_dense_penalty_on_touched_rows_only(l1, l2):
    m = Model()
    with torch.no_grad():
        m.emb.weight[[3, 5], :4] = 0.0                # exact zeros: the L1 subgradient there is 0
    x, y = _data()                                     # ids < 30: rows 30..59 are never looked up
    W = m.emb.weight
    with embgrad.capture(m) as cap:
        loss = nn.functional.cross_entropy(m(x), y, reduction="sum")
    g = cap.gradients(loss).only().weight_grad
    lazy = embgrad.regularize(g, embgrad.table(m), l1=l1, l2=l2)

    # the reference: the penalty written into the loss, differentiated densely by autograd
    m.zero_grad()
    dense_loss = nn.functional.cross_entropy(m(x), y, reduction="sum") \
        + l1 * W.abs().sum() + l2 * (W ** 2).sum()
    dense_loss.backward()
    dense = W.grad
    rows = lazy.rows
    assert torch.equal(rows, g.rows) and len(lazy) == len(g) < 30
    torch.testing.assert_close(lazy.values, dense[rows], rtol=1e-6, atol=1e-7)
    # the difference: the dense penalty gives every row a gradient, the lazy one only touched rows
    untouched = torch.tensor(sorted(set(range(60)) - set(rows.tolist())))
    assert (dense[untouched] != 0).any(1).all()
    assert torch.all(lazy.to_dense()[untouched] == 0)
    # and it is what a sparse optimizer step would apply: touched rows only
    assert lazy.num_rows == 60 and lazy.values.dtype == torch.float32


def test_l2_matches_torch_weight_decay_at_half_the_coefficient():
    m = Model()
    x, y = _data()
    with embgrad.capture(m) as cap:
        loss = nn.functional.cross_entropy(m(x), y)
    g = cap.gradients(loss).only().weight_grad
    wd = 0.1
    lazy = embgrad.regularize(g, m, l2=wd / 2)                  # table given as the model
    W = m.emb.weight.detach()
    torch.testing.assert_close(lazy.values, g.values + wd * W[g.rows])


def test_regularize_checks_its_input():
    m = Model()
    t = embgrad.table(m)
    x, y = _data()
    with embgrad.capture(m) as cap:
        loss = nn.functional.cross_entropy(m(x), y)
    g = cap.gradients(loss).only().weight_grad
    assert embgrad.regularize(g, t) is g                        # nothing to add
    with pytest.raises(EmbgradError, match="takes a RowGrad .*got Parameter"):
        embgrad.regularize(m.emb.weight, t, l2=0.1)
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(EmbgradError, match="l1 must be a finite number >= 0"):
            embgrad.regularize(g, t, l1=bad)
    other = embgrad.table(nn.Embedding(60, 4))
    with pytest.raises(EmbgradError, match=r"gradient is of a \(60, 8\) table but table 'Embedding' is \(60, 4\)"):
        embgrad.regularize(g, other, l2=0.1)


# ---------------------------------------------------------------------------- clipping
def _rowgrad(seed=0, R=12, D=5, V=40, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(V, generator=g)[:R].sort().values
    vals = (torch.randn(R, D, generator=g) * scale).to(dtype)
    vals[0] = 0.0                                               # a zero row must not give NaN
    return embgrad.RowGrad(rows, vals, V)


@pytest.mark.parametrize("seed", range(5))
def test_clip_by_norm_matches_torch_clip_grad_norm(seed):
    rg = _rowgrad(seed)
    dense = rg.to_dense().clone()
    p = nn.Parameter(torch.zeros_like(dense))
    p.grad = dense.clone()
    torch.nn.utils.clip_grad_norm_([p], max_norm=2.0)
    clipped = rg.clip_by_norm(2.0)
    torch.testing.assert_close(clipped.to_dense(), p.grad, rtol=1e-5, atol=1e-7)
    assert math.isclose(clipped.norm(), 2.0, rel_tol=1e-6)      # at most max_norm, up to rounding
    assert torch.equal(clipped.rows, rg.rows)                   # still sparse, same rows
    assert rg.clip_by_norm(1e6) is rg                           # under the bound: unchanged


def test_clip_rows_bounds_each_row_and_keeps_directions():
    rg = _rowgrad(scale=2.0, dtype=torch.float64)
    c = rg.clip_rows(1.5)
    rows_np, vals_np = rg.numpy()
    _, cvals = c.numpy()
    for r in range(len(rows_np)):                                # the reference: one row at a time
        n = np.linalg.norm(vals_np[r])
        want = vals_np[r] * min(1.0, 1.5 / n) if n > 0 else vals_np[r]
        np.testing.assert_allclose(cvals[r], want, rtol=1e-12)
    assert float(c.row_norms().max()) <= 1.5 * (1 + 1e-12)
    assert c.values.dtype == torch.float64 and torch.equal(c.rows, rg.rows)
    assert torch.all(c.values[0] == 0) and torch.isfinite(c.values).all()
    zero = embgrad.RowGrad(torch.tensor([1, 2]), torch.zeros(2, 3), 4)
    assert torch.all(zero.clip_rows(1.0).values == 0) and zero.clip_by_norm(1.0).norm() == 0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1"])
def test_clip_bounds_must_be_positive_finite(bad):
    rg = _rowgrad()
    with pytest.raises(EmbgradError, match="max_norm must be a positive finite number"):
        rg.clip_by_norm(bad)
    with pytest.raises(EmbgradError, match="max_row_norm must be a positive finite number"):
        rg.clip_rows(bad)
