"""The worker's one writer: a row set (`processors.rows`) applied with a fixed number of set-based
statements, whatever its size.

A statement per kind of row, each over one JSON array of rows (`json_to_recordset`), none run
for an empty set:

1. contacts upsert (sorted, so that concurrent workers lock in one order);
2. conversations upsert (the same), returning which were created;
3. messages insert, `ON CONFLICT DO NOTHING RETURNING`: the inserted ones are the new ones;
4. one bump per conversation with new messages (latest message, unread count);
5. notifications for every new inbound message, joined to the company's active users;
6. auto-replies due, `ON CONFLICT DO NOTHING RETURNING` (once per conversation, kind and
   window), 7. their pending outbound messages, and 8. the replies still pending in the
   conversations of redelivered messages, to send again under the same id;
9. WhatsApp statuses upsert, one row per message (its highest-ranked status of the batch);
10. Messenger / Instagram delivery receipts and 11. read watermarks;
12. kept events (`webhook_events`).

Every write is idempotent through a unique constraint, and a status or receipt moves only a
message the business sent (direction 'outbound'), and only up its rank. Each statement takes its
rows as one JSON document rather than one array parameter per column: asyncpg encodes an array
element in about 0.9 µs of the worker's CPU (a timestamp in 1.5), orjson a whole row in well
under that, and the worker's CPU is what limits its rate (BENCHMARKS.md). Timestamps travel as
epoch seconds (`to_timestamp`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from processors.autoreply import Company, CompanyCache
from processors.rows import (
    ContactKey,
    RowSet,
    bumps_and_notifications,
    contact_rows,
    conversation_rows,
    delivered_rows,
    event_rows,
    message_rows,
    read_rows,
    replies_due,
    status_rows,
)
from schemas.outbound import OutboundMessage
from schemas.records import WebhookRecord

COMPANIES = """
SELECT id, slug, wuzapi_token, welcome_message, away_message, timezone, business_hours
  FROM companies WHERE slug = ANY($1::text[])
"""

UPSERT_CONTACTS = """
INSERT INTO contacts (company_id, phone_number, channel, name)
SELECT u.company_id, u.phone, u.channel, u.name
  FROM json_to_recordset($1::json) AS u(company_id bigint, phone text, channel text, name text)
ON CONFLICT (company_id, phone_number, channel) WHERE deleted_at IS NULL
DO UPDATE SET name = COALESCE(EXCLUDED.name, contacts.name),
              updated_at = CASE WHEN EXCLUDED.name IS DISTINCT FROM contacts.name
                                 AND EXCLUDED.name IS NOT NULL
                                THEN now() ELSE contacts.updated_at END
RETURNING id, company_id, phone_number, channel
"""

UPSERT_CONVERSATIONS = """
INSERT INTO conversations (company_id, contact_id, channel)
SELECT u.company_id, u.contact_id, u.channel
  FROM json_to_recordset($1::json) AS u(company_id bigint, contact_id bigint, channel text)
ON CONFLICT (company_id, contact_id) WHERE deleted_at IS NULL
DO UPDATE SET channel = conversations.channel
RETURNING id, contact_id, (xmax = 0) AS created
"""

INSERT_MESSAGES = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, content,
                      status, status_rank, status_at, sent_at)
SELECT u.company_id, u.conversation_id, u.external_id, u.direction, u.kind, u.body, u.content,
       u.status, u.rank, to_timestamp(u.at), to_timestamp(u.at)
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, conversation_id bigint, external_id text, direction text, kind text,
            body text, content jsonb, status text, rank int2, at float8)
ON CONFLICT (company_id, external_id) DO NOTHING
RETURNING id, company_id, external_id
"""

BUMP_CONVERSATIONS = """
UPDATE conversations c
   SET last_message_id = CASE WHEN c.last_message_at IS NULL OR c.last_message_at <= u.at
                              THEN u.message_id ELSE c.last_message_id END,
       last_message_preview = CASE WHEN c.last_message_at IS NULL OR c.last_message_at <= u.at
                                   THEN u.preview ELSE c.last_message_preview END,
       last_message_at = GREATEST(c.last_message_at, u.at),
       unread_count = c.unread_count + u.inbound,
       status = CASE WHEN u.inbound > 0 AND c.status = 'closed' THEN 'open' ELSE c.status END,
       updated_at = now()
  FROM (SELECT r.conversation_id, r.message_id, to_timestamp(r.at) AS at, r.preview, r.inbound
          FROM json_to_recordset($1::json)
               AS r(conversation_id bigint, message_id bigint, at float8, preview text,
                    inbound int4)) AS u
 WHERE c.id = u.conversation_id
"""

NOTIFY = """
INSERT INTO notifications (company_id, user_id, kind, conversation_id, message_id, title, body)
SELECT u.company_id, us.id, 'message.received', u.conversation_id, u.message_id, u.title, u.body
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, conversation_id bigint, message_id bigint, title text, body text)
  JOIN users us ON us.company_id = u.company_id AND us.is_active
ON CONFLICT (user_id, message_id) DO NOTHING
"""

INSERT_AUTO_REPLIES = """
INSERT INTO auto_replies (company_id, conversation_id, kind, window_key, outbound_id)
SELECT u.company_id, u.conversation_id, u.kind, u.window_key, u.outbound_id
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, conversation_id bigint, kind text, window_key text, outbound_id text)
ON CONFLICT DO NOTHING
RETURNING outbound_id
"""

INSERT_PENDING_REPLIES = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, content,
                      status, status_rank, sent_at)
SELECT u.company_id, u.conversation_id, u.external_id, 'outbound', 'text', u.body, u.content,
       'pending', 0, now()
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, conversation_id bigint, external_id text, body text, content jsonb)
ON CONFLICT (company_id, external_id) DO NOTHING
"""

# Auto-replies committed earlier but never sent (a crash between commit and produce): sent again,
# under the same id, when the webhook that caused them is redelivered.
PENDING_AUTO_REPLIES = """
SELECT ar.conversation_id, ar.outbound_id, m.body
  FROM json_to_recordset($1::json) AS u(company_id bigint, conversation_id bigint)
  JOIN auto_replies ar ON ar.company_id = u.company_id AND ar.conversation_id = u.conversation_id
  JOIN messages m ON m.company_id = ar.company_id AND m.external_id = ar.outbound_id
 WHERE m.status = 'pending'
 ORDER BY ar.created_at, ar.outbound_id
"""

# A status for a message we have not seen (sent before this system, or its send record not yet
# written) creates the outbound message, so that neither the status nor its order is lost.
UPSERT_STATUSES = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, content,
                      status, status_rank, status_at, error, sent_at)
SELECT u.company_id, u.conversation_id, u.external_id, 'outbound', 'unknown', '{}'::jsonb,
       u.status, u.rank, to_timestamp(u.at), u.error, to_timestamp(u.sent_at)
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, conversation_id bigint, external_id text, status text, rank int2,
            at float8, error jsonb, sent_at float8)
ON CONFLICT (company_id, external_id) DO UPDATE
   SET status = EXCLUDED.status,
       status_rank = EXCLUDED.status_rank,
       status_at = EXCLUDED.status_at,
       error = COALESCE(EXCLUDED.error, messages.error),
       updated_at = now()
 WHERE messages.status_rank < EXCLUDED.status_rank AND messages.direction = 'outbound'
"""

MARK_DELIVERED = """
UPDATE messages m
   SET status = 'delivered', status_rank = 2, status_at = to_timestamp(u.at), updated_at = now()
  FROM json_to_recordset($1::json) AS u(company_id bigint, external_id text, at float8)
 WHERE m.company_id = u.company_id AND m.external_id = u.external_id AND m.status_rank < 2
   AND m.direction = 'outbound'
"""

# What the business sent in the conversation up to the watermark is read, at the time of the
# first receipt of the batch that covers it (as the receipts one by one would leave it).
MARK_READ = """
UPDATE messages m
   SET status = 'read', status_rank = 3, status_at = r.at, updated_at = now()
  FROM (SELECT DISTINCT ON (x.id) x.id, to_timestamp(u.at) AS at
          FROM json_to_recordset($1::json)
               AS u(conversation_id bigint, watermark float8, at float8, n int4)
          JOIN messages x ON x.conversation_id = u.conversation_id AND x.direction = 'outbound'
                         AND x.sent_at <= to_timestamp(u.watermark) AND x.status_rank < 3
         ORDER BY x.id, u.n) AS r
 WHERE m.id = r.id
"""

INSERT_EVENTS = """
INSERT INTO webhook_events (company_id, object, field, event_key, payload)
SELECT u.company_id, u.object, u.field, u.key, u.payload
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, object text, field text, key text, payload jsonb)
ON CONFLICT (company_id, event_key) DO NOTHING
"""


@dataclass(slots=True)
class BatchStats:
    messages: int = 0
    duplicates: int = 0
    statuses: int = 0
    notifications: int = 0
    events: int = 0

    def add(self, other: BatchStats) -> None:
        self.messages += other.messages
        self.duplicates += other.duplicates
        self.statuses += other.statuses
        self.notifications += other.notifications
        self.events += other.events


async def load_companies(
    conn: asyncpg.Connection, cache: CompanyCache, records: Iterable[WebhookRecord]
) -> dict[str, Company]:
    """The companies of `records` by slug: from the cache, the rest in one query. A slug not in
    the answer is an unknown tenant (`to_rows` makes its records poison)."""
    found: dict[str, Company] = {}
    missing: set[str] = set()
    for record in records:
        slug = record.tenant
        if slug in found or slug in missing:
            continue
        cached = cache.get(slug)
        if cached is None:
            missing.add(slug)
        else:
            found[slug] = cached
    if missing:
        for row in await conn.fetch(COMPANIES, sorted(missing)):
            company = Company(
                id=int(row["id"]),
                slug=row["slug"],
                wuzapi_token=row["wuzapi_token"],
                welcome_message=row["welcome_message"],
                away_message=row["away_message"],
                timezone=row["timezone"],
                business_hours=row["business_hours"],
            )
            cache.put(company)
            found[company.slug] = company
    return found


def _affected(result: str) -> int:
    return int(result.rsplit(" ", 1)[-1])


class RowWriter:
    """Applies row sets in one transaction: `apply` once or more (under savepoints, to isolate a
    poison record), then read `stats` and `outbound`, the auto-replies to produce once the
    transaction has committed. An `apply` that raises leaves both as they were."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.stats = BatchStats()
        self.outbound: list[OutboundMessage] = []
        # Conversations created by earlier applies of this transaction: still new for a welcome.
        self._created: set[int] = set()

    async def apply(self, rows: RowSet) -> None:
        conn = self.conn
        stats = BatchStats(statuses=rows.receipts)
        outbound: list[OutboundMessage] = []

        conversations: dict[ContactKey, int] = {}
        created: set[int] = set()
        names = rows.contacts()
        if names:
            found = await conn.fetch(UPSERT_CONTACTS, contact_rows(names))
            contact_ids = {(r["company_id"], r["phone_number"], r["channel"]): r["id"] for r in found}
            found = await conn.fetch(UPSERT_CONVERSATIONS, conversation_rows(names, contact_ids))
            by_contact = {r["contact_id"]: r["id"] for r in found}
            created = {r["id"] for r in found if r["created"]}
            conversations = {k: by_contact[contact_ids[k]] for k in names}

        if rows.messages:
            unique = rows.unique_messages()
            found = await conn.fetch(INSERT_MESSAGES, message_rows(unique.values(), conversations))
            inserted = {(r["company_id"], r["external_id"]): r["id"] for r in found}
            stats.messages = len(inserted)
            stats.duplicates = len(rows.messages) - len(inserted)
            bumps, notify = bumps_and_notifications(unique.values(), inserted, conversations)
            if bumps:
                await conn.execute(BUMP_CONVERSATIONS, bumps)
            if notify:
                stats.notifications = _affected(await conn.execute(NOTIFY, notify))
            due, redelivered = replies_due(
                rows.messages, unique, inserted, conversations, self._created | created
            )
            if due:
                # Ids are made here and kept only if their row is new (first in its window).
                proposed = {uuid.uuid4().hex: reply for reply in due}
                kept = await conn.fetch(
                    INSERT_AUTO_REPLIES,
                    [
                        {
                            "company_id": r.message.company.id,
                            "conversation_id": r.conversation_id,
                            "kind": r.kind,
                            "window_key": r.window,
                            "outbound_id": outbound_id,
                        }
                        for outbound_id, r in proposed.items()
                    ],
                )
                replies = [(row["outbound_id"], proposed[row["outbound_id"]]) for row in kept]
                if replies:
                    await conn.execute(
                        INSERT_PENDING_REPLIES,
                        [
                            {
                                "company_id": r.message.company.id,
                                "conversation_id": r.conversation_id,
                                "external_id": outbound_id,
                                "body": r.text,
                                "content": {"auto_reply": r.kind},
                            }
                            for outbound_id, r in replies
                        ],
                    )
                for outbound_id, r in replies:
                    m = r.message
                    outbound.append(_reply(m.company, r.conversation_id, m.contact[1], outbound_id, r.text))
            if redelivered:
                queued = {reply.id for reply in self.outbound} | {reply.id for reply in outbound}
                order = sorted(redelivered)
                pending = await conn.fetch(
                    PENDING_AUTO_REPLIES,
                    [{"company_id": redelivered[c].company.id, "conversation_id": c} for c in order],
                )
                for row in pending:
                    if row["outbound_id"] in queued:
                        continue
                    conversation_id = int(row["conversation_id"])
                    m = redelivered[conversation_id]
                    reply_id, text = row["outbound_id"], row["body"]
                    outbound.append(_reply(m.company, conversation_id, m.contact[1], reply_id, text))

        if rows.statuses:
            await conn.execute(UPSERT_STATUSES, status_rows(rows.statuses, conversations))
        if rows.delivered:
            await conn.execute(MARK_DELIVERED, delivered_rows(rows.delivered))
        if rows.read:
            await conn.execute(MARK_READ, read_rows(rows.read, conversations))
        if rows.events:
            events = event_rows(rows.events)
            await conn.execute(INSERT_EVENTS, events)
            stats.events = len(events)

        self.stats.add(stats)
        self.outbound += outbound
        self._created |= created


def _reply(
    company: Company, conversation_id: int, contact: str, outbound_id: str, text: str
) -> OutboundMessage:
    return OutboundMessage(
        id=outbound_id,
        tenant=company.slug,
        company_id=company.id,
        conversation_id=conversation_id,
        to=contact,
        kind="text",
        origin="auto_reply",
        created_at_ms=int(time.time() * 1000),
        text=text,
    )
