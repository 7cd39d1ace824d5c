"""Ordered SQL migrations under an advisory lock, so concurrent starters apply each file once."""

from __future__ import annotations

from importlib import resources

from infra.postgres.db import connect
from infra.runtime.logging import get_logger

log = get_logger(__name__)

# Any constant shared by every Cortexx process; it names the migration lock.
_LOCK_KEY = 0x0C0_47E_88

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("infra.postgres") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


async def migrate(url: str, *, wait_s: float = 0.0) -> list[str]:
    """Apply every migration not yet applied; return the versions applied now. Waits up to
    `wait_s` for a server still starting."""
    conn = await connect(url, wait_s=wait_s)
    applied: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(_CREATE_LEDGER)
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, sql in migration_files():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
                log.info("migration.applied", version=version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()
    return applied
