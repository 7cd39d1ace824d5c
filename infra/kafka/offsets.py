"""Partition offsets: where each partition begins and ends, what a consumer group committed, and
reading a topic from a point to its end.

Plain Kafka requests through long-lived clients: `ListOffsets` (a consumer's `end_offsets` and
`beginning_offsets`, no group) for the ends of partitions, and the admin client's `OffsetFetch`
(`list_consumer_group_offsets`) for a group's commits, which never joins the group. Start once,
ask often.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.cluster import ClusterMetadata


class OffsetsError(RuntimeError):
    """Offsets could not be read; the broker's own errors stay aiokafka's KafkaError."""


class PartitionReset(OffsetsError):
    """A partition ends before an offset already read from it: it was deleted and recreated."""


class EndNotReached(OffsetsError):
    """A topic could not be read to its end in time."""


class BrokerOffsets:
    """Partition ends and committed offsets, through long-lived clients. Not thread-safe."""

    def __init__(self, bootstrap: str, *, request_timeout_ms: int = 5_000) -> None:
        self._bootstrap = bootstrap
        self._request_timeout_ms = request_timeout_ms
        self._admin: AIOKafkaAdminClient | None = None
        self._ends: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap, request_timeout_ms=self._request_timeout_ms
        )
        ends = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=self._request_timeout_ms,
        )
        try:
            await admin.start()
            await ends.start()
        except BaseException:
            await ends.stop()
            await admin.close()
            raise
        self._admin, self._ends = admin, ends

    async def stop(self) -> None:
        admin, ends, self._admin, self._ends = self._admin, self._ends, None, None
        if ends is not None:
            await ends.stop()
        if admin is not None:
            await admin.close()

    def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._ends is None:
            raise OffsetsError("BrokerOffsets is not started")
        return self._admin, self._ends

    async def ping(self) -> None:
        """One metadata round trip: the cheapest request that proves the broker answers."""
        _, ends = self._clients()
        await _metadata(ends)

    async def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        _, ends = self._clients()
        cluster = await _metadata(ends)
        return [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in sorted(cluster.partitions_for_topic(topic) or ())
        ]

    async def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset the next record of each partition will get."""
        _, ends = self._clients()
        return dict(await ends.end_offsets(list(tps)))

    async def beginning_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The first offset still kept in each partition (later than 0 once retention deleted)."""
        _, ends = self._clients()
        return dict(await ends.beginning_offsets(list(tps)))

    async def committed(
        self, group_id: str, tps: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        """The group's committed offset of each partition (None: never committed)."""
        admin, _ = self._clients()
        found = await admin.list_consumer_group_offsets(group_id, partitions=list(tps))
        # Kafka answers offset -1 for a partition the group never committed.
        return {tp: (found[tp].offset if tp in found and found[tp].offset >= 0 else None) for tp in tps}


async def _metadata(consumer: AIOKafkaConsumer) -> ClusterMetadata:
    """The cluster's metadata, fetched now. `consumer.topics()` fetches it too but returns only
    the names, and leaves `partitions_for_topic` to the consumer's own, possibly older, copy."""
    return await consumer._client.fetch_all_metadata()


async def read_to_end(
    bootstrap: str, topic: str, *, timeout_s: float = 15.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on `topic` now, from the start of each partition; [] if there is no such topic."""
    records, _ = await read_from(bootstrap, topic, timeout_s=timeout_s)
    return records


async def read_from(
    bootstrap: str,
    topic: str,
    start: Mapping[int, int] | None = None,
    *,
    timeout_s: float = 15.0,
) -> tuple[list[ConsumerRecord[bytes, bytes]], dict[int, int]]:
    """The records of `topic` from `start` (partition: offset; the beginning where not given) to
    its end as it is now, and each partition's end. Raises PartitionReset when a partition ends
    before its start (the topic was recreated: read it again from the start)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    deadline = time.monotonic() + timeout_s
    try:
        await consumer.start()
        partitions = (await _metadata(consumer)).partitions_for_topic(topic) or set()
        if not partitions:
            return [], {}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = await consumer.end_offsets(tps)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            begin = (start or {}).get(tp.partition)
            if begin is None:
                continue
            if begin > ends[tp]:
                raise PartitionReset(f"{tp} ends at {ends[tp]}, before {begin}")
            consumer.seek(tp, begin)
        out: list[ConsumerRecord[bytes, bytes]] = []
        pending = set(tps)
        while pending:
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise EndNotReached(f"could not read {topic} to its end within {timeout_s}s")
            batch = await consumer.getmany(*pending, timeout_ms=200)
            for tp, records in batch.items():
                out.extend(r for r in records if r.offset < ends[tp])
        return out, {tp.partition: ends[tp] for tp in tps}
    finally:
        await consumer.stop()
