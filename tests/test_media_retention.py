"""The retention job (processors/media.py `prune_media`): stored files older than the retention
period are deleted from the store and their rows say so; newer ones, and other states, stay."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg

from infra.postgres.db import create_pool
from infra.postgres.tenants import Tenant
from infra.storage import MediaStore
from processors.media import prune_media
from tests.support import ServiceUrls


async def _chunks(data: bytes):  # type: ignore[no-untyped-def]
    yield data


async def _stored(db: asyncpg.Connection, store: MediaStore, tenant: Tenant, age_days: float) -> str:
    media_id = uuid.uuid4()
    key = f"{tenant.id}/{media_id}"
    await store.put(key, _chunks(b"receipt " + media_id.bytes))
    await db.execute(
        "INSERT INTO media (id, company_id, message_external_id, direction, source, kind, state,"
        " storage_key, stored_at) VALUES ($1, $2, $3, 'inbound', 'whatsapp', 'image', 'stored', $4,"
        " now() - make_interval(secs => $5))",
        media_id,
        tenant.id,
        f"wamid.{media_id.hex}",
        key,
        age_days * 86400,
    )
    return key


async def test_old_files_are_deleted_and_marked_expired_new_ones_kept(
    services: ServiceUrls, db: asyncpg.Connection, tenant: Tenant, tmp_path: Path
) -> None:
    store = MediaStore.from_url((tmp_path / "media").as_uri())
    old = [await _stored(db, store, tenant, 400) for _ in range(3)]
    new = [await _stored(db, store, tenant, 10) for _ in range(2)]
    pool = await create_pool(services.database_url, min_size=1, max_size=2)
    try:
        pruned = await prune_media(pool, store, older_than_s=365 * 86400, batch=2)
    finally:
        await pool.close()

    assert pruned >= 3  # this company's three (other tests' old files may go too)
    for key in old:
        assert await store.size(key) is None
    for key in new:
        assert await store.size(key) is not None
    states = {
        r["storage_key"] or r["message_external_id"]: (r["state"], r["reason"])
        for r in await db.fetch(
            "SELECT state, reason, storage_key, message_external_id FROM media WHERE company_id = $1",
            tenant.id,
        )
    }
    assert sorted(s for s, _ in states.values()) == ["expired"] * 3 + ["stored"] * 2
    assert all("retention" in (reason or "") for state, reason in states.values() if state == "expired")
