"""Where attribution replaces a layer's output: the sites named by ``layer=``.

A site is either an embedding layer (its lookup's output is replaced, through
:meth:`embgrad.capture.Capture.replacing`) or a *composite* module that holds the token
embedding (its whole output is replaced, e.g. a Hugging Face ``BertEmbeddings``: word +
position + token-type embeddings summed and normalised, treated as one input, as Captum's
``LayerIntegratedGradients`` does on ``model.bert.embeddings``). Several sites (``layer=[...]``)
move along one path at once (Captum's ``LayerIntegratedGradients`` with a list of layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backends import Backend, EmbeddingInfo
from ..capture import input_embedding
from ..errors import EmbgradError, closest_names


@dataclass(frozen=True, eq=False)
class _Site:
    """``name``: how results name the site; ``info``: the embedding layer whose lookup gives the
    ids (the layer itself, or the token embedding inside a composite); ``module``: the
    composite module whose output is replaced (None for an embedding layer)."""

    name: str
    info: EmbeddingInfo
    module: Any = None


def _is_embedding(b: Backend, found: dict[str, EmbeddingInfo], key: Any) -> bool:
    if isinstance(key, str):
        if key in found:
            return True
        match = getattr(b, "match_name", None)
        return match is not None and match(key, found) is not None
    return any(i.layer is key for i in found.values())


def _composites(b: Backend, model: Any, found: dict[str, EmbeddingInfo]) -> dict[str, Any]:
    """The modules of ``model`` (not the model itself) that hold an embedding layer but are not
    one: the composite modules attribution can replace the output of."""
    mods = b.submodules(model)
    layers = {id(i.layer) for i in found.values()}
    out = {}
    for name, mod in mods.items():
        if id(mod) in layers:
            continue
        inner = {id(m) for m in b.submodules(mod).values()}
        if inner & layers:
            out[name] = mod
    return out


def _valid_names(b: Backend, model: Any, found: dict[str, EmbeddingInfo]) -> str:
    comp = list(_composites(b, model, found))
    text = f"embedding layers: {', '.join(found) or 'none'}"
    if comp:
        text += f"; modules holding one (attributed as one input): {', '.join(comp)}"
    return text


def _composite_site(b: Backend, model: Any, key: Any, found: dict[str, EmbeddingInfo]) -> _Site:
    comps = _composites(b, model, found)
    name: str | None = None
    if isinstance(key, str):
        if key in comps:
            name = key
        else:
            hits = [n for n in comps if n.endswith("." + key)]
            name = hits[0] if len(hits) == 1 else None
    else:
        name = next((n for n, m in comps.items() if m is key), None)
    if name is None:
        what = f"named {key!r}" if isinstance(key, str) else f"object {type(key).__name__}"
        closest = f"; closest names: {closest_names(key, list(found) + list(comps))}" if isinstance(key, str) else ""
        raise EmbgradError(f"no embedding layer {what} (nor a module holding one) in {type(model).__name__}"
                           f"{closest}. Valid names: {_valid_names(b, model, found)}.")
    module = comps[name]
    inside = {id(m) for m in b.submodules(module).values()}
    inner = [i for i in found.values() if id(i.layer) in inside and i.kind == "embedding"]
    token = input_embedding(model, inner)          # get_input_embeddings() inside it, else the only one
    if token is None:
        raise EmbgradError(
            f"module {name!r} holds {len(inner)} embedding layers ({', '.join(i.name for i in inner)}) and none is "
            f"the model's get_input_embeddings(): embgrad cannot tell which one looks up the tokens. Attribute "
            "to those layers instead (layer=[...]).")
    return _Site(name=key if isinstance(key, str) else name, info=token, module=module)


def pick_sites(b: Backend, model: Any, layer: Any) -> list[_Site]:
    """The sites of ``layer``: None (the model's token embedding), an embedding layer or a
    composite module (a name or the object), or a list of them (several layers at once)."""
    from .engine import _pick_layer
    keys = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not keys:
        raise EmbgradError("layer=[] names no layer; pass a name, a layer object, or a list of them.")
    if len(keys) > 1 and any(k is None for k in keys):
        raise EmbgradError(f"layer={layer!r}: a list of layers names each one (None is not a layer).")
    found = b.find_embeddings(model)
    sites: list[_Site] = []
    for key in keys:
        if key is None or _is_embedding(b, found, key):
            info = _pick_layer(b, model, key)
            sites.append(_Site(name=info.name, info=info))
        else:
            if not found:
                _pick_layer(b, model, key)           # raises: the model has no embedding layer
            if not b.submodules(model):              # a backend without output taps
                what = f"named {key!r}" if isinstance(key, str) else f"object {type(key).__name__}"
                raise EmbgradError(
                    f"no embedding layer {what} in {type(model).__name__}; its embedding layers: "
                    f"{', '.join(found)}. (Attribution to a composite module, a layer holding an embedding, "
                    f"is implemented for PyTorch only for now, not for the {b.name} backend.)")
            sites.append(_composite_site(b, model, key, found))
    if len(sites) > 1:
        if b.name != "torch":
            raise EmbgradError(f"attribution to several layers in one call is implemented for PyTorch only for "
                               f"now, not for the {b.name} backend: call embgrad.attribute once per layer.")
        names = [s.name for s in sites]
        if len(set(names)) != len(names) or len({id(s.module if s.module is not None else s.info.layer)
                                                  for s in sites}) != len(sites):
            raise EmbgradError(f"layer={names}: a layer is named twice.")
        for s in sites:
            if s.module is None:
                continue
            inside = {id(m) for m in b.submodules(s.module).values()}
            for o in sites:
                if o is not s and id(o.module if o.module is not None else o.info.layer) in inside:
                    raise EmbgradError(
                        f"layer={names}: {o.name!r} lies inside the composite module {s.name!r}, whose whole "
                        "output is replaced (so nothing inside it moves along the path); attribute to the "
                        "module, or to the layers inside it, not both.")
    return sites
