"""The WUZAPI breakers' transitions, written to `wuzapi_breakers` for the read API.

The breaker calls back synchronously on every transition; the row is written in a background task
of its own, so a call never waits on Postgres for it. A write that fails is logged and dropped: the
breaker still works, only the read API's view of it is stale until the next transition.
"""

from __future__ import annotations

import asyncio

import asyncpg

from infra.runtime.logging import get_logger

log = get_logger("processors.breakers")

UPSERT_BREAKER = """
INSERT INTO wuzapi_breakers (instance, state, failures, opened_at, updated_at)
VALUES ($1, $2, $3, CASE WHEN $2 = 'open' THEN now() END, now())
ON CONFLICT (instance) DO UPDATE
   SET state = EXCLUDED.state, failures = EXCLUDED.failures,
       opened_at = CASE WHEN EXCLUDED.state = 'open' THEN now() ELSE wuzapi_breakers.opened_at END,
       updated_at = now()
"""


class BreakerRecorder:
    """Records each transition through `pool`, fire and forget: `changed` is the client's
    `on_breaker_change`."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # The tasks in flight, held so that none is collected before it ran.
        self._background: set[asyncio.Task[None]] = set()

    def changed(self, instance: str, state: str, failures: int) -> None:
        task = asyncio.get_running_loop().create_task(self._record(instance, state, failures))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _record(self, instance: str, state: str, failures: int) -> None:
        try:
            await self.pool.execute(UPSERT_BREAKER, instance, state, failures)
        except Exception as exc:  # the breaker still works; only the read API's view is stale
            log.warning("wuzapi.breaker_not_recorded", instance=instance, error=repr(exc))
