"""The one TTL cache: fresh values while their TTL runs, stale ones still readable, LRU eviction."""

from __future__ import annotations

import types

from infra.runtime import ttl_cache
from infra.runtime.ttl_cache import TtlCache


def test_a_value_is_fresh_for_its_ttl_then_stale_but_readable(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(ttl_cache, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    cache: TtlCache[str, int] = TtlCache(ttl_s=10)
    cache.put("a", 1)
    cache.put("b", 2, ttl_s=1)
    now[0] += 5
    assert cache.get("a") == 1 and cache.get("b") is None
    stale = cache.entry("b")
    assert stale is not None and stale.value == 2 and not stale.fresh
    assert cache.get("never") is None and cache.entry("never") is None


def test_the_least_recently_used_goes_first_past_the_size() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60, max_size=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.entry("b") is None
    assert cache.get("a") == 1 and cache.get("c") == 3
