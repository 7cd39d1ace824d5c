"""Serving an HTTP edge (ingest, the read API) with a graceful drain.

On a stop (SIGTERM, SIGINT, a dead log stream) the server keeps its socket open but answers new
requests 503 (`shutting_down`) while the requests in flight finish; then uvicorn shuts down,
the app's lifespan closes its pools and flushes its producer, and the process exits 0. Past the
grace period the remaining requests are cut off. Signals are the lifecycle's, not uvicorn's.

Slow clients are cut off too (uvicorn bounds only idle keep-alive connections): a connection
must deliver a request's headers within the header timeout (from connect, or from the first
byte of a request after a keep-alive wait), and the whole body within the body timeout of its
headers. One that does not is answered 408 `request_timeout` if it had started a request and
nothing was answered yet, and closed; the app, if it was reading the body, sees a disconnect.
Each is counted in `cortexx_http_client_timeouts_total{process,phase}` and the warning
`http.client_timeouts` is logged at most once per 10 s per process, with the counts since.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Generator
from typing import Any

import uvicorn
import uvloop
from prometheus_client import Counter
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from infra.runtime.lifecycle import lifecycle
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings
from schemas.errors import error_body

log = get_logger("http")

Scope = dict[str, Any]

HEADERS, BODY = "headers", "body"
CLIENT_TIMEOUTS = Counter(
    "cortexx_http_client_timeouts_total",
    "Connections closed because the client sent its request headers or body too slowly",
    ["process", "phase"],
)
TIMEOUT_LOG_WINDOW_S = 10.0  # at most one `http.client_timeouts` warning per window and process


class SlowClientReport:
    """Counts the connections closed for slowness; logs the first at once, then the counts of each
    window of `window_s` that saw any, so that hundreds of slow clients make one line, not hundreds."""

    def __init__(self, process: str, window_s: float = TIMEOUT_LOG_WINDOW_S) -> None:
        self.process = process
        self.window_s = window_s
        self._counters = {phase: CLIENT_TIMEOUTS.labels(process, phase) for phase in (HEADERS, BODY)}
        self._pending: dict[str, int] = {}
        self._window: asyncio.TimerHandle | None = None

    def record(self, loop: asyncio.AbstractEventLoop, phase: str, client: str, timeout_s: float) -> None:
        self._counters[phase].inc()
        if self._window is not None:
            self._pending[phase] = self._pending.get(phase, 0) + 1
            return
        log.warning(
            "http.client_timeouts",
            process=self.process,
            timed_out={phase: 1},
            client=client,
            timeout_s=timeout_s,
        )
        self._window = loop.call_later(self.window_s, self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if not self._pending:
            self._window = None  # a quiet window: the next timeout is logged at once
            return
        log.warning(
            "http.client_timeouts", process=self.process, timed_out=self._pending, window_s=self.window_s
        )
        self._pending = {}
        self._window = loop.call_later(self.window_s, self._flush, loop) if loop is not None else None

    def close(self) -> None:
        """Log what the current window counted so far: the server is stopping."""
        if self._window is not None:
            self._window.cancel()
            self._flush(None)


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header and a body deadline per request.

    One timer per connection, re-armed lazily: moving the deadline on (the hot path: headers done,
    body done, response sent) writes two attributes; the timer, when it fires early, sleeps again
    until the current deadline. Tied to uvicorn's internals (pinned in pyproject.toml).
    """

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    report: SlowClientReport | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._phase: str | None = None  # what the deadline waits for: HEADERS, BODY or nothing
        self._deadline = 0.0  # loop time
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._begun = False  # a byte of the next request's line has arrived

    def _expect(self, phase: str, at: float) -> None:
        self._phase = phase
        self._deadline = at
        timer = self._timer
        if timer is None or self._timer_at > at:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(at, self._check_deadline)
            self._timer_at = at

    def _check_deadline(self) -> None:
        self._timer = None
        phase = self._phase
        if phase is None or self.transport.is_closing():
            return
        if self.loop.time() + 0.001 < self._deadline:  # moved on since armed: sleep until then
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            self._timer_at = self._deadline
            return
        self._phase = None
        cycle = self.cycle
        if phase == BODY:
            timeout_s = self.body_timeout_s
            answer = not cycle.response_started
            # The app's receive() now answers http.disconnect, and its send() does nothing.
            cycle.disconnected = True
            cycle.message_event.set()
        else:
            timeout_s = self.header_timeout_s
            answer = self._begun  # a connection that never sent a byte is just closed
        if answer:
            self.transport.write(self._timeout_answer(phase, timeout_s))
        self.transport.close()
        if self.report is not None:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else ""
            self.report.record(self.loop, phase, client, timeout_s)

    def _timeout_answer(self, phase: str, timeout_s: float) -> bytes:
        detail = f"the request {phase} did not arrive within {timeout_s:g} s"
        body = error_body("request_timeout", detail)
        content = [STATUS_LINE[408]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        return b"".join(content)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect(HEADERS, self.loop.time() + self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._phase == HEADERS:
            # After a keep-alive wait the headers get their own full timeout from their first byte.
            at = self.loop.time() + self.header_timeout_s
            if at < self._deadline:
                self._expect(HEADERS, at)

    def on_headers_complete(self) -> None:
        self._begun = False
        self._phase = None
        super().on_headers_complete()
        if not self.pipeline:  # else it waits behind the one running, its reading paused
            self._expect(BODY, self.loop.time() + self.body_timeout_s)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._phase == BODY:
            self._phase = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self.timeout_keep_alive_task is not None:
            # Idle, waiting for the next request: uvicorn closes it after the keep-alive timeout
            # unless a byte arrives (any byte, even a stray CRLF); then the headers' own timeout.
            wait = self.header_timeout_s if self._begun else self.timeout_keep_alive + self.header_timeout_s
            self._expect(HEADERS, now + wait)
        elif not self.pipeline and self.cycle.more_body and not self.cycle.response_complete:
            self._expect(BODY, now + self.body_timeout_s)  # a pipelined request started: its body


def timed_protocol(
    *, process: str, header_timeout_s: float, body_timeout_s: float
) -> type[TimedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these timeouts and its own report."""
    headers_s, body_s = header_timeout_s, body_timeout_s

    class ConfiguredProtocol(TimedHttpToolsProtocol):
        header_timeout_s = headers_s
        body_timeout_s = body_s
        report = SlowClientReport(process)

    return ConfiguredProtocol


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
            body = error_body("shutting_down", "the server is draining; retry")
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
    app: Any,
    *,
    host: str,
    port: int,
    process: str,
    grace_s: float,
    stop_deadline_s: float | None = None,
    header_timeout_s: float = 10.0,
    body_timeout_s: float = 30.0,
    keep_alive_s: int = 5,
) -> int:
    """Serve `app` until a stop is requested and drained; return the exit code (see `serve_edge`).

    A request's headers must arrive within `header_timeout_s` and its body within `body_timeout_s`
    of them (else 408 and the connection closed); an idle keep-alive connection is closed after
    `keep_alive_s`."""
    # The deadline must leave the drain its time: at least twice the grace.
    lifecycle.install(process, stop_deadline_s=max(stop_deadline_s or 0.0, 2 * grace_s))
    draining = DrainingMiddleware(app)
    protocol = timed_protocol(
        process=process, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s
    )
    config = uvicorn.Config(
        draining,
        host=host,
        port=port,
        loop="none",
        http=protocol,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=keep_alive_s,
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
        try:
            await server.serve()
        finally:
            if protocol.report is not None:
                protocol.report.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    if not server.started:
        return 1  # e.g. the port was taken, or the app's start-up failed: already logged
    return 0


def serve_edge(app: Any, settings: Settings, *, host: str, port: int, process: str) -> int:
    """`serve_http` with an edge's settings: its drain, stop deadline and slow-client timeouts."""
    return serve_http(
        app,
        host=host,
        port=port,
        process=process,
        grace_s=settings.shutdown_grace_s,
        stop_deadline_s=settings.stop_deadline_s,
        header_timeout_s=settings.http_header_timeout_s,
        body_timeout_s=settings.http_body_timeout_s,
        keep_alive_s=settings.http_keep_alive_s,
    )
