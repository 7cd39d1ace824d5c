"""The worker's writer (processors/writer.py, over processors/rows.py) against real Postgres.

A realistic seeded stream (`harness.meta_samples.build_plan`: every WhatsApp message type from
users by BSUID and phone, by BSUID and username alone and by phone alone, reactions, edits and
revokes, statuses out of order, Messenger and Instagram, other fields, redelivered envelopes) plus
what it lacks
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
# A contact is named by its BSUID where it has one, else its phone (a username user has none);
# contacts and conversations merged into others (one user known by two ids) are not shown.
WHO = "coalesce(ct.user_id, ct.phone_number)"
SNAPSHOT: dict[str, str] = {
    "contacts": """
        SELECT coalesce(user_id, phone_number), channel, phone_number, username, name FROM contacts
         WHERE company_id = $1 AND deleted_at IS NULL ORDER BY 1, 2""",
    "conversations": f"""
        SELECT {WHO}, c.channel, c.status, c.unread_count, c.last_message_at,
               c.last_message_preview,
               CASE WHEN lm.content ? 'auto_reply' THEN lm.body ELSE lm.external_id END AS last_message
          FROM conversations c JOIN contacts ct ON ct.id = c.contact_id
          LEFT JOIN messages lm ON lm.id = c.last_message_id
         WHERE c.company_id = $1 AND c.deleted_at IS NULL ORDER BY 1, 2""",
    "messages": f"""
        SELECT {WHO}, m.external_id, m.direction, m.type, m.body, m.content::text, m.status,
               m.status_rank, m.status_at, m.error::text, m.sent_at, m.reply_to, m.forwarded,
               m.referral::text, m.edited_at, m.original_body, m.deleted_at
          FROM messages m JOIN conversations c ON c.id = m.conversation_id
          JOIN contacts ct ON ct.id = c.contact_id
         WHERE m.company_id = $1 AND NOT m.content ? 'auto_reply' ORDER BY 2""",
    "reactions": f"""
        SELECT r.message_external_id, {WHO}, r.emoji, r.reacted_at, r.reaction_external_id
          FROM message_reactions r JOIN contacts ct ON ct.id = r.contact_id
         WHERE r.company_id = $1 ORDER BY 1, 2""",
    "amendments": """
        SELECT external_id, message_external_id, kind, body, at FROM message_amendments
         WHERE company_id = $1 ORDER BY 1""",
    "auto_replies": f"""
        SELECT {WHO}, ar.kind, ar.window_key, m.body, m.status
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
    # (To a user known by one number all along: the status names them by it.)
    inbound_id, phone = next(
        (k, plan.users[e.user].phones[0])
        for k, e in plan.expected.items()
        if e.direction == "inbound" and e.user is not None and len(plan.users[e.user].phones) == 1
    )
    named_inbound = wa_status("read", wamid=inbound_id, recipient_id=phone, timestamp=START + 4000)
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


def _who(plan: SimulationPlan) -> dict[str, str]:
    """Every id a WhatsApp user of the plan wrote under -> how their contact ends up known: by
    their last BSUID, else their last phone (a number change names the contact the old one did)."""
    out: dict[str, str] = {}
    for user in plan.users.values():
        final = user.user_id or user.phone
        assert final is not None
        for ident in (*user.user_ids, *user.phones):
            out[ident] = final
    return out


def _sender(m: dict[str, Any]) -> tuple[str | None, str | None]:
    """A WhatsApp message's (phone, BSUID), a changed number's system message by its new ones."""
    phone, user_id = m.get("from"), m.get("from_user_id")
    system = m.get("system") or {}
    return system.get("wa_id") or phone, system.get("user_id") or user_id


AMENDMENTS = ("reaction", "edit", "revoke")  # what a WhatsApp user sends that is not a message


class _In(NamedTuple):
    """An inbound message of the stream."""

    key: str  # its external id
    who: str  # its contact, as it ends up known (`_who`)
    channel: str
    at: float
    name: str | None  # the profile name it came with
    title: str  # who its notifications say it is from: the name, else the username, else the id


def _inbound(records: list[WebhookRecord], who: dict[str, str]) -> list[_In]:
    """Each inbound message of `records`, in order (a WhatsApp system message by the user's new ids)."""
    out = []
    for r in records:
        if r.kind == "change" and r.field == "messages":
            cards = r.payload.get("contacts") or ()
            for m in r.payload.get("messages") or ():
                if m["type"] in AMENDMENTS:
                    continue
                phone, user_id = _sender(m)
                card = next((c for c in cards if user_id and c.get("user_id") == user_id), None) or next(
                    (c for c in cards if phone and c.get("wa_id") == phone), {}
                )
                profile = card.get("profile") or {}
                name = profile.get("name") if isinstance(profile.get("name"), str) else None
                ident = user_id or phone
                assert ident is not None
                title = name or profile.get("username") or phone or user_id
                out.append(
                    _In(m["id"], who.get(ident, ident), "whatsapp", float(m["timestamp"]), name, title)
                )
        elif r.kind == "messaging" and "message" in r.payload and not r.payload["message"].get("is_echo"):
            channel = "instagram" if r.object == "instagram" else "messenger"
            sender = r.payload["sender"]["id"]
            out.append(
                _In(r.payload["message"]["mid"], sender, channel, r.payload["timestamp"] / 1000, None, sender)
            )
    return out


async def test_a_realistic_stream_leaves_the_rows_it_stands_for(db: asyncpg.Connection) -> None:
    company = await _company(db, "rows")
    plan, envelopes, page_user = _stream()
    records = _records(envelopes, company.slug)
    batches = _batches(records, random.Random(1))
    per_batch = await _write(db, batches)
    queued = [reply for replies in per_batch for reply in replies]

    who = _who(plan)
    messages = {
        r["external_id"]: r
        for r in await db.fetch(
            f"SELECT m.*, {WHO} AS who, ct.phone_number FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id JOIN contacts ct ON ct.id = c.contact_id"
            " WHERE m.company_id = $1 AND NOT m.content ? 'auto_reply'",
            company.id,
        )
    }
    # Every message of the plan, once, where it should end: inbound ones as received, the
    # business's at their highest status (failed terminal), whatever order the statuses came in.
    extra = {f"m_echo{i}" for i in range(4)} | {"wamid.odd-name", "wamid.sent-before-us"}
    assert set(messages) == set(plan.expected) | extra
    for key, expected in plan.expected.items():
        row = messages[key]
        assert (row["direction"], row["status"], row["who"]) == (
            expected.direction,
            expected.final_status,
            who.get(expected.contact, expected.contact),
        ), key
        if expected.direction == "inbound":
            assert (row["type"], row["status_rank"]) == (expected.type, 0) and row["body"], key
            assert (row["reply_to"], row["forwarded"]) == (expected.reply_to, expected.forwarded), key
            assert (row["referral"] is not None) == expected.referral, key
    # Reactions on their message, the last one sent (or removed); edits applied, the body before
    # them kept; revoked messages marked deleted, their body kept.
    reactions = await db.fetch(
        f"SELECT r.message_external_id, {WHO} AS who, r.emoji FROM message_reactions r"
        " JOIN contacts ct ON ct.id = r.contact_id WHERE r.company_id = $1",
        company.id,
    )
    assert sorted((r["message_external_id"], r["who"], r["emoji"] or "") for r in reactions) == sorted(
        (target, who[user], reaction.emoji or "") for (target, user), reaction in plan.reactions.items()
    )
    for target, edit in plan.edits.items():
        row = messages[target]
        assert (row["body"], row["edited_at"] is not None, row["original_body"]) == (
            edit.body,
            True,
            row["content"]["text"]["body"],
        ), target
    assert {k for k, r in messages.items() if r["deleted_at"] is not None} == set(plan.revokes)
    for target in plan.revokes:
        assert messages[target]["body"], target
    # The status naming an inbound message left it as received.
    assert sum(1 for r in messages.values() if r["direction"] == "inbound" and r["status"] != "received") == 0
    assert messages["wamid.sent-before-us"]["status"] == "delivered"
    assert messages["wamid.sent-before-us"]["type"] == "unknown"
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

    inbound = _inbound(records, who)
    first: dict[str, _In] = {}
    for message in inbound:
        first.setdefault(message.key, message)
    # Conversations: one per contact, unread = its inbound messages, last = its latest message.
    latest: dict[tuple[str, str], float] = defaultdict(float)
    unread: Counter[tuple[str, str]] = Counter()
    for message in first.values():
        unread[message.who, message.channel] += 1
        latest[message.who, message.channel] = max(latest[message.who, message.channel], message.at)
    for i in range(4):
        latest[page_user, "messenger"] = max(latest[page_user, "messenger"], START + 100 + i)
    conversations = {
        (r["who"], r["channel"]): r
        for r in await db.fetch(
            f"SELECT {WHO} AS who, c.* FROM conversations c JOIN contacts ct ON ct.id = c.contact_id "
            "WHERE c.company_id = $1 AND c.deleted_at IS NULL",
            company.id,
        )
    }
    for key, count in unread.items():
        row = conversations[key]
        assert (row["unread_count"], row["status"]) == (count, "open"), key
        assert row["last_message_at"] == datetime.fromtimestamp(latest[key], tz=UTC), key
        newest = await db.fetchrow(
            "SELECT body, sent_at, deleted_at FROM messages WHERE id = $1", row["last_message_id"]
        )
        assert newest["sent_at"] == row["last_message_at"]
        body = "" if newest["deleted_at"] else newest["body"]  # a revoked message previews as nothing
        assert row["last_message_preview"] == (
            body if len(body) <= PREVIEW_MAX else body[: PREVIEW_MAX - 1] + "\u2026"
        )
    assert set(conversations) - set(unread) == {("4915774900009", "whatsapp")}  # statuses only

    # Contacts: the last profile name given; none where none was (or it was not a string).
    contacts = {
        (r["who"], r["channel"]): r
        for r in await db.fetch(
            "SELECT coalesce(user_id, phone_number) AS who, * FROM contacts"
            " WHERE company_id = $1 AND deleted_at IS NULL",
            company.id,
        )
    }
    names = {key: r["name"] for key, r in contacts.items()}
    assert set(names) == set(conversations)
    for (ident, channel), name in names.items():
        given = [m.name for m in inbound if (m.who, m.channel) == (ident, channel) and m.name is not None]
        assert name == (given[-1] if given else None), ident
    assert plan.contacts.keys() >= {
        ident for ident, channel in names if channel == "whatsapp" and names[ident, channel]
    }
    # Each WhatsApp user one contact, as they end: a username user with no phone.
    for user in plan.users.values():
        row = contacts[who[user.key], "whatsapp"]
        assert (row["phone_number"], row["user_id"], row["username"]) == (
            user.phone,
            user.user_id,
            user.username,
        ), user.key

    # Notifications: one per active agent per inbound message, titled with the contact's name.
    notes = await db.fetch(
        "SELECT u.name AS agent, m.external_id, n.title, n.body, m.body AS message_body FROM notifications n "
        "JOIN users u ON u.id = n.user_id JOIN messages m ON m.id = n.message_id WHERE n.company_id = $1",
        company.id,
    )
    assert Counter(n["agent"] for n in notes) == {"ana": len(first), "bo": len(first)}
    assert {n["external_id"] for n in notes} == set(first)
    for n in notes:
        assert n["title"] == f"New message from {first[n['external_id']].title}", n["external_id"]
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

    # Auto-replies: away once per conversation and local day for a message outside hours; a
    # welcome where the batch that created the conversation held a message inside them.
    created_in: dict[str, int] = {}
    for b, batch in enumerate(batches):
        for r in batch:
            if r.kind == "change" and r.field == "messages":
                for m in r.payload.get("messages") or ():
                    phone, user_id = m.get("from"), m.get("from_user_id")
                    ident = user_id or phone
                    created_in.setdefault(who.get(ident, ident), b)
                for s in r.payload.get("statuses") or ():
                    if s["status"] != "deleted":
                        ident = s.get("recipient_user_id") or s["recipient_id"]
                        created_in.setdefault(who.get(ident, ident), b)
    phone_of = {r["who"]: r["phone_number"] for r in contacts.values()}
    kind_of = {k: e.type for k, e in plan.expected.items()}
    expected_replies = set()
    for b, batch in enumerate(batches):
        for message in _inbound(batch, who):
            if message.channel != "whatsapp" or first[message.key].at != message.at:
                continue
            to = phone_of.get(message.who)
            if to is None or kind_of.get(message.key) == "system":
                continue  # no number to send to (a username user), or WhatsApp's own message
            if not _open(message.at):
                expected_replies.add(
                    (
                        to,
                        "away",
                        datetime.fromtimestamp(message.at, tz=UTC).date().isoformat(),
                        "We are closed.",
                    )
                )
            elif created_in[message.who] == b:
                expected_replies.add((to, "welcome", "conversation", "Welcome!"))
    replies = await db.fetch(
        "SELECT ct.phone_number, ar.kind, ar.window_key, ar.outbound_id, m.body, m.status, m.direction"
        " FROM auto_replies ar JOIN conversations c ON c.id = ar.conversation_id"
        " JOIN contacts ct ON ct.id = c.contact_id"
        " JOIN messages m ON m.company_id = ar.company_id AND m.external_id = ar.outbound_id"
        " WHERE ar.company_id = $1",
        company.id,
    )
    assert {(r["phone_number"], r["kind"], r["window_key"], r["body"]) for r in replies} == expected_replies
    assert {r["kind"] for r in replies} == {"welcome", "away"}
    assert {(r["status"], r["direction"]) for r in replies} == {("pending", "outbound")}
    # Each one queued to be sent under its row's id; again (the same id) when a later batch
    # redelivers a message of its conversation while it is still pending; never twice a batch.
    assert {(m.id, m.to, m.text, m.origin) for m in queued} == {
        (r["outbound_id"], r["phone_number"], r["body"], "auto_reply") for r in replies
    }
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
    assert len(thrice) == 3 * len(alone) > 500
    # processors/writer.py's seventeen: contacts, conversations, messages, bumps, notifications,
    # auto-replies, their messages, pending replies, amendments kept and applied, reactions,
    # statuses, delivery and read receipts, events, identity changes, media rows.
    assert counts == [17, 17]


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
