"""The `outbound` agent: `wuzapi.outbound` records sent through WUZAPI (`processors.outbound`).

Each record goes to its tenant's lane (`TenantLanes`) and is acknowledged once sent or
dead-lettered; the stream acknowledges nothing by itself (`stream.noack()`).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import faust

from infra.postgres.db import create_pool
from infra.runtime.settings import Settings
from infra.storage import MediaStore
from processors.agents.events import raw_record
from processors.breakers import BreakerRecorder
from processors.outbound import OutboundSender, TenantLanes
from processors.shared_producer import SharedProducer
from processors.wuzapi import WuzapiClient

NAME = "outbound"


class OutboundAgent:
    def __init__(self, settings: Settings, producer: SharedProducer) -> None:
        self.settings = settings
        self.producer = producer
        self._pool: asyncpg.Pool | None = None
        self._client: WuzapiClient | None = None
        self._lanes: TenantLanes | None = None
        self._manual: Any = None  # the stream's manual-ack view, made by `run`

    async def start(self) -> None:
        settings = self.settings
        assert settings.database_url and settings.wuzapi_url
        self.producer.acquire(NAME)
        self._pool = await create_pool(settings.database_url, min_size=1, max_size=settings.db_pool_max)
        breakers = BreakerRecorder(self._pool)
        self._client = WuzapiClient(
            settings.wuzapi_url,
            connect_timeout_s=settings.wuzapi_connect_timeout_s,
            timeout_s=settings.wuzapi_timeout_s,
            media_timeout_s=settings.wuzapi_media_timeout_s,
            breaker_fail_max=settings.breaker_fail_max,
            breaker_reset_s=settings.breaker_reset_s,
            on_breaker_change=breakers.changed,
        )
        sender = OutboundSender(
            self._pool,
            self._client,
            self.producer.dead_letters,
            default_token=settings.wuzapi_token,
            max_attempts=settings.wuzapi_max_attempts,
            backoff_initial_s=settings.wuzapi_backoff_initial_s,
            backoff_max_s=settings.wuzapi_backoff_max_s,
            config_ttl_s=settings.company_cache_ttl_s,
            store=MediaStore.from_settings(settings),
        )
        self._lanes = TenantLanes(sender.handle, self._done, max_in_flight=settings.outbound_max_in_flight)

    async def run(self, stream: faust.StreamT[Any]) -> None:
        assert self._lanes is not None
        self._manual = stream.noack()  # type: ignore[attr-defined]
        async for event in self._manual.events():
            await self._lanes.submit(event, raw_record(event))

    async def stop(self) -> None:
        assert self._lanes is not None and self._client is not None and self._pool is not None
        await self._lanes.stop()
        await self._client.close()
        await self._pool.close()
        await self.producer.release(NAME)

    async def _done(self, event: Any) -> None:
        await self._manual.ack(event)
