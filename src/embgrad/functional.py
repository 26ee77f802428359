"""The functional entry point, for frameworks without a tape: :func:`value_and_gradients` (JAX).

Framework-neutral facade: the JAX code lives in :mod:`embgrad.backends.jax_functional` and is
imported only when called with a Flax NNX module (``import embgrad`` loads no framework).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from .capture import Gradients
from .errors import EmbgradError

__all__ = ["value_and_gradients"]


def value_and_gradients(loss_fn: Callable[..., Any], model: Any, *args: Any, layers: Any = None,
                        loss_reduction: str = "sum", batch_size: int | None = None,
                        sources: Any = None) -> tuple[Any, Gradients]:
    """The loss and the sparse, per-example gradients of the model's embedding tables, in one
    backward pass: JAX's counterpart of ``embgrad.capture`` (JAX has no tape).

    ``loss, grads = embgrad.value_and_gradients(loss_fn, model, *args)`` evaluates
    ``loss_fn(model, *args)`` (a scalar) like ``nnx.value_and_grad(loss_fn)(model, *args)``, but
    instead of the dense (V, D) gradient of each table returns ``grads``, a
    :class:`~embgrad.Gradients` keyed by each ``nnx.Embed``'s attribute path (``"emb"``,
    ``"encoder.tok"``): ``grads["emb"].weight_grad`` (a :class:`~embgrad.RowGrad`, the looked-up
    rows only), ``.per_example()`` (an :class:`~embgrad.ExampleGrads`: norms, clip, sum, dot),
    ``.ids`` / ``.output_grad`` / ``.calls``. Arrays are ``jax.Array``; row ids are int32 unless
    ``jax_enable_x64`` is set.

    How: the lookups' output gradients are taken by differentiating with respect to a zero
    probe added to each lookup's output, in a private copy of the model (``nnx.split`` /
    ``nnx.merge``; the user's model is not modified, except for the non-parameter state its own
    forward updates — RNG counters, batch statistics — written back as ``nnx.value_and_grad``
    does). One ``jax.vjp``, no ``vmap``; the table's (V, D) gradient is never formed (unless a
    tied ``attend`` projection makes it dense by nature). Works eagerly and inside ``jax.jit`` /
    ``nnx.jit``: under ``jit`` the sparse results have static shapes (B·T slots, padded with row
    ids >= V and zero values, which every method ignores); the results are JAX pytrees, so a
    jitted function may return them.

    Mapping onto the JAX APIs: ``nnx.value_and_grad(loss_fn)(model, x)`` ≈
    ``value_and_gradients(loss_fn, model, x, sources=nnx.Param)`` with the embedding tables'
    gradients sparse (``grads["emb"].weight_grad``) and every other parameter's dense in
    ``grads.sources`` (an ``nnx.State``). Keras 3 on the JAX backend (``KERAS_BACKEND=jax``): the
    same call with a Keras model, layers keyed by name; ``loss_fn`` may call ``model(x)`` or
    ``model.stateless_call(trainable, non_trainable, x)`` (inside the user's ``jax.jit``): embgrad's
    Keras tap adds the probe to each ``Embedding`` call's output (and is removed before returning).

    Args:
        loss_fn: ``loss_fn(model, *args) -> scalar`` float loss.
        model: a Flax NNX ``Module`` holding ``nnx.Embed`` layers (or one ``nnx.Embed``), or a Keras 3
            model on the JAX backend.
        *args: passed to ``loss_fn`` after the model.
        layers: None (every ``nnx.Embed``), an attribute path or a list of them, or the layer objects.
        loss_reduction: "sum" or "mean": how the loss combines the batch's examples (only
            ``per_example()`` depends on it).
        batch_size: the number of examples B; default: the first dimension of the first array
            among ``args``. Per-example gradients need each lookup's ids to be (B, ...).
        sources: an NNX filter (e.g. ``nnx.Param``): also return the gradients of those
            parameters (the selected tables excluded: theirs is ``weight_grad``) as
            ``grads.sources``, an ``nnx.State``, from the same backward pass.

    Ids: ``nnx.Embed`` wraps negative ids (-1 is row V-1) and returns NaN for ids >= V; embgrad
    follows the wrapping and refuses ids outside [-V, V): eagerly an :class:`EmbgradError`;
    under ``jit`` a run-time check (``jax.debug.callback``) that fails the call with a
    ``JaxRuntimeError`` carrying the same message.

    Raises:
        EmbgradError: a model that is not an NNX Module, a layer name that is not an
            ``nnx.Embed`` (the message lists the closest), a non-scalar loss, a bad
            ``loss_reduction``, float ids, ids out of range, a selected layer the forward does
            not call, a table read outside its lookups and ``attend`` (whole-table results only).
    """
    keras = sys.modules.get("keras")
    layer_type = getattr(keras, "Layer", None) if keras is not None else None
    if keras is not None and isinstance(layer_type, type) and isinstance(model, layer_type):
        backend = keras.backend.backend() if hasattr(keras, "backend") else "?"
        if backend == "jax":
            from .backends.jax_functional import value_and_gradients as impl
            return impl(loss_fn, model, *args, layers=layers, loss_reduction=loss_reduction,
                        batch_size=batch_size, sources=sources)
        raise EmbgradError(
            f"value_and_gradients() takes Flax NNX modules; {type(model).__name__} is a Keras model "
            f"(backend {backend!r}). On the TensorFlow or torch backend use `with embgrad.capture(model) "
            "as cap: loss = ...; grads = cap.gradients(loss)`; value_and_gradients is for JAX (Flax "
            "NNX, or Keras with KERAS_BACKEND=jax).")
    if "jax" not in sys.modules or "flax" not in sys.modules:
        raise EmbgradError(
            f"value_and_gradients() is the entry point for JAX (Flax NNX) models, got "
            f"{type(model).__module__}.{type(model).__qualname__} with no Flax imported. For PyTorch, "
            "Keras and Gluon models use `with embgrad.capture(model) as cap: loss = ...; "
            "grads = cap.gradients(loss)`.")
    from .backends.jax_functional import value_and_gradients as impl
    return impl(loss_fn, model, *args, layers=layers, loss_reduction=loss_reduction,
                batch_size=batch_size, sources=sources)
