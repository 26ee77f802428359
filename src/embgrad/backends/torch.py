"""PyTorch backend: finds nn.Embedding / nn.EmbeddingBag layers, taps them with forward hooks
(removed afterwards), and implements the tensor primitives with torch ops.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .._weak import WeakIdSet
from ..errors import EmbgradError
from .base import Backend, Call, EmbeddingInfo, Tap

__all__ = ["TorchBackend"]

_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}
_warned_max_norm = WeakIdSet()   # layers warned about max_norm (once each)


def _embedding_types() -> tuple[type, ...]:
    return (nn.Embedding, nn.EmbeddingBag)


def _validate_ids(info: EmbeddingInfo, ids: torch.Tensor, what: str = "ids") -> None:
    """Refuse ids that the lookup would fail on (or, on GPU, assert on opaquely)."""
    if not isinstance(ids, torch.Tensor):
        raise EmbgradError(f"layer {info.name!r}: {what} must be a torch.Tensor of integer ids, "
                           f"got {type(ids).__name__}.")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise EmbgradError(
            f"layer {info.name!r}: {what} have dtype {ids.dtype}, but an embedding looks up integer "
            f"ids. Convert them with ids.long() (and check they are whole numbers in [0, {info.num_rows})).")
    if ids.numel() == 0:
        raise EmbgradError(f"layer {info.name!r}: empty batch ({what} of shape {tuple(ids.shape)}); "
                           "there is nothing to look up. Pass at least one example with one token.")
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= info.num_rows:
        bad = lo if lo < 0 else hi
        pos = tuple(int(i) for i in (ids == bad).nonzero()[0].tolist())
        raise EmbgradError(
            f"layer {info.name!r}: id {bad} at position {pos} is out of range for a table of "
            f"{info.num_rows} rows (valid ids are 0..{info.num_rows - 1}). Check the tokenizer's "
            "vocabulary size against the embedding's num_embeddings, or map unknown tokens to an UNK id.")


class _Handles:
    """Hook handles removed together (a tap, or a frozen-rows guard)."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _TorchTap(_Handles, Tap):
    def grad(self, loss, calls, sources=None, retain_graph=False):
        outputs = [c.output for c in calls]
        inputs = outputs + list(sources or [])
        if not any(getattr(t, "requires_grad", False) for t in inputs):
            raise EmbgradError("nothing to differentiate: no recorded embedding output requires grad.")
        grads = torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
        out = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads[:len(outputs)], strict=True)]
        src = list(grads[len(outputs):]) if sources is not None else None
        return out, src


class TorchBackend(Backend):
    name = "torch"
    framework_module = "torch"
    searched_types = "torch.nn.Embedding and torch.nn.EmbeddingBag modules (via named_modules())"

    def is_appropriate(self, obj: Any) -> bool:
        return isinstance(obj, (torch.Tensor, nn.Module))

    # ------------------------------------------------------------------ surgery
    def find_embeddings(self, model: Any) -> dict[str, EmbeddingInfo]:
        if not isinstance(model, nn.Module):
            raise EmbgradError(f"expected a torch.nn.Module, got {type(model).__name__}.")
        # A table is tied when its Parameter is reachable from a module that is not the
        # embedding itself (e.g. a language-model head sharing the input table).
        all_modules = list(model.named_modules(remove_duplicate=False))
        embeddings = {id(m) for _, m in all_modules if isinstance(m, _embedding_types())}
        if not embeddings:
            return {}
        # which modules hold each embedding weight (directly, not through a child)
        holders: dict[int, set[int]] = {}
        for _, mod in all_modules:
            for p in mod._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), set()).add(id(mod))
        infos: dict[str, EmbeddingInfo] = {}
        for mname, mod in model.named_modules():
            if id(mod) not in embeddings:
                continue
            name = mname or type(mod).__name__
            w = mod.weight
            tied = bool(holders.get(id(w), set()) - {id(mod)})
            bag = isinstance(mod, nn.EmbeddingBag)
            options = {
                "scale_grad_by_freq": bool(mod.scale_grad_by_freq),
                "max_norm": mod.max_norm,
                "sparse": bool(mod.sparse),
            }
            if bag:
                options["mode"] = mod.mode
                options["include_last_offset"] = bool(mod.include_last_offset)
            infos[name] = EmbeddingInfo(
                name=name, layer=mod, num_rows=int(mod.num_embeddings), dim=int(mod.embedding_dim),
                kind="bag" if bag else "embedding", padding_idx=mod.padding_idx, tied=tied,
                frozen=not w.requires_grad, weight=w, options=options)
        return infos

    def install_tap(self, model, infos, on_call):
        handles = []
        try:
            for info in infos:
                mod = info.layer
                handles.append(mod.register_forward_pre_hook(self._pre_hook(info), with_kwargs=True))
                handles.append(mod.register_forward_hook(self._post_hook(info, on_call), with_kwargs=True))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return _TorchTap(handles)

    def _pre_hook(self, info: EmbeddingInfo) -> Callable[..., Any]:
        def hook(mod, args, kwargs):
            ids = args[0] if args else kwargs.get("input")
            _validate_ids(info, ids, "input ids")
            if info.options.get("max_norm") is not None and _warned_max_norm.add_new(mod):
                warnings.warn(
                    f"embedding {info.name!r} has max_norm={info.options['max_norm']}: PyTorch "
                    "renormalises the looked-up rows of the weight IN PLACE during forward. embgrad "
                    "does not undo that (the model is otherwise untouched); its gradients are those "
                    "of the renormalised table, as PyTorch's own.", stacklevel=3)
            return None
        return hook

    def _post_hook(self, info: EmbeddingInfo, on_call: Callable[[Call], Any]) -> Callable[..., Any]:
        def hook(mod, args, kwargs, output):
            ids = args[0] if args else kwargs.get("input")
            grad_enabled = torch.is_grad_enabled()
            out = output
            if grad_enabled and not out.requires_grad:
                # frozen table: make the output a leaf we can differentiate against
                out = out.detach().requires_grad_(True)
            if info.kind == "bag":
                call = self._bag_call(info, mod, args, kwargs, ids, out)
            else:
                call = Call(info=info, ids=ids, output=out, grad_enabled=grad_enabled)
            if grad_enabled:
                # a weak reference: a strong one would make an output -> hook -> call -> output
                # cycle through the C++ graph that Python's GC cannot see (every capture leaked
                # its (B, T, D) outputs and graph)
                ref = weakref.ref(call)

                def store(g, ref=ref):
                    c = ref()
                    if c is not None:
                        c.grad = g
                out.register_hook(store)
            replaced = on_call(call)
            if replaced is not None:
                return replaced
            return out if out is not output else None
        return hook

    def _bag_call(self, info: EmbeddingInfo, mod: Any, args: tuple, kwargs: dict, ids: Any, out: Any) -> Call:
        """Turn an EmbeddingBag call into per-entry ids (B, L) and a per-entry gradient map."""
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
        mode = info.options["mode"]
        dev = ids.device
        with torch.no_grad():
            if ids.dim() == 2:
                B, L = ids.shape
                padded = ids.long()
                valid = torch.ones_like(padded, dtype=torch.bool)
                w = psw if psw is not None else None
            else:
                if offsets is None:
                    raise EmbgradError(f"layer {info.name!r}: 1-D input to an EmbeddingBag needs offsets.")
                offs = offsets.long()
                n = ids.numel()
                if info.options.get("include_last_offset"):
                    starts, ends = offs[:-1], offs[1:]
                else:
                    starts = offs
                    ends = torch.cat([offs[1:], torch.tensor([n], device=dev)])
                lens = ends - starts
                B = int(starts.numel())
                L = int(lens.max()) if B else 0
                pos = torch.arange(L, device=dev)
                valid = pos[None, :] < lens[:, None]
                gather = (starts[:, None] + pos[None, :]).clamp(max=max(n - 1, 0))
                padded = torch.where(valid, ids.long()[gather], torch.full_like(gather, -1))
                w = torch.where(valid, psw[gather], torch.zeros((), dtype=psw.dtype, device=dev)) \
                    if psw is not None else None
            if info.padding_idx is not None:
                valid = valid & (padded != info.padding_idx)
            counts = valid.sum(1).clamp(min=1)
            max_idx: Any = None
            if mode == "max":
                weight = mod.weight.detach()
                vecs = weight[padded.clamp(min=0)]                        # (B, L, D)
                vecs = vecs.masked_fill(~valid[..., None], float("-inf"))
                max_pos = vecs.argmax(1)                                  # (B, D)
                max_idx = max_pos
        frozen_w = w.detach() if w is not None else None

        def token_grad(g: torch.Tensor) -> torch.Tensor:
            # g: dLoss/d(bag output), (B, D) -> dLoss/d(each looked-up vector), (B, L, D)
            g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
            if mode == "max":
                onehot = torch.zeros(B, L, g.shape[-1], dtype=g.dtype, device=g.device)
                onehot.scatter_(1, max_idx[:, None, :], 1.0)
                tg = onehot * g[:, None, :]
            else:
                tg = g[:, None, :].expand(B, L, g.shape[-1])
                if frozen_w is not None:
                    tg = tg * frozen_w[..., None].to(tg.dtype)
                if mode == "mean":
                    tg = tg / counts[:, None, None].to(tg.dtype)
            return tg * valid[..., None].to(tg.dtype)

        return Call(info=info, ids=padded, output=out, valid=valid, token_grad=token_grad,
                    grad_enabled=torch.is_grad_enabled(), meta={"bag_counts": counts})

    def coupling_layers(self, model):
        from torch.nn.modules.batchnorm import _BatchNorm
        return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]

    def stochastic_layers(self, model):
        from torch.nn.modules.dropout import _DropoutNd
        return [n for n, m in model.named_modules() if isinstance(m, _DropoutNd) and m.training and m.p > 0]

    def scalar_loss(self, loss):
        if not isinstance(loss, torch.Tensor):
            raise EmbgradError(f"loss must be a scalar torch.Tensor, got {type(loss).__name__}.")
        if loss.numel() != 1:
            raise EmbgradError(
                f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}; reduce it with "
                ".sum() or .mean() and pass loss_reduction='sum' or 'mean' accordingly.")
        if not loss.requires_grad:
            raise EmbgradError(
                "loss does not require grad: it was computed under torch.no_grad() / inference_mode, "
                "or from detached tensors, so no gradient reaches the embeddings.")
        return loss.reshape(())

    # ------------------------------------------------------------------ tensor primitives
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

    def arange(self, n, like):
        return torch.arange(n, device=like.device, dtype=torch.int64)

    def zeros(self, shape, dtype, like):
        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype), device=like.device)

    def concat(self, xs, axis=0):
        return torch.cat(list(xs), dim=axis)

    def unique(self, x):
        if x.device.type == "cpu" and not x.requires_grad:
            # NumPy's SIMD sort is ~3x faster than torch.unique on CPU (one of the two sorts
            # of every per-example capture); both views share the tensors' memory
            u, inv = np.unique(x.numpy(), return_inverse=True)
            return torch.from_numpy(u), torch.from_numpy(inv.reshape(-1).astype(np.int64, copy=False))
        u, inv = torch.unique(x, sorted=True, return_inverse=True)
        return u, inv

    def segment_sum(self, data, segment_ids, num_segments):
        out = torch.zeros((num_segments, *data.shape[1:]), dtype=data.dtype, device=data.device)
        return out.index_add_(0, segment_ids, data)

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

    # ------------------------------------------------------------------ attribution
    @staticmethod
    def _watched(fn):
        """Run ``fn(watch)`` with grad on: (y, the one leaf x that went through ``watch``)."""
        watched: list[torch.Tensor] = []

        def watch(t: torch.Tensor) -> torch.Tensor:
            leaf = t.detach().requires_grad_(True)
            watched.append(leaf)
            return leaf

        with torch.enable_grad():
            y = fn(watch)
        if len(watched) != 1:
            raise EmbgradError(f"value_and_grads: fn watched {len(watched)} tensors, expected exactly one.")
        return y, watched[0]

    def value_and_grads(self, fn):
        y, x = self._watched(fn)
        k_out = int(y.shape[1])
        grads = []
        for k in range(k_out):
            g = None
            if y.requires_grad:
                (g,) = torch.autograd.grad(y[:, k].sum(), x, retain_graph=k < k_out - 1, allow_unused=True)
            grads.append(torch.zeros_like(x) if g is None else g)
        return y.detach(), grads

    def value_and_grads_batched(self, fn):
        y, x = self._watched(fn)
        n, k_out = int(y.shape[0]), int(y.shape[1])
        if not y.requires_grad:
            return y.detach(), [torch.zeros_like(x) for _ in range(k_out)]
        eye = torch.eye(k_out, dtype=y.dtype, device=y.device).reshape(k_out, 1, k_out).expand(k_out, n, k_out)
        (g,) = torch.autograd.grad(y, x, eye, is_grads_batched=True, allow_unused=True)
        if g is None:
            return y.detach(), [torch.zeros_like(x) for _ in range(k_out)]
        return y.detach(), list(g.unbind(0))

    def log_probs_at(self, logits, positions, tokens):
        n, k = int(positions.shape[0]), int(positions.shape[1])
        pos = positions.to(logits.device).reshape(n, k, 1).expand(n, k, int(logits.shape[-1]))
        rows = logits.gather(1, pos)
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()
        lp = torch.log_softmax(rows, dim=-1)
        return lp.gather(2, tokens.to(logits.device).reshape(n, k, 1)).reshape(n, k)

    def embed(self, info, ids):
        with torch.no_grad():
            return info.layer(ids)

    def pick(self, x, idx):
        return x.gather(1, idx.reshape(-1, 1).to(x.device)).reshape(-1)

    def matmul_t(self, a, b):
        return a @ b.T

    def topk(self, x, k):
        v, i = torch.topk(x, k, dim=-1)
        return v, i

    # ------------------------------------------------------------------ tables (embgrad.table)
    def table_variable(self, info):
        return info.layer.weight

    def table_gather(self, info, rows, effective=False):
        return info.layer.weight.detach().index_select(0, rows)

    def table_write(self, info, rows, values):
        w = info.layer.weight
        with torch.no_grad():
            w.index_copy_(0, torch.from_numpy(rows).to(w.device),
                          torch.from_numpy(np.ascontiguousarray(values)).to(device=w.device, dtype=w.dtype))

    def table_quantized(self, info):
        w = info.layer.weight
        if w.is_quantized or not w.is_floating_point():
            return (f"its weight has dtype {w.dtype} (quantized); write the float table before "
                    "quantizing the model")
        return None

    def table_freeze(self, info, rows, optimizer=None):
        w = info.layer.weight
        idx = torch.from_numpy(rows).to(w.device)
        frozen = torch.zeros(info.num_rows, dtype=torch.bool, device=w.device)
        frozen[idx] = True

        def mask(g):  # runs before .grad accumulates: frozen rows get exactly zero
            if g.layout == torch.sparse_coo:
                g = g.coalesce()
                vals = g.values().masked_fill(frozen[g.indices()[0]][:, None], 0)
                return torch.sparse_coo_tensor(g.indices(), vals, g.shape, is_coalesced=True,
                                               check_invariants=False)
            return g.masked_fill(frozen[:, None], 0)

        if optimizer is not None:
            self._check_optimizer(info, optimizer)
        handles = [w.register_hook(mask)]
        if optimizer is not None:
            # optimizer-side updates that ignore the gradient (weight decay, AdamW's decoupled
            # decay): the rows are put back after every step, bit for bit
            saved: list[torch.Tensor] = []

            def snapshot(opt, args, kwargs):
                saved[:] = [w.detach().index_select(0, idx)]

            def restore(opt, args, kwargs):
                with torch.no_grad():
                    w.index_copy_(0, idx, saved[0])

            handles += [optimizer.register_step_pre_hook(snapshot),
                        optimizer.register_step_post_hook(restore)]
        return _Handles(handles)

    def _check_optimizer(self, info, optimizer):
        """EmbgradError unless ``optimizer`` is a torch optimizer that updates this table."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise EmbgradError(f"layer {info.name!r}: optimizer must be a torch.optim.Optimizer, "
                               f"got {type(optimizer).__name__}.")
        w = info.layer.weight
        if not any(p is w for group in optimizer.param_groups for p in group["params"]):
            raise EmbgradError(
                f"layer {info.name!r}: the optimizer {type(optimizer).__name__} does not update this "
                "table's weight, so there is nothing to guard; pass the optimizer that trains it.")

