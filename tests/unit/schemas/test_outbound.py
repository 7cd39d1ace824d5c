"""`wuzapi.outbound` records and the WhatsApp id a reply is sent under: a record reads back as it
was written; anything else is an OutboundRecordError (dead-lettered, not a crash); and the gateway
id is 32 upper-case hex digits, the same for every retry and replay of one reply, and different for
every other reply, of this company or any other."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.outbound import OUTBOUND_VERSION, OutboundMessage, OutboundRecordError, gateway_message_id
from tests.unit.strategies import fast

messages = st.builds(
    OutboundMessage,
    id=st.text(min_size=1, max_size=20),
    tenant=st.text(max_size=12),
    company_id=st.integers(1, 2**53),
    conversation_id=st.integers(1, 2**53),
    to=st.from_regex(r"[1-9][0-9]{7,14}", fullmatch=True),
    kind=st.sampled_from(["text", "image", "document", "markread"]),
    origin=st.sampled_from(["agent", "auto_reply", "read_receipt", "replay"]),
    created_at_ms=st.integers(0, 2**53),
    text=st.none() | st.text(max_size=50),
    media_url=st.none() | st.text(max_size=20),
    caption=st.none() | st.text(max_size=20),
    filename=st.none() | st.text(max_size=20),
    read_ids=st.lists(st.text(min_size=1, max_size=10), max_size=4).map(tuple),
    user_id=st.none() | st.integers(1, 2**31),
)


def reply(**fields: Any) -> OutboundMessage:
    base: dict[str, Any] = {
        "id": "reply-1",
        "tenant": "acme",
        "company_id": 7,
        "conversation_id": 3,
        "to": "4915112345678",
        "kind": "text",
        "origin": "agent",
        "created_at_ms": 1_717_000_000_000,
        "text": "Hello",
    }
    return OutboundMessage(**(base | fields))


@fast(100)
@given(message=messages)
def test_an_outbound_record_reads_back_as_it_was_written(message: OutboundMessage) -> None:
    back = OutboundMessage.from_bytes(message.to_bytes())
    assert back == message
    assert isinstance(back.read_ids, tuple)
    assert back.gateway_id == message.gateway_id


def test_records_are_keyed_by_tenant() -> None:
    assert reply(tenant="acme").key == b"acme"


def test_a_record_written_without_the_optional_fields_reads_back_with_their_defaults() -> None:
    doc = {
        k: v
        for k, v in orjson.loads(reply().to_bytes()).items()
        if k not in ("read_ids", "user_id", "caption")
    }
    back = OutboundMessage.from_bytes(orjson.dumps(doc))
    assert (back.read_ids, back.user_id, back.caption) == ((), None, None)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b"null", b'"x"'])
def test_bytes_that_are_not_an_outbound_record_are_refused(raw: bytes) -> None:
    with pytest.raises(OutboundRecordError):
        OutboundMessage.from_bytes(raw)


@pytest.mark.parametrize("version", [None, 0, OUTBOUND_VERSION + 1, "1"])
def test_an_outbound_record_of_another_version_is_refused(version: Any) -> None:
    doc = orjson.loads(reply().to_bytes())
    doc["v"] = version
    with pytest.raises(OutboundRecordError, match="version"):
        OutboundMessage.from_bytes(orjson.dumps(doc))


def test_an_outbound_record_missing_a_field_or_with_an_unknown_one_is_refused() -> None:
    doc = orjson.loads(reply().to_bytes())
    with pytest.raises(OutboundRecordError, match="malformed"):
        OutboundMessage.from_bytes(orjson.dumps({k: v for k, v in doc.items() if k != "to"}))
    with pytest.raises(OutboundRecordError, match="malformed"):
        OutboundMessage.from_bytes(orjson.dumps(doc | {"priority": "high"}))


# --------------------------------------------------------------------------- the gateway id


def test_the_gateway_id_looks_like_whatsapps_own() -> None:
    assert re.fullmatch(r"[0-9A-F]{32}", gateway_message_id(7, "reply-1"))


def test_the_gateway_id_never_changes_for_a_reply() -> None:
    # Pinned: a replay after an upgrade must reuse the id the gateway already knows.
    assert gateway_message_id(7, "reply-1") == "95797563350CF3FFB6C32C5779ADF335"
    assert reply().gateway_id == gateway_message_id(7, "reply-1")
    retried = OutboundMessage.from_bytes(reply(origin="replay").to_bytes())
    assert retried.gateway_id == reply().gateway_id


def test_two_companies_answering_with_the_same_reply_id_get_different_gateway_ids() -> None:
    assert reply(company_id=1).gateway_id != reply(company_id=2).gateway_id


@fast(200)
@given(
    a=st.tuples(st.integers(1, 10**6), st.text(min_size=1, max_size=12)),
    b=st.tuples(st.integers(1, 10**6), st.text(min_size=1, max_size=12)),
)
def test_different_replies_never_share_a_gateway_id(a: tuple[int, str], b: tuple[int, str]) -> None:
    ids = gateway_message_id(*a), gateway_message_id(*b)
    assert (ids[0] == ids[1]) is (a == b)
    assert all(re.fullmatch(r"[0-9A-F]{32}", i) for i in ids)


@pytest.mark.parametrize(
    ("a", "b"),
    [((1, "2:x"), (12, "x")), ((1, "23"), (12, "3")), ((11, "1"), (1, "11"))],
)
def test_ids_that_read_alike_once_joined_stay_apart(a: tuple[int, str], b: tuple[int, str]) -> None:
    assert gateway_message_id(*a) != gateway_message_id(*b)
