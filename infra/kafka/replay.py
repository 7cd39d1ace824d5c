"""Listing and replaying dead letters: shared by `cortexx dlq` and the operators' console.

A dead letter's id is `dlq_topic:partition:offset`. Replay sends the original key, value and
headers back to the source topic, with the failure history in headers, and records the replay in
Postgres: replaying the same dead letter again is skipped (unless forced), and the consumers'
own idempotency (a message already sent is not sent again) covers a forced one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from aiokafka.errors import KafkaError

from infra.kafka import offsets
from infra.kafka.offsets import OffsetsError, PartitionReset
from infra.kafka.producer import DurableProducer
from infra.kafka.topics import META_MEDIA_DLQ, META_WEBHOOKS_DLQ, WUZAPI_OUTBOUND_DLQ
from infra.runtime.logging import get_logger
from schemas.deadletter import DeadLetter, replay_headers

log = get_logger("infra.kafka.replay")

DLQ_TOPICS = (META_WEBHOOKS_DLQ, WUZAPI_OUTBOUND_DLQ, META_MEDIA_DLQ)

REPLAYED = """
SELECT dlq_id FROM dlq_replays WHERE dlq_id = ANY($1::text[])
"""

RECORD_REPLAY = """
INSERT INTO dlq_replays (dlq_id, source_topic, tenant, error_type, replayed_by)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (dlq_id) DO UPDATE SET replayed_at = now(), replayed_by = EXCLUDED.replayed_by,
                                   times = dlq_replays.times + 1
"""


class ReplayError(RuntimeError):
    """The dead letters could not be read or replayed (broker or database unavailable)."""


@dataclass(frozen=True, slots=True)
class StoredLetter:
    id: str
    letter: DeadLetter
    replayed: bool = False

    @property
    def failed_at(self) -> datetime:
        return datetime.fromtimestamp(self.letter.error.last_failure_ms / 1000, tz=UTC)


@dataclass(frozen=True, slots=True)
class LetterFilter:
    topic: str | None = None  # the source topic or its dead-letter topic
    tenant: str | None = None
    error_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, stored: StoredLetter) -> bool:
        letter = stored.letter
        if self.topic and self.topic not in (letter.source_topic, letter.source_topic + ".dlq"):
            return False
        if self.tenant and letter.tenant != self.tenant:
            return False
        if self.error_type and letter.error.type != self.error_type:
            return False
        if self.since and stored.failed_at < self.since:
            return False
        return not (self.until and stored.failed_at > self.until)


class DeadLetterReader:
    """The dead letters of the DLQ topics, read incrementally: a call reads only the records added
    since the previous one (the topics only grow), so a console asking every few seconds does not
    re-read whole topics. Whether each was replayed is asked of Postgres on every call."""

    def __init__(self, bootstrap: str, topics: Iterable[str] = DLQ_TOPICS) -> None:
        self.bootstrap = bootstrap
        self.topics = tuple(topics)
        self._ends: dict[str, dict[int, int]] = {}
        self._letters: dict[str, list[StoredLetter]] = {}
        self._lock = asyncio.Lock()

    async def letters(self, conn: asyncpg.Connection) -> list[StoredLetter]:
        async with self._lock:
            letters: list[StoredLetter] = []
            for topic in self.topics:
                letters.extend(await self._read(topic))
        try:
            done = {r["dlq_id"] for r in await conn.fetch(REPLAYED, [s.id for s in letters])}
        except asyncpg.UndefinedTableError:
            # A database not migrated yet has replayed nothing; a reader does not migrate it.
            done = set()
        return [StoredLetter(s.id, s.letter, s.id in done) for s in letters]

    async def _read(self, topic: str) -> list[StoredLetter]:
        try:
            try:
                records, ends = await offsets.read_from(self.bootstrap, topic, self._ends.get(topic))
            except PartitionReset:
                self._ends.pop(topic, None)
                self._letters.pop(topic, None)
                records, ends = await offsets.read_from(self.bootstrap, topic)
        except OffsetsError as exc:
            raise ReplayError(str(exc)) from exc
        except KafkaError as exc:
            raise ReplayError(f"broker unavailable: {exc}") from exc
        kept = self._letters.setdefault(topic, [])
        for record in records:
            try:
                letter = DeadLetter.from_bytes(record.value or b"")
            except (ValueError, TypeError, KeyError) as exc:
                log.warning(
                    "dlq.unreadable",
                    topic=topic,
                    partition=record.partition,
                    offset=record.offset,
                    error=repr(exc),
                )
                continue
            kept.append(StoredLetter(f"{topic}:{record.partition}:{record.offset}", letter))
        self._ends[topic] = ends
        return kept


async def load_letters(
    bootstrap: str, conn: asyncpg.Connection, *, topics: Iterable[str] = DLQ_TOPICS
) -> list[StoredLetter]:
    """Every dead letter now, read once (the CLI); a long-lived process keeps a DeadLetterReader."""
    return await DeadLetterReader(bootstrap, topics).letters(conn)


@dataclass
class ReplayResult:
    replayed: list[str]
    skipped: list[str]


async def replay(
    letters: list[StoredLetter],
    *,
    producer: DurableProducer,
    conn: asyncpg.Connection,
    who: str,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[StoredLetter], None] | None = None,
) -> ReplayResult:
    result = ReplayResult([], [])
    for stored in letters:
        if stored.replayed and not force:
            result.skipped.append(stored.id)
        elif not dry_run:
            letter = stored.letter
            headers = replay_headers(letter, stored.id)
            await producer.send_all(
                letter.source_topic, [(letter.key, letter.value)], headers=headers, timeout_s=10
            )
            await conn.execute(
                RECORD_REPLAY, stored.id, letter.source_topic, letter.tenant, letter.error.type, who
            )
            log.info("dlq.replayed", id=stored.id, topic=letter.source_topic, tenant=letter.tenant)
            result.replayed.append(stored.id)
        else:
            result.replayed.append(stored.id)
        if progress is not None:
            progress(stored)
    return result
