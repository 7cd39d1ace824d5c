"""What the API's routes need, with an explicit lifecycle (started and stopped by the lifespan).

Start-up touches Postgres only (a small pool); the broker clients start lazily (the producer at
the first reply, the readiness monitor in the background), so the API starts in well under a
second and keeps serving sessions and reads while the broker is down.
"""

from __future__ import annotations

import asyncio

import asyncpg

from api.cursor import CursorCodec
from api.ops.console import OpsConsole
from api.readiness import Readiness
from api.sessions import Sessions, derive_key, load_session_secret
from infra.kafka.producer import DurableProducer
from infra.kafka.topics import declare_in_background
from infra.postgres.db import create_pool
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings
from infra.storage import MediaStore

log = get_logger("api")


async def _keep_session_state(conn: asyncpg.Connection) -> None:
    """What the pool runs on release instead of asyncpg's reset statement.

    asyncpg's default sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`
    on every release: a round trip and as much database work as the session lookup, per request.
    The API leaves none of that state behind (no session-level SET, LISTEN, advisory lock or
    cursor: api/db.py's statements refuse such SQL when built, and tests/api/test_pool_state.py
    asks a running API's pooled connections after every route), and asyncpg still rolls back a
    transaction left open and drops listeners before it calls this.
    """


class ApiService:
    def __init__(self, settings: Settings) -> None:
        assert settings.database_url and settings.kafka_bootstrap
        self.settings = settings
        secret = load_session_secret(settings)
        self.sessions = Sessions(settings, secret)
        self.cursors = CursorCodec(derive_key(secret, "cursor"))
        self._pool: asyncpg.Pool | None = None
        bootstrap = settings.kafka_bootstrap

        self.producer = DurableProducer(
            bootstrap,
            linger_ms=settings.producer_linger_ms,
            request_timeout_ms=int(settings.produce_timeout_s * 1000),
        )
        # Media files: served from here, and reply attachments stored here (infra/storage).
        self.media_store = MediaStore.from_settings(settings)
        self.readiness = Readiness(settings, self._get_pool, self.media_store)
        self.ops = OpsConsole(settings, secret, lambda: self.readiness.snapshot)
        self._tasks: list[asyncio.Task[None]] = []

    def _get_pool(self) -> asyncpg.Pool | None:
        return self._pool

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "ApiService is not started"
        return self._pool

    async def start(self) -> None:
        assert self.settings.database_url
        self._pool = await create_pool(
            self.settings.database_url,
            min_size=self.settings.db_pool_min,
            max_size=self.settings.db_pool_max,
            command_timeout=self.settings.api_db_timeout_s,
            reset=_keep_session_state,
            # The API's statements are index scans (keyset order and a LIMIT) whose right plan does
            # not depend on the values; left on `auto`, Postgres re-planned the conversation list
            # at every call (BENCHMARKS.md, "Figures behind the code's choices").
            server_settings={"plan_cache_mode": "force_generic_plan"},
        )
        self._tasks.append(
            declare_in_background(
                self.settings.kafka_bootstrap or "",
                partitions=self.settings.topic_partitions,
                replication=self.settings.topic_replication,
            )
        )
        self._tasks.append(
            asyncio.create_task(
                self.sessions.prune_forever(
                    self._pool,
                    interval_s=self.settings.session_prune_interval_s,
                    slow_ms=self.settings.slow_query_ms,
                ),
                name="session-prune",
            )
        )
        self.readiness.start()
        self.ops.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for task, result in zip(self._tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("api.task_failed", task=task.get_name(), exc_info=result)
        self._tasks.clear()
        await self.ops.stop()
        await self.readiness.stop()
        await self.producer.stop()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except TimeoutError:
                log.warning("api.pool_close_timeout")
                pool.terminate()
