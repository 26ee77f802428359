"""Gradient similarity: the (N × M) matrix of inner products <G_i, G_j> between the per-example
embedding gradients of N training and M test examples (TracIn with one checkpoint, data
attribution, gradient-based retrieval).

* ``embgrad``: two captures (training set, test set), ``per_example()`` each, then
  ``train.dot(test)``: a sparse join on the rows both examples looked up;
* ``dense``: the route without embgrad: dense per-example gradients from ``torch.func``
  ``vmap(grad)``, flattened to (examples, V·D) and multiplied (test set resident, training set
  in chunks of 64 examples; the reference);
* ``captum_tracin``: Captum ``TracInCP`` on the embedding layer with one checkpoint and
  learning rate 1 (its influence scores are then exactly these inner products); Captum's
  batched per-sample trick supports only Linear and Conv2d layers, so for an embedding it
  takes one gradient per example (``sample_wise_grads_per_batch=False``).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import GiB, Bench, Case, Unsupported  # noqa: E402
from models import labels, torch_classifier, zipf_ids  # noqa: E402

METHODS = ("embgrad", "dense", "captum_tracin")
CHUNK = 64


def cases(quick: bool) -> list[Case]:
    """Issue 6, section 4: N=2,048 training and M=128 test examples at V=50k."""
    if quick:
        p = {"vocab": 5000, "dim": 32, "train": 128, "test": 16, "length": 16, "classes": 2, "seed": 0}
        budget, limit = 2 * GiB, 120.0
    else:
        p = {"vocab": 50_000, "dim": 128, "train": 2048, "test": 128, "length": 128, "classes": 2, "seed": 0}
        budget, limit = 8 * GiB, 1800.0
    title = (f"Gradient similarity (N × M inner products of per-example gradients): demo classifier, "
             f"V={p['vocab']:,}, D={p['dim']}, N={p['train']:,} training × M={p['test']} test examples, "
             f"T={p['length']}")
    return [Case("similarity" + ("_quick" if quick else ""), title, "similarity", p, METHODS,
                 reference="dense", budget_bytes=budget, time_limit_s=limit, tolerance=(1e-3, 1e-5))]


class _Setup:
    def __init__(self, p: dict):
        import torch
        import torch.nn.functional as F

        torch.manual_seed(0)
        self.p = p
        self.model = torch_classifier(p["vocab"], p["dim"], p["classes"], seed=p["seed"])
        V, T = p["vocab"], p["length"]
        self.x_train = torch.from_numpy(zipf_ids(p["train"], T, V, seed=p["seed"]))
        self.y_train = torch.from_numpy(labels(p["train"], p["classes"], seed=p["seed"]))
        self.x_test = torch.from_numpy(zipf_ids(p["test"], T, V, seed=p["seed"] + 7))
        self.y_test = torch.from_numpy(labels(p["test"], p["classes"], seed=p["seed"] + 7))
        self.F = F

    def loss(self, x: Any, y: Any) -> Any:
        return self.F.cross_entropy(self.model(x), y, reduction="sum")


def _embgrad(s: _Setup) -> Bench:
    import embgrad

    def per_example(x: Any, y: Any) -> Any:
        with embgrad.capture(s.model, layers="embedding") as cap:
            loss = s.loss(x, y)
        return cap.gradients(loss).only().per_example()

    def run() -> Any:
        return per_example(s.x_train, s.y_train).dot(per_example(s.x_test, s.y_test))

    return Bench(run, lambda m: {"scores": m.numpy()})


def _dense(s: _Setup) -> Bench:
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in s.model.named_parameters()}
    name = "embedding.weight"

    def loss_one(w: Any, x1: Any, y1: Any) -> Any:
        out = functional_call(s.model, {**params, name: w}, (x1[None],))
        return s.F.cross_entropy(out, y1[None], reduction="sum")

    per_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def flat(x: Any, y: Any) -> Any:
        return per_grad(params[name], x, y).flatten(1)            # (chunk, V·D)

    def run() -> Any:
        test = torch.cat([flat(s.x_test[i:i + CHUNK], s.y_test[i:i + CHUNK])
                          for i in range(0, s.p["test"], CHUNK)])  # (M, V·D)
        out = torch.empty(s.p["train"], s.p["test"])
        for i in range(0, s.p["train"], CHUNK):
            out[i:i + CHUNK] = flat(s.x_train[i:i + CHUNK], s.y_train[i:i + CHUNK]) @ test.T
        return out

    return Bench(run, lambda m: {"scores": m.numpy()})


def _captum_tracin(s: _Setup) -> Bench:
    import torch
    from torch.utils.data import TensorDataset

    try:
        from captum.influence import TracInCP
    except ImportError as e:
        raise Unsupported(f"captum.influence does not import: {e}") from None
    tmp = tempfile.mkdtemp(prefix="bench-tracin-")
    ckpt = str(Path(tmp) / "checkpoint.pt")
    torch.save(s.model.state_dict(), ckpt)

    def load(model: Any, path: str) -> float:
        model.load_state_dict(torch.load(path))
        return 1.0                                                 # learning rate: plain dot products

    tracin = TracInCP(s.model, TensorDataset(s.x_train, s.y_train), checkpoints=[ckpt],
                      checkpoints_load_func=load, layers=["embedding"],
                      loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=CHUNK,
                      sample_wise_grads_per_batch=False)

    def run() -> Any:
        return tracin.influence((s.x_test, s.y_test), show_progress=False)   # (M, N)

    return Bench(run, lambda m: {"scores": m.T.contiguous().numpy()})


def build(method: str, params: dict) -> Bench:
    """Build ``method`` on the case ``params`` (called in the child process)."""
    builders = {"embgrad": _embgrad, "dense": _dense, "captum_tracin": _captum_tracin}
    if method not in builders:
        raise Unsupported(f"unknown method {method!r}")
    return builders[method](_Setup(params))
