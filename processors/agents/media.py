"""The `media` agent: `meta.media` fetch jobs, run concurrently (`processors.media`).

Fetches need no order among themselves, so each job runs as a task of its own (at most
`media_max_in_flight` taken at once, at most `media_fetch_concurrency` downloading), and each is
acknowledged once its file is stored or its failure dead-lettered; the stream acknowledges
nothing by itself (`stream.noack()`), so a worker killed mid-download fetches again on restart,
and the stored row makes the second fetch a no-op. The agent also runs the retention job.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import asyncpg
import faust

from infra.postgres.db import create_pool
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings
from infra.storage import MediaStore
from processors.agents.events import raw_record
from processors.media import GraphMedia, MediaFetcher, prune_media
from processors.shared_producer import SharedProducer
from processors.webhooks import RawRecord

log = get_logger("processors.agents.media")

NAME = "media"


class MediaAgent:
    def __init__(self, settings: Settings, producer: SharedProducer) -> None:
        self.settings = settings
        self.producer = producer
        self._pool: asyncpg.Pool | None = None
        self._graph: GraphMedia | None = None
        self._store: MediaStore | None = None
        self._fetcher: MediaFetcher | None = None
        self._slots: asyncio.Semaphore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pruning: asyncio.Task[None] | None = None
        self._manual: Any = None
        self.failed: BaseException | None = None

    async def start(self) -> None:
        settings = self.settings
        assert settings.database_url
        self.producer.acquire(NAME)
        self._pool = await create_pool(settings.database_url, min_size=1, max_size=settings.db_pool_max)
        self._store = MediaStore.from_settings(settings)
        self._graph = GraphMedia(
            settings.graph_api,
            settings.graph_api_version,
            connect_timeout_s=settings.media_connect_timeout_s,
            lookup_timeout_s=settings.media_lookup_timeout_s,
            read_timeout_s=settings.media_read_timeout_s,
        )
        token = settings.meta_access_token
        self._fetcher = MediaFetcher(
            self._pool,
            self._graph,
            self._store,
            self.producer.dead_letters,
            default_token=token.get_secret_value() if token else None,
            max_bytes=settings.media_max_bytes,
            concurrency=settings.media_fetch_concurrency,
            max_attempts=settings.media_max_attempts,
            backoff_initial_s=settings.media_backoff_initial_s,
            backoff_max_s=settings.media_backoff_max_s,
            download_max_s=settings.media_download_max_s,
            breaker_fail_max=settings.media_breaker_fail_max,
            breaker_reset_s=settings.media_breaker_reset_s,
            config_ttl_s=settings.company_cache_ttl_s,
        )
        self._slots = asyncio.Semaphore(settings.media_max_in_flight)
        self.failed = None
        if settings.media_retention_days > 0:
            self._pruning = asyncio.create_task(self._prune_forever(), name="media-retention")

    async def run(self, stream: faust.StreamT[Any]) -> None:
        assert self._slots is not None
        self._manual = stream.noack()  # type: ignore[attr-defined]
        async for event in self._manual.events():
            if self.failed is not None:
                # A job hit an error no rule covers: stop taking work; the worker restarts and the
                # unacknowledged jobs come back.
                raise self.failed
            await self._slots.acquire()
            task = asyncio.create_task(self._one(event, raw_record(event)), name="media-fetch")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, event: Any, raw: RawRecord) -> None:
        assert self._fetcher is not None and self._slots is not None
        try:
            await self._fetcher.handle(raw)
            await self._manual.ack(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("media.job_failed", partition=raw.partition, offset=raw.offset)
            self.failed = exc
        finally:
            self._slots.release()

    async def _prune_forever(self) -> None:
        assert self._pool is not None and self._store is not None
        settings = self.settings
        while True:
            # Jittered, so that many workers do not prune at once.
            await asyncio.sleep(settings.media_prune_interval_s * random.uniform(0.5, 1.5))
            try:
                await prune_media(self._pool, self._store, older_than_s=settings.media_retention_days * 86400)
            except Exception as exc:  # the next round tries again; serving is unaffected
                log.warning("media.prune_failed", error=repr(exc))

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._pruning] if self._pruning else [])]:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self._tasks, *([self._pruning] if self._pruning else []))
        self._pruning = None
        if self._graph is not None:
            await self._graph.close()
        if self._store is not None:
            await self._store.close()
        if self._pool is not None:
            await self._pool.close()
        await self.producer.release(NAME)
