"""The worker's one Kafka producer, and who owns it.

The agents produce through one `DurableProducer`: `webhooks` its auto-replies onto
`wuzapi.outbound`, its fetch jobs onto `meta.media` and its poison records onto
`meta.webhooks.dlq`; `outbound` and `media` their permanent failures onto their dead-letter
topics. `create_app` makes the `SharedProducer`; each agent acquires
it when it starts and releases it when it stops, and the producer closes when the last user is
gone. An agent that stops first (or crashes, for Faust to restart it) leaves it open for the other.
"""

from __future__ import annotations

from infra.kafka.deadletters import DeadLetterWriter
from infra.kafka.producer import BrokerUnavailable, DurableProducer
from infra.kafka.topics import META_MEDIA, WUZAPI_OUTBOUND
from infra.runtime.retry import until_it_passes
from schemas.media import MediaJob
from schemas.outbound import OutboundMessage


class SharedProducer:
    def __init__(self, producer: DurableProducer) -> None:
        self._producer = producer
        self.dead_letters = DeadLetterWriter(producer)
        self._users: set[str] = set()

    def acquire(self, user: str) -> None:
        self._users.add(user)

    async def release(self, user: str) -> None:
        """`user` is done with the producer; the last one to go closes it."""
        self._users.discard(user)
        if not self._users:
            await self._producer.stop()

    async def send_outbound(self, messages: list[OutboundMessage]) -> None:
        """Put `messages` on `wuzapi.outbound`, waiting for the broker, dropping nothing: the
        batch that queued them is acknowledged only after this returns."""
        records = [(m.key, m.to_bytes()) for m in messages]
        await until_it_passes(
            lambda: self._producer.send_all(WUZAPI_OUTBOUND, records, timeout_s=10),
            retry_if=lambda exc: isinstance(exc, BrokerUnavailable),
            event="outbound.produce_retry",
            records=len(messages),
        )

    async def send_media(self, jobs: list[MediaJob]) -> None:
        """Put fetch jobs on `meta.media`, as `send_outbound` does replies."""
        records = [(job.key, job.to_bytes()) for job in jobs]
        await until_it_passes(
            lambda: self._producer.send_all(META_MEDIA, records, timeout_s=10),
            retry_if=lambda exc: isinstance(exc, BrokerUnavailable),
            event="media.produce_retry",
            records=len(jobs),
        )
