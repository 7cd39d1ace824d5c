"""One small TTL cache for the settings each process looks up often (ingest's tenants, the worker's
companies and their WUZAPI configuration): entries expire after their own TTL, the least recently
used goes first past `max_size`, and an expired entry stays readable as stale until evicted, for
a caller that would rather serve it than fail."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Entry(Generic[V]):
    value: V
    expires_at: float  # time.monotonic()

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.expires_at


class TtlCache(Generic[K, V]):
    def __init__(self, *, ttl_s: float, max_size: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._entries: OrderedDict[K, Entry[V]] = OrderedDict()

    def entry(self, key: K) -> Entry[V] | None:
        """The entry, fresh or expired (see `Entry.fresh`), or None if never put or evicted."""
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def get(self, key: K) -> V | None:
        """The value while fresh, else None."""
        found = self.entry(key)
        return found.value if found is not None and found.fresh else None

    def put(self, key: K, value: V, ttl_s: float | None = None) -> None:
        self._entries[key] = Entry(value, time.monotonic() + (self.ttl_s if ttl_s is None else ttl_s))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
