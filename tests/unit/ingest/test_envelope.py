"""How ingest splits one Meta POST into topic records: one per WhatsApp message and per status,
keyed by the user (their business-scoped user id where given, else their phone number, so that
one customer's events keep their order with or without a phone), each carrying its own contact
card and everything else of its change; a user_id_update keyed by the user's new id; one per
Messenger / Instagram event, keyed by the user whichever way the event goes; one per other
change, untouched; and a budget that refuses a POST that would grow too large, before it is
built."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given

from harness.meta_samples import (
    messenger_envelope,
    messenger_message,
    wa_change,
    wa_envelope,
    wa_message,
    wa_other_change,
    wa_status,
)
from ingest import envelope as envelope_module
from ingest.envelope import Budget, OverBudget, split_envelope
from schemas.meta import EnvelopeError, validate_envelope
from schemas.records import WebhookRecord
from tests.unit.strategies import envelopes, fast, nearly_valid_envelopes, whatsapp_values

ANA, BEN, CLEO = "4917600000001", "4917600000002", "5511900000003"
RECEIVED_MS = 1_750_000_000_123


def split_raw(doc: dict[str, Any], budget: Budget = Budget()) -> list[tuple[bytes, bytes]]:
    return split_envelope(doc, tenant="acme", request_id="req-1", received_at_ms=RECEIVED_MS, budget=budget)


def split(doc: dict[str, Any], budget: Budget = Budget()) -> list[tuple[str, WebhookRecord]]:
    return [(key.decode(), WebhookRecord.from_bytes(value)) for key, value in split_raw(doc, budget)]


def text(wamid: str, sender: str, body: str = "hi") -> dict[str, Any]:
    message = wa_message("text", wamid=wamid, from_=sender, timestamp=1_750_000_000)
    message["text"] = {"body": body}
    return message


def conversation_batch() -> dict[str, Any]:
    return wa_envelope(
        [
            wa_change(
                phone_number_id="1065",
                display_phone_number="15550001",
                contacts=[(ANA, "Ana"), (BEN, "Ben")],
                messages=[text("wamid.1", ANA), text("wamid.2", BEN), text("wamid.3", ANA)],
                statuses=[wa_status("read", wamid="wamid.out", recipient_id=CLEO, timestamp=1_750_000_001)],
            )
        ],
        waba_id="1022",
    )


# --------------------------------------------------------------------------- WhatsApp


def test_each_message_and_status_is_a_record_keyed_by_its_conversation() -> None:
    records = split(conversation_batch())
    assert [key for key, _ in records] == ["acme:1065:" + who for who in (ANA, BEN, ANA, CLEO)]
    assert [r.seq for _, r in records] == [0, 1, 2, 3]
    assert [m["id"] for _, r in records[:3] for m in r.payload["messages"]] == [
        "wamid.1",
        "wamid.2",
        "wamid.3",
    ]
    assert records[3][1].payload["statuses"][0]["id"] == "wamid.out"
    for _, record in records:
        assert (record.tenant, record.object, record.entry_id, record.kind, record.field) == (
            "acme",
            "whatsapp_business_account",
            "1022",
            "change",
            "messages",
        )
        assert (record.request_id, record.received_at_ms, record.entry_time) == ("req-1", RECEIVED_MS, None)


def test_each_message_carries_only_its_senders_contact_and_the_changes_metadata() -> None:
    records = split(conversation_batch())
    ana, ben, _, status = (r.payload for _, r in records)
    assert ana["contacts"] == [{"profile": {"name": "Ana"}, "wa_id": ANA}]
    assert ben["contacts"] == [{"profile": {"name": "Ben"}, "wa_id": BEN}]
    for payload in (ana, ben, status):
        assert payload["metadata"] == {"display_phone_number": "15550001", "phone_number_id": "1065"}
        assert payload["messaging_product"] == "whatsapp"
    assert "statuses" not in ana and "messages" not in status and "contacts" not in status


def test_fields_meta_adds_later_travel_with_every_part() -> None:
    doc = conversation_batch()
    doc["entry"][0]["changes"][0]["value"]["errors"] = [{"code": 131051}]
    assert all(r.payload["errors"] == [{"code": 131051}] for _, r in split(doc))


def test_a_sender_without_a_matching_contact_keeps_every_contact() -> None:
    doc = conversation_batch()
    value = doc["entry"][0]["changes"][0]["value"]
    value["messages"] = [text("wamid.9", CLEO)]
    [(key, record)] = split(doc)[:1]
    assert key == f"acme:1065:{CLEO}"
    assert record.payload["contacts"] == value["contacts"]


def test_a_numeric_wa_id_matches_its_sender() -> None:
    doc = conversation_batch()
    doc["entry"][0]["changes"][0]["value"]["contacts"] = [{"wa_id": int(ANA)}, {"wa_id": BEN}]
    assert split(doc)[0][1].payload["contacts"] == [{"wa_id": int(ANA)}]


def test_a_messages_change_without_messages_or_statuses_is_one_record_as_it_came() -> None:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"phone_number_id": "1065"},
        "errors": [{"code": 1}],
    }
    [(key, record)] = split(wa_envelope([{"field": "messages", "value": value}], waba_id="1022"))
    assert key == "acme:1065:"
    assert record.payload == value


def test_the_splitting_leaves_metas_document_as_it_was() -> None:
    doc = conversation_batch()
    before = orjson.dumps(doc)
    split(doc)
    assert orjson.dumps(doc) == before


def test_other_whatsapp_fields_are_one_record_each_keyed_by_account_and_field() -> None:
    update = {"phone_number": "15550001", "event": "VERIFIED_ACCOUNT"}
    doc = wa_envelope([wa_other_change("account_update", update)], waba_id="1022", time=1_750_000_000)
    [(key, record)] = split(doc)
    assert key == "acme:1022:account_update"
    assert (record.field, record.payload, record.entry_time) == ("account_update", update, 1_750_000_000)


def test_an_entry_time_that_is_not_a_number_is_left_out() -> None:
    doc = wa_envelope([wa_other_change("account_update", {})], waba_id="1022")
    doc["entry"][0]["time"] = "1750000000"
    assert split(doc)[0][1].entry_time is None


# --------------------------------------------------------------------------- users by BSUID

MARIA, BRUNO = "US.13491208655302741918", "BR.1502576394655843"  # business-scoped user ids


def wa_doc(value: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    return wa_envelope([{"field": field, "value": value}], waba_id="1022")


def wa_value(**parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "1065"}, **parts}


def by_user(wamid: str, user_id: str, phone: str | None = None) -> dict[str, Any]:
    message = {"id": wamid, "from_user_id": user_id, "timestamp": "1750000000", "type": "text"}
    return message if phone is None else message | {"from": phone}


def status_to(wamid: str, state: str, **who: str) -> dict[str, Any]:
    return {"id": wamid, "status": state, "timestamp": "1750000001", **who}


MARIA_CARD = {"wa_id": ANA, "user_id": MARIA, "profile": {"name": "Maria", "username": "@maria"}}
BRUNO_CARD = {"user_id": BRUNO, "profile": {"username": "@bruno"}}


def test_a_username_users_records_are_keyed_by_their_business_scoped_id() -> None:
    value = wa_value(
        contacts=[{"user_id": MARIA, "profile": {"username": "@maria"}}], messages=[by_user("wamid.1", MARIA)]
    )
    [(key, record)] = split(wa_doc(value))
    assert key == f"acme:1065:{MARIA}"
    assert record.payload == value


def test_one_users_records_go_under_one_key_with_or_without_their_phone() -> None:
    value = wa_value(
        contacts=[BRUNO_CARD, MARIA_CARD],
        messages=[by_user("wamid.1", MARIA, ANA), by_user("wamid.2", MARIA), by_user("wamid.3", MARIA, "")],
        statuses=[
            status_to("wamid.out1", "delivered", recipient_id=ANA, recipient_user_id=MARIA),
            status_to("wamid.out2", "read", recipient_user_id=MARIA),
        ],
    )
    records = split(wa_doc(value))
    assert [key for key, _ in records] == [f"acme:1065:{MARIA}"] * 5
    # Each with its user's card, and only that.
    assert all(r.payload["contacts"] == [MARIA_CARD] for _, r in records)
    # A user Meta gives no BSUID is still keyed by phone.
    [(key, _)] = split(wa_doc(wa_value(messages=[text("wamid.4", BEN)])))
    assert key == f"acme:1065:{BEN}"


def test_two_username_users_of_one_number_are_keyed_apart_each_with_their_own_card() -> None:
    value = wa_value(
        contacts=[MARIA_CARD, BRUNO_CARD],
        messages=[by_user("wamid.1", BRUNO), by_user("wamid.2", MARIA), by_user("wamid.3", BRUNO)],
    )
    records = split(wa_doc(value))
    assert [(key, r.payload["contacts"]) for key, r in records] == [
        (f"acme:1065:{BRUNO}", [BRUNO_CARD]),
        (f"acme:1065:{MARIA}", [MARIA_CARD]),
        (f"acme:1065:{BRUNO}", [BRUNO_CARD]),
    ]


def test_a_status_carries_its_own_contact_card_and_a_failed_one_none() -> None:
    # Delivered and read statuses come with the user's card (with the username); failed ones
    # come without contacts, and without recipient_user_id if sent to a phone number.
    delivered = status_to("wamid.out1", "delivered", recipient_user_id=MARIA)
    failed = status_to("wamid.out2", "failed", recipient_id=CLEO)
    records = split(wa_doc(wa_value(contacts=[BRUNO_CARD, MARIA_CARD], statuses=[delivered, failed])))
    assert [(key, r.payload["statuses"]) for key, r in records] == [
        (f"acme:1065:{MARIA}", [delivered]),
        (f"acme:1065:{CLEO}", [failed]),
    ]
    assert records[0][1].payload["contacts"] == [MARIA_CARD]
    assert "contacts" not in records[1][1].payload


def test_a_user_id_update_is_one_record_keyed_by_its_first_users_new_id() -> None:
    value = wa_value(
        user_id_update=[
            {"wa_id": ANA, "user_id": {"previous": "US.1", "current": MARIA}},
            {"user_id": {"previous": "BR.1", "current": BRUNO}},
        ]
    )
    [(key, record)] = split(wa_doc(value, "user_id_update"))
    assert key == f"acme:1065:{MARIA}"  # where the user's next messages go
    assert (record.kind, record.field, record.payload) == ("change", "user_id_update", value)


@pytest.mark.parametrize(
    "updates",
    [[], [{"wa_id": ANA}], [{"user_id": "US.1"}], ["x"], None],
)
def test_a_user_id_update_naming_no_new_id_is_still_one_record(updates: Any) -> None:
    value = wa_value(user_id_update=updates)
    [(key, record)] = split(wa_doc(value, "user_id_update"))
    assert (key, record.payload) == ("acme:1065:", value)


# --------------------------------------------------------------------------- Messenger, Instagram


@pytest.mark.parametrize("object_", ["page", "instagram"])
def test_a_messaging_event_is_keyed_by_the_user_whichever_way_it_goes(object_: str) -> None:
    inbound = messenger_message(mid="m.1", sender_id="psid-7", recipient_id="page-1", timestamp_ms=1)
    echo = messenger_message(mid="m.2", sender_id="page-1", recipient_id="psid-7", timestamp_ms=2)
    records = split(messenger_envelope([inbound, echo], page_id="page-1", object_=object_))
    assert [key for key, _ in records] == ["acme:page-1:psid-7", "acme:page-1:psid-7"]
    assert [(r.kind, r.field, r.object) for _, r in records] == [("messaging", "messaging", object_)] * 2
    assert [r.payload for _, r in records] == [inbound, echo]
    assert [r.entry_time for _, r in records] == [38, 39]


def test_a_messages_change_of_another_product_is_not_split() -> None:
    value = {"messages": [{"from": "a"}, {"from": "b"}]}
    doc = {
        "object": "instagram",
        "entry": [{"id": "ig-1", "changes": [{"field": "messages", "value": value}]}],
    }
    [(key, record)] = split(doc)
    assert (key, record.payload) == ("acme:ig-1:messages", value)


def test_records_keep_metas_order_across_entries_and_changes() -> None:
    doc = conversation_batch()
    doc["entry"].append({"id": "1023", "changes": [wa_other_change("account_update", {"n": 1})]})
    doc["entry"].append(
        {"id": "page-1", "messaging": [{"sender": {"id": "u"}, "recipient": {"id": "page-1"}}]}
    )
    records = split(doc)
    assert [r.seq for _, r in records] == list(range(6))
    assert [k for k, _ in records][4:] == ["acme:1023:account_update", "acme:page-1:u"]


# --------------------------------------------------------------------------- the budget


def many(n: int, body: str = "hi") -> dict[str, Any]:
    return wa_envelope(
        [
            wa_change(
                phone_number_id="1065",
                display_phone_number="15550001",
                messages=[text(f"wamid.{i}", ANA, body) for i in range(n)],
            )
        ],
        waba_id="1022",
    )


def test_exactly_the_record_budget_passes_and_one_more_is_refused() -> None:
    assert len(split(many(5), Budget(max_records=5))) == 5
    with pytest.raises(OverBudget, match="more than 5 records"):
        split(many(6), Budget(max_records=5))


def test_a_record_over_the_size_of_one_record_is_refused() -> None:
    [(_, record)] = split_raw(many(1, "x" * 1000))
    size = len(record)
    assert len(split(many(1, "x" * 1000), Budget(max_record_bytes=size))) == 1
    with pytest.raises(OverBudget, match=f"at most {size - 1}"):
        split(many(1, "x" * 1000), Budget(max_record_bytes=size - 1))


def test_a_post_over_the_bytes_budget_is_refused() -> None:
    sizes = [len(value) for _, value in split_raw(many(4))]
    assert len(split(many(4), Budget(max_bytes=sum(sizes)))) == 4
    with pytest.raises(OverBudget, match=f"more than {sum(sizes) - 1} bytes"):
        split(many(4), Budget(max_bytes=sum(sizes) - 1))


def test_shared_fields_copied_onto_every_part_count_against_the_budget() -> None:
    # 200 small messages sharing one 10 kB field: a 31 kB POST that would be stored as 2 MB.
    doc = many(200)
    doc["entry"][0]["changes"][0]["value"]["padding"] = "p" * 10_000
    assert len(orjson.dumps(doc)) < 40_000
    with pytest.raises(OverBudget, match="bytes"):
        split(doc, Budget(max_bytes=1_000_000))


def test_an_over_budget_post_is_refused_before_it_is_all_built(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    def counting(*args: Any, **fields: Any) -> WebhookRecord:
        built.append(fields["seq"])
        return WebhookRecord(*args, **fields)

    monkeypatch.setattr(envelope_module, "WebhookRecord", counting)
    with pytest.raises(OverBudget):
        split(many(1000), Budget(max_records=3))
    assert len(built) <= 4  # not the 1,000 it would have made


# --------------------------------------------------------------------------- properties


def _list(part: Any) -> list[Any]:
    return part if isinstance(part, list) else []


def _id(part: Any, key: str) -> str:
    value = part.get(key) if isinstance(part, dict) else None
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""


def _message_records(value: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """What the split must give for a WhatsApp value, worked out plainly: (kind, user, part),
    the user by BSUID where given, else by phone."""
    messages = _list(value.get("messages"))
    statuses = _list(value.get("statuses"))
    contacts = _list(value.get("contacts"))
    out = []
    for kind, parts, ids in (
        ("message", messages, ("from_user_id", "from")),
        ("status", statuses, ("recipient_user_id", "recipient_id")),
    ):
        for part in parts:
            user_id, phone = _id(part, ids[0]), _id(part, ids[1])
            # A part that names its user by phone alone is keyed by its card's BSUID, if any.
            own = _own_contact(contacts, kind, part) if not user_id else None
            out.append((kind, user_id or _id(own, "user_id") or phone, part))
    return out


def _own_contact(contacts: list[Any], kind: str, part: Any) -> Any:
    """The last contact card that names the part's user by its BSUID, else by its phone."""
    ids = ("from_user_id", "from") if kind == "message" else ("recipient_user_id", "recipient_id")
    for who in (_id(part, key) for key in ids):
        own = [c for c in contacts if who and who in (_id(c, "user_id"), _id(c, "wa_id"))]
        if own:
            return own[-1]
    return None


@fast(100)
@given(value=whatsapp_values())
def test_every_message_and_status_lands_in_exactly_one_record_in_order(value: dict[str, Any]) -> None:
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1022", "changes": [{"field": "messages", "value": value}]}],
    }
    records = split(doc)
    expected = _message_records(value)
    metadata = value["metadata"]
    phone = str(metadata.get("phone_number_id", "")) if isinstance(metadata, dict) else ""
    if not expected:
        assert [(k, r.payload) for k, r in records] == [(f"acme:{phone}:", value)]
        return
    assert len(records) == len(expected)
    contacts = _list(value.get("contacts"))
    for (key, record), (kind, who, part) in zip(records, expected, strict=True):
        assert key == f"acme:{phone}:{who}"
        payload = record.payload
        assert payload[{"message": "messages", "status": "statuses"}[kind]] == [part]
        # Everything else of the change travels along.
        assert {k: v for k, v in payload.items() if k not in ("messages", "statuses", "contacts")} == {
            k: v for k, v in value.items() if k not in ("messages", "statuses", "contacts")
        }
        own = _own_contact(contacts, kind, part)
        if own is not None:
            assert payload["contacts"] == [own]
        elif contacts and kind == "message":
            assert payload["contacts"] == contacts
        else:
            assert "contacts" not in payload


def _split_checked(doc: dict[str, Any], updates: int) -> None:
    records = split(doc)
    assert len(records) >= updates
    assert [r.seq for _, r in records] == list(range(len(records)))
    assert all(key.startswith("acme:") for key, _ in records)


@fast(40)
@given(doc=envelopes)
def test_every_envelope_validation_accepts_is_split_without_error(doc: dict[str, Any]) -> None:
    _split_checked(doc, validate_envelope(doc))


@fast(60)
@given(doc=nearly_valid_envelopes())
def test_an_envelope_broken_in_one_place_is_refused_or_still_split(doc: dict[str, Any]) -> None:
    try:
        updates = validate_envelope(doc)
    except EnvelopeError:
        return  # a 422: nothing to split
    _split_checked(doc, updates)
