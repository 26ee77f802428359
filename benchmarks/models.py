"""Models and data of the benchmarks: the demo classifier, a BERT-style encoder, token ids.

Token ids follow a Zipf law over the vocabulary (id 2 most frequent, as in a tokenizer's
frequency order) with variable lengths right-padded with PAD = 0: realistic text, where the
same frequent rows recur across (and within) examples. Everything is seeded.
"""
from __future__ import annotations

from typing import Any

import numpy as np

PAD = 0
FIRST_ID = 2       # 0 = PAD, 1 = UNK; words start at 2
BERT_LAYER = "bert.embeddings.word_embeddings"


def zipf_ids(batch: int, length: int, vocab: int, seed: int = 0, exponent: float = 1.0,
             pad: bool = True) -> np.ndarray:
    """int64 (batch, length) ids in [2, vocab), Zipf-distributed; lengths uniform in
    [length // 2, length] and right-padded with PAD when ``pad``."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab - FIRST_ID + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -exponent)
    cdf /= cdf[-1]
    ids = FIRST_ID + np.searchsorted(cdf, rng.random((batch, length)), side="right")
    ids = np.minimum(ids, vocab - 1).astype(np.int64)
    if pad:
        lengths = rng.integers(max(length // 2, 1), length + 1, size=batch)
        ids[np.arange(length)[None, :] >= lengths[:, None]] = PAD
    return ids


def labels(batch: int, classes: int, seed: int = 0) -> np.ndarray:
    """int64 (batch,) class labels."""
    return np.random.default_rng(seed + 1).integers(0, classes, size=batch).astype(np.int64)


def torch_classifier(vocab: int, dim: int, classes: int = 2, seed: int = 0) -> Any:
    """The demo classifier (embedding → mask-aware mean pool → linear), layer ``embedding``."""
    from embgrad.demo.models import torch_classifier as make

    model = make(vocab, dim=dim, num_classes=classes, pad_id=PAD, seed=seed)
    return model.train()


def torch_bert(vocab: int = 30522, dim: int = 256, layers: int = 4, heads: int = 4,
               classes: int = 2, max_len: int = 512, seed: int = 0) -> Any:
    """A randomly initialised BERT-style encoder with a classification head (Hugging Face
    ``BertForSequenceClassification``); dropout 0 so examples are deterministic and
    independent, in train mode (Opacus only hooks modules in train mode)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * dim,
                     max_position_embeddings=max_len, num_labels=classes,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     pad_token_id=PAD)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(cfg)
    return model.train()
