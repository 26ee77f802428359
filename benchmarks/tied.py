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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import GiB, Bench, Case, Unsupported, where_raised  # noqa: E402
from models import PAD, zipf_ids  # noqa: E402

import per_example  # noqa: E402
from per_example import (  # noqa: E402  (the runners shared with the untied case)
    _dense_per_example_result,
    _loop,
    _opacus_hooks,
    _plain,
    _result_dense,
)

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
    """GPT-2 with its tied wte/lm_head, next-token labels ``y``: the interface of
    ``per_example._Setup``, whose plain, loop and Opacus-hooks runners run on it unchanged."""

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
        self.y = labels
        self.emb = self.model.get_submodule(LAYER)
        self.weight_name = f"{LAYER}.weight"
        # float64 norms in the dense references: a float32 vector_norm over the V·D = 38.6M
        # entries is off by ~1e-5 relative
        self.norm_dtype = torch.float64
        self.max_norm = self._median_norm()

    def loss(self, model: Any, x: Any, mask: Any, labels: Any) -> Any:
        import torch.nn.functional as F

        logits = model(input_ids=x, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               reduction="sum", ignore_index=-100)

    def only_embedding_trainable(self) -> None:
        for name, prm in self.model.named_parameters():
            prm.requires_grad_(name == self.weight_name)

    def _median_norm(self) -> float:
        import embgrad

        with embgrad.capture(self.model, layers=LAYER) as cap:
            loss = self.loss(self.model, self.x, self.mask, self.y)
        return float(cap.gradients(loss).only().per_example().norms().median())


def _embgrad(s: _Setup) -> Bench:
    import embgrad

    def run() -> Any:
        with embgrad.capture(s.model, layers=LAYER) as cap:
            loss = s.loss(s.model, s.x, s.mask, s.y)
        pe = cap.gradients(loss).only().per_example()
        return pe.norms(), pe.clip(s.max_norm).sum().to_dense()

    return Bench(run, _result_dense)


def _vmap(s: _Setup) -> Bench:
    from torch.func import functional_call, grad, vmap

    s.only_embedding_trainable()
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
            per = per_grad(params[s.weight_name], s.x, s.mask, s.y)
        except RuntimeError as e:
            raise Unsupported(f"torch.func.vmap cannot trace GPT-2 here at {where_raised(e)}: "
                              f"{str(e).splitlines()[0][:200]}") from None
        return _dense_per_example_result(s, per)

    return Bench(run, _result_dense)


def _opacus_ghost(s: _Setup) -> Bench:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    s.only_embedding_trainable()
    try:
        gsm = GradSampleModuleFastGradientClipping(s.model, batch_first=True, loss_reduction="sum",
                                                   strict=False, max_grad_norm=s.max_norm,
                                                   use_ghost_clipping=True)
        gsm.zero_grad(set_to_none=True)
        per_loss = s.loss(gsm, s.x, s.mask, s.y)
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
    return per_example.build(method, params, _Setup, _BUILDERS)
