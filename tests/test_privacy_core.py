"""embgrad.privacy core: DP-SGD / DP-FEST / DP-AdaFEST noise over RowGrad, and accounting.

References: per-example Python loops for the counts, the Gaussian/binomial laws for the noise
and false positives (tolerances from the sample sizes), dp-accounting's own accountants built
by hand for ε, Opacus's RDP accountant."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import embgrad
from embgrad import privacy
from embgrad.privacy import DPFEST, DPSGD, DPAdaFEST


def _rowgrad(rows, values, V):
    return embgrad.RowGrad(torch.as_tensor(rows, dtype=torch.int64),
                           torch.as_tensor(values, dtype=torch.float32), V)


def test_split_noise_multiplier_composes_to_the_total():
    for f, k in [(0.1, 1), (0.5, 1), (0.9, 3)]:
        s_sel, s_grad = privacy.split_noise_multiplier(1.3, f, k)
        assert k / s_sel ** 2 + 1 / s_grad ** 2 == pytest.approx(1 / 1.3 ** 2, rel=1e-12)
        # selection gets the share f of rho = 1/(2 sigma^2)
        assert (k / s_sel ** 2) / (1 / 1.3 ** 2) == pytest.approx(f)
    m = DPAdaFEST(noise_multiplier=1.3, max_grad_norm=2.0, threshold=5.0, selection_fraction=0.3)
    assert privacy.equivalent_noise_multiplier(m) == pytest.approx(1.3)
    assert m.gradient_noise_std == pytest.approx(2.0 * 1.3 / math.sqrt(0.7))
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(embgrad.EmbgradError, match="selection_fraction"):
            privacy.split_noise_multiplier(1.0, bad)
    with pytest.raises(embgrad.EmbgradError, match="threshold"):
        DPAdaFEST(noise_multiplier=1.0, max_grad_norm=1.0, threshold=-1.0)


def _counts_loop(ids: np.ndarray, V: int, bound: float, ignore=None) -> np.ndarray:
    out = np.zeros(V)
    for row in ids:
        rows = {int(i) for i in row if i != ignore}
        if rows:
            w = min(1.0, bound / math.sqrt(len(rows)))
            for r in rows:
                out[r] += w
    return out


@pytest.mark.parametrize("bound", [1.0, 2.5])
def test_contribution_counts_equal_a_per_example_loop(bound):
    g = np.random.default_rng(0)
    V = 50
    ids = g.integers(0, V, size=(7, 9))
    ids[2, :] = 3          # one example with a single distinct row, repeated
    ids[4, :4] = 0         # padding
    want = _counts_loop(ids, V, bound, ignore=0)
    got = privacy.contribution_counts(torch.as_tensor(ids), V, contribution_bound=bound, ignore_index=0)
    assert got.dim == 1 and got.num_rows == V
    np.testing.assert_allclose(got.to_dense().numpy()[:, 0], want, rtol=1e-6)
    # the same from the ExampleGrads capture makes (example, row) pairs)
    emb = torch.nn.Embedding(V, 4, padding_idx=0)
    x = torch.as_tensor(ids)
    with embgrad.capture(emb) as cap:
        loss = emb(x).pow(2).sum()
    eg = cap.gradients(loss).only().per_example()
    got2 = privacy.contribution_counts(eg, contribution_bound=bound)
    np.testing.assert_allclose(got2.to_dense().numpy()[:, 0], want, rtol=1e-6)
    # an example's clipped contribution vector has L2 norm <= bound
    one = privacy.contribution_counts(torch.as_tensor(ids[:1]), V, contribution_bound=bound)
    assert one.norm() <= bound * (1 + 1e-6)


def test_contribution_counts_errors():
    with pytest.raises(embgrad.EmbgradError, match="num_rows"):
        privacy.contribution_counts(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(embgrad.EmbgradError, match="out of range"):
        privacy.contribution_counts(torch.tensor([[1, 12]]), 10)
    with pytest.raises(embgrad.EmbgradError, match="NumPy"):
        privacy.contribution_counts(np.zeros((2, 3), np.int64), 10)
    with pytest.raises(embgrad.EmbgradError, match="contribution_bound"):
        privacy.contribution_counts(torch.tensor([[1]]), 10, contribution_bound=0)


def test_noise_rows_keeps_selected_rows_and_has_the_right_std():
    g = np.random.default_rng(1)
    V, D = 1000, 16
    rows = np.sort(g.choice(V, 300, replace=False))
    vals = g.normal(size=(300, D)).astype(np.float32)
    grad = _rowgrad(rows, vals, V)
    sel = np.sort(np.union1d(rows[::2], g.choice(V, 500, replace=False)))   # half kept + others
    exact = privacy.noise_rows(grad, torch.as_tensor(sel), 0.0)
    dense = grad.to_dense().numpy()
    r, v = exact.numpy()
    np.testing.assert_array_equal(r, sel)
    np.testing.assert_array_equal(v, dense[sel])            # dropped rows gone, new rows zero
    std = 0.37
    noisy = privacy.noise_rows(grad, torch.as_tensor(sel), std, rng=123)
    noise = noisy.numpy()[1] - dense[sel]
    n = noise.size
    # sample std of n Gaussians: standard error std/sqrt(2n); mean: std/sqrt(n); 5 s.e. bounds
    assert abs(noise.std() - std) < 5 * std / math.sqrt(2 * n)
    assert abs(noise.mean()) < 5 * std / math.sqrt(n)
    # the noise is Gaussian: its 4th standardized moment is 3 (s.e. sqrt(24/n))
    z = noise / noise.std()
    assert abs((z ** 4).mean() - 3) < 5 * math.sqrt(24 / n)
    again = privacy.noise_rows(grad, torch.as_tensor(sel), std, rng=123)
    np.testing.assert_array_equal(again.numpy()[1], noisy.numpy()[1])   # seeded: reproducible


def test_false_positive_rate_matches_the_gaussian_tail():
    V = 10 ** 6
    g = np.random.default_rng(2)
    touched = np.sort(g.choice(V, 5000, replace=False))
    counts = _rowgrad(touched, np.full((5000, 1), 2.0), V)
    tau, sigma = 3.0, 1.0
    p = privacy.false_positive_probability(tau, sigma)
    assert p == pytest.approx(0.0013498980316301, rel=1e-9)          # Φ̄(3)
    reps, fps, tps, ranks = 20, 0, 0, []
    rng = np.random.default_rng(3)
    for _ in range(reps):
        sel = privacy.select_rows(counts, tau, sigma, rng)
        rows = sel.numpy()
        assert np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < V
        fp = rows[~np.isin(rows, touched)]
        assert len(fp) == sel.false_positives and len(rows) - len(fp) == sel.true_positives
        fps += len(fp)
        tps += sel.true_positives
        ranks.append(fp)
    n_untouched = reps * (V - 5000)
    sd = math.sqrt(n_untouched * p * (1 - p))
    assert abs(fps - n_untouched * p) < 5 * sd
    # touched rows of count 2 pass with probability Φ̄((τ-2)/σ) = Φ̄(1)
    q = privacy.false_positive_probability(1.0, 1.0)
    n_t = reps * 5000
    assert abs(tps - n_t * q) < 5 * math.sqrt(n_t * q * (1 - q))
    # false positives are uniform over the untouched rows: mean position V/2 (s.e. V/sqrt(12 n))
    allfp = np.concatenate(ranks)
    assert abs(allfp.mean() - V / 2) < 5 * V / math.sqrt(12 * len(allfp))
    # no noise: exactly the rows with count >= tau, no false positives
    exact = privacy.select_rows(counts, 2.0, 0.0)
    assert exact.false_positives == 0 and exact.true_positives == 5000


def test_select_rows_errors():
    grad = _rowgrad([1, 2], np.ones((2, 3)), 10)
    with pytest.raises(embgrad.EmbgradError, match="counts"):
        privacy.select_rows(grad, 1.0, 1.0)
    counts = _rowgrad([1, 2], np.ones((2, 1)), 10)
    with pytest.raises(embgrad.EmbgradError, match="threshold"):
        privacy.select_rows(counts, -1.0, 1.0)
    with pytest.raises(embgrad.EmbgradError, match="rng"):
        privacy.select_rows(counts, 1.0, 1.0, rng="seed")
    with pytest.raises(embgrad.EmbgradError, match="table of 10 rows"):
        privacy.noise_rows(_rowgrad([1], np.ones((1, 3)), 20), privacy.select_rows(counts, 0.5, 0.0), 1.0)


def test_top_k_rows_public_and_private():
    counts = np.arange(100, dtype=float)
    sel = privacy.top_k_rows(counts, 10, like=torch.zeros(1))
    assert isinstance(sel.rows, torch.Tensor)
    np.testing.assert_array_equal(sel.numpy(), np.arange(90, 100))
    c = _rowgrad([5, 50, 70], [[100.0], [90.0], [80.0]], 1000)
    priv = privacy.top_k_rows(c, 3, noise_std=1.0, rng=0)
    np.testing.assert_array_equal(priv.numpy(), [5, 50, 70])     # margins >> noise
    with pytest.raises(embgrad.EmbgradError, match="k must be"):
        privacy.top_k_rows(counts, 0)


def test_mechanisms_privatize():
    V, D = 200, 8
    grad = _rowgrad([3, 7, 9], np.ones((3, D)), V)
    dense = DPSGD(noise_multiplier=1.0, max_grad_norm=0.5).privatize(grad, rng=0)
    assert tuple(dense.shape) == (V, D)
    noise = dense.numpy() - grad.to_dense().numpy()
    assert abs(noise.std() - 0.5) < 5 * 0.5 / math.sqrt(2 * V * D)
    fest = DPFEST(noise_multiplier=1.0, max_grad_norm=0.5).privatize(grad, torch.tensor([3, 4, 5]), rng=0)
    np.testing.assert_array_equal(fest.numpy()[0], [3, 4, 5])
    ids = torch.tensor([[3, 7], [7, 9], [9, 9]])
    counts = privacy.contribution_counts(ids, V)
    m = DPAdaFEST(noise_multiplier=1.0, max_grad_norm=0.5, threshold=0.5, selection_fraction=0.5)
    out = m.privatize(grad, counts, rng=4)
    out2 = m.privatize(grad, counts, rng=4)
    np.testing.assert_array_equal(out.numpy()[1], out2.numpy()[1])
    assert out.num_rows == V and len(out) < V
    # an int seed is ONE stream for the selection and then the gradient noise (as a Generator is),
    # not the same stream restarted: the two noises of a step must be independent
    g = np.random.default_rng(4)
    sel = m.select(counts, g)
    ref = privacy.noise_rows(grad, sel, m.gradient_noise_std, g)
    for a, b in zip(out.numpy(), ref.numpy(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_v_by_d_tensor_is_created_at_a_million_rows():
    """Peak RSS of one DP-AdaFEST step at V=10^6, D=64 (a (V, D) float32 is 256 MB) stays far
    below the dense table; the dense DP-SGD step on the same gradient shows the probe works."""
    code = textwrap.dedent("""
        import resource, sys, numpy as np, torch, embgrad
        from embgrad import privacy
        torch.set_num_threads(1)
        V, D = 10 ** 6, 64
        g = np.random.default_rng(0)
        ids = torch.as_tensor(g.zipf(1.3, size=(256, 20)) % V)
        emb = torch.nn.Embedding(V, D, sparse=True)
        with embgrad.capture(emb) as cap:
            loss = emb(ids).pow(2).sum()
        eg = cap.gradients(loss).only().per_example()
        grad = eg.clip(1.0).sum()
        m = privacy.DPAdaFEST(noise_multiplier=1.0, max_grad_norm=1.0, threshold=4.0)
        def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        def now():   # resident MiB at this moment (the peak above may predate the dense step)
            import os
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
        before = rss()
        counts = privacy.contribution_counts(eg)
        out = m.privatize(grad, counts, rng=0)
        sel = m.select(counts, rng=1)
        mid, held = rss(), now()
        grown = 0.0
        if sys.argv[1] == "dense":
            dense = privacy.DPSGD(1.0, 1.0).privatize(grad, rng=0)
            grown = now() - held          # while the dense (V, D) result is alive
        print(mid - before, grown, len(out), sel.false_positives)
    """)
    res = {}
    for mode in ("sparse", "dense"):
        p = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                           timeout=300, check=False)
        assert p.returncode == 0, p.stderr[-2000:]
        res[mode] = [float(x) for x in p.stdout.split()]
    sparse_growth = res["sparse"][0]
    assert sparse_growth < 40, res            # MiB; a (V, D) float32 table is 244 MiB
    assert res["dense"][1] > 200, res         # the dense step does allocate (V, D)
    assert res["sparse"][3] > 0               # false positives were drawn among the 10^6 rows


def test_accounting_matches_dp_accounting():
    dp = pytest.importorskip("dp_accounting")
    q, steps, delta = 0.01, 500, 1e-5
    m = DPAdaFEST(noise_multiplier=1.1, max_grad_norm=1.0, threshold=3.0, selection_fraction=0.2,
                  num_tables=2)
    s_sel, s_grad = m.selection_noise_multiplier, m.gradient_noise_multiplier
    # by hand: two selections and the gradient on the same Poisson-sampled batch, per step
    step = dp.ComposedDpEvent([dp.GaussianDpEvent(s_sel), dp.GaussianDpEvent(s_sel),
                               dp.GaussianDpEvent(s_grad)])
    rdp = dp.rdp.RdpAccountant()
    rdp.compose(dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, step), steps))
    assert privacy.epsilon(m, sample_rate=q, steps=steps, delta=delta) == pytest.approx(
        rdp.get_epsilon(delta), rel=1e-9)
    pld = dp.pld.PLDAccountant()
    pld.compose(dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(1.1)), steps))
    eps_pld = privacy.epsilon(m, sample_rate=q, steps=steps, delta=delta, accountant="pld")
    assert eps_pld == pytest.approx(pld.get_epsilon(delta), rel=1e-9)
    # the split costs nothing: same ε as DP-SGD at the equivalent noise multiplier
    dense = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0)
    assert privacy.epsilon(dense, sample_rate=q, steps=steps, delta=delta) == pytest.approx(
        rdp.get_epsilon(delta), rel=1e-6)
    # DP-FEST with a private top-k pays for it once
    fest_pub = DPFEST(noise_multiplier=1.1, max_grad_norm=1.0)
    fest_priv = DPFEST(noise_multiplier=1.1, max_grad_norm=1.0, selection_noise_multiplier=5.0)
    e_pub = privacy.epsilon(fest_pub, sample_rate=q, steps=steps, delta=delta)
    e_priv = privacy.epsilon(fest_priv, sample_rate=q, steps=steps, delta=delta)
    assert e_priv > e_pub
    rdp2 = dp.rdp.RdpAccountant()
    rdp2.compose(dp.ComposedDpEvent([dp.GaussianDpEvent(5.0), dp.SelfComposedDpEvent(
        dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(1.1)), steps)]))
    assert e_priv == pytest.approx(rdp2.get_epsilon(delta), rel=1e-9)
    # Opacus's RDP accountant at the equivalent sigma: same mechanism, its own orders (close)
    opacus = pytest.importorskip("opacus.accountants")
    acc = opacus.RDPAccountant()
    acc.history = [(privacy.equivalent_noise_multiplier(m), q, steps)]
    assert acc.get_epsilon(delta) == pytest.approx(rdp.get_epsilon(delta), rel=0.03)
    with pytest.raises(embgrad.EmbgradError, match="not differentially private"):
        privacy.epsilon(DPSGD(0.0, 1.0), sample_rate=q, steps=1, delta=delta)
    with pytest.raises(embgrad.EmbgradError, match="delta"):
        privacy.epsilon(m, sample_rate=q, steps=1, delta=0)
    with pytest.raises(embgrad.EmbgradError, match="accountant"):
        privacy.epsilon(m, sample_rate=q, steps=1, delta=delta, accountant="gdp")


def test_importing_privacy_loads_no_framework():
    code = ("import sys, embgrad.privacy; "
            "print([m for m in ('torch', 'tensorflow', 'dp_accounting', 'opacus') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tensorflow_tensors_give_the_same_result_as_torch():
    tf = pytest.importorskip("tensorflow")
    ids = np.array([[3, 7, 7], [7, 9, 1], [9, 9, 9]])
    rows, vals = np.array([3, 7, 50]), np.arange(12, dtype=np.float32).reshape(3, 4)
    m = DPAdaFEST(noise_multiplier=1.0, max_grad_norm=1.0, threshold=0.5)
    out = {}
    for name, conv in (("torch", torch.as_tensor), ("tf", tf.constant)):
        counts = privacy.contribution_counts(conv(ids), 100)
        grad = embgrad.RowGrad(conv(rows.astype(np.int64)), conv(vals), 100)
        res = m.privatize(grad, counts, rng=7)
        assert type(res.values).__module__.split(".")[0] in ("torch", "tensorflow")
        out[name] = res.numpy()
    np.testing.assert_array_equal(out["torch"][0], out["tf"][0])
    np.testing.assert_allclose(out["torch"][1], out["tf"][1], rtol=1e-6)


def test_noise_multiplier_for_reaches_the_target_epsilon():
    pytest.importorskip("dp_accounting")
    q, steps, delta = 0.005, 200, 5e-6
    s = privacy.noise_multiplier_for(lambda s: DPSGD(s, 1.0), epsilon=3.0, sample_rate=q, steps=steps,
                                     delta=delta)
    assert privacy.epsilon(DPSGD(s, 1.0), sample_rate=q, steps=steps, delta=delta) <= 3.0
    assert privacy.epsilon(DPSGD(s * 0.99, 1.0), sample_rate=q, steps=steps, delta=delta) > 3.0
    opacus = pytest.importorskip("opacus.accountants.utils")   # Opacus's own calibration agrees
    want = opacus.get_noise_multiplier(target_epsilon=3.0, target_delta=delta, sample_rate=q,
                                       steps=steps, accountant="rdp")
    assert s == pytest.approx(want, rel=0.03)
    with pytest.raises(embgrad.EmbgradError, match="noise multiplier above"):
        privacy.noise_multiplier_for(lambda s: DPSGD(s, 1.0), epsilon=1e-4, sample_rate=1.0,
                                     steps=10 ** 6, delta=delta)
