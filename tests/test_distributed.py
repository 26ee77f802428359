"""embgrad.distributed on 2 and 4 gloo processes (CPU, 127.0.0.1): every result equals one
process holding the whole batch and the whole table (bit for bit where the order of the sums
is the same, else to 1e-6), with uneven batches, a rank with no lookups, a shard that receives
none, bad input on one rank (every rank raises at once) and a rank that never arrives (the
others get the group's timeout, nobody hangs).

Each world size is spawned once (a module fixture running tests/dist_scenarios.py on every
rank); the tests below check what the ranks brought back."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dist_scenarios as sc
import numpy as np
import pytest
import torch
from dist_helpers import RankError, free_port, run_ranks

import embgrad

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def world(request):
    size = request.param
    results = run_ranks(sc.scenarios, size, deadline=300)
    failed = [f"rank {r} of {size} raised:\n{res.tb}" for r, res in enumerate(results)
              if isinstance(res, RankError)]
    if failed:   # the first rank to fail is usually not the one whose peers lost connection
        failed.sort(key=lambda msg: "Connection closed by peer" in msg)
        pytest.fail("\n".join(failed))
    return size, results


def _same_on_every_rank(results, key):
    first = results[0][key]
    for r, res in enumerate(results[1:], 1):
        for a, b in zip(first, res[key], strict=True):
            assert np.array_equal(a, b), f"{key}: rank {r} differs from rank 0"
    return first


def _per_rank_sum(size):
    """g_0 + g_1 + ... computed in one process, in rank order."""
    total = None
    for r in range(size):
        g = sc.row_grad_of(*sc.local_batch(size, r))
        total = g if total is None else total + g
    return total


def test_import_distributed_loads_no_framework():
    code = ("import sys, embgrad.distributed\n"
            "bad = [m for m in ('torch', 'tensorflow', 'keras', 'mxnet', 'jax') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", ["auto", "all_gather", "all_to_all", "dense"])
def test_all_reduce_rows_equals_one_process(world, method):
    size, results = world
    rows, values = _same_on_every_rank(results, f"reduce/{method}")
    ranks_sum = _per_rank_sum(size).numpy()
    whole = sc.row_grad_of(*sc.global_batch(size)).numpy()     # one process, the whole batch
    assert np.array_equal(rows, whole[0]) and rows.dtype == np.int64
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_allclose(values, whole[1], rtol=1e-6, atol=1e-6)
    if method != "dense":   # same order of sums as g0 + g1 + ...: bit for bit
        assert np.array_equal(values, ranks_sum[1])
    # the rank without examples (4 ranks) really contributed nothing and still got the sum
    if size == 4:
        assert len(results[1]["local"][0]) == 0


def test_all_reduce_rows_over_a_subgroup(world):
    size, results = world
    total = None
    for r in range(0, size, 2):
        g = sc.row_grad_of(*sc.local_batch(size, r))
        total = g if total is None else total + g
    rows, values = total.numpy()
    for r, res in enumerate(results):
        if r % 2:
            assert "subgroup" not in res
            continue
        for key in ("subgroup", "subgroup_gather"):
            assert np.array_equal(res[key][0], rows) and np.array_equal(res[key][1], values)


def test_all_reduce_rows_switches_to_dense_when_rows_are_dense(world):
    _size, results = world
    for res in results:
        method, rows, _values, _local = res["dense_auto"]
        assert method == "dense"
        assert np.array_equal(rows, np.arange(12))
    total = sum(res["dense_auto"][3][1] for res in results)
    np.testing.assert_allclose(results[0]["dense_auto"][2], total, rtol=1e-6, atol=1e-6)


def test_choose_method_follows_bytes():
    from embgrad.backends.torch_distributed import choose_method
    V, D = 10 ** 6, 64
    # 4 ranks x 256 x 32 lookups: ~8k rows each, far below the ~V/2 switch
    assert choose_method(np.array([8192] * 4), V, D, 4) == "all_gather"
    assert choose_method(np.array([V // 2 - 10 ** 4] * 4), V, D, 4) == "all_gather"
    assert choose_method(np.array([V // 2 + 10 ** 4] * 4), V, D, 4) == "dense"
    assert choose_method(np.array([V] * 2), V, D, 4) == "dense"


def test_all_reduce_rows_float64(world):
    size, results = world
    rows, values = _same_on_every_rank(results, "float64")
    ref = _per_rank_sum(size)
    assert values.dtype == np.float64
    assert np.array_equal(rows, ref.numpy()[0])
    np.testing.assert_allclose(values, ref.numpy()[1], rtol=1e-6)


def test_bad_input_on_one_rank_makes_every_rank_raise_at_once(world):
    size, results = world
    for r, res in enumerate(results):
        kind, name, msg = res["err/num_rows"]
        assert name == "EmbgradError" and "num_rows" in msg and f"rank {size - 1}: 51" in msg
        kind, name, msg = res["err/not_rowgrad"]
        assert name == "EmbgradError"
        assert ("got Tensor" in msg) if r == 0 else ("rank(s) 0 refused" in msg)
        kind, name, msg = res["err/mechanism"]
        assert name == "EmbgradError" and "noisy_clipped_sum" in msg
        assert ("DPSGD, DPFEST or DPAdaFEST" in msg) if r == 0 else ("rank(s) 0 refused" in msg)
        kind, name, msg = res["err/seeds"]
        assert name == "EmbgradError" and "different noise seeds" in msg
        _kind, name, msg = res["err/shard_ids"]
        assert name == "EmbgradError"
        assert ("out of range" in msg) if r == 0 else ("rank(s) 0 refused" in msg)
        assert res["err/seconds"] < 10     # no timeout was waited for


def test_a_rank_that_never_arrives_does_not_hang_the_others(world):
    size, results = world
    for res in results[:-1]:
        kind, name, _msg = res["dies"]
        assert kind == "raised" and name in ("RuntimeError", "DistBackendError"), res["dies"]
        assert res["dies/seconds"] < 30
    if size == 2:   # the last rank was stuck (not dead): the 3 s timeout freed rank 0
        assert "imed out" in results[0]["dies"][2] or "imeout" in results[0]["dies"][2]


def _global_example_grads(size):
    return sc.example_grads_of(*sc.global_batch(size))


@pytest.mark.parametrize("name", ["dpsgd", "fest", "adafest"])
def test_noisy_clipped_sum_equals_one_process_with_the_global_batch(world, name):
    """embgrad.privacy's mechanism on the global batch in one process, with the same seed."""
    from embgrad import privacy
    size, results = world
    mech, selection, seed = sc.mechanisms()[name]
    rows, values = _same_on_every_rank(results, f"dp/{name}")
    whole = _global_example_grads(size)
    clipped = whole.clip(sc.C).sum()
    rng = np.random.default_rng(seed)
    if name == "adafest":
        ref = mech.privatize(clipped, privacy.contribution_counts(whole), rng)
    elif name == "fest":
        ref = mech.privatize(clipped, selection, rng)
    else:
        ref = mech.privatize(clipped, rng)
    ref_rows, ref_values = sc.dense_np(ref)
    assert np.array_equal(rows, ref_rows)
    np.testing.assert_allclose(values, ref_values, rtol=1e-6, atol=1e-6)
    noise = values - sc.dense_np(clipped.to_dense())[1][rows]
    assert np.abs(noise).min() > 0       # every kept entry got noise (drawn once, not per rank)
    if name == "fest":
        assert np.array_equal(rows, selection.numpy())


def test_noisy_clipped_sum_fresh_seed_is_shared(world):
    _size, results = world
    _rows, values = _same_on_every_rank(results, "dp/fresh_seed")
    assert not np.allclose(values, results[0]["dp/dpsgd"][1])


@pytest.mark.parametrize("scheme", ["contiguous", "hashed"])
def test_row_sharded_equals_one_process(world, scheme):
    size, results = world
    whole = _global_example_grads(size)
    clipped = whole.clip(sc.C)
    ref_sum = clipped.sum()
    ref_rows, ref_vals = ref_sum.numpy()
    ids, grads = sc.global_batch(size)
    other = sc.example_grads_of(ids[:, -3:], grads[:, -3:])
    ref_dot_other = whole.dot(other).numpy()
    owned = np.concatenate([res[f"shard/{scheme}"]["local_rows"] for res in results])
    assert np.array_equal(np.sort(owned), np.arange(sc.V))          # a partition of the rows
    got_rows = []
    for r, res in enumerate(results):
        s = res[f"shard/{scheme}"]
        assert s["batch"] == sum(sc.SIZES[size]) and s["offset"] == sum(sc.SIZES[size][:r])
        np.testing.assert_allclose(s["norms"], whole.norms().numpy(), rtol=1e-6)
        np.testing.assert_allclose(s["clipped_norms"], clipped.norms().numpy(), rtol=1e-6)
        assert s["clipped_norms"].max() <= sc.C * (1 + 1e-6)
        np.testing.assert_allclose(s["dot"], whole.dot().numpy(), rtol=1e-5, atol=1e-5)
        assert s["dot_other"].shape == ref_dot_other.shape
        np.testing.assert_allclose(s["dot_other"], ref_dot_other, rtol=1e-5, atol=1e-5)
        assert set(s["sum_rows"]) <= set(s["local_rows"])
        pos = np.searchsorted(ref_rows, s["sum_rows"])
        assert np.array_equal(ref_rows[pos], s["sum_rows"])
        np.testing.assert_allclose(s["sum_values"], ref_vals[pos], rtol=1e-6, atol=1e-6)
        got_rows.append(s["sum_rows"])
    assert np.array_equal(np.sort(np.concatenate(got_rows)), ref_rows)
    assert "ShardedExampleGrads(batch_size=" in results[0][f"shard/{scheme}"]["repr"]


def test_row_sharded_shards_without_lookups(world):
    size, results = world
    ids, grads = sc.global_batch(size)
    first = results[0]["shard/one_owner"]
    lim = int(first["sum_rows"].max()) + 1 if len(first["sum_rows"]) else 1
    whole = embgrad.rows_from_lookups(ids % (sc.V // size), grads, sc.V, per_example=True)
    for r, res in enumerate(results):
        s = res["shard/one_owner"]
        np.testing.assert_allclose(s["norms"], whole.norms().numpy(), rtol=1e-6)
        if r > 0:
            assert s["pairs"] == 0 and len(s["sum_rows"]) == 0
    ref = whole.sum().numpy()
    assert lim <= sc.V // size
    assert np.array_equal(first["sum_rows"], ref[0])
    np.testing.assert_allclose(first["sum_values"], ref[1], rtol=1e-6, atol=1e-6)


def test_not_initialized_is_a_clear_error():
    from embgrad import distributed as edist
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    g = sc.row_grad_of(*sc.local_batch(2, 0))
    with pytest.raises(embgrad.EmbgradError, match="init_process_group"):
        edist.all_reduce_rows(g)
    with pytest.raises(embgrad.EmbgradError, match="init_process_group"):
        edist.RowSharding(10)


@pytest.mark.parametrize("scheme", ["contiguous", "hashed"])
def test_sharded_embedding_lookup_and_backward_equal_the_full_table(world, scheme):
    size, results = world
    ids, grads = sc.global_batch(size)
    dense = torch.zeros(sc.V, sc.D).index_add_(0, ids.reshape(-1), grads.reshape(-1, sc.D))
    for r, res in enumerate(results):
        e = res[f"emb/{scheme}"]
        assert e["lookup_equal"] and e["og_equal"]
        assert e["shape"] == (sc.SIZES[size][r], sc.T, sc.D)
        np.testing.assert_allclose(e["weight_grad"], dense.numpy()[e["local_rows"]], rtol=1e-6, atol=1e-6)
        assert f"scheme='{scheme}'" in e["repr"]


def test_readme_torchrun_example_runs(tmp_path):
    """The README's ```python torchrun block, run as the README says: torchrun, 2 processes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python torchrun\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "dist_example.py"
    script.write_text(blocks[0], encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (the two ranks' lines may interleave in the shared pipe)
    found = re.findall(r"rank (\d): RowGrad\(rows=(\d+) of 1000000, dim=64.*?norms \(512,\)", proc.stdout)
    assert sorted(r for r, _ in found) == ["0", "1"], proc.stdout
    assert found[0][1] == found[1][1]          # every rank got the same sum
