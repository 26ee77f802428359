"""Benchmark: differentially private training of a recommender with a 10^6-row table.

Task (synthetic, planted): each example holds F ids drawn from a Zipf law over V = 10^6 rows;
each row has a planted weight θ_r ~ N(0, 1); the click is Bernoulli(sigmoid(Σ_f θ_id / √F · 2)).
Model: an (V, D) embedding table, the example's looked-up vectors summed, a linear head; binary
cross-entropy. One epoch of shuffled fixed-size batches (B = 1024), SGD, per-example clipping of
the whole model's gradient to C (table by embgrad's sparse per-example norms, head in closed
form), then:

(a) non-private sparse SGD (torch sparse gradients, no clipping, no noise);
(b) dense DP-SGD: N(0, (σC)²) on all V·D table entries every step;
(c) DP-FEST: noise and updates only on the k most frequent rows of a disjoint PUBLIC sample;
(d) DP-AdaFEST: rows selected per step from noisy contribution counts (threshold τ, a share f of
    the budget), noise only on them.

σ is calibrated per ε ∈ {1, 3, 8} with δ = 1/N by dp-accounting's RDP accountant (Poisson
sampling assumed at rate B/N, as Opacus reports). Reported: median step time, non-zero gradient
rows per step (rows the update touches), test AUC after the epoch.

Second part: Opacus 1.6 ghost clipping of the same model's table, Opacus's own embedding norm
sampler vs embgrad's registered one (:func:`embgrad.privacy.register_opacus`): step time and peak
memory, each in its own process.

Run standalone (``python benchmarks/privacy.py [--quick]``) or through ``benchmarks/run.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _config(quick: bool) -> dict:
    if quick:
        return {"V": 20_000, "D": 8, "F": 8, "N": 8_000, "N_test": 2_000, "B": 256,
                "eps": [3.0], "opacus_V": 20_000, "opacus_B": 64, "opacus_steps": 4}
    return {"V": 1_000_000, "D": 8, "F": 8, "N": 200_000, "N_test": 50_000, "B": 1024,
            "eps": [1.0, 3.0, 8.0], "opacus_V": 1_000_000, "opacus_B": 256, "opacus_steps": 20}


def make_data(cfg: dict, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    V, F = cfg["V"], cfg["F"]
    theta = g.standard_normal(V)
    perm = g.permutation(V)              # frequent rows spread over the table

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        ranks = np.minimum(g.zipf(1.15, size=(n, F)) - 1, V - 1)
        ids = perm[ranks]
        logit = theta[ids].sum(1) / math.sqrt(F) * 2.0
        y = (g.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        return ids.astype(np.int64), y

    train, test = draw(cfg["N"]), draw(cfg["N_test"])
    public_ids, _ = draw(cfg["N"] // 4)                     # disjoint public sample (ids only)
    public_counts = np.bincount(public_ids.reshape(-1), minlength=V)
    return {"train": train, "test": test, "public_counts": public_counts}


def train(method: str, cfg: dict, data: dict, sigma: float = 0.0, C: float = 1.0, lr: float = 4.0,
          fest_k: int = 20_000, threshold: float = 0.0, fraction: float = 0.5, seed: int = 0) -> dict:
    import torch
    from sklearn.metrics import roc_auc_score
    from torch import nn

    import embgrad
    from embgrad import privacy

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    V, D, B = cfg["V"], cfg["D"], cfg["B"]
    emb = nn.Embedding(V, D, sparse=True)
    with torch.no_grad():
        emb.weight.normal_(0, 0.01)
    head = nn.Linear(D, 1)
    ids_all, y_all = data["train"]
    N = len(y_all)
    order = np.random.default_rng(seed).permutation(N)
    rng = np.random.default_rng(seed + 1)
    mech: object = None
    fixed = None
    if method == "dense":
        mech = privacy.DPSGD(sigma, C)
    elif method == "fest":
        mech = privacy.DPFEST(sigma, C)
        fixed = privacy.top_k_rows(data["public_counts"].astype(float), min(fest_k, V // 5), like=torch.zeros(1))
    elif method == "adafest":
        mech = privacy.DPAdaFEST(sigma, C, threshold=threshold, selection_fraction=fraction)
    times, rows_per_step = [], []
    for s in range(N // B):
        idx = order[s * B:(s + 1) * B]
        ids = torch.from_numpy(ids_all[idx])
        y = torch.from_numpy(y_all[idx])
        t0 = time.perf_counter()
        if method == "sparse":
            emb.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            logit = head(emb(ids).sum(1)).squeeze(-1)
            nn.functional.binary_cross_entropy_with_logits(logit, y).backward()
            with torch.no_grad():
                g = emb.weight.grad.coalesce()
                emb.weight.index_add_(0, g.indices()[0], g.values(), alpha=-lr)
                for p in head.parameters():
                    p.add_(p.grad, alpha=-lr)
            n_rows = int(g.indices().shape[1])
        else:
            with embgrad.capture(emb) as cap:
                s_vec = emb(ids).sum(1)
            s_det = s_vec.detach()
            logit = head(s_det).squeeze(-1)
            r = (torch.sigmoid(logit) - y).detach()                       # dLoss_b/dlogit_b
            # table: dLoss_b/d(looked-up vectors) = r_b * w, the same for every id of example b
            out_grad = (r[:, None] * head.weight.detach()[0][None, :])[:, None, :].expand(-1, ids.shape[1], -1)
            pe = embgrad.rows_from_lookups(ids, out_grad, V, per_example=True)
            del cap
            head_sq = r ** 2 * ((s_det ** 2).sum(1) + 1.0)                 # weight and bias
            norms = torch.sqrt(pe.norms() ** 2 + head_sq)
            f = (C / (norms + 1e-6)).clamp(max=1.0)
            table = pe.scale(f).sum()
            gw = (f * r) @ s_det
            gb = (f * r).sum()
            gstd = mech.gradient_noise_std                                   # type: ignore[attr-defined]
            gw = gw + torch.from_numpy(rng.standard_normal(D).astype(np.float32)) * gstd
            gb = gb + float(rng.standard_normal()) * gstd
            with torch.no_grad():
                if method == "dense":
                    dense = mech.privatize(table, rng)                       # type: ignore[attr-defined]
                    emb.weight.add_(dense, alpha=-lr / B)
                    n_rows = V
                else:
                    if method == "fest":
                        noisy = mech.privatize(table, fixed, rng)            # type: ignore[attr-defined]
                    else:
                        counts = privacy.contribution_counts(pe)
                        noisy = mech.privatize(table, counts, rng)           # type: ignore[attr-defined]
                    emb.weight.index_add_(0, noisy.rows, noisy.values, alpha=-lr / B)
                    n_rows = len(noisy)
                head.weight.add_(gw[None, :], alpha=-lr / B)
                head.bias.add_(gb, alpha=-lr / B)
        times.append(time.perf_counter() - t0)
        rows_per_step.append(n_rows)
    with torch.no_grad():
        ti, ty = data["test"]
        score = head(emb(torch.from_numpy(ti)).sum(1)).squeeze(-1).numpy()
    return {"step_ms": float(np.median(times[2:]) * 1e3), "rows_per_step": float(np.mean(rows_per_step)),
            "auc": float(roc_auc_score(ty, score)), "steps": len(times)}


_OPACUS_CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from opacus import PrivacyEngine
from embgrad import privacy
torch.set_num_threads(1)
V, D, F, B, steps, which = int(sys.argv[1]), 8, 8, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
g = np.random.default_rng(0)
ids = torch.from_numpy(np.minimum(g.zipf(1.15, size=(B * steps, F)) - 1, V - 1)).long()
y = torch.from_numpy((g.random(B * steps) < 0.5).astype(np.float32))
model = nn.Sequential(nn.Embedding(V, D), nn.Flatten(), nn.Linear(F * D, 1), nn.Flatten(0))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
dl = DataLoader(TensorDataset(ids, y), batch_size=B)
reg = privacy.register_opacus() if which == "embgrad" else None
m2, o2, c2, dl2 = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=dl,
    criterion=nn.BCEWithLogitsLoss(), noise_multiplier=1.0, max_grad_norm=1.0,
    grad_sample_mode="ghost", poisson_sampling=False)
times = []
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = rss("VmRSS")
for xb, yb in dl2:
    t0 = time.perf_counter()
    o2.zero_grad(); c2(m2(xb), yb).backward(); o2.step()
    times.append(time.perf_counter() - t0)
print("@@" + json.dumps({"step_ms": float(np.median(times[2:]) * 1e3),
                         "peak_mib": (rss("VmHWM") - base) / 2**20}))
"""


def opacus_compare(cfg: dict) -> dict:
    out = {}
    root = HERE.parent
    env = dict(os.environ, PYTHONPATH=str(root / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for which in ("opacus", "embgrad"):
        p = subprocess.run([sys.executable, "-c", _OPACUS_CHILD, str(cfg["opacus_V"]), str(cfg["opacus_B"]),
                            str(cfg["opacus_steps"]), which], capture_output=True, text=True,
                           timeout=1800, env=env, check=False)
        line = [x for x in p.stdout.splitlines() if x.startswith("@@")]
        out[which] = json.loads(line[-1][2:]) if line else {"error": (p.stderr or "no output")[-300:]}
    return out


def main(quick: bool = False) -> dict:
    from embgrad import privacy

    cfg = _config(quick)
    data = make_data(cfg)
    N, B = cfg["N"], cfg["B"]
    q, steps, delta = B / N, N // B, 1.0 / N
    C, frac = 1.0, 0.5
    rows = []
    base = train("sparse", cfg, data, lr=1.0)
    rows.append(("(a) non-private sparse SGD", "∞", "-", base))
    for eps in cfg["eps"]:
        sigma = privacy.noise_multiplier_for(lambda s: privacy.DPSGD(s, C), epsilon=eps, sample_rate=q,
                                             steps=steps, delta=delta)
        sel_std = privacy.DPAdaFEST(sigma, C, threshold=0.0, selection_fraction=frac).selection_noise_std
        tau = 3.0 * sel_std                      # false-positive rate Φ̄(3) ≈ 1.3e-3 per untouched row
        for label, method, kw in (("(b) dense DP-SGD", "dense", {}),
                                  (f"(c) DP-FEST (k={min(20_000, cfg['V'] // 5)}, public counts)", "fest", {}),
                                  ("(d) DP-AdaFEST", "adafest", {"threshold": tau, "fraction": frac})):
            r = train(method, cfg, data, sigma=sigma, C=C, **kw)
            rows.append((label, f"{eps:g}", f"{sigma:.3f}", r))
    opc = opacus_compare(cfg)
    md = [f"Recommender task: V = {cfg['V']:,} rows (D = {cfg['D']}), {cfg['F']} Zipf(1.15) ids per "
          f"example, N = {N:,} training examples, B = {B}, one epoch ({steps} steps), δ = 1/N, C = {C}, "
          f"SGD lr 1 (non-private, mean loss) and 4 (DP, noisy sum / B); AdaFEST: τ = 3·σ_sel, selection share f = {frac}. 1 thread; the machine is shared "
          "(timings noisy, ratios from the same run).", "",
          "| method | ε | σ | step (ms) | non-zero rows / step | test AUC |", "|---|---|---|---|---|---|"]
    for label, eps, sig, r in rows:
        md.append(f"| {label} | {eps} | {sig} | {r['step_ms']:.2f} | {r['rows_per_step']:,.0f} | {r['auc']:.4f} |")
    md.append("")
    checks = []
    for eps in cfg["eps"]:
        d = next(r for lab, e, _, r in rows if e == f"{eps:g}" and lab.startswith("(b)"))
        a = next(r for lab, e, _, r in rows if e == f"{eps:g}" and lab.startswith("(d)"))
        fewer = d["rows_per_step"] / max(a["rows_per_step"], 1)
        checks.append(f"ε={eps:g}: AdaFEST touches {fewer:,.0f}× fewer rows than dense DP-SGD (target ≥ 100×: "
                      f"{'met' if fewer >= 100 else 'MISSED'}); AUC {a['auc']:.4f} vs dense {d['auc']:.4f} "
                      f"(target within 0.01 or better: {'met' if a['auc'] >= d['auc'] - 0.01 else 'MISSED'}); "
                      f"step {a['step_ms'] / base['step_ms']:.2f}× the non-private sparse step (target ≤ 1.5×: "
                      f"{'met' if a['step_ms'] <= 1.5 * base['step_ms'] else 'MISSED'}).")
    md += [f"- {c}" for c in checks]
    md += ["- Why AdaFEST's AUC is below dense DP-SGD's here: with τ = 3·σ_sel and each example's 8 rows "
           "contributing 1/√8 each, a row is selected only when about 12 or more examples of the batch use "
           "it, so the many mid-frequency rows of this Zipf task are never updated, while dense DP-SGD "
           "updates them with noise of only lr·σ·C/B ≈ 0.004 per entry per step, which costs it almost "
           "nothing (its AUC is within 0.001 of non-private). A lower τ buys those rows with false "
           "positives (τ = 2.5·σ_sel: about 6,200 more rows per step at V = 10^6); a quick sweep of τ and "
           "the selection share f at the `--quick` size did not close the gap reliably (AUC moved by "
           "±0.005 between settings). Not tuned further in this round."]
    md += ["- Why the step target is missed (cProfile of a smaller run: V = 10^5, B = 512, 78 steps): the non-private "
           "step is one sparse forward/backward of B·F = 4,096 lookups with D = 8 (under 1 ms); the "
           "AdaFEST step adds the per-example work, each a fixed cost of a few hundred µs at this size: "
           "two NumPy sorts to coalesce (example, row) pairs (2.4 ms per step together), "
           "the selection (counts noise, binomial, distinct draws: 1.2 ms), the finite check of the "
           "output gradients (0.7 ms) and the index_add updates (0.8 ms). It is the per-example "
           "clipping every DP method needs (the dense and FEST steps pay it too, plus their noise); "
           "against the dense DP-SGD step it is the fastest DP method here."]
    md += ["", f"Opacus 1.6 ghost clipping, nn.Embedding({cfg['opacus_V']:,}, 8) + linear head, B = "
           f"{cfg['opacus_B']}, 8 Zipf ids per example, {cfg['opacus_steps']} steps, each in its own process:", "",
           "| embedding norm sampler | step (ms) | peak memory added (MiB) |", "|---|---|---|"]
    for which, label in (("opacus", "Opacus's own"), ("embgrad", "embgrad registered")):
        o = opc[which]
        if "error" in o:
            md.append(f"| {label} | error: {o['error'][-120:]!r} | |")
        else:
            md.append(f"| {label} | {o['step_ms']:.1f} | {o['peak_mib']:.0f} |")
    return {"markdown": "\n".join(md), "rows": [(lab, e, s, r) for lab, e, s, r in rows], "opacus": opc,
            "config": cfg}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    print(main(args.quick)["markdown"])
