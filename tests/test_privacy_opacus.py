"""embgrad.privacy.register_opacus(): embgrad's samplers for nn.Embedding / nn.EmbeddingBag in
Opacus 1.6, checked against hand-written per-example loops of torch autograd (clip each example's
whole-model gradient to C, sum, divide by the batch as Opacus does), and Opacus's own samplers
shown off where the issue measured them."""
from __future__ import annotations

import copy
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
opacus = pytest.importorskip("opacus")

from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import embgrad
from embgrad import privacy

pytestmark = pytest.mark.filterwarnings("ignore")
C = 0.5


class Tiny(nn.Module):
    """The issue's 4-example model: token table with padding_idx=0, position table, linear head."""

    def __init__(self, positions: str = "contiguous"):
        super().__init__()
        self.tok = nn.Embedding(12, 4, padding_idx=0)
        self.pos = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 3)
        self.positions = positions

    def forward(self, x):
        B, T = x.shape
        p = torch.arange(T)
        p = {"contiguous": lambda: p.repeat(B, 1), "expanded": lambda: p.expand(B, T),
             "batch1": lambda: p[None]}[self.positions]()
        return self.head((self.tok(x) + self.pos(p)).mean(1))


X = torch.tensor([[1, 2, 0, 0], [3, 3, 4, 0], [5, 6, 7, 8], [0, 9, 2, 1]])
Y = torch.tensor([0, 1, 2, 1])


def _loop_step(model, x, y, forward=None, loss_fn=None):
    """The reference: per-example autograd gradients of the whole model, clipped Opacus's way
    (factor min(1, C / (norm + 1e-6))), summed, divided by the batch size, one SGD step (lr 1)."""
    m = copy.deepcopy(model)
    forward = forward or (lambda mod, xb: mod(xb))
    loss_fn = loss_fn or nn.functional.cross_entropy
    ps = [p for p in m.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in ps]
    for b in range(len(x)):
        grads = torch.autograd.grad(loss_fn(forward(m, x[b:b + 1]), y[b:b + 1]), ps, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        f = (C / (norm + 1e-6)).clamp(max=1.0)
        total = [t + f * g for t, g in zip(total, grads)]
    return [p.detach() - t / len(x) for p, t in zip(ps, total)]


def _opacus_step(model, mode, x, y, noise=0.0, steps=1, forward=None, loss_fn=None):
    m = copy.deepcopy(model)
    forward = forward or (lambda mod, xb: mod(xb))
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    dl = DataLoader(TensorDataset(x, y), batch_size=len(x))
    pe = PrivacyEngine()
    crit = loss_fn or nn.CrossEntropyLoss()
    kw = {"module": m, "optimizer": opt, "data_loader": dl, "noise_multiplier": noise,
          "max_grad_norm": C, "poisson_sampling": False}
    if mode == "ghost":
        m2, o2, c2, dl2 = pe.make_private(criterion=crit, grad_sample_mode="ghost", **kw)
    else:
        (m2, o2, dl2), c2 = pe.make_private(grad_sample_mode="hooks", **kw), crit
    for _ in range(steps):
        for xb, yb in dl2:
            o2.zero_grad()
            c2(forward(m2, xb), yb).backward()
            o2.step()
    return [p.detach() for p in m.parameters() if p.requires_grad], pe


def _maxdiff(a, b):
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def _registries():
    regs = (GradSampleHooks.GRAD_SAMPLERS, GradSampleHooksFastGradientClipping.GRAD_SAMPLERS,
            GradSampleHooksFastGradientClipping.NORM_SAMPLERS)
    return ([{k: r.get(k) for k in (nn.Embedding, nn.EmbeddingBag, nn.Linear)} for r in regs],
            GradSampleHooks.__dict__.get("capture_activations_hook"),
            GradSampleHooksFastGradientClipping.__dict__.get("capture_activations_hook"))


def test_register_and_restore():
    before = _registries()
    reg = privacy.register_opacus()
    assert "active=True" in repr(reg)
    inside = _registries()
    assert inside != before
    assert GradSampleHooksFastGradientClipping.NORM_SAMPLERS[nn.EmbeddingBag] is not None
    with privacy.register_opacus():          # nested: its exit restores the outer registration
        pass
    assert _registries() == inside
    reg.remove()
    reg.remove()                             # idempotent
    assert _registries() == before
    with pytest.raises(RuntimeError), privacy.register_opacus():
        raise RuntimeError("user code raising inside")
    assert _registries() == before


@pytest.mark.parametrize("positions", ["contiguous", "expanded", "batch1"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_one_opacus_step_equals_the_per_example_loop(mode, positions):
    torch.manual_seed(0)
    model = Tiny(positions).double()
    want = _loop_step(model, X, Y)
    with privacy.register_opacus():
        got, _ = _opacus_step(model, mode, X, Y)
    assert _maxdiff(got, want) < 1e-12


def test_opacus_alone_is_off_where_the_issue_says():
    """What embgrad fixes: Opacus's own hooks mode updates the padding row (0.008 off here), its
    ghost mode is 2e-4 off, and position ids of batch 1 crash both modes."""
    torch.manual_seed(0)
    model = Tiny("contiguous").double()
    want = _loop_step(model, X, Y)
    assert _maxdiff(_opacus_step(model, "hooks", X, Y)[0], want) > 1e-3
    assert _maxdiff(_opacus_step(model, "ghost", X, Y)[0], want) > 1e-5
    with pytest.raises(RuntimeError, match="stack expects"):
        _opacus_step(Tiny("batch1").double(), "ghost", X, Y)


def test_epsilon_from_opacus_accountant_is_unchanged():
    torch.manual_seed(0)
    model = Tiny("expanded")
    _, plain = _opacus_step(model, "hooks", X, Y, noise=1.3, steps=3)
    with privacy.register_opacus():
        _, ours = _opacus_step(model, "ghost", X, Y, noise=1.3, steps=3)
    assert ours.get_epsilon(1e-5) == plain.get_epsilon(1e-5) > 0
    assert ours.accountant.history == plain.accountant.history


# ------------------------------------------------------------------ EmbeddingBag, sampler level
class Bag(nn.Module):
    def __init__(self, mode, padding_idx=None, include_last_offset=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(15, 4, mode=mode, padding_idx=padding_idx,
                                   include_last_offset=include_last_offset)
        self.head = nn.Linear(4, 2)

    def forward(self, *args):
        return self.head(self.bag(*args))


def _bag_case(form, mode, psw, padding, last):
    g = torch.Generator().manual_seed(3)
    if form == "2d":
        inp = torch.randint(0, 15, (5, 3), generator=g)
        args = [inp]
        B = 5
    else:
        inp = torch.randint(0, 15, (13,), generator=g)
        offsets = torch.tensor([0, 2, 2, 7, 10])        # bag 1 empty
        if last:
            offsets = torch.cat([offsets, torch.tensor([13])])
        args = [inp, offsets]
        B = 5
    if padding is not None:
        inp[inp % 4 == 0] = padding
    if psw:
        args.append(torch.rand(inp.numel(), generator=g, dtype=torch.float64))
    return args, B


@pytest.mark.parametrize("form,mode,psw,padding,last", [
    ("1d", "sum", False, None, False), ("1d", "sum", True, 2, False), ("1d", "mean", False, 2, False),
    ("1d", "max", False, None, False), ("1d", "sum", True, None, True), ("1d", "mean", False, None, True),
    ("2d", "sum", False, 2, False), ("2d", "mean", False, None, False), ("2d", "max", False, 2, False),
])
@pytest.mark.parametrize("ghost", [True, False])
def test_embedding_bag_samplers_equal_autograd_per_example(form, mode, psw, padding, last, ghost):
    torch.manual_seed(1)
    model = Bag(mode, padding, last).double()
    args, B = _bag_case(form, mode, psw, padding, last)
    y = torch.randint(0, 2, (B,))
    # reference: the gradient of example b's loss alone, from the full batch's forward
    ref = []
    for b in range(B):
        out = model(*args)
        loss = nn.functional.cross_entropy(out[b:b + 1], y[b:b + 1], reduction="sum")
        ref.append(torch.autograd.grad(loss, model.bag.weight)[0])
    ref = torch.stack(ref)
    with privacy.register_opacus():
        if ghost:
            gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), loss_reduction="sum",
                                                       max_grad_norm=C)
        else:
            gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
        out = gsm(*args)
        nn.functional.cross_entropy(out, y, reduction="sum").backward()
        w = gsm._module.bag.weight
        if ghost:
            torch.testing.assert_close(w._norm_sample, ref.reshape(B, -1).norm(dim=1), rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(w.grad_sample, ref, rtol=1e-10, atol=1e-12)


def test_embedding_bag_keyword_per_sample_weights_is_refused():
    model = Bag("sum").double()
    inp, offsets = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])
    w = torch.rand(4, dtype=torch.float64) + 0.5
    with privacy.register_opacus():
        gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=C)
        with pytest.raises(embgrad.EmbgradError, match="positionally"):
            gsm._module.bag(inp, offsets, per_sample_weights=w)


def test_scale_grad_by_freq_is_refused():
    model = nn.Sequential(nn.Embedding(10, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 2))
    with privacy.register_opacus():
        gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=C)
        out = gsm(torch.tensor([[1, 2], [3, 3]]))
        with pytest.raises(embgrad.EmbgradError, match="scale_grad_by_freq"):
            out.sum().backward()


# ------------------------------------------------------------------ tied tables
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.proj = nn.Linear(4, 4)
        self.out = nn.Linear(4, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.proj(self.emb(x)))).mean(1)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_tied_table_is_exact(mode):
    """Embedding + tied output projection: hooks mode (Opacus sums both uses' per-example
    gradients) and ghost mode (embgrad's whole-table norm with the cross term) equal the loop;
    Opacus alone refuses ghost mode."""
    torch.manual_seed(2)
    model = TiedLM().double()
    x = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 5, 6], [7, 8, 9]])
    y = torch.tensor([1, 2, 3, 4])
    want = _loop_step(model, x, y)
    with privacy.register_opacus():
        got, _ = _opacus_step(model, mode, x, y)
    assert _maxdiff(got, want) < 1e-12
    if mode == "ghost":
        with pytest.raises(NotImplementedError, match="tying"):
            _opacus_step(model, "ghost", x, y)


def test_tied_table_used_twice_by_lookups_is_refused_in_ghost_mode():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(10, 3), nn.Embedding(10, 3)
            self.b.weight = self.a.weight
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.a(x).mean(1) + self.b(x).mean(1))

    x, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
    with privacy.register_opacus(), pytest.raises(embgrad.EmbgradError, match="hooks"):
        _opacus_step(Twice().double(), "ghost", x, y)


# ------------------------------------------------------------------ Hugging Face models
def _gpt2(tie):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                  tie_word_embeddings=tie, attn_pdrop=0.0, embd_pdrop=0.0,
                                  resid_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _lm_loss(out, y):
    logits = out.logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))


class LMLoss(nn.Module):
    """Next-token cross-entropy; with reduction "none" one loss per sequence (Opacus's ghost
    criterion asks for that), else the mean over sequences."""

    reduction = "mean"

    def forward(self, out, y):
        logits = out.logits[:, :-1]
        tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                          reduction="none").reshape(y.shape[0], -1).mean(1)
        return tok if self.reduction == "none" else tok.mean()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_gpt2_one_step_equals_the_per_example_loop(mode):
    """GPT-2 built from a config (position ids of batch size 1, broadcast over the batch; the
    token table tied to lm_head), against the loop, in both Opacus modes."""
    torch.manual_seed(0)
    model = _gpt2(tie=True).double()
    x = torch.randint(0, 50, (3, 6))
    fwd = lambda m, xb: m(input_ids=xb)
    want = _loop_step(model, x, x, forward=fwd, loss_fn=LMLoss())
    with privacy.register_opacus():
        got, _ = _opacus_step(model, mode, x, x, forward=fwd, loss_fn=LMLoss())
    assert _maxdiff(got, want) < 1e-10


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_full_dp_fine_tuning_in_ghost_mode(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    B, T, V = 4, 8, 50
    if arch == "gpt2":
        model = _gpt2(tie=True)              # token table tied to lm_head
        x = torch.randint(0, V, (16, T))
        y = x
    else:
        cfg = transformers.BertConfig(vocab_size=V, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16,
                                      max_position_embeddings=16, num_labels=2)
        model = transformers.BertForSequenceClassification(cfg)
        x = torch.randint(1, V, (16, T))
        y = torch.randint(0, 2, (16,))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dl = DataLoader(TensorDataset(x, y), batch_size=B)
    crit = nn.CrossEntropyLoss()
    with privacy.register_opacus(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pe = PrivacyEngine()
        m2, o2, c2, dl2 = pe.make_private(module=model, optimizer=opt, data_loader=dl, criterion=crit,
                                          noise_multiplier=1.0, max_grad_norm=1.0,
                                          grad_sample_mode="ghost")
        steps = 0
        for xb, yb in dl2:
            if len(xb) == 0:
                continue
            o2.zero_grad()
            logits = m2(input_ids=xb).logits
            if arch == "gpt2":
                loss = c2(logits[:, :-1].reshape(-1, V), yb[:, 1:].reshape(-1),
                          shape=(len(xb), T - 1, V))
            else:
                loss = c2(logits, yb)
            loss.backward()
            o2.step()
            steps += 1
    assert steps >= 2
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    emb = "transformer.wpe.weight" if arch == "gpt2" else "bert.embeddings.position_embeddings.weight"
    assert emb in moved            # position table trained (noised) in ghost mode
    assert 0 < pe.get_epsilon(1e-5) < float("inf")


# ------------------------------------------------------------------ sparse noise under Opacus
class Rec(nn.Module):
    def __init__(self, V, sparse=True):
        super().__init__()
        self.emb = nn.Embedding(V, 4, sparse=sparse)
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(self.emb(ids).sum(1))


def _sparse_run(V, mech, ids, y, seed=0, sparse=True, rows=None, mode="ghost"):
    torch.manual_seed(seed)
    model = Rec(V, sparse)
    before = model.emb.weight.detach().clone(), model.head.weight.detach().clone()
    dl = DataLoader(TensorDataset(ids, y), batch_size=len(y))
    with privacy.register_opacus():
        pe = PrivacyEngine()
        kw = {"module": model, "optimizer": torch.optim.SGD(model.parameters(), lr=1.0), "data_loader": dl,
              "noise_multiplier": mech.noise_multiplier, "max_grad_norm": mech.max_grad_norm,
              "poisson_sampling": False, "grad_sample_mode": mode}
        if mode == "ghost":
            m2, opt, crit, dl2 = pe.make_private(criterion=nn.CrossEntropyLoss(), **kw)
        else:
            (m2, opt, dl2), crit = pe.make_private(**kw), nn.CrossEntropyLoss()
        sparse_opt = privacy.sparse_noise_optimizer(opt, mech, model.emb, rows=rows, rng=seed)
        for xb, yb in dl2:
            sparse_opt.zero_grad()
            crit(m2(xb), yb).backward()
            sparse_opt.step()
    return model, before, pe, sparse_opt


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_adafest_under_opacus_noises_only_selected_rows(mode):
    V, C = 5000, 1.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (32, 6), generator=g)           # 20 frequent rows
    y = torch.randint(0, 2, (32,), generator=g)
    # a threshold no count reaches: the table does not move at all; the head does
    m = privacy.DPAdaFEST(noise_multiplier=1.0, max_grad_norm=C, threshold=1e3)
    model, (emb0, head0), _, _ = _sparse_run(V, m, ids, y, mode=mode, sparse=(mode == "ghost"))
    assert torch.equal(model.emb.weight.detach(), emb0)
    assert not torch.equal(model.head.weight.detach(), head0)
    # threshold 0: about half the untouched rows pass; each moved by lr * N(0, (σ_grad C)²) / B
    m0 = privacy.DPAdaFEST(noise_multiplier=1.0, max_grad_norm=C, threshold=0.0)
    model, (emb0, _), engine, opt = _sparse_run(V, m0, ids, y, mode=mode, sparse=(mode == "ghost"))
    delta = (model.emb.weight.detach() - emb0)[20:]            # untouched rows: pure noise
    moved = delta.abs().sum(1) > 0
    n = int(moved.sum())
    assert abs(n - (V - 20) / 2) < 5 * math.sqrt((V - 20) / 4)
    noise = delta[moved].reshape(-1) * len(y)
    std = m0.gradient_noise_std
    assert abs(float(noise.std()) - std) < 5 * std / math.sqrt(2 * noise.numel())
    # Opacus's accountant charged σ, the mechanism's equivalent Gaussian
    assert engine.accountant.history[-1][0] == m0.noise_multiplier
    assert type(opt).__name__.startswith("SparseNoise")


def test_fest_under_opacus_updates_only_the_fixed_rows():
    V = 300
    ids = torch.randint(0, 300, (16, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))
    fixed = privacy.top_k_rows(torch.arange(V, dtype=torch.float64).numpy(), 10, like=torch.zeros(1))
    m = privacy.DPFEST(noise_multiplier=0.5, max_grad_norm=1.0)
    model, (emb0, _), _, _ = _sparse_run(V, m, ids, y, rows=fixed)
    moved = torch.nonzero((model.emb.weight.detach() - emb0).abs().sum(1) > 0).reshape(-1)
    assert moved.tolist() == list(range(290, 300))


def test_sparse_noise_optimizer_errors():
    model = Rec(50)
    dl = DataLoader(TensorDataset(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
                    batch_size=4)
    with privacy.register_opacus():
        _, opt, _ = PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                                                 data_loader=dl, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(embgrad.EmbgradError, match="must equal the mechanism"):
        privacy.sparse_noise_optimizer(opt, privacy.DPAdaFEST(2.0, 1.0, threshold=1.0), model.emb)
    with pytest.raises(embgrad.EmbgradError, match="DPOptimizer"):
        privacy.sparse_noise_optimizer(torch.optim.SGD(model.parameters(), lr=1),
                                       privacy.DPAdaFEST(1.0, 1.0, threshold=1.0), model.emb)
    with pytest.raises(embgrad.EmbgradError, match="num_tables"):
        privacy.sparse_noise_optimizer(opt, privacy.DPAdaFEST(1.0, 1.0, threshold=1.0, num_tables=2), model.emb)
