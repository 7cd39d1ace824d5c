"""The Faust app of the stream worker: its wiring.

Three agents, each a class with `start`, `run` and `stop` (`processors.agents`): `webhooks`
writes `meta.webhooks` batches into Postgres and acknowledges a batch only after its commit;
`outbound` sends `wuzapi.outbound` records through WUZAPI, one lane per tenant, and acknowledges
each once sent or dead-lettered; `media` fetches the files of inbound messages (`meta.media`)
from Meta into the media store. They share one Kafka producer (`SharedProducer`), made here and
closed when the last of them stops.
"""

from __future__ import annotations

from typing import Any, Protocol

import faust
from prometheus_client import start_http_server

from infra.kafka.producer import DurableProducer
from infra.kafka.topics import META_MEDIA, META_WEBHOOKS, WUZAPI_OUTBOUND, declare_topics
from infra.runtime.heap import tune_gc
from infra.runtime.lifecycle import lifecycle
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings
from processors.agents.media import MediaAgent
from processors.agents.outbound import OutboundAgent
from processors.agents.webhooks import WebhooksAgent
from processors.faust_stream import WorkerStream
from processors.faust_transport import WorkerApp
from processors.shared_producer import SharedProducer

log = get_logger("processors.app")


class Agent(Protocol):
    async def start(self) -> None: ...
    async def run(self, stream: faust.StreamT[Any]) -> None: ...
    async def stop(self) -> None: ...


def create_app(settings: Settings) -> faust.App:
    assert settings.database_url and settings.kafka_bootstrap and settings.wuzapi_url
    app = _worker_app(settings)
    webhooks_topic = app.topic(META_WEBHOOKS, value_serializer="raw", key_serializer="raw")
    outbound_topic = app.topic(WUZAPI_OUTBOUND, value_serializer="raw", key_serializer="raw")
    media_topic = app.topic(META_MEDIA, value_serializer="raw", key_serializer="raw")
    producer = SharedProducer(DurableProducer(settings.kafka_bootstrap))
    webhooks_agent = WebhooksAgent(settings, producer)
    outbound_agent = OutboundAgent(settings, producer)
    media_agent = MediaAgent(settings, producer)
    app.on_partitions_assigned.connect(_log_assigned)  # type: ignore[arg-type]

    @app.task  # type: ignore[untyped-decorator]
    async def declare() -> None:
        await _declare(settings)

    @app.agent(webhooks_topic, name="webhooks")
    async def webhooks(stream: faust.StreamT[Any]) -> None:
        await _serve(webhooks_agent, stream)

    @app.agent(outbound_topic, name="outbound")
    async def outbound(stream: faust.StreamT[Any]) -> None:
        await _serve(outbound_agent, stream)

    @app.agent(media_topic, name="media")
    async def media(stream: faust.StreamT[Any]) -> None:
        await _serve(media_agent, stream)

    return app


def _worker_app(settings: Settings) -> WorkerApp:
    return WorkerApp(
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


async def _serve(agent: Agent, stream: faust.StreamT[Any]) -> None:
    """An agent's life in Faust: what it started is stopped however its run ends."""
    await agent.start()
    try:
        await agent.run(stream)
    finally:
        await agent.stop()


async def _declare(settings: Settings) -> None:
    await declare_topics(
        settings.kafka_bootstrap or "",
        partitions=settings.topic_partitions,
        replication=settings.topic_replication,
    )
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
        log.info("worker.metrics", url=settings.worker_metrics)


async def _log_assigned(sender: faust.App, assigned: set[Any], **_: Any) -> None:
    log.info(
        "worker.partitions_assigned",
        partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
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
