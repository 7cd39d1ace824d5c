"""The topics, declared explicitly (the brokers never create one on first use), with every
setting that shapes them in this one table.

Partitions and replication come from the settings (`CORTEXX_TOPIC_PARTITIONS`,
`CORTEXX_TOPIC_REPLICATION`), the same for every topic: partitions are the unit of parallelism and
ordering. Each process declares what it uses at start; a topic that exists is left as it is
(its partition count included: changing it would move keys between partitions).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from infra.runtime.logging import get_logger

log = get_logger(__name__)

META_WEBHOOKS = "meta.webhooks"
META_WEBHOOKS_DLQ = "meta.webhooks.dlq"
WUZAPI_OUTBOUND = "wuzapi.outbound"
WUZAPI_OUTBOUND_DLQ = "wuzapi.outbound.dlq"
META_MEDIA = "meta.media"
META_MEDIA_DLQ = "meta.media.dlq"

DAY_MS = 24 * 3600 * 1000


class TopicDeclarationError(RuntimeError):
    """The broker refused to create a topic (too few brokers for the replication, a bad setting)."""


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    retention_ms: int
    why: str

    def config(self, replication: int) -> dict[str, str]:
        return {
            "retention.ms": str(self.retention_ms),
            # With acks=all, a record is acknowledged once this many replicas have it: two of
            # three in production, so the loss of one broker loses nothing acknowledged.
            "min.insync.replicas": str(min(2, replication)),
            "unclean.leader.election.enable": "false",
            "cleanup.policy": "delete",
        }


TOPICS = (
    TopicSpec(META_WEBHOOKS, 7 * DAY_MS, "as long as Meta retries a webhook, so a rebuild can replay it"),
    TopicSpec(META_WEBHOOKS_DLQ, 30 * DAY_MS, "a month for an operator to look and replay"),
    TopicSpec(WUZAPI_OUTBOUND, 7 * DAY_MS, "replies wait here through a WUZAPI outage"),
    TopicSpec(WUZAPI_OUTBOUND_DLQ, 30 * DAY_MS, "a month for an operator to look and replay"),
    # A media id lives about 7 days at Meta: a fetch job older than that can only fail.
    TopicSpec(META_MEDIA, 7 * DAY_MS, "a fetch waits here through a Graph API outage"),
    TopicSpec(META_MEDIA_DLQ, 30 * DAY_MS, "a month for an operator to look and replay"),
)
ALL_TOPICS = tuple(spec.name for spec in TOPICS)


async def declare_topics(
    bootstrap: str,
    *,
    partitions: int,
    replication: int,
    topics: tuple[str, ...] = ALL_TOPICS,
    timeout_s: float = 30.0,
) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Retries until `timeout_s` while the broker is not reachable, so a process started beside its
    broker waits for it instead of failing.
    """
    specs = {spec.name: spec for spec in TOPICS}
    deadline = time.monotonic() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in topics if t not in existing]
            if not missing:
                return
            new = [
                NewTopic(
                    t,
                    num_partitions=partitions,
                    replication_factor=replication,
                    topic_configs=specs[t].config(replication) if t in specs else {},
                )
                for t in missing
            ]
            response = await admin.create_topics(new)
            # Per-topic errors come in the response, not raised. Another process may have
            # declared a topic between our list and our create: that one is fine.
            failed = [
                f"{topic}: {for_code(code).__name__} {' '.join(map(str, detail))}".strip()
                for topic, code, *detail in response.topic_errors
                if code not in (0, TopicAlreadyExistsError.errno)
            ]
            if failed:
                raise TopicDeclarationError("; ".join(failed))
            log.info("topics.declared", topics=missing, partitions=partitions, replication=replication)
            return
        except (KafkaError, OSError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("topics.broker_not_ready", bootstrap=bootstrap, error=repr(exc))
            await asyncio.sleep(0.5)
        finally:
            await admin.close()


def declare_in_background(bootstrap: str, *, partitions: int, replication: int) -> asyncio.Task[None]:
    """Declare the topics without holding up a process's start: it serves (503 while the broker is
    away) and the declaration lands once the broker answers."""

    async def declare() -> None:
        try:
            await declare_topics(
                bootstrap, partitions=partitions, replication=replication, timeout_s=float("inf")
            )
        except TopicDeclarationError as exc:
            log.error("topics.refused", bootstrap=bootstrap, error=str(exc))

    return asyncio.create_task(declare(), name="declare-topics")
