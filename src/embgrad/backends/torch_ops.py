"""PyTorch tensor primitives (:class:`~embgrad.backends.base.TensorOps` over ``torch.Tensor``)."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EmbgradError
from .base import TensorOps

__all__ = ["TorchOps"]


def _sorted_runs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sorted unique values of a CPU int64 (N,) tensor, the inverse index (N,) int64 and the
    count U, by one NumPy stable sort (timsort: the keys of capture are sorted by example
    already, in runs) and the run boundaries. ~5x faster than ``np.unique(return_inverse=True)``
    (0.08 vs 0.4 ms for 6,251 (example, row) keys) and ~15x than ``torch.unique`` on CPU."""
    a = x.numpy()
    n = a.shape[0]
    order = np.argsort(a, kind="stable")
    s = a[order]
    new = np.empty(n, bool)
    new[:1] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    run = np.cumsum(new)
    run -= 1
    inv = np.empty(n, np.int64)
    inv[order] = run
    u = s[new]
    return torch.from_numpy(u), torch.from_numpy(inv), u.shape[0]


class TorchOps(TensorOps):
    name = "torch"

    def to_numpy(self, x):
        if isinstance(x, np.ndarray):
            return x
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()

    def from_numpy(self, a, like=None):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(like.device) if isinstance(like, torch.Tensor) else t

    def dtype_name(self, x):
        return str(x.dtype).replace("torch.", "")

    def cast(self, x, dtype):
        return x.to(getattr(torch, dtype))

    def reshape(self, x, shape):
        return x.reshape(tuple(shape))

    def moveaxis(self, x, source, destination):
        return torch.movedim(x, source, destination)

    def broadcast_to(self, x, shape):
        return x.expand(tuple(shape))

    def max_abs(self, x):
        return float(x.detach().abs().max()) if x.numel() else 0.0

    def arange(self, n, like):
        return torch.arange(n, device=like.device, dtype=torch.int64)

    def zeros(self, shape, dtype, like):
        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype), device=like.device)

    def concat(self, xs, axis=0):
        return torch.cat(list(xs), dim=axis)

    def unique(self, x):
        if x.device.type == "cpu" and not x.requires_grad:
            u, inv, _ = _sorted_runs(x)
            return u, inv
        u, inv = torch.unique(x, sorted=True, return_inverse=True)
        return u, inv

    def segment_sum(self, data, segment_ids, num_segments):
        out = torch.zeros((num_segments, *data.shape[1:]), dtype=data.dtype, device=data.device)
        return out.index_add_(0, segment_ids, data)

    def row_sq_norms(self, x):
        # a reduction over the rows: no (N, D) temporary of x * x
        return torch.linalg.vector_norm(x, dim=1).square_()

    def gather(self, x, idx):
        return x.index_select(0, idx)

    def boolean_mask(self, x, mask):
        if mask.dim() == 1 and x.dim() >= 1 and mask.shape[0] == x.shape[0]:
            # rows of x: index_select is ~4x faster than boolean indexing of (N, D) on CPU
            return x.index_select(0, mask.nonzero().view(-1))
        return x[mask]

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def sqrt(self, x):
        return torch.sqrt(x)

    def sum(self, x, axis=None):
        return x.sum() if axis is None else x.sum(axis)

    def minimum(self, x, y):
        return torch.clamp(x, max=y) if not isinstance(y, torch.Tensor) else torch.minimum(x, y)

    def maximum(self, x, y):
        return torch.clamp(x, min=y) if not isinstance(y, torch.Tensor) else torch.maximum(x, y)

    def argsort(self, x):
        return torch.argsort(x, stable=True)

    def searchsorted(self, sorted_seq, values, right=False):
        return torch.searchsorted(sorted_seq, values, right=right)

    def repeat(self, x, counts):
        return torch.repeat_interleave(x, counts)

    def cumsum(self, x):
        return torch.cumsum(x, 0)

    def scatter_rows(self, rows, values, num_rows):
        out = torch.zeros((num_rows, *values.shape[1:]), dtype=values.dtype, device=values.device)
        out[rows] = values
        return out

    def count_nonfinite(self, x):
        # one float32 reduction in the common all-finite case; count only when something is off
        if x.numel() == 0 or bool(torch.isfinite(x.sum(dtype=torch.float32))):
            return 0
        return int((~torch.isfinite(x)).sum())

    def minmax(self, x):
        lo, hi = torch.aminmax(x)
        return int(lo), int(hi)

    def row_grad_parts(self, g):
        if not isinstance(g, torch.Tensor):
            raise EmbgradError(f"row_grad() expected a torch tensor, got {type(g).__name__}.")
        if g.layout == torch.sparse_coo:
            if g.dim() != 2:
                raise EmbgradError(f"row_grad(): a sparse table gradient must be (V, D), got shape "
                                   f"{tuple(g.shape)}.")
            if g.sparse_dim() == 2:  # fully sparse (V, D): gather each row's entries into a dense row
                idx, val = g._indices(), g._values()
                rows, inv = torch.unique(idx[0], return_inverse=True)
                vals = torch.zeros(rows.numel(), g.shape[1], dtype=val.dtype, device=val.device)
                return rows, vals.index_put_((inv, idx[1]), val, accumulate=True), int(g.shape[0])
            return g._indices()[0], g._values(), int(g.shape[0])
        if g.layout != torch.strided:
            raise EmbgradError(f"row_grad(): unsupported layout {g.layout}; use sparse COO or dense.")
        if g.dim() != 2:
            raise EmbgradError(f"row_grad(): a dense table gradient must be (V, D), got {tuple(g.shape)}.")
        rows = (g != 0).any(1).nonzero().reshape(-1)
        return rows, g.detach()[rows], int(g.shape[0])

    def no_grad(self):
        return torch.no_grad()

    def log_probs_at(self, logits, positions, tokens):
        n, k = int(positions.shape[0]), int(positions.shape[1])
        pos = positions.to(logits.device).reshape(n, k, 1).expand(n, k, int(logits.shape[-1]))
        rows = logits.gather(1, pos)
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()
        lp = torch.log_softmax(rows, dim=-1)
        return lp.gather(2, tokens.to(logits.device).reshape(n, k, 1)).reshape(n, k)

    def pick(self, x, idx):
        return x.gather(1, idx.reshape(-1, 1).to(x.device)).reshape(-1)

    def matmul_t(self, a, b):
        return a @ b.T

    def matmul(self, a, b, transpose_a=False, transpose_b=False):
        return torch.matmul(a.transpose(-1, -2) if transpose_a else a,
                            b.transpose(-1, -2) if transpose_b else b)

    def take_along_last(self, x, idx):
        return torch.gather(x, 2, idx[:, None, :].expand(x.shape[0], x.shape[1], idx.shape[1]))

    def gather_last(self, x, idx):
        return x.index_select(-1, idx)

    def topk(self, x, k):
        v, i = torch.topk(x, k, dim=-1)
        return v, i
