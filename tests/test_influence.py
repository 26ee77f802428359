"""embgrad.influence: TracInCP over embedding gradients, exact and projected.

References: dense per-example gradients of the embedding weight from torch.func (vmap of grad),
Captum's TracInCP on the same layer, and an independent pure-Python evaluation of the
documented hash for the projection matrix.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import embgrad.influence as inf
from embgrad import EmbgradError
from embgrad.demo import demo_data, train


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")


@pytest.fixture(scope="module")
def demo():
    data = demo_data(seed=0)
    early = train(data, "torch", epochs=1).model
    final = train(data, "torch", epochs=3).model
    return data, early, final


def batches(split, n=None, size=32):
    X = torch.as_tensor(split.ids[:n])
    Y = torch.as_tensor(split.labels[:n])
    return [(X[i:i + size], Y[i:i + size]) for i in range(0, len(X), size)]


def dense_grads(model, split, n):
    """(n, V·D) per-example gradients of embedding.weight by torch.func (the reference)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(w, x, y):
        out = functional_call(model, {**params, "embedding.weight": w}, (x[None],))
        return torch.nn.functional.cross_entropy(out, y[None], reduction="sum")

    x, y = torch.as_tensor(split.ids[:n]), torch.as_tensor(split.labels[:n])
    return vmap(grad(one), in_dims=(None, 0, 0))(params["embedding.weight"], x, y).flatten(1).double()


def test_exact_tracincp_equals_dense_torch_func(demo):
    data, early, final = demo
    ckpts = [inf.Checkpoint(early, 0.5, "e1"), inf.Checkpoint(final, 0.02, "e3")]
    train_idx = inf.collect(ckpts, batches(data.train, 96), loss_fn, mode="exact", progress=False)
    test_idx = inf.collect(ckpts, batches(data.test, 12), loss_fn, like=train_idx, progress=False)
    ref = sum(lr * dense_grads(m, data.test, 12) @ dense_grads(m, data.train, 96).T
              for m, lr in ((early, 0.5), (final, 0.02))).numpy()
    got = train_idx.scores(test_idx)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    self_ref = sum(lr * (dense_grads(m, data.train, 96) ** 2).sum(1) for m, lr in ((early, 0.5), (final, 0.02)))
    np.testing.assert_allclose(train_idx.self_influence(), self_ref.numpy(), rtol=1e-4)
    top = train_idx.top(test_idx, n=5)
    np.testing.assert_array_equal(top.proponents, np.argsort(-ref, 1, kind="stable")[:, :5])
    np.testing.assert_array_equal(top.opponents, np.argsort(ref, 1, kind="stable")[:, :5])
    np.testing.assert_allclose(top.proponent_scores, np.sort(ref, 1)[:, ::-1][:, :5], rtol=1e-4)
    cos = train_idx.scores(test_idx, metric="cosine")
    qn = np.sqrt(test_idx.self_influence())[:, None]
    tn = np.sqrt(self_ref.numpy())[None, :]
    np.testing.assert_allclose(cos, ref / (qn * tn), rtol=1e-4, atol=1e-7)
    assert np.abs(cos).max() <= 1 + 1e-6


def _splitmix(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def reference_matrix(layer: int, V: int, D: int, k: int, seed: int, s: int) -> np.ndarray:
    """P from the docstring's definition, one coordinate at a time in Python integers."""
    import zlib

    m = k // s
    P = np.zeros((k, V * D))
    top = _splitmix(_splitmix(seed) ^ zlib.crc32(str(layer).encode()))
    for r in range(V):
        base = _splitmix(top ^ r)
        for d in range(D):
            for i in range(s):
                z = _splitmix(base ^ (d * s + i))
                P[i * m + (z >> 32) % m, r * D + d] += (-1 if z & 1 else 1) / np.sqrt(s)
    return P


def test_projection_is_the_documented_matrix_applied_to_dense_gradients(demo):
    data, early, final = demo
    V, D = final.embedding.weight.shape
    proj = inf.Projection(k=64, seed=3, density=4)
    P = reference_matrix(0, V, D, 64, 3, 4)
    np.testing.assert_array_equal(proj.matrix(0, V, D), P.astype(np.float32))
    idx = inf.collect([(early, 0.25), (final, 4.0)], batches(data.train, 40, size=16), loss_fn,
                      k=64, seed=3, density=4, dtype="float32", progress=False)
    want = np.concatenate([np.sqrt(lr) * dense_grads(m, data.train, 40).numpy() @ P.T
                           for m, lr in ((early, 0.25), (final, 4.0))], 1)
    np.testing.assert_allclose(idx.vectors(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_exact_rows_are_kept_outside_the_sketch(demo):
    data, early, final = demo
    V, D = final.embedding.weight.shape
    P = reference_matrix(0, V, D, 32, 5, 2)
    bs = batches(data.train, 40, size=20)
    idx = inf.collect([(early, 0.5), (final, 2.0)], bs, loss_fn, k=32, seed=5, density=2, dtype="float32",
                      exact_rows=3, progress=False)
    dense = {m: dense_grads(m, data.train, 40).numpy().reshape(40, V, D) for m in (early, final)}
    mass = sum((dense[m][:20] ** 2).sum((0, 2)) for m in (early, final))     # first batch, both checkpoints
    heavy = sorted(np.argsort(-mass, kind="stable")[:3].tolist())
    assert idx.manifest["exact_rows"] == [heavy]
    want = []
    for m, lr in ((early, 0.5), (final, 2.0)):
        g = dense[m].copy()
        exact_part = g[:, heavy].reshape(40, -1)
        g[:, heavy] = 0
        want.append(np.sqrt(lr) * np.concatenate([g.reshape(40, -1) @ P.T, exact_part], 1))
    np.testing.assert_allclose(idx.vectors(), np.concatenate(want, 1), rtol=1e-4, atol=1e-5)
    q = inf.collect([(early, 0.5), (final, 2.0)], batches(data.test, 4), loss_fn, like=idx, progress=False)
    assert q.manifest["exact_rows"] == idx.manifest["exact_rows"] and q.vectors().shape == (4, 2 * (32 + 3 * D))
    with pytest.raises(EmbgradError, match="exact_rows"):
        inf.collect(final, bs, loss_fn, k=32, exact_rows=-1, progress=False)


def test_projection_unbiased_with_the_stated_variance():
    rng = np.random.default_rng(0)
    V, D, k = 40, 8, 32
    x, y = rng.normal(size=V * D), rng.normal(size=V * D)
    y = 0.6 * x + y
    est = []
    for seed in range(300):
        P = inf.Projection(k, seed, density=4).matrix(0, V, D).astype(np.float64)
        est.append((P @ x) @ (P @ y))
    est = np.array(est)
    var = (x @ x * (y @ y) + (x @ y) ** 2 - 2 * np.sum(x ** 2 * y ** 2)) / k
    assert abs(est.mean() - x @ y) < 4 * np.sqrt(var / len(est))
    assert 0.75 < est.var() / var < 1.3


def test_projected_recall_against_exact_and_flipped_labels_by_self_influence(demo):
    data, _, final = demo
    train_b, test_b = batches(data.train, size=200), batches(data.test, 40)
    exact = inf.collect(final, train_b, loss_fn, mode="exact", progress=False)
    proj = inf.collect(final, train_b, loss_fn, k=1024, progress=False)
    qe = inf.collect(final, test_b, loss_fn, like=exact, progress=False)
    qp = inf.collect(final, test_b, loss_fn, like=proj, progress=False)
    te, tp = exact.top(qe, n=10), proj.top(qp, n=10)
    assert inf.recall_at(tp.proponents, te.proponents) >= 0.85
    assert inf.recall_at(tp.opponents, te.opponents) >= 0.85
    np.testing.assert_allclose(proj.self_influence(), exact.self_influence(), rtol=1e-5)
    # cosine: the demo has many near-duplicate sentences (cosines tied near 1), so judge the
    # exact cosine of what projection picks rather than only the identity of the picks
    cos = exact.scores(qe, metric="cosine")
    picks = proj.top(qp, 10, "cosine").proponents
    tenth = np.sort(cos, 1)[:, -10]
    assert (np.take_along_axis(cos, picks, 1).min(1) >= tenth - 0.05).mean() >= 0.95
    assert inf.recall_at(picks, exact.top(qe, 10, "cosine").proponents) >= 0.7
    si = exact.self_influence()
    flipped = data.train.flipped
    top5 = np.argsort(-si)[: int(0.05 * len(si))]
    assert flipped.sum() > 10 and flipped[top5].sum() / flipped.sum() >= 0.8


def test_matches_captum_tracincp_on_the_embedding_layer(demo, tmp_path):
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    data, early, final = demo
    lrs = {"a.pt": 0.3, "b.pt": 0.05}
    paths = []
    for (name, lr), m in zip(lrs.items(), (early, final)):
        torch.save(m.state_dict(), tmp_path / name)
        paths.append(str(tmp_path / name))

    def load(model, path):
        model.load_state_dict(torch.load(path))
        return lrs[path.rsplit("/", 1)[1]]

    import copy
    scratch = copy.deepcopy(final)            # Captum loads checkpoints into the model it is given
    x, y = torch.as_tensor(data.train.ids[:64]), torch.as_tensor(data.train.labels[:64])
    tracin = TracInCP(scratch, TensorDataset(x, y), checkpoints=paths, checkpoints_load_func=load,
                      layers=["embedding"], loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
                      batch_size=16, sample_wise_grads_per_batch=False)
    qx, qy = torch.as_tensor(data.test.ids[:8]), torch.as_tensor(data.test.labels[:8])
    ref = tracin.influence((qx, qy), show_progress=False).double().numpy()       # (8, 64)
    ckpts = [inf.Checkpoint(early, 0.3), inf.Checkpoint(final, 0.05)]
    idx = inf.collect(ckpts, batches(data.train, 64, 16), loss_fn, mode="exact", progress=False)
    q = inf.collect(ckpts, batches(data.test, 8), loss_fn, like=idx, progress=False)
    np.testing.assert_allclose(idx.scores(q), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    ref_self = tracin.self_influence(show_progress=False).double().numpy()
    np.testing.assert_allclose(idx.self_influence(), ref_self, rtol=1e-4)


class Interrupt(Exception):
    pass


def interrupted(items, after):
    for i, b in enumerate(items):
        if i == after:
            raise Interrupt()
        yield b


def test_resume_after_interruption_gives_the_uninterrupted_index(demo, tmp_path):
    data, _, final = demo
    bs = batches(data.train, 200, 16)          # 13 batches
    full = inf.collect(final, bs, loss_fn, tmp_path / "full", k=128, shard_size=50, progress=False)
    with pytest.raises(Interrupt):
        inf.collect(final, interrupted(bs, 7), loss_fn, tmp_path / "part", k=128, shard_size=50, progress=False)
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert manifest["batches_done"] == 7 and manifest["num_examples"] == 112 and not manifest["complete"]
    with pytest.raises(EmbgradError, match="incomplete"):
        inf.load(tmp_path / "part")
    with pytest.raises(EmbgradError, match="other settings"):
        inf.collect(final, bs, loss_fn, tmp_path / "part", k=256, shard_size=50, progress=False)
    seen = []
    resumed = inf.collect(final, bs, lambda m, b: seen.append(1) or loss_fn(m, b), tmp_path / "part",
                          k=128, shard_size=50, progress=False)
    assert len(seen) == 6                      # only the batches not yet done
    np.testing.assert_array_equal(resumed.vectors(), full.vectors())
    np.testing.assert_array_equal(resumed.sqnorms(), full.sqnorms())
    loaded = inf.load(tmp_path / "part")
    assert len(loaded) == 200 and [s["rows"] for s in loaded.manifest["shards"]] == [50, 50, 50, 50]
    assert loaded.vectors().dtype == np.float32 and np.load(tmp_path / "part" / "shard-00000.npy").dtype == np.float16
    q = inf.collect(final, batches(data.test, 5), loss_fn, like=loaded, progress=False)
    np.testing.assert_array_equal(loaded.top(q, 3).proponents, full.top(q, 3).proponents)
    with pytest.raises(EmbgradError, match="resume=True"):
        inf.collect(final, bs, loss_fn, tmp_path / "part", k=128, shard_size=50, progress=False, resume=False)
    # the rich progress bar (on stderr) runs through a resumed collection too
    bar = inf.collect(final, bs, loss_fn, tmp_path / "bar", k=128, shard_size=50, progress=True)
    np.testing.assert_array_equal(bar.vectors(), full.vectors())
    # a complete index is returned as it is, without iterating the data again
    again = inf.collect(final, interrupted(bs, 0), loss_fn, tmp_path / "part", k=128, shard_size=50, progress=False)
    assert len(again) == 200


def test_exact_index_saves_and_loads(demo, tmp_path):
    data, _, final = demo
    idx = inf.collect(final, batches(data.train, 50), loss_fn, tmp_path / "ex", mode="exact", progress=False)
    q = inf.collect(final, batches(data.test, 4), loss_fn, like=idx, progress=False)
    loaded = inf.load(tmp_path / "ex")
    assert isinstance(loaded, inf.ExactIndex) and "50 examples" in repr(loaded)
    np.testing.assert_allclose(loaded.scores(q), idx.scores(q))


def test_bad_inputs_raise_clear_errors(demo):
    data, _, final = demo
    bs = batches(data.train, 32)
    with pytest.raises(EmbgradError, match="multiple of density"):
        inf.Projection(k=100, density=3)
    with pytest.raises(EmbgradError, match="positive int"):
        inf.Projection(k=0)
    with pytest.raises(EmbgradError, match="learning rate"):
        inf.collect([(final, 0.0)], bs, loss_fn, progress=False)
    with pytest.raises(EmbgradError, match="mode"):
        inf.collect(final, bs, loss_fn, mode="dense", progress=False)
    with pytest.raises(EmbgradError, match="no batch"):
        inf.collect(final, [], loss_fn, progress=False)
    idx = inf.collect(final, bs, loss_fn, k=64, progress=False)
    other = inf.collect(final, bs, loss_fn, k=64, seed=1, progress=False)
    with pytest.raises(EmbgradError, match="projection"):
        idx.top(other)
    with pytest.raises(EmbgradError, match="metric"):
        idx.top(idx, metric="euclid")
    with pytest.raises(EmbgradError, match="learning rates"):
        inf.collect([(final, 2.0)], bs, loss_fn, like=idx, progress=False)
    exact = inf.collect(final, bs, loss_fn, mode="exact", progress=False)
    with pytest.raises(EmbgradError, match="ProjectedIndex"):
        idx.top(exact)
    assert "k=64" in repr(idx) and "Influences(32 queries, top 3" in repr(idx.top(idx, 3))


def test_import_influence_loads_no_framework():
    code = ("import sys, embgrad.influence, embgrad.report.influence; print(sorted(m for m in ('torch', 'tensorflow', 'keras', "
            "'mxnet', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
