"""Weight-gradient extraction: the gradient of a (V, D) table from one batch, as a coalesced
``RowGrad`` against the dense gradient (PyTorch) and against densifying TensorFlow's
``IndexedSlices`` — what a (V, D) gradient costs when only the looked-up rows are nonzero.

PyTorch methods (the demo classifier):

* ``dense``: ``loss.backward()``, the dense (V, D) ``weight.grad`` (the reference);
* ``torch_sparse``: ``nn.Embedding(sparse=True)``: a sparse COO ``weight.grad``, ``.coalesce()``d;
* ``embgrad``: ``capture`` + ``cap.gradients(loss).only().weight_grad``.

TensorFlow methods (the Keras demo classifier):

* ``tf_densify``: ``tape.gradient(loss, table)`` (an ``IndexedSlices``) turned into a dense
  (V, D) tensor with ``tf.convert_to_tensor``, as optimizers and user code often do (the
  reference);
* ``row_grad``: the same ``IndexedSlices`` coalesced by ``embgrad.row_grad`` (never densified);
* ``embgrad``: ``capture`` + ``cap.gradients(loss).only().weight_grad``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import GiB, Bench, Case, Unsupported, sparse_rows  # noqa: E402
from models import labels, torch_classifier, zipf_ids  # noqa: E402

TORCH_METHODS = ("embgrad", "dense", "torch_sparse")
TF_METHODS = ("embgrad", "tf_densify", "row_grad")
DIM = 64


def _params(framework: str, vocab: int, dim: int = DIM, batch: int = 64, length: int = 128) -> dict:
    return {"framework": framework, "vocab": vocab, "dim": dim, "batch": batch, "length": length,
            "classes": 2, "seed": 0}


def _case(framework: str, key: str, params: dict, budget: int, time_limit: float) -> Case:
    fw = "PyTorch" if framework == "torch" else "TensorFlow/Keras"
    title = (f"Weight gradient of the table ({fw}): demo classifier, V={params['vocab']:,}, "
             f"D={params['dim']}, B={params['batch']}, T={params['length']}")
    if framework == "torch":
        return Case(key, title, "weight_grad", params, TORCH_METHODS, reference="dense",
                    budget_bytes=budget, time_limit_s=time_limit)
    return Case(key, title, "weight_grad", params, TF_METHODS, reference="tf_densify",
                budget_bytes=budget, time_limit_s=time_limit)


def cases(quick: bool, tensorflow: bool = True) -> list[Case]:
    """Issue 6, section 2: V ∈ {50k, 1M, 5M} in PyTorch and TensorFlow (D=64)."""
    sizes = [("quick", 20_000)] if quick else [("50k", 50_000), ("1m", 1_000_000), ("5m", 5_000_000)]
    budget, limit = (2 * GiB, 120.0) if quick else (8 * GiB, 900.0)
    out = []
    for fw in ("torch", "tensorflow") if tensorflow else ("torch",):
        for tag, v in sizes:
            p = _params(fw, v) if not quick else _params(fw, v, 32, 16, 32)
            out.append(_case(fw, f"wg_{'tf' if fw == 'tensorflow' else 'torch'}_{tag}", p, budget, limit))
    return out


def _result(rows: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    r, v = sparse_rows((rows, values))
    return {"grad_rows": r, "grad_values": v}


def _dense_result(dense: np.ndarray) -> dict[str, np.ndarray]:
    r, v = sparse_rows(dense)
    return {"grad_rows": r, "grad_values": v}


# ----------------------------------------------------------------------------- PyTorch
def _build_torch(method: str, p: dict) -> Bench:
    import torch
    import torch.nn.functional as F

    import embgrad

    torch.manual_seed(0)
    model = torch_classifier(p["vocab"], p["dim"], p["classes"], seed=p["seed"])
    x = torch.from_numpy(zipf_ids(p["batch"], p["length"], p["vocab"], seed=p["seed"]))
    y = torch.from_numpy(labels(p["batch"], p["classes"], seed=p["seed"]))
    emb = model.embedding

    def loss() -> Any:
        return F.cross_entropy(model(x), y, reduction="sum")

    if method == "dense":
        def run() -> Any:
            loss().backward()
            g = emb.weight.grad
            model.zero_grad(set_to_none=True)     # the model holds nothing between calls
            return g
        return Bench(run, lambda g: _dense_result(g.numpy()))
    if method == "torch_sparse":
        emb.sparse = True

        def run() -> Any:
            loss().backward()
            g = emb.weight.grad.coalesce()
            model.zero_grad(set_to_none=True)
            return g
        return Bench(run, lambda g: _result(g.indices()[0].numpy(), g.values().numpy()))
    if method == "embgrad":
        def run() -> Any:
            with embgrad.capture(model) as cap:
                value = loss()
            return cap.gradients(value).only().weight_grad
        return Bench(run, lambda rg: _result(*rg.numpy()))
    raise Unsupported(f"unknown PyTorch method {method!r}")


# ----------------------------------------------------------------------------- TensorFlow
def _build_tf(method: str, p: dict) -> Bench:
    import tensorflow as tf

    import embgrad
    from embgrad.demo.models import keras_classifier

    model = keras_classifier(p["vocab"], dim=p["dim"], num_classes=p["classes"], seed=p["seed"])
    x = tf.constant(zipf_ids(p["batch"], p["length"], p["vocab"], seed=p["seed"]).astype(np.int32))
    y = tf.constant(labels(p["batch"], p["classes"], seed=p["seed"]))
    model(x)   # build
    table = model.get_layer("embedding").embeddings

    def loss() -> Any:
        logits = model(x, training=True)
        return tf.reduce_sum(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))

    def tape_grad() -> Any:
        with tf.GradientTape() as tape:
            value = loss()
        return tape.gradient(value, table)          # tf.IndexedSlices

    if method == "tf_densify":
        def run() -> Any:
            return tf.convert_to_tensor(tape_grad())
        return Bench(run, lambda g: _dense_result(g.numpy()))
    if method == "row_grad":
        def run() -> Any:
            return embgrad.row_grad(tape_grad())
        return Bench(run, lambda rg: _result(*rg.numpy()))
    if method == "embgrad":
        def run() -> Any:
            with embgrad.capture(model) as cap:
                value = loss()
            return cap.gradients(value).only().weight_grad
        return Bench(run, lambda rg: _result(*rg.numpy()))
    raise Unsupported(f"unknown TensorFlow method {method!r}")


def build(method: str, params: dict) -> Bench:
    """Build ``method`` on the case ``params`` (called in the child process)."""
    if params["framework"] == "torch":
        return _build_torch(method, params)
    return _build_tf(method, params)
