"""The `webhooks` agent's work: a batch of `meta.webhooks` records into Postgres, once.

A batch is turned into rows (`processors.rows.to_rows`, which sets aside the records that can
never be stored) and written in one transaction with a fixed number of set-based statements
(`processors.writer.RowWriter`). If the database refuses the batch for its content, it is split
in halves, each applied by the same writer under a savepoint, and the halves that fail again are
split until the records it refuses alone are found. Poison records go to `meta.webhooks.dlq`
with their error, and the rest are written. A database that is down is not poison: the batch is
retried with backoff until it succeeds or the worker stops, and nothing is acknowledged
meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

import asyncpg
from prometheus_client import Counter
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from infra.kafka.deadletters import Prior, letter_for
from infra.postgres.db import create_pool, is_transient
from infra.runtime.logging import get_logger
from processors.autoreply import Company, CompanyCache
from processors.rows import PoisonRecord, to_rows
from processors.writer import BatchStats, RowWriter, load_companies
from schemas.deadletter import DeadLetter
from schemas.media import MediaJob
from schemas.outbound import OutboundMessage
from schemas.records import RecordError, WebhookRecord

log = get_logger("processors.webhooks")

# The webhook writer's connections plan no sequential scans. Every statement it runs, and every
# foreign-key check Postgres runs for it, looks rows up by key; but a foreign-key check's plan is
# made once per connection and kept, and one made while the referenced table was nearly empty
# (a fresh deployment, or an autovacuum ANALYZE just then) is a sequential scan, which then ran
# once per inserted row as `messages` grew: 990 µs of Postgres CPU per record instead of 60 until
# the next ANALYZE (caught with perf in the worker benchmark; BENCHMARKS.md).
WRITER_SERVER_SETTINGS = {"enable_seqscan": "off"}


async def create_writer_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """The pool the webhook writer writes through (tests/test_writer_plans.py checks its plans)."""
    return await create_pool(
        url, min_size=min_size, max_size=max_size, server_settings=WRITER_SERVER_SETTINGS
    )


PROCESSED = Counter("cortexx_worker_records_total", "meta.webhooks records handled", ["outcome"])
DB_RETRIES = Counter("cortexx_worker_db_retries_total", "Batches retried on a database outage")


class RawRecord(NamedTuple):
    """What the agent hands over: a record as it came off the topic. A NamedTuple: immutable,
    and made per record for a tenth of a frozen dataclass's cost."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def dead_letter(
        self, tenant: str | None, exc: BaseException, *, attempts: int, prior: Prior | None = None
    ) -> DeadLetter:
        """This record's dead letter, continuing any replay history it carries."""
        return letter_for(
            topic=self.topic,
            partition=self.partition,
            offset=self.offset,
            key=self.key,
            value=self.value,
            headers=self.headers,
            tenant=tenant,
            exc=exc,
            attempts=attempts,
            prior=prior,
        )


def _is_poison(exc: BaseException) -> bool:
    return isinstance(exc, PoisonRecord | asyncpg.PostgresError) and not is_transient(exc)


class WebhookWriter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        dead_letter: Callable[[DeadLetter], Awaitable[None]],
        send_outbound: Callable[[list[OutboundMessage]], Awaitable[None]],
        *,
        retry_max_s: float = 5.0,
        company_cache_ttl_s: float = 30.0,
        send_media: Callable[[list[MediaJob]], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.send_media = send_media
        self.dead_letter = dead_letter
        self.retry_max_s = retry_max_s
        self.send_outbound = send_outbound
        self.companies = CompanyCache(company_cache_ttl_s)

    async def write(self, batch: Sequence[RawRecord]) -> BatchStats:
        """Write the batch; return only when every record is stored or dead-lettered."""
        decoded: list[tuple[RawRecord, WebhookRecord]] = []
        for raw in batch:
            try:
                decoded.append((raw, WebhookRecord.from_bytes(raw.value)))
            except RecordError as exc:
                await self._poison(raw, None, exc)
        if not decoded:
            return BatchStats()
        writer: RowWriter | None = None
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(multiplier=0.1, max=self.retry_max_s),
            before_sleep=self._log_retry,
            reraise=True,
        ):
            with attempt:
                writer = await self._write_once(decoded)
        assert writer is not None  # AsyncRetrying either succeeded or re-raised
        # Auto-replies leave only after their rows are committed, and before the batch is acked:
        # a crash in between redelivers the batch, which finds them pending and sends them again
        # under the same id.
        if writer.outbound:
            await self.send_outbound(writer.outbound)
        # Fetch jobs likewise: a crash before they are on the topic redelivers the batch, which
        # finds their rows still pending and queues them again.
        if writer.media and self.send_media is not None:
            await self.send_media(writer.media)
        return writer.stats

    def _log_retry(self, state: object) -> None:
        DB_RETRIES.inc()
        outcome = getattr(state, "outcome", None)
        error = outcome.exception() if outcome is not None else None
        log.warning("webhooks.db_retry", error=repr(error))

    async def _write_once(self, decoded: list[tuple[RawRecord, WebhookRecord]]) -> RowWriter:
        records = [record for _, record in decoded]
        async with self.pool.acquire() as conn:
            companies = await load_companies(conn, self.companies, records)
            rows = to_rows(records, companies)
            # Records that stand for nothing storable are poison before any statement runs.
            poisoned: list[tuple[int, Exception]] = list(rows.poison)
            writer = RowWriter(conn)
            try:
                async with conn.transaction():
                    await writer.apply(rows)
            except Exception as exc:
                if is_transient(exc):
                    raise
                # Refused for its content: the records the database refuses alone are found by
                # splitting the batch, and the rest is written.
                log.info("webhooks.batch_bisected", records=len(records), error=repr(exc)[:300])
                flagged = {index for index, _ in rows.poison}
                clean = [index for index in range(len(records)) if index not in flagged]
                writer = RowWriter(conn)
                async with conn.transaction():
                    await self._bisect(writer, records, companies, clean, exc, poisoned)
            PROCESSED.labels("stored").inc(len(records) - len(poisoned))
        for index, error in sorted(poisoned, key=lambda p: p[0]):
            raw, record = decoded[index]
            await self._poison(raw, record.tenant, error)
        return writer

    async def _bisect(
        self,
        writer: RowWriter,
        records: list[WebhookRecord],
        companies: dict[str, Company],
        indices: list[int],
        error: Exception,
        poisoned: list[tuple[int, Exception]],
    ) -> None:
        """The records at `indices` failed together with `error`. One alone is poison (if the
        error is about it, not an outage or a fault of ours); more are split in halves, each
        applied under a savepoint and split again if it fails, in record order."""
        if len(indices) == 1:
            if not _is_poison(error):
                raise error
            poisoned.append((indices[0], error))
            return
        middle = len(indices) // 2
        for half in (indices[:middle], indices[middle:]):
            try:
                async with writer.conn.transaction():
                    await writer.apply(to_rows([records[i] for i in half], companies))
            except Exception as exc:
                if is_transient(exc):
                    raise
                await self._bisect(writer, records, companies, half, exc, poisoned)

    async def _poison(self, raw: RawRecord, tenant: str | None, exc: Exception) -> None:
        # A replayed record that is still poison keeps its attempts and history.
        letter = raw.dead_letter(tenant, exc, attempts=1)
        log.error(
            "webhooks.dead_lettered",
            topic=raw.topic,
            partition=raw.partition,
            offset=raw.offset,
            tenant=tenant,
            error=type(exc).__name__,
            detail=str(exc)[:500],
        )
        PROCESSED.labels("dead_lettered").inc()
        await self.dead_letter(letter)
