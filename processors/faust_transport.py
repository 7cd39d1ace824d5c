"""Faust's Kafka consumer, made to keep a worker on a backlog fed.

The broker client keeps one fetch in flight per broker, for the partitions whose fetched
records are all consumed. While `meta.webhooks` records are still buffered, that fetch asks for
the idle `wuzapi.outbound` partitions alone, and Faust has the broker hold a fetch that finds
nothing for up to 1.5 s (`fetch_max_wait_ms`, which Faust does not expose). The agent drains the
buffer meanwhile, and then waits for that fetch to come back before the next `meta.webhooks`
one can leave: the worker benchmark's stalls, up to 1.3 s (BENCHMARKS.md, "The stalls, found").
On a quiet system a new webhook waits for it the same way. The worker's consumer has the broker
hold such a fetch for `CORTEXX_WORKER_FETCH_MAX_WAIT_MS` instead.
"""

from __future__ import annotations

from typing import Any, cast

import aiokafka
import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types.transports import TransportT

from infra.runtime.logging import get_logger

log = get_logger("processors.faust_transport")


class PromptConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):  # type: ignore[misc]
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by the consumer's fetcher, which `start()` creates after this. A private field
        # (aiokafka is pinned): should it go, fail at start rather than wait 1.5 s unnoticed.
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            raise RuntimeError("aiokafka's consumer no longer has _fetch_max_wait_ms")
        consumer._fetch_max_wait_ms = cast(WorkerApp, self.app).fetch_max_wait_ms
        return consumer


class PromptConsumer(aiokafka_driver.Consumer):  # type: ignore[misc]
    def _new_consumer_thread(self) -> PromptConsumerThread:
        return PromptConsumerThread(self, loop=self.loop, beacon=self.beacon)


class PromptTransport(aiokafka_driver.Transport):  # type: ignore[misc]
    Consumer = PromptConsumer


class WorkerApp(faust.App):  # type: ignore[misc]
    """The worker's Faust app, on `PromptConsumer`: fetches that find nothing come back after
    `fetch_max_wait_ms`."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return PromptTransport(self.conf.broker_consumer, self)
