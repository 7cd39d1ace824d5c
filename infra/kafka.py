"""A thin, honest wrapper around the aiokafka producer.

Lazy: no network until the first send, so a process starts while the broker is down and
recovers when it returns. Durable: acks=all, and the caller learns a record is safe only when
the broker acknowledged it. Concurrent sends share batches (a small linger), which is what makes
acks=all cheap under load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from infra.logging import get_logger

log = get_logger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge in time; nothing may be reported as durable."""


class DurableProducer:
    def __init__(
        self,
        bootstrap: str,
        *,
        linger_ms: int = 2,
        request_timeout_ms: int = 10_000,
        enable_idempotence: bool = False,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._linger_ms = linger_ms
        self._request_timeout_ms = request_timeout_ms
        # Tansu has no InitProducerId, so idempotence must stay off against it; real Kafka may
        # turn it on. Redelivered records are deduplicated by the consumer's unique keys anyway.
        self._enable_idempotence = enable_idempotence
        # Run before each (re)start, e.g. to declare topics on a broker that came back empty.
        self._prepare = prepare
        self._producer: AIOKafkaProducer | None = None
        self._prepared = prepare is None
        self._lock = asyncio.Lock()

    async def _ensure_started(self) -> AIOKafkaProducer:
        if self._producer is not None and self._prepared:
            return self._producer
        async with self._lock:
            if not self._prepared and self._prepare is not None:
                await self._prepare()
                self._prepared = True
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    acks="all",
                    linger_ms=self._linger_ms,
                    enable_idempotence=self._enable_idempotence,
                    request_timeout_ms=self._request_timeout_ms,
                    max_request_size=8 * 1024 * 1024,
                    # Thousands of concurrent sends would otherwise queue behind full 16 KiB
                    # batches and time out together; larger batches are what acks=all needs.
                    max_batch_size=1024 * 1024,
                    compression_type=None,
                )
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
                log.info("producer.started", bootstrap=self._bootstrap)
        return self._producer

    async def send_all(
        self,
        topic: str,
        records: Sequence[tuple[bytes | None, bytes]],
        *,
        timeout_s: float,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Send every record and return once the broker acknowledged all of them.

        Raises BrokerUnavailable when that does not happen within `timeout_s`. A record that
        timed out may still land later: that is a duplicate for the consumer to absorb, never a loss.
        """
        try:
            async with asyncio.timeout(timeout_s):
                producer = await self._ensure_started()
                futures = [
                    await producer.send(topic, value, key=key, headers=headers) for key, value in records
                ]
                await asyncio.gather(*futures)
        except (TimeoutError, KafkaError, OSError) as exc:
            # The broker may come back empty (the embedded one keeps topics in memory, and acks a
            # produce to a topic it no longer has without storing it): declare again before the
            # next send.
            self._prepared = self._prepare is None
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
