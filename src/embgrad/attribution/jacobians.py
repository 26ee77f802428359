"""``jacobian``: gradients of several outputs with respect to an embedding layer's output."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .engine import _Engine

__all__ = ["jacobian"]

def jacobian(model: Any, inputs: Any, outputs: Any = None, *, layer: Any = None,
             forward: Callable | None = None, batch_size: int | None = None,
             call: int | None = None) -> Any:
    """Gradients of several outputs with respect to the embedding layer's output.

    ``outputs``: None (every column of the model's (B, C) output), or a list of targets as in
    :func:`attribute` (class indices, (B,) index lists, callables ``outputs -> (B,)`` picking
    other heads). Returns a framework tensor (K, B, T, D): one forward per chunk of
    ``batch_size`` examples, K backward passes over it (as ``torch.autograd.functional.jacobian``
    restricted to the layer's output; Captum has no equivalent).

    Raises:
        EmbgradError: as :func:`embgrad.attribute` for the layer, the inputs, ``batch_size`` and
            ``call``; an output that does not fit the batch or the model's output.
    """
    spec = "all" if outputs is None else (list(outputs) if isinstance(outputs, (list, tuple)) else [outputs])
    eng = _Engine(model, inputs, layer, forward, spec, batch_size, None, "outputs", call=call,
                  who="embgrad.jacobian")
    b = eng.backend
    obs = eng.observe(grad=True)
    with b.ops.no_grad():
        return b.ops.concat([b.ops.reshape(g, (1,) + tuple(b.ops.shape(g))) for g in obs["grads"]], axis=0)
