"""Dead letters keep the original record byte for byte (key, value, headers, binary or not) with
the failure that stopped it, and a replay sends those bytes with headers that carry the history
so far, never a second copy of our own bookkeeping."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from schemas.deadletter import (
    HEADER_ATTEMPTS,
    HEADER_HISTORY,
    HEADER_REPLAY_OF,
    DeadLetter,
    FailureInfo,
    replay_headers,
)
from tests.unit.strategies import fast

failures = st.builds(
    FailureInfo,
    type=st.sampled_from(["RecordError", "WuzapiPermanent", "UniqueViolationError"]),
    message=st.text(max_size=40),
    attempts=st.integers(0, 100),
    first_failure_ms=st.integers(0, 2**50),
    last_failure_ms=st.integers(0, 2**50),
)
header_names = st.text(min_size=1, max_size=10)


@fast(60)
@given(
    key=st.none() | st.binary(max_size=40),
    value=st.binary(max_size=200),
    headers=st.lists(st.tuples(header_names, st.binary(max_size=20)), max_size=4),
    error=failures,
    history=st.lists(failures, max_size=3),
    tenant=st.none() | st.text(max_size=10),
    partition=st.integers(0, 63),
    offset=st.integers(0, 2**62),
)
def test_a_dead_letter_keeps_the_original_record_byte_for_byte(
    key: bytes | None,
    value: bytes,
    headers: list[tuple[str, bytes]],
    error: FailureInfo,
    history: list[FailureInfo],
    tenant: str | None,
    partition: int,
    offset: int,
) -> None:
    letter = DeadLetter.of(
        topic="meta.webhooks",
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        headers=headers,
        error=error,
        tenant=tenant,
        history=history,
    )
    back = DeadLetter.from_bytes(letter.to_bytes())
    assert back == letter
    assert (back.key, back.value, back.header_bytes()) == (key, value, headers)
    assert (back.source_topic, back.source_partition, back.source_offset) == (
        "meta.webhooks",
        partition,
        offset,
    )
    assert (back.error, back.history, back.tenant) == (error, history, tenant)


def test_an_empty_value_and_a_missing_key_stay_apart_from_empty_bytes() -> None:
    error = FailureInfo("RecordError", "not JSON", 1, 1, 1)
    letter = DeadLetter.of(
        topic="t", partition=0, offset=0, key=None, value=b"", headers=[], error=error, tenant=None
    )
    back = DeadLetter.from_bytes(letter.to_bytes())
    assert back.key is None and back.value == b""
    with_empty_key = DeadLetter.of(
        topic="t", partition=0, offset=0, key=b"", value=b"", headers=[], error=error, tenant=None
    )
    assert DeadLetter.from_bytes(with_empty_key.to_bytes()).key == b""


def test_a_dead_letter_from_before_history_was_kept_still_reads() -> None:
    error = FailureInfo("RecordError", "x", 1, 1, 1)
    doc = orjson.loads(
        DeadLetter.of(
            topic="t", partition=0, offset=0, key=None, value=b"v", headers=[], error=error, tenant=None
        ).to_bytes()
    )
    del doc["history"]
    assert DeadLetter.from_bytes(orjson.dumps(doc)).history == []


def test_a_replay_carries_the_original_headers_and_the_history_so_far() -> None:
    first = FailureInfo("WuzapiTransient", "503 down", 5, 1000, 2000)
    second = FailureInfo("WuzapiTransient", "503 still down", 8, 1000, 9000)
    letter = DeadLetter.of(
        topic="wuzapi.outbound",
        partition=1,
        offset=42,
        key=b"acme",
        value=b"{}",
        headers=[
            ("traceparent", b"00-abc-01"),
            (HEADER_REPLAY_OF, b"dlq-old"),
            (HEADER_ATTEMPTS, b"5"),
            (HEADER_HISTORY, b"[]"),
        ],
        error=second,
        tenant="acme",
        history=[first],
    )
    headers = replay_headers(letter, "dlq-7")
    assert headers[0] == ("traceparent", b"00-abc-01")
    names = [name for name, _ in headers]
    assert sorted(names) == sorted(["traceparent", HEADER_REPLAY_OF, HEADER_ATTEMPTS, HEADER_HISTORY])
    found = dict(headers)
    assert found[HEADER_REPLAY_OF] == b"dlq-7"
    assert found[HEADER_ATTEMPTS] == b"8"
    assert [FailureInfo(**h) for h in orjson.loads(found[HEADER_HISTORY])] == [first, second]
