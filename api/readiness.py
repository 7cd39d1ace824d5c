"""`/ready`: every dependency's state, answered within `ready_timeout_s` whatever hangs.

Each live check (Postgres, the broker, the WUZAPI breaker rows, the media store) is a `Probe`:
at most one call in flight, awaited for at most the deadline, so a hung dependency costs /ready
its deadline once, not a pile of stuck calls. Consumer lag and dead-letter depth need several
broker round trips, so a background task refreshes them every `broker_probe_interval_s` through
long-lived clients (infra.kafka.offsets), and /ready reports that snapshot with its age.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import asyncpg
import psutil
from aiokafka.errors import KafkaError

from api.db import Db
from api.errors import DatabaseUnavailable
from api.metrics import CONSUMER_LAG, DEAD_LETTERS, READY
from api.queries import BREAKERS, PING
from infra.kafka.offsets import BrokerOffsets, OffsetsError
from infra.kafka.topics import (
    ALL_TOPICS,
    META_MEDIA,
    META_MEDIA_DLQ,
    META_WEBHOOKS,
    META_WEBHOOKS_DLQ,
    WUZAPI_OUTBOUND,
    WUZAPI_OUTBOUND_DLQ,
)
from infra.postgres.db import DB_DOWN_ERRORS
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings
from infra.storage import MediaStore, StoreUnavailable

log = get_logger("api.ready")

T = TypeVar("T")

SOURCE_TOPICS = (META_WEBHOOKS, WUZAPI_OUTBOUND, META_MEDIA)
DEAD_LETTER_TOPICS = (META_WEBHOOKS_DLQ, WUZAPI_OUTBOUND_DLQ, META_MEDIA_DLQ)
BROKER_ERRORS: tuple[type[BaseException], ...] = (KafkaError, OffsetsError, OSError, TimeoutError)


class NotConnected(OffsetsError):
    """The background monitor has no broker connection (yet, or any more)."""


class Probe(Generic[T]):
    """One check, single-flight: a caller waits at most its deadline; a slow call keeps running
    and the callers meanwhile learn it timed out, instead of starting another."""

    def __init__(self, run: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._run = run
        self._task: asyncio.Task[T] | None = None

    async def __call__(self, timeout_s: float) -> T:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
            self._task.add_done_callback(_retrieve)
        task = self._task
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            raise TimeoutError(f"no answer within {timeout_s * 1000:.0f} ms")
        return task.result()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A probe that failed after its caller gave up: its error was reported as a timeout already.
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True, slots=True)
class BrokerSnapshot:
    at: float | None = None  # time.monotonic() of the last complete refresh
    lag: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    lag_partitions: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> lag


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Readiness:
    def __init__(
        self,
        settings: Settings,
        get_pool: Callable[[], asyncpg.Pool | None],
        store: MediaStore,
    ) -> None:
        assert settings.kafka_bootstrap
        self._settings = settings
        self._bootstrap = settings.kafka_bootstrap
        self._get_pool = get_pool
        self._timeout_s = settings.ready_timeout_s
        self._interval_s = settings.broker_probe_interval_s
        self._offsets: BrokerOffsets | None = None
        self._started = False
        self.snapshot = BrokerSnapshot()
        self._task: asyncio.Task[None] | None = None
        self._postgres = Probe(self._ping_postgres)
        self._breakers = Probe(self._read_breakers)
        self._broker = Probe(self._ping_broker)
        self._store = store
        self._store_probe = Probe(self._ping_store)
        self._process = psutil.Process()

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="ready-monitor")

    async def stop(self) -> None:
        for probe in (self._postgres, self._breakers, self._broker, self._store_probe):
            probe.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._reset()

    # Live checks.

    async def _ping_postgres(self) -> None:
        async with self._acquire() as db:
            await db.fetchval(PING)

    async def _read_breakers(self) -> list[dict[str, Any]]:
        async with self._acquire() as db:
            rows = await db.fetch(BREAKERS)
        return [
            {
                "instance": r["instance"],
                "state": r["state"],
                "failures": r["failures"],
                "opened_at": r["opened_at"].isoformat() if r["opened_at"] else None,
            }
            for r in rows
        ]

    @contextlib.asynccontextmanager
    async def _acquire(self) -> Any:
        pool = self._get_pool()
        if pool is None:
            raise DatabaseUnavailable("no database pool")
        try:
            async with pool.acquire() as conn:
                yield Db(conn, slow_ms=self._settings.slow_query_ms)
        except DB_DOWN_ERRORS as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc

    async def _ping_broker(self) -> None:
        offsets = self._offsets
        if offsets is None or not self._started:
            raise NotConnected(self.snapshot.error or "not connected yet")
        await offsets.ping()

    async def _ping_store(self) -> None:
        await self._store.ping()

    # The background snapshot of lag and dead letters.

    async def _watch(self) -> None:
        failures = 0
        while True:
            try:
                async with asyncio.timeout(max(3.0, 2 * self._interval_s)):
                    await self._refresh()
                if self.snapshot.error is None and failures:
                    log.info("ready.broker_recovered")
                failures = 0
            except BROKER_ERRORS as exc:
                failures += 1
                error = _describe(exc)
                if failures == 1:
                    log.warning("ready.broker_refresh_failed", error=error)
                self.snapshot = BrokerSnapshot(
                    at=self.snapshot.at,
                    lag=self.snapshot.lag,
                    dead_letters=self.snapshot.dead_letters,
                    error=error,
                    lag_partitions=self.snapshot.lag_partitions,
                )
                # Fresh clients after repeated failures, or when they never got started.
                if failures >= 2 or not self._started:
                    await self._reset()
            except Exception:
                # A bug, not an outage: log it loudly, and keep /ready's snapshot refreshing
                # (nothing is lost by retrying: the monitor only reads).
                log.exception("ready.refresh_crashed")
                failures += 1
                await self._reset()
            await asyncio.sleep(self._interval_s * random.uniform(0.8, 1.2))

    async def _reset(self) -> None:
        offsets, self._offsets, self._started = self._offsets, None, False
        if offsets is not None:
            try:
                await asyncio.wait_for(offsets.stop(), timeout=2.0)
            except BROKER_ERRORS as exc:
                log.warning("ready.broker_clients_stop_failed", error=_describe(exc))

    async def _refresh(self) -> None:
        offsets = self._offsets
        if offsets is None:
            offsets = self._offsets = BrokerOffsets(self._bootstrap, request_timeout_ms=5_000)
            await offsets.start()
            self._started = True
        tps = await offsets.partitions(ALL_TOPICS)
        missing = set(ALL_TOPICS) - {tp.topic for tp in tps}
        if missing:
            raise NotConnected(f"topics missing on the broker: {', '.join(sorted(missing))}")
        ends = await offsets.end_offsets(tps)
        # Where retention has deleted the oldest records, they count neither as lag nor as kept.
        begins = await offsets.beginning_offsets(tps)
        sources = [tp for tp in tps if tp.topic in SOURCE_TOPICS]
        committed = await offsets.committed(self._settings.worker_app_id, sources)
        lag = dict.fromkeys(SOURCE_TOPICS, 0)
        per_partition: dict[str, int] = {}
        for tp in sorted(sources, key=lambda t: (t.topic, t.partition)):
            # Never committed: the group starts from the earliest offset, so everything is lag.
            behind = max(0, ends[tp] - max(begins[tp], committed.get(tp) or 0))
            lag[tp.topic] += behind
            per_partition[f"{tp.topic}:{tp.partition}"] = behind
        dead = dict.fromkeys(DEAD_LETTER_TOPICS, 0)
        for tp in tps:
            if tp.topic in dead:
                dead[tp.topic] += ends[tp] - begins[tp]
        for topic, n in lag.items():
            CONSUMER_LAG.labels(topic).set(n)
        for topic, n in dead.items():
            DEAD_LETTERS.labels(topic).set(n)
        self.snapshot = BrokerSnapshot(
            at=time.monotonic(), lag=lag, dead_letters=dead, error=None, lag_partitions=per_partition
        )

    # The answer.

    async def _check(self, probe: Probe[Any], name: str) -> tuple[dict[str, Any], Any]:
        started = time.perf_counter()
        try:
            value = await probe(self._timeout_s)
        except TimeoutError as exc:
            READY.labels(name).set(0)
            return {"status": "down", "error": f"timeout: {exc}"}, None
        except (*BROKER_ERRORS, DatabaseUnavailable, asyncpg.PostgresError, StoreUnavailable) as exc:
            READY.labels(name).set(0)
            detail = exc.detail if isinstance(exc, DatabaseUnavailable) else _describe(exc)
            return {"status": "down", "error": detail}, None
        READY.labels(name).set(1)
        return {"status": "up", "ms": round((time.perf_counter() - started) * 1000, 2)}, value

    def _snapshot_view(self) -> tuple[dict[str, Any], dict[str, Any]]:
        snap = self.snapshot
        age = None if snap.at is None else round(time.monotonic() - snap.at, 2)
        stale_after = max(5.0, 4 * self._interval_s)
        if age is None:
            status = "unknown"
        elif age > stale_after or snap.error is not None:
            status = "stale"
        else:
            status = "ok"
        common: dict[str, Any] = {"status": status, "age_s": age}
        if snap.error is not None:
            common["error"] = snap.error
        lag = {
            **common,
            "group": self._settings.worker_app_id,
            "topics": snap.lag,
            "total": sum(snap.lag.values()),
        }
        dead = {**common, "topics": snap.dead_letters, "total": sum(snap.dead_letters.values())}
        return lag, dead

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """Whether the API can serve (Postgres and broker up), and the state of everything.

        The media store is reported, not required: with it down, everything but files is served
        (and files answer 503 `store_unavailable`), so the API stays in rotation."""
        (postgres, _), (broker, _), (wuzapi, breakers), (store, _) = await asyncio.gather(
            self._check(self._postgres, "postgres"),
            self._check(self._broker, "broker"),
            self._check(self._breakers, "wuzapi"),
            self._check(self._store_probe, "media_store"),
        )
        store = {**store, "kind": self._store.kind}
        if breakers is not None:
            not_closed = [b for b in breakers if b["state"] != "closed"]
            wuzapi = {
                "status": "degraded" if not_closed else "up",
                "open": len(not_closed),
                "breakers": breakers,
            }
        else:
            wuzapi = {**wuzapi, "status": "unknown"}
        lag, dead = self._snapshot_view()
        memory = {"status": "ok", "rss_bytes": self._process.memory_info().rss}
        down = [
            name for name, check in (("postgres", postgres), ("broker", broker)) if check["status"] != "up"
        ]
        ready = not down
        body = {
            "status": "ready" if ready else "unavailable",
            "down": down,
            "checks": {
                "postgres": postgres,
                "broker": broker,
                "wuzapi": wuzapi,
                "media_store": store,
                "consumer_lag": lag,
                "dead_letters": dead,
                "memory": memory,
            },
        }
        return ready, body
