"""A small TTL cache in front of the companies table: ingest looks a tenant up on every POST."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import Counter

from infra.postgres.tenants import Tenant
from infra.runtime.ttl_cache import TtlCache

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
        self._negative_ttl_s = negative_ttl_s
        self._entries: TtlCache[str, Tenant | None] = TtlCache(ttl_s=ttl_s, max_size=max_size)

    async def get(self, slug: str) -> Tenant | None:
        cached = self._entries.entry(slug)
        if cached is not None and cached.fresh:
            _HIT.inc()
            return cached.value
        _MISS.inc()
        try:
            tenant = await self._load(slug)
        except Exception:
            if cached is not None and cached.value is not None:
                _STALE.inc()
                return cached.value
            raise
        self._entries.put(slug, tenant, None if tenant is not None else self._negative_ttl_s)
        return tenant
