"""Helpers for the Gluon tests: small text models, a snapshot of everything capture must leave
alone, and reference gradients computed the plain MXNet way (dense ``weight.grad()``)."""
from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

LOSS = gluon.loss.SoftmaxCrossEntropyLoss()


class Classifier(gluon.HybridBlock):
    """embedding -> tanh -> mean over tokens -> dense: a small text classifier."""

    def __init__(self, V=30, D=6, C=3, sparse_grad=False, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.emb = nn.Embedding(V, D, sparse_grad=sparse_grad)
            self.head = nn.Dense(C, in_units=D)

    def hybrid_forward(self, F, x):
        return self.head(F.mean(F.tanh(self.emb(x)), axis=1))


class TwoTower(gluon.Block):
    """A plain (non-hybrid) Block: one shared word table looked up twice per forward, and a
    second table for positions."""

    def __init__(self, V=25, P=8, D=5, C=2, **kw):
        super().__init__(**kw)
        with self.name_scope():
            self.words = nn.Embedding(V, D)
            self.pos = nn.Embedding(P, D)
            self.head = nn.Dense(C, in_units=2 * D)

    def forward(self, a, b):
        pos = nd.arange(a.shape[1], dtype="int64").reshape((1, -1)).broadcast_to(a.shape)
        ha = (self.words(a) + self.pos(pos)).mean(axis=1)
        hb = self.words(b).max(axis=1)
        return self.head(nd.concat(ha, hb, dim=1))


def make(model, *inputs):
    """Initialize ``model`` and run it once (finishes deferred shapes)."""
    model.initialize(mx.init.Uniform(0.5))
    model(*inputs)
    return model


def ids(B, T, V, seed=0):
    rng = np.random.RandomState(seed)
    return nd.array(rng.randint(0, V, size=(B, T)), dtype="int64")


def labels(B, C, seed=1):
    return nd.array(np.random.RandomState(seed).randint(0, C, size=(B,)))


def snapshot(model: gluon.Block) -> dict:
    """Weights, accumulated grads, grad_req, hybridization flags, hooks, instance attributes."""
    state = {}
    for name, p in model.collect_params().items():
        grad = None if p.grad_req == "null" else p.grad().tostype("default").asnumpy().copy()
        state[("param", name)] = (p.data().asnumpy().copy(), p.grad_req, grad)
    seen = set()
    stack = [model]
    while stack:
        blk = stack.pop()
        if id(blk) in seen:
            continue
        seen.add(id(blk))
        state[("block", blk.name)] = (
            getattr(blk, "_active", None), blk._cached_op if hasattr(blk, "_cached_op") else None,
            dict(blk._forward_hooks), dict(blk._forward_pre_hooks), sorted(blk.__dict__.keys()))
        stack.extend(blk._children.values())
    return state


def assert_unchanged(model: gluon.Block, before: dict) -> None:
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key, b in before.items():
        a = after[key]
        if key[0] == "param":
            assert np.array_equal(a[0], b[0]), f"{key}: weights changed"
            assert a[1] == b[1], f"{key}: grad_req changed {b[1]} -> {a[1]}"
            assert (a[2] is None) == (b[2] is None) and (a[2] is None or np.array_equal(a[2], b[2])), \
                f"{key}: accumulated gradient changed"
        else:
            assert a[0] == b[0], f"{key}: hybridization flag changed"
            assert a[1] is b[1], f"{key}: cached graph replaced"
            assert a[2:] == b[2:], f"{key}: hooks or attributes changed"


def dense_grads(model, forward_loss, params) -> list[np.ndarray]:
    """Dense ``weight.grad()`` of ``params`` after one plain backward of ``forward_loss()``,
    with every grad_req restored afterwards (the reference, the MXNet way)."""
    all_params = list(model.collect_params().values())
    saved = [(p, p.grad_req) for p in all_params]
    try:
        for p in all_params:
            if p.grad_req != "null":
                p.grad_req = "write"
        with autograd.record():
            loss = forward_loss()
        loss.backward()
        return [p.grad().tostype("default").asnumpy().astype(np.float64) for p in params]
    finally:
        for p, req in saved:
            p.grad_req = req


def per_example_loop(model, forward_loss_b, param, B) -> np.ndarray:
    """(B, V, D) per-example gradients the usual Gluon way: grad_req='add', one backward per
    example, each example's gradient read off as the difference of the accumulated grad."""
    all_params = list(model.collect_params().values())
    saved = [(p, p.grad_req) for p in all_params]
    try:
        for p in all_params:
            p.grad_req = "add"
        for p in all_params:
            p.zero_grad()
        out, prev = [], np.zeros(param.shape)
        for b in range(B):
            with autograd.record():
                loss = forward_loss_b(b)
            loss.backward()
            acc = param.grad().asnumpy().astype(np.float64)
            out.append(acc - prev)
            prev = acc
        return np.stack(out)
    finally:
        for p, req in saved:
            p.grad_req = req
            p.zero_grad()
