"""A thin, honest wrapper around the aiokafka producer.

Lazy: no network until the first send, so a process starts while the broker is down and
recovers when it returns. Durable: acks=all, and the caller learns a record is safe only when
the broker acknowledged it. Idempotent: the broker drops a batch the producer sends again after
a lost answer, so a retry inside the producer never writes a record twice. Concurrent sends share
batches (a small linger), which is what makes acks=all cheap under load.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from infra.runtime.logging import get_logger

log = get_logger(__name__)


class BrokerUnavailable(RuntimeError):
    """The broker did not acknowledge in time; nothing may be reported as durable."""


@lru_cache(maxsize=1 << 16)
def partition_index(key: bytes, count: int) -> int:
    """aiokafka's DefaultPartitioner for a key: murmur2, positive, modulo the partition count.

    Its pure-Python murmur2 costs ~10 us a key; the same conversation's key comes back often.
    """
    index: int = (murmur2(key) & 0x7FFFFFFF) % count
    return index


async def _all_acked(acks: list[asyncio.Future[Any]]) -> None:
    """Wait until every future resolved; raise the first failure.

    A batch resolves all of its records at once, so waiting on the last record usually finds
    the others done: cheaper than gather's callback per record on a 1,000-record POST.
    """
    try:
        for ack in reversed(acks):
            if not ack.done():
                await ack
            else:
                ack.result()  # raises the send's error, if any
    except BaseException:
        # The others fail or are cancelled too: retrieve their errors, so asyncio does not log
        # each one as never retrieved.
        for ack in acks:
            ack.add_done_callback(_retrieve)
        raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class DurableProducer:
    def __init__(
        self,
        bootstrap: str,
        *,
        linger_ms: int = 2,
        request_timeout_ms: int = 10_000,
    ) -> None:
        self._bootstrap = bootstrap
        self._linger_ms = linger_ms
        self._request_timeout_ms = request_timeout_ms
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _ensure_started(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    acks="all",
                    linger_ms=self._linger_ms,
                    # A send that the broker stored but whose answer was lost is retried by the
                    # producer; the broker recognises it by producer id and sequence number.
                    enable_idempotence=True,
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

        Records of one key keep their order (same partition as aiokafka's default partitioner).
        Raises BrokerUnavailable when that does not happen within `timeout_s`. A record that
        timed out may still land later: that is a duplicate for the consumer to absorb, never a loss.
        """
        try:
            async with asyncio.timeout(timeout_s):
                producer = await self._ensure_started()
                # Known after the first send; asking for it again would wait on metadata.
                known = producer.client.cluster.partitions_for_topic(topic)
                partitions: list[int] = list(known or await producer.partitions_for(topic))
                count = len(partitions)
                acks: list[asyncio.Future[Any]] = []
                for key, value in records:
                    # Same partition as aiokafka's default partitioner would pick, without
                    # hashing the key again: a conversation's records keep their order.
                    if key is None:
                        partition = self._any_partition(producer, topic, partitions)
                    else:
                        partition = partitions[partition_index(key, count)]
                    # send() only enqueues: the records join the batches that concurrent requests
                    # fill. Not create_batch/send_batch: a private batch per POST waits for the
                    # partition's previous batch to drain (one POST per produce round trip, every
                    # waiter woken on each drain, and aiokafka 0.14's add_batch counts its timeout
                    # down cumulatively): measured slower, with 503s (BENCHMARKS.md, "Figures
                    # behind the code's choices").
                    acks.append(
                        await producer.send(topic, value, key=key, partition=partition, headers=headers)
                    )
                await _all_acked(acks)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _any_partition(producer: AIOKafkaProducer, topic: str, partitions: list[int]) -> int:
        """What aiokafka does for a record without a key: any partition that has a leader."""
        available: list[int] = list(producer.client.cluster.available_partitions_for_topic(topic))
        return random.choice(available or partitions)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
