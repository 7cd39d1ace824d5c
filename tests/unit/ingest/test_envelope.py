"""How ingest splits one Meta POST into topic records: one per WhatsApp message and per status,
keyed by the conversation (so one customer's events keep their order), each carrying its own
contact and everything else of its change; one per Messenger / Instagram event, keyed by the user
whichever way the event goes; one per other change, untouched; and a budget that refuses a POST
that would grow too large, before it is built."""

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


def _message_records(value: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """What the split must give for a WhatsApp value, worked out plainly: (kind, contact, part)."""
    messages = _list(value.get("messages"))
    statuses = _list(value.get("statuses"))
    out = [("message", str(m.get("from", "")) if isinstance(m, dict) else "", m) for m in messages]
    out += [("status", str(s.get("recipient_id", "")) if isinstance(s, dict) else "", s) for s in statuses]
    return out


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
        if kind == "status":
            assert "contacts" not in payload
            continue
        own = [
            c
            for c in contacts
            if isinstance(c, dict) and isinstance(c.get("wa_id"), str | int) and str(c["wa_id"]) == who
        ]
        if own:
            assert payload["contacts"] == [own[-1]]
        elif contacts:
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
