"""A breaker's transition is written in the background; a write that fails is logged, not raised."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import asyncpg
from structlog.testing import capture_logs

from processors.breakers import UPSERT_BREAKER, BreakerRecorder


class FakePool:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[Any, ...]] = []

    async def execute(self, query: str, *args: Any) -> str:
        self.calls.append((query, *args))
        if self.error is not None:
            raise self.error
        return "INSERT 0 1"


async def settle(recorder: BreakerRecorder) -> None:
    await asyncio.gather(*recorder._background)


async def test_a_transition_is_upserted_without_the_caller_waiting() -> None:
    pool = FakePool()
    recorder = BreakerRecorder(cast(asyncpg.Pool, pool))
    recorder.changed("instance-1", "open", 5)
    assert pool.calls == []  # the breaker's callback returned before the write
    await settle(recorder)
    assert pool.calls == [(UPSERT_BREAKER, "instance-1", "open", 5)]
    assert not recorder._background


async def test_a_failed_write_is_a_warning_and_the_breaker_goes_on() -> None:
    recorder = BreakerRecorder(cast(asyncpg.Pool, FakePool(OSError("database down"))))
    with capture_logs() as logs:
        recorder.changed("instance-1", "half-open", 0)
        await settle(recorder)
    [entry] = [e for e in logs if e["event"] == "wuzapi.breaker_not_recorded"]
    assert entry["log_level"] == "warning" and entry["instance"] == "instance-1"
    assert "database down" in entry["error"]
