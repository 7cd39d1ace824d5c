"""The worker's Faust stream: batches that close when the stream goes quiet.

Faust's `noack_take(max_, within)` hands over its buffer when it is full or when its timer fires,
and that timer runs on a fixed cadence, whatever arrives: on a quiet system a webhook waited up to
`within` (250 ms) for a batch of one, 125 ms on average, most of the 143 ms from its POST to its
row (BENCHMARKS.md, "Latency"). A shorter `within` cut that wait but also cut batches under load,
and Postgres pays per batch.

`WorkerStream.noack_batches` closes a batch when it is full, when its first record has waited
`within`, or when no record has arrived for `idle` seconds: the stream has nothing more to give
right now, so waiting longer only delays what is there. Under a backlog records arrive every
~130 µs and batches still fill; on a quiet system a webhook waits `idle`, not the window.

Like `noack_take`, it acknowledges nothing: the caller acks each event after its rows commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import faust
from faust.streams import _tracks_buffer_agen
from faust.types import EventT
from mode.utils.futures import notify
from mode.utils.locks import Event


class WorkerStream(faust.Stream[Any]):
    """`faust.Stream` with `noack_batches`; the app's stream class (`Stream=` in its config)."""

    @_tracks_buffer_agen  # type: ignore[misc]
    async def noack_batches(
        self, max_: int, *, within: float, idle: float
    ) -> AsyncGenerator[list[EventT[Any]], None]:
        buffer: list[EventT[Any]] = []
        first_at = 0.0
        started = Event()  # the buffer got its first record
        full = Event()
        consumed = Event()
        # Set while the caller holds a batch: records wait in Faust's buffer, not in ours.
        consuming: asyncio.Future[None] | None = None

        async def add(value: Any) -> Any:
            nonlocal consuming, first_at
            try:
                if consuming is not None:
                    try:
                        await consuming
                    finally:
                        consuming = None
                event = self.current_event
                if event is None:
                    raise RuntimeError("a record reached the batch without its event")
                buffer.append(event)
                if len(buffer) == 1:
                    first_at = time.monotonic()
                    started.set()
                if len(buffer) >= max_:
                    full.set()
                    consumed.clear()
                    await self.wait(consumed)  # never more than max_ in one batch
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.exception("Error adding to the batch: %r", exc)
                await self.crash(exc)
            return value

        enable_acks = self.enable_acks
        self.enable_acks = False  # the caller acks, after its commit
        self.add_processor(add)
        self._enable_passive(aiter(self.channel))  # type: ignore[arg-type]
        try:
            while not self.should_stop:
                if not buffer:
                    started.clear()
                    await self.wait_for_stopped(started)
                    continue
                # Poll every `idle` (not on every record: a wake-up per record would cost more
                # than Faust's own per-record work) until full, quiet, or out of time.
                while not full.is_set() and not self.should_stop:
                    remaining = first_at + within - time.monotonic()
                    if remaining <= 0:
                        break
                    seen = len(buffer)
                    await self.wait_for_stopped(full, timeout=min(idle, remaining))
                    if len(buffer) == seen:
                        break
                consuming = self.loop.create_future()
                try:
                    yield list(buffer)
                finally:
                    buffer.clear()
                    notify(consuming)
                    full.clear()
                    consumed.set()
        finally:
            self.enable_acks = enable_acks
            self._processors.remove(add)
