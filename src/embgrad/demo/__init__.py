"""The built-in demo: synthetic sentiment data with planted label words (:mod:`.data`) and the
tiny embedding → mean pool → linear classifier in PyTorch and Keras (:mod:`.models`).

Importing this package loads no deep-learning framework.
"""
from __future__ import annotations

from .data import LABELS, NEGATIVE, POSITIVE, DemoData, SentimentData, Vocab, demo_data, is_planted
from .models import EMBEDDING_NAME, FRAMEWORKS, Trained, keras_classifier, torch_classifier, train

__all__ = ["demo_data", "DemoData", "SentimentData", "Vocab", "LABELS", "POSITIVE", "NEGATIVE",
           "is_planted", "train", "Trained", "torch_classifier", "keras_classifier", "FRAMEWORKS",
           "EMBEDDING_NAME"]
