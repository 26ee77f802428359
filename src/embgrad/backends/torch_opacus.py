"""embgrad's per-example samplers for ``nn.Embedding`` and ``nn.EmbeddingBag`` under Opacus.

Opacus (https://opacus.ai) computes per-example gradients ("grad samplers", hooks mode) or
their norms ("norm samplers", ghost clipping / "fast gradient clipping") layer by layer from the
layer's captured inputs ("activations") and the gradient of its output ("backprops"), and looks
the function up by module type in ``GradSampleHooks.GRAD_SAMPLERS`` and
``GradSampleHooksFastGradientClipping.NORM_SAMPLERS/GRAD_SAMPLERS``. Opacus 1.6's own embedding
samplers (``opacus/grad_sample/embedding.py``, ``embedding_norm_sample.py``) give the padding row
a per-example gradient, have no EmbeddingBag norm sampler, ignore ``max`` mode and
``per_sample_weights``, size an EmbeddingBag's batch from its last input, and build a dense
(B, V, D) tensor per bag in a Python loop.

:func:`register_opacus` puts embgrad's samplers in those registries (and wraps Opacus's
activation hook to record each bag's true batch size and check keyword ``per_sample_weights``);
leaving the context (or ``.remove()``) puts back exactly what was there. It also wraps Opacus's
``nn.Linear`` norm sampler, for the one case it needs: a Linear tied to an embedding table. Per-example gradients
come from embgrad's sparse coalescing (:func:`embgrad.sparse.coalesce_lookups`): norms cost
O(B·T·D), never O(B·V·D); the hooks-mode grad sampler must hand Opacus a dense (B, V, D) tensor
(Opacus reshapes and contracts it; a sparse tensor is not accepted there).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import EmbgradError
from ..sparse import ExampleGrads, coalesce_lookups
from . import get_backend

__all__ = ["OpacusRegistration", "embedding_example_grads", "register_opacus"]


def _layer_name(layer: Any) -> str:
    return f"{type(layer).__name__}({layer.num_embeddings}, {layer.embedding_dim})"


def _flat_embedding(layer: nn.Embedding, activations: list, backprops: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    if layer.scale_grad_by_freq:
        raise EmbgradError(
            f"{_layer_name(layer)} has scale_grad_by_freq=True: its gradient divides by how often "
            "each id occurs in the whole batch, so one example's gradient depends on the others "
            "and per-example clipping is not defined. Set scale_grad_by_freq=False for DP training.")
    ids = activations[0]
    B = ids.shape[0] if ids.dim() else 1
    D = layer.embedding_dim
    if tuple(backprops.shape[:-1]) != tuple(ids.shape):
        raise EmbgradError(
            f"{_layer_name(layer)}: ids of shape {tuple(ids.shape)} but the gradient of its output "
            f"has shape {tuple(backprops.shape)}; embgrad's Opacus sampler needs the ids' first "
            "dimension to be the batch.")
    flat = ids.reshape(-1).to(torch.int64)
    per = flat.shape[0] // max(B, 1)
    ex = torch.arange(B, device=flat.device).repeat_interleave(per)
    g = backprops.reshape(-1, D)
    if layer.padding_idx is not None:   # torch gives the padding row no gradient
        keep = flat != layer.padding_idx
        flat, ex, g = flat[keep], ex[keep], g[keep]
    return ex, flat, g, B


def _flat_bag(layer: nn.EmbeddingBag, activations: list, backprops: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    if layer.scale_grad_by_freq:
        raise EmbgradError(f"{_layer_name(layer)} has scale_grad_by_freq=True: per-example "
                           "clipping is not defined (see nn.Embedding); set it to False.")
    inp = activations[0]
    offsets = activations[1] if len(activations) > 1 else None
    psw = activations[2] if len(activations) > 2 else None
    D = layer.embedding_dim
    if inp.dim() == 2:
        B, L = inp.shape
        flat = inp.reshape(-1).to(torch.int64)
        bag = torch.arange(B, device=inp.device).repeat_interleave(L)
        valid = torch.ones_like(flat, dtype=torch.bool)
    elif inp.dim() == 1:
        if offsets is None:
            raise EmbgradError(f"{_layer_name(layer)}: 1-D input needs offsets.")
        offsets = offsets.to(torch.int64)
        starts = offsets[:-1] if layer.include_last_offset else offsets
        B = starts.shape[0]
        flat = inp.to(torch.int64)
        n = torch.arange(flat.shape[0], device=flat.device)
        bag = torch.searchsorted(starts, n, right=True) - 1
        valid = bag >= 0
        if layer.include_last_offset:
            valid &= n < offsets[-1]
        bag = bag.clamp(min=0)
    else:
        raise EmbgradError(f"{_layer_name(layer)}: input must be 1-D (with offsets) or 2-D, got "
                           f"shape {tuple(inp.shape)}.")
    if tuple(backprops.shape) != (B, D):
        raise EmbgradError(f"{_layer_name(layer)}: {B} bags but the output gradient has shape "
                           f"{tuple(backprops.shape)}.")
    if layer.padding_idx is not None:
        valid &= flat != layer.padding_idx
    g = backprops[bag]                                            # (N, D)
    if layer.mode == "sum":
        if psw is not None:
            g = g * psw.reshape(-1, 1).to(g.dtype)
    elif layer.mode == "mean":
        count = torch.zeros(B, dtype=g.dtype, device=g.device).index_add_(0, bag, valid.to(g.dtype))
        g = g / count.clamp(min=1)[bag].reshape(-1, 1)
    elif layer.mode == "max":
        # the gradient of dimension d goes to the first entry of the bag holding its maximum
        w = layer.weight.detach()[flat].to(g.dtype)
        w = torch.where(valid.reshape(-1, 1), w, torch.full_like(w, -torch.inf))
        idx = bag.reshape(-1, 1).expand(-1, D)
        top = torch.full((B, D), -torch.inf, dtype=w.dtype, device=w.device).scatter_reduce(
            0, idx, w, "amax", include_self=True)
        N = flat.shape[0]
        pos = torch.arange(N, device=w.device).reshape(-1, 1).expand(-1, D)
        cand = torch.where((w == top[bag]) & valid.reshape(-1, 1), pos, torch.full_like(pos, N))
        first = torch.full((B, D), N, dtype=pos.dtype, device=w.device).scatter_reduce(
            0, idx, cand, "amin", include_self=True)
        g = g * (pos == first[bag]).to(g.dtype)
    else:  # pragma: no cover - torch knows only these modes
        raise EmbgradError(f"{_layer_name(layer)}: unknown mode {layer.mode!r}.")
    return bag[valid], flat[valid], g[valid], B


def embedding_example_grads(layer: Any, activations: list, backprops: torch.Tensor) -> ExampleGrads:
    """Per-example sparse gradients of ``layer.weight`` from Opacus's activations and backprops.

    Args:
        layer: an ``nn.Embedding`` or ``nn.EmbeddingBag``.
        activations: the layer's positional inputs as Opacus captured them: ``[ids]`` (B, ...)
            int; for a bag ``[input, offsets?, per_sample_weights?]``.
        backprops: dLoss/d(output), (B, ..., D) or (B, D) for a bag, already scaled by Opacus
            to the per-example (sum) loss.
    Returns:
        :class:`~embgrad.ExampleGrads` (B examples, float32 or float64 values).
    Raises:
        EmbgradError: shapes that do not match, ``scale_grad_by_freq``, a 1-D bag input
            without offsets.
    """
    if isinstance(layer, nn.EmbeddingBag):
        ex, ids, g, B = _flat_bag(layer, activations, backprops)
    else:
        ex, ids, g, B = _flat_embedding(layer, activations, backprops)
    b = get_backend(g)
    out = coalesce_lookups(b, ex, ids, g, int(layer.num_embeddings), B, True)
    assert isinstance(out, ExampleGrads)
    return out


def _norm_sampler(layer: Any, activations: list, backprops: torch.Tensor) -> dict:
    """Ghost clipping: per-example gradient norms (B,) of the table, never dense."""
    if not layer.weight.requires_grad:
        return {}
    if backprops.shape[0] == 0:
        return {layer.weight: torch.zeros(0, dtype=backprops.dtype, device=backprops.device)}
    eg = embedding_example_grads(layer, activations, backprops)
    if layer.weight in _WANTED:
        _PENDING.setdefault(layer.weight, []).append(eg)
    norms = eg.norms().to(backprops.dtype)
    if layer.weight in _TIED:
        return {layer.weight: _tied_part(layer.weight, "lookup", (layer, activations, backprops, norms))}
    return {layer.weight: norms}


def _grad_sampler(layer: Any, activations: list, backprops: torch.Tensor) -> dict:
    """Hooks mode: per-example gradients (B, V, D), dense because Opacus contracts them so."""
    if not layer.weight.requires_grad:
        return {}
    if backprops.shape[0] == 0:
        V, D = layer.weight.shape
        return {layer.weight: torch.zeros((0, V, D), dtype=backprops.dtype, device=backprops.device)}
    eg = embedding_example_grads(layer, activations, backprops)
    if layer.weight in _WANTED:
        _PENDING.setdefault(layer.weight, []).append(eg)
    dense = eg.to_dense(max_bytes=1 << 62)
    return {layer.weight: dense.to(backprops.dtype)}


#: table parameter -> the ExampleGrads of its lookups since the last optimizer step (read by the
#: sparse-noise optimizer for DP-AdaFEST's counts; weak keys: nothing outlives the model)
_PENDING: Any = WeakIdKeyDictionary()   # keyed by identity: tensors compare elementwise
#: the table parameters a sparse-noise optimizer noises (only their lookups are recorded)
_WANTED: Any = WeakIdKeyDictionary()


# ------------------------------------------------------------------ tied tables in ghost mode
#: tied table parameter -> {"lookup": ..., "linear": ...}: the two uses' parts of this backward
_TIED: Any = WeakIdKeyDictionary()


def _check_tied_pair(gsm: Any, module: nn.Module, names: list) -> None:
    """A tied table works in ghost mode when it is one nn.Embedding and one nn.Linear (an
    output projection, e.g. GPT-2's lm_head): the per-example norm of the whole table is then
    ||A_b + L_b|| with the cross term computed from both uses. Anything else is refused."""
    root = gsm._module
    users = [m for m in root.modules() if any(p is module.weight for p in m.parameters(recurse=False))]
    kinds = sorted(type(m).__name__ for m in users)
    if kinds != ["Embedding", "Linear"] or not isinstance(module, nn.Embedding):
        raise EmbgradError(
            f"{_layer_name(module)}: its weight is shared by {names} (a tied table, used by "
            f"{kinds}). In ghost mode embgrad combines one nn.Embedding with one nn.Linear; for other "
            "tyings use grad_sample_mode='hooks' (exact: Opacus adds the per-example gradients of "
            "all uses), or untie the weights.")
    if module.weight not in _TIED:
        _TIED[module.weight] = {}


def _tied_part(weight: Any, kind: str, part: tuple) -> torch.Tensor:
    """Record one use's part; when both are there, the whole table's per-example norms
    sqrt(||A_b||² + ||L_b||² + 2<A_b, L_b>) (A: lookups, L: the projection); until then the
    part's own norms (Opacus keeps the last value written, the combined one)."""
    parts = _TIED[weight]
    if kind in parts:
        raise EmbgradError("a tied table was used more than once by the same layer in one forward; "
                           "use grad_sample_mode='hooks'.")
    parts[kind] = part
    if len(parts) < 2:
        return part[-1]
    layer, acts, o, a_norm = parts.pop("lookup")
    h, delta, l_norm = parts.pop("linear")
    ids = acts[0].reshape(acts[0].shape[0], -1).to(torch.int64)
    o = o.reshape(ids.shape[0], ids.shape[1], -1)
    if layer.padding_idx is not None:           # the padding row gets no gradient from lookups
        o = o * (ids != layer.padding_idx).unsqueeze(-1).to(o.dtype)
    if delta.dim() == 2:                        # (B, V) and (B, D): one projection per example
        delta, h = delta[:, None, :], h[:, None, :]
    delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])
    h = h.reshape(h.shape[0], -1, h.shape[-1]).to(o.dtype)
    S, T = delta.shape[1], ids.shape[1]
    picked = delta.gather(2, ids[:, None, :].expand(-1, S, T))          # δ_bs[ids_bt]: (B, S, T)
    inner = torch.bmm(h, o.transpose(1, 2))                             # <h_bs, o_bt>: (B, S, T)
    cross = (picked * inner).sum((1, 2))
    total = a_norm.to(cross.dtype) ** 2 + l_norm.to(cross.dtype) ** 2 + 2 * cross
    return torch.sqrt(total.clamp(min=0))


def _wrap_linear_norm(original: Any) -> Any:
    def linear_norm_sampler(layer: Any, activations: list, backprops: torch.Tensor) -> dict:
        ret = original(layer, activations, backprops)
        if layer.weight in _TIED and layer.weight in ret:
            ret[layer.weight] = _tied_part(layer.weight, "linear",
                                           (activations[0], backprops, ret[layer.weight]))
        return ret
    return linear_norm_sampler


# ------------------------------------------------------------------ the activation-hook wrapper
_TIED_CACHE: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _shared_weights(gsm: Any) -> dict:
    """id(parameter) -> the names it is registered under, for parameters registered twice."""
    root = getattr(gsm, "_module", None)
    if root is None:
        return {}
    try:
        cached = _TIED_CACHE.get(gsm)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    names: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    shared = {k: v for k, v in names.items() if len(v) > 1}
    try:
        _TIED_CACHE[gsm] = shared
    except TypeError:
        pass
    return shared


def _wrap_capture(original: Any, ghost_class: type) -> Any:
    def capture_activations_hook(self: Any, module: Any, forward_input: Any, forward_output: Any) -> Any:
        if type(module) in (nn.Embedding, nn.EmbeddingBag):
            ghost = isinstance(self, ghost_class) and getattr(self, "use_ghost_clipping", False)
            if ghost and module.weight.requires_grad:
                tied = _shared_weights(self).get(id(module.weight))
                if tied:
                    _check_tied_pair(self, module, tied)
            if isinstance(module, nn.EmbeddingBag) and torch.is_grad_enabled() and module.training:
                _check_bag_call(module, forward_input, forward_output)
        broadcast = 1
        if isinstance(module, nn.Embedding) and forward_input[0].dim() >= 2 \
                and forward_input[0].shape[0] == 1 and module.weight.requires_grad:
            broadcast = _batch_of_this_forward(self, module)
        n_before = len(getattr(module, "activations", None) or [])
        w = getattr(module, "weight", None)
        bypass = isinstance(w, torch.Tensor) and w in _TIED and getattr(w, "_forward_counter", 0) >= 1
        if bypass:   # Opacus refuses a second use of a parameter in ghost mode; embgrad combines them
            w._forward_counter -= 1  # type: ignore[union-attr]
        try:
            out = original(self, module, forward_input, forward_output)
        finally:
            if bypass:
                w._forward_counter += 1  # type: ignore[union-attr]
        acts = getattr(module, "activations", None) or []
        if broadcast > 1 and len(acts) > n_before:
            # ids of batch 1 in a batch of B (Hugging Face position ids, Opacus issue 841): the
            # layer's output is broadcast after it, so its own output gradient would be the
            # batch's sum. Hand on the output expanded to the batch (same values wherever it is
            # broadcast; autograd sums the expansion back, so the total gradient is unchanged)
            # and record the ids expanded alike: Opacus's backward hook then sees per-example
            # output gradients (B, T, D) and the batch size B.
            ids = acts[-1][0]
            acts[-1][0] = ids.expand(broadcast, *ids.shape[1:])
            return forward_output.expand(broadcast, *forward_output.shape[1:])
        if isinstance(module, nn.EmbeddingBag) and getattr(module, "activations", None):
            # Opacus sizes the batch from the last positional input (offsets, or the
            # per_sample_weights); a bag's batch is its number of bags
            inp = forward_input[0]
            if inp.dim() == 2:
                B = inp.shape[0]
            else:
                B = forward_input[1].shape[0] - (1 if module.include_last_offset else 0)
            module.max_batch_len = max(getattr(module, "max_batch_len", 0), int(B))  # type: ignore[assignment]
        return out
    capture_activations_hook._embgrad = True  # type: ignore[attr-defined]
    return capture_activations_hook


def _batch_of_this_forward(gsm: Any, module: nn.Module) -> int:
    """The largest batch among the activations other layers of this forward have recorded so
    far (1 when none: the ids of batch 1 are then taken as a batch of 1)."""
    root = getattr(gsm, "_module", None)
    batch = 1
    if root is None:
        return batch
    for m in root.modules():
        if m is module:
            continue
        for acts in getattr(m, "activations", None) or []:
            if acts and isinstance(acts[0], torch.Tensor) and acts[0].dim() >= 1:
                batch = max(batch, int(acts[0].shape[0]))
    return batch


def _check_bag_call(module: nn.EmbeddingBag, forward_input: Any, forward_output: Any) -> None:
    """Opacus captures positional inputs only: a bag called with ``per_sample_weights=`` as a
    keyword would silently lose them. Recompute the unweighted bag and refuse if it differs."""
    if module.mode != "sum" or len(forward_input) >= 3:
        return
    inp = forward_input[0]
    offsets = forward_input[1] if len(forward_input) > 1 else None
    with torch.no_grad():
        plain = F.embedding_bag(inp, module.weight, offsets, module.max_norm, module.norm_type,
                                module.scale_grad_by_freq, module.mode, module.sparse, None,
                                module.include_last_offset, module.padding_idx)
    if not torch.equal(plain, forward_output):
        raise EmbgradError(
            f"{_layer_name(module)}: its output differs from the unweighted bag, so it was called "
            "with per_sample_weights= as a keyword, which Opacus does not capture (it records "
            "positional inputs only). Pass them positionally: bag(input, offsets, per_sample_weights).")


class OpacusRegistration:
    """embgrad's samplers registered in Opacus; ``remove()`` (or leaving the ``with`` block)
    restores the registries and hooks as they were. Create with :func:`register_opacus`."""

    def __init__(self) -> None:
        from opacus.grad_sample.grad_sample_module import GradSampleHooks
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
            GradSampleHooksFastGradientClipping as Ghost,
        )
        self._saved: list[tuple[dict, type, Any]] = []
        self._hooks: list[tuple[type, Any, Any]] = []
        self.active = True
        regs = [(GradSampleHooks.GRAD_SAMPLERS, _grad_sampler),
                (Ghost.GRAD_SAMPLERS, _grad_sampler), (Ghost.NORM_SAMPLERS, _norm_sampler)]
        for registry, fn in regs:
            for cls in (nn.Embedding, nn.EmbeddingBag):
                self._saved.append((registry, cls, registry.get(cls, _MISSING)))
                registry[cls] = fn
        linear = Ghost.NORM_SAMPLERS.get(nn.Linear)
        if linear is not None:
            self._saved.append((Ghost.NORM_SAMPLERS, nn.Linear, linear))
            Ghost.NORM_SAMPLERS[nn.Linear] = _wrap_linear_norm(linear)
        for cls in (GradSampleHooks, Ghost):
            before = cls.__dict__.get("capture_activations_hook", _MISSING)
            original = cls.capture_activations_hook
            cls.capture_activations_hook = _wrap_capture(original, Ghost)
            self._hooks.append((cls, before, cls.__dict__["capture_activations_hook"]))

    def remove(self) -> None:
        """Put Opacus's own samplers and activation hooks back (idempotent)."""
        if not self.active:
            return
        for registry, cls, before in reversed(self._saved):
            if before is _MISSING:
                registry.pop(cls, None)
            else:
                registry[cls] = before
        for cls, before, mine in reversed(self._hooks):
            if cls.__dict__.get("capture_activations_hook") is mine:
                if before is _MISSING:
                    delattr(cls, "capture_activations_hook")
                else:
                    cls.capture_activations_hook = before
        self.active = False

    def __enter__(self) -> OpacusRegistration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"OpacusRegistration(nn.Embedding, nn.EmbeddingBag: norm samplers (ghost clipping) "
                f"and grad samplers (hooks), active={self.active})")


_MISSING = object()


def register_opacus() -> OpacusRegistration:
    """Register embgrad's samplers for ``nn.Embedding`` and ``nn.EmbeddingBag`` in Opacus."""
    return OpacusRegistration()


# ------------------------------------------------------------------ sparse noise under Opacus
class _SparseNoise:
    """Mixed into Opacus's DPOptimizer class: tables get DP-FEST / DP-AdaFEST noise (only on
    selected rows), every other parameter Opacus's Gaussian with σ_grad."""

    _embgrad_mechanism: Any
    _embgrad_rows: Any
    _embgrad_tables: set
    _embgrad_rng: Any

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import (
            _check_processed_flag,
            _generate_noise,
            _mark_as_processed,
        )

        from ..privacy.mechanisms import DPAdaFEST
        from ..privacy.noise import contribution_counts
        from ..sparse import row_grad

        m = self._embgrad_mechanism
        for p in self.params:  # type: ignore[attr-defined]
            _check_processed_flag(p.summed_grad)
            pending = _PENDING.pop(p, [])
            if id(p) in self._embgrad_tables:
                if len(pending) != 1:
                    raise EmbgradError(
                        f"sparse noise: table {tuple(p.shape)} was looked up {len(pending)} times since the "
                        "last step (several calls per forward, or gradient accumulation); DP-AdaFEST's "
                        "contribution counts need exactly one lookup per step. Use dense noise for it.")
                grad = row_grad(p.summed_grad.detach(), num_rows=p.shape[0])
                if isinstance(m, DPAdaFEST):
                    counts = contribution_counts(pending[0], contribution_bound=m.contribution_bound)
                    noisy = m.privatize(grad, counts, self._embgrad_rng)
                else:
                    noisy = m.privatize(grad, self._embgrad_rows[id(p)], self._embgrad_rng)
                values = noisy.values.to(p.dtype)
                if p.summed_grad.is_sparse:
                    p.grad = torch.sparse_coo_tensor(noisy.rows[None], values, p.shape).coalesce()
                else:
                    p.grad = torch.zeros_like(p).index_copy_(0, noisy.rows, values)
            else:
                noise = _generate_noise(std=m.gradient_noise_std, reference=p.summed_grad,
                                        generator=self.generator,  # type: ignore[attr-defined]
                                        secure_mode=self.secure_mode)  # type: ignore[attr-defined]
                p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    def zero_grad(self, set_to_none: bool = False) -> None:
        for p in self.params:  # type: ignore[attr-defined]
            _PENDING.pop(p, None)    # lookups of a step that was not taken
        super().zero_grad(set_to_none)  # type: ignore[misc]


def sparse_noise_optimizer(optimizer: Any, mechanism: Any, tables: Any, rows: Any = None,
                           rng: Any = None) -> Any:
    """See :func:`embgrad.privacy.sparse_noise_optimizer`."""
    from opacus.optimizers import DPOptimizer

    from ..privacy.mechanisms import DPFEST, DPAdaFEST
    from ..privacy.noise import RowSelection, make_rng

    if not isinstance(optimizer, DPOptimizer):
        raise EmbgradError(f"sparse_noise_optimizer takes the DPOptimizer that PrivacyEngine.make_private "
                           f"returned, got {type(optimizer).__name__}.")
    if not isinstance(mechanism, (DPAdaFEST, DPFEST)):
        raise EmbgradError(f"mechanism must be DPAdaFEST or DPFEST, got {mechanism!r}.")
    if abs(optimizer.noise_multiplier - mechanism.noise_multiplier) > 1e-12 \
            or abs(optimizer.max_grad_norm - mechanism.max_grad_norm) > 1e-12:
        raise EmbgradError(
            f"the optimizer's noise_multiplier={optimizer.noise_multiplier}, max_grad_norm="
            f"{optimizer.max_grad_norm} must equal the mechanism's ({mechanism.noise_multiplier}, "
            f"{mechanism.max_grad_norm}): Opacus's accountant charges the optimizer's σ, which is "
            "the mechanism's equivalent single Gaussian.")
    modules = [tables] if isinstance(tables, nn.Module) else list(tables)
    for t in modules:
        if not isinstance(t, (nn.Embedding, nn.EmbeddingBag)):
            raise EmbgradError(f"tables must be nn.Embedding/nn.EmbeddingBag modules, got {type(t).__name__}.")
    if isinstance(mechanism, DPAdaFEST) and mechanism.num_tables != len(modules):
        raise EmbgradError(f"the DPAdaFEST mechanism was made for num_tables={mechanism.num_tables}, "
                           f"but {len(modules)} tables were given.")
    params = {id(p) for p in optimizer.params}
    for t in modules:
        if id(t.weight) not in params:
            raise EmbgradError(f"{_layer_name(t)}'s weight is not among the optimizer's parameters.")
    fixed = {}
    if isinstance(mechanism, DPFEST):
        rows = rows if isinstance(rows, (list, tuple)) else [rows]
        if len(rows) != len(modules) or any(not isinstance(r, RowSelection) for r in rows):
            raise EmbgradError("DPFEST needs rows=: one RowSelection (top_k_rows) per table.")
        fixed = {id(t.weight): r for t, r in zip(modules, rows, strict=True)}
    cls = type(f"SparseNoise{type(optimizer).__name__}", (_SparseNoise, type(optimizer)), {})
    new: Any = object.__new__(cls)
    new.__dict__.update(optimizer.__dict__)
    new._embgrad_mechanism = mechanism
    new._embgrad_rows = fixed
    new._embgrad_tables = {id(t.weight) for t in modules}
    for t in modules:
        _WANTED[t.weight] = True
    new._embgrad_rng = make_rng(rng)
    return new
