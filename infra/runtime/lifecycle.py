"""Process lifecycle: the one place that installs every global error path and signal handler.

`install()` sets `sys.excepthook`, `threading.excepthook` and the SIGTERM / SIGINT handlers,
once per process; `watch_loop()` sets the asyncio loop's exception handler. Nothing else in
the code base installs any of them (uvicorn's and Faust's own signal handling is switched off
where they are started, and their stop is driven from here). An uncaught error is logged once,
structured, with its context.

A stop is requested by the first SIGTERM or SIGINT, or by the log stream dying (EPIPE); each
process registers what a graceful stop means for it (`on_stop`). A second signal forces the exit,
and so does the stop deadline (`install(stop_deadline_s=...)`): a graceful stop can wait forever on
a service that is gone (Faust's shutdown waits on the broker and Postgres), and a supervisor or an
operator must not need kill -9. Nothing is lost by it: offsets are committed only after writes.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from infra.runtime.logging import get_logger

log = get_logger("lifecycle")

FORCED_EXIT_CODE = 130
STOP_DEADLINE_EXIT_CODE = 124  # as timeout(1) reports a command it had to kill


class Lifecycle:
    def __init__(self) -> None:
        self.process = "cortexx"
        self.installed = False
        self.stop_requested = threading.Event()
        self.stop_reason: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._on_force: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stop_deadline_s: float | None = None

    def install(self, process: str, *, stop_deadline_s: float | None = None) -> None:
        if self.installed:
            return
        self.process = process
        self.stop_deadline_s = stop_deadline_s
        sys.excepthook = self._excepthook
        threading.excepthook = self._thread_excepthook
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        # Writes to a closed pipe raise BrokenPipeError (handled by the log handler) instead of
        # killing the process silently: Python ignores SIGPIPE by default; keep it that way.
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self._watch_stdout()
        self.installed = True

    def _watch_stdout(self) -> None:
        """Notice a closed stdout pipe even when the process has nothing to write just then."""
        try:
            mode = os.fstat(1).st_mode
        except OSError:
            return
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return

        def watch() -> None:
            poller = select.poll()
            # No events asked for: poll still reports POLLERR / POLLHUP, i.e. the reader is gone.
            poller.register(1, 0)
            while not self.stop_requested.is_set():
                if poller.poll(1000):
                    self.request_stop("stdout closed (EPIPE)")
                    return

        threading.Thread(target=watch, name="stdout-watch", daemon=True).start()

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Route the loop's unhandled task errors to the log, and signals' stops to this loop."""
        loop.set_exception_handler(self._loop_exception)
        self._loop = loop

    def on_stop(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (on the watched loop, if any) when a stop is requested."""
        self._callbacks.append(callback)
        if self.stop_requested.is_set():
            self._dispatch(callback)

    def on_force(self, callback: Callable[[], None]) -> None:
        """Call `callback()` (from the signal handler) before a forced exit."""
        self._on_force.append(callback)

    def request_stop(self, reason: str) -> None:
        if self.stop_requested.is_set():
            return
        self.stop_reason = reason
        self.stop_requested.set()
        log.info("process.stopping", reason=reason)
        if self.stop_deadline_s is not None:
            deadline = threading.Timer(self.stop_deadline_s, self._deadline_passed)
            deadline.daemon = True
            deadline.start()
        for callback in list(self._callbacks):
            self._dispatch(callback)

    def _deadline_passed(self) -> None:
        log.error("process.stop_deadline_passed", deadline_s=self.stop_deadline_s, reason=self.stop_reason)
        for callback in self._on_force:
            callback()
        os._exit(STOP_DEADLINE_EXIT_CODE)

    def _dispatch(self, callback: Callable[[str], None]) -> None:
        reason = self.stop_reason or "stop"
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, reason)
        else:
            callback(reason)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stop_requested.is_set():
            log.warning("process.forced_exit", signal=name)
            for callback in self._on_force:
                callback()
            os._exit(FORCED_EXIT_CODE)
        self.request_stop(name)

    def _excepthook(self, kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            return
        log.critical("process.uncaught_exception", error=repr(exc), exc_info=(kind, exc, tb))

    def _thread_excepthook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        log.error(
            "thread.uncaught_exception",
            thread=args.thread.name if args.thread else None,
            error=repr(args.exc_value),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        )

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        task = context.get("task") or context.get("future")
        fields: dict[str, Any] = {
            "detail": context.get("message"),
            "task": getattr(task, "get_name", lambda: repr(task))() if task is not None else None,
        }
        if exc is not None:
            log.error("loop.uncaught_exception", error=repr(exc), exc_info=exc, **fields)
        else:
            log.error("loop.error", **fields)


# One per process: installing handlers is global by nature.
lifecycle = Lifecycle()
