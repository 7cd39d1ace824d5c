"""The worker's batch path leaves exactly the rows the per-record path leaves.

The worker writes each batch with `BatchStore` (a fixed number of set-based statements) and falls
back to `Store` (record by record) only to find a poison record. So the two must agree on every
row an agent sees: the same seeded stream is written once per path, into two companies with the
same settings (welcome and away auto-replies, two agents), delivered twice with different batch
boundaries, and the rows are compared.
"""

from __future__ import annotations

import random
import secrets
from typing import Any

import asyncpg
import pytest

from infra.meta_samples import build_plan, messenger_envelope, wa_change, wa_envelope, wa_message, wa_status
from infra.tenants import Tenant, upsert_tenant
from ingest.envelope import split_envelope
from processors.autoreply import CompanyCache
from processors.batch_store import BatchStore
from processors.store import PoisonRecord, Store
from schemas.records import WebhookRecord

# Rows as an agent sees them: no ids, no write times; auto-reply ids are random, so by their text.
SNAPSHOT: dict[str, str] = {
    "contacts": """
        SELECT phone_number, channel, name FROM contacts WHERE company_id = $1 ORDER BY 1, 2""",
    "conversations": """
        SELECT ct.phone_number, c.channel, c.status, c.unread_count, c.last_message_at,
               c.last_message_preview,
               CASE WHEN lm.content ? 'auto_reply' THEN lm.body ELSE lm.external_id END AS last_message
          FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
          LEFT JOIN messages lm ON lm.id = c.last_message_id
         WHERE c.company_id = $1 ORDER BY 1, 2""",
    "messages": """
        SELECT ct.phone_number, m.external_id, m.direction, m.type, m.body, m.content::text, m.status,
               m.status_rank, m.status_at, m.error::text, m.sent_at
          FROM messages m JOIN conversations c ON c.id = m.conversation_id
          JOIN contacts ct ON ct.id = c.contact_id
         WHERE m.company_id = $1 AND NOT m.content ? 'auto_reply' ORDER BY 2""",
    "auto_replies": """
        SELECT ct.phone_number, ar.kind, ar.window_key, m.body, m.status
          FROM auto_replies ar JOIN conversations c ON c.id = ar.conversation_id
          JOIN contacts ct ON ct.id = c.contact_id
          JOIN messages m ON m.company_id = ar.company_id AND m.external_id = ar.outbound_id
         WHERE ar.company_id = $1 ORDER BY 1, 2, 3""",
    "notifications": """
        SELECT u.name, n.kind, m.external_id, n.title, n.body
          FROM notifications n JOIN users u ON u.id = n.user_id JOIN messages m ON m.id = n.message_id
         WHERE n.company_id = $1 ORDER BY 1, 3""",
    "events": """
        SELECT object, field, event_key, payload::text FROM webhook_events WHERE company_id = $1
         ORDER BY 3""",
}


async def _company(db: asyncpg.Connection, slug: str) -> Tenant:
    tenant, _ = await upsert_tenant(
        db, slug=slug, app_secret=secrets.token_hex(16), verify_token=secrets.token_hex(8), name=slug
    )
    # Open on Tuesdays 22:00-22:35 UTC only: the stream's first messages (from 22:16) are welcomed,
    # the later ones (to 22:53) get the away reply.
    await db.execute(
        """UPDATE companies SET welcome_message = 'Welcome!', away_message = 'We are closed.',
                  timezone = 'UTC', business_hours = '{"tue": ["22:00", "22:35"]}'::jsonb
            WHERE id = $1""",
        tenant.id,
    )
    for agent in ("ana", "bo"):
        await db.execute(
            "INSERT INTO users (company_id, email, name) VALUES ($1, $2, $3)",
            tenant.id,
            f"{agent}@{slug}.test",
            agent,
        )
    return tenant


def _envelopes() -> list[dict[str, Any]]:
    plan = build_plan(
        seed=7,
        contacts=12,
        messages_per_contact=6,
        phone_number_id="106540352242922",
        display_phone_number="15550783881",
        waba_id="102290129340398",
        page_id="112233445566",
        start_ts=1_700_000_000,
    )
    envelopes = list(plan.webhooks)
    # What the batch path hands to the per-record path: Messenger receipts, an unranked status,
    # an errors-only change; and a status for a message this system never saw.
    messenger_mids = [
        m["messaging"][0]["message"]["mid"]
        for e in envelopes
        if e.get("object") == "page"
        for m in e["entry"]
        if "message" in m["messaging"][0]
    ]
    page_user = next(
        m["messaging"][0]["sender"]["id"]
        for e in envelopes
        if e.get("object") == "page"
        for m in e["entry"]
        if "message" in m["messaging"][0] and not m["messaging"][0]["message"].get("is_echo")
    )
    envelopes.append(
        messenger_envelope(
            [
                {
                    "sender": {"id": page_user},
                    "recipient": {"id": "112233445566"},
                    "timestamp": 1_700_100_000_000,
                    "delivery": {"mids": messenger_mids[:3], "watermark": 1_700_100_000_000},
                },
                {
                    "sender": {"id": page_user},
                    "recipient": {"id": "112233445566"},
                    "timestamp": 1_700_100_001_000,
                    "read": {"watermark": 1_700_100_001_000},
                },
            ],
            page_id="112233445566",
        )
    )
    status = {
        "id": "wamid.deleted",
        "status": "deleted",
        "timestamp": "1700000500",
        "recipient_id": "4915774900009",
    }
    known = wa_status(
        "delivered", wamid="wamid.sent-before-us", recipient_id="4915774900009", timestamp=1_700_000_600
    )
    # A profile "name" that is not a string: not a name; the message is stored all the same.
    odd_name = wa_change(
        phone_number_id="1",
        display_phone_number="2",
        messages=[wa_message("text", wamid="wamid.odd-name", from_="4915774900010", timestamp=1_700_000_700)],
        contacts=[("4915774900010", "placeholder")],
    )
    odd_name["value"]["contacts"][0]["profile"]["name"] = 5
    envelopes.append(
        wa_envelope(
            [
                odd_name,
                wa_change(phone_number_id="1", display_phone_number="2", statuses=[status]),
                wa_change(phone_number_id="1", display_phone_number="2", statuses=[known]),
                {"field": "messages", "value": {"messaging_product": "whatsapp", "errors": [{"code": 1}]}},
            ],
            waba_id="3",
        )
    )
    return envelopes


def _records(envelopes: list[dict[str, Any]], tenant: str) -> list[WebhookRecord]:
    return [
        WebhookRecord.from_bytes(value)
        for i, envelope in enumerate(envelopes)
        for _, value in split_envelope(envelope, tenant=tenant, request_id=f"r{i}", received_at_ms=i)
    ]


def _batches(records: list[WebhookRecord], rng: random.Random) -> list[list[WebhookRecord]]:
    out, i = [], 0
    while i < len(records):
        size = rng.randint(1, 60)
        out.append(records[i : i + size])
        i += size
    return out


async def _snapshot(db: asyncpg.Connection, company_id: int) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(r.values()) for r in await db.fetch(q, company_id)] for name, q in SNAPSHOT.items()}


async def test_batch_path_leaves_the_rows_of_the_per_record_path(db: asyncpg.Connection) -> None:
    suffix = secrets.token_hex(4)
    one = await _company(db, f"per-record-{suffix}")
    batched = await _company(db, f"batched-{suffix}")
    envelopes = _envelopes()
    replies: dict[str, list[tuple[str, str]]] = {"one": [], "batched": []}
    # Delivered twice, with different batch boundaries: the second time is all redelivery.
    for seed in (1, 2):
        rng = random.Random(seed)
        for batch in _batches(_records(envelopes, one.slug), rng):
            async with db.transaction():
                store = Store(db, CompanyCache())
                for record in batch:
                    await store.apply(record)
            replies["one"] += [(m.to, m.text or "") for m in store.outbound]
        rng = random.Random(seed)
        for batch in _batches(_records(envelopes, batched.slug), rng):
            async with db.transaction():
                writer = BatchStore(db, CompanyCache())
                await writer.write(batch)
            replies["batched"] += [(m.to, m.text or "") for m in writer.outbound]

    expected = await _snapshot(db, one.id)
    got = await _snapshot(db, batched.id)
    for table in SNAPSHOT:
        assert got[table] == expected[table], table
    # Both kinds of auto-reply were due, and each was queued to be sent (again on redelivery).
    assert {kind for _, kind, *_ in expected["auto_replies"]} == {"welcome", "away"}
    assert sorted(set(replies["batched"])) == sorted(set(replies["one"]))
    assert len(expected["messages"]) > 50 and len(expected["notifications"]) > 50
    assert ("4915774900010", "whatsapp", None) in expected["contacts"]


async def test_a_batch_with_a_poison_record_raises_and_writes_nothing(db: asyncpg.Connection) -> None:
    """The worker then redoes the batch record by record, which sets the poison one aside."""
    company = await _company(db, f"poison-{secrets.token_hex(4)}")
    records = _records(_envelopes()[:5], company.slug)
    good = records[0]
    bad = WebhookRecord.from_bytes(good.to_bytes().replace(b'"timestamp":"', b'"timestamp":"x', 1))
    with pytest.raises(PoisonRecord):
        async with db.transaction():
            await BatchStore(db, CompanyCache()).write([*records[1:], bad])
    assert await db.fetchval("SELECT count(*) FROM messages WHERE company_id = $1", company.id) == 0
    assert await db.fetchval("SELECT 1") == 1  # the connection is usable after the rollback
