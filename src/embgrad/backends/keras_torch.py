"""Keras on PyTorch (Keras 3 with ``KERAS_BACKEND=torch``): the Keras adapter
(:mod:`embgrad.backends.keras`) with torch's primitives (:mod:`embgrad.backends.torch_ops`) and
autograd (the torch backend's tap).
"""
from __future__ import annotations

import weakref

import torch

from ..errors import EmbgradError
from .base import Tap
from .keras import KerasBackend
from .torch import TorchBackend, _TorchTap, _validate_ids, _wrap_broadcast

__all__ = ["KerasTorchBackend"]


class _KerasTorchTap(_TorchTap):
    def grad(self, loss, calls, sources=None, retain_graph=False):
        if sources is not None:
            sources = [getattr(s, "value", s) if not isinstance(s, torch.Tensor) else s
                       for s in sources]
            for k, s in enumerate(sources):
                if not isinstance(s, torch.Tensor):
                    raise EmbgradError(
                        f"sources[{k}] must be a variable or tensor of the model, got "
                        f"{type(s).__name__} {s!r:.60}. Pass the variables themselves (e.g. "
                        "model.trainable_variables); names are not looked up.")
        return super().grad(loss, calls, sources, retain_graph)

class KerasTorchBackend(KerasBackend, TorchBackend):
    """Keras layers whose tensors are torch tensors: ids checked as the torch backend checks
    them, gradients from torch autograd."""

    def _check(self, info, ids):
        _validate_ids(info, ids, "input ids")

    def _open_tap(self) -> Tap:
        return _KerasTorchTap([])

    def _add_patch(self, tap, patch):
        tap._handles.append(patch)

    def _record(self, tap, info, out):
        grad_enabled = torch.is_grad_enabled()
        if grad_enabled and not out.requires_grad:   # frozen table: a leaf to differentiate
            out = out.detach().requires_grad_(True)
        return out, grad_enabled

    def _var_tensor(self, var):
        return var.value.detach()

    def _put_rows(self, w, rows, values):
        w = w.value if hasattr(w, "value") else w
        return w.index_copy(0, rows, values.to(w.dtype))

    def table_write(self, info, rows, values):
        p = self.table_variable(info).value
        with torch.no_grad():
            p.index_copy_(0, torch.from_numpy(rows).to(p.device),
                          torch.from_numpy(values).to(device=p.device, dtype=p.dtype))

    def _selected_rows(self, info, inner, args, kwargs):
        out = inner(*args, **kwargs)
        p = getattr(info.weight, "value", None)
        if not (isinstance(out, torch.Tensor) and isinstance(p, torch.Tensor) and torch.is_grad_enabled()
                and p.requires_grad and out.requires_grad and out.dim() >= 1
                and out.shape[-1] == info.dim):
            return out, None
        # the forward-mode derivative in the direction "row r -> r", as the derivative of
        # a vector-Jacobian product (double backward over the call's own small graph)
        u = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, p, grad_outputs=u, create_graph=True, retain_graph=True,
                                   allow_unused=True)
        if g is None or not g.requires_grad:
            return out, None
        V, D = info.num_rows, info.dim
        direction = torch.arange(V, dtype=p.dtype, device=p.device).unsqueeze(1).expand(V, D)
        (j,) = torch.autograd.grad(g, u, grad_outputs=direction, allow_unused=True)
        if j is None:
            return out, None
        with torch.no_grad():
            j = j.double()
            r = j[..., 0]
            ids = r.round().clamp(0, V - 1).long()
            ok = bool((j == r[..., None]).all() and (r == r.round()).all() and (r >= 0).all()
                      and (r < V).all() and (out == p.to(out.dtype)[ids]).all())
        return out, (ids if ok else False)

    broadcast_seen = TorchBackend.broadcast_seen
    broadcast_views = True

    def _broadcast_output(self, call, out):
        if call.batch_free is None or not call.grad_enabled or not out.requires_grad:
            return out
        # the torch backend's per-example views of a broadcast lookup (Keras ops on this
        # backend are torch functions: `+` with the batch sees the view)
        bdim = None if call.batch_free == "absent" else call.batch_dim
        return _wrap_broadcast(out, weakref.ref(call), bdim)

    def _on_grad(self, call):
        if call.grad_enabled and call.output.requires_grad:
            def store(g, call=call):
                call.grad = g
            call.output.register_hook(store)
