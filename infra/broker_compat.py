"""Partition offsets read in a way that is right on Tansu (the embedded broker) and on Kafka.

Two Tansu quirks shape this module (tests/test_broker_compat.py shows both):
- `ListOffsets` for the latest offset is wrong when a batch holds several records (100 records in
  one batch: it answers 1). The high watermark that every fetch response carries is right, so
  the end of a partition is read from a fetch (`consumer.highwater(tp)`), never `end_offsets`.
- The admin client's `list_consumer_group_offsets` fails (the response does not decode and the
  connection drops). A consumer's `committed(tp)`, with the group id set, no subscription and
  auto-commit off, sends a plain OffsetFetch that works.

Both paths are also right on Kafka, so there is one path, not a branch per broker. The clients
are long-lived: start once, ask often (the fetcher keeps its partitions positioned at their
watermark, so later fetches carry no records, only the watermark).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.client import AIOKafkaClient

from infra.logging import get_logger

log = get_logger(__name__)


class BrokerOffsetsError(RuntimeError):
    """Offsets could not be read; the broker's own errors stay aiokafka's KafkaError."""


class OffsetsUnavailable(BrokerOffsetsError):
    """The broker did not report every partition's watermark in time."""


class PartitionReset(BrokerOffsetsError):
    """A partition ends before an offset already read from it: it was deleted and recreated."""


class BrokerOffsets:
    """High watermarks and committed offsets, through long-lived clients. Not thread-safe."""

    def __init__(self, bootstrap: str, *, request_timeout_ms: int = 5_000) -> None:
        self._bootstrap = bootstrap
        self._request_timeout_ms = request_timeout_ms
        self._client: AIOKafkaClient | None = None
        self._fetcher: AIOKafkaConsumer | None = None
        self._groups: dict[str, AIOKafkaConsumer] = {}

    async def start(self) -> None:
        client = AIOKafkaClient(
            bootstrap_servers=self._bootstrap, request_timeout_ms=self._request_timeout_ms
        )
        try:
            await client.bootstrap()
        except BaseException:
            await client.close()
            raise
        self._client = client
        # No group: this consumer only fetches, to learn watermarks. It starts at the earliest
        # offset because a reset to "latest" goes through the ListOffsets that Tansu answers wrongly.
        self._fetcher = await self._consumer(
            group_id=None,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
            max_partition_fetch_bytes=64 * 1024,
        )

    async def stop(self) -> None:
        consumers = [c for c in (self._fetcher, *self._groups.values()) if c is not None]
        client, self._client, self._fetcher = self._client, None, None
        self._groups.clear()
        for consumer in consumers:
            await consumer.stop()
        if client is not None:
            await client.close()

    async def _consumer(self, group_id: str | None, **kw: object) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            request_timeout_ms=self._request_timeout_ms,
            **kw,
        )
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    def _need_client(self) -> AIOKafkaClient:
        if self._client is None:
            raise BrokerOffsetsError("BrokerOffsets is not started")
        return self._client

    async def ping(self) -> None:
        """One metadata round trip: the cheapest request that proves the broker answers."""
        await self._need_client().fetch_all_metadata()

    async def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        cluster = await self._need_client().fetch_all_metadata()
        out: list[TopicPartition] = []
        for topic in topics:
            for partition in sorted(cluster.partitions_for_topic(topic) or ()):
                out.append(TopicPartition(topic, partition))
        return out

    async def high_watermarks(
        self, tps: Sequence[TopicPartition], *, timeout_s: float = 5.0
    ) -> dict[TopicPartition, int]:
        """The offset the next record of each partition will get, as the last fetch reported it."""
        fetcher = self._fetcher
        if fetcher is None:
            raise BrokerOffsetsError("BrokerOffsets is not started")
        if set(tps) != fetcher.assignment():
            fetcher.assign(list(tps))
        deadline = time.monotonic() + timeout_s
        while True:
            # Drain what the background fetcher buffered: we want its watermarks, not its records.
            await fetcher.getmany(timeout_ms=50)
            marks = {tp: fetcher.highwater(tp) for tp in tps}
            if all(mark is not None for mark in marks.values()):
                break
            if time.monotonic() > deadline:
                missing = sorted(str(tp) for tp, mark in marks.items() if mark is None)
                raise OffsetsUnavailable(f"no watermark yet for {', '.join(missing)}")
        found = {tp: int(mark) for tp, mark in marks.items() if mark is not None}
        for tp, mark in found.items():
            # Stand at the watermark, so the next fetches carry only new records and the mark.
            if await fetcher.position(tp) < mark:
                fetcher.seek(tp, mark)
        return found

    async def committed(
        self, group_id: str, tps: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (None: never committed)."""
        consumer = self._groups.get(group_id)
        if consumer is None:
            # Never subscribes, so it never joins the group; it only reads the group's offsets.
            consumer = await self._consumer(group_id=group_id)
            self._groups[group_id] = consumer
        offsets = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        return dict(zip(tps, offsets, strict=True))


async def read_to_end(
    bootstrap: str, topic: str, *, timeout_s: float = 15.0, wait_for_topic: bool = False
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on `topic` now, read from the start of each partition; [] if there is no
    such topic (with `wait_for_topic`, one that appears within `timeout_s` is read).

    The end of a partition is the high watermark its fetches return, not ListOffsets (above).
    Raises OffsetsUnavailable when the end is not reached in time; KafkaError is the broker's.
    """
    records, _ = await read_from(bootstrap, topic, timeout_s=timeout_s, wait_for_topic=wait_for_topic)
    return records


async def read_from(
    bootstrap: str,
    topic: str,
    start: Mapping[int, int] | None = None,
    *,
    timeout_s: float = 15.0,
    wait_for_topic: bool = False,
) -> tuple[list[ConsumerRecord[bytes, bytes]], dict[int, int]]:
    """The records of `topic` from `start` (partition: offset; the beginning where not given) to
    the end now, and each partition's end (its high watermark). Raises PartitionReset when a
    partition ends before its start (the topic was recreated: read it again from the start)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    deadline = time.monotonic() + timeout_s
    try:
        await consumer.start()
        partitions: set[int] = set()
        while True:
            await consumer.topics()  # a metadata request, so the topic's partitions are known
            partitions = consumer.partitions_for_topic(topic) or set()
            if partitions or not wait_for_topic or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if not partitions:
            return [], {}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            if start and start.get(tp.partition):
                consumer.seek(tp, start[tp.partition])
        out: list[ConsumerRecord[bytes, bytes]] = []
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(records)
            marks = [consumer.highwater(tp) for tp in tps]
            for tp, mark in zip(tps, marks, strict=True):
                if mark is not None and start and start.get(tp.partition, 0) > mark:
                    raise PartitionReset(f"{tp} ends at {mark}, before {start[tp.partition]}")
            positions = [await consumer.position(tp) for tp in tps]
            if all(m is not None and p >= m for p, m in zip(positions, marks, strict=True)):
                return out, {tp.partition: int(m) for tp, m in zip(tps, marks, strict=True) if m is not None}
        raise OffsetsUnavailable(f"could not read {topic} to its end within {timeout_s}s")
    finally:
        await consumer.stop()
