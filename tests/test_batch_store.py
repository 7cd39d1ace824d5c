"""The worker's writer (processors/writer.py, over processors/rows.py) against real Postgres.

A realistic seeded stream (`harness.meta_samples.build_plan`: every WhatsApp message type, statuses
out of order, Messenger and Instagram, other fields, redelivered envelopes) plus what it lacks
(Messenger echoes with delivery and read receipts, an unranked status, an errors-only change, a
status naming an inbound message, a profile name that is not a string) is written in random
batches, and the rows are checked against what the stream stands for, worked out here from the
stream itself. Redelivered shuffled, in other batches, it changes nothing; written shuffled from
the start it leaves the same messages, contacts and counts. A batch the database refuses is
split until the records it refuses alone are found: those are dead-lettered, the rest written as
if they had come alone, in a number of applies that grows with the log of the batch.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any, NamedTuple

import asyncpg
import orjson
import pytest

from harness.meta_samples import (
    SimulationPlan,
    build_plan,
    messenger_envelope,
    wa_change,
    wa_envelope,
    wa_message,
    wa_status,
)
from infra.kafka.topics import META_WEBHOOKS
from infra.postgres.tenants import Tenant, upsert_tenant
from ingest.envelope import split_envelope
from processors import webhooks
from processors.autoreply import CompanyCache
from processors.rows import to_rows
from processors.webhooks import RawRecord, WebhookWriter, create_writer_pool
from processors.writer import RowWriter, load_companies
from schemas.deadletter import DeadLetter
from schemas.outbound import OutboundMessage
from schemas.previews import PREVIEW_MAX
from schemas.records import WebhookRecord
from tests.support import ServiceUrls

PAGE = "112233445566"
START = 1_700_000_000  # Tuesday 2023-11-14 22:13:20 UTC

# Rows as an agent sees them: no ids, no write times; auto-reply ids are random, so by their text.
SNAPSHOT: dict[str, str] = {
    "contacts": """
        SELECT phone_number, channel, name FROM contacts WHERE company_id = $1 AND deleted_at IS NULL
         ORDER BY 1, 2""",
    "conversations": """
        SELECT ct.phone_number, c.channel, c.status, c.unread_count, c.last_message_at,
               c.last_message_preview,
               CASE WHEN lm.content ? 'auto_reply' THEN lm.body ELSE lm.external_id END AS last_message
          FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
          LEFT JOIN messages lm ON lm.id = c.last_message_id
         WHERE c.company_id = $1 AND c.deleted_at IS NULL ORDER BY 1, 2""",
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


async def _company(db: asyncpg.Connection, prefix: str) -> Tenant:
    slug = f"{prefix}-{secrets.token_hex(4)}"
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
    await db.execute(
        "INSERT INTO users (company_id, email, name, is_active) VALUES ($1, $2, 'gone', false)",
        tenant.id,
        f"gone@{slug}.test",
    )
    return tenant


def _open(at: float) -> bool:
    local = datetime.fromtimestamp(at, tz=UTC)
    return local.weekday() == 1 and "22:00" <= local.strftime("%H:%M") < "22:35"


def _stream() -> tuple[SimulationPlan, list[dict[str, Any]], str]:
    """The plan's envelopes and what it lacks; and the Messenger user the receipts are about."""
    plan = build_plan(
        seed=7,
        contacts=12,
        messages_per_contact=6,
        phone_number_id="106540352242922",
        display_phone_number="15550783881",
        waba_id="102290129340398",
        page_id=PAGE,
        start_ts=START,
    )
    envelopes = list(plan.webhooks)
    page_user = next(
        k.contact for k in plan.expected.values() if k.channel == "messenger" and k.direction == "inbound"
    )
    # The page's own messages (echoes), then receipts: delivered e0, e1; read up to e1; delivered
    # e1 (again), e2, e3; read up to e2. Each message keeps the first receipt that moved it.
    echoes = [
        {
            "sender": {"id": PAGE},
            "recipient": {"id": page_user},
            "timestamp": (START + 100 + i) * 1000,
            "message": {"mid": f"m_echo{i}", "is_echo": True, "text": f"echo {i}"},
        }
        for i in range(4)
    ]
    envelopes.append(messenger_envelope(echoes, page_id=PAGE))

    def receipt(at: int, **event: Any) -> dict[str, Any]:
        return {"sender": {"id": page_user}, "recipient": {"id": PAGE}, "timestamp": at * 1000, **event}

    receipts = [
        receipt(START + 5000, delivery={"mids": ["m_echo0", "m_echo1"], "watermark": (START + 5000) * 1000}),
        receipt(START + 5001, read={"watermark": (START + 101) * 1000}),
        receipt(START + 5002, delivery={"mids": ["m_echo1", "m_echo2", "m_echo3"]}),
        receipt(START + 5003, read={"watermark": (START + 102) * 1000}),
        # A delivery receipt for what the customer sent changes nothing.
        receipt(
            START + 5004,
            delivery={"mids": [next(k for k, e in plan.expected.items() if e.contact == page_user)]},
        ),
    ]
    envelopes.append(messenger_envelope(receipts, page_id=PAGE))
    deleted = {
        "id": "wamid.deleted",
        "status": "deleted",
        "timestamp": str(START + 500),
        "recipient_id": "4915774900009",
    }
    unseen = wa_status(
        "delivered", wamid="wamid.sent-before-us", recipient_id="4915774900009", timestamp=START + 600
    )
    # A profile "name" that is not a string: not a name; the message is stored all the same.
    odd_name = wa_change(
        phone_number_id="1",
        display_phone_number="2",
        messages=[wa_message("text", wamid="wamid.odd-name", from_="4915774900010", timestamp=START + 700)],
        contacts=[("4915774900010", "placeholder")],
    )
    odd_name["value"]["contacts"][0]["profile"]["name"] = 5
    inbound_id, inbound = next(
        (k, e) for k, e in plan.expected.items() if e.direction == "inbound" and e.channel == "whatsapp"
    )
    named_inbound = wa_status("read", wamid=inbound_id, recipient_id=inbound.contact, timestamp=START + 4000)
    envelopes.append(
        wa_envelope(
            [
                odd_name,
                wa_change(phone_number_id="1", display_phone_number="2", statuses=[deleted]),
                wa_change(phone_number_id="1", display_phone_number="2", statuses=[unseen, named_inbound]),
                {"field": "messages", "value": {"messaging_product": "whatsapp", "errors": [{"code": 1}]}},
            ],
            waba_id="3",
        )
    )
    return plan, envelopes, page_user


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


async def _write(db: asyncpg.Connection, batches: list[list[WebhookRecord]]) -> list[list[OutboundMessage]]:
    """Each batch in a transaction of its own, as the worker writes it; the replies it queued."""
    queued = []
    companies = CompanyCache()
    for batch in batches:
        async with db.transaction():
            writer = RowWriter(db)
            rows = to_rows(batch, await load_companies(db, companies, batch))
            assert rows.poison == []
            await writer.apply(rows)
        queued.append(writer.outbound)
    return queued


async def _snapshot(db: asyncpg.Connection, company_id: int) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(r.values()) for r in await db.fetch(q, company_id)] for name, q in SNAPSHOT.items()}


# Message types that are not messages of their own: each amends or reacts to another.
_NOT_MESSAGES = frozenset(("reaction", "edit", "revoke"))
_NUMBER_CHANGES = frozenset(("user_changed_number", "customer_changed_number", "user_changed_user_id"))


class _People:
    """Who is who in a stream, worked out from the stream itself: ids named together (a contact
    card's BSUID and number, a message's `from_user_id` and `from`, a status's recipient ids) are
    one user, and a number change (a system message) or a `user_id_update` joins the old ids to
    the new. A user's number is the last one a change gave, else the one it was seen with."""

    def __init__(self, records: list[WebhookRecord]) -> None:
        self.up: dict[str, str] = {}
        self.changed: set[str] = set()  # keys of users whose ids changed
        self.new_phone: dict[str, tuple[float, str]] = {}  # key -> (when, number) of a change
        for r in records:
            if r.kind == "change" and r.field == "messages":
                self._messages(r.payload)
            elif r.kind == "change" and r.field == "user_id_update":
                for update in r.payload.get("user_id_update") or ():
                    ids = update["user_id"]
                    self._join(f"u:{ids['previous']}", f"u:{ids['current']}", changed=True)
            elif r.kind == "messaging":
                channel = "instagram" if r.object == "instagram" else "messenger"
                self.key(channel, r.payload["sender"]["id"], None)

    def _messages(self, value: dict[str, Any]) -> None:
        for card in value.get("contacts") or ():
            self.key("whatsapp", card.get("wa_id"), card.get("user_id"))
        for m in value.get("messages") or ():
            key = self.key("whatsapp", m.get("from"), m.get("from_user_id"))
            system = m.get("system") or {}
            if m["type"] == "system" and system.get("type") in _NUMBER_CHANGES:
                new = self.key("whatsapp", system.get("wa_id"), system.get("user_id"))
                self._join(key, new, changed=True)
                if system.get("wa_id"):
                    self.new_phone[new] = max(
                        self.new_phone.get(new, (0.0, "")), (float(m["timestamp"]), system["wa_id"])
                    )
        for status in value.get("statuses") or ():
            if status.get("recipient_id") or status.get("recipient_user_id"):
                self.key("whatsapp", status.get("recipient_id"), status.get("recipient_user_id"))

    def key(self, channel: str, phone: Any, user_id: Any) -> str:
        """The person these ids name (their ids are joined)."""
        if channel != "whatsapp":
            return self.find(f"{channel}:{phone}")
        keys = [f"u:{user_id}"] * bool(user_id) + [f"p:{phone}"] * bool(phone)
        for k in keys[1:]:
            self._join(keys[0], k)
        return self.find(keys[0])

    def find(self, key: str) -> str:
        self.up.setdefault(key, key)
        while self.up[key] != key:
            key = self.up[key]
        return key

    def _join(self, a: str, b: str, *, changed: bool = False) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.up[rb] = ra
        if changed:
            self.changed.add(ra)

    def named(self, channel: str, contact: str) -> str:
        """The person an expected message's contact (a number, a BSUID or a page-scoped id) is."""
        if channel != "whatsapp":
            return self.find(f"{channel}:{contact}")
        return self.find(f"p:{contact}" if f"p:{contact}" in self.up else f"u:{contact}")

    def was_changed(self, person: str) -> bool:
        return any(self.find(k) == person for k in self.changed)

    def phone(self, person: str) -> str | None:
        keys = [k for k in self.up if self.find(k) == person]
        changes = [self.new_phone[k] for k in keys if k in self.new_phone]
        if changes:
            return max(changes)[1]
        phones = {k[2:] for k in keys if k.startswith("p:")} | {
            k.split(":", 1)[1] for k in keys if not k.startswith(("p:", "u:"))
        }
        assert len(phones) <= 1, (person, phones)
        return next(iter(phones), None)


class _Inbound(NamedTuple):
    external_id: str
    person: str
    channel: str
    at: float
    name: str | None  # the profile name its record gave
    title: str  # its notification's


def _inbound(records: list[WebhookRecord], people: _People) -> list[_Inbound]:
    """Each inbound message (not the reactions, edits and revokes), in record order."""
    out = []
    for r in records:
        if r.kind == "change" and r.field == "messages":
            cards = r.payload.get("contacts") or ()
            for m in r.payload.get("messages") or ():
                if m["type"] in _NOT_MESSAGES:
                    continue
                phone, user_id = m.get("from"), m.get("from_user_id")
                card = next(
                    (
                        c
                        for c in cards
                        if (user_id and c.get("user_id") == user_id) or c.get("wa_id") == phone
                    ),
                    {},
                )
                profile = card.get("profile") or {}
                name = profile.get("name") if isinstance(profile.get("name"), str) else None
                system = m.get("system") or {}
                if m["type"] == "system" and system.get("type") in _NUMBER_CHANGES:
                    phone, user_id = system.get("wa_id") or phone, system.get("user_id") or user_id
                shown = name or profile.get("username") or phone or user_id
                person = people.key("whatsapp", phone, user_id)
                out.append(
                    _Inbound(
                        m["id"], person, "whatsapp", float(m["timestamp"]), name, f"New message from {shown}"
                    )
                )
        elif r.kind == "messaging" and "message" in r.payload and not r.payload["message"].get("is_echo"):
            channel = "instagram" if r.object == "instagram" else "messenger"
            sender = r.payload["sender"]["id"]
            out.append(
                _Inbound(
                    r.payload["message"]["mid"],
                    people.key(channel, sender, None),
                    channel,
                    r.payload["timestamp"] / 1000,
                    None,
                    f"New message from {sender}",
                )
            )
    return out


async def test_a_realistic_stream_leaves_the_rows_it_stands_for(db: asyncpg.Connection) -> None:
    company = await _company(db, "rows")
    plan, envelopes, page_user = _stream()
    records = _records(envelopes, company.slug)
    people = _People(records)
    batches = _batches(records, random.Random(1))
    per_batch = await _write(db, batches)
    queued = [reply for replies in per_batch for reply in replies]

    messages = {
        r["external_id"]: r
        for r in await db.fetch(
            "SELECT m.*, c.contact_id FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.company_id = $1 AND NOT m.content ? 'auto_reply'",
            company.id,
        )
    }
    # Every message of the plan, once, where it should end: inbound ones as received, the
    # business's at their highest status (failed terminal), whatever order the statuses came in;
    # each user's in one conversation, whatever ids it came under; two users never in one.
    as_messages = {k: e for k, e in plan.expected.items() if e.type not in _NOT_MESSAGES}
    extra = {f"m_echo{i}" for i in range(4)} | {"wamid.odd-name", "wamid.sent-before-us"}
    assert set(messages) == set(as_messages) | extra
    contact_of: dict[str, int] = {}
    for key, expected in as_messages.items():
        row = messages[key]
        assert (row["direction"], row["status"]) == (expected.direction, expected.final_status), key
        person = people.named(expected.channel, expected.contact)
        assert contact_of.setdefault(person, row["contact_id"]) == row["contact_id"], key
        if expected.direction == "inbound":
            assert (row["type"], row["status_rank"]) == (expected.type, 0) and row["body"], key
    assert len(set(contact_of.values())) == len(contact_of)
    # The status naming an inbound message left it as received.
    assert sum(1 for r in messages.values() if r["direction"] == "inbound" and r["status"] != "received") == 0
    assert messages["wamid.sent-before-us"]["status"] == "delivered"
    assert messages["wamid.sent-before-us"]["type"] == "unknown"
    # Reactions are on their message, not messages (the plan's are checked in detail by the
    # plan's own verification in `cortexx simulate`).
    reactions = await db.fetchval("SELECT count(*) FROM message_reactions WHERE company_id = $1", company.id)
    assert reactions == len({(e.key) for e in plan.expected.values() if e.type == "reaction"}) > 0
    # Receipts move what the page sent, each message at the first receipt that moved it.
    at = lambda s: datetime.fromtimestamp(START + s, tz=UTC)  # noqa: E731
    echoes = {
        k: (messages[k]["status"], messages[k]["status_at"]) for k in sorted(extra) if k.startswith("m_echo")
    }
    assert echoes == {
        "m_echo0": ("read", at(5001)),
        "m_echo1": ("read", at(5001)),
        "m_echo2": ("read", at(5003)),
        "m_echo3": ("delivered", at(5002)),
    }

    inbound = _inbound(records, people)
    first: dict[str, _Inbound] = {}
    for message in inbound:
        first.setdefault(message.external_id, message)
    # Conversations: one per user, unread = its inbound messages, last = its latest message.
    latest: dict[str, float] = defaultdict(float)
    unread: Counter[str] = Counter()
    for message in first.values():
        unread[message.person] += 1
        latest[message.person] = max(latest[message.person], message.at)
    page_person = people.key("messenger", page_user, None)
    for i in range(4):
        latest[page_person] = max(latest[page_person], START + 100 + i)
    rows = await db.fetch(
        "SELECT ct.phone_number, ct.name, c.* FROM conversations c JOIN contacts ct ON ct.id = c.contact_id"
        " WHERE c.company_id = $1 AND c.deleted_at IS NULL",
        company.id,
    )
    person_of = {contact: person for person, contact in contact_of.items()}
    conversations = {
        person_of.get(r["contact_id"]) or people.named(r["channel"], r["phone_number"]): r for r in rows
    }
    assert len(conversations) == len(rows)
    for person, count in unread.items():
        row = conversations[person]
        assert (row["unread_count"], row["status"]) == (count, "open"), person
        assert row["last_message_at"] == datetime.fromtimestamp(latest[person], tz=UTC), person
        newest = await db.fetchrow("SELECT body, sent_at FROM messages WHERE id = $1", row["last_message_id"])
        assert newest["sent_at"] == row["last_message_at"]
        body = newest["body"]
        assert row["last_message_preview"] == (
            body if len(body) <= PREVIEW_MAX else body[: PREVIEW_MAX - 1] + "\u2026"
        )
        # Contacts: the number as last known; the last profile name given, none where none was
        # (or it was not a string).
        given = [m.name for m in inbound if m.person == person and m.name is not None]
        assert (row["phone_number"], row["name"]) == (people.phone(person), given[-1] if given else None)
    assert set(conversations) - set(unread) == {people.named("whatsapp", "4915774900009")}  # statuses only
    assert plan.contacts.keys() >= {
        r["phone_number"] for r in rows if r["channel"] == "whatsapp" and r["name"]
    }

    # Notifications: one per active agent per inbound message, titled with the contact's name.
    notes = await db.fetch(
        "SELECT u.name AS agent, m.external_id, n.title, n.body, m.body AS message_body FROM notifications n "
        "JOIN users u ON u.id = n.user_id JOIN messages m ON m.id = n.message_id WHERE n.company_id = $1",
        company.id,
    )
    assert Counter(n["agent"] for n in notes) == {"ana": len(first), "bo": len(first)}
    assert {n["external_id"] for n in notes} == set(first)
    for n in notes:
        assert n["title"] == first[n["external_id"]].title
        assert (
            n["body"] == n["message_body"][: PREVIEW_MAX - 1] + "\u2026"
            if len(n["message_body"]) > PREVIEW_MAX
            else n["message_body"]
        )

    # Kept events: the plan's two other fields, the unranked status, the errors-only change; once.
    events = await db.fetch(
        "SELECT field, payload FROM webhook_events WHERE company_id = $1 ORDER BY field", company.id
    )
    assert [e["field"] for e in events] == [
        "account_update",
        "message_template_status_update",
        "messages",
        "statuses",
    ]
    assert events[3]["payload"]["status"] == "deleted"

    # Auto-replies, for users whose ids never changed (a change can fold two conversations, and
    # their replies, into one: below): away once per conversation and local day for a message
    # outside hours; a welcome where the batch that created the conversation held a message
    # inside them. Never for a system message, nor to a user without a number.
    created_in: dict[str, int] = {}
    for b, batch in enumerate(batches):
        for r in batch:
            if r.kind == "change" and r.field == "messages":
                for m in r.payload.get("messages") or ():
                    created_in.setdefault(people.key("whatsapp", m.get("from"), m.get("from_user_id")), b)
                for st in r.payload.get("statuses") or ():
                    if st["status"] != "deleted":
                        person = people.key("whatsapp", st.get("recipient_id"), st.get("recipient_user_id"))
                        created_in.setdefault(person, b)
    expected_replies = set()
    for b, batch in enumerate(batches):
        for message in _inbound(batch, people):
            kind = as_messages.get(message.external_id)
            if (
                message.channel != "whatsapp"
                or first[message.external_id].at != message.at
                or people.was_changed(message.person)
                or people.phone(message.person) is None
                or (kind is not None and kind.type == "system")
            ):
                continue
            if not _open(message.at):
                day = datetime.fromtimestamp(message.at, tz=UTC).date().isoformat()
                expected_replies.add((message.person, "away", day, "We are closed."))
            elif created_in[message.person] == b:
                expected_replies.add((message.person, "welcome", "conversation", "Welcome!"))
    replies = await db.fetch(
        "SELECT c.contact_id, ct.phone_number, ar.kind, ar.window_key, ar.outbound_id, m.body, m.status,"
        " m.direction"
        " FROM auto_replies ar JOIN conversations c ON c.id = ar.conversation_id"
        " JOIN contacts ct ON ct.id = c.contact_id"
        " JOIN messages m ON m.company_id = ar.company_id AND m.external_id = ar.outbound_id"
        " WHERE ar.company_id = $1",
        company.id,
    )
    person_by_contact = {row["contact_id"]: person for person, row in conversations.items()}
    by_person = [(person_by_contact[r["contact_id"]], r) for r in replies]
    assert {
        (person, r["kind"], r["window_key"], r["body"])
        for person, r in by_person
        if not people.was_changed(person)
    } == expected_replies
    assert {r["kind"] for r in replies} == {"welcome", "away"}
    assert {(r["status"], r["direction"]) for r in replies} == {("pending", "outbound")}
    # Whatever ids they came under, one conversation keeps one welcome and one away a day.
    assert len({(person, r["kind"], r["window_key"]) for person, r in by_person}) == len(replies)
    # Each one queued to be sent under its row's id, to a number the user had; again (the same id)
    # when a later batch redelivers a message of its conversation while it is still pending;
    # never twice a batch. (One a merge folded away was queued, and is not a row any more.)
    sent = {m.id: m for m in queued}
    for person, r in by_person:
        message = sent[r["outbound_id"]]
        assert (message.text, message.origin) == (r["body"], "auto_reply")
        assert message.to == r["phone_number"] or people.was_changed(person)
    assert all(len({m.id for m in replies}) == len(replies) for replies in per_batch)


async def test_redelivered_in_any_order_and_batching_it_changes_nothing(db: asyncpg.Connection) -> None:
    company = await _company(db, "again")
    _, envelopes, _ = _stream()
    records = _records(envelopes, company.slug)
    first_time = [m for replies in await _write(db, _batches(records, random.Random(1))) for m in replies]
    before = await _snapshot(db, company.id)

    shuffled = list(records)
    random.Random(2).shuffle(shuffled)
    again = await _write(db, _batches(shuffled, random.Random(3)))
    assert await _snapshot(db, company.id) == before
    # Nothing new to send; the replies still pending are sent again, under their own ids, at
    # most once a batch.
    pending = {m.id for m in first_time}
    assert {m.id for replies in again for m in replies} == pending
    assert all(len({m.id for m in replies}) == len(replies) for replies in again)
    assert all(m.text and m.to for replies in again for m in replies)

    # Written shuffled from the start: the same messages, contacts, counts and notifications (the
    # auto-replies depend on which batch created a conversation, and receipts before what they
    # name find nothing; a message first known by its statuses is sent at the first to arrive).
    twin = await _company(db, "shuffled")
    await _write(db, _batches([_retenant(r, twin.slug) for r in shuffled], random.Random(4)))
    got = await _snapshot(db, twin.id)

    def steady(snapshot: dict[str, list[tuple[Any, ...]]]) -> dict[str, Any]:
        return {
            "contacts": snapshot["contacts"],
            "conversations": [r[:5] for r in snapshot["conversations"]],
            "messages": [r[:10] if not r[1].startswith("m_echo") else r[:6] for r in snapshot["messages"]],
            "notifications": snapshot["notifications"],
            "events": snapshot["events"],
        }

    assert steady(got) == steady(before)


def _retenant(record: WebhookRecord, slug: str) -> WebhookRecord:
    return WebhookRecord.from_dict({**orjson.loads(record.to_bytes()), "tenant": slug})


class _Counting:
    """A connection that counts the statements run through it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements = 0

    async def fetch(self, *args: Any) -> list[asyncpg.Record]:
        self.statements += 1
        return await self.conn.fetch(*args)

    async def execute(self, *args: Any) -> str:
        self.statements += 1
        return await self.conn.execute(*args)


async def test_a_batch_takes_a_fixed_number_of_statements_whatever_its_size(db: asyncpg.Connection) -> None:
    """The stream holds every kind of row (and redeliveries): one statement for each, whether
    it comes alone or three times over, for three companies, in one batch."""
    _, envelopes, _ = _stream()
    alone = _records(envelopes, (await _company(db, "fixed")).slug)
    thrice = [r for n in range(3) for r in _records(envelopes, (await _company(db, f"fixed{n}")).slug)]
    counts = []
    for batch in (alone, thrice):
        counting = _Counting(db)
        async with db.transaction():
            rows = to_rows(batch, await load_companies(db, CompanyCache(), batch))
            await RowWriter(counting).apply(rows)  # type: ignore[arg-type]
        counts.append(counting.statements)
    assert len(thrice) == 3 * len(alone) > 600
    assert counts == [15, 15]


def _poisoned(
    record: WebhookRecord, *, body: str | None = None, timestamp: str | None = None
) -> WebhookRecord:
    doc = orjson.loads(record.to_bytes())
    [message] = doc["payload"]["messages"]
    if body is not None:
        message["type"], message["text"] = "text", {"body": body}
    if timestamp is not None:
        message["timestamp"] = timestamp
    return WebhookRecord.from_dict(doc)


def _raw(values: list[bytes]) -> list[RawRecord]:
    return [RawRecord(META_WEBHOOKS, 3, 1000 + i, b"k", value, []) for i, value in enumerate(values)]


class _Sink:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self.sent: list[OutboundMessage] = []

    async def dead_letter(self, letter: DeadLetter) -> None:
        self.letters.append(letter)

    async def send(self, messages: list[OutboundMessage]) -> None:
        self.sent += messages


async def test_poison_records_are_found_by_splitting_the_batch_and_the_rest_is_written(
    db: asyncpg.Connection, services: ServiceUrls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two records the database refuses (a NUL in a text: Postgres text cannot hold one), one
    that decodes to nothing storable and one that is not a record at all, among 120: those four
    are dead-lettered, with their error, in record order; the others leave exactly the rows they
    leave written alone, and finding the two took a number of applies in the log of the batch."""
    company = await _company(db, "poison")
    twin = await _company(db, "clean")
    _, envelopes, _ = _stream()
    records = _records(envelopes, company.slug)[:120]
    whatsapp = [i for i, r in enumerate(records) if r.kind == "change" and r.payload.get("messages")]
    refused = {whatsapp[3]: _poisoned(records[whatsapp[3]], body="nul \x00 byte"), whatsapp[-2]: None}
    contact_of = records[whatsapp[-2]].payload["contacts"][0]
    doc = orjson.loads(records[whatsapp[-2]].to_bytes())
    doc["payload"]["contacts"][0]["profile"]["name"] = "Ni\x00ll"  # a contact's name this time
    assert contact_of["wa_id"] == doc["payload"]["messages"][0]["from"]
    refused[whatsapp[-2]] = WebhookRecord.from_dict(doc)
    undecodable = {whatsapp[10]: _poisoned(records[whatsapp[10]], timestamp="9" * 20)}
    values = [r.to_bytes() for r in records]
    for i, r in {**refused, **undecodable}.items():
        assert r is not None
        values[i] = r.to_bytes()
    garbage = next(i for i in range(len(records)) if i not in whatsapp)
    values[garbage] = b"\x00not json at all"
    poison = sorted([*refused, *undecodable, garbage])

    applies = 0
    apply = RowWriter.apply

    async def counted(self: RowWriter, rows: Any) -> None:
        nonlocal applies
        applies += 1
        await apply(self, rows)

    monkeypatch.setattr(RowWriter, "apply", counted)
    pool = await create_writer_pool(services.database_url, max_size=1)
    try:
        sink = _Sink()
        writer = WebhookWriter(pool, sink.dead_letter, sink.send, retry_max_s=0.2)
        stats = await writer.write(_raw(values))
        assert [letter.source_offset - 1000 for letter in sink.letters] == poison
        by_offset = {letter.source_offset - 1000: letter.error for letter in sink.letters}
        assert by_offset[garbage].type == "RecordError"
        assert (
            by_offset[whatsapp[10]].type == "PoisonRecord"
            and "out of range" in by_offset[whatsapp[10]].message
        )
        for i in refused:
            assert by_offset[i].type == "UntranslatableCharacterError", by_offset[i]
        assert {letter.tenant for letter in sink.letters} == {None, company.slug}
        assert 1 < applies <= 1 + 2 * 2 * 7, applies  # 120 records: 7 halvings to one, twice

        # The rest, written alone into a twin company, leaves the same rows, counts and replies.
        clean = [_retenant(r, twin.slug).to_bytes() for i, r in enumerate(records) if i not in poison]
        twin_sink = _Sink()
        twin_stats = await WebhookWriter(pool, twin_sink.dead_letter, twin_sink.send).write(_raw(clean))
    finally:
        await pool.close()
    assert twin_sink.letters == []
    assert stats == twin_stats and stats.messages > 50
    assert sorted((m.to, m.text) for m in sink.sent) == sorted((m.to, m.text) for m in twin_sink.sent)
    got, expected = await _snapshot(db, company.id), await _snapshot(db, twin.id)
    assert got == expected
    stored = {
        r["external_id"]
        for r in await db.fetch("SELECT external_id FROM messages WHERE company_id = $1", company.id)
    }
    assert not stored & {records[i].payload["messages"][0]["id"] for i in [*refused, *undecodable]}


async def test_a_split_batch_welcomes_as_the_whole_would_and_an_outage_is_retried_not_poison(
    db: asyncpg.Connection, services: ServiceUrls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status creates the conversation, a refused record follows, then the customer's first
    message: split, the three are applied apart, and the welcome is still due (the conversation
    was created in this batch's transaction). A deadlock while splitting is an outage: the batch
    is retried whole, and only the refused record is dead-lettered."""
    company = await _company(db, "split")
    phone = "4915700000001"
    status = wa_status("sent", wamid="wamid.ours", recipient_id=phone, timestamp=START)
    hello = wa_message("text", wamid="wamid.hello", from_=phone, timestamp=START + 60)
    nul = wa_message("text", wamid="wamid.nul", from_="4915700000002", timestamp=START + 30)
    nul["text"]["body"] = "\x00"

    def change(**parts: Any) -> dict[str, Any]:
        return wa_envelope([wa_change(phone_number_id="1", display_phone_number="2", **parts)], waba_id="3")

    records = _records(
        [change(statuses=[status]), change(messages=[nul]), change(messages=[hello])], company.slug
    )
    calls = 0
    apply = RowWriter.apply

    async def deadlock_once(self: RowWriter, rows: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # the second half of the split: the refused record and the welcome's
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        await apply(self, rows)

    monkeypatch.setattr(RowWriter, "apply", deadlock_once)
    retries = webhooks.DB_RETRIES._value.get()
    pool = await create_writer_pool(services.database_url, max_size=1)
    try:
        sink = _Sink()
        stats = await WebhookWriter(pool, sink.dead_letter, sink.send, retry_max_s=0.2).write(
            _raw([r.to_bytes() for r in records])
        )
    finally:
        await pool.close()
    assert webhooks.DB_RETRIES._value.get() == retries + 1
    assert [(letter.source_offset, letter.error.type) for letter in sink.letters] == [
        (1001, "UntranslatableCharacterError")
    ]
    assert (stats.messages, stats.statuses, stats.notifications) == (1, 1, 2)
    assert [(m.to, m.text) for m in sink.sent] == [(phone, "Welcome!")]
    kinds = await db.fetch("SELECT kind FROM auto_replies WHERE company_id = $1", company.id)
    assert [r["kind"] for r in kinds] == ["welcome"]
