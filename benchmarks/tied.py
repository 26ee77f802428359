"""Tied tables: per-example gradients of a GPT-2 input embedding shared with its output head.

The DP-SGD task on a tied table (issue 14): each example's gradient norm ‖G_b‖ of the WHOLE
(V, D) table (lookups + the ``lm_head`` projection + their cross term) and the clipped sum
Σ_b min(1, C/‖G_b‖) G_b, with C the median norm. A Hugging Face ``GPT2LMHeadModel`` built from
its config (random weights) at GPT-2-small's shape (V=50,257, D=768, 12 heads, T=128, B=8;
fewer blocks than 12 so that it runs on 2 cores), a token-level cross-entropy summed over each
example's unpadded next-token labels (-100 elsewhere). Methods, each in its own process:

* ``embgrad``: one forward inside ``embgrad.capture``, ``cap.gradients(loss)``,
  ``per_example().norms()`` and ``.clip(C).sum()`` (whole table: projection part by T×T Gram
  matrices, the clipped projection sum as one (V, B·T) @ (B·T, D) product);
* ``plain``: an ordinary forward + ``loss.backward()`` (no per-example anything);
* ``loop``: one forward + backward per example (the reference);
* ``vmap``: ``torch.func.vmap(grad(...))`` over the examples, (B, V, D) gradients;
* ``opacus_hooks``: Opacus ``GradSampleModule``: (B, V, D) ``grad_sample`` from the embedding's
  and the head's hooks (Opacus sums the two for the shared parameter);
* ``opacus_ghost``: Opacus ghost clipping, which refuses tied parameters.

Peers compute the tied table's per-example gradients only (every other parameter frozen);
``plain`` computes every parameter's gradient, as training does.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import GiB, Bench, Case, Unsupported, sparse_rows, where_raised  # noqa: E402
from models import PAD, zipf_ids  # noqa: E402

METHODS = ("embgrad", "plain", "loop", "vmap", "opacus_hooks", "opacus_ghost")
REFERENCE = "loop"
LAYER = "transformer.wte"


def gpt2_params(vocab: int = 50_257, dim: int = 768, layers: int = 2, heads: int = 12,
                batch: int = 8, length: int = 128) -> dict:
    return {"vocab": vocab, "dim": dim, "layers": layers, "heads": heads, "batch": batch,
            "length": length, "seed": 0}


def cases(quick: bool) -> list[Case]:
    """Issue 14's benchmark: GPT-2-small's tied wte/lm_head (2 blocks)."""
    if quick:
        p, budget, limit = gpt2_params(1000, 32, 1, 2, 3, 16), 2 * GiB, 120.0
    else:
        p, budget, limit = gpt2_params(), 8 * GiB, 1800.0
    title = (f"Tied table (GPT-2 wte = lm_head), whole-table per-example norms + clipped sum: "
             f"GPT2LMHeadModel from its config, V={p['vocab']:,}, D={p['dim']}, {p['layers']} blocks, "
             f"{p['heads']} heads, B={p['batch']}, T={p['length']}")
    notes = ("Checked at rtol 1e-4 against the per-example loop: the transformer's float32 sums run in "
             "another order for one example than for eight.",
             "Opacus's ghost clipping refuses tied parameters by design; its hooks mode and vmap form "
             "the (B, V, D) per-example gradients (1.2 GB at these sizes).")
    if quick:   # the harness's default repeats (tests/test_bench_quick.py checks them)
        return [Case(key="tied_gpt2_quick", title=title, module="tied", params=p,
                     methods=("embgrad", "plain", "loop", "vmap", "opacus_ghost"),
                     reference=REFERENCE, budget_bytes=budget, time_limit_s=limit,
                     tolerance=(1e-4, 1e-6), notes=notes)]
    return [Case(key="tied_gpt2", title=title, module="tied", params=p, methods=METHODS,
                 reference=REFERENCE, budget_bytes=budget, time_limit_s=limit, repeats=3,
                 min_total_s=0.0, tolerance=(1e-4, 1e-6), notes=notes)]


class _Setup:
    def __init__(self, p: dict):
        import torch
        import transformers

        torch.manual_seed(0)
        self.p = p
        # dropout off, train mode (Opacus records activations only in train mode): deterministic
        cfg = transformers.GPT2Config(vocab_size=p["vocab"], n_positions=p["length"], n_embd=p["dim"],
                                      n_layer=p["layers"], n_head=p["heads"], resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = transformers.GPT2LMHeadModel(cfg).train()
        B, T, V = p["batch"], p["length"], p["vocab"]
        self.x = torch.from_numpy(zipf_ids(B, T, V, seed=p["seed"]))
        self.mask = (self.x != PAD).long()
        labels = self.x.clone()
        labels[self.mask == 0] = -100
        self.labels = labels
        self.emb = self.model.get_submodule(LAYER)
        self.weight_name = f"{LAYER}.weight"
        self.max_norm = self._median_norm()

    def loss(self, model: Any, x: Any, mask: Any, labels: Any) -> Any:
        import torch.nn.functional as F

        logits = model(input_ids=x, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               reduction="sum", ignore_index=-100)

    def only_table_trainable(self) -> None:
        for name, prm in self.model.named_parameters():
            prm.requires_grad_(name == self.weight_name)

    def _median_norm(self) -> float:
        import embgrad

        with embgrad.capture(self.model, layers=LAYER) as cap:
            loss = self.loss(self.model, self.x, self.mask, self.labels)
        return float(cap.gradients(loss).only().per_example().norms().median())


def _dense_result(s: _Setup, per: Any) -> tuple[Any, Any]:
    import torch

    # float64 norms: a float32 vector_norm over the V·D = 38.6M entries is off by ~1e-5 relative
    norms = torch.linalg.vector_norm(per.flatten(1), dim=1, dtype=torch.float64).float()
    factor = (s.max_norm / norms.clamp(min=1e-30)).clamp(max=1.0)
    return norms, torch.tensordot(factor, per, dims=1)


def _result(out: tuple[Any, Any]) -> dict[str, np.ndarray]:
    norms, clipped = out
    rows, values = sparse_rows(clipped.detach().numpy())
    return {"norms": norms.detach().numpy(), "clipped_rows": rows, "clipped_values": values}


def _embgrad(s: _Setup) -> Bench:
    import embgrad

    def run() -> Any:
        with embgrad.capture(s.model, layers=LAYER) as cap:
            loss = s.loss(s.model, s.x, s.mask, s.labels)
        pe = cap.gradients(loss).only().per_example()
        return pe.norms(), pe.clip(s.max_norm).sum().to_dense()

    return Bench(run, _result)


def _plain(s: _Setup) -> Bench:
    def run() -> Any:
        s.loss(s.model, s.x, s.mask, s.labels).backward()
        g = s.emb.weight.grad
        s.model.zero_grad(set_to_none=True)
        return g

    def result(g: Any) -> dict[str, np.ndarray]:
        rows, values = sparse_rows(g.numpy())
        return {"grad_rows": rows, "grad_values": values}

    return Bench(run, result)


def _loop(s: _Setup) -> Bench:
    import torch

    s.only_table_trainable()
    w = s.emb.weight

    def per_example(clip: bool) -> tuple[Any, Any]:
        norms = torch.empty(s.p["batch"])
        acc = torch.zeros_like(w)
        for b in range(s.p["batch"]):
            w.grad = None
            sl = slice(b, b + 1)
            s.loss(s.model, s.x[sl], s.mask[sl], s.labels[sl]).backward()
            g = w.grad
            n = torch.linalg.vector_norm(g, dtype=torch.float64).float()   # float32 loses ~1e-5 here
            norms[b] = n
            acc.add_(g, alpha=min(1.0, s.max_norm / max(float(n), 1e-30)) if clip else 1.0)
        w.grad = None
        return norms, acc

    def result(out: Any) -> dict[str, np.ndarray]:
        res = _result(out)
        _, total = per_example(clip=False)
        res["grad_rows"], res["grad_values"] = sparse_rows(total.numpy())
        return res

    return Bench(lambda: per_example(clip=True), result)


def _vmap(s: _Setup) -> Bench:
    from torch.func import functional_call, grad, vmap

    s.only_table_trainable()
    params = {k: v.detach() for k, v in s.model.named_parameters()}
    buffers = dict(s.model.named_buffers())

    def loss_one(w: Any, x1: Any, m1: Any, l1: Any) -> Any:
        p = {**params, s.weight_name: w}    # lm_head.weight is the same tensor: tied in the call
        # no attention mask: Hugging Face's mask code branches on its values, which vmap cannot
        # trace; with right padding, causal attention and -100 labels there, nothing changes
        return s.loss(lambda **kw: functional_call(s.model, (p, buffers), (), {"input_ids": kw["input_ids"]}),
                      x1[None], m1[None], l1[None])

    per_grad = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))

    def run() -> Any:
        try:
            per = per_grad(params[s.weight_name], s.x, s.mask, s.labels)
        except RuntimeError as e:
            raise Unsupported(f"torch.func.vmap cannot trace GPT-2 here at {where_raised(e)}: "
                              f"{str(e).splitlines()[0][:200]}") from None
        return _dense_result(s, per)

    return Bench(run, _result)


def _opacus_hooks(s: _Setup) -> Bench:
    from opacus import GradSampleModule

    s.only_table_trainable()
    gsm = GradSampleModule(s.model, batch_first=True, loss_reduction="sum", strict=False)
    w = s.emb.weight

    def run() -> Any:
        gsm.zero_grad(set_to_none=True)
        try:
            s.loss(gsm, s.x, s.mask, s.labels).backward()
        except ValueError as e:
            raise Unsupported(f"Opacus hooks on the tied wte/lm_head: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}") from None
        per = w.grad_sample
        out = _dense_result(s, per)
        gsm.zero_grad(set_to_none=True)
        return out

    return Bench(run, _result)


def _opacus_ghost(s: _Setup) -> Bench:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    s.only_table_trainable()
    try:
        gsm = GradSampleModuleFastGradientClipping(s.model, batch_first=True, loss_reduction="sum",
                                                   strict=False, max_grad_norm=s.max_norm,
                                                   use_ghost_clipping=True)
        gsm.zero_grad(set_to_none=True)
        per_loss = s.loss(gsm, s.x, s.mask, s.labels)
        per_loss.backward()
        gsm.get_norm_sample()
    except Exception as e:   # noqa: BLE001 — Opacus's own refusal, reported as the reason
        raise Unsupported(f"Opacus ghost clipping: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    raise Unsupported("Opacus ghost clipping ran on a tied table without refusing; not measured")


_BUILDERS: dict[str, Callable[[_Setup], Bench]] = {
    "embgrad": _embgrad, "plain": _plain, "loop": _loop, "vmap": _vmap,
    "opacus_hooks": _opacus_hooks, "opacus_ghost": _opacus_ghost,
}


def build(method: str, params: dict) -> Bench:
    """Build ``method`` on the case ``params`` (called in the child process)."""
    if method not in _BUILDERS:
        raise Unsupported(f"unknown method {method!r}")
    import torch

    s = _Setup(params)
    bench = _BUILDERS[method](s)
    meta = {"max_norm": s.max_norm, "threads": torch.get_num_threads(), "lookups": int(s.mask.sum())}
    return Bench(bench.run, bench.result, bench.evals, {**bench.meta, **meta})
