"""Webhook records into row sets: the worker's rules for what a record means, with no database.

`to_rows` turns a batch of `meta.webhooks` records into the rows they stand for (contacts,
messages, delivery statuses, Messenger receipts, kept events) and sets aside, record by record,
those that can never be stored (`PoisonRecord`): a record is all in or all out. What needs the
database's answer (which messages are new, which conversations were just created, their ids) is
decided by the functions below it, also pure, given those answers: conversation bumps,
notifications, auto-replies due, status rows. `processors.writer.RowWriter` runs the statements.

Every rule lives here once: status ranks, message bodies and previews per type, contact and
conversation keys, what is poison.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypedDict

import orjson

from processors.autoreply import Company, auto_replies_due
from schemas.meta import WHATSAPP_OBJECT
from schemas.previews import clip
from schemas.records import WebhookRecord

# sent < delivered < read < played (a voice note listened to); failed is terminal (ranked above
# all); inbound messages are received, and no status moves them (statuses are about what the
# business sent: the writer moves only messages of direction 'outbound').
STATUS_RANK: dict[str, int] = {
    "pending": 0,
    "received": 0,
    "sent": 1,
    "delivered": 2,
    "read": 3,
    "played": 4,
    "failed": 9,
}

ContactKey = tuple[int, str, str]  # company_id, phone number (wa_id) or scoped id, channel
MessageKey = tuple[int, str]  # company_id, external_id (wamid or mid)


class PoisonRecord(ValueError):
    """A record that can never be stored as it is; it belongs in the dead-letter topic."""


# The instants a datetime holds on every platform, with a day to spare at each end. Outside them
# a timestamp is poison: Postgres is handed the epoch itself (`to_timestamp`), and the auto-reply
# rules build a datetime from it, where `datetime.fromtimestamp` raises OverflowError or even
# OSError (EOVERFLOW), which the worker would take for an outage and retry forever.
_EPOCH_MIN = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_EPOCH_MAX = datetime(9999, 12, 30, tzinfo=UTC).timestamp()

# A payload of an unexpected shape (Meta keeps fields we do not check): it cannot be stored as
# it is, and retrying will not change that.
_SHAPE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, OverflowError)


def epoch(value: Any) -> float:
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
    "name" is not a string: the message is then stored without it)."""
    names: dict[str, str | None] = {}
    for c in value.get("contacts") or ():
        if isinstance(c, dict):
            name = (c.get("profile") or {}).get("name")
            names[str(c.get("wa_id"))] = name if isinstance(name, str) else None
    return names


class MessagingMessage(NamedTuple):
    """A Messenger / Instagram message event (a NamedTuple: one is made per record, and a frozen
    dataclass costs ten times as much to build)."""

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


# ---------------------------------------------------------------------------- what records say


@dataclass(slots=True)
class Message:
    """A message of a record: inbound (the customer's) or outbound (an echo of the business's)."""

    company: Company
    contact: ContactKey
    external_id: str
    direction: str
    kind: str
    body: str
    content: dict[str, Any]
    at: float  # epoch seconds
    name: str | None  # the contact's profile name, where the record gives one
    title: str  # of its notifications


@dataclass(slots=True)
class Status:
    """A WhatsApp status of a message the business sent (ranked: see STATUS_RANK)."""

    company_id: int
    contact: ContactKey
    external_id: str
    state: str
    rank: int
    at: float
    error: Any


class Delivered(NamedTuple):
    """A Messenger / Instagram delivery receipt: the business's messages `external_ids`."""

    company_id: int
    external_ids: list[str]
    at: float


class ReadUpTo(NamedTuple):
    """A Messenger / Instagram read receipt: what the business sent up to `watermark` is read."""

    contact: ContactKey
    watermark: float
    at: float


class Event(NamedTuple):
    """A change kept as it came (`webhook_events`): unknown fields, unranked statuses,
    errors-only changes, Messenger events other than messages and receipts."""

    company_id: int
    object: str
    field: str
    key: str
    payload: Any


@dataclass(slots=True)
class RowSet:
    """What a batch of records stands for, in record order; `poison` holds (index, error) of the
    records that stand for nothing storable, and nothing of theirs is in the rest."""

    messages: list[Message] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    delivered: list[Delivered] = field(default_factory=list)
    read: list[ReadUpTo] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    poison: list[tuple[int, PoisonRecord]] = field(default_factory=list)

    @property
    def receipts(self) -> int:
        """Statuses and receipts counted (`BatchStats.statuses`), applied or not."""
        return len(self.statuses) + len(self.delivered) + len(self.read)

    def contacts(self) -> dict[ContactKey, str | None]:
        """Every contact the rows name, with the last profile name given (None if none)."""
        names: dict[ContactKey, str | None] = {}
        for m in self.messages:
            if m.name is not None:
                names[m.contact] = m.name
            else:
                names.setdefault(m.contact, None)
        for s in self.statuses:
            names.setdefault(s.contact, None)
        for r in self.read:
            names.setdefault(r.contact, None)
        return names

    def unique_messages(self) -> dict[MessageKey, Message]:
        """Each message once (its first copy in the batch), by company and external id."""
        unique: dict[MessageKey, Message] = {}
        for m in self.messages:
            unique.setdefault((m.company.id, m.external_id), m)
        return unique


def to_rows(records: Sequence[WebhookRecord], companies: Mapping[str, Company]) -> RowSet:
    """The rows of `records`; `companies` by slug (a tenant not in it is unknown: poison)."""
    rows = RowSet()
    messages, statuses, delivered, read, events = (
        rows.messages,
        rows.statuses,
        rows.delivered,
        rows.read,
        rows.events,
    )
    for index, record in enumerate(records):
        marks = len(messages), len(statuses), len(delivered), len(read), len(events)
        try:
            company = companies.get(record.tenant)
            if company is None:
                raise PoisonRecord(f"unknown tenant {record.tenant!r}")
            obj, payload = record.object, record.payload
            try:
                if record.kind == "change" and obj == WHATSAPP_OBJECT and record.field == "messages":
                    _whatsapp(rows, company, payload)
                elif record.kind == "messaging":
                    _messaging(rows, company, record)
                else:
                    events.append(_event(company.id, obj, record.field, payload, record.entry_id))
            except _SHAPE_ERRORS as exc:
                raise PoisonRecord(f"unexpected payload shape: {exc!r}") from exc
        except PoisonRecord as exc:
            # All or nothing: what the record added before its fault goes too.
            del messages[marks[0] :], statuses[marks[1] :], delivered[marks[2] :]
            del read[marks[3] :], events[marks[4] :]
            rows.poison.append((index, exc))
    return rows


def _event(company_id: int, obj: str, field: str, payload: Any, entry_id: str = "") -> Event:
    return Event(company_id, obj, field, event_key(obj, entry_id, field, payload), payload)


def _whatsapp(rows: RowSet, company: Company, value: dict[str, Any]) -> None:
    raw_messages = value.get("messages") or ()
    raw_statuses = value.get("statuses") or ()
    if not raw_messages and not raw_statuses:
        # An errors-only change (or something new): kept rather than dropped.
        rows.events.append(_event(company.id, WHATSAPP_OBJECT, "messages", value))
        return
    profile = profile_names(value) if raw_messages else {}
    for message in raw_messages:
        if not isinstance(message, dict) or not message.get("id"):
            raise PoisonRecord("WhatsApp message without an id")
        sender = str(message.get("from", ""))
        if not sender:
            raise PoisonRecord("update names no contact")
        name = profile.get(sender)
        rows.messages.append(
            Message(
                company,
                (company.id, sender, "whatsapp"),
                str(message["id"]),
                "inbound",
                str(message.get("type", "unknown")),
                whatsapp_body(message),
                message,
                epoch(message.get("timestamp")),
                name,
                f"New message from {name or sender}",
            )
        )
    for status in raw_statuses:
        if not isinstance(status, dict) or not status.get("id"):
            raise PoisonRecord("WhatsApp status without an id")
        state = str(status.get("status", ""))
        rank = STATUS_RANK.get(state)
        if rank is None:
            # A status we do not rank (e.g. "deleted"): kept as an event, message untouched.
            rows.events.append(_event(company.id, WHATSAPP_OBJECT, "statuses", status))
            continue
        recipient = str(status.get("recipient_id", ""))
        if not recipient:
            raise PoisonRecord("update names no contact")
        rows.statuses.append(
            Status(
                company.id,
                (company.id, recipient, "whatsapp"),
                str(status["id"]),
                state,
                rank,
                epoch(status.get("timestamp")),
                status.get("errors") or None,
            )
        )


def _messaging(rows: RowSet, company: Company, record: WebhookRecord) -> None:
    event = record.payload
    channel = "instagram" if record.object == "instagram" else "messenger"
    sender = str((event.get("sender") or {}).get("id", ""))
    message = messaging_message(record)
    if message is not None:
        if not message.user:
            raise PoisonRecord("update names no contact")
        rows.messages.append(
            Message(
                company,
                (company.id, message.user, channel),
                message.external_id,
                message.direction,
                message.kind,
                message.body,
                event,
                epoch(event.get("timestamp")),
                None,
                f"New message from {message.user}",
            )
        )
        return
    delivery = event.get("delivery")
    if isinstance(delivery, dict):
        mids = [str(m) for m in delivery.get("mids") or ()]
        if mids:
            rows.delivered.append(Delivered(company.id, mids, epoch(event.get("timestamp"))))
            return
    read = event.get("read")
    if isinstance(read, dict) and read.get("watermark"):
        if not sender:
            raise PoisonRecord("update names no contact")
        rows.read.append(
            ReadUpTo((company.id, sender, channel), epoch(read["watermark"]), epoch(event.get("timestamp")))
        )
        return
    rows.events.append(_event(company.id, record.object, record.field, event, record.entry_id))


# ------------------------------------------------------- rows given the database's answers
#
# TypedDicts: each statement takes its rows as one JSON array of objects (`json_to_recordset`),
# and orjson encodes a dict several times faster than a dataclass. Their keys are the columns
# the statements in processors/writer.py declare. Timestamps are epoch seconds.


class ContactRow(TypedDict):
    company_id: int
    phone: str
    channel: str
    name: str | None


class ConversationRow(TypedDict):
    company_id: int
    contact_id: int
    channel: str


class MessageRow(TypedDict):
    company_id: int
    conversation_id: int
    external_id: str
    direction: str
    kind: str
    body: str
    content: dict[str, Any]
    status: str
    rank: int
    at: float


class BumpRow(TypedDict):
    conversation_id: int
    message_id: int
    at: float
    preview: str | None
    inbound: int


class NotificationRow(TypedDict):
    company_id: int
    conversation_id: int
    message_id: int
    title: str
    body: str


class StatusRow(TypedDict):
    company_id: int
    conversation_id: int
    external_id: str
    status: str
    rank: int
    at: float
    error: Any
    sent_at: float


class DeliveredRow(TypedDict):
    company_id: int
    external_id: str
    at: float


class ReadRow(TypedDict):
    conversation_id: int
    watermark: float
    at: float
    n: int  # its order in the batch: the first receipt to cover a message sets its time


class EventRow(TypedDict):
    company_id: int
    object: str
    field: str
    key: str
    payload: Any


class DueReply(NamedTuple):
    """An auto-reply an inbound message calls for; kept only if first in its window."""

    message: Message
    conversation_id: int
    kind: str
    window: str
    text: str


def contact_rows(names: Mapping[ContactKey, str | None]) -> list[ContactRow]:
    """Sorted, so that concurrent workers lock contacts in one order."""
    return [{"company_id": k[0], "phone": k[1], "channel": k[2], "name": names[k]} for k in sorted(names)]


def conversation_rows(
    keys: Iterable[ContactKey], contact_ids: Mapping[ContactKey, int]
) -> list[ConversationRow]:
    """Sorted by contact id (the conversations' key), for one lock order."""
    ordered = sorted(keys, key=lambda k: (k[0], contact_ids[k]))
    return [{"company_id": k[0], "contact_id": contact_ids[k], "channel": k[2]} for k in ordered]


_RECEIVED, _SENT = STATUS_RANK["received"], STATUS_RANK["sent"]


def message_rows(unique: Iterable[Message], conversations: Mapping[ContactKey, int]) -> list[MessageRow]:
    """A new message is received (inbound) or sent (an echo), at its own time."""
    return [
        {
            "company_id": m.company.id,
            "conversation_id": conversations[m.contact],
            "external_id": m.external_id,
            "direction": m.direction,
            "kind": m.kind,
            "body": m.body,
            "content": m.content,
            "status": "received" if m.direction == "inbound" else "sent",
            "rank": _RECEIVED if m.direction == "inbound" else _SENT,
            "at": m.at,
        }
        for m in unique
    ]


def bumps_and_notifications(
    unique: Iterable[Message],
    inserted: Mapping[MessageKey, int],
    conversations: Mapping[ContactKey, int],
) -> tuple[list[BumpRow], list[NotificationRow]]:
    """One bump per conversation with new messages: its latest (the later one among equal
    times), and how many new ones are inbound (unread); a notification per new inbound message,
    to each of the company's active agents."""
    bumps: dict[int, BumpRow] = {}
    notify: list[NotificationRow] = []
    for m in unique:
        message_id = inserted.get((m.company.id, m.external_id))
        if message_id is None:
            continue
        conversation_id = conversations[m.contact]
        inbound = 1 if m.direction == "inbound" else 0
        preview = clip(m.body)
        bump = bumps.get(conversation_id)
        if bump is None:
            bumps[conversation_id] = {
                "conversation_id": conversation_id,
                "message_id": message_id,
                "at": m.at,
                "preview": preview,
                "inbound": inbound,
            }
        else:
            if m.at >= bump["at"]:
                bump["message_id"], bump["at"], bump["preview"] = message_id, m.at, preview
            bump["inbound"] += inbound
        if inbound:
            notify.append(
                {
                    "company_id": m.company.id,
                    "conversation_id": conversation_id,
                    "message_id": message_id,
                    "title": m.title,
                    "body": preview or "",
                }
            )
    return [bumps[i] for i in sorted(bumps)], notify


def replies_due(
    messages: Iterable[Message],
    unique: Mapping[MessageKey, Message],
    inserted: Mapping[MessageKey, int],
    conversations: Mapping[ContactKey, int],
    created: AbstractSet[int],
) -> tuple[list[DueReply], dict[int, Message]]:
    """Auto-replies (WhatsApp, companies that set one): a welcome for a conversation created in
    this transaction, an away message outside business hours, each once per (conversation, kind,
    window) here, and once ever by the table's key. Also the conversations of redelivered
    inbound messages (by one of them), whose replies still pending are to be sent again."""
    due: dict[tuple[int, str, str], DueReply] = {}
    redelivered: dict[int, Message] = {}
    for m in messages:
        company = m.company
        if m.direction != "inbound" or m.contact[2] != "whatsapp":
            continue
        if not (company.welcome_message or company.away_message):
            continue
        conversation_id = conversations[m.contact]
        key = (company.id, m.external_id)
        if key in inserted and unique[key] is m:
            at = datetime.fromtimestamp(m.at, tz=UTC)
            new = conversation_id in created
            for kind, window, text in auto_replies_due(company, at, new_conversation=new):
                reply = DueReply(m, conversation_id, kind, window, text)
                due.setdefault((conversation_id, kind, window), reply)
        else:
            redelivered.setdefault(conversation_id, m)
    return list(due.values()), redelivered


def status_rows(statuses: Iterable[Status], conversations: Mapping[ContactKey, int]) -> list[StatusRow]:
    """One row per message: its highest-ranked status of the batch (a status never moves a
    message down, so that is where the statuses one by one would leave it). A message first
    known by its statuses is sent at the time of the first of them to arrive."""
    best: dict[MessageKey, Status] = {}
    first_at: dict[MessageKey, float] = {}
    for s in statuses:
        key = (s.company_id, s.external_id)
        held = best.get(key)
        if held is None:
            first_at[key] = s.at
        if held is None or s.rank > held.rank:
            best[key] = s
    return [
        {
            "company_id": s.company_id,
            "conversation_id": conversations[s.contact],
            "external_id": s.external_id,
            "status": s.state,
            "rank": s.rank,
            "at": s.at,
            "error": s.error,
            "sent_at": first_at[k],
        }
        for k, s in sorted(best.items())
    ]


def delivered_rows(delivered: Iterable[Delivered]) -> list[DeliveredRow]:
    """One row per message a delivery receipt names, at the time of the first to name it (a
    later one finds it delivered already)."""
    first: dict[MessageKey, float] = {}
    for d in delivered:
        for external_id in d.external_ids:
            first.setdefault((d.company_id, external_id), d.at)
    return [{"company_id": k[0], "external_id": k[1], "at": at} for k, at in sorted(first.items())]


def read_rows(read: Iterable[ReadUpTo], conversations: Mapping[ContactKey, int]) -> list[ReadRow]:
    return [
        {"conversation_id": conversations[r.contact], "watermark": r.watermark, "at": r.at, "n": n}
        for n, r in enumerate(read)
    ]


def event_rows(events: Iterable[Event]) -> list[EventRow]:
    """Each kept event once, by company and key (the same key is the same payload)."""
    unique: dict[tuple[int, str], Event] = {}
    for e in events:
        unique.setdefault((e.company_id, e.key), e)
    return [
        {"company_id": e.company_id, "object": e.object, "field": e.field, "key": e.key, "payload": e.payload}
        for _, e in sorted(unique.items())
    ]
