"""The worker's one writer: a row set (`processors.rows`) applied with a fixed number of set-based
statements, whatever its size.

A statement per kind of row, each over one JSON array of rows (`json_to_recordset`), none run
for an empty set:

1. contacts, each found or made by `contact_for` (migration 0014: by BSUID, else by phone), in
   one sorted order so that concurrent workers lock in one order;
2. conversations upsert (the same), returning which were created;
3. messages insert, `ON CONFLICT DO NOTHING RETURNING`: the inserted ones are the new ones;
4. one bump per conversation with new messages (latest message, unread count, ad referral);
5. notifications for every new inbound message, joined to the company's active users;
6. auto-replies due, `ON CONFLICT DO NOTHING RETURNING` (once per conversation, kind and
   window), 7. their pending outbound messages, and 8. the replies still pending in the
   conversations of redelivered messages, to send again under the same id;
9. edits and revokes kept, and 10. applied to their targets (those of this batch and the new
   messages, which may have arrived after them): the latest edit is the body, a revoke marks it
   deleted, and a conversation whose last message changed shows it;
11. reactions upsert (the latest per message and contact wins; a removal is kept);
12. WhatsApp statuses upsert, one row per message (its highest-ranked status of the batch);
13. Messenger / Instagram delivery receipts and 14. read watermarks;
15. kept events (`webhook_events`);
16. identity changes, after the rest: a user's new BSUID or number names the contact the old one
   did, and a contact made meanwhile under the new one (in this batch or before) is merged in;
17. for batches whose messages carry files: their media rows, pending, returning those still
   pending (new, or a redelivery's whose fetch has not finished), for the media agent.

Every write is idempotent through a unique constraint, and a status or receipt moves only a
message the business sent (direction 'outbound'), and only up its rank. Reactions, edits and
revokes are not messages: they bump no conversation, count as no unread and notify no one.

Each statement takes its rows as one JSON document rather than one array parameter per column:
asyncpg encodes an array element in about 0.9 µs of the worker's CPU (a timestamp in 1.5),
orjson a whole row in well under that, and the worker's CPU is what limits its rate
(BENCHMARKS.md). Timestamps travel as epoch seconds (`to_timestamp`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg

from processors.autoreply import Company, CompanyCache
from processors.rows import (
    ContactKey,
    DueReply,
    Message,
    MessageKey,
    RowSet,
    amendment_rows,
    bumps_and_notifications,
    contact_rows,
    conversation_rows,
    delivered_rows,
    event_rows,
    id_change_rows,
    media_rows,
    message_rows,
    reaction_rows,
    read_rows,
    replies_due,
    status_rows,
)
from schemas.media import MediaJob
from schemas.outbound import OutboundMessage
from schemas.previews import PREVIEW_MAX
from schemas.records import WebhookRecord

COMPANIES = """
SELECT id, slug, wuzapi_token, welcome_message, away_message, timezone, business_hours
  FROM companies WHERE slug = ANY($1::text[])
"""

# One call per change, in the array's order (a function scan's order): a user may change twice.
ID_CHANGES = """
SELECT contact_identity_changed(u.company_id, u.channel, u.old_user_id, u.new_user_id,
                                u.old_phone, u.new_phone, u.parent_user_id)
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, channel text, old_user_id text, new_user_id text, old_phone text,
            new_phone text, parent_user_id text)
"""

# One call per party, in the rows' order (the lock order); the answer carries each contact's
# phone number as now known, which may come from an earlier record than this batch's.
# Known and unchanged, the common case, a contact is found by a plain join; the others go
# through contact_for (migration 0014), whose EXCEPTION block costs a subtransaction per call
# (and past 64 in one transaction, every snapshot pays for them). The join finds what
# contact_for would.
CONTACTS = """
WITH u AS MATERIALIZED (
    SELECT * FROM json_to_recordset($1::json)
           AS u(company_id bigint, channel text, phone text, user_id text, username text,
                parent_user_id text, name text, n int4)
), known AS MATERIALIZED (
    SELECT u.n, c.id, c.phone_number
      FROM u
      JOIN LATERAL (
            SELECT c.* FROM contact_user_ids cu JOIN contacts c ON c.id = cu.contact_id
             WHERE u.user_id IS NOT NULL AND cu.company_id = u.company_id
               AND cu.channel = u.channel AND cu.user_id = u.user_id AND c.deleted_at IS NULL
            UNION ALL
            SELECT c.* FROM contacts c
             WHERE u.user_id IS NULL AND c.company_id = u.company_id AND c.channel = u.channel
               AND c.phone_number = u.phone AND c.deleted_at IS NULL
           ) c ON true
     WHERE (u.user_id IS NULL OR c.user_id = u.user_id)
       AND (u.phone IS NULL OR c.phone_number = u.phone)
       AND (u.name IS NULL OR c.name = u.name)
       AND (u.username IS NULL OR c.username = u.username)
       AND (u.parent_user_id IS NULL OR c.parent_user_id = u.parent_user_id)
), held AS MATERIALIZED (
    -- Held until the batch commits, so that another worker's merge cannot fold them away
    -- meanwhile; one it folded since the join is left out, and found again below.
    SELECT c.id FROM contacts c
     WHERE c.id IN (SELECT k.id FROM known k) AND c.deleted_at IS NULL
     ORDER BY c.id FOR SHARE
), found AS MATERIALIZED (
    SELECT k.n, k.id, k.phone_number FROM known k WHERE k.id IN (SELECT h.id FROM held h)
)
SELECT n, id, phone_number FROM found
UNION ALL
SELECT u.n, f.id, f.phone_number
  FROM u CROSS JOIN LATERAL contact_for(u.company_id, u.channel, u.phone, u.user_id, u.username,
                                        u.parent_user_id, u.name) AS f
 WHERE NOT EXISTS (SELECT 1 FROM found k WHERE k.n = u.n)
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
                      status, status_rank, status_at, sent_at, reply_to, forwarded, referral,
                      error)
SELECT u.company_id, u.conversation_id, u.external_id, u.direction, u.kind, u.body, u.content,
       u.status, u.rank, to_timestamp(u.at), to_timestamp(u.at), u.reply_to, u.forwarded,
       u.referral, u.error
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, conversation_id bigint, external_id text, direction text, kind text,
            body text, content jsonb, status text, rank int2, at float8, reply_to text,
            forwarded boolean, referral jsonb, error jsonb)
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
       referral = COALESCE(c.referral, u.referral),
       updated_at = now()
  FROM (SELECT r.conversation_id, r.message_id, to_timestamp(r.at) AS at, r.preview, r.inbound,
               r.referral
          FROM json_to_recordset($1::json)
               AS r(conversation_id bigint, message_id bigint, at float8, preview text,
                    inbound int4, referral jsonb)) AS u
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

INSERT_AMENDMENTS = """
INSERT INTO message_amendments (company_id, external_id, message_external_id, kind, body, content, at)
SELECT u.company_id, u.external_id, u.target, u.kind, u.body, u.content, to_timestamp(u.at)
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, external_id text, target text, kind text, body text, content jsonb,
            at float8)
ON CONFLICT (company_id, external_id) DO NOTHING
"""

# The targets' state from all their amendments, whichever order they came in: the latest edit
# (by time, then id) is the body, the body before the first kept in original_body; any revoke
# deletes. A conversation whose last message it is shows the change in its preview ($2: the
# preview's length, as schemas.previews clips; a deleted message previews as nothing).
APPLY_AMENDMENTS = """
WITH targets AS MATERIALIZED (
    -- Only those with amendments: most are new messages that have none, and the few left
    -- make the update below an index lookup per target, not a join over messages.
    SELECT DISTINCT u.company_id, u.target
      FROM json_to_recordset($1::json) AS u(company_id bigint, target text)
     WHERE EXISTS (SELECT 1 FROM message_amendments a
                    WHERE a.company_id = u.company_id AND a.message_external_id = u.target)
), latest_edit AS (
    SELECT DISTINCT ON (a.company_id, a.message_external_id)
           a.company_id, a.message_external_id, a.body, a.at
      FROM message_amendments a
      JOIN targets t ON t.company_id = a.company_id AND t.target = a.message_external_id
     WHERE a.kind = 'edit'
     ORDER BY a.company_id, a.message_external_id, a.at DESC, a.external_id DESC
), revoked AS (
    SELECT a.company_id, a.message_external_id, min(a.at) AS at
      FROM message_amendments a
      JOIN targets t ON t.company_id = a.company_id AND t.target = a.message_external_id
     WHERE a.kind = 'revoke'
     GROUP BY a.company_id, a.message_external_id
), fixes AS MATERIALIZED (
    SELECT t.company_id, t.target, e.body, e.at AS edited_at, r.at AS deleted_at
      FROM targets t
      LEFT JOIN latest_edit e ON e.company_id = t.company_id AND e.message_external_id = t.target
      LEFT JOIN revoked r ON r.company_id = t.company_id AND r.message_external_id = t.target
     WHERE e.at IS NOT NULL OR r.at IS NOT NULL
), changed AS (
    UPDATE messages m
       SET original_body = CASE WHEN f.edited_at IS NOT NULL AND m.edited_at IS NULL
                                THEN m.body ELSE m.original_body END,
           body = CASE WHEN f.edited_at IS NOT NULL AND f.body IS NOT NULL THEN f.body ELSE m.body END,
           edited_at = COALESCE(f.edited_at, m.edited_at),
           deleted_at = COALESCE(f.deleted_at, m.deleted_at),
           updated_at = now()
      FROM fixes f
     WHERE m.company_id = f.company_id AND m.external_id = f.target
       AND (m.edited_at IS DISTINCT FROM COALESCE(f.edited_at, m.edited_at)
            OR m.deleted_at IS DISTINCT FROM COALESCE(f.deleted_at, m.deleted_at))
    RETURNING m.id, m.conversation_id, m.body, m.deleted_at
)
UPDATE conversations c
   SET last_message_preview = CASE WHEN x.deleted_at IS NOT NULL THEN ''
                                   WHEN length(x.body) <= $2 THEN x.body
                                   ELSE left(x.body, $2 - 1) || '…' END,
       updated_at = now()
  FROM changed x
 WHERE c.id = x.conversation_id AND c.last_message_id = x.id
"""

# A later reaction of the same contact to the same message replaces it, an earlier one
# (redelivered, or out of order) does not; a removal stays as a NULL emoji.
UPSERT_REACTIONS = """
INSERT INTO message_reactions (company_id, message_external_id, contact_id, emoji, reacted_at,
                               reaction_external_id)
SELECT u.company_id, u.target, u.contact_id, u.emoji, to_timestamp(u.at), u.external_id
  FROM json_to_recordset($1::json)
       AS u(company_id bigint, contact_id bigint, external_id text, target text, emoji text,
            at float8)
ON CONFLICT (company_id, message_external_id, contact_id) DO UPDATE
   SET emoji = EXCLUDED.emoji, reacted_at = EXCLUDED.reacted_at,
       reaction_external_id = EXCLUDED.reaction_external_id
 WHERE (message_reactions.reacted_at, message_reactions.reaction_external_id)
       < (EXCLUDED.reacted_at, EXCLUDED.reaction_external_id)
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

# The new rows, and (in the statement's snapshot, which does not see the new ones) those of a
# redelivered message that are still pending: a crash between the commit and the produce of the
# fetch jobs left them so, and the redelivery queues them again.
INSERT_MEDIA = """
WITH u AS MATERIALIZED (
    SELECT * FROM json_to_recordset($1::json)
           AS u(company_id bigint, message_external_id text, position int2, source text,
                source_ref text, kind text, mime_type text, file_name text, caption text,
                expected_sha256 text)
), new AS (
    INSERT INTO media (company_id, message_external_id, position, direction, source, source_ref,
                       kind, mime_type, file_name, caption, expected_sha256)
    SELECT u.company_id, u.message_external_id, u.position, 'inbound', u.source, u.source_ref,
           u.kind, u.mime_type, u.file_name, u.caption, u.expected_sha256
      FROM u
    ON CONFLICT (company_id, message_external_id, position) DO NOTHING
    RETURNING id, company_id, message_external_id, position
)
SELECT id, company_id, message_external_id, position FROM new
UNION ALL
SELECT m.id, m.company_id, m.message_external_id, m.position
  FROM u JOIN media m USING (company_id, message_external_id, position)
 WHERE m.state = 'pending'
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
    transaction has committed, and `media`, the fetch jobs to produce then. An `apply` that
    raises leaves them as they were."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.stats = BatchStats()
        self.outbound: list[OutboundMessage] = []
        self.media: list[MediaJob] = []
        # Conversations created by earlier applies of this transaction: still new for a welcome.
        self._created: set[int] = set()
        # The messages this apply inserted: targets for amendments that arrived before them.
        self._inserted: dict[MessageKey, int] = {}

    async def apply(self, rows: RowSet) -> None:
        conn = self.conn
        stats = BatchStats(statuses=rows.receipts)
        outbound: list[OutboundMessage] = []
        media: list[MediaJob] = []

        parties = await self._contacts(rows)
        created = parties.created

        if rows.messages:
            outbound = await self._messages(rows, parties, stats)
        if rows.amendments or rows.messages:
            await self._amendments(rows)
        if rows.reactions:
            await conn.execute(UPSERT_REACTIONS, reaction_rows(rows.reactions, parties.contact_ids))
        if rows.statuses:
            await conn.execute(UPSERT_STATUSES, status_rows(rows.statuses, parties.conversations))
        if rows.delivered:
            await conn.execute(MARK_DELIVERED, delivered_rows(rows.delivered))
        if rows.read:
            await conn.execute(MARK_READ, read_rows(rows.read, parties.conversations))
        if rows.events:
            events = event_rows(rows.events)
            await conn.execute(INSERT_EVENTS, events)
            stats.events = len(events)
        if rows.id_changes:
            # Last: the rows above are filed under the ids their records named (an old one, or a
            # new one not linked yet), and the change folds the new contact into the old.
            await conn.execute(ID_CHANGES, id_change_rows(rows.id_changes))
        if rows.messages:
            media = await self._media(rows)

        self.stats.add(stats)
        self.outbound += outbound
        self.media += media
        self._created |= created

    async def _contacts(self, rows: RowSet) -> _Parties:
        """Every party's contact and conversation (made where new)."""
        parties = _Parties()
        named = rows.contacts()
        if not named:
            return parties
        ordered = contact_rows(named)
        keys = sorted(named)
        found = await self.conn.fetch(CONTACTS, ordered)
        for r in found:
            key = keys[r["n"]]
            parties.contact_ids[key] = r["id"]
            parties.phones[key] = r["phone_number"]
        found = await self.conn.fetch(UPSERT_CONVERSATIONS, conversation_rows(keys, parties.contact_ids))
        by_contact = {r["contact_id"]: r["id"] for r in found}
        parties.created = {r["id"] for r in found if r["created"]}
        parties.conversations = {k: by_contact[parties.contact_ids[k]] for k in keys}
        return parties

    async def _messages(self, rows: RowSet, parties: _Parties, stats: BatchStats) -> list[OutboundMessage]:
        """The new messages, their bumps and notifications; the auto-replies they call for."""
        conn = self.conn
        conversations = parties.conversations
        unique = rows.unique_messages()
        found = await conn.fetch(INSERT_MESSAGES, message_rows(unique.values(), conversations))
        inserted = {(r["company_id"], r["external_id"]): r["id"] for r in found}
        self._inserted = inserted
        stats.messages = len(inserted)
        stats.duplicates = len(rows.messages) - len(inserted)
        bumps, notify = bumps_and_notifications(unique.values(), inserted, conversations)
        if bumps:
            await conn.execute(BUMP_CONVERSATIONS, bumps)
        if notify:
            stats.notifications = _affected(await conn.execute(NOTIFY, notify))
        due, redelivered = replies_due(
            rows.messages, unique, inserted, conversations, self._created | parties.created, parties.phones
        )
        outbound = await self._auto_replies(due) if due else []
        if redelivered:
            outbound += await self._pending_replies(redelivered, parties, outbound)
        return outbound

    async def _auto_replies(self, due: list[DueReply]) -> list[OutboundMessage]:
        # Ids are made here and kept only if their row is new (first in its window).
        proposed = {uuid.uuid4().hex: reply for reply in due}
        kept = await self.conn.fetch(
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
            await self.conn.execute(
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
        return [
            _reply(r.message.company, r.conversation_id, r.to, outbound_id, r.text)
            for outbound_id, r in replies
        ]

    async def _pending_replies(
        self, redelivered: dict[int, Message], parties: _Parties, queued_now: list[OutboundMessage]
    ) -> list[OutboundMessage]:
        """Replies committed earlier and still pending in the conversations of redelivered
        messages: sent again under the same id (unless queued already)."""
        queued = {reply.id for reply in self.outbound} | {reply.id for reply in queued_now}
        order = sorted(redelivered)
        pending = await self.conn.fetch(
            PENDING_AUTO_REPLIES,
            [{"company_id": redelivered[c].company.id, "conversation_id": c} for c in order],
        )
        out: list[OutboundMessage] = []
        for row in pending:
            if row["outbound_id"] in queued:
                continue
            conversation_id = int(row["conversation_id"])
            m = redelivered[conversation_id]
            to = parties.phones.get(m.contact)
            if to is None:
                continue
            out.append(_reply(m.company, conversation_id, to, row["outbound_id"], row["body"]))
        return out

    async def _media(self, rows: RowSet) -> list[MediaJob]:
        """The batch's files as pending media rows; a fetch job for each still pending."""
        unique = rows.unique_messages()
        media = media_rows(unique.values())
        if not media:
            return []
        pending = await self.conn.fetch(INSERT_MEDIA, media)
        parts = {
            (m.company.id, m.external_id, part.position): (m, part)
            for m in unique.values()
            for part in m.media
        }
        jobs = []
        for row in pending:
            m, part = parts[(row["company_id"], row["message_external_id"], row["position"])]
            jobs.append(
                MediaJob(
                    media_id=str(row["id"]),
                    tenant=m.company.slug,
                    company_id=m.company.id,
                    message_external_id=m.external_id,
                    source=part.source,
                    ref=part.ref,
                    kind=part.kind,
                    sent_at_ms=int(m.at * 1000),
                    mime_type=part.mime_type,
                    expected_sha256=part.sha256,
                    file_name=part.file_name,
                )
            )
        return jobs

    async def _amendments(self, rows: RowSet) -> None:
        """Edits and revokes kept, then applied to every target they or the new messages name."""
        if rows.amendments:
            await self.conn.execute(INSERT_AMENDMENTS, amendment_rows(rows.amendments))
        targets = {(a.company_id, a.target) for a in rows.amendments}
        targets.update(self._inserted)
        self._inserted = {}
        if targets:
            await self.conn.execute(
                APPLY_AMENDMENTS,
                [{"company_id": c, "target": t} for c, t in sorted(targets)],
                PREVIEW_MAX,
            )


@dataclass(slots=True)
class _Parties:
    """The database's answers for a row set's parties, by the batch's key for each."""

    contact_ids: dict[ContactKey, int] = field(default_factory=dict)
    phones: dict[ContactKey, str | None] = field(default_factory=dict)
    conversations: dict[ContactKey, int] = field(default_factory=dict)
    created: set[int] = field(default_factory=set)


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
