"""Dead letters: writing them (with their failure history) and reading them back for replay.

A dead letter keeps the original key, value and headers byte for byte. A replayed record carries
headers with the attempts and failures it already had, so if it fails again its new dead letter
continues that history instead of starting over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson
from prometheus_client import Counter

from infra.kafka.producer import BrokerUnavailable, DurableProducer
from infra.runtime.logging import get_logger
from infra.runtime.retry import until_it_passes
from schemas.deadletter import HEADER_ATTEMPTS, HEADER_HISTORY, HEADER_REPLAY_OF, DeadLetter, FailureInfo

log = get_logger("infra.kafka.deadletters")

DEAD_LETTERS = Counter("cortexx_dead_letters_total", "Records sent to a dead-letter topic", ["topic"])

DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True, slots=True)
class Prior:
    """What a replayed record had been through before."""

    attempts: int
    history: list[FailureInfo]
    replay_of: str | None


def prior_of(headers: list[tuple[str, bytes]]) -> Prior:
    found = dict(headers)
    attempts = 0
    history: list[FailureInfo] = []
    replay_of: str | None = None
    try:
        attempts = int(found.get(HEADER_ATTEMPTS, b"0") or 0)
        raw = found.get(HEADER_HISTORY)
        if raw:
            history = [FailureInfo(**item) for item in orjson.loads(raw)]
        raw_replay_of = found.get(HEADER_REPLAY_OF)
        replay_of = raw_replay_of.decode() if raw_replay_of else None
    except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
        # Headers from elsewhere: start a fresh history rather than refuse the record.
        attempts, history, replay_of = 0, [], None
    return Prior(attempts, history, replay_of)


def failure(
    exc: BaseException | str, *, attempts: int, prior: Prior, first_failure_ms: int | None = None
) -> tuple[FailureInfo, list[FailureInfo]]:
    now = int(time.time() * 1000)
    first = prior.history[0].first_failure_ms if prior.history else (first_failure_ms or now)
    kind = exc if isinstance(exc, str) else type(exc).__name__
    message = str(exc)[:2000] if not isinstance(exc, str) else exc
    info = FailureInfo(
        type=kind,
        message=message,
        attempts=prior.attempts + attempts,
        first_failure_ms=first,
        last_failure_ms=now,
    )
    return info, list(prior.history)


def letter_for(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes,
    headers: list[tuple[str, bytes]],
    tenant: str | None,
    exc: BaseException,
    attempts: int,
    prior: Prior | None = None,
) -> DeadLetter:
    """The dead letter of a record as it came off its topic, continuing any replay history."""
    info, history = failure(exc, attempts=attempts, prior=prior or prior_of(headers))
    return DeadLetter.of(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key,
        value=value,
        headers=headers,
        error=info,
        tenant=tenant,
        history=history,
    )


class DeadLetterWriter:
    """Produces dead letters durably; a broker outage is waited out, never a reason to drop one."""

    def __init__(self, producer: DurableProducer) -> None:
        self.producer = producer

    async def write(self, topic: str, letter: DeadLetter) -> None:
        records = [(letter.key, letter.to_bytes())]
        await until_it_passes(
            lambda: self.producer.send_all(topic, records, timeout_s=10),
            retry_if=lambda exc: isinstance(exc, BrokerUnavailable),
            event="deadletter.retry",
            topic=topic,
        )
        DEAD_LETTERS.labels(topic).inc()
