"""The Faust app of the stream worker and its agents, `webhooks` and `outbound`.

`webhooks` takes records in batches without automatic acks (`WorkerStream.noack_batches`); a
batch is acknowledged only after its rows are committed (or its poison records are on the
dead-letter topic), so a worker killed mid-batch redelivers it, and the idempotent writes absorb
the redelivery. `outbound` hands each record to its tenant's lane and acknowledges it once sent or
dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import faust
from faust.types import EventT
from prometheus_client import start_http_server

from infra.kafka.producer import DurableProducer
from infra.kafka.topics import META_WEBHOOKS, META_WEBHOOKS_DLQ, WUZAPI_OUTBOUND, declare_topics
from infra.postgres.db import create_pool
from infra.runtime.heap import tune_gc
from infra.runtime.lifecycle import lifecycle
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings
from processors.breakers import BreakerRecorder
from processors.faust_stream import WorkerStream
from processors.faust_transport import WorkerApp
from processors.outbound import OutboundSender, TenantLanes
from processors.shared_producer import SharedProducer
from processors.webhooks import RawRecord, WebhookWriter, create_writer_pool
from processors.wuzapi import WuzapiClient
from schemas.deadletter import DeadLetter

log = get_logger("processors.app")


def create_app(settings: Settings) -> faust.App:
    assert settings.database_url and settings.kafka_bootstrap and settings.wuzapi_url
    app = WorkerApp(
        settings.worker_app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        # No leader election (it needs a topic of its own): the agents use no timers or tables
        # that must run on one worker only.
        topic_disable_leader=True,
        topic_allow_declare=False,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.worker_session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.worker_session_timeout_s / 3),
        broker_commit_every=settings.worker_batch_max,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=settings.worker_stream_buffer_max,
        fetch_max_wait_ms=settings.worker_fetch_max_wait_ms,
        Stream=WorkerStream,
        producer_acks=-1,
        web_enabled=False,
        worker_redirect_stdouts=False,
        # Faust keeps a data dir of its own (we use no tables); not in the working directory.
        datadir=str(settings.data_dir / "faust"),
    )
    webhooks_topic = app.topic(META_WEBHOOKS, value_serializer="raw", key_serializer="raw")
    outbound_topic = app.topic(WUZAPI_OUTBOUND, value_serializer="raw", key_serializer="raw")
    producer = SharedProducer(DurableProducer(settings.kafka_bootstrap))
    producer.acquire("webhooks")
    producer.acquire("outbound")

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
        if settings.worker_metrics_port:
            start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
            log.info("worker.metrics", url=settings.worker_metrics)

    @app.agent(webhooks_topic, name="webhooks")
    async def webhooks(stream: faust.StreamT[Any]) -> None:
        assert settings.database_url
        pool = await create_writer_pool(settings.database_url, max_size=settings.db_pool_max)

        async def dead_letter(letter: DeadLetter) -> None:
            await producer.dead_letters.write(META_WEBHOOKS_DLQ, letter)

        writer = WebhookWriter(
            pool,
            dead_letter,
            producer.send_outbound,
            retry_max_s=settings.db_retry_max_s,
            company_cache_ttl_s=settings.company_cache_ttl_s,
        )

        async def store(events: list[EventT[Any]]) -> None:
            batch = [_raw(event) for event in events]
            started = time.perf_counter()
            stats = await writer.write(batch)
            write_ms = 1000 * (time.perf_counter() - started)
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
                write_ms=round(write_ms, 1),  # the agent's wait: Postgres, retries included
            )

        # With overlap (a setting, off by default), the agent takes the next batch while Postgres
        # writes this one; without, Faust's fetcher still fills the stream's buffer meanwhile.
        # Either way one batch is written at a time, in order, and acknowledged after its
        # commit: order per key and at-least-once are the same.
        writing: asyncio.Task[None] | None = None
        try:
            # The app's stream class is WorkerStream; faust's StreamT protocol does not know it.
            async for events in stream.noack_batches(  # type: ignore[attr-defined]
                settings.worker_batch_max,
                within=settings.worker_batch_within_s,
                idle=settings.worker_batch_idle_ms / 1000,
            ):
                if writing is not None:
                    await writing
                    writing = None
                if settings.worker_overlap_writes:
                    writing = asyncio.ensure_future(store(list(events)))
                    writing.add_done_callback(_log_failure)
                else:
                    await store(list(events))
            if writing is not None:
                await writing
        finally:
            if writing is not None and not writing.done():
                writing.cancel()  # not acked: redelivered, and the idempotent writes absorb it
                with contextlib.suppress(BaseException):
                    await writing
            await pool.close()
            await producer.release("webhooks")

    @app.agent(outbound_topic, name="outbound")
    async def outbound(stream: faust.StreamT[Any]) -> None:
        assert settings.database_url and settings.wuzapi_url
        pool = await create_pool(settings.database_url, min_size=1, max_size=settings.db_pool_max)

        breakers = BreakerRecorder(pool)
        client = WuzapiClient(
            settings.wuzapi_url,
            connect_timeout_s=settings.wuzapi_connect_timeout_s,
            timeout_s=settings.wuzapi_timeout_s,
            breaker_fail_max=settings.breaker_fail_max,
            breaker_reset_s=settings.breaker_reset_s,
            on_breaker_change=breakers.changed,
        )
        sender = OutboundSender(
            pool,
            client,
            producer.dead_letters,
            default_token=settings.wuzapi_token,
            max_attempts=settings.wuzapi_max_attempts,
            backoff_initial_s=settings.wuzapi_backoff_initial_s,
            backoff_max_s=settings.wuzapi_backoff_max_s,
            config_ttl_s=settings.company_cache_ttl_s,
        )
        manual = stream.noack()  # type: ignore[attr-defined]

        async def done(event: Any) -> None:
            await manual.ack(event)

        lanes = TenantLanes(sender.handle, done, max_in_flight=settings.outbound_max_in_flight)
        try:
            async for event in manual.events():
                await lanes.submit(event, _raw(event))
        finally:
            await lanes.stop()
            await client.close()
            await pool.close()
            await producer.release("outbound")

    return app


def _log_failure(task: asyncio.Task[None]) -> None:
    # Said at once; the agent re-raises it when it next awaits the write.
    if not task.cancelled() and task.exception() is not None:
        log.error("webhooks.batch_failed", error=repr(task.exception()))


def _headers(headers: Any) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else headers
    return [(str(k), v if isinstance(v, bytes) else str(v).encode()) for k, v in items]


def _raw(event: EventT[Any]) -> RawRecord:
    message = event.message
    return RawRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value or b"",
        headers=_headers(message.headers),
    )


def run_worker(settings: Settings) -> int:
    """Run the worker until a stop is requested (SIGTERM, SIGINT, EPIPE); return its exit code."""
    import signal

    from faust.worker import Worker

    class _Worker(Worker):  # type: ignore[misc]
        def install_signal_handlers(self) -> None:
            # The lifecycle module owns the signal handlers; Faust installs none of its own.
            lifecycle.watch_loop(self.loop)

    import mode.loop

    # Must be the policy before the app and its loop exist (BENCHMARKS.md compares the two).
    if settings.worker_event_loop == "uvloop":
        mode.loop.use("uvloop")
    lifecycle.install("worker", stop_deadline_s=settings.stop_deadline_s)
    app = create_app(settings)
    worker = _Worker(app, loglevel=settings.log_level, quiet=True, override_logging=False)
    worker.spinner = None  # no terminal escapes in a JSON log
    tune_gc()

    def stop(reason: str) -> None:
        # Faust's own shutdown: stop the agents, commit acknowledged offsets, close the consumer.
        worker._schedule_shutdown(signal.SIGTERM)

    lifecycle.on_stop(stop)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
