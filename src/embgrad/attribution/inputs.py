"""The model's inputs as attribution sees them: batched entries (rows can be taken), the
padding mask, token strings, the pad id and the baselines of integrated gradients."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends import Backend, EmbeddingInfo
from ..errors import EmbgradError
from .targets import _is_int

if TYPE_CHECKING:
    from .engine import _Engine

class _Inputs:
    """The model's inputs (tensor, tuple or dict); rows of the batched entries can be taken."""

    def __init__(self, inputs: Any, backend: Backend):
        self.backend = backend
        if isinstance(inputs, Mapping):
            self.kind, items = "dict", list(dict(inputs).items())
        elif isinstance(inputs, (tuple, list)):
            self.kind, items = "tuple", list(enumerate(inputs))
        else:
            self.kind, items = "tensor", [(0, inputs)]
        self.items = items
        sizes = [s for s in (self._rows(v) for _, v in items) if s is not None]
        if not sizes:
            raise EmbgradError(
                f"inputs must hold the model's input tensors (ids, attention mask, ...) with a batch "
                f"dimension, got {type(inputs).__name__} with no array entry.")
        self.batch = max(sizes)
        if self.batch < 1:
            raise EmbgradError("inputs hold an empty batch (0 examples); pass at least one example.")
        self.batched = [self._rows(v) == self.batch for _, v in items]
        seq = [tuple(v.shape) for (_, v), bt in zip(items, self.batched, strict=True) if bt and len(v.shape) >= 2]
        self.seq_len = int(seq[0][1]) if seq else 1

    @staticmethod
    def _rows(v: Any) -> int | None:
        shape = getattr(v, "shape", None)
        if shape is None or callable(v) or len(shape) == 0:
            return None
        try:
            return int(shape[0])
        except (TypeError, ValueError):
            return None

    def get(self, key: str) -> Any:
        return dict(self.items).get(key) if self.kind == "dict" else None

    def take(self, idx: np.ndarray) -> Any:
        """The inputs of examples ``idx`` (NumPy int64 (n,)), broadcast entries unchanged."""
        b = self.backend
        out = []
        for (k, v), batched in zip(self.items, self.batched, strict=True):
            if batched:
                v = v[idx] if isinstance(v, np.ndarray) else b.ops.gather(v, b.ops.from_numpy(idx, like=v))
            out.append((k, v))
        if self.kind == "dict":
            return dict(out)
        if self.kind == "tuple":
            return tuple(v for _, v in out)
        return out[0][1]

    def call(self, forward: Callable | None, model: Any, inputs: Any) -> Any:
        """Run ``model`` (or ``forward(model, ...)``) on ``inputs`` by the framework's calling
        convention: Keras takes a list, tuple or dict as ONE structured input (``model(inputs)``);
        elsewhere a tuple is positional arguments and a dict keyword arguments."""
        if self.kind == "tensor" or self.backend.structured_inputs:
            return model(inputs) if forward is None else forward(model, inputs)
        if forward is None:
            return model(**inputs) if self.kind == "dict" else model(*inputs)
        return forward(model, **inputs) if self.kind == "dict" else forward(model, *inputs)


def _mask(eng: _Engine, ids: np.ndarray, mask: Any) -> np.ndarray:
    """NumPy bool (B, T): False at padding (attention mask 0, or Keras mask_zero ids 0)."""
    if mask is None:
        mask = eng.inputs.get("attention_mask")
    if mask is None and eng.info.pad_masked and eng.info.pad_id is not None:
        return ids != eng.info.pad_id
    if mask is None:
        return np.ones(ids.shape, dtype=bool)
    m = mask if isinstance(mask, np.ndarray) else eng.backend.ops.to_numpy(mask)
    if m.shape != ids.shape:
        raise EmbgradError(f"layer {eng.info.name!r}: the mask has shape {m.shape} but the looked-up ids "
                           f"have shape {ids.shape}; pass a (B, T) attention mask (1 = token, 0 = padding).")
    return m.astype(bool)


def _tokens(tokens: Any, ids: np.ndarray, what: str = "tokens") -> list[list[str]] | None:
    """Token strings per example from a tokenizer, a vocabulary (id -> str), a callable
    (list of ids -> list of str) or given lists."""
    if tokens is None:
        return None
    rows = ids.tolist()
    if hasattr(tokens, "convert_ids_to_tokens"):
        return [list(map(str, tokens.convert_ids_to_tokens(r))) for r in rows]
    if callable(tokens):
        return [list(map(str, tokens(r))) for r in rows]
    if hasattr(tokens, "tokens") and not isinstance(tokens, (list, tuple)):   # embgrad.demo Vocab
        tokens = tokens.tokens
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], (list, tuple)):
        if len(tokens) != len(rows) or any(len(t) != len(r) for t, r in zip(tokens, rows, strict=True)):
            raise EmbgradError(f"{what}: got {len(tokens)} token lists of lengths "
                               f"{[len(t) for t in tokens][:5]}, but the ids are {ids.shape}; pass one "
                               "string per id (padding included), or a tokenizer.")
        return [list(map(str, t)) for t in tokens]
    try:
        return [[str(tokens[i]) for i in r] for r in rows]
    except (IndexError, KeyError, TypeError) as e:
        raise EmbgradError(f"{what}: could not map the ids through {type(tokens).__name__} ({e}); pass "
                           "a tokenizer, a vocabulary (id -> token), or lists of token strings.") from None


def _known_pad_id(model: Any, info: EmbeddingInfo) -> int | None:
    """The pad id the model declares: Hugging Face ``config.pad_token_id``, the layer's padding
    index, or 0 for a Keras ``mask_zero`` layer; None if there is none."""
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad_id is None:
        pad_id = info.pad_id
    return pad_id


def _pad_id(model: Any, info: EmbeddingInfo, pad_id: int | None) -> int:
    if pad_id is None:
        pad_id = _known_pad_id(model, info)
    if pad_id is None:
        raise EmbgradError(f"baseline='pad' needs the pad id: layer {info.name!r} has no padding index and "
                           "the model has no config.pad_token_id. Pass pad_id=ID, or baseline=ID.")
    return int(pad_id)


def _baseline(eng: _Engine, baseline: Any, obs: dict, pad_id: int | None) -> tuple[Any, str]:
    """The baseline's layer output e₀ (B, T, D) and a description; with several sites (or a
    composite) e₀ (B, L·T, D), each site's part from ``baseline`` or ``baseline[site name]``."""
    b, e, ids = eng.backend, obs["e"], obs["ids"]
    if eng.plain:
        return _site_baseline(eng, 0, baseline, e, ids, pad_id)
    sites, T = eng.sites, eng.T
    assert T is not None
    names = [s.name for s in sites]
    if isinstance(baseline, Mapping):
        extra = [k for k in baseline if k not in names]
        missing = [n for n in names if n not in baseline]
        if extra or missing:
            raise EmbgradError(f"baseline dict with keys {list(baseline)}: unknown layers {extra}, no baseline "
                               f"for {missing}; give one baseline per layer, keyed by {names} (or one "
                               "baseline for every layer).")
        specs = [baseline[n] for n in names]
    else:
        specs = [baseline] * len(sites)
    parts, descs = [], []
    for si, spec in enumerate(specs):
        e0, desc = _site_baseline(eng, si, spec, e[:, si * T:(si + 1) * T], ids[:, si * T:(si + 1) * T], pad_id)
        parts.append(e0)
        descs.append(desc)
    e0 = parts[0] if len(parts) == 1 else b.ops.concat(parts, axis=1)
    desc = descs[0] if len(set(descs)) == 1 else "; ".join(f"{n}: {d}" for n, d in zip(names, descs, strict=True))
    return e0, desc


def _site_baseline(eng: _Engine, si: int, baseline: Any, e: Any, ids: Any, pad_id: int | None) -> tuple[Any, str]:
    """Site ``si``'s baseline output (B, T, D) given its output ``e`` and ids (B, T): vectors
    directly, ids through its embedding layer (or, for a composite module, through a forward
    with its token lookup given those ids)."""
    b, site = eng.backend, eng.sites[si]
    info = site.info
    if baseline is None or (isinstance(baseline, str) and baseline == "zeros"):
        return b.ops.zeros(b.ops.shape(e), b.ops.dtype_name(e), e), "zeros"
    if isinstance(baseline, (float, np.floating)) and not isinstance(baseline, bool):
        # a constant vector: every coordinate of every position equals ``baseline``
        if not np.isfinite(baseline):
            raise EmbgradError(f"baseline={baseline!r} must be finite (a constant vector).")
        return b.ops.zeros(b.ops.shape(e), b.ops.dtype_name(e), e) + float(baseline), f"constant {float(baseline):g}"
    if isinstance(baseline, str):
        if baseline != "pad":
            raise EmbgradError(f"baseline={baseline!r} is not known; pass None/'zeros', 'pad', an int id, "
                               "or an id tensor shaped like the ids.")
        bid, desc = _pad_id(eng.model, info, pad_id), "pad"
        base_ids = np.full(b.ops.shape(ids), bid, np.int64)
    elif _is_int(baseline):
        bid, desc = int(baseline), f"id {int(baseline)}"
        base_ids = np.full(b.ops.shape(ids), bid, np.int64)
    else:
        if not (b.is_appropriate(baseline) or isinstance(baseline, np.ndarray)):
            raise EmbgradError(
                f"baseline of type {type(baseline).__name__} is not known; pass None/'zeros', 'pad', an int "
                "id, a float (a constant vector), or an id tensor shaped like the ids.")
        arr = baseline if isinstance(baseline, np.ndarray) else b.ops.to_numpy(baseline)
        e_shape, ids_shape = tuple(b.ops.shape(e)), tuple(b.ops.shape(ids))
        B = e_shape[0]
        if np.issubdtype(arr.dtype, np.floating) and arr.shape in (e_shape, (1,) + e_shape[1:]):
            t = baseline if not isinstance(baseline, np.ndarray) else b.ops.from_numpy(arr, like=e)
            if arr.shape[0] != B:          # one (1, T, D) baseline broadcast over the batch
                t = b.ops.gather(t, b.ops.from_numpy(np.zeros(B, np.int64), like=e))
            return b.ops.cast(t, b.ops.dtype_name(e)), "embedding"
        if not np.issubdtype(arr.dtype, np.integer) or arr.shape not in (ids_shape, (1,) + ids_shape[1:]):
            raise EmbgradError(
                f"layer {site.name!r}: baseline of shape {arr.shape} and dtype {arr.dtype} must be integer "
                f"ids shaped like the inputs' ids {ids_shape} or (1, {', '.join(map(str, ids_shape[1:]))}) "
                f"for all examples, or float vectors shaped like the embeddings {e_shape} or "
                f"(1, {', '.join(map(str, e_shape[1:]))}), or a float constant.")
        base_ids, desc = np.broadcast_to(arr.astype(np.int64), ids_shape).copy(), "ids"
    lo, hi = int(base_ids.min()), int(base_ids.max())
    if lo < 0 or hi >= info.num_rows:
        raise EmbgradError(f"layer {info.name!r}: baseline id {lo if lo < 0 else hi} is out of range for a "
                           f"table of {info.num_rows} rows (valid 0..{info.num_rows - 1}).")
    bt = b.ops.cast(b.ops.from_numpy(base_ids, like=ids), b.ops.dtype_name(ids))
    base = b.embed(info, bt) if site.module is None else eng.composite_output(si, bt)
    return b.ops.cast(base, b.ops.dtype_name(e)), desc


def _typical_row_norm(eng: _Engine, like: Any) -> float:
    """Median L2 norm of the layer's output over up to 4096 evenly spaced table rows."""
    b, V = eng.backend, eng.info.num_rows
    ids = np.unique(np.linspace(0, V - 1, min(V, 4096)).astype(np.int64))
    vec = b.ops.to_numpy(b.embed(eng.info, b.ops.cast(b.ops.from_numpy(ids, like=like), b.ops.dtype_name(like))))
    return float(np.median(np.linalg.norm(vec.astype(np.float64).reshape(len(ids), -1), axis=1)))
