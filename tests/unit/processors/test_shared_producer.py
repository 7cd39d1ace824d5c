"""The worker's one producer closes when the last agent using it stops, not before."""

from __future__ import annotations

from typing import Any, cast

from infra.kafka.producer import DurableProducer
from processors.shared_producer import SharedProducer


class FakeProducer:
    def __init__(self) -> None:
        self.stops = 0

    async def stop(self) -> None:
        self.stops += 1


def shared(fake: FakeProducer) -> SharedProducer:
    return SharedProducer(cast(DurableProducer, cast(Any, fake)))


async def test_the_producer_closes_when_the_last_agent_stops() -> None:
    fake = FakeProducer()
    producer = shared(fake)
    producer.acquire("webhooks")
    producer.acquire("outbound")
    await producer.release("webhooks")
    assert fake.stops == 0
    await producer.release("outbound")
    assert fake.stops == 1


async def test_an_agent_restarted_holds_the_producer_open_again() -> None:
    fake = FakeProducer()
    producer = shared(fake)
    producer.acquire("webhooks")
    producer.acquire("outbound")
    await producer.release("webhooks")  # crashed: Faust restarts it
    producer.acquire("webhooks")
    await producer.release("outbound")
    assert fake.stops == 0
    await producer.release("webhooks")
    assert fake.stops == 1
