"""Module-level per-object state is weakly keyed by identity (ids are reused after garbage
collection) and safe across threads: embgrad._weak, and its users (table guards, warn-once)."""
from __future__ import annotations

import gc
import threading

import pytest

from embgrad._weak import WeakIdMap, WeakIdSet


class Obj:
    pass


def test_entry_goes_with_its_key_and_a_reused_id_finds_nothing():
    m: WeakIdMap[str] = WeakIdMap()
    a = Obj()
    m[a] = "a"
    old_id = id(a)
    assert m.get(a) == "a" and a in m and len(m) == 1
    del a
    gc.collect()
    assert len(m) == 0                       # dropped when the key was collected
    others = [Obj() for _ in range(1000)]    # CPython hands the freed memory out again
    reused = [o for o in others if id(o) == old_id]
    for o in reused:
        assert m.get(o) is None and o not in m


def test_keys_compare_by_identity_not_equality():
    torch = pytest.importorskip("torch")
    m: WeakIdMap[int] = WeakIdMap()
    t1, t2 = torch.zeros(3), torch.zeros(3)   # == is elementwise: a WeakKeyDictionary would fail
    m[t1] = 1
    assert m.get(t1) == 1 and m.get(t2) is None and m.get(t2, 7) == 7
    key = [1, 2]                              # not weakly referenceable: held strongly
    m[key] = 2
    assert m.get(key) == 2 and m.get([1, 2]) is None
    assert not m.pop_if(id(key), 3) and m.pop_if(id(key), 2) and m.get(key) is None


def test_add_new_is_true_for_exactly_one_thread():
    s = WeakIdSet()
    obj = Obj()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(s.add_new(obj))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True] and obj in s and len(s) == 1


def test_table_guard_is_dropped_with_its_table():
    torch = pytest.importorskip("torch")
    import embgrad
    from embgrad import tables

    n0 = len(tables._guards)
    emb = torch.nn.Embedding(10, 4)
    guard = embgrad.table(emb).freeze([1, 2])
    assert len(tables._guards) == n0 + 1 and tables._guard_of(emb.weight) is guard
    guard.remove()
    assert len(tables._guards) == n0 and tables._guard_of(emb.weight) is None
    embgrad.table(emb).freeze([3])
    del emb
    gc.collect()
    assert len(tables._guards) == n0       # the guard of a collected table does not linger


def test_max_norm_warning_once_per_layer_even_when_ids_are_reused():
    torch = pytest.importorskip("torch")
    import embgrad

    def run(emb: torch.nn.Module) -> int:
        with pytest.warns(UserWarning, match="max_norm") as rec:
            with embgrad.capture(emb):
                emb(torch.tensor([[1, 2]]))
            with embgrad.capture(emb):
                emb(torch.tensor([[1, 2]]))
        return sum("max_norm" in str(w.message) for w in rec)

    for _ in range(3):                     # a new layer (possibly at a dead one's id) warns again
        assert run(torch.nn.Embedding(10, 4, max_norm=1.0)) == 1
        gc.collect()
