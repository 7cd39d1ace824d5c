"""Split a validated Meta envelope into topic records, one per routable update.

A WhatsApp `messages` change is split per message and per status (each keeps the change's
metadata, its own contact and every other field of the value), so each record can be keyed by
the user it is about: by business-scoped user id (BSUID) where Meta gives one, else by phone
number, so that one user's events keep their order with or without a phone. A `user_id_update`
is keyed by the user's new BSUID, the one their next messages carry. Messenger / Instagram
events are one record each. Any other change is one record, keyed by tenant and field, and kept
as it is.

Because each part copies the change's other fields, a small POST can make many large records; a
`Budget` bounds what one POST may produce (records, bytes in all, bytes in one record) and is
checked while the records are built, so a POST over it is refused before anything is kept or
much memory spent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from schemas.meta import WHATSAPP_OBJECT
from schemas.records import WebhookRecord

_SPLIT_KEYS = ("messages", "statuses", "contacts")


class OverBudget(Exception):
    """The POST would produce more than its budget allows; nothing of it was produced."""


@dataclass(frozen=True, slots=True)
class Budget:
    """What one POST may produce. The defaults hold Meta's largest batch (1,000 updates in 4 MiB)
    several times over; one record stays under the broker's default record size (1 MiB)."""

    max_records: int = 5000
    max_bytes: int = 16 * 1024 * 1024
    max_record_bytes: int = 1_000_000

    def check(self, records: int, total: int, record: int) -> None:
        if record > self.max_record_bytes:
            raise OverBudget(f"one update would be stored as {record} bytes; at most {self.max_record_bytes}")
        if records > self.max_records:
            raise OverBudget(f"the envelope makes more than {self.max_records} records")
        if total > self.max_bytes:
            raise OverBudget(f"the envelope would be stored as more than {self.max_bytes} bytes")


def _plain(value: Any) -> str:
    """An id as text, if it is a plain value (Meta leaves a phone out when it is not shared)."""
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""


def _ids(part: Any, user_id: str, phone: str) -> tuple[str, str]:
    """A message's or status's user: (BSUID, phone number), each "" where not given."""
    if not isinstance(part, dict):
        return "", ""
    return _plain(part.get(user_id)), _plain(part.get(phone))


def _whatsapp_parts(value: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (user, value holding one message or one status) for a `messages` change."""
    messages = value.get("messages")
    statuses = value.get("statuses")
    if not isinstance(messages, list):
        messages = []
    if not isinstance(statuses, list):
        statuses = []
    if not messages and not statuses:
        yield "", value
        return
    rest = {k: v for k, v in value.items() if k not in _SPLIT_KEYS}
    raw_contacts = value.get("contacts")
    contacts: list[Any] = raw_contacts if isinstance(raw_contacts, list) else []
    # Only a contact whose user_id or wa_id is a plain value can be matched to its message's
    # sender; any other shape is kept, with the other contacts, on every message of the change.
    by_id: dict[str, Any] = {}
    for c in contacts:
        if isinstance(c, dict):
            for id_ in (_plain(c.get("wa_id")), _plain(c.get("user_id"))):
                if id_:
                    by_id[id_] = c
    for message in messages:
        user_id, phone = _ids(message, "from_user_id", "from")
        system = message.get("system") if isinstance(message, dict) else None
        if isinstance(system, dict) and _plain(system.get("user_id")):
            # A changed number or BSUID: filed under the new id, where the user's messages go next.
            user_id = _plain(system.get("user_id"))
        part = dict(rest)
        contact = by_id.get(user_id) or by_id.get(phone)
        if contact is not None:
            part["contacts"] = [contact]
            user_id = user_id or _plain(contact.get("user_id"))  # the worker completes it so too
        elif contacts:
            part["contacts"] = contacts
        part["messages"] = [message]
        yield user_id or phone, part
    for status in statuses:
        # A status's contact card (delivered and read ones carry the username) goes with it.
        user_id, phone = _ids(status, "recipient_user_id", "recipient_id")
        part = dict(rest)
        contact = by_id.get(user_id) or by_id.get(phone)
        if contact is not None:
            part["contacts"] = [contact]
            user_id = user_id or _plain(contact.get("user_id"))
        part["statuses"] = [status]
        yield user_id or phone, part


def _user_id_update_key(value: dict[str, Any]) -> str:
    """The new BSUID of a `user_id_update`'s first update (where its user's messages go next)."""
    updates = value.get("user_id_update")
    first = updates[0] if isinstance(updates, list) and updates else None
    ids = first.get("user_id") if isinstance(first, dict) else None
    return _plain(ids.get("current")) if isinstance(ids, dict) else ""


def _messaging_party(event: dict[str, Any], page_id: str) -> str:
    """The user's id in a Messenger / Instagram event: whoever is not the page."""
    sender = event.get("sender")
    recipient = event.get("recipient")
    sender_id = str(sender.get("id", "")) if isinstance(sender, dict) else ""
    recipient_id = str(recipient.get("id", "")) if isinstance(recipient, dict) else ""
    return recipient_id if sender_id == page_id else sender_id


def split_envelope(
    doc: dict[str, Any], *, tenant: str, request_id: str, received_at_ms: int, budget: Budget = Budget()
) -> list[tuple[bytes, bytes]]:
    """Return (key, value) pairs for every update of the envelope, in the order Meta sent them.

    Raises OverBudget as soon as the records built so far exceed `budget`."""
    obj = str(doc["object"])
    out: list[tuple[bytes, bytes]] = []
    seq = 0
    total = 0

    def add(key: str, value: bytes) -> None:
        nonlocal total
        total += len(value)
        budget.check(len(out) + 1, total, len(value))
        out.append((key.encode(), value))

    for entry in doc["entry"]:
        entry_id = str(entry["id"])
        entry_time = entry.get("time") if isinstance(entry.get("time"), int) else None
        for change in entry.get("changes") or ():
            field = change["field"]
            value = change["value"]
            if obj == WHATSAPP_OBJECT and field in ("messages", "user_id_update"):
                metadata = value.get("metadata")
                phone_id = str(metadata.get("phone_number_id", "")) if isinstance(metadata, dict) else ""
                if field == "messages":
                    parts = [(f"{phone_id}:{user}", part) for user, part in _whatsapp_parts(value)]
                else:
                    parts = [(f"{phone_id}:{_user_id_update_key(value)}", value)]
            else:
                parts = [(f"{entry_id}:{field}", value)]
            for conversation, payload in parts:
                record = WebhookRecord(
                    tenant=tenant,
                    object=obj,
                    entry_id=entry_id,
                    entry_time=entry_time,
                    kind="change",
                    field=field,
                    payload=payload,
                    request_id=request_id,
                    received_at_ms=received_at_ms,
                    seq=seq,
                )
                add(f"{tenant}:{conversation}", record.to_bytes())
                seq += 1
        for event in entry.get("messaging") or ():
            party = _messaging_party(event, entry_id)
            record = WebhookRecord(
                tenant=tenant,
                object=obj,
                entry_id=entry_id,
                entry_time=entry_time,
                kind="messaging",
                field="messaging",
                payload=event,
                request_id=request_id,
                received_at_ms=received_at_ms,
                seq=seq,
            )
            add(f"{tenant}:{entry_id}:{party}", record.to_bytes())
            seq += 1
    return out
