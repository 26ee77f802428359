"""Issue 12, item 4 (PyTorch): rows frozen after training has started stay bit-identical over 5
more steps of Adam, AdamW, SGD with momentum and RMSprop, with and without optimizer=."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import embgrad

OPTIMIZERS = {
    "Adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.1),                 # default weight decay 0.01
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.05, momentum=0.5),
}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.emb(x).mean(1)).squeeze(-1)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("pass_optimizer", [False, True])
def test_rows_frozen_mid_training_stay_bit_identical(name, pass_optimizer):
    torch.manual_seed(0)
    model = Model()
    opt = OPTIMIZERS[name](model.parameters())
    x = torch.tensor([[1, 2, 3], [2, 3, 4], [3, 5, 6]])
    y = torch.tensor([1.0, -1.0, 0.5])

    def step():
        opt.zero_grad()
        ((model(x) - y) ** 2).sum().backward()
        opt.step()

    step()
    step()                                              # training has started: optimizer state
    table = embgrad.table(model.emb)
    guard = table.freeze([2, 3], optimizer=opt if pass_optimizer else None)
    before = model.emb.weight.detach().clone()
    for _ in range(5):
        step()
    after = model.emb.weight.detach()
    assert torch.equal(after[[2, 3]], before[[2, 3]])   # bit-identical
    assert not torch.equal(after[[1, 4]], before[[1, 4]])  # the rest trains
    guard.remove()
    step()
    assert not torch.equal(model.emb.weight.detach()[[2, 3]], before[[2, 3]])  # unfrozen: moves again


def test_other_optimizers_leave_alone_and_hooks_removed():
    torch.manual_seed(1)
    model, other = Model(), Model()
    opt_other = torch.optim.Adam(other.parameters(), lr=0.1)
    guard = embgrad.table(model.emb).freeze([0])
    x = torch.tensor([[0, 1]])
    opt_other.zero_grad()
    other(x).sum().backward()
    w0 = other.emb.weight.detach().clone()
    opt_other.step()                                    # an optimizer not holding the table
    assert not torch.equal(other.emb.weight.detach()[0], w0[0])
    from torch.optim import optimizer as optim_mod
    n_pre = len(optim_mod._global_optimizer_pre_hooks)
    guard.remove()
    assert len(optim_mod._global_optimizer_pre_hooks) == n_pre - 1


def test_global_guard_hooks_do_not_keep_the_table_alive():
    import gc
    import weakref

    from torch.optim import optimizer as optim_mod
    n_pre = len(optim_mod._global_optimizer_pre_hooks)
    emb = nn.Embedding(6, 2)
    embgrad.table(emb).freeze([1])
    ref = weakref.ref(emb.weight)
    del emb
    gc.collect()
    assert ref() is None
    assert len(optim_mod._global_optimizer_pre_hooks) == n_pre
