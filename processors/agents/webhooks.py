"""The `webhooks` agent: `meta.webhooks` in batches into Postgres (`processors.webhooks`).

It takes records in batches without automatic acks (`WorkerStream.noack_batches`); a batch is
acknowledged only after its rows are committed (or its poison records are on the dead-letter
topic), so a worker killed mid-batch redelivers it, and the idempotent writes absorb the
redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
import faust
from faust.types import EventT

from infra.kafka.topics import META_WEBHOOKS_DLQ
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings
from processors.agents.events import raw_record
from processors.shared_producer import SharedProducer
from processors.webhooks import WebhookWriter, create_writer_pool
from schemas.deadletter import DeadLetter

log = get_logger("processors.agents.webhooks")

NAME = "webhooks"


class WebhooksAgent:
    def __init__(self, settings: Settings, producer: SharedProducer) -> None:
        self.settings = settings
        self.producer = producer
        self._pool: asyncpg.Pool | None = None
        self._writer: WebhookWriter | None = None
        self._writing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        assert settings.database_url
        self.producer.acquire(NAME)
        self._pool = await create_writer_pool(settings.database_url, max_size=settings.db_pool_max)
        self._writer = WebhookWriter(
            self._pool,
            self._dead_letter,
            self.producer.send_outbound,
            retry_max_s=settings.db_retry_max_s,
            company_cache_ttl_s=settings.company_cache_ttl_s,
            send_media=self.producer.send_media,
        )
        self._writing = None

    async def run(self, stream: faust.StreamT[Any]) -> None:
        settings = self.settings
        # With overlap (a setting, off by default), the agent takes the next batch while Postgres
        # writes this one; without, Faust's fetcher still fills the stream's buffer meanwhile.
        # Either way one batch is written at a time, in order, and acknowledged after its
        # commit: order per key and at-least-once are the same.
        # The app's stream class is WorkerStream; faust's StreamT protocol does not know it.
        async for events in stream.noack_batches(  # type: ignore[attr-defined]
            settings.worker_batch_max,
            within=settings.worker_batch_within_s,
            idle=settings.worker_batch_idle_ms / 1000,
        ):
            if self._writing is not None:
                await self._writing
                self._writing = None
            if settings.worker_overlap_writes:
                self._writing = asyncio.ensure_future(self._store(stream, list(events)))
                self._writing.add_done_callback(_log_failure)
            else:
                await self._store(stream, list(events))
        if self._writing is not None:
            await self._writing

    async def stop(self) -> None:
        writing = self._writing
        if writing is not None and not writing.done():
            writing.cancel()  # not acked: redelivered, and the idempotent writes absorb it
            with contextlib.suppress(BaseException):
                await writing
        assert self._pool is not None
        await self._pool.close()
        await self.producer.release(NAME)

    async def _dead_letter(self, letter: DeadLetter) -> None:
        await self.producer.dead_letters.write(META_WEBHOOKS_DLQ, letter)

    async def _store(self, stream: faust.StreamT[Any], events: list[EventT[Any]]) -> None:
        assert self._writer is not None
        batch = [raw_record(event) for event in events]
        started = time.perf_counter()
        stats = await self._writer.write(batch)
        write_ms = 1000 * (time.perf_counter() - started)
        for event in events:
            await stream.ack(event)
        log.info(
            "webhooks.batch_stored",
            records=len(batch),
            messages=stats.messages,
            duplicates=stats.duplicates,
            statuses=stats.statuses,
            notifications=stats.notifications,
            partitions=sorted({r.partition for r in batch}),
            last_offset=batch[-1].offset,
            write_ms=round(write_ms, 1),  # the agent's wait: Postgres, retries included
        )


def _log_failure(task: asyncio.Task[None]) -> None:
    # Said at once; the agent re-raises it when it next awaits the write.
    if not task.cancelled() and task.exception() is not None:
        log.error("webhooks.batch_failed", error=repr(task.exception()))
