"""The JAX backend: the Flax NNX model surgery (its tensor primitives over ``jax.Array`` are
:mod:`embgrad.backends.jax_ops`).

Loaded only when ``jax`` is already imported (see :mod:`embgrad.backends`). JAX has no tape
and no hooks, so the capture interface (``embgrad.capture``) is not offered here; the
functional entry point :func:`embgrad.value_and_gradients` (:mod:`embgrad.backends.jax_functional`)
is JAX's way in.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ..errors import EmbgradError
from .base import EmbeddingInfo, ModelAdapter
from .jax_ops import JaxOps

__all__ = ["JaxBackend", "is_nnx_module", "find_nnx_embeddings"]


def is_nnx_module(obj: Any) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(obj, nnx.Module)


def _nnx() -> Any:
    """``flax.nnx`` when the user imported Flax, else None (never imports it)."""
    if "flax" not in sys.modules:
        return None
    try:
        from flax import nnx
    except ImportError:   # pragma: no cover - a broken flax install
        return None
    return nnx


def _path_name(path: Sequence[Any]) -> str:
    """An NNX graph path as a dotted attribute path: ("encoder", "layers", 0, "emb") -> "encoder.layers.0.emb"."""
    return ".".join(str(p) for p in path)


def find_nnx_embeddings(model: Any) -> dict[str, EmbeddingInfo]:
    """Every ``nnx.Embed`` in ``model`` (or ``model`` itself), keyed by its attribute path."""
    nnx = _nnx()
    if nnx is None:
        return {}
    out: dict[str, EmbeddingInfo] = {}
    seen: dict[int, EmbeddingInfo] = {}
    parents: list[tuple[tuple[Any, ...], Any]] = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Embed) and id(node) not in seen:
            name = _path_name(path) or "embed"
            out[name] = seen[id(node)] = EmbeddingInfo(
                name=name, layer=node, num_rows=int(node.num_embeddings), dim=int(node.features),
                weight=node.embedding, options={"path": tuple(path), "aliases": []})
        elif hasattr(node, "__dict__"):
            parents.append((tuple(path), node))
    # the same nnx.Embed under a second attribute (self.a = e; self.b = e): one table, listed once
    # (as iter_graph visits it once); its other paths are kept to name it when asked for by them
    for path, node in parents:
        for attr, value in vars(node).items():
            info = seen.get(id(value))
            if info is not None and path + (attr,) != info.options["path"]:
                info.options["aliases"].append(_path_name(path + (attr,)))
    return out


class JaxBackend(ModelAdapter):
    name = "jax"
    ops = JaxOps()
    framework_module = "jax"
    searched_types = "flax.nnx.Embed"
    structured_inputs = False
    table_check = None

    # ------------------------------------------------------------------ detection
    def is_appropriate(self, obj: Any) -> bool:
        if isinstance(obj, jax.Array):
            return True
        nnx = _nnx()
        return nnx is not None and isinstance(obj, (nnx.Module, nnx.Variable))

    def find_embeddings(self, model: Any) -> dict[str, EmbeddingInfo]:
        return find_nnx_embeddings(model)

    def match_name(self, key: str, found: dict[str, EmbeddingInfo]) -> EmbeddingInfo | None:
        for info in found.values():
            if key in info.options.get("aliases", ()):
                raise EmbgradError(
                    f"layer {key!r} is the same nnx.Embed module as {info.name!r} (one table reachable "
                    f"by two attribute paths); embgrad lists it once, under {info.name!r}. Fix: pass "
                    f"layers={info.name!r} and read grads[{info.name!r}].")
        return None

    def install_tap(self, model, infos, on_call, active=None):
        raise EmbgradError(
            "embgrad.capture() needs a framework with a tape or hooks; JAX has neither. For a Flax "
            "NNX model use the functional entry point: loss, grads = embgrad.value_and_gradients("
            "loss_fn, model, *args) (works under jax.jit / nnx.jit).")

    # ------------------------------------------------------------------ attribution
    def embed(self, info, ids):
        return jax.lax.stop_gradient(info.layer(ids))

    # ------------------------------------------------------------------ tables (embgrad.table)
    def table_variable(self, info):
        return info.layer.embedding

    def table_dtype(self, info):
        return jnp.dtype(info.layer.embedding[...].dtype).name

    def table_gather(self, info, rows, effective=False):
        return jax.lax.stop_gradient(jnp.take(info.layer.embedding[...], rows, axis=0))

    def table_freeze(self, info, rows, optimizer=None):
        raise EmbgradError(
            f"table {info.name!r}: freeze() masks a table's gradient with a hook, and JAX has none. "
            "In JAX, leave the rows out of the update instead: with embgrad.value_and_gradients drop "
            "them from weight_grad (keep = ~jnp.isin(g.rows, frozen)), or with optax use "
            "optax.masked / a gradient zeroed on those rows.")

    def table_write(self, info, rows, values):
        param = info.layer.embedding
        table = param[...]
        param[...] = table.at[jnp.asarray(rows)].set(jnp.asarray(values, dtype=table.dtype))
