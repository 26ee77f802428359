"""What attribution differentiates: the target outputs (a class index, per-example indices, a
callable, several targets as a dict), evaluated on the model's outputs of one chunk."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import numpy as np

from ..backends import Backend
from ..errors import EmbgradError


def _logits(outputs: Any) -> Any:
    """The tensor a class index refers to: ``.logits`` of a Hugging Face output, ``["logits"]``
    of a mapping, the first element of a tuple, or the outputs themselves."""
    lg = getattr(outputs, "logits", None)
    if lg is not None:
        return lg
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    return outputs


def _short_repr(x: Any, n: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 4] + " ...]"


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _nargs(fn: Callable) -> int:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return 1
    return 2 if len(params) >= 2 and params[1].default is inspect.Parameter.empty else 1


class _Targets:
    """What to differentiate: K scalars per example, evaluated on a chunk's outputs."""

    def __init__(self, spec: Any, batch: int, backend: Backend, what: str = "target"):
        self.backend, self.batch, self.what = backend, batch, what
        self.all_columns = False
        per_example_lists = what == "target"     # jacobian's outputs=[...] lists several outputs
        if isinstance(spec, str) and spec == "all":
            self.items, self.multi, self.all_columns = [], True, True
            self.labels: tuple[str, ...] = ("all",)
            return
        if isinstance(spec, Mapping):
            # {label: target}: several targets, unambiguous whatever their number
            if not spec:
                raise EmbgradError(f"{what}={{}} asks for no output; pass at least one label: target.")
            self.items, self.multi = [self._one(t) for t in spec.values()], True
            self.labels = tuple(str(k) for k in spec)
            return
        if isinstance(spec, (list, tuple)) and per_example_lists:
            # a list is one class per example, whatever its length (its meaning must not change
            # with the batch size); several targets are asked for by a dict
            if not spec or not all(_is_int(t) for t in spec) or len(spec) != batch:
                raise EmbgradError(
                    f"{what}={_short_repr(spec)} is a list of {len(spec)} item(s) for a batch of {batch} "
                    f"examples: a list (or (B,) tensor) gives one class index per example, so it needs "
                    f"{batch} ints. For several targets at once pass a dict {{label: target}}, e.g. "
                    f"{what}={{'negative': 0, 'positive': 1}}.")
            self.items, self.multi = [self._one(np.asarray(spec))], False
        elif isinstance(spec, (list, tuple)):
            if not spec:
                raise EmbgradError(f"{what}=[] asks for no output; pass a class index, a (B,) list of "
                                   "indices, a callable, or a non-empty list of targets.")
            self.items, self.multi = [self._one(t) for t in spec], True
        else:
            self.items, self.multi = [self._one(spec)], False
        self.labels = tuple(lab for _, _, lab in self.items)

    def _one(self, t: Any) -> tuple[str, Any, str]:
        if t is None:
            return ("output", None, "output")
        if callable(t) and not hasattr(t, "shape"):
            return ("callable", (t, _nargs(t)), getattr(t, "__name__", "callable"))
        if _is_int(t):
            return ("index", int(t), f"class {int(t)}")
        if isinstance(t, (bool, np.bool_)) or isinstance(t, (float, str)):
            raise EmbgradError(f"{self.what}={t!r} is not a class index; pass an int, a (B,) list of "
                               "ints, or a callable outputs -> (B,) scalars.")
        a = t if isinstance(t, np.ndarray) else (np.asarray(t) if isinstance(t, (list, tuple))
                                                 else self.backend.ops.to_numpy(t))
        if a.ndim == 0 and np.issubdtype(a.dtype, np.integer):
            return ("index", int(a), f"class {int(a)}")
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or a.shape[0] != self.batch:
            raise EmbgradError(
                f"{self.what} of shape {a.shape} and dtype {a.dtype} does not fit a batch of "
                f"{self.batch} examples: pass one class index, {self.batch} integer indices (one per "
                "example), or a callable outputs -> (B,) scalars.")
        return ("per_example", a.astype(np.int64), "per-example")

    def __call__(self, outputs: Any, idx: np.ndarray, like: Any) -> Any:
        """(n, K) target values of a chunk whose rows are examples ``idx``."""
        b, n = self.backend, int(idx.shape[0])
        if self.all_columns:
            lg = self._logit_matrix(outputs, n, None)
            return b.ops.reshape(lg, (n, -1))
        cols = []
        for kind, val, lab in self.items:
            if kind == "callable":
                fn, nargs = val
                v = fn(outputs, b.ops.from_numpy(idx, like=like)) if nargs == 2 else fn(outputs)
                shape = b.ops.shape(v) if hasattr(v, "shape") else None
                if shape not in ((n,), (n, 1)):
                    raise EmbgradError(
                        f"the {self.what} callable {lab!r} returned {shape if shape is not None else type(v).__name__} "
                        f"for a chunk of {n} examples; it must return one scalar per example, shape ({n},).")
            elif kind == "output":
                lg = self._logit_matrix(outputs, n, None)
                if b.ops.shape(lg)[1] != 1:
                    raise EmbgradError(
                        f"the model returns {b.ops.shape(lg)[1]} outputs per example, so {self.what}=None is "
                        "ambiguous: pass a class index, (B,) indices, or a callable outputs -> (B,).")
                v = lg[:, 0]
            else:
                lg = self._logit_matrix(outputs, n, val)
                col = np.full(n, val, np.int64) if kind == "index" else val[idx]
                v = b.ops.pick(lg, b.ops.from_numpy(col, like=lg))
            cols.append(b.ops.reshape(v, (n, 1)))
        return cols[0] if len(cols) == 1 else b.ops.concat(cols, axis=1)

    def _logit_matrix(self, outputs: Any, n: int, index: Any) -> Any:
        b = self.backend
        lg = _logits(outputs)
        shape = b.ops.shape(lg) if hasattr(lg, "shape") else None
        if shape is None or not shape or shape[0] != n or len(shape) > 2:
            raise EmbgradError(
                f"the model's output {type(outputs).__name__} of shape {shape} is not (batch, classes) "
                f"for a chunk of {n} examples; pass {self.what} as a callable outputs -> (B,) scalars "
                "(e.g. lambda out: out[:, 0, 3]), or forward= returning the logits.")
        if len(shape) == 1:
            lg = b.ops.reshape(lg, (n, 1))
        C = b.ops.shape(lg)[1]
        if index is not None:
            lo, hi = (index, index) if np.ndim(index) == 0 else (int(index.min()), int(index.max()))
            if lo < 0 or hi >= C:
                raise EmbgradError(f"{self.what} class index {hi if hi >= C else lo} is out of range: "
                                   f"the model returns {C} outputs per example (valid 0..{C - 1}).")
        return lg
