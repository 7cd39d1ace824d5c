"""Turn webhook records into rows: contacts, conversations, messages, statuses, notifications.

Plain async functions over one asyncpg connection, so the agent and a test call the same code.
Every write is idempotent through a unique constraint (never check-then-insert): a redelivered
record finds its message already there and changes nothing, sends no second notification and
bumps no counter twice. A status only ever moves up its rank, so arrival order does not matter.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import asyncpg
import orjson

from processors.autoreply import Company, CompanyCache, auto_replies_due
from schemas.meta import WHATSAPP_OBJECT
from schemas.outbound import OutboundMessage
from schemas.records import WebhookRecord

# sent < delivered < read < played (a voice note listened to); failed is terminal (ranked above
# all); inbound messages are received, and no status moves them (statuses are about what the
# business sent).
STATUS_RANK: dict[str, int] = {
    "pending": 0,
    "received": 0,
    "sent": 1,
    "delivered": 2,
    "read": 3,
    "played": 4,
    "failed": 9,
}
PREVIEW_MAX = 200


class PoisonRecord(ValueError):
    """A record that can never be stored as it is; it belongs in the dead-letter topic."""


@dataclass(slots=True)
class BatchStats:
    messages: int = 0
    duplicates: int = 0
    statuses: int = 0
    notifications: int = 0
    events: int = 0


UPSERT_CONTACT = """
INSERT INTO contacts (company_id, phone_number, channel, name)
VALUES ($1, $2, $3, $4)
ON CONFLICT (company_id, phone_number, channel) WHERE deleted_at IS NULL
DO UPDATE SET name = COALESCE(EXCLUDED.name, contacts.name),
              updated_at = CASE WHEN EXCLUDED.name IS DISTINCT FROM contacts.name
                                 AND EXCLUDED.name IS NOT NULL
                                THEN now() ELSE contacts.updated_at END
RETURNING id
"""

UPSERT_CONVERSATION = """
INSERT INTO conversations (company_id, contact_id, channel)
VALUES ($1, $2, $3)
ON CONFLICT (company_id, contact_id) WHERE deleted_at IS NULL
DO UPDATE SET channel = conversations.channel
RETURNING id, (xmax = 0) AS created
"""

INSERT_MESSAGE = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, content,
                      status, status_rank, status_at, sent_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
ON CONFLICT (company_id, external_id) DO NOTHING
RETURNING id
"""

BUMP_CONVERSATION = """
UPDATE conversations
   SET last_message_id = CASE WHEN last_message_at IS NULL OR last_message_at <= $3
                              THEN $2 ELSE last_message_id END,
       last_message_preview = CASE WHEN last_message_at IS NULL OR last_message_at <= $3
                                   THEN $4 ELSE last_message_preview END,
       last_message_at = GREATEST(last_message_at, $3),
       unread_count = unread_count + $5,
       status = CASE WHEN $5 > 0 AND status = 'closed' THEN 'open' ELSE status END,
       updated_at = now()
 WHERE id = $1
"""

NOTIFY_USERS = """
INSERT INTO notifications (company_id, user_id, kind, conversation_id, message_id, title, body)
SELECT $1, u.id, 'message.received', $2, $3, $4, $5
  FROM users u
 WHERE u.company_id = $1 AND u.is_active
ON CONFLICT (user_id, message_id) DO NOTHING
"""

# A status for a message we have not seen (sent before this system, or its send record not yet
# written) creates the outbound message, so that neither the status nor its order is lost.
UPSERT_STATUS = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, content,
                      status, status_rank, status_at, error, sent_at)
VALUES ($1, $2, $3, 'outbound', 'unknown', '{}'::jsonb, $4, $5, $6, $7, $6)
ON CONFLICT (company_id, external_id) DO UPDATE
   SET status = EXCLUDED.status,
       status_rank = EXCLUDED.status_rank,
       status_at = EXCLUDED.status_at,
       error = COALESCE(EXCLUDED.error, messages.error),
       updated_at = now()
 WHERE messages.status_rank < EXCLUDED.status_rank AND messages.direction = 'outbound'
RETURNING id
"""

MARK_DELIVERED_BY_IDS = """
UPDATE messages
   SET status = 'delivered', status_rank = 2, status_at = $3, updated_at = now()
 WHERE company_id = $1 AND external_id = ANY($2::text[]) AND status_rank < 2
   AND direction = 'outbound'
"""

MARK_READ_UP_TO = """
UPDATE messages
   SET status = 'read', status_rank = 3, status_at = $3, updated_at = now()
 WHERE conversation_id = $1 AND direction = 'outbound' AND sent_at <= $2 AND status_rank < 3
"""

COMPANY = """
SELECT id, wuzapi_token, welcome_message, away_message, timezone, business_hours
  FROM companies WHERE slug = $1
"""

INSERT_AUTO_REPLY = """
INSERT INTO auto_replies (company_id, conversation_id, kind, window_key, outbound_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
RETURNING outbound_id
"""

INSERT_PENDING_REPLY = """
INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, content,
                      status, status_rank, sent_at)
VALUES ($1, $2, $3, 'outbound', 'text', $4, $5, 'pending', 0, now())
ON CONFLICT (company_id, external_id) DO NOTHING
"""

# Auto-replies committed earlier but never sent (a crash between commit and produce): sent again,
# under the same id, when the webhook that caused them is redelivered.
PENDING_AUTO_REPLIES = """
SELECT ar.outbound_id, m.body
  FROM auto_replies ar
  JOIN messages m ON m.company_id = ar.company_id AND m.external_id = ar.outbound_id
 WHERE ar.company_id = $1 AND ar.conversation_id = $2 AND m.status = 'pending'
"""

INSERT_EVENT = """
INSERT INTO webhook_events (company_id, object, field, event_key, payload)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (company_id, event_key) DO NOTHING
RETURNING id
"""


# The instants a datetime holds on every platform, with a day to spare at each end. Outside
# them a timestamp is poison on both write paths alike: the batch path hands Postgres the epoch
# itself (`to_timestamp`), and must refuse exactly what `datetime.fromtimestamp` would.
_EPOCH_MIN = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_EPOCH_MAX = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


def _epoch(value: Any) -> float:
    """Meta timestamps: unix seconds (WhatsApp, as a string) or milliseconds (Messenger)."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise PoisonRecord(f"bad timestamp {value!r}") from exc
    if number > 1e11:  # milliseconds
        number /= 1000
    # NaN fails both comparisons. Poison, not an outage: retried, it would stall the partition.
    if not _EPOCH_MIN <= number <= _EPOCH_MAX:
        raise PoisonRecord(f"timestamp out of range {value!r}")
    return number


def _ts(value: Any) -> datetime:
    return datetime.fromtimestamp(_epoch(value), tz=UTC)


def _clip(text: Any) -> str | None:
    if text is None:
        return None
    out = str(text)
    return out if len(out) <= PREVIEW_MAX else out[: PREVIEW_MAX - 1] + "\u2026"


def whatsapp_body(message: dict[str, Any]) -> str:
    """The text an agent sees for a WhatsApp message of any type."""
    kind = message.get("type", "unknown")
    part = message.get(kind)
    part = part if isinstance(part, dict) else {}
    if kind == "text":
        return str(part.get("body", ""))
    if kind in ("image", "video", "document", "audio", "sticker"):
        label = part.get("caption") or part.get("filename")
        return str(label) if label else f"[{kind}]"
    if kind == "location":
        named = ", ".join(str(part[k]) for k in ("name", "address") if part.get(k))
        return named or f"{part.get('latitude')},{part.get('longitude')}"
    if kind == "contacts":
        cards = message.get("contacts") or []
        names = [str((c.get("name") or {}).get("formatted_name", "")) for c in cards]
        return "[contact] " + ", ".join(n for n in names if n)
    if kind == "interactive":
        for reply in ("button_reply", "list_reply", "nfm_reply"):
            chosen = part.get(reply)
            if isinstance(chosen, dict):
                return str(chosen.get("title") or chosen.get("body") or chosen.get("id", ""))
        return "[interactive]"
    if kind == "button":
        return str(part.get("text") or part.get("payload", ""))
    if kind == "reaction":
        return str(part.get("emoji") or "[reaction removed]")
    if kind == "order":
        items = part.get("product_items") or []
        return str(part.get("text") or f"[order] {len(items)} item(s)")
    if kind == "system":
        return str(part.get("body", "[system]"))
    return f"[{kind}]"


def event_key(obj: str, entry_id: str, field: str, payload: Any) -> str:
    """The key a kept event is unique by: the same payload redelivered hashes the same."""
    return hashlib.sha256(
        orjson.dumps([obj, entry_id, field, payload], option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def profile_names(value: dict[str, Any]) -> dict[str, str | None]:
    """A WhatsApp change's contacts: wa_id -> profile name (None where not given, or where the
    "name" is not a string: both write paths then store the message without it)."""
    names: dict[str, str | None] = {}
    for c in value.get("contacts") or ():
        if isinstance(c, dict):
            name = (c.get("profile") or {}).get("name")
            names[str(c.get("wa_id"))] = name if isinstance(name, str) else None
    return names


class MessagingMessage(NamedTuple):
    """A Messenger / Instagram message event, as both write paths store it (a NamedTuple: one
    is made per record, and a frozen dataclass costs ten times as much to build)."""

    channel: str
    user: str  # the customer: the recipient of an echo, else the sender
    external_id: str
    direction: str
    kind: str
    body: str


def messaging_message(record: WebhookRecord) -> MessagingMessage | None:
    """The message of a `messaging` record; None for receipts and other events."""
    event = record.payload
    message = event.get("message")
    if not isinstance(message, dict) or not message.get("mid"):
        return None
    sender = str((event.get("sender") or {}).get("id", ""))
    recipient = str((event.get("recipient") or {}).get("id", ""))
    echo = bool(message.get("is_echo")) or sender == record.entry_id
    attachments = message.get("attachments") or []
    kind = "text"
    body = message.get("text")
    if body is None and attachments:
        kind = str(attachments[0].get("type", "attachment"))
        body = f"[{kind}]"
    return MessagingMessage(
        channel="instagram" if record.object == "instagram" else "messenger",
        user=recipient if echo else sender,
        external_id=str(message["mid"]),
        direction="outbound" if echo else "inbound",
        kind=kind,
        body=str(body or ""),
    )


class Store:
    """Writes for one transaction. `companies` caches tenant settings across batches;
    `outbound` collects the auto-replies to produce once the transaction has committed."""

    def __init__(self, conn: asyncpg.Connection, companies: CompanyCache) -> None:
        self.conn = conn
        self.companies = companies
        self.stats = BatchStats()
        self.outbound: list[OutboundMessage] = []
        self._created: set[int] = set()

    async def company(self, slug: str) -> Company:
        cached = self.companies.get(slug)
        if cached is not None:
            return cached
        row = await self.conn.fetchrow(COMPANY, slug)
        if row is None:
            raise PoisonRecord(f"unknown tenant {slug!r}")
        company = Company(
            id=int(row["id"]),
            slug=slug,
            wuzapi_token=row["wuzapi_token"],
            welcome_message=row["welcome_message"],
            away_message=row["away_message"],
            timezone=row["timezone"],
            business_hours=row["business_hours"],
        )
        self.companies.put(company)
        return company

    async def apply(self, record: WebhookRecord) -> None:
        company = await self.company(record.tenant)
        try:
            if record.kind == "change" and record.object == WHATSAPP_OBJECT and record.field == "messages":
                await self._whatsapp(company, record.payload)
            elif record.kind == "messaging":
                await self._messaging(company, record)
            else:
                await self._keep_event(company.id, record)
        except (TypeError, AttributeError, KeyError, IndexError, OverflowError) as exc:
            # A payload of an unexpected shape (Meta keeps fields we do not check on the hot
            # path): it cannot be stored as it is, retrying will not change that.
            raise PoisonRecord(f"unexpected payload shape: {exc!r}") from exc

    async def _conversation(self, company_id: int, contact: str, channel: str, name: str | None) -> int:
        if not contact:
            raise PoisonRecord("update names no contact")
        contact_id = await self.conn.fetchval(UPSERT_CONTACT, company_id, contact, channel, name)
        row = await self.conn.fetchrow(UPSERT_CONVERSATION, company_id, contact_id, channel)
        assert row is not None
        if row["created"]:
            self._created.add(int(row["id"]))
        return int(row["id"])

    async def _whatsapp(self, company: Company, value: dict[str, Any]) -> None:
        company_id = company.id
        names = profile_names(value)
        messages = value.get("messages") or ()
        statuses = value.get("statuses") or ()
        if not messages and not statuses:
            # An errors-only change (or something new): keep it rather than drop it.
            await self._keep(company_id, WHATSAPP_OBJECT, "messages", value)
            return
        for message in messages:
            if not isinstance(message, dict) or not message.get("id"):
                raise PoisonRecord("WhatsApp message without an id")
            sender = str(message.get("from", ""))
            conversation_id = await self._conversation(company_id, sender, "whatsapp", names.get(sender))
            await self._message(
                company,
                conversation_id,
                contact=sender,
                channel="whatsapp",
                external_id=str(message["id"]),
                direction="inbound",
                kind=str(message.get("type", "unknown")),
                body=whatsapp_body(message),
                content=message,
                at=_ts(message.get("timestamp")),
                contact_name=names.get(sender) or sender,
            )
        for status in statuses:
            if not isinstance(status, dict) or not status.get("id"):
                raise PoisonRecord("WhatsApp status without an id")
            state = str(status.get("status", ""))
            if state not in STATUS_RANK:
                # A status we do not rank (e.g. "deleted"): kept as an event, message untouched.
                await self._keep(company_id, WHATSAPP_OBJECT, "statuses", status)
                continue
            recipient = str(status.get("recipient_id", ""))
            conversation_id = await self._conversation(company_id, recipient, "whatsapp", None)
            errors = status.get("errors")
            await self.conn.fetchval(
                UPSERT_STATUS,
                company_id,
                conversation_id,
                str(status["id"]),
                state,
                STATUS_RANK[state],
                _ts(status.get("timestamp")),
                errors or None,
            )
            self.stats.statuses += 1

    async def _message(
        self,
        company: Company,
        conversation_id: int,
        *,
        contact: str,
        channel: str,
        external_id: str,
        direction: str,
        kind: str,
        body: str,
        content: dict[str, Any],
        at: datetime,
        contact_name: str,
    ) -> None:
        company_id = company.id
        status = "received" if direction == "inbound" else "sent"
        message_id = await self.conn.fetchval(
            INSERT_MESSAGE,
            company_id,
            conversation_id,
            external_id,
            direction,
            kind,
            body,
            content,
            status,
            STATUS_RANK[status],
            at,
        )
        inbound = direction == "inbound"
        if message_id is None:
            self.stats.duplicates += 1
            if inbound:
                await self._auto_replies(company, conversation_id, contact, channel, at, duplicate=True)
            return
        self.stats.messages += 1
        preview = _clip(body)
        await self.conn.execute(
            BUMP_CONVERSATION, conversation_id, message_id, at, preview, 1 if inbound else 0
        )
        if inbound:
            result = await self.conn.execute(
                NOTIFY_USERS,
                company_id,
                conversation_id,
                message_id,
                f"New message from {contact_name}",
                preview or "",
            )
            self.stats.notifications += int(result.rsplit(" ", 1)[-1])
            await self._auto_replies(company, conversation_id, contact, channel, at, duplicate=False)

    async def _messaging(self, company: Company, record: WebhookRecord) -> None:
        company_id = company.id
        event = record.payload
        channel = "instagram" if record.object == "instagram" else "messenger"
        sender = str((event.get("sender") or {}).get("id", ""))
        message = messaging_message(record)
        if message is not None:
            conversation_id = await self._conversation(company_id, message.user, channel, None)
            await self._message(
                company,
                conversation_id,
                contact=message.user,
                channel=channel,
                external_id=message.external_id,
                direction=message.direction,
                kind=message.kind,
                body=message.body,
                content=event,
                at=_ts(event.get("timestamp")),
                contact_name=message.user,
            )
            return
        delivery = event.get("delivery")
        if isinstance(delivery, dict):
            mids = [str(m) for m in delivery.get("mids") or ()]
            if mids:
                await self.conn.execute(MARK_DELIVERED_BY_IDS, company_id, mids, _ts(event.get("timestamp")))
                self.stats.statuses += 1
                return
        read = event.get("read")
        if isinstance(read, dict) and read.get("watermark"):
            conversation_id = await self._conversation(company_id, sender, channel, None)
            await self.conn.execute(
                MARK_READ_UP_TO,
                conversation_id,
                _ts(read["watermark"]),
                _ts(event.get("timestamp")),
            )
            self.stats.statuses += 1
            return
        await self._keep_event(company_id, record)

    async def _keep_event(self, company_id: int, record: WebhookRecord) -> None:
        await self._keep(company_id, record.object, record.field, record.payload, record.entry_id)

    async def _keep(self, company_id: int, obj: str, field: str, payload: Any, entry_id: str = "") -> None:
        digest = event_key(obj, entry_id, field, payload)
        await self.conn.fetchval(INSERT_EVENT, company_id, obj, field, digest, payload)
        self.stats.events += 1

    async def _auto_replies(
        self,
        company: Company,
        conversation_id: int,
        contact: str,
        channel: str,
        at: datetime,
        *,
        duplicate: bool,
    ) -> None:
        """Welcome a new conversation; answer outside business hours; each once per window."""
        if channel != "whatsapp" or not (company.welcome_message or company.away_message):
            return
        if duplicate:
            for row in await self.conn.fetch(PENDING_AUTO_REPLIES, company.id, conversation_id):
                self.queue_reply(company, conversation_id, contact, row["outbound_id"], row["body"])
            return
        due = auto_replies_due(company, at, new_conversation=conversation_id in self._created)
        for kind, window, text in due:
            outbound_id = uuid.uuid4().hex
            inserted = await self.conn.fetchval(
                INSERT_AUTO_REPLY, company.id, conversation_id, kind, window, outbound_id
            )
            if inserted is None:
                continue  # already answered in this window
            await self.conn.execute(
                INSERT_PENDING_REPLY, company.id, conversation_id, outbound_id, text, {"auto_reply": kind}
            )
            self.queue_reply(company, conversation_id, contact, outbound_id, text)

    def queue_reply(
        self, company: Company, conversation_id: int, contact: str, outbound_id: str, text: str
    ) -> None:
        self.outbound.append(
            OutboundMessage(
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
        )
