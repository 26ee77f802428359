"""The result types of attribution: :class:`Attribution` (:func:`embgrad.attribute`) and
:class:`HotFlip` (:func:`embgrad.hotflip`), small immutable records with NumPy fields."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Attribution", "HotFlip", "LayerAttributions"]

@dataclass(frozen=True, eq=False, repr=False)
class Attribution:
    """The result of :func:`attribute`.

    ``scores``: NumPy (B, T), one number per token (sign kept; padding positions are 0), or
    (K, B, T) for K targets. ``attributions``: framework tensor (B, T, D) (or (K, B, T, D)),
    float32 or wider: the per-coordinate attributions (the gradient itself for saliency).
    ``delta``: NumPy (B,) (or (K, B)) completeness gap Σ_t scores − (f(input) − f(baseline))
    for integrated gradients, else None. ``tokens``: list of token lists, or None. ``ids``:
    NumPy (B, T) looked-up ids. ``mask``: NumPy bool (B, T), False at padding.
    ``outputs`` / ``baseline_outputs``: f at the input / baseline, NumPy (B,) (or (K, B)).
    ``steps``: NumPy int (B,) steps (noise samples for SmoothGrad) behind each example's
    result; ``evaluations``: example rows that went through the model (forward, or forward and
    backward), all passes included; ``converged``: NumPy bool (B,) for ``steps="auto"``. ``target``: what
    was attributed for a single target ("class 2", "per-example", a callable's name); None for
    several (see ``targets``).
    """

    method: str
    scores: np.ndarray
    attributions: Any
    delta: np.ndarray | None
    tokens: list[list[str]] | None
    ids: np.ndarray
    mask: np.ndarray
    layer: str
    targets: tuple[str, ...] | None
    baseline: str | None
    rule: str | None
    steps: np.ndarray | None
    evaluations: int
    outputs: np.ndarray
    baseline_outputs: np.ndarray | None = None
    converged: np.ndarray | None = None
    target: str | None = None

    def _rows(self) -> tuple[list[list[str]], np.ndarray, np.ndarray, list[str]]:
        toks = self.tokens or [[f"[{i}]" for i in row] for row in self.ids.tolist()]
        scores = self.scores if self.targets is None else self.scores.reshape(-1, self.scores.shape[-1])
        K = 1 if self.targets is None else len(self.targets)
        B = self.ids.shape[0]
        labels = []
        delta = None if self.delta is None else self.delta.reshape(K, B)
        outputs = np.asarray(self.outputs, dtype=np.float64).reshape(K, B)
        for k in range(K):
            for b in range(B):
                lab = f"#{b}" + ("" if self.targets is None else f" · {self.targets[k]}")
                lab += f" · f={outputs[k, b]:.3g}"
                if delta is not None:
                    lab += f" · Δ={delta[k, b]:.1e}"
                labels.append(lab)
        return toks * K, scores, np.tile(self.mask, (K, 1)), labels

    def to_html(self, title: str | None = None, scale: str = "row") -> str:
        """A self-contained HTML fragment: a colour legend, then the token heatmap, one row per
        example (and target) labelled with the example, the target (for several targets), the
        explained output ``f`` and the completeness gap ``Δ`` (integrated gradients); every token
        escaped, hovering a token shows its position and score."""
        from .._html import color_legend, token_heatmap
        toks, scores, mask, labels = self._rows()
        if title is None:
            title = f"{self.method} on {self.layer}" + (f" ({self.rule}, {self._steps_text()} steps)"
                                                         if self.method == "integrated_gradients" else "")
            if self.target is not None:
                title += f" · target: {self.target}"
        legend = color_legend(None if scale == "row" else float(np.abs(scores).max(initial=0.0)),
                              positive="raises the target output f", negative="lowers it")
        return token_heatmap(toks, scores, mask=mask, labels=labels, title=title, scale=scale, legend=legend)

    def _repr_html_(self) -> str:
        return self.to_html()

    def _steps_text(self) -> str:
        if self.steps is None:
            return "-"
        lo, hi = int(self.steps.min()), int(self.steps.max())
        return str(lo) if lo == hi else f"{lo}-{hi}"

    def __repr__(self) -> str:
        parts = [self.method, f"layer={self.layer!r}", f"scores={tuple(self.scores.shape)}"]
        if self.targets is not None:
            parts.append(f"targets={list(self.targets)}")
        if self.rule is not None:
            parts.append(f"rule={self.rule}")
        if self.steps is not None:
            parts.append(f"steps={self._steps_text()}")
        parts.append(f"evaluations={self.evaluations}")
        if self.delta is not None:
            parts.append(f"max|delta|={float(np.abs(self.delta).max()):.2e}")
        return f"Attribution({', '.join(parts)})"


@dataclass(frozen=True, eq=False, repr=False)
class HotFlip:
    """The result of :func:`hotflip`: for each example its k best single-token swaps.

    NumPy arrays (B, k): ``positions``, ``old_ids``, ``new_ids``, ``predicted`` (first-order
    change of the target, (e_new − e_old) · g), ``actual`` (the change measured by a real
    forward pass, with ``verify=True``; else None). ``output``: NumPy (B,) target at the input.
    Slots past the number of admissible swaps hold position −1 and a NaN prediction.
    ``old_tokens`` / ``new_tokens``: strings when a tokenizer or vocabulary was given.
    """

    positions: np.ndarray
    old_ids: np.ndarray
    new_ids: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray | None
    output: np.ndarray
    direction: str
    layer: str
    old_tokens: list[list[str]] | None = None
    new_tokens: list[list[str]] | None = None

    def swaps(self, b: int) -> list[tuple[int, int, int, float, float | None]]:
        """Example b's swaps as ``(position, old_id, new_id, predicted, actual)`` tuples."""
        out = []
        for j in range(self.positions.shape[1]):
            if self.positions[b, j] < 0:
                continue
            act = None if self.actual is None else float(self.actual[b, j])
            out.append((int(self.positions[b, j]), int(self.old_ids[b, j]), int(self.new_ids[b, j]),
                        float(self.predicted[b, j]), act))
        return out

    def __repr__(self) -> str:
        B, k = self.positions.shape
        best = ""
        if B and k and self.positions[0, 0] >= 0:
            p, o, n = int(self.positions[0, 0]), int(self.old_ids[0, 0]), int(self.new_ids[0, 0])
            if self.old_tokens is not None and self.new_tokens is not None:
                best = f", best #0: {self.old_tokens[0][0]!r}->{self.new_tokens[0][0]!r} at {p}"
            else:
                best = f", best #0: {o}->{n} at {p}"
            best += f" ({self.predicted[0, 0]:+.3g} predicted" + (
                "" if self.actual is None else f", {self.actual[0, 0]:+.3g} actual") + ")"
        return f"HotFlip({self.direction}, layer={self.layer!r}, examples={B}, k={k}{best})"


@dataclass(frozen=True, eq=False, repr=False)
class LayerAttributions(Mapping):
    """The result of :func:`embgrad.attribute` with several layers (``layer=[...]``): layer
    name -> :class:`Attribution`, in the order given, from ONE path along which every layer's
    output moves at once (Captum's ``LayerIntegratedGradients`` with a list of layers, which
    returns one attribution per layer).

    ``delta``: NumPy (B,) (or (K, B)) completeness gap of all layers together,
    Σ_layers Σ_t scores − (f(input) − f(baseline)), for integrated gradients (else None); the
    per-layer results carry no delta of their own (a layer's share is not complete alone).
    ``outputs`` / ``baseline_outputs``: f at the input / at every layer's baseline, NumPy (B,)
    (or (K, B)). ``scores``: NumPy (L, B, T) (or (L, K, B, T)), the layers' scores stacked.
    """

    by_layer: dict[str, Attribution]
    method: str
    delta: np.ndarray | None
    outputs: np.ndarray
    baseline_outputs: np.ndarray | None
    evaluations: int

    def __getitem__(self, name: str) -> Attribution:
        try:
            return self.by_layer[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in this result; its layers: {', '.join(self.by_layer)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_layer)

    def __len__(self) -> int:
        return len(self.by_layer)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.by_layer)

    @property
    def scores(self) -> np.ndarray:
        return np.stack([a.scores for a in self.by_layer.values()])

    def to_html(self, title: str | None = None, scale: str = "row") -> str:
        """One heatmap per layer (see :meth:`Attribution.to_html`), then the joint completeness gap."""
        from .._html import esc
        parts = [a.to_html(title=None if title is None else f"{title} · {name}", scale=scale)
                 for name, a in self.by_layer.items()]
        if self.delta is not None:
            parts.append(f"<div>completeness gap of all layers together: max |Δ| = "
                         f"{esc(f'{float(np.abs(self.delta).max()):.2e}')}</div>")
        return "\n".join(parts)

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        first = next(iter(self.by_layer.values()))
        parts = [self.method, f"layers={list(self.by_layer)}", f"scores={tuple(first.scores.shape)} each",
                 f"evaluations={self.evaluations}"]
        if self.delta is not None:
            parts.append(f"max|delta|={float(np.abs(self.delta).max()):.2e}")
        return f"LayerAttributions({', '.join(parts)})"
