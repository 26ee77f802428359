"""PyTorch backend: finds nn.Embedding / nn.EmbeddingBag layers, taps them with forward hooks
(removed afterwards); its tensor primitives are :mod:`embgrad.backends.torch_ops`.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .._weak import WeakIdSet
from ..errors import EmbgradError
from .base import Call, EmbeddingInfo, ModelAdapter, Tap
from .torch_ops import TorchOps

__all__ = ["TorchBackend"]


def _in_backward() -> bool:
    """True inside a backward pass (where checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1

_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}
_warned_max_norm = WeakIdSet()   # layers warned about max_norm (once each)
_warned_bag_freq = WeakIdSet()   # EmbeddingBags warned about scale_grad_by_freq (once each)


def _embedding_types() -> tuple[type, ...]:
    return (nn.Embedding, nn.EmbeddingBag)


def _validate_ids(info: EmbeddingInfo, ids: torch.Tensor, what: str = "ids") -> None:
    """Refuse ids that the lookup would fail on (or, on GPU, assert on opaquely)."""
    if not isinstance(ids, torch.Tensor):
        raise EmbgradError(f"layer {info.name!r}: {what} must be a torch.Tensor of integer ids, "
                           f"got {type(ids).__name__}.")
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise EmbgradError(
            f"layer {info.name!r}: {what} have dtype {ids.dtype}, but an embedding looks up integer "
            f"ids. Convert them with ids.long() (and check they are whole numbers in [0, {info.num_rows})).")
    if ids.is_meta:
        raise EmbgradError(f"layer {info.name!r}: {what} are a meta tensor (shape only, no values), so "
                           "there is nothing to look up; pass ids with values (materialize the model "
                           "and inputs, e.g. model.to_empty(device=...) and real ids).")
    if ids.numel() == 0:
        return    # an empty batch (Poisson sampling makes them): empty results, as PyTorch's forward
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= info.num_rows:
        bad = lo if lo < 0 else hi
        pos = tuple(int(i) for i in (ids == bad).nonzero()[0].tolist())
        raise EmbgradError(
            f"layer {info.name!r}: id {bad} at position {pos} is out of range for a table of "
            f"{info.num_rows} rows (valid ids are 0..{info.num_rows - 1}). Check the tokenizer's "
            "vocabulary size against the embedding's num_embeddings, or map unknown tokens to an UNK id.")


def _check_materialized(info: EmbeddingInfo) -> None:
    """Refuse a table that has no values (built on the meta device)."""
    w = getattr(info.layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_meta:
        raise EmbgradError(
            f"layer {info.name!r}: its weight is a meta tensor (shape {tuple(w.shape)}, no values: the "
            "model was built on the meta device, e.g. by init_empty_weights or device='meta'). "
            "Materialize it first: model.to_empty(device='cpu') and load the weights.")


def _validate_offsets(info: EmbeddingInfo, offsets: Any, n: int) -> None:
    """Refuse EmbeddingBag offsets PyTorch would fail on cryptically or read wrongly."""
    if not isinstance(offsets, torch.Tensor) or offsets.is_floating_point() or offsets.dim() != 1:
        raise EmbgradError(f"layer {info.name!r}: offsets must be a 1-D integer tensor (where each bag "
                           f"starts in the flat ids), got {type(offsets).__name__} "
                           f"{getattr(offsets, 'dtype', '')} {tuple(getattr(offsets, 'shape', ()))}.")
    if offsets.numel() == 0:
        return
    o = offsets.long()
    bad = None
    if int(o[0]) != 0:
        bad = f"the first offset is {int(o[0])}, not 0"
    elif bool((o < 0).any()):
        bad = f"offset {int(o.min())} is negative"
    elif o.numel() > 1 and bool((o[1:] < o[:-1]).any()):
        k = int((o[1:] < o[:-1]).nonzero()[0, 0])
        bad = f"offsets are out of order ({int(o[k])} then {int(o[k + 1])} at positions {k}, {k + 1})"
    elif int(o.max()) > n:
        bad = f"offset {int(o.max())} is past the end of the {n} ids"
    if bad is not None:
        raise EmbgradError(f"layer {info.name!r}: {bad}. EmbeddingBag offsets must start at 0 and never "
                           "decrease (bag b holds ids[offsets[b]:offsets[b + 1]]).")


def _store_grad(out: torch.Tensor, call: Call) -> None:
    """Sets ``call.grad`` to dLoss/d(out) when the user's own backward reaches ``out``. A weak
    reference: a strong one would make an output -> hook -> call -> output cycle through the
    C++ graph that Python's GC cannot see (every capture leaked its outputs and graph)."""
    ref = weakref.ref(call)

    def store(g: torch.Tensor, ref: Any = ref) -> None:
        c = ref()
        if c is not None:
            c.grad = g
    out.register_hook(store)


class _Handles:
    """Hook handles removed together (a tap, or a frozen-rows guard)."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _TorchTap(_Handles, Tap):
    single_use = True

    def grad(self, loss, calls, sources=None, retain_graph=False):
        # differentiate against the gradient edge recorded at lookup time, not the output
        # tensor: an in-place op on the output (`e *= 2`, relu_, Dropout(inplace=True)) moves
        # the tensor's history, the edge keeps the looked-up vectors' own gradient
        outputs = [c.meta.get("edge", c.output) for c in calls]
        views = [v for c in calls for v in c.views]
        inputs = outputs + views + list(sources or [])
        if not any(getattr(c.output, "requires_grad", False) for c in calls):
            raise EmbgradError("nothing to differentiate: no recorded embedding output requires grad.")
        grads = torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
        n = len(outputs)
        k = n
        for c in calls:
            c.view_grads = [torch.zeros_like(v) if g is None else g
                            for v, g in zip(c.views, grads[k:k + len(c.views)], strict=True)]
            k += len(c.views)
        src = list(grads[k:]) if sources is not None else None
        return list(grads[:n]), src


# operations that broadcast their tensor operands elementwise: where a broadcast lookup output
# meets a batched tensor in one of them, it is replaced by a per-example (B, ...) view
_BROADCASTING = frozenset({
    "add", "sub", "mul", "div", "true_divide", "subtract", "multiply", "divide", "rsub",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
    "add_", "sub_", "mul_", "div_"})
# operations with a target shape: ``expand_as(batched)`` broadcasts too
_EXPANDING = frozenset({"expand_as", "expand", "broadcast_to"})
# deterministic operations that keep the lookup's shape and treat its positions alike
# (a copy, cast or device move; arithmetic with unbatched operands): replayed on the
# per-example view when the result meets the batch
_REPLAYABLE = frozenset({"to", "contiguous", "clone", "float", "double", "half", "bfloat16",
                         "type_as", "cuda", "cpu", "neg", "__neg__"}) | _BROADCASTING
# reading metadata is no use of the values
_HARMLESS = frozenset({"__get__", "size", "dim", "numel", "stride", "is_contiguous",
                       "__len__", "__format__", "__repr__", "register_hook", "data_ptr",
                       "element_size", "nelement", "storage_offset", "requires_grad_",
                       "__bool__", "is_floating_point", "get_device", "__hash__", "__eq__"})


def _in_place(name: str) -> bool:
    return name.startswith("__i") or (name.endswith("_") and not name.startswith("__"))


class _BroadcastLookup(torch.Tensor):
    """The output of a lookup whose ids carry no batch (batch size 1, or no batch dimension),
    as the model sees it: a plain alias of the output, except that where an elementwise
    operation broadcasts it against a batched tensor, the operation gets a per-example (B, ...)
    view of the lookup (``Call.views``) instead, so that backward keeps each example's gradient
    apart. Deterministic shape-keeping operations before that (casts, copies, arithmetic with
    unbatched operands) return another such tensor with a recipe that replays them on the view.
    Every other operation gets the plain output and returns plain tensors; such uses are marked
    (``Call.other_use``) for the core to check."""

    _embgrad_call: Any
    _embgrad_bdim: int | None
    _embgrad_root: torch.Tensor
    _embgrad_recipe: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        flat = list(args) + list(kwargs.values())
        mine = [a for a in flat if isinstance(a, _BroadcastLookup)]
        with torch._C.DisableTorchFunctionSubclass():
            def plain(a):
                return a.as_subclass(torch.Tensor) if isinstance(a, _BroadcastLookup) else a

            target = None
            if name in _EXPANDING and args and args[0] is mine[0]:
                rest = args[1:]
                if name == "expand_as" and rest and isinstance(rest[0], torch.Tensor):
                    target = tuple(rest[0].shape)
                elif name == "broadcast_to" and rest:
                    target = tuple(rest[0])
            elif name in _BROADCASTING and not (_in_place(name) and isinstance(args[0], _BroadcastLookup)):
                try:
                    target = tuple(torch.broadcast_shapes(
                        *[tuple(a.shape) for a in flat if isinstance(a, torch.Tensor)]))
                except RuntimeError:
                    target = None
            if target is not None:
                batched = [cls._batched(m, target) for m in mine]
                if all(v is not None for v in batched):
                    if name in _EXPANDING:
                        first = batched[0]
                        assert first is not None
                        return first.expand(target)
                    swap = dict(zip(map(id, mine), batched, strict=True))
                    new_args = [swap.get(id(a), a) for a in args]
                    new_kwargs = {k: swap.get(id(v), v) for k, v in kwargs.items()}
                    return func(*new_args, **new_kwargs)
            out = func(*[plain(a) for a in args], **{k: plain(v) for k, v in kwargs.items()})
            calls = {id(m._embgrad_call): m for m in mine}
            if name in _REPLAYABLE and len(calls) == 1 and not (_in_place(name) and args[0] is mine[0]) \
                    and isinstance(out, torch.Tensor) and out.shape == mine[0].shape:
                # the result still has no batch: replay the op on the per-example view later
                def recipe(view, func=func, args=args, kwargs=kwargs, mine=mine):
                    swap = {id(m): m._embgrad_recipe(view) for m in mine}
                    return func(*[swap.get(id(a), a) for a in args],
                                **{k: swap.get(id(v), v) for k, v in kwargs.items()})
                m = mine[0]
                return _wrap_broadcast(out, m._embgrad_call, m._embgrad_bdim, m._embgrad_root, recipe)
            if name not in _HARMLESS:
                for m in mine:
                    call = m._embgrad_call()
                    if call is not None:
                        call.other_use = True
            return out

    @staticmethod
    def _batched(p: _BroadcastLookup, full: tuple) -> torch.Tensor | None:
        """``p`` computed from a per-example view of its lookup for a broadcast to ``full``,
        or None when ``full`` adds no batch to it."""
        call, bd = p._embgrad_call(), p._embgrad_bdim
        if call is None:
            return None
        root = p._embgrad_root
        if bd is None and len(full) == p.dim() + 1:          # no batch dim: (N, D) vs (B, N, D)
            view = root.expand(full[0], *root.shape)
        elif bd is not None and len(full) == p.dim() and full[bd] > 1:  # (1, T, D) vs (B, T, D)
            view = root.expand(*[full[bd] if i == bd else -1 for i in range(root.dim())])
        else:
            return None
        call.views.append(view)
        call.view_grads.append(None)
        ref, k = weakref.ref(call), len(call.views) - 1

        def store(g, ref=ref, k=k):
            c = ref()
            if c is not None:
                c.view_grads[k] = g
        view.register_hook(store)
        return p._embgrad_recipe(view)


def _wrap_broadcast(out: torch.Tensor, call_ref: Any, bdim: int | None, root: torch.Tensor | None = None,
                    recipe: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        p = out.as_subclass(_BroadcastLookup)
        if root is None:
            root = out.as_subclass(torch.Tensor) if isinstance(out, _BroadcastLookup) else out.view_as(out)
    p._embgrad_call = call_ref
    p._embgrad_bdim = bdim
    p._embgrad_root = root
    p._embgrad_recipe = recipe if recipe is not None else (lambda view: view)
    return p


class TorchBackend(ModelAdapter):
    name = "torch"
    ops = TorchOps()
    no_grad_hint = "torch.no_grad() / inference mode"
    framework_module = "torch"
    searched_types = "torch.nn.Embedding and torch.nn.EmbeddingBag modules (via named_modules())"

    def is_appropriate(self, obj: Any) -> bool:
        return isinstance(obj, (torch.Tensor, nn.Module))

    # ------------------------------------------------------------------ surgery
    def find_embeddings(self, model: Any) -> dict[str, EmbeddingInfo]:
        if not isinstance(model, nn.Module):
            raise EmbgradError(f"expected a torch.nn.Module, got {type(model).__name__}.")
        # A table is tied when its Parameter is reachable from a module that is not the
        # embedding itself (e.g. a language-model head sharing the input table).
        all_modules = list(model.named_modules(remove_duplicate=False))
        embeddings = {id(m) for _, m in all_modules if isinstance(m, _embedding_types())}
        if not embeddings:
            return {}
        # which modules hold each embedding weight (directly, not through a child)
        holders: dict[int, set[int]] = {}
        for _, mod in all_modules:
            for p in mod._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), set()).add(id(mod))
        infos: dict[str, EmbeddingInfo] = {}
        for mname, mod in model.named_modules():
            if id(mod) not in embeddings:
                continue
            name = mname or type(mod).__name__
            w = mod.weight
            tied = bool(holders.get(id(w), set()) - {id(mod)})
            # the modules that multiply by the same table: nn.Linear heads (GPT-2's lm_head, BERT's
            # MLM decoder); other holders are found in the autograd graph when they use it
            projections = tuple((pn or type(pm).__name__, pm) for pn, pm in model.named_modules()
                                if isinstance(pm, nn.Linear) and pm.weight is w)
            bag = isinstance(mod, nn.EmbeddingBag)
            options = {
                "max_norm": mod.max_norm,
                "sparse": bool(mod.sparse),
                "projections": projections,
            }
            if bag:
                options["mode"] = mod.mode
                options["include_last_offset"] = bool(mod.include_last_offset)
            infos[name] = EmbeddingInfo(
                name=name, layer=mod, num_rows=int(mod.num_embeddings), dim=int(mod.embedding_dim),
                kind="bag" if bag else "embedding", pad_id=mod.padding_idx, pad_receives_grad=False,
                padding="" if mod.padding_idx is None else f"padding_idx={mod.padding_idx}",
                freq_scaled=bool(mod.scale_grad_by_freq), tied=tied,
                frozen=not w.requires_grad, weight=w, options=options)
        return infos

    def install_forward_tap(self, model, on_start, on_end):
        def pre(mod, args, kwargs):
            if not _in_backward():
                first = next((x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)),
                             None)
                on_start(tuple(first.shape) if first is not None else None)
            return None

        def post(mod, args, kwargs, output):
            if not _in_backward():
                on_end()
            return None

        return _Handles([model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
                         model.register_forward_hook(post, with_kwargs=True, always_call=True)])

    def sequence_first_layers(self, model):
        seq_types = (nn.RNNBase, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                     nn.MultiheadAttention)
        def batch_first(m: nn.Module) -> bool:
            if hasattr(m, "batch_first"):
                return bool(m.batch_first)
            attn = getattr(m, "self_attn", None)   # TransformerEncoderLayer / DecoderLayer
            return bool(getattr(attn, "batch_first", False))

        return [name or type(m).__name__ for name, m in model.named_modules()
                if isinstance(m, seq_types) and not batch_first(m)]

    def in_backward(self):
        return _in_backward()

    def compiled_hint(self, model):
        if hasattr(model, "_orig_mod") or type(model).__name__ == "OptimizedModule":
            return (" The model is a torch.compile'd module (torch.compile): its compiled graph does "
                    "not run the hooks embgrad adds after compilation, so the lookups inside it are "
                    "invisible. Capture and run the original module inside the block: "
                    "`with embgrad.capture(model._orig_mod) as cap: loss = model._orig_mod(x)...`.")
        return ""

    broadcast_views = True
    broadcast_seen = "it sees elementwise +, -, *, / on the output itself, after copies and casts"

    def expand_hint(self, batch_size: Any) -> str:
        return f"ids.expand({batch_size}, -1)"

    def install_tap(self, model, infos, on_call, active=None):
        handles = []
        try:
            for info in infos:
                mod = info.layer
                handles.append(mod.register_forward_pre_hook(self._pre_hook(info, active), with_kwargs=True))
                handles.append(mod.register_forward_hook(self._post_hook(info, on_call, active),
                                                         with_kwargs=True))
                for _, proj in info.options.get("projections", ()):
                    handles.append(proj.register_forward_hook(self._projection_hook(info, on_call, active),
                                                              with_kwargs=True))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return _TorchTap(handles)

    def submodules(self, model):
        return {name: m for name, m in model.named_modules() if name} if isinstance(model, nn.Module) else {}

    def install_output_tap(self, module, on_output, active=None):
        def hook(mod, args, output):
            if (active is not None and not active()) or _in_backward():
                return None        # another context's forward, or a checkpointing recomputation
            if not isinstance(output, torch.Tensor):
                raise EmbgradError(
                    f"module {type(mod).__name__} returns {type(output).__name__}, not a tensor (B, T, D) of "
                    "token vectors: attribute to a module whose output is the tokens' vectors (e.g. a Hugging "
                    "Face model's embeddings module) or to an embedding layer.")
            return on_output(output)
        return _TorchTap([module.register_forward_hook(hook)])

    def _pre_hook(self, info: EmbeddingInfo, active: Callable[[], bool] | None = None) -> Callable[..., Any]:
        def hook(mod, args, kwargs):
            if active is not None and not active():
                return None        # another thread's / context's forward: not ours
            ids = args[0] if args else kwargs.get("input")
            _check_materialized(info)
            _validate_ids(info, ids, "input ids")
            if info.kind == "bag":
                offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
                if offsets is not None and ids.dim() == 1:
                    _validate_offsets(info, offsets, ids.numel())
                if info.freq_scaled and _warned_bag_freq.add_new(mod):
                    warnings.warn(
                        f"EmbeddingBag {info.name!r} has scale_grad_by_freq=True: embgrad divides each "
                        "row's gradient by how often the row occurs in the mini-batch (the definition "
                        "PyTorch documents, and what nn.Embedding computes); PyTorch's EmbeddingBag "
                        "backward divides some rows by other counts (ids [[1, 2], [1, 3]] in sum mode: "
                        "row 2 gets 0.5, where the definition gives 1.0), so weight_grad can differ from "
                        "the .grad PyTorch writes.", stacklevel=3)
            if info.options.get("max_norm") is not None and _warned_max_norm.add_new(mod):
                warnings.warn(
                    f"embedding {info.name!r} has max_norm={info.options['max_norm']}: PyTorch "
                    "renormalises the looked-up rows of the weight IN PLACE during forward. embgrad "
                    "does not undo that (the model is otherwise untouched); its gradients are those "
                    "of the renormalised table, as PyTorch's own.", stacklevel=3)
            return None
        return hook

    def _post_hook(self, info: EmbeddingInfo, on_call: Callable[[Call], Any],
                   active: Callable[[], bool] | None = None) -> Callable[..., Any]:
        def hook(mod, args, kwargs, output):
            if active is not None and not active():
                return None        # another thread's / context's forward: not ours
            if _in_backward():
                # a gradient-checkpointing recomputation (torch.utils.checkpoint, Hugging Face
                # gradient_checkpointing_enable()) re-runs the lookup inside backward: the lookup
                # was recorded in the forward already
                return None
            ids = args[0] if args else kwargs.get("input")
            grad_enabled = torch.is_grad_enabled()
            out = output
            if grad_enabled and not out.requires_grad:
                # frozen table: make the output a leaf we can differentiate against
                out = out.detach().requires_grad_(True)
            if info.kind == "bag":
                call = self._bag_call(info, mod, args, kwargs, ids, out)
            else:
                call = Call(info=info, ids=ids, output=out, grad_enabled=grad_enabled)
            if grad_enabled:
                if out.grad_fn is not None:
                    # the looked-up vectors' own gradient even if the output is then changed
                    # in place (e *= 2, relu_, Dropout(inplace=True))
                    call.meta["edge"] = get_gradient_edge(out)
                _store_grad(out, call)
            replaced = on_call(call)
            if replaced is not None:
                # the model goes on with the replacement: the call's output (what gradients()
                # differentiates against) is the replacement, a leaf if it records no gradient
                if grad_enabled and not replaced.requires_grad:
                    replaced = replaced.detach().requires_grad_(True)
                call.output = replaced
                call.meta.pop("edge", None)
                if grad_enabled:
                    if replaced.grad_fn is not None:
                        call.meta["edge"] = get_gradient_edge(replaced)
                    _store_grad(replaced, call)
                return replaced
            if call.batch_free is not None and grad_enabled:
                # ids without a batch: the output may be broadcast over the batch; give each
                # broadcast a per-example view (see _BroadcastLookup)
                bdim = None if call.batch_free == "absent" else call.batch_dim
                return _wrap_broadcast(out, weakref.ref(call), bdim)
            return out if out is not output else None
        return hook

    def _projection_hook(self, info: EmbeddingInfo, on_call: Callable[[Call], Any],
                         active: Callable[[], bool] | None = None) -> Callable[..., Any]:
        """Records a call of an nn.Linear that shares the table: its input h and its output
        (logits = h @ W.T + bias), whose gradient is the logit gradient of the tied part."""
        def hook(mod, args, kwargs, output):
            if (active is not None and not active()) or _in_backward():
                return None        # another thread's forward, or a checkpointing recomputation
            h = args[0] if args else kwargs.get("input")
            grad_enabled = torch.is_grad_enabled() and output.requires_grad
            call = Call(info=info, ids=None, output=output, grad_enabled=grad_enabled, role="projection",
                        meta={"input": h.detach(), "node": output.grad_fn,
                              "input_node": h.grad_fn, "version": output._version})
            if grad_enabled:
                _store_grad(output, call)
            on_call(call)
            return None
        return hook

    table_check = "graph"

    def accumulated_grad(self, info):
        w = self.table_weight(info)
        w = w if isinstance(w, torch.Tensor) else getattr(w, "value", None)
        return w.grad if isinstance(w, torch.Tensor) and w.requires_grad else None

    def table_uses(self, loss, infos, calls):
        """Walks the autograd graph from ``loss``: an edge into a table's AccumulateGrad node
        that does not come through a recorded lookup or tied projection is a use embgrad does
        not see (e.g. ``h @ emb.weight.T`` written by hand)."""
        weights: dict[int, list[EmbeddingInfo]] = {}
        for info in infos:
            w = self.table_weight(info)
            w = w if isinstance(w, torch.Tensor) else getattr(w, "value", None)   # a Keras variable
            if isinstance(w, torch.Tensor) and w.requires_grad:
                weights.setdefault(id(w), []).append(info)
        if not weights or loss is None or loss.grad_fn is None:
            return {}
        stop: dict[Any, list] = {}
        for c in calls:
            if "edge" in c.meta:          # the lookup's own node, also after in-place ops on its output
                node = c.meta["edge"].node
            else:
                node = c.meta.get("node") if "node" in c.meta else getattr(c.output, "grad_fn", None)
            if node is None:
                continue
            cont = stop.setdefault(node, [])
            if c.role == "projection" and c.meta.get("input_node") is not None:
                cont.append(c.meta["input_node"])
        found: dict[int, set[str]] = {}
        seen: set = set()
        stack = [loss.grad_fn]
        while stack:
            n = stack.pop()
            if n is None or n in seen:
                continue
            seen.add(n)
            if n in stop:
                stack.extend(stop[n])
                continue
            for nxt, _ in n.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)
                if var is not None:
                    if id(var) in weights:
                        found.setdefault(id(var), set()).add(type(n).__name__)
                    continue
                stack.append(nxt)
        out = {}
        for wid, names in found.items():
            for info in weights[wid]:
                out[info.name] = "through autograd nodes " + ", ".join(sorted(names))
        return out

    def _bag_call(self, info: EmbeddingInfo, mod: Any, args: tuple, kwargs: dict, ids: Any, out: Any) -> Call:
        """Turn an EmbeddingBag call into per-entry ids (B, L) and a per-entry gradient map."""
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
        mode = info.options["mode"]
        dev = ids.device
        with torch.no_grad():
            if ids.dim() == 2:
                B, L = ids.shape
                padded = ids.long()
                valid = torch.ones_like(padded, dtype=torch.bool)
                w = psw if psw is not None else None
            else:
                if offsets is None:
                    raise EmbgradError(f"layer {info.name!r}: 1-D input to an EmbeddingBag needs offsets.")
                offs = offsets.long()
                n = ids.numel()
                if info.options.get("include_last_offset"):
                    starts, ends = offs[:-1], offs[1:]
                else:
                    starts = offs
                    ends = torch.cat([offs[1:], torch.tensor([n], device=dev)])
                lens = ends - starts
                B = int(starts.numel())
                L = int(lens.max()) if B else 0
                pos = torch.arange(L, device=dev)
                valid = pos[None, :] < lens[:, None]
                gather = (starts[:, None] + pos[None, :]).clamp(max=max(n - 1, 0))
                padded = torch.where(valid, ids.long()[gather], torch.full_like(gather, -1))
                w = torch.where(valid, psw[gather], torch.zeros((), dtype=psw.dtype, device=dev)) \
                    if psw is not None else None
            if mod.padding_idx is not None:
                valid = valid & (padded != mod.padding_idx)
            counts = valid.sum(1).clamp(min=1)
            max_idx: Any = None
            if mode == "max":
                weight = mod.weight.detach()
                vecs = weight[padded.clamp(min=0)]                        # (B, L, D)
                vecs = vecs.masked_fill(~valid[..., None], float("-inf"))
                max_pos = vecs.argmax(1)                                  # (B, D)
                max_idx = max_pos
        frozen_w = w.detach() if w is not None else None

        def token_grad(g: torch.Tensor) -> torch.Tensor:
            # g: dLoss/d(bag output), (B, D) -> dLoss/d(each looked-up vector), (B, L, D)
            g = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
            if mode == "max":
                onehot = torch.zeros(B, L, g.shape[-1], dtype=g.dtype, device=g.device)
                onehot.scatter_(1, max_idx[:, None, :], 1.0)
                tg = onehot * g[:, None, :]
            else:
                tg = g[:, None, :].expand(B, L, g.shape[-1])
                if frozen_w is not None:
                    tg = tg * frozen_w[..., None].to(tg.dtype)
                if mode == "mean":
                    tg = tg / counts[:, None, None].to(tg.dtype)
            return tg * valid[..., None].to(tg.dtype)

        return Call(info=info, ids=padded, output=out, valid=valid, token_grad=token_grad,
                    grad_enabled=torch.is_grad_enabled(), meta={"bag_counts": counts})

    def coupling_layers(self, model):
        from torch.nn.modules.batchnorm import _BatchNorm
        return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]

    def stochastic_layers(self, model):
        from torch.nn.modules.dropout import _DropoutNd
        return [n for n, m in model.named_modules() if isinstance(m, _DropoutNd) and m.training and m.p > 0]

    def scalar_loss(self, loss):
        if not isinstance(loss, torch.Tensor):
            raise EmbgradError(f"loss must be a scalar torch.Tensor, got {type(loss).__name__}.")
        if loss.numel() != 1:
            raise EmbgradError(
                f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}; reduce it with "
                ".sum() or .mean() and pass loss_reduction='sum' or 'mean' accordingly.")
        if not loss.requires_grad:
            raise EmbgradError(
                "loss does not require grad: it was computed under torch.no_grad() / inference_mode, "
                "or from detached tensors, so no gradient reaches the embeddings.")
        return loss.reshape(())

    # ------------------------------------------------------------------ differentiation
    @staticmethod
    def _watched(fn):
        """Run ``fn(watch)`` with grad on: (y, the one leaf x that went through ``watch``)."""
        watched: list[torch.Tensor] = []

        def watch(t: torch.Tensor) -> torch.Tensor:
            leaf = t.detach().requires_grad_(True)
            watched.append(leaf)
            return leaf

        # gradients on also under the caller's torch.no_grad() (as Captum): the whole pass,
        # the reductions before each backward included
        with torch.enable_grad():
            y = fn(watch)
        if len(watched) != 1:
            raise EmbgradError(f"value_and_grads: fn watched {len(watched)} tensors, expected exactly one.")
        return y, watched[0]

    def value_and_grads(self, fn):
        y, x = self._watched(fn)
        k_out = int(y.shape[1])
        grads = []
        with torch.enable_grad():          # y[:, k].sum() too, under the caller's no_grad()
            for k in range(k_out):
                g = None
                if y.requires_grad:
                    (g,) = torch.autograd.grad(y[:, k].sum(), x, retain_graph=k < k_out - 1,
                                               allow_unused=True)
                grads.append(torch.zeros_like(x) if g is None else g)
        return y.detach(), grads

    def value_and_grads_batched(self, fn):
        y, x = self._watched(fn)
        n, k_out = int(y.shape[0]), int(y.shape[1])
        if not y.requires_grad:
            return y.detach(), [torch.zeros_like(x) for _ in range(k_out)]
        eye = torch.eye(k_out, dtype=y.dtype, device=y.device).reshape(k_out, 1, k_out).expand(k_out, n, k_out)
        (g,) = torch.autograd.grad(y, x, eye, is_grads_batched=True, allow_unused=True)
        if g is None:
            return y.detach(), [torch.zeros_like(x) for _ in range(k_out)]
        return y.detach(), list(g.unbind(0))

    def embed(self, info, ids):
        with torch.no_grad():
            return info.layer(ids)

    # ------------------------------------------------------------------ tables (embgrad.table)
    def table_variable(self, info):
        return info.layer.weight

    def table_gather(self, info, rows, effective=False):
        _check_materialized(info)
        return info.layer.weight.detach().index_select(0, rows)

    def table_write(self, info, rows, values):
        w = info.layer.weight
        with torch.no_grad():
            w.index_copy_(0, torch.from_numpy(rows).to(w.device),
                          torch.from_numpy(np.ascontiguousarray(values)).to(device=w.device, dtype=w.dtype))

    def table_quantized(self, info):
        w = info.layer.weight
        if w.is_meta:
            return (f"its weight is a meta tensor (shape {tuple(w.shape)}, no values: built on the meta "
                    "device); materialize it first (model.to_empty(device='cpu'), then load the weights)")
        if w.is_quantized or not w.is_floating_point():
            return (f"its weight has dtype {w.dtype} (quantized); write the float table before "
                    "quantizing the model")
        return None

    def table_freeze(self, info, rows, optimizer=None):
        w = info.layer.weight
        idx = torch.from_numpy(rows).to(w.device)
        frozen = torch.zeros(info.num_rows, dtype=torch.bool, device=w.device)
        frozen[idx] = True

        def mask(g):  # runs before .grad accumulates: frozen rows get exactly zero
            if g.layout == torch.sparse_coo:
                g = g.coalesce()
                vals = g.values().masked_fill(frozen[g.indices()[0]][:, None], 0)
                return torch.sparse_coo_tensor(g.indices(), vals, g.shape, is_coalesced=True,
                                               check_invariants=False)
            return g.masked_fill(frozen[:, None], 0)

        if optimizer is not None:
            self._check_optimizer(info, optimizer)
        handles = [w.register_hook(mask)]
        # Updates that do not come from this step's gradient (momentum and Adam moments built
        # up before the freeze, weight decay, AdamW's decoupled decay) still move rows whose
        # gradient is zero: the rows are put back after every optimizer step that updates this
        # table, bit for bit. With ``optimizer`` given, on its steps; without, on the steps of
        # any torch optimizer holding the weight (torch's global optimizer step hooks, removed
        # with the guard).
        saved: dict[int, torch.Tensor] = {}
        wref = weakref.ref(w)          # the hooks must not keep the table alive

        def holds(opt: torch.optim.Optimizer, t: torch.Tensor) -> bool:
            return any(p is t for group in opt.param_groups for p in group["params"])

        def snapshot(opt, args, kwargs):
            t = wref()
            if t is not None and (optimizer is not None or holds(opt, t)):
                saved[id(opt)] = t.detach().index_select(0, idx)

        def restore(opt, args, kwargs):
            rows, t = saved.pop(id(opt), None), wref()
            if rows is not None and t is not None:
                with torch.no_grad():
                    t.index_copy_(0, idx, rows)

        if optimizer is not None:
            handles += [optimizer.register_step_pre_hook(snapshot),
                        optimizer.register_step_post_hook(restore)]
        else:
            from torch.optim import optimizer as optim_mod
            global_hooks = _Handles([optim_mod.register_optimizer_step_pre_hook(snapshot),
                                     optim_mod.register_optimizer_step_post_hook(restore)])
            weakref.finalize(w, global_hooks.remove)   # gone with the table, if never removed
            handles.append(global_hooks)
        return _Handles(handles)

    def _check_optimizer(self, info, optimizer):
        """EmbgradError unless ``optimizer`` is a torch optimizer that updates this table."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise EmbgradError(f"layer {info.name!r}: optimizer must be a torch.optim.Optimizer, "
                               f"got {type(optimizer).__name__}.")
        w = info.layer.weight
        if not any(p is w for group in optimizer.param_groups for p in group["params"]):
            raise EmbgradError(
                f"layer {info.name!r}: the optimizer {type(optimizer).__name__} does not update this "
                "table's weight, so there is nothing to guard; pass the optimizer that trains it.")

