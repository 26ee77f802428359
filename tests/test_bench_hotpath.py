"""Hot paths the benchmarks (benchmarks/) exercised: capture must not keep a batch's tensors
alive after the user drops the results; ExampleGrads.dot's dense/sparse split must be exact.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import embgrad  # noqa: E402


def _classifier(vocab: int = 50, dim: int = 8):
    from embgrad.demo.models import torch_classifier

    return torch_classifier(vocab, dim=dim, num_classes=3, seed=0)


def _step(model, x, y, *, backward: bool):
    with embgrad.capture(model) as cap:
        loss = F.cross_entropy(model(x), y, reduction="sum")
    if backward:
        loss.backward()
        grads = cap.gradients()
    else:
        grads = cap.gradients(loss)
    pe = grads.only().per_example()
    out = (pe.norms(), pe.clip(0.1).sum())
    refs = [weakref.ref(c.output) for c in cap.calls] + [weakref.ref(grads.only().output_grad)]
    return out, refs


@pytest.mark.parametrize("backward", [False, True], ids=["gradients(loss)", "loss.backward()"])
def test_capture_frees_outputs_and_graph(backward: bool) -> None:
    """A captured forward's outputs and graph die with the capture (they leaked through an
    output -> hook -> Call -> output cycle that Python's GC cannot see)."""
    model = _classifier()
    x = torch.randint(1, 50, (4, 6))
    y = torch.tensor([0, 1, 2, 0])
    out, refs = _step(model, x, y, backward=backward)
    gc.collect()
    alive = [r() is not None for r in refs]
    assert not any(alive), f"tensors still alive after the capture was dropped: {alive}"
    # the results themselves are intact and right: norms agree with a per-example loop
    norms = out[0]
    for b in range(4):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[b:b + 1]), y[b:b + 1], reduction="sum").backward()
        assert float(norms[b]) == pytest.approx(float(model.embedding.weight.grad.norm()), rel=1e-5)
    model.zero_grad(set_to_none=True)


def test_repeated_captures_do_not_grow_memory() -> None:
    """Many capture steps keep no per-step tensors: the set of live tensors stays flat."""
    model = _classifier(200, 16)
    x = torch.randint(1, 200, (16, 32))
    y = torch.randint(0, 3, (16,))

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    _step(model, x, y, backward=False)
    before = live_tensors()
    for _ in range(20):
        _step(model, x, y, backward=False)
    assert live_tensors() <= before + 2


# ---------------------------------------------------------------------------- ExampleGrads.dot
def _zipf_lookups(rng, batch: int, length: int, vocab: int):
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    cdf = np.cumsum(1.0 / ranks)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random((batch, length))), vocab - 1).astype(np.int64)


def _example_grads(framework: str, ids: np.ndarray, grads: np.ndarray, vocab: int):
    if framework == "torch":
        return embgrad.rows_from_lookups(torch.from_numpy(ids), torch.from_numpy(grads), vocab,
                                         per_example=True)
    tf = pytest.importorskip("tensorflow")
    return embgrad.rows_from_lookups(tf.constant(ids), tf.constant(grads), vocab, per_example=True)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_dot_mixes_dense_and_sparse_rows_exactly(framework: str) -> None:
    """dot() sends the rows most pairs share through a matrix product and the rest through the
    sparse join; together they equal the dense (B1, V·D) @ (V·D, B2) product."""
    from embgrad.sparse import _DENSE_ROW_SHARE, _heavy_rows

    rng = np.random.default_rng(3)
    V, D = 400, 5
    ids_a, ids_b = _zipf_lookups(rng, 64, 12, V), _zipf_lookups(rng, 48, 9, V)
    ga = rng.standard_normal(ids_a.shape + (D,)).astype(np.float32)
    gb = rng.standard_normal(ids_b.shape + (D,)).astype(np.float32)
    a = _example_grads(framework, ids_a, ga, V)
    o = _example_grads(framework, ids_b, gb, V)
    heavy = _heavy_rows(a.rows.numpy(), o.rows.numpy(), 64 * 48)
    shared = np.intersect1d(ids_a, ids_b)
    assert 0 < len(heavy) < len(shared), (len(heavy), len(shared), _DENSE_ROW_SHARE)   # both paths run

    def dense(ids, g, B):
        out = np.zeros((B, V, D), np.float64)
        np.add.at(out, (np.repeat(np.arange(B), ids.shape[1]), ids.reshape(-1)), g.reshape(-1, D))
        return out.reshape(B, -1)

    da, db = dense(ids_a, ga, 64), dense(ids_b, gb, 48)
    np.testing.assert_allclose(np.asarray(a.dot(o)), da @ db.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(a.dot()), da @ da.T, rtol=1e-4, atol=1e-4)


def test_dot_disjoint_rows_is_zero_and_all_heavy_is_exact() -> None:
    """No shared row: zeros. One example each (every shared row heavy): the plain inner product."""
    V, D = 50, 3
    g = torch.ones(2, 3, D)
    a = embgrad.rows_from_lookups(torch.tensor([[1, 2, 3], [4, 5, 6]]), g, V, per_example=True)
    o = embgrad.rows_from_lookups(torch.tensor([[7, 8, 9], [10, 11, 12]]), g, V, per_example=True)
    assert torch.equal(a.dot(o), torch.zeros(2, 2))
    x = embgrad.rows_from_lookups(torch.tensor([[1, 1, 2]]), torch.arange(9.).reshape(1, 3, D), V,
                                  per_example=True)
    # row 1 holds [0,1,2] + [3,4,5] = [3,5,7], row 2 holds [6,7,8]
    assert float(x.dot()[0, 0]) == pytest.approx(9 + 25 + 49 + 36 + 49 + 64)


def test_torch_backend_unique_matches_torch_unique() -> None:
    """The torch backend's unique (NumPy's SIMD sort on CPU) is torch.unique(sorted, inverse)."""
    from embgrad.backends import get_backend

    b = get_backend(torch.zeros(1))
    g = torch.Generator().manual_seed(0)
    cases = [torch.randint(0, 50, (1000,), generator=g), torch.randint(-5, 3_000_000, (777,), generator=g),
             torch.randint(0, 9, (40, 30), generator=g).t()[3],            # non-contiguous view
             torch.tensor([7]), torch.tensor([], dtype=torch.int64)]
    for x in cases:
        u, inv = b.ops.unique(x)
        ru, rinv = torch.unique(x, sorted=True, return_inverse=True)
        assert torch.equal(u, ru) and torch.equal(inv, rinv) and inv.dtype == torch.int64
        assert torch.equal(u[inv], x)


def test_torch_backend_boolean_mask_matches_indexing() -> None:
    """boolean_mask over rows (index_select of the mask's nonzeros) equals x[mask], keeps
    gradients flowing, and other mask shapes still index elementwise."""
    from embgrad.backends import get_backend

    b = get_backend(torch.zeros(1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 7, generator=g, requires_grad=True)
    mask = torch.rand(50, generator=g) > 0.4
    out = b.ops.boolean_mask(x, mask)
    assert torch.equal(out, x[mask])
    out.sum().backward()
    assert torch.equal(x.grad, mask[:, None].expand(50, 7).float())
    ids = torch.arange(50)
    assert torch.equal(b.ops.boolean_mask(ids, mask), ids[mask])
    assert torch.equal(b.ops.boolean_mask(ids, torch.zeros(50, dtype=torch.bool)), ids[:0])
    full = torch.rand(50, 7, generator=g) > 0.5
    assert torch.equal(b.ops.boolean_mask(x.detach(), full), x.detach()[full])
