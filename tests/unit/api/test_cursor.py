"""Keyset cursors: what the API hands out comes back as the same position, and nothing else does:
not a tampered cursor, not one signed with another key, not one of another list, filter, user or
company, and no hostile string ever fails with anything but a 400 invalid_cursor."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.cursor import START, CursorCodec, Position, Scope
from api.errors import InvalidCursor
from tests.unit.strategies import fast

KEY = b"k" * 32
codec = CursorCodec(KEY)
SCOPE = (12, 34, "open", None)  # company, user, filter, conversation
AT = Position(datetime(2024, 5, 17, 9, 30, 12, 345678, tzinfo=UTC), 98765)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(payload: object, key: bytes = KEY) -> str:
    """A cursor signed with `key` over any payload: what only the API itself could make."""
    raw = orjson.dumps(payload)
    return f"{_b64(raw)}.{_b64(hmac.new(key, raw, hashlib.sha256).digest())}"


positions = st.builds(
    Position,
    at=st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)),
    id=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
scopes = st.tuples(*[st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=12))] * 3)


@fast(150)
@given(position=positions, scope=scopes, kind=st.sampled_from(["conversations", "messages", "notifications"]))
def test_a_cursor_brings_back_exactly_the_position_it_was_made_from(
    position: Position, scope: Scope, kind: str
) -> None:
    token = codec.encode(kind, scope, position)
    assert codec.decode(token, kind, scope) == position


def test_the_first_page_position_round_trips() -> None:
    assert codec.decode(codec.encode("messages", SCOPE, Position(*START)), "messages", SCOPE) == Position(
        *START
    )


def test_the_repeated_autumn_hour_keeps_two_distinct_positions() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    first = Position(datetime(2024, 10, 27, 2, 30, tzinfo=berlin), 1)  # 02:30 CEST
    second = Position(datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=berlin), 1)  # 02:30 CET
    back = [codec.decode(codec.encode("messages", SCOPE, p), "messages", SCOPE) for p in (first, second)]
    # The same instants, now in UTC (an ambiguous local time never equals another zone's).
    assert [p.at for p in back] == [
        datetime(2024, 10, 27, 0, 30, tzinfo=UTC),
        datetime(2024, 10, 27, 1, 30, tzinfo=UTC),
    ]
    assert back[1].at - back[0].at == timedelta(hours=1)
    assert all(p.at.utcoffset() == timedelta(0) for p in back)


def test_a_cursor_is_url_safe_and_short() -> None:
    token = codec.encode("conversations", SCOPE, AT)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert len(token) < 200


@pytest.mark.parametrize(
    ("kind", "scope"),
    [
        ("messages", SCOPE),  # another list
        ("conversations", (13, 34, "open", None)),  # another company
        ("conversations", (12, 35, "open", None)),  # another user
        ("conversations", (12, 34, "closed", None)),  # another filter
        ("conversations", (12, 34, "open", 5)),  # one conversation's list
        ("conversations", ("12", 34, "open", None)),  # the same digits as text
        ("conversations", (12, 34, "open")),  # a shorter scope
    ],
    ids=["list", "company", "user", "filter", "conversation", "type", "length"],
)
def test_a_cursor_is_refused_in_any_other_list_or_scope(kind: str, scope: Scope) -> None:
    token = codec.encode("conversations", SCOPE, AT)
    with pytest.raises(InvalidCursor) as refused:
        codec.decode(token, kind, scope)
    assert refused.value.status == 400 and refused.value.code == "invalid_cursor"


def test_a_cursor_of_another_deployment_key_is_refused() -> None:
    token = CursorCodec(b"another key").encode("conversations", SCOPE, AT)
    with pytest.raises(InvalidCursor, match="signature"):
        codec.decode(token, "conversations", SCOPE)


def test_editing_the_payload_breaks_the_signature() -> None:
    token = codec.encode("conversations", SCOPE, AT)
    body, signature = token.split(".")
    doc = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    doc["s"][0] = 13  # point it at another company
    with pytest.raises(InvalidCursor, match="signature"):
        codec.decode(f"{_b64(orjson.dumps(doc))}.{signature}", "conversations", (13, 34, "open", None))


@fast(150)
@given(data=st.data())
def test_a_changed_cursor_never_yields_another_position(data: st.DataObject) -> None:
    token = codec.encode("conversations", SCOPE, AT)
    i = data.draw(st.integers(0, len(token) - 1), label="at")
    edit = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="edit")
    char = data.draw(st.sampled_from("AQgw-_.=+/x9 %\x00é"), label="char")
    if edit == "replace":
        tampered = token[:i] + char + token[i + 1 :]
    elif edit == "insert":
        tampered = token[:i] + char + token[i:]
    else:
        tampered = token[:i] + token[i + 1 :]
    try:
        back = codec.decode(tampered, "conversations", SCOPE)
    except InvalidCursor:
        return
    # Only an edit that base64 itself ignores (padding bits, a stray character) may pass.
    assert back == AT


@pytest.mark.parametrize(
    "token",
    ["", ".", "abc", "a.b.c", "%%%.%%%", "é.é", "A" * 600 + "." + "B", "eyJ2IjoxfQ.", ".eyJ2IjoxfQ"],
)
def test_malformed_cursors_are_a_400(token: str) -> None:
    with pytest.raises(InvalidCursor):
        codec.decode(token, "conversations", SCOPE)


@pytest.mark.parametrize(
    "payload",
    [
        {"v": 2, "k": "conversations", "s": list(SCOPE), "t": 0, "i": 1},  # a future version
        {"k": "conversations", "s": list(SCOPE), "t": 0, "i": 1},  # no version
        {"v": 1, "k": "conversations", "s": list(SCOPE), "t": "0", "i": 1},  # time as text
        {"v": 1, "k": "conversations", "s": list(SCOPE), "t": 0, "i": 1.5},  # id not an integer
        {"v": 1, "k": "conversations", "s": list(SCOPE), "t": 2**62, "i": 1},  # past year 9999
        {"v": 1, "k": "conversations", "s": list(SCOPE), "t": 2**64 - 1, "i": 1},  # the largest JSON int
        {"v": 1, "k": "conversations", "s": list(SCOPE), "t": -(2**62), "i": 1},  # before year 1
        ["v", 1],  # not an object
    ],
    ids=["version-2", "no-version", "time-text", "id-float", "far-future", "u64", "far-past", "array"],
)
def test_signed_but_unusable_payloads_are_a_400_not_a_500(payload: object) -> None:
    with pytest.raises(InvalidCursor):
        codec.decode(forge(payload), "conversations", SCOPE)


def test_an_overlong_cursor_is_refused_before_any_work_even_if_signed() -> None:
    scope = ("x" * 400,)
    token = codec.encode("conversations", scope, AT)
    assert len(token) > 512
    with pytest.raises(InvalidCursor, match="malformed"):
        codec.decode(token, "conversations", scope)


def test_a_signed_payload_that_is_not_json_is_a_400() -> None:
    raw = b"\xff not json"
    token = f"{_b64(raw)}.{_b64(hmac.new(KEY, raw, hashlib.sha256).digest())}"
    with pytest.raises(InvalidCursor, match="malformed"):
        codec.decode(token, "conversations", SCOPE)


@fast(200)
@given(token=st.one_of(st.text(max_size=700), st.from_regex(r"[A-Za-z0-9_=-]{0,80}\.[A-Za-z0-9_=-]{0,80}")))
def test_no_client_string_is_anything_but_refused(token: str) -> None:
    with pytest.raises(InvalidCursor):
        codec.decode(token, "conversations", SCOPE)
