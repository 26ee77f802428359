"""The demo pipeline: seeded data → trained tiny classifier → every report section.

:func:`run_demo` computes (nothing is written); :func:`embgrad.report.html.write_report`
writes the page. Steps report to an optional ``step(name)`` callback so the CLI can show
progress.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..demo.data import DemoData, SentimentData, demo_data
from ..demo.models import Trained, train
from .analysis import (
    AttributionInfo,
    HotFlipInfo,
    ModelInfo,
    PerExampleInfo,
    SimilarityInfo,
    WeightGradInfo,
    attribution_info,
    gradient_info,
    hotflip_info,
    model_info,
    similarity_info,
)

__all__ = ["DemoResults", "run_demo", "pick_test_sentences"]


@dataclass(frozen=True, eq=False)
class DemoResults:
    """Everything the report shows, one field per section; ``seconds`` times each step."""

    model: ModelInfo
    weight: WeightGradInfo
    per_example: PerExampleInfo
    similarity: SimilarityInfo
    attribution: AttributionInfo
    hotflip: HotFlipInfo
    seconds: dict[str, float] = field(default_factory=dict)
    generation: Any = None            # embgrad.demo.lm.GenerationInfo (PyTorch demo), else None
    privacy: Any = None               # embgrad.report.privacy.PrivacyInfo

    def __repr__(self) -> str:
        return (f"DemoResults({self.model.framework}, test_accuracy={self.model.test_accuracy:.3f}, "
                f"{self.weight!r}, {self.attribution!r}, {self.hotflip!r})")


def pick_test_sentences(test: SentimentData, n: int = 12, seed: int = 0) -> SentimentData:
    """``n`` seeded test sentences, half of them with negation (when there are enough)."""
    negated = np.array([any(t.startswith("not_") for t in toks) for toks in test.tokens])
    rng = np.random.default_rng([seed, 2])
    neg = rng.permutation(np.flatnonzero(negated))[: n // 2]
    rest = rng.permutation(np.flatnonzero(~negated))[: n - len(neg)]
    return test.subset(np.sort(np.concatenate([neg, rest])))


def run_demo(framework: str = "torch", *, seed: int = 0, batch_size: int = 256,
             data: DemoData | None = None, epochs: int = 6,
             progress: Callable[[int, int, float], None] | None = None,
             step: Callable[[str], None] | None = None) -> tuple[DemoResults, Trained, DemoData]:
    """Train the demo model in ``framework`` and compute every report section.

    ``batch_size``: the training batch whose gradients sections 2, 3 and 6 show.
    ``progress``: the trainer's per-epoch callback; ``step(name)``: called before each section.
    Returns ``(results, trained model, data)``.

    Raises:
        EmbgradError: an unknown ``framework`` ("torch" or "tensorflow"), ``epochs`` < 1.
        ImportError: the framework is not installed (without dp-accounting the privacy section
            says so instead of giving ε).
    """
    step = step or (lambda name: None)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    data = data or demo_data(seed=seed)
    trained = train(data, framework, seed=seed, epochs=epochs, progress=progress)
    seconds["train"] = time.perf_counter() - t
    with trained.one_thread():
        return _sections(trained, data, batch_size, seed, step, seconds), trained, data


def report_steps(framework: str) -> int:
    """How many times :func:`run_demo` calls its ``step`` callback (one per report section it
    computes; the causal-LM section is PyTorch's only)."""
    return 6 if framework == "torch" else 5


def _sections(trained: Trained, data: DemoData, batch_size: int, seed: int, step: Callable[[str], None],
              seconds: dict[str, float]) -> DemoResults:
    batch = data.train.subset(np.arange(min(batch_size, len(data.train))))
    sentences = pick_test_sentences(data.test, seed=seed)

    step("gradients of one batch")
    t = time.perf_counter()
    model = model_info(trained, data)
    weight, per_example = gradient_info(trained, batch)
    seconds["gradients"] = time.perf_counter() - t

    step("gradient similarity")
    t = time.perf_counter()
    query = sentences.subset([int(np.argmax([any(x.startswith("not_") for x in s) for s in sentences.tokens]))])
    similarity = similarity_info(trained, query, batch)
    seconds["similarity"] = time.perf_counter() - t

    step("attributions")
    t = time.perf_counter()
    attribution = attribution_info(trained, sentences, data.test)
    seconds["attribution"] = time.perf_counter() - t

    step("HotFlip")
    t = time.perf_counter()
    flips = hotflip_info(trained, sentences)
    seconds["hotflip"] = time.perf_counter() - t

    generation = None
    if trained.framework == "torch":   # a tiny causal LM on the same sentences (issue 18)
        from ..demo.lm import generation_info
        step("a tiny causal LM")
        t = time.perf_counter()
        generation = generation_info(data, sentences, seed=seed)
        seconds["generation"] = time.perf_counter() - t
    step("privacy: clip, noise, ε")
    t = time.perf_counter()
    from .privacy import privacy_info
    private = privacy_info(trained, batch, per_example, len(data.train), len(model.losses), seed=seed)
    seconds["privacy"] = time.perf_counter() - t
    return DemoResults(model, weight, per_example, similarity, attribution, flips, seconds, generation, private)
