"""The Faust app of the stream worker and its `webhooks` agent.

Records are taken in batches without automatic acks (`noack_take`); a batch is acknowledged
only after its rows are committed (or its poison records are on the dead-letter topic), so a
worker killed mid-batch redelivers it, and the idempotent writes absorb the redelivery.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust
from faust.types import EventT

from infra.db import create_pool
from infra.kafka import BrokerUnavailable, DurableProducer
from infra.logging import get_logger
from infra.settings import Settings
from infra.topics import META_WEBHOOKS, META_WEBHOOKS_DLQ, declare_topics
from processors.webhooks import RawRecord, WebhookWriter
from schemas.deadletter import DeadLetter

log = get_logger("processors.app")


def create_app(settings: Settings) -> faust.App:
    assert settings.database_url and settings.kafka_bootstrap
    app = faust.App(
        settings.worker_app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        # The embedded broker cannot host Faust's leader topic; we use no tables either.
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.worker_session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.worker_session_timeout_s / 3),
        broker_commit_every=settings.worker_batch_max,
        broker_commit_interval=1.0,
        producer_acks=-1,
        web_enabled=False,
        worker_redirect_stdouts=False,
    )
    webhooks_topic = app.topic(META_WEBHOOKS, value_serializer="raw", key_serializer="raw")
    dlq = DurableProducer(settings.kafka_bootstrap)

    async def dead_letter(letter: DeadLetter) -> None:
        delay = 0.2
        while True:
            try:
                await dlq.send_all(META_WEBHOOKS_DLQ, [(letter.key, letter.to_bytes())], timeout_s=10)
                return
            except BrokerUnavailable as exc:
                log.warning("webhooks.dlq_retry", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(sender: faust.App, assigned: set[Any], **_: Any) -> None:
        log.info(
            "worker.partitions_assigned",
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )

    @app.task  # type: ignore[untyped-decorator]
    async def declare() -> None:
        await declare_topics(
            settings.kafka_bootstrap or "",
            partitions=settings.topic_partitions,
            replication=settings.topic_replication,
        )

    @app.agent(webhooks_topic, name="webhooks")
    async def webhooks(stream: faust.StreamT[Any]) -> None:
        assert settings.database_url
        pool = await create_pool(settings.database_url, min_size=1, max_size=settings.db_pool_max)
        writer = WebhookWriter(pool, dead_letter, retry_max_s=settings.db_retry_max_s)
        try:
            # noack_take is faust-streaming's; its StreamT protocol does not declare it.
            async for events in stream.noack_take(  # type: ignore[attr-defined]
                settings.worker_batch_max, within=settings.worker_batch_within_s
            ):
                batch = [_raw(event) for event in events]
                stats = await writer.write(batch)
                for event in events:
                    await stream.ack(event)
                log.info(
                    "webhooks.batch_stored",
                    records=len(batch),
                    messages=stats.messages,
                    duplicates=stats.duplicates,
                    statuses=stats.statuses,
                    notifications=stats.notifications,
                    partitions=sorted({r.partition for r in batch}),
                    last_offset=batch[-1].offset,
                )
        finally:
            await pool.close()
            await dlq.stop()

    return app


def _raw(event: EventT[Any]) -> RawRecord:
    message = event.message
    return RawRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value or b"",
        headers=[(str(k), bytes(v)) for k, v in _headers(message.headers)],
    )


def _headers(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    return [(str(k), v if isinstance(v, bytes) else str(v).encode()) for k, v in items]


def run_worker(settings: Settings) -> int:
    """Run the worker until SIGTERM or SIGINT; return its exit code."""
    from faust.worker import Worker

    app = create_app(settings)
    worker = Worker(app, loglevel=settings.log_level, quiet=True, override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
