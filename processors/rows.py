"""Webhook records into row sets: the worker's rules for what a record means, with no database.

`to_rows` turns a batch of `meta.webhooks` records into the rows they stand for (contacts,
messages, reactions, edits and revokes, identity changes, delivery statuses, Messenger receipts,
kept events) and sets aside, record by record,
those that can never be stored (`PoisonRecord`): a record is all in or all out. What needs the
database's answer (which messages are new, which conversations were just created, their ids) is
decided by the functions below it, also pure, given those answers: conversation bumps,
notifications, auto-replies due, status rows. `processors.writer.RowWriter` runs the statements.

Every rule lives here once: status ranks, message bodies and previews per type, who a record is
about (a WhatsApp user by business-scoped user id and/or phone number), what is a message and
what amends one, what is poison.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypedDict

import orjson

from processors.autoreply import Company, auto_replies_due
from schemas.media import MESSAGING_MEDIA_KINDS, WHATSAPP_MEDIA_KINDS, MediaSource, sha256_hex
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

# company_id, channel, and "u:<BSUID>" or "p:<phone or page-scoped id>": a batch's name for one
# party (two names may turn out one contact: the database resolves them, see Party).
ContactKey = tuple[int, str, str]
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


def _media_label(kind: str, part: dict[str, Any]) -> str:
    label = part.get("caption") or part.get("filename")
    return str(label) if label else f"[{kind}]"


def _interactive_label(part: dict[str, Any]) -> str:
    for reply in ("button_reply", "list_reply", "nfm_reply"):
        chosen = part.get(reply)
        if isinstance(chosen, dict):
            return str(chosen.get("title") or chosen.get("body") or chosen.get("id", ""))
    return "[interactive]"


def _location_label(part: dict[str, Any]) -> str:
    named = ", ".join(str(part[k]) for k in ("name", "address") if part.get(k))
    return named or f"{part.get('latitude')},{part.get('longitude')}"


def _contacts_label(message: dict[str, Any], part: dict[str, Any]) -> str:
    cards = message.get("contacts") or []
    names = [str((c.get("name") or {}).get("formatted_name", "")) for c in cards]
    return "[contact] " + ", ".join(n for n in names if n)


def _unsupported_label(message: dict[str, Any], part: dict[str, Any]) -> str:
    # Meta says what it could not pass on (an edit on a number outside Coexistence, a poll...).
    what = part.get("type")
    return f"[unsupported: {what}]" if what else "[unsupported]"


# The text an agent sees, per type, from the type's part of the message (and the message).
_BODIES: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]] = {
    "text": lambda m, p: str(p.get("body", "")),
    "location": lambda m, p: _location_label(p),
    "contacts": _contacts_label,
    "interactive": lambda m, p: _interactive_label(p),
    "button": lambda m, p: str(p.get("text") or p.get("payload", "")),
    "order": lambda m, p: str(p.get("text") or f"[order] {len(p.get('product_items') or [])} item(s)"),
    "system": lambda m, p: str(p.get("body", "[system]")),
    "unsupported": _unsupported_label,
}
_MEDIA = frozenset(("image", "video", "document", "audio", "sticker"))


def whatsapp_body(message: dict[str, Any]) -> str:
    """The text an agent sees for a WhatsApp message of any type (an edit's new message too)."""
    kind = message.get("type", "unknown")
    part = message.get(kind)
    part = part if isinstance(part, dict) else {}
    if kind in _MEDIA:
        return _media_label(kind, part)
    body = _BODIES.get(kind)
    return body(message, part) if body is not None else f"[{kind}]"


def event_key(obj: str, entry_id: str, field: str, payload: Any) -> str:
    """The key a kept event is unique by: the same payload redelivered hashes the same."""
    return hashlib.sha256(
        orjson.dumps([obj, entry_id, field, payload], option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def _text(value: Any) -> str | None:
    """A field that names something: a non-empty string or number as text, else None (Meta
    leaves a phone number out when the user does not share it; an early draft sent "")."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    out = str(value)
    return out or None


class Party(NamedTuple):
    """Who a record is about. A WhatsApp user by business-scoped user id (BSUID) and/or phone
    number (wa_id), with a username and a parent BSUID where Meta gives them; a Messenger or
    Instagram user by page-scoped id (in `phone`, as contacts have always kept it). The database
    finds the contact (`contact_for`, migration 0014): by BSUID where one is given, else by phone.
    A NamedTuple: one is made per record."""

    company_id: int
    channel: str
    phone: str | None
    user_id: str | None
    username: str | None = None
    parent_user_id: str | None = None
    name: str | None = None

    @property
    def key(self) -> ContactKey:
        if self.user_id is not None:
            return (self.company_id, self.channel, "u:" + self.user_id)
        return (self.company_id, self.channel, "p:" + (self.phone or ""))


def _contact_cards(value: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in value.get("contacts") or () if isinstance(c, dict)]


def _card_for(cards: list[dict[str, Any]], user_id: str | None, phone: str | None) -> dict[str, Any]:
    """The change's contact for a sender or recipient: by BSUID, else by wa_id."""
    for card in cards:
        if user_id is not None and _text(card.get("user_id")) == user_id:
            return card
    for card in cards:
        if phone is not None and _text(card.get("wa_id")) == phone:
            return card
    return {}


def whatsapp_party(
    company_id: int, cards: list[dict[str, Any]], phone: Any, user_id: Any, parent: Any
) -> Party:
    """A WhatsApp party from a message's or status's own fields, completed by its contact card
    (the card's profile name is the name; a name or username that is not a string is left out).
    Poison if it names neither a phone nor a BSUID."""
    phone_, user_id_ = _text(phone), _text(user_id)
    card = _card_for(cards, user_id_, phone_)
    phone_ = phone_ or _text(card.get("wa_id"))
    user_id_ = user_id_ or _text(card.get("user_id"))
    if phone_ is None and user_id_ is None:
        raise PoisonRecord("update names no contact")
    profile = card.get("profile")
    profile = profile if isinstance(profile, dict) else {}
    name, username = profile.get("name"), profile.get("username")
    return Party(
        company_id,
        "whatsapp",
        phone_,
        user_id_,
        username if isinstance(username, str) and username else None,
        _text(parent) or _text(card.get("parent_user_id")),
        name if isinstance(name, str) else None,
    )


class MediaPart(NamedTuple):
    """A file a message carries, to be fetched by the media agent: a WhatsApp media id, or a
    Messenger / Instagram attachment's URL (one message may carry several: `position`)."""

    position: int
    source: MediaSource
    ref: str
    kind: str  # image, audio, voice, video, document, sticker (WhatsApp); image, audio, video, file
    mime_type: str | None = None
    sha256: str | None = None  # hex
    file_name: str | None = None
    caption: str | None = None


def whatsapp_media(message: dict[str, Any]) -> tuple[MediaPart, ...]:
    """The media of a WhatsApp message: its type's part names a media id (`image.id`, ...)."""
    kind = message.get("type")
    part = message.get(kind) if isinstance(kind, str) and kind in WHATSAPP_MEDIA_KINDS else None
    if not isinstance(part, dict):
        return ()
    ref = _text(part.get("id"))
    if ref is None:
        return ()
    assert isinstance(kind, str)
    return (
        MediaPart(
            0,
            "whatsapp",
            ref,
            "voice" if kind == "audio" and part.get("voice") is True else kind,
            _text(part.get("mime_type")),
            sha256_hex(part.get("sha256")),
            _text(part.get("filename")),
            _text(part.get("caption")),
        ),
    )


def messaging_media(source: MediaSource, message: dict[str, Any]) -> tuple[MediaPart, ...]:
    """The downloadable attachments of a Messenger / Instagram message (each has a URL of its
    own); templates, shares, stickers by id and the like are not files."""
    out: list[MediaPart] = []
    for position, attachment in enumerate(message.get("attachments") or ()):
        if not isinstance(attachment, dict) or attachment.get("type") not in MESSAGING_MEDIA_KINDS:
            continue
        payload = attachment.get("payload")
        url = _text(payload.get("url")) if isinstance(payload, dict) else None
        if url is None or not url.startswith(("https://", "http://")):
            continue
        title = _text(payload.get("title")) if isinstance(payload, dict) else None
        out.append(MediaPart(position, source, url, str(attachment["type"]), file_name=title))
    return tuple(out)


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
    party: Party
    external_id: str
    direction: str
    kind: str
    body: str
    content: dict[str, Any]
    at: float  # epoch seconds
    title: str  # of its notifications
    reply_to: str | None = None  # the external id of the message it quotes
    forwarded: bool = False
    referral: dict[str, Any] | None = None  # a click-to-WhatsApp ad's
    error: Any = None  # what Meta says it could not deliver of it
    media: tuple[MediaPart, ...] = ()  # what the media agent fetches (inbound messages only)

    @property
    def contact(self) -> ContactKey:
        return self.party.key


@dataclass(slots=True)
class Status:
    """A WhatsApp status of a message the business sent (ranked: see STATUS_RANK)."""

    company_id: int
    party: Party
    external_id: str
    state: str
    rank: int
    at: float
    error: Any

    @property
    def contact(self) -> ContactKey:
        return self.party.key


class Reaction(NamedTuple):
    """A party's reaction to a message (`target`, by external id); `emoji` None removes it."""

    company_id: int
    party: Party
    external_id: str  # the reaction's own id: the latest of a party's reactions wins
    target: str
    emoji: str | None
    at: float


class Amendment(NamedTuple):
    """An edit (a new body for `target`) or a revoke (its sender deleted it)."""

    company_id: int
    party: Party
    external_id: str
    target: str
    kind: str  # "edit" | "revoke"
    body: str | None
    content: dict[str, Any]
    at: float


class IdChange(NamedTuple):
    """A user's BSUID (or, before BSUIDs, phone number) changed: the new one names the contact
    the old one did (a user_id_update change, or a system message)."""

    company_id: int
    old_user_id: str | None
    new_user_id: str | None
    old_phone: str | None
    new_phone: str | None
    parent_user_id: str | None


class Delivered(NamedTuple):
    """A Messenger / Instagram delivery receipt: the business's messages `external_ids`."""

    company_id: int
    external_ids: list[str]
    at: float


class ReadUpTo(NamedTuple):
    """A Messenger / Instagram read receipt: what the business sent up to `watermark` is read."""

    party: Party
    watermark: float
    at: float

    @property
    def contact(self) -> ContactKey:
        return self.party.key


class Event(NamedTuple):
    """A change kept as it came (`webhook_events`): unknown fields, unranked statuses,
    errors-only changes, identity changes, Messenger events other than messages and receipts."""

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
    reactions: list[Reaction] = field(default_factory=list)
    amendments: list[Amendment] = field(default_factory=list)
    id_changes: list[IdChange] = field(default_factory=list)
    poison: list[tuple[int, PoisonRecord]] = field(default_factory=list)

    def _lists(self) -> tuple[list[Any], ...]:
        return (
            self.messages,
            self.statuses,
            self.delivered,
            self.read,
            self.events,
            self.reactions,
            self.amendments,
            self.id_changes,
        )

    @property
    def receipts(self) -> int:
        """Statuses and receipts counted (`BatchStats.statuses`), applied or not."""
        return len(self.statuses) + len(self.delivered) + len(self.read)

    def contacts(self) -> dict[ContactKey, Party]:
        """Every party the rows name, once per key, with the latest of each value given, by the
        time of what gave it (a name or a username can change; a value left out leaves the one
        known)."""
        parties: dict[ContactKey, Party] = {}
        named: list[Message | Status | ReadUpTo | Reaction | Amendment] = [
            *self.messages,
            *self.statuses,
            *self.read,
            *self.reactions,
            *self.amendments,
        ]
        named.sort(key=_at)  # stable: rows of one time keep the order of their kind
        for row in named:
            party = row.party
            key = party.key
            held = parties.get(key)
            if held is None:
                parties[key] = party
            elif held != party:
                parties[key] = Party(
                    party.company_id,
                    party.channel,
                    party.phone or held.phone,
                    party.user_id or held.user_id,
                    party.username or held.username,
                    party.parent_user_id or held.parent_user_id,
                    party.name if party.name is not None else held.name,
                )
        return parties

    def unique_messages(self) -> dict[MessageKey, Message]:
        """Each message once (its first copy in the batch), by company and external id."""
        unique: dict[MessageKey, Message] = {}
        for m in self.messages:
            unique.setdefault((m.company.id, m.external_id), m)
        return unique


def _at(row: Message | Status | ReadUpTo | Reaction | Amendment) -> float:
    return row.at


def to_rows(records: Sequence[WebhookRecord], companies: Mapping[str, Company]) -> RowSet:
    """The rows of `records`; `companies` by slug (a tenant not in it is unknown: poison)."""
    rows = RowSet()
    lists = rows._lists()
    for index, record in enumerate(records):
        marks = [len(rows_of_kind) for rows_of_kind in lists]
        try:
            company = companies.get(record.tenant)
            if company is None:
                raise PoisonRecord(f"unknown tenant {record.tenant!r}")
            obj, payload = record.object, record.payload
            try:
                if record.kind == "change" and obj == WHATSAPP_OBJECT and record.field == "messages":
                    _whatsapp(rows, company, payload)
                elif record.kind == "change" and obj == WHATSAPP_OBJECT and record.field == "user_id_update":
                    _user_id_update(rows, company, payload, record.entry_id)
                elif record.kind == "messaging":
                    _messaging(rows, company, record)
                else:
                    rows.events.append(_event(company.id, obj, record.field, payload, record.entry_id))
            except _SHAPE_ERRORS as exc:
                raise PoisonRecord(f"unexpected payload shape: {exc!r}") from exc
        except PoisonRecord as exc:
            # All or nothing: what the record added before its fault goes too.
            for rows_of_kind, mark in zip(lists, marks, strict=True):
                del rows_of_kind[mark:]
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
    cards = _contact_cards(value)
    for message in raw_messages:
        if not isinstance(message, dict) or not message.get("id"):
            raise PoisonRecord("WhatsApp message without an id")
        party = whatsapp_party(
            company.id,
            cards,
            message.get("from"),
            message.get("from_user_id"),
            message.get("from_parent_user_id"),
        )
        _whatsapp_message(rows, company, party, message)
    for status in raw_statuses:
        if not isinstance(status, dict) or not status.get("id"):
            raise PoisonRecord("WhatsApp status without an id")
        state = str(status.get("status", ""))
        rank = STATUS_RANK.get(state)
        if rank is None:
            # A status we do not rank (e.g. "deleted"): kept as an event, message untouched.
            rows.events.append(_event(company.id, WHATSAPP_OBJECT, "statuses", status))
            continue
        parent = (
            status.get("recipient_parent_user_id")
            or status.get("parent_recipient_user_id")
            or status.get("parent_user_id")
        )
        party = whatsapp_party(
            company.id, cards, status.get("recipient_id"), status.get("recipient_user_id"), parent
        )
        rows.statuses.append(
            Status(
                company.id,
                party,
                str(status["id"]),
                state,
                rank,
                epoch(status.get("timestamp")),
                status.get("errors") or None,
            )
        )


def _target(part: Any, what: str) -> str:
    target = _text(part.get(what)) if isinstance(part, dict) else None
    if target is None:
        raise PoisonRecord(f"names no message ({what})")
    return target


def _whatsapp_message(rows: RowSet, company: Company, party: Party, message: dict[str, Any]) -> None:
    external_id = str(message["id"])
    kind = str(message.get("type", "unknown"))
    at = epoch(message.get("timestamp"))
    if kind == "reaction":
        part = message.get("reaction")
        emoji = part.get("emoji") if isinstance(part, dict) else None
        emoji = emoji if isinstance(emoji, str) and emoji else None  # left out (or ""): removed
        target = _target(part, "message_id")
        rows.reactions.append(Reaction(company.id, party, external_id, target, emoji, at))
        return
    if kind in ("edit", "revoke"):
        part = message.get(kind)
        target = _target(part, "original_message_id")
        body = None
        if kind == "edit":
            new = part.get("message") if isinstance(part, dict) else None
            body = whatsapp_body(new) if isinstance(new, dict) else None
        rows.amendments.append(Amendment(company.id, party, external_id, target, kind, body, message, at))
        return
    if kind == "system":
        party = _system(rows, company, party, message)
    context = message.get("context")
    context = context if isinstance(context, dict) else {}
    forwarded = bool(context.get("forwarded") or context.get("frequently_forwarded"))
    referral = message.get("referral")
    name = party.name or party.username or party.phone or party.user_id
    rows.messages.append(
        Message(
            company,
            party,
            external_id,
            "inbound",
            kind,
            whatsapp_body(message),
            message,
            at,
            f"New message from {name}",
            reply_to=None if forwarded else _text(context.get("id")),
            forwarded=forwarded,
            referral=referral if isinstance(referral, dict) else None,
            error=message.get("errors") or None,
            media=whatsapp_media(message),
        )
    )


# customer_changed_number is the older name of user_changed_number.
_ID_CHANGES = frozenset(("user_changed_number", "customer_changed_number", "user_changed_user_id"))


def _system(rows: RowSet, company: Company, party: Party, message: dict[str, Any]) -> Party:
    """A system message that says the user's number or BSUID changed links the old to the new,
    and is kept as a message too (WhatsApp shows it in the chat), filed under the user's new
    ids: the old ones name no contact once the change is applied."""
    part = message.get("system")
    if not isinstance(part, dict) or part.get("type") not in _ID_CHANGES:
        return party
    new_user_id = _text(part.get("user_id"))
    old_user_id = _text(part.get("previous_user_id")) or (
        party.user_id if new_user_id != party.user_id else None
    )
    new_phone = _text(part.get("wa_id")) or _text(part.get("new_wa_id"))
    if new_user_id is None and new_phone is None:
        return party
    old_phone = party.phone if new_phone is not None and new_phone != party.phone else None
    if old_user_id == new_user_id:
        old_user_id = None
    if old_user_id is None and old_phone is None:
        return party
    parent = _text(part.get("parent_user_id"))
    rows.id_changes.append(IdChange(company.id, old_user_id, new_user_id, old_phone, new_phone, parent))
    return party._replace(
        phone=new_phone or party.phone,
        user_id=new_user_id or party.user_id,
        parent_user_id=parent or party.parent_user_id,
    )


def _user_id_update(rows: RowSet, company: Company, value: dict[str, Any], entry_id: str) -> None:
    """A `user_id_update` change: each update links `user_id.previous` to `user_id.current`. The
    change is kept as an event too, as it came."""
    for update in value.get("user_id_update") or ():
        ids = update.get("user_id") if isinstance(update, dict) else None
        if not isinstance(ids, dict):
            raise PoisonRecord("user_id_update without user_id")
        old, new = _text(ids.get("previous")), _text(ids.get("current"))
        if old is None or new is None:
            raise PoisonRecord("user_id_update without both ids")
        parents = update.get("parent_user_id")
        parent = _text(parents.get("current")) if isinstance(parents, dict) else None
        rows.id_changes.append(IdChange(company.id, old, new, None, _text(update.get("wa_id")), parent))
    rows.events.append(_event(company.id, WHATSAPP_OBJECT, "user_id_update", value, entry_id))


def _messaging(rows: RowSet, company: Company, record: WebhookRecord) -> None:
    event = record.payload
    channel = "instagram" if record.object == "instagram" else "messenger"
    sender = str((event.get("sender") or {}).get("id", ""))
    if sender == record.entry_id:
        # The page's own (an echo): the user is the recipient, never the page.
        sender = str((event.get("recipient") or {}).get("id", ""))
    raw = event.get("message")
    if isinstance(raw, dict) and raw.get("is_deleted") and raw.get("mid"):
        # Instagram: a message unsent.
        if not sender:
            raise PoisonRecord("update names no contact")
        party = Party(company.id, channel, sender, None)
        mid = str(raw["mid"])
        at = epoch(event.get("timestamp"))
        rows.amendments.append(Amendment(company.id, party, f"{mid}:revoke", mid, "revoke", None, event, at))
        return
    message = messaging_message(record)
    if message is not None:
        if not message.user:
            raise PoisonRecord("update names no contact")
        reply = raw.get("reply_to") if isinstance(raw, dict) else None
        rows.messages.append(
            Message(
                company,
                Party(company.id, channel, message.user, None),
                message.external_id,
                message.direction,
                message.kind,
                message.body,
                event,
                epoch(event.get("timestamp")),
                f"New message from {message.user}",
                reply_to=_text(reply.get("mid")) if isinstance(reply, dict) else None,
                media=messaging_media("instagram" if channel == "instagram" else "messenger", raw)
                if message.direction == "inbound" and isinstance(raw, dict)
                else (),
            )
        )
        return
    if _messaging_amendment(rows, company, channel, sender, event):
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
        party = Party(company.id, channel, sender, None)
        rows.read.append(ReadUpTo(party, epoch(read["watermark"]), epoch(event.get("timestamp"))))
        return
    rows.events.append(_event(company.id, record.object, record.field, event, record.entry_id))


def _messaging_amendment(
    rows: RowSet, company: Company, channel: str, sender: str, event: dict[str, Any]
) -> bool:
    """A Messenger / Instagram reaction (`reaction`, react or unreact) or edit (`message_edit`)."""
    reaction, edit = event.get("reaction"), event.get("message_edit")
    if not isinstance(reaction, dict) and not isinstance(edit, dict):
        return False
    if not sender:
        raise PoisonRecord("update names no contact")
    party = Party(company.id, channel, sender, None)
    at = epoch(event.get("timestamp"))
    if isinstance(reaction, dict):
        target = _target(reaction, "mid")
        emoji = reaction.get("emoji") or reaction.get("reaction")
        if reaction.get("action") == "unreact" or not isinstance(emoji, str) or not emoji:
            emoji = None
        # Messenger gives a reaction no id of its own: its time orders a party's reactions.
        rows.reactions.append(Reaction(company.id, party, f"{target}:{at}", target, emoji, at))
        return True
    assert isinstance(edit, dict)
    target = _target(edit, "mid")
    text = edit.get("text")
    external_id = f"{target}:edit:{edit.get('num_edit', at)}"
    body = str(text) if text is not None else None
    rows.amendments.append(Amendment(company.id, party, external_id, target, "edit", body, event, at))
    return True


# ------------------------------------------------------- rows given the database's answers
#
# TypedDicts: each statement takes its rows as one JSON array of objects (`json_to_recordset`),
# and orjson encodes a dict several times faster than a dataclass. Their keys are the columns
# the statements in processors/writer.py declare. Timestamps are epoch seconds.


class ContactRow(TypedDict):
    company_id: int
    channel: str
    phone: str | None
    user_id: str | None
    username: str | None
    parent_user_id: str | None
    name: str | None
    n: int  # its place in the lock order: the answer comes back by it


class IdChangeRow(TypedDict):
    company_id: int
    channel: str
    old_user_id: str | None
    new_user_id: str | None
    old_phone: str | None
    new_phone: str | None
    parent_user_id: str | None


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
    reply_to: str | None
    forwarded: bool
    referral: dict[str, Any] | None
    error: Any


class BumpRow(TypedDict):
    conversation_id: int
    message_id: int
    at: float
    preview: str | None
    inbound: int
    referral: dict[str, Any] | None  # of its earliest new message that has one


class ReactionRow(TypedDict):
    company_id: int
    contact_id: int
    external_id: str
    target: str
    emoji: str | None
    at: float


class AmendmentRow(TypedDict):
    company_id: int
    external_id: str
    target: str
    kind: str
    body: str | None
    content: dict[str, Any]
    at: float


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
    to: str  # the contact's phone number: WUZAPI sends to numbers only


def contact_rows(parties: Mapping[ContactKey, Party]) -> list[ContactRow]:
    """Sorted by key, so that concurrent workers lock contacts in one order; `n` is the place."""
    return [
        {
            "company_id": p.company_id,
            "channel": p.channel,
            "phone": p.phone,
            "user_id": p.user_id,
            "username": p.username,
            "parent_user_id": p.parent_user_id,
            "name": p.name,
            "n": n,
        }
        for n, p in enumerate(parties[k] for k in sorted(parties))
    ]


def id_change_rows(changes: Iterable[IdChange]) -> list[IdChangeRow]:
    """In record order: a user may change twice."""
    return [
        {
            "company_id": c.company_id,
            "channel": "whatsapp",
            "old_user_id": c.old_user_id,
            "new_user_id": c.new_user_id,
            "old_phone": c.old_phone,
            "new_phone": c.new_phone,
            "parent_user_id": c.parent_user_id,
        }
        for c in changes
    ]


def conversation_rows(
    keys: Iterable[ContactKey], contact_ids: Mapping[ContactKey, int]
) -> list[ConversationRow]:
    """One per contact (two keys of a batch can name one contact), sorted by contact id (the
    conversations' key), for one lock order."""
    by_contact = {(k[0], contact_ids[k]): k[1] for k in keys}
    return [
        {"company_id": company_id, "contact_id": contact_id, "channel": channel}
        for (company_id, contact_id), channel in sorted(by_contact.items())
    ]


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
            "reply_to": m.reply_to,
            "forwarded": m.forwarded,
            "referral": m.referral,
            "error": m.error,
        }
        for m in unique
    ]


class MediaRow(TypedDict):
    company_id: int
    message_external_id: str
    position: int
    source: str
    source_ref: str
    kind: str
    mime_type: str | None
    file_name: str | None
    caption: str | None
    expected_sha256: str | None


def media_rows(unique: Iterable[Message]) -> list[MediaRow]:
    """A pending media row per file the batch's messages carry (kept once: a redelivery finds
    its rows and fetches what is still pending)."""
    return [
        {
            "company_id": m.company.id,
            "message_external_id": m.external_id,
            "position": part.position,
            "source": part.source,
            "source_ref": part.ref,
            "kind": part.kind,
            "mime_type": part.mime_type,
            "file_name": part.file_name,
            "caption": part.caption,
            "expected_sha256": part.sha256,
        }
        for m in unique
        for part in m.media
    ]


def reaction_rows(reactions: Iterable[Reaction], contact_ids: Mapping[ContactKey, int]) -> list[ReactionRow]:
    """One row per (message, reacting contact): the latest of the batch (by time, then id), as
    the table keeps the latest of all."""
    latest: dict[tuple[int, str, int], Reaction] = {}
    for r in reactions:
        key = (r.company_id, r.target, contact_ids[r.party.key])
        held = latest.get(key)
        if held is None or (r.at, r.external_id) > (held.at, held.external_id):
            latest[key] = r
    return [
        {
            "company_id": k[0],
            "contact_id": k[2],
            "external_id": r.external_id,
            "target": r.target,
            "emoji": r.emoji,
            "at": r.at,
        }
        for k, r in sorted(latest.items())
    ]


def amendment_rows(amendments: Iterable[Amendment]) -> list[AmendmentRow]:
    """Each once, by company and its own id."""
    unique: dict[MessageKey, Amendment] = {}
    for a in amendments:
        unique.setdefault((a.company_id, a.external_id), a)
    return [
        {
            "company_id": a.company_id,
            "external_id": a.external_id,
            "target": a.target,
            "kind": a.kind,
            "body": a.body,
            "content": a.content,
            "at": a.at,
        }
        for _, a in sorted(unique.items())
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
                "referral": m.referral,
            }
        else:
            if m.at >= bump["at"]:
                bump["message_id"], bump["at"], bump["preview"] = message_id, m.at, preview
            bump["inbound"] += inbound
            if bump["referral"] is None:
                bump["referral"] = m.referral
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
    phones: Mapping[ContactKey, str | None],
) -> tuple[list[DueReply], dict[int, Message]]:
    """Auto-replies (WhatsApp, companies that set one): a welcome for a conversation created in
    this transaction, an away message outside business hours, each once per (conversation, kind,
    window) here, and once ever by the table's key. Also the conversations of redelivered
    inbound messages (by one of them), whose replies still pending are to be sent again. None
    for a contact with no known phone number (a username user): WUZAPI could not send it."""
    due: dict[tuple[int, str, str], DueReply] = {}
    redelivered: dict[int, Message] = {}
    for m in messages:
        company = m.company
        if m.direction != "inbound" or m.party.channel != "whatsapp" or m.kind == "system":
            continue  # a system message (a changed number) is WhatsApp's, not the customer's
        if not (company.welcome_message or company.away_message):
            continue
        to = phones.get(m.contact)
        if to is None:
            continue
        conversation_id = conversations[m.contact]
        key = (company.id, m.external_id)
        if key in inserted and unique[key] is m:
            at = datetime.fromtimestamp(m.at, tz=UTC)
            new = conversation_id in created
            for kind, window, text in auto_replies_due(company, at, new_conversation=new):
                reply = DueReply(m, conversation_id, kind, window, text, to)
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
