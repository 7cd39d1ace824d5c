"""Serving an HTTP edge (ingest, the read API) with a graceful drain.

On a stop (SIGTERM, SIGINT, a dead log stream) the server keeps its socket open but answers new
requests 503 (`shutting_down`) while the requests in flight finish; then uvicorn shuts down,
the app's lifespan closes its pools and flushes its producer, and the process exits 0. Past the
grace period the remaining requests are cut off. Signals are the lifecycle's, not uvicorn's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Generator
from typing import Any

import orjson
import uvicorn
import uvloop

from infra.lifecycle import lifecycle
from infra.logging import get_logger

log = get_logger("http")

Scope = dict[str, Any]


class DrainingMiddleware:
    """Counts requests in flight; once draining, refuses new ones with a 503."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        return self.in_flight == 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            body = orjson.dumps({"error": "shutting_down", "detail": "the server is draining; retry"})
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"connection", b"close"),
                        (b"retry-after", b"1"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The lifecycle module owns the signal handlers; uvicorn installs none of its own.
        yield


def serve_http(
    app: Any, *, host: str, port: int, process: str, grace_s: float, stop_deadline_s: float | None = None
) -> int:
    """Serve `app` until a stop is requested and drained; return the exit code."""
    # The deadline must leave the drain its time: at least twice the grace.
    lifecycle.install(process, stop_deadline_s=max(stop_deadline_s or 0.0, 2 * grace_s))
    draining = DrainingMiddleware(app)
    config = uvicorn.Config(
        draining,
        host=host,
        port=port,
        loop="none",
        http="httptools",
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(grace_s)),
    )
    server = _Server(config)

    async def drain(reason: str) -> None:
        draining.draining = True
        if not await draining.wait_idle(grace_s):
            log.warning("http.drain_timeout", process=process, in_flight=draining.in_flight)
            server.force_exit = True
        log.info("http.drained", process=process, reason=reason)
        server.should_exit = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lifecycle.watch_loop(loop)
        tasks: set[asyncio.Task[None]] = set()

        def on_stop(reason: str) -> None:
            # A fresh context: the stop may be requested from inside a request's logging context.
            task = loop.create_task(drain(reason), context=contextvars.Context())
            tasks.add(task)

        lifecycle.on_stop(on_stop)
        await server.serve()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    if not server.started:
        return 1  # e.g. the port was taken, or the app's start-up failed: already logged
    return 0
