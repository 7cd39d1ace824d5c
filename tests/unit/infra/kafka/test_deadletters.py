"""A record that fails again after a replay continues its history: its attempts add up, its first
failure stays the first, and headers that are not ours (or are garbled) start a fresh history
instead of refusing the record."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest

from infra.kafka.deadletters import Prior, failure, letter_for, prior_of
from schemas.deadletter import HEADER_ATTEMPTS, HEADER_HISTORY, HEADER_REPLAY_OF, DeadLetter, replay_headers

ORIGINAL_HEADERS = [("traceparent", b"00-abc-01")]


def dead(headers: list[tuple[str, bytes]], exc: Exception, attempts: int) -> DeadLetter:
    return letter_for(
        topic="wuzapi.outbound",
        partition=2,
        offset=77,
        key=b"acme",
        value=b'{"id":"reply-1"}',
        headers=headers,
        tenant="acme",
        exc=exc,
        attempts=attempts,
    )


def test_a_first_failure_starts_the_history() -> None:
    letter = dead(ORIGINAL_HEADERS, ValueError("bad phone"), attempts=3)
    assert (letter.error.type, letter.error.message, letter.error.attempts) == ("ValueError", "bad phone", 3)
    assert letter.error.first_failure_ms == letter.error.last_failure_ms
    assert letter.history == []
    assert letter.header_bytes() == ORIGINAL_HEADERS


def test_a_replayed_record_that_fails_again_continues_its_history() -> None:
    first = dead(ORIGINAL_HEADERS, TimeoutError("gateway slow"), attempts=3)
    # It failed yesterday; it is replayed today and fails again.
    first = replace(first, error=replace(first.error, first_failure_ms=1_000, last_failure_ms=2_000))
    again = dead(replay_headers(first, "dlq-1"), ConnectionError("refused"), attempts=2)
    assert again.error.attempts == 5
    assert again.error.first_failure_ms == 1_000
    assert again.error.last_failure_ms > 2_000
    assert again.history == [first.error]
    third = dead(replay_headers(again, "dlq-2"), ValueError("no"), attempts=1)
    assert third.error.attempts == 6
    assert third.history == [first.error, again.error]
    # The replay headers of the third still carry the original header, once.
    assert [v for k, v in replay_headers(third, "dlq-3") if k == "traceparent"] == [b"00-abc-01"]


def test_the_replay_a_record_came_from_is_known() -> None:
    first = dead(ORIGINAL_HEADERS, ValueError("x"), attempts=1)
    assert prior_of(replay_headers(first, "dlq-9")).replay_of == "dlq-9"
    assert prior_of(ORIGINAL_HEADERS) == Prior(0, [], None)


@pytest.mark.parametrize(
    "headers",
    [
        [(HEADER_ATTEMPTS, b"many")],
        [(HEADER_ATTEMPTS, b"")],
        [(HEADER_HISTORY, b"not json")],
        [(HEADER_HISTORY, b'{"type": "x"}')],
        [(HEADER_HISTORY, b"[1, 2]")],
        [(HEADER_HISTORY, orjson.dumps([{"type": "x"}]))],
    ],
    ids=[
        "attempts-text",
        "attempts-empty",
        "history-text",
        "history-object",
        "history-numbers",
        "history-partial",
    ],
)
def test_garbled_bookkeeping_headers_start_a_fresh_history(headers: list[tuple[str, bytes]]) -> None:
    letter = dead(headers, ValueError("x"), attempts=1)
    assert letter.error.attempts == 1
    assert letter.history == []


def test_a_replay_of_header_that_is_not_utf8_starts_a_fresh_history() -> None:
    assert prior_of([(HEADER_REPLAY_OF, b"\xff\xfe")]).replay_of is None


def test_a_failure_message_is_bounded() -> None:
    info, _ = failure(ValueError("x" * 10_000), attempts=1, prior=Prior(0, [], None))
    assert len(info.message) == 2000
