"""Picks a backend for the objects it is given, importing nothing the user did not import.

As in einops' ``_backends.py``: a backend is only considered when its framework is already
in ``sys.modules`` (the user's object cannot come from a framework that was never imported),
so ``import embgrad`` and this module load no framework.
"""
from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..errors import EmbgradError
from .base import Backend, Call, EmbeddingInfo, LowRank, ModelAdapter, Tap, TensorOps

__all__ = ["get_backend", "Backend", "ModelAdapter", "TensorOps", "Call", "EmbeddingInfo", "LowRank", "Tap"]

# The registry. Each framework: one TensorOps (backends/<framework>_ops.py) and one
# ModelAdapter (backends/<framework>.py), registered here as (module that must already be
# imported, where its adapter is). Where: (embgrad module, ModelAdapter class name), or a
# function that picks one when first asked (Keras: by the backend Keras runs on). Order
# matters: Keras layers on the torch backend are also torch Modules, so Keras is asked first.

#: Keras's adapters by ``keras.backend.backend()``
KERAS_FLAVOURS: dict[str, tuple[str, str]] = {
    "tensorflow": ("embgrad.backends.keras_tensorflow", "KerasTensorFlowBackend"),
    "torch": ("embgrad.backends.keras_torch", "KerasTorchBackend"),
    "jax": ("embgrad.backends.keras_jax", "KerasJaxBackend"),
}


def _keras_adapter() -> tuple[str, str]:
    """The Keras adapter for the Keras in use, chosen by ``keras.backend.backend()`` (tf-keras,
    Keras 2, always runs on TensorFlow); Keras 3 on a backend embgrad has no primitives for
    gets an adapter that recognises its objects and says so."""
    keras = sys.modules.get("keras")
    try:
        kb = keras.backend.backend() if keras is not None else None
    except AttributeError:  # a partially imported keras
        kb = None
    return KERAS_FLAVOURS.get(kb or "tensorflow", ("embgrad.backends.keras", "UnsupportedKerasBackend"))


_CANDIDATES: list[tuple[str, tuple[str, str] | Callable[[], tuple[str, str]]]] = [
    ("keras", _keras_adapter),
    ("tf_keras", _keras_adapter),   # Keras 2 (TF_USE_LEGACY_KERAS=1)
    ("tensorflow", ("embgrad.backends.tensorflow", "TensorFlowBackend")),
    ("torch", ("embgrad.backends.torch", "TorchBackend")),
    ("mxnet", ("embgrad.backends.gluon", "GluonBackend")),
    ("jax", ("embgrad.backends.jax", "JaxBackend")),   # jax.Array, Flax NNX modules
]
#: every registered adapter, (module, class name): what tests check against the interfaces
ADAPTERS: tuple[tuple[str, str], ...] = (
    *KERAS_FLAVOURS.values(), ("embgrad.backends.keras", "UnsupportedKerasBackend"),
    *(where for _, where in _CANDIDATES if not callable(where)))
_instances: dict[str, Backend] = {}    # one backend object per module, made on first use
_instances_lock = threading.RLock()      # threads asking first at once still share one


def _load(modname: str, clsname: str) -> Backend | None:
    with _instances_lock:
        if modname not in _instances:
            try:
                mod = importlib.import_module(modname)
            except ModuleNotFoundError as e:  # backend file not written yet, or its deps missing
                if e.name and e.name.startswith("embgrad"):
                    return None
                raise
            _instances[modname] = getattr(mod, clsname)()
        return _instances[modname]


def get_backend(obj: Any) -> Backend:
    """The backend for ``obj`` (a tensor, model, layer or variable of some framework): its
    :class:`ModelAdapter`, whose ``ops`` are its :class:`TensorOps`."""
    for framework, where in _CANDIDATES:
        if framework not in sys.modules:
            continue
        modname, clsname = where() if callable(where) else where
        backend = _load(modname, clsname)
        if backend is not None and backend.is_appropriate(obj):
            return backend
    loaded = [f for f, _ in _CANDIDATES if f in sys.modules]
    raise EmbgradError(
        f"embgrad does not know what framework {type(obj).__module__}.{type(obj).__qualname__} "
        f"belongs to (frameworks imported: {', '.join(loaded) or 'none'}). Pass a torch.nn.Module "
        "or torch.Tensor, a Keras model/layer or tf.Tensor, an MXNet Gluon Block or NDArray, "
        "or a Flax NNX Module or jax.Array.")
