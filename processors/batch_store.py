"""The worker's batch path: a batch of `meta.webhooks` records written with a fixed number of
set-based statements, whatever its size.

`Store.apply` runs 4 to 6 statements per record, one round trip each, so a 500-record batch cost
some 2,500 sequential round trips and the worker made a fifth of what Faust can feed it
(BENCHMARKS.md). Here each statement runs over `unnest()` arrays:

1. contacts upsert (deduplicated in Python, sorted so that concurrent workers lock in one order);
2. conversations upsert (the same), returning which were created;
3. messages insert, `ON CONFLICT DO NOTHING RETURNING`: the inserted ones are the new ones;
4. one conversation bump per conversation (latest message, unread count), aggregated in Python;
5. notifications for every new inbound message, joined to the company's active users;
6. auto-replies due for the new inbound messages, `ON CONFLICT DO NOTHING RETURNING`, and their
   pending outbound messages; pending ones of redelivered messages are looked up to send again;
7. statuses upsert, one row per message (its highest-ranked status in the batch: the final state
   the per-record path reaches too, since a status never moves down);
8. kept events (`webhook_events`).

Records it does not model (Messenger delivery / read receipts, unranked statuses, errors-only
changes) go through `Store.apply` in the same transaction. It leaves the same rows as the
per-record path (tests/test_batch_store.py compares them); when a batch holds a poison record,
the caller redoes it record by record with `Store`, which finds the culprit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from processors.autoreply import Company, CompanyCache, auto_replies_due
from processors.store import (
    STATUS_RANK,
    PoisonRecord,
    Store,
    _clip,
    _epoch,
    event_key,
    messaging_message,
    profile_names,
    whatsapp_body,
)
from schemas.meta import WHATSAPP_OBJECT
from schemas.records import WebhookRecord

# Each statement takes its rows as one JSON array of objects (`json_to_recordset`), not as one
# array parameter per column: asyncpg encodes an array element in about 0.9 µs of the worker's
# CPU (a timestamp in 1.5), orjson a whole row in well under that, and the worker's CPU is what
# limits its rate (BENCHMARKS.md). Timestamps travel as epoch seconds (`to_timestamp`).

UPSERT_CONTACTS = """
INSERT INTO contacts (company_id, phone_number, channel, name)
SELECT u.c, u.phone, u.channel, u.name
  FROM json_to_recordset($1::json) AS u(c bigint, phone text, channel text, name text)
ON CONFLICT (company_id, phone_number, channel) WHERE deleted_at IS NULL
DO UPDATE SET name = COALESCE(EXCLUDED.name, contacts.name),
              updated_at = CASE WHEN EXCLUDED.name IS DISTINCT FROM contacts.name
                                 AND EXCLUDED.name IS NOT NULL
                                THEN now() ELSE contacts.updated_at END
RETURNING id, company_id, phone_number, channel
"""

UPSERT_CONVERSATIONS = """
INSERT INTO conversations (company_id, contact_id, channel)
SELECT u.c, u.contact, u.channel
  FROM json_to_recordset($1::json) AS u(c bigint, contact bigint, channel text)
ON CONFLICT (company_id, contact_id) WHERE deleted_at IS NULL
DO UPDATE SET channel = conversations.channel
RETURNING id, contact_id, (xmax = 0) AS created
"""

INSERT_MESSAGES = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, content,
                      status, status_rank, status_at, sent_at)
SELECT u.c, u.conv, u.ext, u.dir, u.kind, u.body, u.content, u.st, u.rank,
       to_timestamp(u.at), to_timestamp(u.at)
  FROM json_to_recordset($1::json)
       AS u(c bigint, conv bigint, ext text, dir text, kind text, body text, content jsonb,
            st text, rank int2, at float8)
ON CONFLICT (company_id, external_id) DO NOTHING
RETURNING id, company_id, external_id
"""

BUMP_CONVERSATIONS = """
UPDATE conversations c
   SET last_message_id = CASE WHEN c.last_message_at IS NULL OR c.last_message_at <= u.at
                              THEN u.mid ELSE c.last_message_id END,
       last_message_preview = CASE WHEN c.last_message_at IS NULL OR c.last_message_at <= u.at
                                   THEN u.preview ELSE c.last_message_preview END,
       last_message_at = GREATEST(c.last_message_at, u.at),
       unread_count = c.unread_count + u.inbound,
       status = CASE WHEN u.inbound > 0 AND c.status = 'closed' THEN 'open' ELSE c.status END,
       updated_at = now()
  FROM (SELECT r.id, r.mid, to_timestamp(r.at) AS at, r.preview, r.inbound
          FROM json_to_recordset($1::json)
               AS r(id bigint, mid bigint, at float8, preview text, inbound int4)) AS u
 WHERE c.id = u.id
"""

NOTIFY = """
INSERT INTO notifications (company_id, user_id, kind, conversation_id, message_id, title, body)
SELECT u.c, us.id, 'message.received', u.conv, u.mid, u.title, u.body
  FROM json_to_recordset($1::json) AS u(c bigint, conv bigint, mid bigint, title text, body text)
  JOIN users us ON us.company_id = u.c AND us.is_active
ON CONFLICT (user_id, message_id) DO NOTHING
"""

UPSERT_STATUSES = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, content,
                      status, status_rank, status_at, error, sent_at)
SELECT u.c, u.conv, u.ext, 'outbound', 'unknown', '{}'::jsonb, u.st, u.rank, to_timestamp(u.at),
       u.err, to_timestamp(u.sent)
  FROM json_to_recordset($1::json)
       AS u(c bigint, conv bigint, ext text, st text, rank int2, at float8, err jsonb, sent float8)
ON CONFLICT (company_id, external_id) DO UPDATE
   SET status = EXCLUDED.status,
       status_rank = EXCLUDED.status_rank,
       status_at = EXCLUDED.status_at,
       error = COALESCE(EXCLUDED.error, messages.error),
       updated_at = now()
 WHERE messages.status_rank < EXCLUDED.status_rank AND messages.direction = 'outbound'
"""

INSERT_EVENTS = """
INSERT INTO webhook_events (company_id, object, field, event_key, payload)
SELECT u.c, u.object, u.field, u.key, u.payload
  FROM json_to_recordset($1::json) AS u(c bigint, object text, field text, key text, payload jsonb)
ON CONFLICT (company_id, event_key) DO NOTHING
"""

INSERT_AUTO_REPLIES = """
INSERT INTO auto_replies (company_id, conversation_id, kind, window_key, outbound_id)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[])
ON CONFLICT DO NOTHING
RETURNING outbound_id
"""

INSERT_PENDING_REPLIES = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, content,
                      status, status_rank, sent_at)
SELECT u.c, u.conv, u.ext, 'outbound', 'text', u.body, u.content::jsonb, 'pending', 0, now()
  FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[])
       AS u(c, conv, ext, body, content)
ON CONFLICT (company_id, external_id) DO NOTHING
"""

# Auto-replies committed earlier but never sent (a crash between commit and produce): sent again,
# under the same id, when the webhook that caused them is redelivered.
PENDING_AUTO_REPLIES = """
SELECT ar.conversation_id, ar.outbound_id, m.body
  FROM unnest($1::bigint[], $2::bigint[]) AS u(c, conv)
  JOIN auto_replies ar ON ar.company_id = u.c AND ar.conversation_id = u.conv
  JOIN messages m ON m.company_id = ar.company_id AND m.external_id = ar.outbound_id
 WHERE m.status = 'pending'
 ORDER BY ar.created_at, ar.outbound_id
"""

ContactKey = tuple[int, str, str]  # company_id, phone_number / scoped id, channel


@dataclass(slots=True)
class _Message:
    company: Company
    contact: ContactKey
    external_id: str
    direction: str
    kind: str
    body: str
    content: dict[str, Any]
    at: float  # epoch seconds
    title: str


@dataclass(slots=True)
class _Status:
    company_id: int
    contact: ContactKey
    external_id: str
    state: str
    rank: int
    at: float  # epoch seconds
    error: Any


@dataclass(slots=True)
class _Conversations:
    ids: dict[ContactKey, int]
    created: set[int]


class BatchStore:
    """Writes for one transaction, like `Store`, but a batch at a time: `write` once, then read
    `stats`, and `outbound` (the auto-replies to produce once the transaction has committed)."""

    def __init__(self, conn: asyncpg.Connection, companies: CompanyCache) -> None:
        self.conn = conn
        # The per-record path: company lookups, and the records this one does not model.
        self.store = Store(conn, companies)
        self.stats = self.store.stats
        self.outbound = self.store.outbound

    async def write(self, records: list[WebhookRecord]) -> None:
        names: dict[ContactKey, str | None] = {}
        messages: list[_Message] = []
        statuses: list[_Status] = []
        events: dict[tuple[int, str], dict[str, Any]] = {}
        fallback: list[WebhookRecord] = []
        company_of: dict[str, Company] = {}  # one (awaited) cache lookup per tenant, not per record
        try:
            for record in records:
                company = company_of.get(record.tenant)
                if company is None:
                    company = company_of[record.tenant] = await self.store.company(record.tenant)
                whatsapp = record.object == WHATSAPP_OBJECT and record.field == "messages"
                if record.kind == "change" and whatsapp:
                    if not self._whatsapp(company, record.payload, names, messages, statuses):
                        fallback.append(record)
                elif record.kind == "messaging":
                    if not self._messaging(company, record, names, messages):
                        fallback.append(record)
                else:
                    digest = event_key(record.object, record.entry_id, record.field, record.payload)
                    events.setdefault(
                        (company.id, digest),
                        {
                            "c": company.id,
                            "object": record.object,
                            "field": record.field,
                            "key": digest,
                            "payload": record.payload,
                        },
                    )
        except (TypeError, AttributeError, KeyError, IndexError, OverflowError) as exc:
            # The per-record path's rule: a payload of an unexpected shape is poison.
            raise PoisonRecord(f"unexpected payload shape: {exc!r}") from exc

        conversations = await self._conversations(names)
        await self._messages(messages, conversations)
        await self._statuses(statuses, conversations.ids)
        if events:
            await self.conn.execute(INSERT_EVENTS, [events[k] for k in sorted(events)])
            self.stats.events += len(events)
        for record in fallback:
            await self.store.apply(record)

    # ------------------------------------------------------------------ decoding

    def _whatsapp(
        self,
        company: Company,
        value: dict[str, Any],
        names: dict[ContactKey, str | None],
        messages: list[_Message],
        statuses: list[_Status],
    ) -> bool:
        raw_messages = value.get("messages") or ()
        raw_statuses = value.get("statuses") or ()
        if not raw_messages and not raw_statuses:
            return False
        if any(isinstance(s, dict) and s.get("status") not in STATUS_RANK for s in raw_statuses):
            return False  # an unranked status is kept as an event by the per-record path
        profile = profile_names(value) if raw_messages else {}
        for message in raw_messages:
            if not isinstance(message, dict) or not message.get("id"):
                raise PoisonRecord("WhatsApp message without an id")
            sender = str(message.get("from", ""))
            if not sender:
                raise PoisonRecord("update names no contact")
            key = (company.id, sender, "whatsapp")
            name = profile.get(sender)
            # The last name given wins, as the per-record upserts leave it.
            if name is not None or key not in names:
                names[key] = name if name is not None else names.get(key)
            messages.append(
                _Message(
                    company,
                    key,
                    str(message["id"]),
                    "inbound",
                    str(message.get("type", "unknown")),
                    whatsapp_body(message),
                    message,
                    _epoch(message.get("timestamp")),
                    f"New message from {name or sender}",
                )
            )
        for status in raw_statuses:
            if not isinstance(status, dict) or not status.get("id"):
                raise PoisonRecord("WhatsApp status without an id")
            recipient = str(status.get("recipient_id", ""))
            if not recipient:
                raise PoisonRecord("update names no contact")
            key = (company.id, recipient, "whatsapp")
            names.setdefault(key, None)
            state = str(status["status"])
            statuses.append(
                _Status(
                    company.id,
                    key,
                    str(status["id"]),
                    state,
                    STATUS_RANK[state],
                    _epoch(status.get("timestamp")),
                    status.get("errors") or None,
                )
            )
        return True

    def _messaging(
        self,
        company: Company,
        record: WebhookRecord,
        names: dict[ContactKey, str | None],
        messages: list[_Message],
    ) -> bool:
        message = messaging_message(record)
        if message is None:
            return False  # delivery, read and others: the per-record path
        if not message.user:
            raise PoisonRecord("update names no contact")
        key = (company.id, message.user, message.channel)
        names.setdefault(key, None)
        messages.append(
            _Message(
                company,
                key,
                message.external_id,
                message.direction,
                message.kind,
                message.body,
                record.payload,
                _epoch(record.payload.get("timestamp")),
                f"New message from {message.user}",
            )
        )
        return True

    # ------------------------------------------------------------------ statements

    async def _conversations(self, names: dict[ContactKey, str | None]) -> _Conversations:
        if not names:
            return _Conversations({}, set())
        keys = sorted(names)
        rows = await self.conn.fetch(
            UPSERT_CONTACTS,
            [{"c": k[0], "phone": k[1], "channel": k[2], "name": names[k]} for k in keys],
        )
        contact_ids = {(r["company_id"], r["phone_number"], r["channel"]): r["id"] for r in rows}
        keys.sort(key=lambda k: (k[0], contact_ids[k]))
        rows = await self.conn.fetch(
            UPSERT_CONVERSATIONS,
            [{"c": k[0], "contact": contact_ids[k], "channel": k[2]} for k in keys],
        )
        by_contact = {r["contact_id"]: r["id"] for r in rows}
        created = {r["id"] for r in rows if r["created"]}
        return _Conversations({k: by_contact[contact_ids[k]] for k in keys}, created)

    async def _messages(self, messages: list[_Message], conversations: _Conversations) -> None:
        if not messages:
            return
        stats = self.stats
        ids = conversations.ids
        unique: dict[tuple[int, str], _Message] = {}
        for m in messages:
            unique.setdefault((m.company.id, m.external_id), m)
        batch = list(unique.values())
        received, sent = STATUS_RANK["received"], STATUS_RANK["sent"]
        rows = await self.conn.fetch(
            INSERT_MESSAGES,
            [
                {
                    "c": m.company.id,
                    "conv": ids[m.contact],
                    "ext": m.external_id,
                    "dir": m.direction,
                    "kind": m.kind,
                    "body": m.body,
                    "content": m.content,
                    "st": "received" if m.direction == "inbound" else "sent",
                    "rank": received if m.direction == "inbound" else sent,
                    "at": m.at,
                }
                for m in batch
            ],
        )
        inserted = {(r["company_id"], r["external_id"]): r["id"] for r in rows}
        stats.messages += len(inserted)
        stats.duplicates += len(messages) - len(inserted)
        # One bump per conversation: its latest new message (the later one among equal times,
        # as the per-record path leaves it), and how many new messages are inbound.
        bumps: dict[int, dict[str, Any]] = {}
        notify: list[dict[str, Any]] = []
        for m in batch:
            message_id = inserted.get((m.company.id, m.external_id))
            if message_id is None:
                continue
            conversation_id = ids[m.contact]
            inbound = 1 if m.direction == "inbound" else 0
            preview = _clip(m.body)
            bump = bumps.get(conversation_id)
            if bump is None:
                bumps[conversation_id] = {
                    "id": conversation_id,
                    "mid": message_id,
                    "at": m.at,
                    "preview": preview,
                    "inbound": inbound,
                }
            else:
                if m.at >= bump["at"]:
                    bump["mid"], bump["at"], bump["preview"] = message_id, m.at, preview
                bump["inbound"] += inbound
            if inbound:
                notify.append(
                    {
                        "c": m.company.id,
                        "conv": conversation_id,
                        "mid": message_id,
                        "title": m.title,
                        "body": preview or "",
                    }
                )
        if bumps:
            await self.conn.execute(BUMP_CONVERSATIONS, [bumps[i] for i in sorted(bumps)])
        if notify:
            result = await self.conn.execute(NOTIFY, notify)
            stats.notifications += int(result.rsplit(" ", 1)[-1])
        await self._auto_replies(messages, unique, inserted, conversations)

    async def _auto_replies(
        self,
        messages: list[_Message],
        unique: dict[tuple[int, str], _Message],
        inserted: dict[tuple[int, str], int],
        conversations: _Conversations,
    ) -> None:
        """Welcome a new conversation; answer outside business hours; each once per window.
        A redelivered message sends again the replies still pending in its conversation."""
        due: dict[tuple[int, str, str], tuple[_Message, str]] = {}  # (conversation, kind, window)
        redelivered: dict[int, _Message] = {}
        for m in messages:
            company = m.company
            if m.direction != "inbound" or m.contact[2] != "whatsapp":
                continue
            if not (company.welcome_message or company.away_message):
                continue
            conversation_id = conversations.ids[m.contact]
            key = (company.id, m.external_id)
            if key in inserted and unique[key] is m:
                new = conversation_id in conversations.created
                at = datetime.fromtimestamp(m.at, tz=UTC)
                for kind, window, text in auto_replies_due(company, at, new_conversation=new):
                    due.setdefault((conversation_id, kind, window), (m, text))
            else:
                redelivered.setdefault(conversation_id, m)
        if due:
            # Ids are made here and kept only if their row is new (first in its window).
            proposed = {uuid.uuid4().hex: (k, m, text) for k, (m, text) in due.items()}
            rows = await self.conn.fetch(
                INSERT_AUTO_REPLIES,
                [m.company.id for _, m, _ in proposed.values()],
                [k[0] for k, _, _ in proposed.values()],
                [k[1] for k, _, _ in proposed.values()],
                [k[2] for k, _, _ in proposed.values()],
                list(proposed),
            )
            kept = [(r["outbound_id"], *proposed[r["outbound_id"]]) for r in rows]
            if kept:
                await self.conn.execute(
                    INSERT_PENDING_REPLIES,
                    [m.company.id for _, _, m, _ in kept],
                    [k[0] for _, k, _, _ in kept],
                    [outbound_id for outbound_id, _, _, _ in kept],
                    [text for _, _, _, text in kept],
                    [orjson.dumps({"auto_reply": k[1]}).decode() for _, k, _, _ in kept],
                )
            for outbound_id, k, m, text in kept:
                self.store.queue_reply(m.company, k[0], m.contact[1], outbound_id, text)
        if redelivered:
            queued = {reply.id for reply in self.outbound}
            order = sorted(redelivered)
            for row in await self.conn.fetch(
                PENDING_AUTO_REPLIES, [redelivered[c].company.id for c in order], order
            ):
                if row["outbound_id"] in queued:
                    continue
                conversation_id = int(row["conversation_id"])
                m = redelivered[conversation_id]
                reply_id, text = row["outbound_id"], row["body"]
                self.store.queue_reply(m.company, conversation_id, m.contact[1], reply_id, text)

    async def _statuses(self, statuses: list[_Status], conversations: dict[ContactKey, int]) -> None:
        if not statuses:
            return
        best: dict[tuple[int, str], _Status] = {}
        # A message first known by its status is "sent" at the time of the first status to
        # arrive (the per-record path inserts it then, and later ones only raise its status).
        first_at: dict[tuple[int, str], float] = {}
        for s in statuses:
            key = (s.company_id, s.external_id)
            held = best.get(key)
            if held is None:
                first_at[key] = s.at
            if held is None or s.rank > held.rank:
                best[key] = s
        await self.conn.execute(
            UPSERT_STATUSES,
            [
                {
                    "c": s.company_id,
                    "conv": conversations[s.contact],
                    "ext": s.external_id,
                    "st": s.state,
                    "rank": s.rank,
                    "at": s.at,
                    "err": s.error,
                    "sent": first_at[k],
                }
                for k, s in sorted(best.items())
            ],
        )
        self.stats.statuses += len(statuses)
