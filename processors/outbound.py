"""The `outbound` agent's work: one `wuzapi.outbound` record sent through WUZAPI, once.

Per record: skip it if its message is already sent (a redelivery or a second replay); take a
token from the tenant's bucket (every call does, retries and replays included); send; on a
transient failure retry with exponential backoff and full jitter (tenacity), honouring
Retry-After. While the instance's breaker is open nothing is sent and no attempt is spent: the
record waits and is tried again when the breaker lets a probe through. A 4xx, or attempts
exhausted on errors that are not an outage, sends it to `wuzapi.outbound.dlq`, and the lane
moves on. The message row follows: sent, or failed with the error.

Records are keyed by tenant; each tenant has its own lane (a queue and a task), so one tenant
waiting on a broken WUZAPI instance does not hold up the others, and a tenant's order is kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiolimiter import AsyncLimiter
from prometheus_client import Counter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from infra.kafka.deadletters import DeadLetterWriter, Prior, prior_of
from infra.kafka.topics import WUZAPI_OUTBOUND, WUZAPI_OUTBOUND_DLQ
from infra.postgres.db import is_transient
from infra.runtime.logging import get_logger
from infra.runtime.retry import until_it_passes
from infra.runtime.ttl_cache import TtlCache
from infra.storage import MediaStore, StoreUnavailable
from processors.webhooks import RawRecord
from processors.wuzapi import BreakerOpen, WuzapiClient, WuzapiPermanent, WuzapiTransient
from schemas.outbound import OutboundMessage, OutboundRecordError

log = get_logger("processors.outbound")

SENDS = Counter("cortexx_outbound_sends_total", "Outbound records by outcome", ["outcome"])
RETRIES = Counter("cortexx_outbound_retries_total", "Retries of transient WUZAPI failures")
BREAKER_WAITS = Counter("cortexx_outbound_breaker_waits_total", "Waits for an open breaker")
RATE_WAITS = Counter("cortexx_outbound_rate_limit_waits_total", "Sends that waited for the rate limit")

COMPANY_OUTBOUND = """
SELECT wuzapi_token, rate_limit_per_s, rate_limit_burst FROM companies WHERE id = $1
"""

MESSAGE_STATE = """
SELECT status, error->>'source' AS source FROM messages WHERE company_id = $1 AND external_id = $2
"""

MARK_SENT = """
UPDATE messages
   SET status = 'sent', status_rank = 1, status_at = now(), error = NULL, updated_at = now()
 WHERE company_id = $1 AND external_id = $2
   AND (status_rank < 1 OR (status = 'failed' AND error->>'source' = 'wuzapi'))
"""

MARK_FAILED = """
UPDATE messages
   SET status = 'failed', status_rank = 9, status_at = now(), error = $3, updated_at = now()
 WHERE company_id = $1 AND external_id = $2 AND status_rank < 1
"""


class _WaitHonouringRetryAfter(wait_base):  # type: ignore[misc]
    """Full-jitter exponential backoff, but never shorter than the gateway's Retry-After."""

    def __init__(self, inner: wait_base) -> None:
        self.inner = inner

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = float(self.inner(retry_state))
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, WuzapiTransient) and exc.retry_after_s:
            wait = max(wait, exc.retry_after_s)
        return wait


@dataclass
class TenantConfig:
    token: str
    limiter: AsyncLimiter
    rate: float
    burst: int


class OutboundSender:
    def __init__(
        self,
        pool: asyncpg.Pool,
        client: WuzapiClient,
        dead_letters: DeadLetterWriter,
        *,
        default_token: str,
        max_attempts: int,
        backoff_initial_s: float,
        backoff_max_s: float,
        config_ttl_s: float = 30.0,
        store: MediaStore | None = None,
    ) -> None:
        self.pool = pool
        self.client = client
        self.store = store
        self.dead_letters = dead_letters
        self.default_token = default_token
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._configs: TtlCache[int, TenantConfig] = TtlCache(ttl_s=config_ttl_s)

    async def _config(self, company_id: int) -> TenantConfig:
        entry = self._configs.entry(company_id)
        if entry is not None and entry.fresh:
            return entry.value
        config = entry.value if entry is not None else None
        row = await self.pool.fetchrow(COMPANY_OUTBOUND, company_id)
        token = (row["wuzapi_token"] if row else None) or self.default_token
        rate = float(row["rate_limit_per_s"]) if row else 20.0
        burst = int(row["rate_limit_burst"]) if row else 20
        if config is not None and (config.rate, config.burst) == (rate, burst):
            limiter = config.limiter  # keep its state: a refresh must not refill the bucket
        else:
            # A bucket of `burst` tokens refilled at `rate` per second.
            limiter = AsyncLimiter(burst, burst / rate)
        config = TenantConfig(token, limiter, rate, burst)
        self._configs.put(company_id, config)
        return config

    async def _db(self, query: str, *args: Any) -> Any:
        """A write that must happen: a database outage is retried until it passes."""
        return await until_it_passes(
            lambda: self.pool.fetchrow(query, *args),
            retry_if=is_transient,
            event="outbound.db_retry",
            initial_s=0.1,
        )

    async def handle(self, raw: RawRecord) -> None:
        prior = prior_of(raw.headers)
        try:
            message = OutboundMessage.from_bytes(raw.value)
        except OutboundRecordError as exc:
            await self._dead_letter(raw, None, exc, attempts=0, prior=prior)
            return
        if message.kind != "markread":
            state = await self._db(MESSAGE_STATE, message.company_id, message.id)
            if (
                state is not None
                and state["status"] in ("sent", "delivered", "read", "played", "failed")
                and not (state["status"] == "failed" and state["source"] == "wuzapi")
            ):
                SENDS.labels("already_sent").inc()
                log.info("outbound.already_sent", tenant=message.tenant, id=message.id)
                return
        config = await self._config(message.company_id)
        attempts = 0
        media = None
        if message.media_key is not None:
            try:
                media = await self._attachment(message.media_key)
            except WuzapiPermanent as exc:
                SENDS.labels("dead_lettered").inc()
                error = {"source": "wuzapi", "type": type(exc).__name__, "message": str(exc)}
                await self._db(MARK_FAILED, message.company_id, message.id, error)
                await self._dead_letter(raw, message.tenant, exc, attempts=0, prior=prior)
                return

        async def attempt() -> None:
            nonlocal attempts
            while True:
                if not config.limiter.has_capacity():
                    RATE_WAITS.inc()
                await config.limiter.acquire()
                try:
                    await self.client.send(config.token, message, media)
                    return
                except BreakerOpen as exc:
                    # An outage: wait for the breaker, spend no attempt, send nothing meanwhile.
                    BREAKER_WAITS.inc()
                    await asyncio.sleep(max(exc.wait_s, 0.05))
                except WuzapiTransient:
                    attempts += 1
                    raise

        try:
            async for retry in AsyncRetrying(
                retry=retry_if_exception_type(WuzapiTransient),
                stop=stop_after_attempt(self.max_attempts),
                wait=_WaitHonouringRetryAfter(
                    wait_random_exponential(multiplier=self.backoff_initial_s, max=self.backoff_max_s)
                ),
                before_sleep=lambda state: RETRIES.inc(),
                reraise=True,
            ):
                with retry:
                    await attempt()
        except (WuzapiPermanent, WuzapiTransient) as exc:
            SENDS.labels("dead_lettered").inc()
            if message.kind != "markread":
                error = {"source": "wuzapi", "type": type(exc).__name__, "message": str(exc)}
                await self._db(MARK_FAILED, message.company_id, message.id, error)
            await self._dead_letter(raw, message.tenant, exc, attempts=max(attempts, 1), prior=prior)
            return
        SENDS.labels("sent").inc()
        if message.kind != "markread":
            await self._db(MARK_SENT, message.company_id, message.id)
        log.info(
            "outbound.sent",
            tenant=message.tenant,
            id=message.id,
            kind=message.kind,
            origin=message.origin,
            attempts=attempts + 1,
            partition=raw.partition,
            offset=raw.offset,
        )

    async def _attachment(self, key: str) -> Callable[[], AsyncIterator[bytes]]:
        """The attachment's bytes, read afresh from the media store for each attempt. A file that
        is not there can never be sent (permanent); a store that is away is waited out."""
        store = self.store
        if store is None:
            raise WuzapiPermanent("this worker has no media store for attachments")
        size = await until_it_passes(
            lambda: store.size(key),
            retry_if=lambda exc: isinstance(exc, StoreUnavailable),
            event="outbound.store_retry",
        )
        if size is None:
            raise WuzapiPermanent(f"attachment {key} is not in the media store")

        async def chunks() -> AsyncIterator[bytes]:
            async with await store.open(key) as stored:
                async for chunk in stored.chunks():
                    yield chunk

        return chunks

    async def _dead_letter(
        self, raw: RawRecord, tenant: str | None, exc: BaseException, *, attempts: int, prior: Prior
    ) -> None:
        letter = raw.dead_letter(tenant, exc, attempts=attempts, prior=prior)
        info = letter.error
        log.error(
            "outbound.dead_lettered",
            tenant=tenant,
            partition=raw.partition,
            offset=raw.offset,
            error=info.type,
            detail=info.message[:500],
            attempts=info.attempts,
        )
        await self.dead_letters.write(WUZAPI_OUTBOUND_DLQ, letter)


class TenantLanes:
    """One sequential lane per key (tenant), run concurrently, with a cap on records in flight."""

    def __init__(
        self,
        handle: Callable[[RawRecord], Awaitable[None]],
        done: Callable[[Any], Awaitable[None]],
        *,
        max_in_flight: int,
    ) -> None:
        self.handle = handle
        self.done = done
        self._slots = asyncio.Semaphore(max_in_flight)
        self._lanes: dict[bytes, asyncio.Queue[tuple[Any, RawRecord]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.failed: BaseException | None = None

    async def submit(self, token: Any, raw: RawRecord) -> None:
        if self.failed is not None:
            # A lane hit an error it cannot handle: stop taking work; the worker restarts and the
            # unacknowledged records come back.
            raise self.failed
        await self._slots.acquire()
        key = raw.key or b""
        queue = self._lanes.get(key)
        if queue is None:
            queue = asyncio.Queue()
            self._lanes[key] = queue
            task = asyncio.create_task(self._run(queue), name=f"outbound-lane-{key!r}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.put_nowait((token, raw))

    async def _run(self, queue: asyncio.Queue[tuple[Any, RawRecord]]) -> None:
        while True:
            token, raw = await queue.get()
            try:
                await self.handle(raw)
                await self.done(token)
            except Exception as exc:
                log.exception("outbound.lane_failed", partition=raw.partition, offset=raw.offset)
                self.failed = exc
                raise
            finally:
                self._slots.release()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["WUZAPI_OUTBOUND", "OutboundSender", "TenantLanes"]
