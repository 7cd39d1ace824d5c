"""Companies (tenants): registration and the lookup that ingest caches."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import asyncpg

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class InvalidSlug(ValueError):
    """A tenant slug that no company can have."""


@dataclass(frozen=True, slots=True)
class Tenant:
    id: int
    slug: str
    name: str
    app_secret: str
    verify_token: str


GET_TENANT_BY_SLUG = """
SELECT id, slug, name, app_secret, verify_token FROM companies WHERE slug = $1
"""

UPSERT_TENANT = """
INSERT INTO companies (slug, name, app_secret, verify_token, meta_access_token)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (slug) DO UPDATE
   SET name = COALESCE(NULLIF($2, ''), companies.name),
       app_secret = EXCLUDED.app_secret,
       verify_token = EXCLUDED.verify_token,
       meta_access_token = COALESCE(EXCLUDED.meta_access_token, companies.meta_access_token),
       updated_at = now()
RETURNING id, slug, name, app_secret, verify_token, (xmax = 0) AS created
"""


def _tenant(row: Any) -> Tenant:
    return Tenant(row["id"], row["slug"], row["name"], row["app_secret"], row["verify_token"])


async def get_tenant(conn: asyncpg.Connection | asyncpg.Pool, slug: str) -> Tenant | None:
    row = await conn.fetchrow(GET_TENANT_BY_SLUG, slug)
    return _tenant(row) if row else None


async def upsert_tenant(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    slug: str,
    app_secret: str,
    verify_token: str,
    name: str = "",
    meta_access_token: str | None = None,
) -> tuple[Tenant, bool]:
    """Register a company, or update its secrets when it exists; return it and whether it is new.
    `meta_access_token` (the Graph API token its media is fetched with) is kept when None."""
    if not SLUG_RE.match(slug):
        raise InvalidSlug(f"slug {slug!r} must be lowercase letters, digits and dashes")
    row = await conn.fetchrow(UPSERT_TENANT, slug, name or slug, app_secret, verify_token, meta_access_token)
    assert row is not None
    return _tenant(row), bool(row["created"])
