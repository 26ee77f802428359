"""Shared test configuration: quiet frameworks, offline Hugging Face, small thread pools,
hypothesis derandomized under CI."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:   # CI explores the same hypothesis examples on every run (locally they vary, to find more)
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:   # the Gluon venv's tests may run without hypothesis
    pass
