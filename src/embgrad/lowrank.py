"""Gradients of a low-rank (LoRA) table update, from the gradient of the table it looks up in.

A layer with a low-rank update (LoRA, Hu et al. 2021, arXiv:2106.09685; Keras's
``Embedding.enable_lora(rank)``) looks up ``E = W + s · A @ B`` with A (V, r), B (r, D) and the
base table W frozen. Its backend describes the update neutrally (``EmbeddingInfo.low_rank``:
the scale s and rank r; ``ModelAdapter.low_rank_factors``: A and B), and the algebra here is
written once over the backend's tensor primitives.
"""
from __future__ import annotations

from typing import Any

from .errors import EmbgradError
from .sparse import RowGrad

__all__ = ["lora_gradients"]


def lora_gradients(layer_grads: Any) -> tuple[RowGrad, Any]:
    """Gradients of a LoRA-enabled embedding's two factors from its lookup gradient.

    ``layer_grads``: the :class:`~embgrad.LayerGrads` of the layer (``capture(...).gradients(loss)``).
    With G the (sparse) gradient of the looked-up table E (``layer_grads.weight_grad``, R rows),
    ``dA = s · G @ Bᵀ`` touches only G's rows and is returned as a :class:`~embgrad.RowGrad` of
    the (V, r) factor A; ``dB = s · A[rows]ᵀ @ G`` is a dense (r, D) framework tensor. Both in
    G's dtype. Cost O(R · r · D), never O(V · D). Source: the chain rule through
    ``E = W + s · A @ B`` (LoRA, Hu et al. 2021, arXiv:2106.09685).

    Raises:
        EmbgradError: the layer has no low-rank update (Keras: ``layer.enable_lora(rank)``).
    """
    info = layer_grads.info
    if info.low_rank is None:
        raise EmbgradError(f"layer {info.name!r} has no LoRA enabled (layer.enable_lora(rank)).")
    g = layer_grads.weight_grad
    b = g._backend
    o, s = b.ops, info.low_rank.scale
    dt = o.dtype_name(g.values)
    a_fac, b_fac = (o.cast(f, dt) for f in b.low_rank_factors(info))
    d_a = o.matmul(g.values, b_fac, transpose_b=True) * s                 # (R, r)
    d_b = o.matmul(o.gather(a_fac, g.rows), g.values, transpose_a=True) * s   # (r, D)
    return RowGrad(g.rows, d_a, info.num_rows, b), d_b
