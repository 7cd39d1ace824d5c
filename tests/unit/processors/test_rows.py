"""Records into row sets (processors/rows.py), without Postgres: what each kind of record stands
for, the poison rules (a record is all in or all out), status ranks, bodies and previews, contact
keys and names, kept events, and the rows the writer derives from the database's answers."""

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
    Message,
    PoisonRecord,
    RowSet,
    bumps_and_notifications,
    delivered_rows,
    epoch,
    event_key,
    event_rows,
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
    return not (rows.messages or rows.statuses or rows.delivered or rows.read or rows.events)


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
            {"messages": [{"id": "w", "from": "4915", "type": "contacts", "contacts": [1]}]},
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
    assert [m.kind for m in rows.messages] == list(MESSAGE_TYPES)
    for m in rows.messages:
        assert m.body, m.kind
        assert (m.direction, m.contact) == ("inbound", (7, sender, "whatsapp"))
        assert m.title == "New message from Lena Vogel"
    by_kind = {m.kind: m for m in rows.messages}
    assert by_kind["text"].body == messages[0]["text"]["body"]
    assert rows.contacts() == {(7, sender, "whatsapp"): "Lena Vogel"}


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
        ({"type": "reaction", "reaction": {"message_id": "w"}}, "[reaction removed]"),
        ({"type": "order", "order": {"product_items": [1, 2]}}, "[order] 2 item(s)"),
        ({"type": "unsupported"}, "[unsupported]"),
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
    assert rows.contacts() == {(7, sender, "whatsapp"): "Ida K.", (7, "4915100000004", "whatsapp"): None}
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
        ("m_in", (7, "2471", "messenger"), "inbound", "text", "Hi", 1_700_000_000.0),
        ("m_out", (7, "2471", "messenger"), "outbound", "text", "Hello", 1_700_000_001.0),
        ("ig_1", (7, "9001", "instagram"), "inbound", "image", "[image]", 1_700_000_002.0),
    ]
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
    got = status_rows(rows.statuses, {(7, to, "whatsapp"): 70})
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
    assert rows.contacts() == {(7, "2471", "messenger"): None}
    assert read_rows(rows.read, {(7, "2471", "messenger"): 5}) == [
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
) -> Message:
    return Message(
        company,
        (company.id, contact, channel),
        external_id,
        direction,
        "text",
        body,
        {},
        at,
        None,
        f"New message from {contact}",
    )


def test_bumps_take_the_latest_new_message_and_count_new_inbound_ones() -> None:
    a, b = (7, "4915", "whatsapp"), (7, "4916", "whatsapp")
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
        {"conversation_id": 100, "message_id": 3, "at": 30, "preview": "later among equals", "inbound": 3},
        {"conversation_id": 200, "message_id": 5, "at": 5, "preview": "hi", "inbound": 1},
    ]
    assert [(n["message_id"], n["conversation_id"]) for n in notify] == [
        (1, 100),
        (2, 100),
        (4, 100),
        (5, 200),
    ]
    assert notify[1]["body"] == clip("z" * 300) and notify[1]["title"] == "New message from 4915"


def test_auto_replies_due() -> None:
    welcome_conv, old_conv, fb_conv = (
        (7, "4915", "whatsapp"),
        (7, "4916", "whatsapp"),
        (7, "2471", "messenger"),
    )
    conversations = {welcome_conv: 1, old_conv: 2, fb_conv: 3}
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
    due, redelivered = replies_due(messages, unique, inserted, conversations, created={1, 3})
    assert [(d.conversation_id, d.kind, d.window, d.text, d.message.external_id) for d in due] == [
        (1, "welcome", "conversation", "Welcome!", "w1"),
        (2, "away", "2023-11-14", "We are closed.", "w3"),
    ]
    # The batch's second copy of w1 is a redelivery; so is w0.
    assert {c: m.external_id for c, m in redelivered.items()} == {1: "w1", 2: "w0"}
    # Outside hours a new conversation gets the away reply, not both.
    [only] = replies_due([closed_1], {(7, "w3"): closed_1}, {(7, "w3"): 9}, conversations, created={2})[0]
    assert only.kind == "away"
    # A company without auto-replies: nothing due, nothing to resend.
    quiet = _message("q", CLOSED_AT, company=QUIET)
    assert replies_due([quiet], {(7, "q"): quiet}, {}, {(7, "4915", "whatsapp"): 1}, created={1}) == ([], {})
