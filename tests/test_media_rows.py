"""The webhook writer's media rows and fetch jobs (processors/writer.py), against a real Postgres:
each file of a realistic stream is one pending row, queued for the media agent, and a
redelivery queues again only what is still pending (a crash between the commit and the produce
must not leave a file unfetched, and a stored one is not fetched twice)."""

from __future__ import annotations

import random
from typing import Any

import asyncpg

from processors.autoreply import CompanyCache
from processors.rows import to_rows
from processors.writer import RowWriter, load_companies
from schemas.media import WHATSAPP_MEDIA_KINDS, MediaJob, sha256_hex
from schemas.records import WebhookRecord
from tests.test_batch_store import _batches, _company, _records, _stream


def _files(envelopes: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[str, str | None]]:
    """Every file the envelopes carry, read straight from Meta's shapes: (message id, position)
    -> (what names it, its hash)."""
    out: dict[tuple[str, int], tuple[str, str | None]] = {}
    for envelope in envelopes:
        for entry in envelope.get("entry", []):
            for change in entry.get("changes", []):
                for message in change.get("value", {}).get("messages", []) or []:
                    kind = message.get("type")
                    part = message.get(kind) if kind in WHATSAPP_MEDIA_KINDS else None
                    if isinstance(part, dict) and part.get("id"):
                        out[(message["id"], 0)] = (str(part["id"]), sha256_hex(part.get("sha256")))
            for event in entry.get("messaging", []):
                message = event.get("message") or {}
                if message.get("is_echo") or not message.get("mid"):
                    continue
                for n, attachment in enumerate(message.get("attachments") or []):
                    url = (attachment.get("payload") or {}).get("url")
                    if attachment.get("type") in ("image", "audio", "video", "file") and url:
                        out[(message["mid"], n)] = (url, None)
    return out


async def _write(db: asyncpg.Connection, batches: list[list[WebhookRecord]]) -> list[MediaJob]:
    jobs: list[MediaJob] = []
    companies = CompanyCache()
    for batch in batches:
        async with db.transaction():
            writer = RowWriter(db)
            await writer.apply(to_rows(batch, await load_companies(db, companies, batch)))
        jobs += writer.media
    return jobs


async def test_every_file_of_a_stream_is_one_pending_row_and_one_job(db: asyncpg.Connection) -> None:
    company = await _company(db, "media")
    _, envelopes, _ = _stream()
    files = _files(envelopes)
    assert len(files) > 10  # the stream has photos, voice notes, documents, attachments
    records = _records(envelopes, company.slug)
    jobs = await _write(db, _batches(records, random.Random(3)))

    rows = await db.fetch(
        "SELECT id::text, message_external_id, position, source_ref, expected_sha256, state"
        " FROM media WHERE company_id = $1",
        company.id,
    )
    assert {
        (r["message_external_id"], r["position"]): (r["source_ref"], r["expected_sha256"]) for r in rows
    } == files
    assert {r["state"] for r in rows} == {"pending"}
    # Every row queued; the stream's redeliveries queue theirs again while they are pending.
    assert {job.media_id for job in jobs} == {r["id"] for r in rows}
    assert {job.tenant for job in jobs} == {company.slug}


async def test_a_redelivery_queues_again_only_what_is_still_pending(db: asyncpg.Connection) -> None:
    company = await _company(db, "media-again")
    _, envelopes, _ = _stream()
    records = _records(envelopes, company.slug)
    first = await _write(db, [records])
    stored = {job.media_id for job in first[: len(first) // 2]}
    await db.execute(
        "UPDATE media SET state = 'stored', storage_key = 'k' WHERE id = ANY($1::uuid[])", list(stored)
    )

    again = await _write(db, _batches(records, random.Random(4)))

    assert {job.media_id for job in again} == {job.media_id for job in first} - stored
    count = await db.fetchval("SELECT count(*) FROM media WHERE company_id = $1", company.id)
    assert count == len(first)
