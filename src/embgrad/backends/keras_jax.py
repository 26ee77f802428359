"""Keras on JAX (Keras 3 with ``KERAS_BACKEND=jax``): the Keras adapter
(:mod:`embgrad.backends.keras`) with JAX's primitives (:mod:`embgrad.backends.jax_ops`). JAX has
no tape, so the way in is the functional :func:`embgrad.value_and_gradients` (its tap adds zero
probes to the lookups); ``capture()`` refuses.
"""
from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from ..errors import EmbgradError
from .base import Tap
from .jax_ops import JaxOps, check_in_range
from .keras import KerasBackend

__all__ = ["KerasJaxBackend"]


class _ListTap(Tap):
    """A tap whose removal runs the patches' removers (no autograd of its own: JAX)."""

    def __init__(self) -> None:
        self._removers: list[Callable[[], None]] = []

    def remove(self) -> None:
        while self._removers:
            self._removers.pop()()


class KerasJaxBackend(KerasBackend):
    """Keras layers whose tensors are JAX arrays: ids checked as the JAX backend checks them
    (a host callback under ``jit``); no gradients of its own (see the module docstring)."""

    ops = JaxOps()

    def _check(self, info, ids):
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise EmbgradError(f"Keras layer {info.name!r}: ids must be integers, got dtype "
                               f"{ids.dtype}; cast them to int32.")
        V = info.num_rows
        check_in_range(ids, V, f"embgrad: Keras layer {info.name!r}: id {{bad}} is out of range "
                       f"for its table of {V} rows (valid ids are 0..{V - 1}). Fix: map the "
                       "ids into range (e.g. unknown tokens to an <unk> id) before the model.")
        return None

    def _open_tap(self) -> Tap:
        return _ListTap()

    def _add_patch(self, tap, patch):
        assert isinstance(tap, _ListTap)
        tap._removers.append(patch.remove)

    def _record(self, tap, info, out):
        return out, True

    def _var_tensor(self, var):
        return var.value

    def _put_rows(self, w, rows, values):
        w = getattr(w, "value", w)
        return w.at[rows].set(jnp.asarray(values, w.dtype))

    def table_write(self, info, rows, values):
        var = self.table_variable(info)
        var.assign(self._put_rows(var, jnp.asarray(rows), values))

    def install_tap(self, model, infos, on_call, active=None):
        from .jax_functional import _keras_jax_tap_guard
        _keras_jax_tap_guard()
        return super().install_tap(model, infos, on_call, active)
