"""Identity-keyed maps and sets that hold their keys weakly, for per-object state kept at module
level (guards per variable, warnings given once per layer).

A plain ``dict`` keyed by ``id(obj)`` goes wrong once ``obj`` is collected: CPython reuses the
id for a new object, which then finds the dead one's entry. ``weakref.WeakKeyDictionary`` is no
fix for framework tensors and variables: it compares keys with ``==``, which is elementwise
for them (and TensorFlow variables are not hashable). These classes key by identity, drop an
entry when its key is collected, and take a lock around each operation (safe across threads;
re-entrant, because a collection, and so a removal, can happen inside an operation).
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["WeakIdMap", "WeakIdSet"]

V = TypeVar("V")


class WeakIdMap(Generic[V]):
    """``{object (by identity): value}``; an entry lasts while its key lives. A key that
    cannot be weakly referenced is held strongly (its entry then lasts until removed)."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[Callable[[], Any], V]] = {}
        self._lock = threading.RLock()

    def _drop(self, key_id: int, ref: Any) -> None:
        with self._lock:
            entry = self._data.get(key_id)
            if entry is not None and entry[0] is ref:
                del self._data[key_id]

    def get(self, key: Any, default: V | None = None) -> V | None:
        """The value stored for ``key`` (this very object), else ``default``."""
        with self._lock:
            entry = self._data.get(id(key))
            if entry is None or entry[0]() is not key:
                return default
            return entry[1]

    def __setitem__(self, key: Any, value: V) -> None:
        key_id = id(key)
        ref: Callable[[], Any]
        try:
            ref = weakref.ref(key, lambda r: self._drop(key_id, r))
        except TypeError:
            ref = (lambda obj: lambda: obj)(key)
        with self._lock:
            self._data[key_id] = (ref, value)

    def __contains__(self, key: Any) -> bool:
        with self._lock:
            entry = self._data.get(id(key))
            return entry is not None and entry[0]() is key

    def pop_if(self, key_id: int, value: V) -> bool:
        """Remove the entry of the object with id ``key_id`` if it holds ``value`` (that very
        object); True if it did. For owners that keep only the id of their key."""
        with self._lock:
            entry = self._data.get(key_id)
            if entry is not None and entry[1] is value:
                del self._data[key_id]
                return True
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


class WeakIdSet:
    """A set of objects by identity, holding them weakly; ``add_new(obj)`` adds and says
    whether ``obj`` was new, in one locked step (for "warn once per object")."""

    def __init__(self) -> None:
        self._map: WeakIdMap[bool] = WeakIdMap()

    def add_new(self, obj: Any) -> bool:
        """Add ``obj``; True if it was not in the set yet."""
        with self._map._lock:
            if obj in self._map:
                return False
            self._map[obj] = True
            return True

    def __contains__(self, obj: Any) -> bool:
        return obj in self._map

    def __len__(self) -> int:
        return len(self._map)
