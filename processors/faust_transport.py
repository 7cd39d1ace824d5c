"""Faust's Kafka consumer, made to keep a worker on a backlog fed.

The broker client keeps one fetch in flight per broker, for the partitions whose fetched
records are all consumed. While `meta.webhooks` records are still buffered, that fetch asks for
the idle `wuzapi.outbound` partitions alone, and Faust has the broker hold a fetch that finds
nothing for up to 1.5 s (`fetch_max_wait_ms`, which Faust does not expose). The agent drains the
buffer meanwhile, and then waits for that fetch to come back before the next `meta.webhooks`
one can leave: the worker benchmark's stalls, up to 1.3 s (BENCHMARKS.md, "The stalls, found").
On a quiet system a new webhook waits for it the same way. The worker's consumer has the broker
hold such a fetch for `CORTEXX_WORKER_FETCH_MAX_WAIT_MS` instead.

It also bounds an offset commit. The broker client retries a commit that the broker refuses as
retriable for as long as it takes; the embedded broker, restarted empty, refuses a commit for
a partition of the group it forgot that way (`UnknownTopicOrPartitionError`), for good. Faust
commits while it hands partitions back in a rebalance, so the worker hung there and stored
nothing more (tests/faults/test_worker_faults.py, the broker restarted under a running worker).
A commit that has not succeeded in `COMMIT_TIMEOUT_S` counts as failed: Faust goes on, and the
records after the last committed offset are delivered again, which the writes absorb.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import aiokafka
import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from faust.types.transports import TransportT

from infra.logging import get_logger

log = get_logger("processors.faust_transport")

# Far above a commit's usual milliseconds, and far below the rebalance timeout (Faust's 60 s), by
# which the group would give up on a worker still handing its partitions back.
COMMIT_TIMEOUT_S = 5.0


class PromptConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):  # type: ignore[misc]
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by the consumer's fetcher, which `start()` creates after this. A private field
        # (aiokafka is pinned): should it go, fail at start rather than wait 1.5 s unnoticed.
        if not hasattr(consumer, "_fetch_max_wait_ms"):
            raise RuntimeError("aiokafka's consumer no longer has _fetch_max_wait_ms")
        consumer._fetch_max_wait_ms = cast(WorkerApp, self.app).fetch_max_wait_ms
        return consumer

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        try:
            return bool(await asyncio.wait_for(super()._commit(offsets), COMMIT_TIMEOUT_S))
        except TimeoutError:
            log.warning(
                "worker.commit_timed_out",
                partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in offsets),
                timeout_s=COMMIT_TIMEOUT_S,
            )
            return False


class PromptConsumer(aiokafka_driver.Consumer):  # type: ignore[misc]
    def _new_consumer_thread(self) -> PromptConsumerThread:
        return PromptConsumerThread(self, loop=self.loop, beacon=self.beacon)


class PromptTransport(aiokafka_driver.Transport):  # type: ignore[misc]
    Consumer = PromptConsumer


class WorkerApp(faust.App):  # type: ignore[misc]
    """The worker's Faust app, on `PromptConsumer`: fetches that find nothing come back after
    `fetch_max_wait_ms`, and a commit gives up after `COMMIT_TIMEOUT_S`."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return PromptTransport(self.conf.broker_consumer, self)
