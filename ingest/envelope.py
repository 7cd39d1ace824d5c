"""Split a validated Meta envelope into topic records, one per routable update.

A WhatsApp `messages` change is split per message and per status (each keeps the change's
metadata, its own contact and every other field of the value), so each record can be keyed by
the conversation it belongs to. Messenger / Instagram events are one record each. Any other
change is one record, keyed by tenant and field, and kept as it is.

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


def _whatsapp_parts(value: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (contact id, value holding one message or one status) for a `messages` change."""
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
    # Only a contact whose wa_id is a plain value can be matched to its message's sender; any other
    # shape is kept, with the other contacts, on every message of the change.
    by_wa_id = {
        str(c["wa_id"]): c for c in contacts if isinstance(c, dict) and isinstance(c.get("wa_id"), str | int)
    }
    for message in messages:
        sender = str(message.get("from", "")) if isinstance(message, dict) else ""
        part = dict(rest)
        contact = by_wa_id.get(sender)
        if contact is not None:
            part["contacts"] = [contact]
        elif contacts:
            part["contacts"] = contacts
        part["messages"] = [message]
        yield sender, part
    for status in statuses:
        recipient = str(status.get("recipient_id", "")) if isinstance(status, dict) else ""
        part = dict(rest)
        part["statuses"] = [status]
        yield recipient, part


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
            if obj == WHATSAPP_OBJECT and field == "messages":
                metadata = value.get("metadata")
                phone_id = str(metadata.get("phone_number_id", "")) if isinstance(metadata, dict) else ""
                parts = [(f"{phone_id}:{contact}", part) for contact, part in _whatsapp_parts(value)]
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
