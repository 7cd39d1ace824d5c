"""The embedded broker's (Tansu's) offset quirks, and infra.broker_compat's way around them.

On Tansu, `end_offsets` (ListOffsets, latest) answers 1 for a partition holding one batch of
100 records, and the admin client's `list_consumer_group_offsets` fails. BrokerOffsets reads
the fetch high watermark and a consumer's `committed()` instead, which are right on Tansu and
on Kafka alike. The quirk assertions run only against the embedded broker: if one fails after a
Tansu upgrade, the quirk is gone and the workaround may go too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from infra.broker_compat import BrokerOffsets, PartitionReset, read_from
from infra.topics import declare_topics
from tests.support import ServiceUrls, wait_until


async def _produce(bootstrap: str, topic: str, n: int) -> None:
    """`n` records sent together, so that they travel in one batch."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=50)
    await producer.start()
    try:
        sends = [await producer.send(topic, b"x" * 10, partition=0) for _ in range(n)]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


@pytest.fixture
async def topic(services: ServiceUrls) -> str:
    name = f"compat-{uuid.uuid4().hex[:8]}"
    await declare_topics(services.kafka_bootstrap, partitions=2, replication=1, topics=(name,))
    return name


@pytest.fixture
async def offsets(services: ServiceUrls) -> AsyncIterator[BrokerOffsets]:
    reader = BrokerOffsets(services.kafka_bootstrap)
    await reader.start()
    try:
        yield reader
    finally:
        await reader.stop()


async def test_end_of_partition_comes_from_the_fetch_watermark(
    services: ServiceUrls, topic: str, offsets: BrokerOffsets
):
    await _produce(services.kafka_bootstrap, topic, 100)
    tp, empty = TopicPartition(topic, 0), TopicPartition(topic, 1)

    if services.broker is not None:
        consumer = AIOKafkaConsumer(bootstrap_servers=services.kafka_bootstrap)
        await consumer.start()
        try:
            # The quirk: ListOffsets counts the batch, not its records.
            assert (await consumer.end_offsets([tp]))[tp] != 100
        finally:
            await consumer.stop()

    assert await offsets.partitions([topic]) == [tp, empty]
    assert await offsets.high_watermarks([tp, empty]) == {tp: 100, empty: 0}

    # Later records move the mark; the reader already stands at the old one.
    await _produce(services.kafka_bootstrap, topic, 5)

    async def moved() -> bool:
        return (await offsets.high_watermarks([tp, empty]))[tp] == 105

    await wait_until(moved, timeout_s=10, what="the watermark to reach 105")


async def test_committed_offsets_come_from_a_consumer_not_the_admin_client(
    services: ServiceUrls, topic: str, offsets: BrokerOffsets
):
    group = f"group-{uuid.uuid4().hex[:8]}"
    tp, other = TopicPartition(topic, 0), TopicPartition(topic, 1)
    committer = AIOKafkaConsumer(
        bootstrap_servers=services.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await committer.start()
    try:
        committer.assign([tp])
        await committer.commit({tp: 42})
    finally:
        await committer.stop()

    assert await offsets.committed(group, [tp, other]) == {tp: 42, other: None}

    if services.broker is not None:
        admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap, request_timeout_ms=5_000)
        await admin.start()
        try:
            # The quirk: the OffsetFetch answer does not decode, and the connection drops.
            with pytest.raises(KafkaError):
                async with asyncio.timeout(10):
                    await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()


async def test_read_from_reads_only_what_was_added_and_notices_a_reset(services: ServiceUrls, topic: str):
    """What the console's dead-letter views rely on to read only new records each time."""
    await _produce(services.kafka_bootstrap, topic, 100)
    first, ends = await read_from(services.kafka_bootstrap, topic)
    assert len(first) == 100 and ends == {0: 100, 1: 0}
    await _produce(services.kafka_bootstrap, topic, 5)
    added, ends = await read_from(services.kafka_bootstrap, topic, ends)
    assert [r.offset for r in added] == [100, 101, 102, 103, 104] and ends == {0: 105, 1: 0}
    nothing, _ = await read_from(services.kafka_bootstrap, topic, ends)
    assert nothing == []
    # Positions past the end: the topic was recreated since, so the caller must start over.
    with pytest.raises(PartitionReset):
        await read_from(services.kafka_bootstrap, topic, {0: 500})
