"""Records into row sets (processors/rows.py), without Postgres: what each kind of record stands
for, the poison rules (a record is all in or all out), status ranks, bodies and previews, who a
record is about (a WhatsApp user by business-scoped user id and/or phone, their contact card),
reactions, edits and revokes (none of them a message), identity changes, kept events, and the
rows the writer derives from the database's answers."""

from __future__ import annotations

import random
from typing import Any

import pytest

from harness.meta_samples import (
    MESSAGE_TYPES,
    messenger_envelope,
    messenger_message,
    wa_change,
    wa_envelope,
    wa_message,
    wa_other_change,
    wa_status,
)
from ingest.envelope import split_envelope
from processors.autoreply import Company
from processors.rows import (
    STATUS_RANK,
    Amendment,
    ContactKey,
    IdChange,
    Message,
    Party,
    PoisonRecord,
    Reaction,
    RowSet,
    amendment_rows,
    bumps_and_notifications,
    contact_rows,
    conversation_rows,
    delivered_rows,
    epoch,
    event_key,
    event_rows,
    id_change_rows,
    message_rows,
    reaction_rows,
    read_rows,
    replies_due,
    status_rows,
    to_rows,
)
from schemas.meta import WHATSAPP_OBJECT
from schemas.previews import PREVIEW_MAX, clip
from schemas.records import WebhookRecord

ACME = Company(
    id=7,
    slug="acme",
    wuzapi_token=None,
    welcome_message="Welcome!",
    away_message="We are closed.",
    timezone="UTC",
    # Tuesdays 22:00-22:35 UTC only; 1_700_000_000 is Tuesday 2023-11-14 22:13:20 UTC.
    business_hours={"tue": ["22:00", "22:35"]},
)
QUIET = Company(7, "quiet", None, None, None, "UTC", None)  # no auto-replies
COMPANIES = {"acme": ACME}
OPEN_AT = 1_700_000_000  # inside business hours
CLOSED_AT = 1_700_003_000  # 23:03, outside
PAGE = "112233445566"


def _records(*envelopes: dict[str, Any], tenant: str = "acme") -> list[WebhookRecord]:
    return [
        WebhookRecord.from_bytes(value)
        for i, envelope in enumerate(envelopes)
        for _, value in split_envelope(envelope, tenant=tenant, request_id=f"r{i}", received_at_ms=i)
    ]


def _wa(messages=(), statuses=(), contacts=()) -> dict[str, Any]:
    change = wa_change(
        phone_number_id="1065",
        display_phone_number="1555",
        messages=list(messages),
        statuses=list(statuses),
        contacts=list(contacts),
    )
    return wa_envelope([change], waba_id="1022")


def _raw_change(value: dict[str, Any], tenant: str = "acme") -> WebhookRecord:
    """A record as the topic could hold it, whatever ingest would have made of it."""
    return WebhookRecord(tenant, WHATSAPP_OBJECT, "1022", None, "change", "messages", value, "r", 0, 0)


def _text(wamid: str, sender: str = "4915100000001", at: int = OPEN_AT) -> dict[str, Any]:
    return wa_message("text", wamid=wamid, from_=sender, timestamp=at)


def _messaging(event: dict[str, Any], object_: str = "page") -> WebhookRecord:
    return WebhookRecord("acme", object_, PAGE, None, "messaging", "messaging", event, "r", 0, 0)


def _nothing_of(rows: RowSet) -> bool:
    return not (
        rows.messages
        or rows.statuses
        or rows.delivered
        or rows.read
        or rows.events
        or rows.reactions
        or rows.amendments
        or rows.id_changes
    )


def _by_phone(phone: str, channel: str = "whatsapp") -> ContactKey:
    return (7, channel, "p:" + phone)


def _by_user_id(user_id: str) -> ContactKey:
    return (7, "whatsapp", "u:" + user_id)


# ------------------------------------------------------------------------------------ poison


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (
            {"messages": [{"from": "49151", "timestamp": "1", "type": "text"}]},
            "WhatsApp message without an id",
        ),
        ({"messages": ["wamid.x"]}, "WhatsApp message without an id"),
        ({"messages": [{"id": "wamid.x", "timestamp": "1", "type": "text"}]}, "update names no contact"),
        (
            {"statuses": [{"status": "read", "timestamp": "1", "recipient_id": "4915"}]},
            "WhatsApp status without an id",
        ),
        ({"statuses": [{"id": "wamid.x", "status": "read", "timestamp": "1"}]}, "update names no contact"),
        # Neither a phone nor a BSUID, on the message or its card ("" is no id).
        (
            {
                "messages": [{"id": "w", "from": "", "from_user_id": "", "timestamp": "1", "type": "text"}],
                "contacts": [{"wa_id": "", "profile": {"name": "Ann", "username": "@ann"}}],
            },
            "update names no contact",
        ),
        (
            {"statuses": [{"id": "w", "status": "failed", "timestamp": "1", "recipient_id": ""}]},
            "update names no contact",
        ),
        ({"messages": [{"id": "w", "from": "4915", "timestamp": "x", "type": "text"}]}, "bad timestamp 'x'"),
        ({"messages": [{"id": "w", "from": "4915", "type": "text"}]}, "bad timestamp None"),
        # A timestamp no clock holds: poison, never the OSError (EOVERFLOW) an outage looks like.
        ({"messages": [{"id": "w", "from": "4915", "timestamp": "9" * 20}]}, "timestamp out of range"),
        ({"messages": [{"id": "w", "from": "4915", "timestamp": "nan"}]}, "timestamp out of range"),
        (
            {"statuses": [{"id": "w", "status": "sent", "recipient_id": "4915", "timestamp": "-1e15"}]},
            "out of range",
        ),
        # Shapes Meta never sends: poison too, not a crash of the worker.
        (
            {
                "messages": [
                    {"id": "w", "from": "4915", "timestamp": "1", "type": "contacts", "contacts": [1]}
                ]
            },
            "unexpected payload shape",
        ),
        (
            {"messages": [{"id": "w", "from": "4915", "timestamp": "1"}], "contacts": 5},
            "unexpected payload shape",
        ),
        ({"messages": 5}, "unexpected payload shape"),
    ],
)
def test_a_whatsapp_change_that_can_never_be_stored_is_poison(value: dict[str, Any], error: str) -> None:
    rows = to_rows([_raw_change(value)], COMPANIES)
    [(index, exc)] = rows.poison
    assert index == 0 and isinstance(exc, PoisonRecord)
    assert error in str(exc)
    assert _nothing_of(rows)


def test_a_record_is_all_in_or_all_out_and_the_others_stay() -> None:
    good_before = _raw_change({"messages": [_text("wamid.before")]})
    # A good message, then a status without an id, in one change: the message goes too.
    mixed = _raw_change(
        {"messages": [_text("wamid.lost")], "statuses": [{"status": "read", "recipient_id": "4"}]}
    )
    half_read = _messaging(
        {"sender": {"id": "9"}, "read": {"watermark": 1_700_000_000_000}, "timestamp": "x"}
    )
    stranger = _raw_change({"messages": [_text("wamid.stranger")]}, tenant="nobody")
    good_after = _raw_change(
        {"statuses": [wa_status("sent", wamid="wamid.out", recipient_id="4", timestamp=1)]}
    )
    rows = to_rows([good_before, mixed, half_read, stranger, good_after], COMPANIES)
    assert [(i, str(e)) for i, e in rows.poison] == [
        (1, "WhatsApp status without an id"),
        (2, "bad timestamp 'x'"),
        (3, "unknown tenant 'nobody'"),
    ]
    assert [m.external_id for m in rows.messages] == ["wamid.before"]
    assert [s.external_id for s in rows.statuses] == ["wamid.out"]
    assert rows.read == [] and rows.events == []


def test_messenger_events_naming_no_contact_or_time_are_poison() -> None:
    no_user = _messaging(
        {"sender": {"id": ""}, "recipient": {"id": PAGE}, "message": {"mid": "m1", "text": "hi"}}
    )
    no_time = _messaging(
        messenger_message(mid="m2", sender_id="9", recipient_id=PAGE, timestamp_ms=0) | {"timestamp": None}
    )
    no_reader = _messaging({"recipient": {"id": PAGE}, "timestamp": 1, "read": {"watermark": 1}})
    bad_attachment = _messaging(
        {"sender": {"id": "9"}, "message": {"mid": "m3", "attachments": ["x"]}, "timestamp": 1}
    )
    bad_mids = _messaging({"sender": {"id": "9"}, "timestamp": 1, "delivery": {"mids": 5}})
    rows = to_rows([no_user, no_time, no_reader, bad_attachment, bad_mids], COMPANIES)
    assert [str(e).split(":")[0] for _, e in rows.poison] == [
        "update names no contact",
        "bad timestamp None",
        "update names no contact",
        "unexpected payload shape",
        "unexpected payload shape",
    ]
    assert _nothing_of(rows)


def test_epoch_takes_seconds_strings_and_milliseconds() -> None:
    assert epoch("1700000000") == 1_700_000_000
    assert epoch(1_700_000_000_123) == pytest.approx(1_700_000_000.123)
    assert epoch(1.5) == 1.5
    for bad in ("", "x", None, [1]):
        with pytest.raises(PoisonRecord, match="bad timestamp"):
            epoch(bad)
    for far in ("inf", "-inf", "nan", 1e300, -1e12 * 1000):
        with pytest.raises(PoisonRecord, match="out of range"):
            epoch(far)


# ------------------------------------------------------------------ messages, bodies, contacts


def test_every_whatsapp_type_has_a_body_and_its_contact_a_name() -> None:
    rng = random.Random(5)
    sender = "4915100000002"
    messages = [
        wa_message(t, wamid=f"wamid.{t}", from_=sender, timestamp=OPEN_AT + i, rng=rng)
        for i, t in enumerate(MESSAGE_TYPES)
    ]
    rows = to_rows(_records(_wa(messages, contacts=[(sender, "Lena Vogel")])), COMPANIES)
    assert rows.poison == []
    # A reaction is not a message (it is a reaction to one); every other type is.
    assert [m.kind for m in rows.messages] == [t for t in MESSAGE_TYPES if t != "reaction"]
    for m in rows.messages:
        assert m.body, m.kind
        # A changed number's system message is filed under the new number (where the user is).
        filed_under = m.content["system"]["wa_id"] if m.kind == "system" else sender
        assert (m.direction, m.contact) == ("inbound", _by_phone(filed_under))
        assert m.title == "New message from Lena Vogel"
    by_kind = {m.kind: m for m in rows.messages}
    assert by_kind["text"].body == messages[0]["text"]["body"]
    [reaction] = rows.reactions
    sample = messages[MESSAGE_TYPES.index("reaction")]["reaction"]
    assert (reaction.external_id, reaction.target, reaction.emoji) == (
        "wamid.reaction",
        sample["message_id"],
        sample["emoji"],
    )
    # (What the system message's number change links: see the identity changes below; the
    # harness sends it in the older form, "customer_changed_number".)
    new_number = by_kind["system"].party.phone
    assert new_number != sender
    assert rows.contacts() == {
        _by_phone(sender): Party(7, "whatsapp", sender, None, name="Lena Vogel"),
        _by_phone(new_number): Party(7, "whatsapp", new_number, None, name="Lena Vogel"),
    }


@pytest.mark.parametrize(
    ("message", "body"),
    [
        ({"type": "text", "text": {"body": "hello"}}, "hello"),
        ({"type": "image", "image": {"caption": "a cat"}}, "a cat"),
        ({"type": "document", "document": {"filename": "cv.pdf"}}, "cv.pdf"),
        ({"type": "audio", "audio": {"id": "1"}}, "[audio]"),
        ({"type": "location", "location": {"latitude": 1.5, "longitude": 2}}, "1.5,2"),
        ({"type": "location", "location": {"name": "Home", "address": "Main St"}}, "Home, Main St"),
        ({"type": "contacts", "contacts": [{"name": {"formatted_name": "Ann"}}, {}]}, "[contact] Ann"),
        ({"type": "interactive", "interactive": {"list_reply": {"id": "x", "title": "Two"}}}, "Two"),
        ({"type": "interactive", "interactive": {}}, "[interactive]"),
        ({"type": "button", "button": {"payload": "yes"}}, "yes"),
        ({"type": "order", "order": {"product_items": [1, 2]}}, "[order] 2 item(s)"),
        ({"type": "order", "order": {"text": "gift wrap", "product_items": [1]}}, "gift wrap"),
        ({"type": "system", "system": {"body": "User A changed from 1 to 2"}}, "User A changed from 1 to 2"),
        # Meta says what it could not pass on, where it says it.
        ({"type": "unsupported", "unsupported": {"type": "poll"}}, "[unsupported: poll]"),
        ({"type": "unsupported", "unsupported": {"type": "edit"}}, "[unsupported: edit]"),
        ({"type": "unsupported", "unsupported": {}}, "[unsupported]"),
        ({"type": "unsupported"}, "[unsupported]"),
        ({"type": "hologram", "hologram": {"body": "x"}}, "[hologram]"),
    ],
)
def test_whatsapp_bodies_per_type(message: dict[str, Any], body: str) -> None:
    value = {"messages": [{"id": "w", "from": "4915", "timestamp": "1", **message}]}
    [stored] = to_rows([_raw_change(value)], COMPANIES).messages
    assert stored.body == body


def test_contact_names_last_one_given_wins_and_nothing_erases_one() -> None:
    sender = "4915100000003"
    named = _records(
        _wa([_text("wamid.1", sender)], contacts=[(sender, "Ida")]),
        _wa([_text("wamid.2", sender)], contacts=[(sender, "Ida K.")]),
        _wa([_text("wamid.3", sender)]),
        _wa(statuses=[wa_status("read", wamid="wamid.out", recipient_id=sender, timestamp=OPEN_AT)]),
    )
    odd = _raw_change(
        {
            "messages": [_text("wamid.4", "4915100000004")],
            "contacts": [{"wa_id": "4915100000004", "profile": {"name": 5}}],
        }
    )
    rows = to_rows([*named, odd], COMPANIES)
    assert rows.contacts() == {
        _by_phone(sender): Party(7, "whatsapp", sender, None, name="Ida K."),
        _by_phone("4915100000004"): Party(7, "whatsapp", "4915100000004", None, name=None),
    }
    assert [m.title for m in rows.messages] == [
        "New message from Ida",
        "New message from Ida K.",
        f"New message from {sender}",
        "New message from 4915100000004",
    ]


def test_messenger_and_instagram_messages_are_keyed_by_the_customer() -> None:
    inbound = messenger_message(
        mid="m_in", sender_id="2471", recipient_id=PAGE, timestamp_ms=1_700_000_000_000, text="Hi"
    )
    echo = {
        "sender": {"id": PAGE},
        "recipient": {"id": "2471"},
        "timestamp": 1_700_000_001_000,
        "message": {"mid": "m_out", "is_echo": True, "text": "Hello"},
    }
    picture = messenger_message(
        mid="ig_1",
        sender_id="9001",
        recipient_id="1784",
        timestamp_ms=1_700_000_002_000,
        attachment_type="image",
    )
    records = [
        *_records(messenger_envelope([inbound, echo], page_id=PAGE)),
        *_records(messenger_envelope([picture], page_id="1784", object_="instagram")),
    ]
    rows = to_rows(records, COMPANIES)
    got = [(m.external_id, m.contact, m.direction, m.kind, m.body, m.at) for m in rows.messages]
    assert got == [
        ("m_in", (7, "messenger", "p:2471"), "inbound", "text", "Hi", 1_700_000_000.0),
        ("m_out", (7, "messenger", "p:2471"), "outbound", "text", "Hello", 1_700_000_001.0),
        ("ig_1", (7, "instagram", "p:9001"), "inbound", "image", "[image]", 1_700_000_002.0),
    ]
    # A Messenger or Instagram user is named by their page-scoped id, kept where a phone is.
    assert rows.contacts() == {
        (7, "messenger", "p:2471"): Party(7, "messenger", "2471", None),
        (7, "instagram", "p:9001"): Party(7, "instagram", "9001", None),
    }
    assert rows.messages[0].title == "New message from 2471"


def test_previews_are_clipped() -> None:
    assert clip(None) is None
    assert clip("x" * PREVIEW_MAX) == "x" * PREVIEW_MAX
    clipped = clip("y" * 500)
    assert clipped is not None and len(clipped) == PREVIEW_MAX and clipped.endswith("\u2026")


# -------------------------------------------------------------------------------------- statuses


def test_status_ranks_played_above_read_and_failed_terminal() -> None:
    order = ["pending", "sent", "delivered", "read", "played", "failed"]
    assert [STATUS_RANK[s] for s in order] == sorted(STATUS_RANK[s] for s in order)
    assert len({STATUS_RANK[s] for s in order}) == len(order)
    assert STATUS_RANK["received"] == STATUS_RANK["pending"] == 0


def test_a_message_ends_at_its_highest_status_sent_at_the_first_to_arrive() -> None:
    to = "4915100000005"
    arrivals = [("played", 40), ("sent", 10), ("read", 30), ("delivered", 20)]
    failing = [("failed", 55), ("read", 50)]
    statuses = [
        wa_status(s, wamid="wamid.voice", recipient_id=to, timestamp=OPEN_AT + t) for s, t in arrivals
    ]
    statuses += [wa_status(s, wamid="wamid.gone", recipient_id=to, timestamp=OPEN_AT + t) for s, t in failing]
    rows = to_rows(_records(*(_wa(statuses=[s]) for s in statuses)), COMPANIES)
    assert rows.events == [] and rows.receipts == 6
    got = status_rows(rows.statuses, {_by_phone(to): 70})
    assert [(r["external_id"], r["status"], r["rank"], r["at"], r["sent_at"]) for r in got] == [
        ("wamid.gone", "failed", 9, OPEN_AT + 55, OPEN_AT + 55),
        ("wamid.voice", "played", 4, OPEN_AT + 40, OPEN_AT + 40),
    ]
    assert got[0]["error"] and got[0]["error"][0]["code"] and got[1]["error"] is None
    assert all(r["conversation_id"] == 70 and r["company_id"] == 7 for r in got)


def test_an_unranked_status_is_kept_as_an_event_and_the_ranked_ones_of_its_change_apply() -> None:
    deleted = {"id": "wamid.d", "status": "deleted", "timestamp": "1", "recipient_id": "4915"}
    read = wa_status("read", wamid="wamid.r", recipient_id="4915", timestamp=OPEN_AT)
    rows = to_rows([_raw_change({"statuses": [deleted, read]})], COMPANIES)
    assert [s.external_id for s in rows.statuses] == ["wamid.r"]
    [event] = rows.events
    assert (event.object, event.field, event.payload) == (WHATSAPP_OBJECT, "statuses", deleted)
    assert event.key == event_key(WHATSAPP_OBJECT, "", "statuses", deleted)


def test_messenger_receipts() -> None:
    delivery = {"sender": {"id": "2471"}, "timestamp": 1_700_000_005_000, "delivery": {"mids": ["a", "b"]}}
    again = {"sender": {"id": "2471"}, "timestamp": 1_700_000_006_000, "delivery": {"mids": ["b", "c"]}}
    read = {
        "sender": {"id": "2471"},
        "timestamp": 1_700_000_007_000,
        "read": {"watermark": 1_700_000_003_000},
    }
    later = {
        "sender": {"id": "2471"},
        "timestamp": 1_700_000_008_000,
        "read": {"watermark": 1_700_000_004_000},
    }
    empty = {"sender": {"id": "2471"}, "timestamp": 1_700_000_009_000, "delivery": {"mids": []}}
    rows = to_rows([_messaging(e) for e in (delivery, again, read, later, empty)], COMPANIES)
    assert rows.poison == [] and rows.receipts == 4
    # A later receipt for a message already delivered changes nothing: the first one's time.
    assert delivered_rows(rows.delivered) == [
        {"company_id": 7, "external_id": "a", "at": 1_700_000_005.0},
        {"company_id": 7, "external_id": "b", "at": 1_700_000_005.0},
        {"company_id": 7, "external_id": "c", "at": 1_700_000_006.0},
    ]
    assert rows.contacts() == {_by_phone("2471", "messenger"): Party(7, "messenger", "2471", None)}
    assert read_rows(rows.read, {_by_phone("2471", "messenger"): 5}) == [
        {"conversation_id": 5, "watermark": 1_700_000_003.0, "at": 1_700_000_007.0, "n": 0},
        {"conversation_id": 5, "watermark": 1_700_000_004.0, "at": 1_700_000_008.0, "n": 1},
    ]
    [kept] = rows.events  # a delivery naming nothing is an event like any other
    assert (kept.object, kept.field, kept.payload) == ("page", "messaging", empty)


# ---------------------------------------------------------------------------------------- events


def test_unknown_fields_and_errors_only_changes_are_kept_once_under_a_stable_key() -> None:
    update = wa_other_change("account_update", {"phone_number": "15550783881", "event": "VERIFIED_ACCOUNT"})
    envelope = wa_envelope([update], waba_id="102290129340398")
    errors_only = {"messaging_product": "whatsapp", "errors": [{"code": 1}]}
    records = [*_records(envelope, envelope), _raw_change(errors_only)]
    rows = to_rows(records, COMPANIES)
    assert len(rows.events) == 3
    kept = event_rows(rows.events)
    # The keys rows already in webhook_events were kept under (a redelivery must find them).
    assert sorted((r["field"], r["key"]) for r in kept) == [
        ("account_update", "97ace0a8e23825c24bad18c420e055bf809565ba61cc97cac5e83547a86d8f62"),
        ("messages", "a3b7dd522eec15bbda882e30000c66f225cb103c0f84626c99d9980835974293"),
    ]
    assert all(r["company_id"] == 7 and r["object"] == WHATSAPP_OBJECT for r in kept)


# --------------------------------------------------------- rows given the database's answers


def _message(
    external_id: str,
    at: float,
    *,
    contact: str = "4915",
    direction: str = "inbound",
    company: Company = ACME,
    body: str = "hi",
    channel: str = "whatsapp",
    user_id: str | None = None,
    referral: dict[str, Any] | None = None,
) -> Message:
    """A message of `contact` (a phone, or a page-scoped id), or of `user_id` (a BSUID) if given."""
    phone = None if user_id is not None and not contact else contact
    return Message(
        company,
        Party(company.id, channel, phone, user_id),
        external_id,
        direction,
        "text",
        body,
        {},
        at,
        f"New message from {contact or user_id}",
        referral=referral,
    )


def test_bumps_take_the_latest_new_message_and_count_new_inbound_ones() -> None:
    a, b = _by_phone("4915"), _by_phone("4916")
    messages = [
        _message("w1", 10),
        _message("w2", 30, body="z" * 300),
        _message("w3", 30, direction="outbound", body="later among equals"),
        _message("w4", 20),
        _message("w5", 5, contact="4916"),
        _message("old", 99, contact="4916"),  # already stored: neither bumps nor notifies
    ]
    rows = RowSet(messages=messages)
    unique = rows.unique_messages()
    inserted = {(7, "w1"): 1, (7, "w2"): 2, (7, "w3"): 3, (7, "w4"): 4, (7, "w5"): 5}
    bumps, notify = bumps_and_notifications(unique.values(), inserted, {a: 100, b: 200})
    assert bumps == [
        {
            "conversation_id": 100,
            "message_id": 3,
            "at": 30,
            "preview": "later among equals",
            "inbound": 3,
            "referral": None,
        },
        {"conversation_id": 200, "message_id": 5, "at": 5, "preview": "hi", "inbound": 1, "referral": None},
    ]
    assert [(n["message_id"], n["conversation_id"]) for n in notify] == [
        (1, 100),
        (2, 100),
        (4, 100),
        (5, 200),
    ]
    assert notify[1]["body"] == clip("z" * 300) and notify[1]["title"] == "New message from 4915"


def test_auto_replies_due() -> None:
    welcome_conv, old_conv, fb_conv = _by_phone("4915"), _by_phone("4916"), _by_phone("2471", "messenger")
    conversations = {welcome_conv: 1, old_conv: 2, fb_conv: 3}
    phones = {welcome_conv: "4915", old_conv: "4916", fb_conv: "2471"}
    first = _message("w1", OPEN_AT)
    copy = _message("w1", OPEN_AT)  # the same message twice in the batch
    second = _message("w2", OPEN_AT + 60)
    closed_1, closed_2 = (
        _message("w3", CLOSED_AT, contact="4916"),
        _message("w4", CLOSED_AT + 60, contact="4916"),
    )
    replayed = _message("w0", OPEN_AT, contact="4916")  # stored before: its conversation's pending replies
    echo = _message("w5", OPEN_AT, direction="outbound")
    messenger = _message("m1", CLOSED_AT, contact="2471", channel="messenger")
    messages = [first, copy, second, closed_1, closed_2, replayed, echo, messenger]
    rows = RowSet(messages=messages)
    unique = rows.unique_messages()
    inserted = {(7, k): i for i, k in enumerate(["w1", "w2", "w3", "w4", "w5", "m1"])}
    due, redelivered = replies_due(messages, unique, inserted, conversations, {1, 3}, phones)
    assert [(d.conversation_id, d.kind, d.window, d.text, d.message.external_id, d.to) for d in due] == [
        (1, "welcome", "conversation", "Welcome!", "w1", "4915"),
        (2, "away", "2023-11-14", "We are closed.", "w3", "4916"),
    ]
    # The batch's second copy of w1 is a redelivery; so is w0.
    assert {c: m.external_id for c, m in redelivered.items()} == {1: "w1", 2: "w0"}
    # Outside hours a new conversation gets the away reply, not both.
    [only] = replies_due([closed_1], {(7, "w3"): closed_1}, {(7, "w3"): 9}, conversations, {2}, phones)[0]
    assert only.kind == "away"
    # A company without auto-replies: nothing due, nothing to resend.
    quiet = _message("q", CLOSED_AT, company=QUIET)
    assert replies_due([quiet], {(7, "q"): quiet}, {}, {welcome_conv: 1}, {1}, phones) == ([], {})


# ============================================================================================
# Who a record is about: WhatsApp users by business-scoped user id (BSUID) and/or phone number.

MARIA, BRUNO = "US.13491208655302741918", "BR.1502576394655843"  # BSUIDs
NEW_MARIA = "US.99887766554433221100"  # Maria's BSUID after a change
PARENT = "US.ENT.11815799212886844830"
PHONE, NEW_PHONE = "4917600000001", "4917600000009"


def _card(
    *,
    wa_id: str | None = None,
    user_id: str | None = None,
    name: str | None = None,
    username: str | None = None,
    parent: str | None = None,
) -> dict[str, Any]:
    """A change's contact card as Meta sends it, with only the fields given."""
    card: dict[str, Any] = {
        k: v for k, v in (("wa_id", wa_id), ("user_id", user_id), ("parent_user_id", parent)) if v is not None
    }
    profile = {k: v for k, v in (("name", name), ("username", username)) if v is not None}
    if profile:
        card["profile"] = profile
    return card


def _msg(
    wamid: str,
    *,
    phone: str | None = None,
    user_id: str | None = None,
    parent: str | None = None,
    at: int = OPEN_AT,
    kind: str = "text",
    part: Any = None,
    **fields: Any,
) -> dict[str, Any]:
    """A WhatsApp message of `kind` (its part `part`), naming its sender only by what is given."""
    message: dict[str, Any] = {"id": wamid, "timestamp": str(at), "type": kind}
    message[kind] = {"body": "hi"} if part is None and kind == "text" else part
    for key, value in (("from", phone), ("from_user_id", user_id), ("from_parent_user_id", parent)):
        if value is not None:
            message[key] = value
    return message | fields


def _value(messages: Any = (), statuses: Any = (), contacts: Any = ()) -> dict[str, Any]:
    """The value of a WhatsApp change (of business number 1065), its arrays only where given."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "1555", "phone_number_id": "1065"},
    }
    for key, part in (("contacts", contacts), ("messages", messages), ("statuses", statuses)):
        if part:
            value[key] = list(part)
    return value


def _ingested(*values: dict[str, Any], field_: str = "messages") -> list[WebhookRecord]:
    """The records ingest makes of WhatsApp changes of `field_` with these values."""
    return _records(
        *(
            {"object": WHATSAPP_OBJECT, "entry": [{"id": "1022", "changes": [{"field": field_, "value": v}]}]}
            for v in values
        )
    )


def test_a_username_user_without_a_phone_is_a_party_by_their_business_scoped_id() -> None:
    value = _value(
        [_msg("wamid.1", user_id=MARIA)], contacts=[_card(user_id=MARIA, name="Maria", username="@maria")]
    )
    rows = to_rows(_ingested(value), COMPANIES)
    assert rows.poison == []
    maria = Party(7, "whatsapp", None, MARIA, "@maria", None, "Maria")
    [message] = rows.messages
    assert (message.party, message.contact, message.title) == (
        maria,
        (7, "whatsapp", "u:" + MARIA),
        "New message from Maria",
    )
    assert rows.contacts() == {_by_user_id(MARIA): maria}
    assert contact_rows(rows.contacts()) == [
        {
            "company_id": 7,
            "channel": "whatsapp",
            "phone": None,
            "user_id": MARIA,
            "username": "@maria",
            "parent_user_id": None,
            "name": "Maria",
            "n": 0,
        }
    ]


def test_a_user_without_a_profile_name_is_titled_by_their_username_else_their_id() -> None:
    nameless = _value([_msg("wamid.1", user_id=MARIA)], contacts=[_card(user_id=MARIA, username="@maria")])
    bare = _value([_msg("wamid.2", user_id=BRUNO)])
    rows = to_rows(_ingested(nameless, bare), COMPANIES)
    assert [(m.party, m.title) for m in rows.messages] == [
        (Party(7, "whatsapp", None, MARIA, "@maria"), "New message from @maria"),
        (Party(7, "whatsapp", None, BRUNO, None), f"New message from {BRUNO}"),
    ]


@pytest.mark.parametrize(
    "own",
    [{"phone": PHONE, "user_id": MARIA}, {"phone": PHONE}, {"user_id": MARIA}],
    ids=["both", "phone only", "bsuid only"],
)
def test_a_user_with_a_phone_and_a_business_scoped_id_is_one_party_whichever_the_message_names(
    own: dict[str, Any],
) -> None:
    # Keyed by the BSUID, phone kept: what the message leaves out, its contact card completes.
    value = _value(
        [_msg("wamid.1", parent=PARENT, **own)],
        contacts=[_card(wa_id=PHONE, user_id=MARIA, name="Maria", username="@maria")],
    )
    [message] = to_rows(_ingested(value), COMPANIES).messages
    assert message.party == Party(7, "whatsapp", PHONE, MARIA, "@maria", PARENT, "Maria")
    assert message.contact == _by_user_id(MARIA)


@pytest.mark.parametrize("phone", [None, ""], ids=["left out", "empty"])
def test_a_phone_meta_leaves_out_or_sends_empty_is_no_phone(phone: str | None) -> None:
    message = _msg("wamid.1", user_id=MARIA)
    card = _card(user_id=MARIA, username="@maria")
    if phone is not None:
        message["from"] = card["wa_id"] = phone
    [stored] = to_rows([_raw_change(_value([message], contacts=[card]))], COMPANIES).messages
    assert stored.party == Party(7, "whatsapp", None, MARIA, "@maria")
    assert stored.contact == _by_user_id(MARIA)


def test_two_username_users_of_one_business_number_are_two_parties() -> None:
    value = _value(
        [_msg("wamid.1", user_id=MARIA), _msg("wamid.2", user_id=BRUNO), _msg("wamid.3", user_id=MARIA)],
        contacts=[_card(user_id=MARIA, username="@maria"), _card(user_id=BRUNO, username="@bruno")],
    )
    # As Meta sends the change, and as ingest splits it (each message with its sender's card).
    for records in ([_raw_change(value)], _ingested(value)):
        rows = to_rows(records, COMPANIES)
        assert [(m.external_id, m.contact, m.party.username) for m in rows.messages] == [
            ("wamid.1", _by_user_id(MARIA), "@maria"),
            ("wamid.2", _by_user_id(BRUNO), "@bruno"),
            ("wamid.3", _by_user_id(MARIA), "@maria"),
        ]
        # Sorted by key ("u:BR..." before "u:US..."), `n` their place.
        assert [(r["user_id"], r["username"], r["phone"], r["n"]) for r in contact_rows(rows.contacts())] == [
            (BRUNO, "@bruno", None, 0),
            (MARIA, "@maria", None, 1),
        ]


def test_a_party_takes_the_card_of_its_business_scoped_id_before_one_of_its_phone() -> None:
    # Two cards give the number (it moved from one user to another): the BSUID says whose.
    value = _value(
        [_msg("wamid.1", phone=PHONE, user_id=MARIA)],
        contacts=[
            _card(wa_id=PHONE, user_id=BRUNO, name="Bruno", username="@bruno"),
            _card(wa_id=PHONE, user_id=MARIA, name="Maria"),
        ],
    )
    [message] = to_rows([_raw_change(value)], COMPANIES).messages
    assert message.party == Party(7, "whatsapp", PHONE, MARIA, None, None, "Maria")


def test_a_partys_values_merge_across_the_batch_the_later_given_winning_and_none_erasing() -> None:
    first = _value(
        [_msg("wamid.1", phone=PHONE, user_id=MARIA)],
        contacts=[_card(wa_id=PHONE, user_id=MARIA, name="Maria")],
    )
    second = _value(
        [_msg("wamid.2", user_id=MARIA)],
        contacts=[_card(user_id=MARIA, name="Maria S.", username="@maria", parent=PARENT)],
    )
    third = _value([_msg("wamid.3", user_id=MARIA)])  # gives nothing more, and erases nothing
    rows = to_rows(_ingested(first, second, third), COMPANIES)
    assert rows.contacts() == {
        _by_user_id(MARIA): Party(7, "whatsapp", PHONE, MARIA, "@maria", PARENT, "Maria S.")
    }


@pytest.mark.parametrize("earlier", ["status", "reaction"])
def test_a_later_messages_username_wins_over_an_earlier_records(earlier: str) -> None:
    old_card = [_card(user_id=MARIA, name="Maria", username="@maria_old")]
    if earlier == "status":
        status = {"id": "wamid.out", "status": "read", "timestamp": str(OPEN_AT), "recipient_user_id": MARIA}
        before = _value(statuses=[status], contacts=old_card)
    else:
        reaction = _msg(
            "wamid.r", user_id=MARIA, kind="reaction", part={"message_id": "wamid.out", "emoji": "x"}
        )
        before = _value([reaction], contacts=old_card)
    after = _value(
        [_msg("wamid.1", user_id=MARIA, at=OPEN_AT + 60)],
        contacts=[_card(user_id=MARIA, name="Maria", username="@maria_new")],
    )
    rows = to_rows(_ingested(before, after), COMPANIES)
    assert rows.contacts()[_by_user_id(MARIA)].username == "@maria_new"


# -------------------------------------------------------------------------- statuses' parties


def test_a_status_finds_its_party_by_recipient_user_id_when_there_is_no_recipient_id() -> None:
    delivered = {
        "id": "wamid.out",
        "status": "delivered",
        "timestamp": str(OPEN_AT),
        "recipient_user_id": MARIA,
    }
    maria_card = _card(user_id=MARIA, name="Maria", username="@maria")
    value = _value(statuses=[delivered], contacts=[_card(user_id=BRUNO, username="@bruno"), maria_card])
    [record] = _ingested(value)
    assert record.payload["contacts"] == [maria_card]  # its own card travels with it
    rows = to_rows([record], COMPANIES)
    [status] = rows.statuses
    assert status.party == Party(7, "whatsapp", None, MARIA, "@maria", None, "Maria")
    assert status_rows(rows.statuses, {_by_user_id(MARIA): 3}) == [
        {
            "company_id": 7,
            "conversation_id": 3,
            "external_id": "wamid.out",
            "status": "delivered",
            "rank": 2,
            "at": OPEN_AT,
            "error": None,
            "sent_at": OPEN_AT,
        }
    ]


def test_a_failed_status_without_contacts_still_finds_its_party_and_keeps_its_errors() -> None:
    # Meta leaves the contacts out of a failed status (and its recipient_user_id, if it was sent
    # to a phone number).
    errors = [{"code": 131026, "title": "Message undeliverable"}]
    to_phone = {
        "id": "wamid.a",
        "status": "failed",
        "timestamp": "1",
        "recipient_id": PHONE,
        "errors": errors,
    }
    to_user = {
        "id": "wamid.b",
        "status": "failed",
        "timestamp": "2",
        "recipient_user_id": MARIA,
        "errors": errors,
    }
    rows = to_rows(_ingested(_value(statuses=[to_phone, to_user])), COMPANIES)
    assert rows.poison == [] and rows.events == []
    assert [(s.external_id, s.party, s.contact, s.state, s.rank, s.error) for s in rows.statuses] == [
        ("wamid.a", Party(7, "whatsapp", PHONE, None), _by_phone(PHONE), "failed", 9, errors),
        ("wamid.b", Party(7, "whatsapp", None, MARIA), _by_user_id(MARIA), "failed", 9, errors),
    ]


@pytest.mark.parametrize("name", ["recipient_parent_user_id", "parent_recipient_user_id", "parent_user_id"])
def test_a_statuses_parent_business_scoped_id_is_read_under_each_of_its_names(name: str) -> None:
    status = {"id": "wamid.out", "status": "read", "timestamp": "1", "recipient_user_id": MARIA, name: PARENT}
    [stored] = to_rows([_raw_change(_value(statuses=[status]))], COMPANIES).statuses
    assert stored.party == Party(7, "whatsapp", None, MARIA, None, PARENT)


def test_a_messages_parent_business_scoped_id_is_its_own_else_its_cards() -> None:
    own = _msg("wamid.1", user_id=MARIA, parent=PARENT)
    carded = _msg("wamid.2", user_id=BRUNO)
    value = _value(
        [own, carded],
        contacts=[_card(user_id=MARIA, parent="US.ENT.1"), _card(user_id=BRUNO, parent="BR.ENT.2")],
    )
    rows = to_rows([_raw_change(value)], COMPANIES)
    assert [m.party.parent_user_id for m in rows.messages] == [PARENT, "BR.ENT.2"]


# ------------------------------------------------------------------------------ identity changes


def _system(wamid: str, system: dict[str, Any], **sender: Any) -> dict[str, Any]:
    return _msg(wamid, kind="system", part={"body": "User Maria changed", **system}, **sender)


@pytest.mark.parametrize("new_field", ["wa_id", "new_wa_id"])
def test_a_changed_number_system_message_is_a_message_and_links_the_old_number_to_the_new(
    new_field: str,
) -> None:
    message = _system("wamid.sys", {"type": "user_changed_number", new_field: NEW_PHONE}, phone=PHONE)
    rows = to_rows(_ingested(_value([message])), COMPANIES)
    # Filed under the new number: once the change is applied, the old one names no contact.
    assert [(m.kind, m.body, m.contact) for m in rows.messages] == [
        ("system", "User Maria changed", _by_phone(NEW_PHONE))
    ]
    assert rows.id_changes == [IdChange(7, None, None, PHONE, NEW_PHONE, None)]
    assert id_change_rows(rows.id_changes) == [
        {
            "company_id": 7,
            "channel": "whatsapp",
            "old_user_id": None,
            "new_user_id": None,
            "old_phone": PHONE,
            "new_phone": NEW_PHONE,
            "parent_user_id": None,
        }
    ]


def test_a_changed_number_with_a_new_business_scoped_id_links_both() -> None:
    system = {
        "type": "user_changed_number",
        "wa_id": NEW_PHONE,
        "user_id": NEW_MARIA,
        "previous_user_id": MARIA,
        "parent_user_id": PARENT,
    }
    message = _system("wamid.sys", system, phone=PHONE, user_id=MARIA)
    rows = to_rows([_raw_change(_value([message]))], COMPANIES)
    assert rows.id_changes == [IdChange(7, MARIA, NEW_MARIA, PHONE, NEW_PHONE, PARENT)]
    assert [m.party for m in rows.messages] == [
        Party(7, "whatsapp", NEW_PHONE, NEW_MARIA, parent_user_id=PARENT, name=None)
    ]


def test_a_changed_user_id_system_message_links_the_old_business_scoped_id_to_the_new() -> None:
    system = {"type": "user_changed_user_id", "user_id": NEW_MARIA, "previous_user_id": MARIA}
    message = _system("wamid.sys", system, user_id=MARIA)
    rows = to_rows(_ingested(_value([message])), COMPANIES)
    assert [m.kind for m in rows.messages] == ["system"]
    assert rows.id_changes == [IdChange(7, MARIA, NEW_MARIA, None, None, None)]


@pytest.mark.parametrize(
    "system",
    [
        {"type": "customer_identity_changed", "identity": "abc"},  # a safety-number change
        {"type": "user_changed_number", "wa_id": PHONE},  # the number it already has
        {"type": "user_changed_number"},  # no new number given
        {"type": "user_changed_user_id", "user_id": MARIA, "previous_user_id": MARIA},
    ],
)
def test_a_system_message_that_changes_no_id_is_only_a_message(system: dict[str, Any]) -> None:
    rows = to_rows([_raw_change(_value([_system("wamid.sys", system, phone=PHONE)]))], COMPANIES)
    assert [m.kind for m in rows.messages] == ["system"]
    assert rows.id_changes == []


def test_a_number_change_in_the_older_form_links_the_old_number_to_the_new_too() -> None:
    system = {"type": "customer_changed_number", "new_wa_id": NEW_PHONE, "wa_id": NEW_PHONE}
    rows = to_rows([_raw_change(_value([_system("wamid.sys", system, phone=PHONE)]))], COMPANIES)
    assert rows.id_changes == [IdChange(7, None, None, PHONE, NEW_PHONE, None)]


def _user_id_update(*updates: Any) -> dict[str, Any]:
    value = _value()
    value["user_id_update"] = list(updates)
    return value


def test_a_user_id_update_links_each_previous_id_to_the_current_and_is_kept_as_an_event() -> None:
    value = _user_id_update(
        {
            "wa_id": PHONE,
            "user_id": {"previous": MARIA, "current": NEW_MARIA},
            "parent_user_id": {"previous": PARENT, "current": "US.ENT.2"},
        },
        {"user_id": {"previous": "BR.1", "current": BRUNO}},
    )
    records = _ingested(value, value, field_="user_id_update")  # the second a redelivery
    rows = to_rows(records, COMPANIES)
    assert rows.poison == [] and rows.messages == []
    assert (
        rows.id_changes
        == [
            IdChange(7, MARIA, NEW_MARIA, None, PHONE, "US.ENT.2"),
            IdChange(7, "BR.1", BRUNO, None, None, None),
        ]
        * 2
    )
    assert [(e.object, e.field, e.payload) for e in rows.events] == [
        (WHATSAPP_OBJECT, "user_id_update", value)
    ] * 2
    assert len(event_rows(rows.events)) == 1  # kept once


def test_a_user_id_update_is_kept_under_the_key_other_changes_are_kept_under() -> None:
    value = _user_id_update({"user_id": {"previous": MARIA, "current": NEW_MARIA}})
    [record] = _ingested(value, field_="user_id_update")
    [event] = to_rows([record], COMPANIES).events
    assert event.key == event_key(WHATSAPP_OBJECT, "1022", "user_id_update", value)


@pytest.mark.parametrize(
    ("update", "error"),
    [
        ({"user_id": {"current": NEW_MARIA}}, "user_id_update without both ids"),
        ({"user_id": {"previous": MARIA}}, "user_id_update without both ids"),
        ({"user_id": {"previous": "", "current": NEW_MARIA}}, "user_id_update without both ids"),
        ({"user_id": {"previous": MARIA, "current": None}}, "user_id_update without both ids"),
        ({"wa_id": PHONE}, "user_id_update without user_id"),
        ("US.1", "user_id_update without user_id"),
    ],
)
def test_a_user_id_update_without_both_ids_is_poison(update: Any, error: str) -> None:
    rows = to_rows(_ingested(_user_id_update(update), field_="user_id_update"), COMPANIES)
    [(index, exc)] = rows.poison
    assert index == 0 and str(exc) == error
    assert _nothing_of(rows)


# ---------------------------------------------------------------------------------- reactions


def _reaction(
    wamid: str, emoji: str | None, *, target: str = "wamid.out", at: int = OPEN_AT, **who: Any
) -> dict[str, Any]:
    part = {"message_id": target} if emoji is None else {"message_id": target, "emoji": emoji}
    return _msg(wamid, kind="reaction", part=part, at=at, **who)


def test_a_whatsapp_reaction_is_a_reaction_to_its_message_not_a_message() -> None:
    value = _value(
        [_reaction("wamid.r", "\N{THUMBS UP SIGN}", phone=PHONE)], contacts=[_card(wa_id=PHONE, name="Ana")]
    )
    rows = to_rows(_ingested(value), COMPANIES)
    assert rows.poison == [] and rows.messages == [] and rows.amendments == []
    ana = Party(7, "whatsapp", PHONE, None, name="Ana")
    assert rows.reactions == [Reaction(7, ana, "wamid.r", "wamid.out", "\N{THUMBS UP SIGN}", OPEN_AT)]
    assert rows.contacts() == {_by_phone(PHONE): ana}  # a contact like any other
    assert reaction_rows(rows.reactions, {_by_phone(PHONE): 11}) == [
        {
            "company_id": 7,
            "contact_id": 11,
            "external_id": "wamid.r",
            "target": "wamid.out",
            "emoji": "\N{THUMBS UP SIGN}",
            "at": OPEN_AT,
        }
    ]


@pytest.mark.parametrize("emoji", [None, ""], ids=["left out", "empty"])
def test_a_reaction_without_an_emoji_removes_the_partys_reaction(emoji: str | None) -> None:
    rows = to_rows([_raw_change(_value([_reaction("wamid.r", emoji, user_id=MARIA)]))], COMPANIES)
    assert rows.messages == []
    [removal] = rows.reactions
    assert (removal.party, removal.target, removal.emoji) == (
        Party(7, "whatsapp", None, MARIA),
        "wamid.out",
        None,
    )


def test_the_latest_reaction_of_a_party_to_a_message_is_the_one_kept() -> None:
    # Out of order in the batch (neither first nor last wins as such): by time, and among equal
    # times by the later id.
    reactions = [
        _reaction("wamid.r1", "a", at=OPEN_AT + 10, phone=PHONE),
        _reaction("wamid.r3", None, at=OPEN_AT + 30, phone=PHONE),  # the removal is the latest
        _reaction("wamid.r2", "b", at=OPEN_AT + 20, phone=PHONE),
        _reaction("wamid.rA", "c", target="wamid.other", at=OPEN_AT + 40, phone=PHONE),
        _reaction("wamid.rB", "d", target="wamid.other", at=OPEN_AT + 40, phone=PHONE),
        _reaction("wamid.r0", "e", target="wamid.other", at=OPEN_AT + 5, phone=PHONE),
    ]
    rows = to_rows([_raw_change(_value(reactions))], COMPANIES)
    assert len(rows.reactions) == 6
    got = reaction_rows(rows.reactions, {_by_phone(PHONE): 11})
    assert [(r["target"], r["contact_id"], r["external_id"], r["emoji"], r["at"]) for r in got] == [
        ("wamid.other", 11, "wamid.rB", "d", OPEN_AT + 40),
        ("wamid.out", 11, "wamid.r3", None, OPEN_AT + 30),
    ]


def test_two_parties_reacting_to_one_message_keep_a_reaction_each() -> None:
    value = _value(
        [_reaction("wamid.r1", "a", phone=PHONE), _reaction("wamid.r2", "b", at=OPEN_AT - 5, user_id=MARIA)]
    )
    rows = to_rows(_ingested(value), COMPANIES)
    got = reaction_rows(rows.reactions, {_by_phone(PHONE): 11, _by_user_id(MARIA): 12})
    assert [(r["contact_id"], r["external_id"], r["emoji"]) for r in got] == [
        (11, "wamid.r1", "a"),
        (12, "wamid.r2", "b"),
    ]


def test_two_names_of_one_contact_keep_one_reaction_the_latest() -> None:
    # The same user, by phone in one record and by BSUID in the next: one contact.
    value = _value(
        [_reaction("wamid.r1", "a", phone=PHONE), _reaction("wamid.r2", "b", at=OPEN_AT + 1, user_id=MARIA)]
    )
    rows = to_rows([_raw_change(value)], COMPANIES)
    got = reaction_rows(rows.reactions, {_by_phone(PHONE): 11, _by_user_id(MARIA): 11})
    assert [(r["contact_id"], r["external_id"], r["emoji"]) for r in got] == [(11, "wamid.r2", "b")]


def test_messenger_and_instagram_reactions_are_set_and_unreacted() -> None:
    def event(sender: str, page: str, at_ms: int, reaction: dict[str, Any]) -> dict[str, Any]:
        return {"sender": {"id": sender}, "recipient": {"id": page}, "timestamp": at_ms, "reaction": reaction}

    heart = {"mid": "m_out", "action": "react", "emoji": "\u2764", "reaction": "love"}
    unheart = {"mid": "m_out", "action": "unreact", "emoji": "\u2764", "reaction": "love"}
    wow = {"mid": "ig_out", "action": "react", "emoji": "\N{FACE WITH OPEN MOUTH}", "reaction": "wow"}
    records = [
        *_records(
            messenger_envelope(
                [
                    event("2471", PAGE, 1_700_000_000_000, heart),
                    event("2471", PAGE, 1_700_000_001_000, unheart),
                ],
                page_id=PAGE,
            )
        ),
        *_records(
            messenger_envelope(
                [event("9001", "1784", 1_700_000_002_000, wow)], page_id="1784", object_="instagram"
            )
        ),
    ]
    rows = to_rows(records, COMPANIES)
    assert rows.poison == [] and rows.messages == [] and rows.events == []
    assert [(r.party, r.target, r.emoji, r.at) for r in rows.reactions] == [
        (Party(7, "messenger", "2471", None), "m_out", "\u2764", 1_700_000_000.0),
        (Party(7, "messenger", "2471", None), "m_out", None, 1_700_000_001.0),
        (Party(7, "instagram", "9001", None), "ig_out", "\N{FACE WITH OPEN MOUTH}", 1_700_000_002.0),
    ]
    got = reaction_rows(
        rows.reactions, {_by_phone("2471", "messenger"): 5, _by_phone("9001", "instagram"): 6}
    )
    assert [(r["target"], r["contact_id"], r["emoji"]) for r in got] == [
        ("ig_out", 6, "\N{FACE WITH OPEN MOUTH}"),
        ("m_out", 5, None),  # the unreact is the later
    ]


# ------------------------------------------------------------------------------ edits, revokes


def test_a_whatsapp_edit_is_an_amendment_carrying_the_new_body_not_a_message() -> None:
    text = _msg(
        "wamid.e1",
        phone=PHONE,
        kind="edit",
        part={"original_message_id": "wamid.1", "message": {"type": "text", "text": {"body": "fixed"}}},
    )
    caption = _msg(
        "wamid.e2",
        phone=PHONE,
        at=OPEN_AT + 1,
        kind="edit",
        part={"original_message_id": "wamid.2", "message": {"type": "image", "image": {"caption": "a dog"}}},
    )
    rows = to_rows(_ingested(_value([text, caption])), COMPANIES)
    assert rows.poison == [] and rows.messages == [] and rows.reactions == []
    ana = Party(7, "whatsapp", PHONE, None)
    assert rows.amendments == [
        Amendment(7, ana, "wamid.e1", "wamid.1", "edit", "fixed", text, OPEN_AT),
        Amendment(7, ana, "wamid.e2", "wamid.2", "edit", "a dog", caption, OPEN_AT + 1),
    ]


def test_a_whatsapp_revoke_is_an_amendment_without_a_body_not_a_message() -> None:
    revoke = _msg("wamid.v", user_id=MARIA, kind="revoke", part={"original_message_id": "wamid.1"})
    rows = to_rows(_ingested(_value([revoke])), COMPANIES)
    assert rows.messages == []
    assert rows.amendments == [
        Amendment(7, Party(7, "whatsapp", None, MARIA), "wamid.v", "wamid.1", "revoke", None, revoke, OPEN_AT)
    ]


def test_a_messenger_edit_and_an_instagram_unsend_are_amendments_not_messages() -> None:
    edit = {
        "sender": {"id": "2471"},
        "recipient": {"id": PAGE},
        "timestamp": 1_700_000_000_000,
        "message_edit": {"mid": "m_1", "text": "fixed", "num_edit": 2},
    }
    unsend = {
        "sender": {"id": "9001"},
        "recipient": {"id": "1784"},
        "timestamp": 1_700_000_001_000,
        "message": {"mid": "ig_1", "is_deleted": True},
    }
    rows = to_rows([_messaging(edit), _messaging(unsend, "instagram")], COMPANIES)
    assert rows.poison == [] and rows.messages == [] and rows.events == []
    assert rows.amendments == [
        Amendment(
            7,
            Party(7, "messenger", "2471", None),
            "m_1:edit:2",
            "m_1",
            "edit",
            "fixed",
            edit,
            1_700_000_000.0,
        ),
        Amendment(
            7,
            Party(7, "instagram", "9001", None),
            "ig_1:revoke",
            "ig_1",
            "revoke",
            None,
            unsend,
            1_700_000_001.0,
        ),
    ]


def test_each_amendment_is_kept_once_by_its_own_id() -> None:
    edit = _msg(
        "wamid.e",
        phone=PHONE,
        kind="edit",
        part={"original_message_id": "wamid.1", "message": {"type": "text", "text": {"body": "v2"}}},
    )
    revoke = _msg("wamid.v", phone=PHONE, kind="revoke", part={"original_message_id": "wamid.1"})
    rows = to_rows(_ingested(_value([revoke, edit]), _value([edit])), COMPANIES)  # the edit redelivered
    assert len(rows.amendments) == 3
    assert amendment_rows(rows.amendments) == [
        {
            "company_id": 7,
            "external_id": "wamid.e",
            "target": "wamid.1",
            "kind": "edit",
            "body": "v2",
            "content": edit,
            "at": OPEN_AT,
        },
        {
            "company_id": 7,
            "external_id": "wamid.v",
            "target": "wamid.1",
            "kind": "revoke",
            "body": None,
            "content": revoke,
            "at": OPEN_AT,
        },
    ]


@pytest.mark.parametrize(
    ("record", "error"),
    [
        (
            _raw_change({"messages": [_reaction("w", "a", target="", phone=PHONE)]}),
            "names no message (message_id)",
        ),
        (
            _raw_change({"messages": [_msg("w", phone=PHONE, kind="reaction", part=None)]}),
            "names no message (message_id)",
        ),
        (
            _raw_change({"messages": [_msg("w", phone=PHONE, kind="edit", part={"message": {}})]}),
            "names no message (original_message_id)",
        ),
        (
            _raw_change({"messages": [_msg("w", phone=PHONE, kind="revoke", part="wamid.1")]}),
            "names no message (original_message_id)",
        ),
        (
            _messaging(
                {"sender": {"id": "9"}, "timestamp": 1, "reaction": {"action": "react", "emoji": "a"}}
            ),
            "names no message (mid)",
        ),
        (
            _messaging({"sender": {"id": "9"}, "timestamp": 1, "message_edit": {"text": "x"}}),
            "names no message (mid)",
        ),
        (
            _messaging({"sender": {"id": ""}, "timestamp": 1, "reaction": {"mid": "m", "emoji": "a"}}),
            "update names no contact",
        ),
        (
            _messaging({"timestamp": 1, "message": {"mid": "m", "is_deleted": True}}, "instagram"),
            "update names no contact",
        ),
    ],
    ids=[
        "reaction target empty",
        "reaction part missing",
        "edit without original",
        "revoke not an object",
        "messenger reaction without mid",
        "messenger edit without mid",
        "messenger reaction by no one",
        "instagram unsend by no one",
    ],
)
def test_a_reaction_or_amendment_naming_no_message_or_no_one_is_poison(
    record: WebhookRecord, error: str
) -> None:
    rows = to_rows([record], COMPANIES)
    [(_, exc)] = rows.poison
    assert str(exc) == error
    assert _nothing_of(rows)


def test_reactions_edits_and_revokes_bump_no_conversation_notify_no_one_and_get_no_auto_reply() -> None:
    whatsapp = _value(
        [
            _reaction("wamid.r", "a", phone=PHONE),
            _msg(
                "wamid.e",
                user_id=MARIA,
                kind="edit",
                part={"original_message_id": "wamid.1", "message": {"type": "text", "text": {"body": "x"}}},
            ),
            _msg("wamid.v", phone=PHONE, kind="revoke", part={"original_message_id": "wamid.2"}),
        ]
    )
    messenger = [
        {"sender": {"id": "2471"}, "timestamp": 1, "reaction": {"mid": "m", "action": "react", "emoji": "a"}},
        {"sender": {"id": "2471"}, "timestamp": 1, "message_edit": {"mid": "m", "text": "x", "num_edit": 1}},
    ]
    records = [*_ingested(whatsapp), *(_messaging(e) for e in messenger)]
    rows = to_rows(records, COMPANIES)
    assert rows.poison == [] and (len(rows.reactions), len(rows.amendments)) == (2, 3)
    assert rows.messages == []
    # Every party a new conversation, every message the database could answer for inserted:
    # still nothing to bump, notify or answer (ACME has both auto-replies).
    conversations = {k: i for i, k in enumerate(sorted(rows.contacts()), 1)}
    phones: dict[ContactKey, str | None] = dict.fromkeys(conversations, PHONE)
    unique = rows.unique_messages()
    inserted = {k: i for i, k in enumerate(unique, 1)}
    assert bumps_and_notifications(unique.values(), inserted, conversations) == ([], [])
    assert replies_due(
        rows.messages, unique, inserted, conversations, set(conversations.values()), phones
    ) == ([], {})


# ------------------------------------------------------------------ messages as WhatsApp shows them


def test_a_reply_keeps_the_id_of_the_message_it_quotes() -> None:
    reply = _msg("wamid.2", phone=PHONE, context={"from": "1555", "id": "wamid.out"})
    plain = _msg("wamid.3", phone=PHONE)
    messenger = {
        "sender": {"id": "2471"},
        "recipient": {"id": PAGE},
        "timestamp": 1_700_000_000_000,
        "message": {"mid": "m_2", "text": "yes", "reply_to": {"mid": "m_out"}},
    }
    rows = to_rows([*_ingested(_value([reply, plain])), _messaging(messenger)], COMPANIES)
    assert [(m.external_id, m.reply_to, m.forwarded) for m in rows.messages] == [
        ("wamid.2", "wamid.out", False),
        ("wamid.3", None, False),
        ("m_2", "m_out", False),
    ]


@pytest.mark.parametrize("flag", ["forwarded", "frequently_forwarded"])
def test_a_forwarded_message_is_marked_forwarded_and_quotes_nothing(flag: str) -> None:
    message = _msg("wamid.2", phone=PHONE, context={flag: True})
    quoting = _msg("wamid.3", phone=PHONE, context={flag: True, "id": "wamid.elsewhere"})
    rows = to_rows([_raw_change(_value([message, quoting]))], COMPANIES)
    assert [(m.forwarded, m.reply_to) for m in rows.messages] == [(True, None), (True, None)]


REFERRAL = {
    "source_url": "https://fb.me/3cr4Wqqkv",
    "source_id": "120",
    "source_type": "ad",
    "headline": "Spring sale",
    "body": "Up to 50% off",
    "media_type": "image",
    "image_url": "https://scontent.xx.fbcdn.net/x.jpg",
    "ctwa_clid": "ARAkLkA8rmlFeiCktEJQ",
}


def test_a_click_to_whatsapp_referral_is_kept_and_carried_to_its_conversations_bump() -> None:
    other = REFERRAL | {"source_id": "121", "headline": "Summer sale"}
    messages = [
        _msg("wamid.1", phone=PHONE, at=OPEN_AT),
        _msg("wamid.2", phone=PHONE, at=OPEN_AT + 1, referral=REFERRAL),
        _msg("wamid.3", phone=PHONE, at=OPEN_AT + 2, referral=other),
    ]
    rows = to_rows(_ingested(_value(messages)), COMPANIES)
    conversations = {_by_phone(PHONE): 40}
    unique = rows.unique_messages()
    assert [r["referral"] for r in message_rows(unique.values(), conversations)] == [None, REFERRAL, other]
    # The first new message that has one gives the conversation its referral.
    all_new = {(7, "wamid.1"): 1, (7, "wamid.2"): 2, (7, "wamid.3"): 3}
    [bump], _ = bumps_and_notifications(unique.values(), all_new, conversations)
    assert (bump["message_id"], bump["referral"]) == (3, REFERRAL)
    # wamid.2 stored before: the next new one's.
    [bump], _ = bumps_and_notifications(
        unique.values(), {(7, "wamid.1"): 1, (7, "wamid.3"): 3}, conversations
    )
    assert bump["referral"] == other
    # A referral that is not an object is none.
    [odd] = to_rows([_raw_change(_value([_msg("wamid.4", phone=PHONE, referral="ad")]))], COMPANIES).messages
    assert odd.referral is None


def test_an_inbound_messages_errors_are_kept_with_it() -> None:
    errors = [{"code": 131051, "title": "Message type unknown", "error_data": {"details": "not supported"}}]
    unsupported = _msg("wamid.u", phone=PHONE, kind="unsupported", part={"type": "poll"}, errors=errors)
    plain = _msg("wamid.p", phone=PHONE)
    rows = to_rows(_ingested(_value([unsupported, plain])), COMPANIES)
    got = message_rows(rows.unique_messages().values(), {_by_phone(PHONE): 40})
    assert [(r["external_id"], r["body"], r["error"]) for r in got] == [
        ("wamid.u", "[unsupported: poll]", errors),
        ("wamid.p", "hi", None),
    ]


def test_message_rows_carry_what_the_message_shows() -> None:
    message = _msg("wamid.1", phone=PHONE, user_id=MARIA, context={"id": "wamid.out"}, referral=REFERRAL)
    echo = {
        "sender": {"id": PAGE},
        "recipient": {"id": "2471"},
        "timestamp": 1_700_000_001_000,
        "message": {"mid": "m_out", "is_echo": True, "text": "Hello"},
    }
    rows = to_rows([_raw_change(_value([message])), _messaging(echo)], COMPANIES)
    got = message_rows(
        rows.unique_messages().values(), {_by_user_id(MARIA): 40, _by_phone("2471", "messenger"): 41}
    )
    assert got == [
        {
            "company_id": 7,
            "conversation_id": 40,
            "external_id": "wamid.1",
            "direction": "inbound",
            "kind": "text",
            "body": "hi",
            "content": message,
            "status": "received",
            "rank": STATUS_RANK["received"],
            "at": OPEN_AT,
            "reply_to": "wamid.out",
            "forwarded": False,
            "referral": REFERRAL,
            "error": None,
        },
        {
            "company_id": 7,
            "conversation_id": 41,
            "external_id": "m_out",
            "direction": "outbound",
            "kind": "text",
            "body": "Hello",
            "content": echo,
            "status": "sent",
            "rank": STATUS_RANK["sent"],
            "at": 1_700_000_001.0,
            "reply_to": None,
            "forwarded": False,
            "referral": None,
            "error": None,
        },
    ]


# ------------------------------------------------------------ contacts and conversations, by key


def test_contact_rows_are_sorted_by_key_and_numbered_by_place() -> None:
    parties = {
        _by_user_id(MARIA): Party(7, "whatsapp", PHONE, MARIA, "@maria", PARENT, "Maria"),
        _by_phone("2471", "messenger"): Party(7, "messenger", "2471", None),
        _by_phone(NEW_PHONE): Party(7, "whatsapp", NEW_PHONE, None, name="Ana"),
    }
    got = contact_rows(parties)
    assert [(r["channel"], r["phone"], r["user_id"], r["n"]) for r in got] == [
        ("messenger", "2471", None, 0),
        ("whatsapp", NEW_PHONE, None, 1),  # "p:..." before "u:..."
        ("whatsapp", PHONE, MARIA, 2),
    ]
    assert (got[2]["username"], got[2]["parent_user_id"], got[2]["name"]) == ("@maria", PARENT, "Maria")


def test_two_names_of_one_contact_make_one_conversation() -> None:
    messenger = _by_phone("2471", "messenger")
    keys = [_by_phone(PHONE), _by_user_id(MARIA), _by_user_id(BRUNO), messenger]
    contact_ids = {_by_phone(PHONE): 12, _by_user_id(MARIA): 12, _by_user_id(BRUNO): 5, messenger: 9}
    assert conversation_rows(keys, contact_ids) == [
        {"company_id": 7, "contact_id": 5, "channel": "whatsapp"},
        {"company_id": 7, "contact_id": 9, "channel": "messenger"},
        {"company_id": 7, "contact_id": 12, "channel": "whatsapp"},
    ]


def test_a_party_without_a_known_phone_gets_no_auto_reply() -> None:
    # WUZAPI sends to numbers only: a username user with no number known gets none (and a
    # redelivery of theirs has nothing to send again); one whose contact has a number, through
    # an earlier message or the contact book, gets it there.
    username = _message("w1", OPEN_AT, contact="", user_id=MARIA)
    replayed = _message("w0", OPEN_AT, contact="", user_id=MARIA)
    known = _message("w2", CLOSED_AT, contact="", user_id=BRUNO)
    unlisted = _message("w3", CLOSED_AT, contact="4915")  # no answer at all for its key
    messages = [username, replayed, known, unlisted]
    unique = RowSet(messages=messages).unique_messages()
    inserted = {(7, "w1"): 1, (7, "w2"): 2, (7, "w3"): 3}
    conversations = {_by_user_id(MARIA): 1, _by_user_id(BRUNO): 2, _by_phone("4915"): 3}
    phones: dict[ContactKey, str | None] = {_by_user_id(MARIA): None, _by_user_id(BRUNO): PHONE}
    due, redelivered = replies_due(messages, unique, inserted, conversations, {1, 2, 3}, phones)
    assert [(d.conversation_id, d.kind, d.to, d.message.external_id) for d in due] == [
        (2, "away", PHONE, "w2")
    ]
    assert redelivered == {}


# ------------------------------------------------------------------- all or nothing, still


def test_a_record_that_adds_a_reaction_an_amendment_or_an_id_change_then_fails_adds_nothing() -> None:
    no_id_status = {"status": "read", "timestamp": "1", "recipient_id": PHONE}
    changed = _system("wamid.sys", {"type": "user_changed_number", "wa_id": NEW_PHONE}, phone=PHONE)
    edit = _msg(
        "wamid.e",
        phone=PHONE,
        kind="edit",
        part={"original_message_id": "wamid.1", "message": {"type": "text", "text": {"body": "x"}}},
    )
    records = [
        _raw_change(_value([_reaction("wamid.ok", "a", phone=PHONE)])),
        _raw_change(
            _value(
                [
                    _reaction("wamid.lost", "b", phone=PHONE),
                    _msg("wamid.bad", phone=PHONE, kind="edit", part={}),
                ]
            )
        ),
        _raw_change(_value([changed, _msg("wamid.x", phone=PHONE, at=0, timestamp="x")])),
        _raw_change(_value([edit], [no_id_status])),
        WebhookRecord(
            "acme",
            WHATSAPP_OBJECT,
            "1022",
            None,
            "change",
            "user_id_update",
            _user_id_update(
                {"user_id": {"previous": MARIA, "current": NEW_MARIA}}, {"user_id": {"current": BRUNO}}
            ),
            "r",
            0,
            0,
        ),
        _raw_change(
            _value(
                [_msg("wamid.revoked", user_id=MARIA, kind="revoke", part={"original_message_id": "wamid.1"})]
            )
        ),
    ]
    rows = to_rows(records, COMPANIES)
    assert [(i, str(e)) for i, e in rows.poison] == [
        (1, "names no message (original_message_id)"),
        (2, "bad timestamp 'x'"),
        (3, "WhatsApp status without an id"),
        (4, "user_id_update without both ids"),
    ]
    assert [r.external_id for r in rows.reactions] == ["wamid.ok"]
    assert [a.external_id for a in rows.amendments] == ["wamid.revoked"]
    assert rows.id_changes == [] and rows.messages == [] and rows.events == [] and rows.statuses == []
