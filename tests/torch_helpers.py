"""Helpers for PyTorch tests: snapshot a model's whole state and check nothing changed."""
from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict:
    """Everything capture must leave untouched: weights, .grad, requires_grad, modes, hooks."""
    state = {}
    for name, p in model.named_parameters():
        state[("param", name)] = (p.detach().clone(), p.requires_grad,
                                  None if p.grad is None else p.grad.clone(), p._backward_hooks)
    for name, m in model.named_modules():
        state[("module", name)] = (
            m.training,
            dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
            dict(getattr(m, "_forward_hooks_with_kwargs", {})),
            dict(getattr(m, "_forward_pre_hooks_with_kwargs", {})),
            sorted(m.__dict__.keys()),
        )
    return state


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key, b in before.items():
        a = after[key]
        if key[0] == "param":
            assert torch.equal(a[0], b[0]), f"weights of {key[1]} changed"
            assert a[1] == b[1], f"requires_grad of {key[1]} changed"
            assert (a[2] is None) == (b[2] is None), f".grad of {key[1]} appeared/disappeared"
            if a[2] is not None:
                assert torch.equal(a[2], b[2]), f".grad of {key[1]} changed"
            assert a[3] == b[3]
        else:
            assert a == b, f"module {key[1]!r} state/hooks changed"


def dense_grad(model: nn.Module, loss_fn, weight: torch.Tensor) -> torch.Tensor:
    """weight.grad from a plain loss.backward(), restoring .grad afterwards."""
    saved = {p: p.grad for p in model.parameters()}
    for p in model.parameters():
        p.grad = None
    req = weight.requires_grad
    weight.requires_grad_(True)
    try:
        loss_fn().backward()
        g = weight.grad
        g = g.to_dense() if g.is_sparse else g
        return g.clone()
    finally:
        weight.requires_grad_(req)
        for p in model.parameters():
            p.grad = saved.get(p)
