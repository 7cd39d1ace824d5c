"""Topic names and their declaration: every process declares what it uses at start, because
the embedded broker keeps topics in memory and may come back empty."""

from __future__ import annotations

import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from infra.logging import get_logger

log = get_logger(__name__)

META_WEBHOOKS = "meta.webhooks"
META_WEBHOOKS_DLQ = "meta.webhooks.dlq"
WUZAPI_OUTBOUND = "wuzapi.outbound"
WUZAPI_OUTBOUND_DLQ = "wuzapi.outbound.dlq"

ALL_TOPICS = (META_WEBHOOKS, META_WEBHOOKS_DLQ, WUZAPI_OUTBOUND, WUZAPI_OUTBOUND_DLQ)


async def declare_topics(
    bootstrap: str,
    *,
    partitions: int,
    replication: int,
    topics: tuple[str, ...] = ALL_TOPICS,
) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return
        new = [NewTopic(t, num_partitions=partitions, replication_factor=replication) for t in missing]
        # Another process may declare them between our list and our create.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(new)
        log.info("topics.declared", topics=missing, partitions=partitions)
    finally:
        await admin.close()
