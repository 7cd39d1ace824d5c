"""A small TTL cache in front of the companies table: ingest looks a tenant up on every POST."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from infra.tenants import Tenant

TENANT_CACHE = Counter("cortexx_ingest_tenant_cache_total", "Tenant lookups by cache result", ["result"])
_HIT = TENANT_CACHE.labels("hit")
_MISS = TENANT_CACHE.labels("miss")
_STALE = TENANT_CACHE.labels("stale")


class TenantCache:
    """Positive entries live `ttl_s`, unknown slugs `negative_ttl_s` (so a new tenant is found
    quickly and a flood of bad slugs does not reach Postgres on every request).

    When the load fails (the database is down or stalled), a company seen before is served from
    its expired entry, so its webhooks keep being accepted; the failure reaches only slugs never
    seen, or last seen unknown."""

    def __init__(
        self,
        load: Callable[[str], Awaitable[Tenant | None]],
        *,
        ttl_s: float,
        negative_ttl_s: float,
        max_size: int,
    ) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._max_size = max_size
        self._entries: OrderedDict[str, tuple[float, Tenant | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def get(self, slug: str) -> Tenant | None:
        now = time.monotonic()
        cached = self._entries.get(slug)
        if cached is not None and cached[0] > now:
            self.hits += 1
            _HIT.inc()
            self._entries.move_to_end(slug)
            return cached[1]
        self.misses += 1
        _MISS.inc()
        try:
            tenant = await self._load(slug)
        except Exception:
            if cached is not None and cached[1] is not None:
                _STALE.inc()
                return cached[1]
            raise
        ttl = self._ttl_s if tenant is not None else self._negative_ttl_s
        self._entries[slug] = (now + ttl, tenant)
        self._entries.move_to_end(slug)
        while len(self._entries) > self._max_size:
            self._entries.popitem(last=False)
        return tenant

    def invalidate(self, slug: str) -> None:
        self._entries.pop(slug, None)
