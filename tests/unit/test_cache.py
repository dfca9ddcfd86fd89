"""The result cache: hits, TTL expiry, the LRU bound and invalidation by model version."""

from __future__ import annotations

import numpy as np
import pytest

from serving.cache import ResultCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def row(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_repeated_input_is_a_hit_with_the_same_result():
    cache = ResultCache(max_entries=10, ttl_s=60)
    key = cache.key("v1", row(1, 2, 3))
    assert cache.get(key) is None
    cache.put(key, row(0.1, 0.9))
    np.testing.assert_array_equal(cache.get(cache.key("v1", row(1, 2, 3))), row(0.1, 0.9))
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    assert cache.stats()["hit_rate"] == pytest.approx(0.5)


def test_canonical_inputs_share_a_key():
    assert ResultCache.key("v", np.array([1, 2])) == ResultCache.key("v", row(1.0, 2.0))
    assert ResultCache.key("v", row(-0.0, 1)) == ResultCache.key("v", row(0.0, 1))
    assert ResultCache.key("v", row(1, 2, 3, 4)) != ResultCache.key("v", row(1, 2, 3, 4).reshape(2, 2))
    assert ResultCache.key("v", row(1, 2)) != ResultCache.key("v", row(2, 1))


def test_entries_expire_after_the_ttl():
    clock = Clock()
    cache = ResultCache(max_entries=10, ttl_s=5, clock=clock)
    key = cache.key("v1", row(1))
    cache.put(key, row(1))
    clock.now = 4.9
    assert cache.get(key) is not None
    clock.now = 5.0
    assert cache.get(key) is None
    assert cache.stats()["expirations"] == 1 and len(cache) == 0


def test_lru_bound_evicts_the_least_recently_used():
    cache = ResultCache(max_entries=3, ttl_s=60)
    keys = [cache.key("v1", row(i)) for i in range(4)]
    for k in keys[:3]:
        cache.put(k, row(0))
    cache.get(keys[0])  # touch: keys[1] is now the least recently used
    cache.put(keys[3], row(0))
    assert len(cache) == 3
    assert cache.get(keys[1]) is None
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.stats()["evictions"] == 1


def test_a_new_model_version_invalidates():
    cache = ResultCache(max_entries=10, ttl_s=60)
    cache.set_version("v1")
    cache.put(cache.key("v1", row(1)), row(1))
    assert cache.get(cache.key("v2", row(1))) is None  # the version is part of the key
    cache.set_version("v2")
    assert len(cache) == 0  # and the old entries are dropped at once


def test_stored_rows_are_copies():
    cache = ResultCache()
    out = np.zeros((2, 2), dtype=np.float32)
    key = cache.key("v", row(1))
    cache.put(key, out[0])
    out[0, 0] = 7
    assert cache.get(key)[0] == 0


def test_bad_bounds_name_the_value():
    with pytest.raises(ValueError, match="max_entries must be at least 1, got 0"):
        ResultCache(max_entries=0)
    with pytest.raises(ValueError, match="ttl_s must be positive"):
        ResultCache(ttl_s=0)
