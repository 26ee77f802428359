"""The tiny demo classifier (embedding → mask-aware mean pool → linear) in PyTorch and in
Keras, and a quick seeded trainer for each.

Framework imports happen only inside functions, so ``import embgrad.demo`` loads no
framework. :func:`train` returns a :class:`Trained` whose few methods (``tensor``,
``logits``, ``loss``, ``predict_proba``) are the only framework-specific code the demo and
the report need; everything else talks to embgrad.

Negation is learnable by a bag of embeddings because the tokenizer merges ``not good`` into
one token ``not_good`` (see :mod:`embgrad.demo.data`).
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import EmbgradError
from .data import DemoData, Vocab

__all__ = ["torch_classifier", "keras_classifier", "train", "Trained", "FRAMEWORKS",
           "EMBEDDING_NAME"]

FRAMEWORKS = ("torch", "tensorflow")
EMBEDDING_NAME = "embedding"  # the embedding layer's name in both frameworks

#: ``progress(epoch, epochs, mean_loss)`` after every epoch (epoch counts from 1).
Progress = Callable[[int, int, float], None]


# ---------------------------------------------------------------------------- PyTorch
@functools.cache
def _torch_class() -> type:
    import torch
    from torch import nn

    class TinyClassifier(nn.Module):
        """ids (B, T) int64 → logits (B, C): embedding → mean over non-PAD tokens → linear."""

        def __init__(self, vocab_size: int, dim: int, num_classes: int, pad_id: int) -> None:
            super().__init__()
            self.pad_id = pad_id
            self.embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
            self.classifier = nn.Linear(dim, num_classes)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            vectors = self.embedding(ids)                                   # (B, T, D)
            mask = (ids != self.pad_id).unsqueeze(-1).to(vectors.dtype)     # (B, T, 1)
            pooled = (vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)   # (B, D)
            return self.classifier(pooled)                                  # (B, C)

    return TinyClassifier


def torch_classifier(vocab_size: int, dim: int = 16, num_classes: int = 2,
                     pad_id: int = Vocab.PAD, seed: int = 0) -> Any:
    """A seeded ``torch.nn.Module``: ids (B, T) → logits (B, num_classes).

    The layer ``embedding`` is an ``nn.Embedding(vocab_size, dim, padding_idx=pad_id)``.
    The global torch RNG is left as it was.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _torch_class()(vocab_size, dim, num_classes, pad_id)


# ---------------------------------------------------------------------------- Keras
@functools.cache
def _keras_pool_class() -> type:
    import keras

    class MaskedMeanPool(keras.layers.Layer):
        """[vectors (B, T, D), ids (B, T)] → mean of the vectors at non-PAD ids (B, D)."""

        def __init__(self, pad_id: int = 0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.pad_id = pad_id

        def call(self, inputs: list, mask: Any = None) -> Any:
            vectors, ids = inputs
            ops = keras.ops
            m = ops.expand_dims(ops.cast(ops.not_equal(ids, self.pad_id), vectors.dtype), -1)
            return ops.sum(vectors * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)

        def compute_mask(self, inputs: list, mask: Any = None) -> None:
            return None

    return MaskedMeanPool


def _require_keras_on_tensorflow() -> Any:
    import keras

    if keras.backend.backend() != "tensorflow":
        raise EmbgradError(
            f"the Keras demo model runs on the TensorFlow backend, but KERAS_BACKEND is "
            f"{keras.backend.backend()!r}. Unset KERAS_BACKEND (or set it to 'tensorflow'), or use "
            "framework='torch'.")
    return keras


def keras_classifier(vocab_size: int, dim: int = 16, num_classes: int = 2,
                     pad_id: int = Vocab.PAD, seed: int = 0) -> Any:
    """A seeded functional Keras 3 model: ids (B, T) int → logits (B, num_classes).

    The layer ``embedding`` is a ``keras.layers.Embedding(vocab_size, dim, mask_zero=True)``
    (PAD must be 0 then); pooling computes its mask from the ids.
    """
    keras = _require_keras_on_tensorflow()
    if pad_id != 0:
        raise EmbgradError(f"the Keras demo model masks id 0 (mask_zero=True), got pad_id={pad_id}.")
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    vectors = keras.layers.Embedding(
        vocab_size, dim, mask_zero=True, name=EMBEDDING_NAME,
        embeddings_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed))(ids)
    pooled = _keras_pool_class()(pad_id, name="mean_pool")([vectors, ids])
    logits = keras.layers.Dense(
        num_classes, name="classifier",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1))(pooled)
    return keras.Model(ids, logits, name="tiny_classifier")


# ---------------------------------------------------------------------------- training
class Trained:
    """A trained demo model and the few framework-specific operations the demo needs.

    ``model``: the framework model; ``framework``: "torch" or "tensorflow"; ``losses``: mean
    training loss per epoch; ``test_accuracy``; ``seconds``: training wall time.
    """

    framework = ""

    def __init__(self, model: Any, losses: list[float], seconds: float, data: DemoData):
        self.model = model
        self.losses = tuple(losses)
        self.seconds = seconds
        self.test_accuracy = self.accuracy(data.test.ids, data.test.labels)
        self.train_accuracy = self.accuracy(data.train.ids, data.train.labels)

    def tensor(self, ids: np.ndarray) -> Any:
        """The framework int tensor for NumPy ids (B, T)."""
        raise NotImplementedError

    def logits(self, ids: Any) -> Any:
        """Framework float tensor (B, C) of the model on ids (NumPy or framework)."""
        raise NotImplementedError

    def loss(self, logits: Any, labels: np.ndarray, reduction: str = "sum") -> Any:
        """Cross-entropy (framework scalar) of logits (B, C) against int labels (B,)."""
        raise NotImplementedError

    def plain_backward(self, ids: Any, labels: np.ndarray) -> Any:
        """The plain forward + backward pass over every trainable parameter (summed loss),
        without writing any accumulated gradient; returns the embedding table's gradient as
        the framework gives it (dense tensor, or ``tf.IndexedSlices``)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        """Number of trainable scalars in the model."""
        raise NotImplementedError

    def one_thread(self) -> contextlib.AbstractContextManager:
        """A context running the framework on one intra-op thread where it can be changed
        (torch), restored on exit: a tiny model gains nothing from threads."""
        return contextlib.nullcontext()

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)

    def predict_proba(self, ids: np.ndarray) -> np.ndarray:
        """float (B, C) class probabilities for NumPy ids (B, T)."""
        z = self.to_numpy(self.logits(ids)).astype(np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    def accuracy(self, ids: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict_proba(ids).argmax(1) == labels).mean())

    def __repr__(self) -> str:
        return (f"Trained({self.framework}, {type(self.model).__name__}, epochs={len(self.losses)}, "
                f"test_accuracy={self.test_accuracy:.3f}, seconds={self.seconds:.2f})")


class _TorchTrained(Trained):
    framework = "torch"

    def tensor(self, ids: np.ndarray) -> Any:
        import torch
        return torch.as_tensor(np.asarray(ids), dtype=torch.int64)

    def logits(self, ids: Any) -> Any:
        import torch
        ids = ids if isinstance(ids, torch.Tensor) else self.tensor(ids)
        if torch.is_grad_enabled():
            return self.model(ids)
        with torch.no_grad():
            return self.model(ids)

    def loss(self, logits: Any, labels: np.ndarray, reduction: str = "sum") -> Any:
        import torch
        return torch.nn.functional.cross_entropy(logits, self.tensor(labels), reduction=reduction)

    def predict_proba(self, ids: np.ndarray) -> np.ndarray:
        import torch
        with torch.no_grad():
            return super().predict_proba(ids)

    def plain_backward(self, ids: Any, labels: np.ndarray) -> Any:
        import torch
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(self.loss(self.logits(ids), labels), params)
        return grads[params.index(self.model.embedding.weight)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def one_thread(self) -> contextlib.AbstractContextManager:
        return _one_thread()


class _KerasTrained(Trained):
    framework = "tensorflow"

    def tensor(self, ids: np.ndarray) -> Any:
        import tensorflow as tf
        return tf.convert_to_tensor(np.asarray(ids), dtype=tf.int32)

    def logits(self, ids: Any) -> Any:
        return self.model(ids if not isinstance(ids, np.ndarray) else self.tensor(ids))

    def loss(self, logits: Any, labels: np.ndarray, reduction: str = "sum") -> Any:
        import tensorflow as tf
        per = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.constant(np.asarray(labels), tf.int64), logits=logits)
        return tf.reduce_sum(per) if reduction == "sum" else tf.reduce_mean(per)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def plain_backward(self, ids: Any, labels: np.ndarray) -> Any:
        import tensorflow as tf
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.loss(self.logits(ids), labels)
        grads = tape.gradient(loss, variables)
        table = self.model.get_layer(EMBEDDING_NAME).embeddings
        return grads[[v is table for v in variables].index(True)]

    def num_parameters(self) -> int:
        return int(sum(np.prod(v.shape) for v in self.model.trainable_variables))


def _epochs(n: int, epochs: int, batch_size: int, seed: int, step: Callable[[np.ndarray], float],
            progress: Progress | None) -> tuple[list[float], float]:
    """Run ``step(batch_index) -> mean batch loss`` over seeded shuffled mini-batches; return
    the mean loss per epoch and the wall time."""
    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        total = sum(step(idx) * len(idx) for idx in np.array_split(order, range(batch_size, n, batch_size)))
        losses.append(total / n)
        if progress is not None:
            progress(epoch, epochs, losses[-1])
    return losses, time.perf_counter() - start


def _train_torch(data: DemoData, epochs: int, batch_size: int, lr: float, dim: int, seed: int,
                 progress: Progress | None) -> Trained:
    import torch

    model = torch_classifier(len(data.vocab), dim, seed=seed)
    params = list(model.parameters())
    # Adam by hand: torch.optim's first use imports torch._dynamo (seconds on a busy 2-core box)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    ids = torch.as_tensor(data.train.ids)
    labels = torch.as_tensor(data.train.labels)
    count = [0]

    def step(idx: np.ndarray) -> float:
        idx_t = torch.as_tensor(idx)
        loss = torch.nn.functional.cross_entropy(model(ids[idx_t]), labels[idx_t])
        grads = torch.autograd.grad(loss, params)
        count[0] += 1
        c1, c2 = 1 - beta1 ** count[0], 1 - beta2 ** count[0]
        with torch.no_grad():
            for p, g, (m, v) in zip(params, grads, moments, strict=True):
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(eps), value=-lr / c1)
        return float(loss.detach())

    with _one_thread():
        losses, seconds = _epochs(len(labels), epochs, batch_size, seed, step, progress)
    model.eval()
    return _TorchTrained(model, losses, seconds, data)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread for a tiny model (threads only add sync cost; on a busy
    2-core machine 2 threads made training 30× slower), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_keras(data: DemoData, epochs: int, batch_size: int, lr: float, dim: int, seed: int,
                 progress: Progress | None) -> Trained:
    keras = _require_keras_on_tensorflow()
    import tensorflow as tf

    model = keras_classifier(len(data.vocab), dim, seed=seed)
    opt = keras.optimizers.Adam(learning_rate=lr)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(reduce_retracing=True)
    def tf_step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        variables = model.trainable_variables
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    ids = data.train.ids.astype(np.int32)
    labels = data.train.labels
    losses, seconds = _epochs(len(labels), epochs, batch_size, seed,
                              lambda idx: float(tf_step(tf.constant(ids[idx]), tf.constant(labels[idx]))),
                              progress)
    return _KerasTrained(model, losses, seconds, data)


def train(data: DemoData, framework: str = "torch", *, epochs: int = 6, batch_size: int = 32,
          lr: float = 0.02, dim: int = 16, seed: int = 0, progress: Progress | None = None) -> Trained:
    """Train the tiny classifier on ``data.train`` (seeded, Adam, a few seconds on 2 CPU cores).

    ``framework``: "torch" or "tensorflow" (Keras 3 on TensorFlow). ``progress`` is called
    after each epoch with ``(epoch, epochs, mean_loss)``.
    """
    if framework not in FRAMEWORKS:
        raise EmbgradError(f"unknown framework {framework!r} for the demo model; choose one of "
                           f"{', '.join(FRAMEWORKS)}.")
    if epochs < 1 or batch_size < 1:
        raise EmbgradError(f"epochs and batch_size must be >= 1, got epochs={epochs}, "
                           f"batch_size={batch_size}.")
    fit = _train_torch if framework == "torch" else _train_keras
    return fit(data, epochs, batch_size, lr, dim, seed, progress)
