"""The Gluon backend's tensor primitives against NumPy, including int64 values past float
precision, ties (stable argsort), zero counts and empty selections."""
from __future__ import annotations

import pytest

mx = pytest.importorskip("mxnet", reason="mxnet is not installed here: the Gluon tests run in "
                         ".venv-gluon (`make test-gluon`)")

import numpy as np  # noqa: E402
from mxnet import gluon, nd  # noqa: E402

from embgrad import EmbgradError  # noqa: E402
from embgrad.backends import get_backend  # noqa: E402

BIG = 2 ** 53 + 7


@pytest.fixture
def b():
    be = get_backend(nd.zeros((1,)))
    assert be.name == "gluon"
    return be


def _t(b, a):
    return b.ops.from_numpy(np.asarray(a))


def test_detection(b):
    assert b.is_appropriate(nd.zeros((1,))) and b.is_appropriate(mx.np.zeros((1,)))
    assert b.is_appropriate(gluon.nn.Dense(2)) and not b.is_appropriate(np.zeros(1))
    assert get_backend(gluon.nn.Embedding(3, 2)) is b


def test_integer_primitives_exact_past_float_precision(b):
    x = np.array([BIG + 5, 3, BIG + 5, BIG + 1, 3, 0], dtype=np.int64)
    u, inv = b.ops.unique(_t(b, x))
    nu, ninv = np.unique(x, return_inverse=True)
    np.testing.assert_array_equal(b.ops.to_numpy(u), nu)
    np.testing.assert_array_equal(b.ops.to_numpy(inv), ninv)
    np.testing.assert_array_equal(b.ops.to_numpy(b.ops.floordiv(_t(b, x), 1000003)), x // 1000003)
    assert b.ops.minmax(_t(b, x)) == (0, BIG + 5)
    np.testing.assert_array_equal(b.ops.to_numpy(b.ops.argsort(_t(b, x))), np.argsort(x, kind="stable"))
    s = np.sort(x)
    for right in (False, True):
        np.testing.assert_array_equal(
            b.ops.to_numpy(b.ops.searchsorted(_t(b, s), _t(b, x), right=right)),
            np.searchsorted(s, x, side="right" if right else "left"))
    np.testing.assert_array_equal(b.ops.to_numpy(b.ops.cumsum(_t(b, x))), np.cumsum(x))


def test_argsort_is_stable_on_many_ties(b):
    x = np.random.RandomState(0).randint(0, 4, size=5000).astype(np.int64)
    np.testing.assert_array_equal(b.ops.to_numpy(b.ops.argsort(_t(b, x))), np.argsort(x, kind="stable"))


def test_segment_sum_gather_repeat_mask(b):
    rng = np.random.RandomState(1)
    data = rng.randn(7, 3)                                         # float64 stays float64
    seg = np.array([4, 0, 4, 2, 0, 0, 4], dtype=np.int64)
    out = b.ops.segment_sum(_t(b, data), _t(b, seg), 6)
    ref = np.zeros((6, 3))
    np.add.at(ref, seg, data)
    assert b.ops.dtype_name(out) == "float64"
    np.testing.assert_allclose(b.ops.to_numpy(out), ref, rtol=1e-12)
    np.testing.assert_allclose(b.ops.to_numpy(b.ops.segment_sum(_t(b, data[:, 0]), _t(b, seg), 5)),
                               np.bincount(seg, data[:, 0], minlength=5), rtol=1e-12)
    idx = np.array([6, 0, 0, 3], dtype=np.int64)
    np.testing.assert_array_equal(b.ops.to_numpy(b.ops.gather(_t(b, data), _t(b, idx))), data[idx])
    legacy = b.ops.gather(nd.array(data), _t(b, idx))                  # user inputs keep their type
    assert type(legacy) is nd.NDArray
    counts = np.array([2, 0, 3, 1], dtype=np.int64)
    vals = np.array([10, 20, 30, 40], dtype=np.int64)
    np.testing.assert_array_equal(b.ops.to_numpy(b.ops.repeat(_t(b, vals), _t(b, counts))), np.repeat(vals, counts))
    assert b.ops.shape(b.ops.repeat(_t(b, vals), _t(b, np.zeros(4, np.int64)))) == (0,)
    mask = data[:, 0] > 0
    np.testing.assert_array_equal(b.ops.to_numpy(b.ops.boolean_mask(_t(b, data), _t(b, mask))), data[mask])
    assert b.ops.shape(b.ops.boolean_mask(_t(b, data), _t(b, np.zeros(7, bool)))) == (0, 3)
    np.testing.assert_array_equal(b.ops.to_numpy(b.ops.scatter_rows(_t(b, np.array([1, 4])), _t(b, data[:2]), 5)),
                                  np.stack([np.zeros(3), data[0], np.zeros(3), np.zeros(3), data[1]]))


def test_float_primitives(b):
    x = np.array([[1.0, -4.0], [np.nan, np.inf]], dtype=np.float32)
    assert b.ops.count_nonfinite(_t(b, x)) == 2
    y = np.array([[3.0, 4.0], [0.0, 1.0]], dtype=np.float32)
    assert float(b.ops.to_numpy(b.ops.sum(_t(b, y)))[0]) == 8.0
    np.testing.assert_allclose(b.ops.to_numpy(b.ops.sqrt(b.ops.sum(_t(b, y * y), 1))), [5.0, 1.0])
    np.testing.assert_allclose(b.ops.to_numpy(b.ops.minimum(_t(b, y), 2.0)), np.minimum(y, 2.0))
    np.testing.assert_allclose(b.ops.to_numpy(b.ops.maximum(_t(b, y), _t(b, y.T))), np.maximum(y, y.T))
    np.testing.assert_allclose(b.ops.to_numpy(b.ops.where(_t(b, y > 2), _t(b, y), _t(b, -y))), np.where(y > 2, y, -y))
    assert b.ops.dtype_name(b.ops.cast(_t(b, y), "float64")) == "float64"
    assert b.ops.shape(b.ops.reshape(_t(b, y), (4, 1))) == (4, 1)
    assert b.ops.shape(b.ops.zeros((0, 3), "float32", _t(b, y))) == (0, 3)
    np.testing.assert_allclose(b.ops.to_numpy(b.ops.matmul_t(_t(b, y), _t(b, y))), y @ y.T)
    v, i = b.ops.topk(_t(b, y), 1)
    np.testing.assert_array_equal(b.ops.to_numpy(i)[:, 0], [1, 1])
    np.testing.assert_allclose(b.ops.to_numpy(b.ops.pick(_t(b, y), _t(b, np.array([1, 0])))), [4.0, 0.0])


def test_row_grad_parts_refuses_csr(b):
    csr = nd.sparse.csr_matrix(np.eye(3, dtype=np.float32))
    with pytest.raises(EmbgradError, match="storage type 'csr'"):
        b.ops.row_grad_parts(csr)
    with pytest.raises(EmbgradError, match="MXNet NDArray"):
        b.ops.row_grad_parts(np.zeros((3, 2)))


def test_gluon_backend_implements_the_required_methods(b):
    """Both interfaces' required methods (issue 13), as tests/test_backend_interface.py checks
    the other backends."""
    from embgrad.backends.base import ModelAdapter, TensorOps
    assert not [m for m in ModelAdapter.REQUIRED if getattr(type(b), m) is getattr(ModelAdapter, m)]
    assert type(b.ops).__name__ == "GluonOps"
    assert not [m for m in TensorOps.REQUIRED if getattr(type(b.ops), m) is getattr(TensorOps, m)]
