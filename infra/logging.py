"""Structured JSON logging for every process: one line per event, through structlog.

Standard-library loggers (uvicorn, aiokafka, faust) are routed through the same renderer so that
a process writes nothing but JSON lines, to stdout. When stdout is closed under a running process
(EPIPE), the handler stops writing there, falls back to the log file if one is configured or to
stderr, and asks the process to shut down gracefully.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

_configured = False


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


_DEAD = (errno.EPIPE, errno.EBADF, errno.ECONNRESET, errno.EINVAL)


class ResilientStreamHandler(logging.Handler):
    """Writes to a stream; when that stream dies, to the fallback, and never raises."""

    def __init__(self, stream: IO[str], fallbacks: list[Path | IO[str]]) -> None:
        super().__init__()
        self.stream: IO[str] | None = stream
        self.fallbacks = fallbacks

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        # Handler.handle holds this handler's (reentrant) lock around emit: a log line written
        # while switching streams (the stop request's own) lands on the fallback.
        while self.stream is not None:
            try:
                self.stream.write(line)
                self.stream.flush()
                return
            except (BrokenPipeError, ValueError, OSError) as exc:
                dead = isinstance(exc, BrokenPipeError | ValueError) or exc.errno in _DEAD
                if not dead:
                    raise
                self._stream_died()

    def _stream_died(self) -> None:
        dead = self.stream
        self.stream = None
        _silence(dead)
        while self.fallbacks and self.stream is None:
            candidate = self.fallbacks.pop(0)
            if not isinstance(candidate, Path):
                self.stream = candidate
                continue
            try:
                self.stream = open(candidate, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            except OSError:
                continue
        from infra.lifecycle import lifecycle

        lifecycle.request_stop("log stream closed (EPIPE)")


def _silence(stream: IO[str] | None) -> None:
    """Point a dead standard stream at /dev/null, so no later write or exit-time flush fails."""
    if stream is None:
        return
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(OSError):  # the descriptor may be gone already
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def configure_logging(level: str = "info", *, process: str, log_file: Path | None = None) -> None:
    """Install the JSON renderer once per process; later calls only change the level."""
    global _configured
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if not _configured:
        structlog.configure(
            processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )
        formatter = structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(serializer=_dumps),
            ],
        )
        fallbacks: list[Path | IO[str]] = [log_file] if log_file else []
        fallbacks.append(sys.stderr)
        handler = ResilientStreamHandler(sys.stdout, fallbacks)
        handler.setFormatter(formatter)
        root = logging.getLogger()
        root.handlers[:] = [handler]
        for noisy in ("uvicorn", "uvicorn.error", "uvicorn.access", "faust", "mode", "aiokafka"):
            logger = logging.getLogger(noisy)
            logger.handlers[:] = []
            logger.propagate = True
        structlog.contextvars.bind_contextvars(process=process)
        _configured = True
    logging.getLogger().setLevel(numeric)
    # Libraries chatter at info; our own events are what an operator reads.
    for chatty in ("aiokafka", "faust", "mode", "uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)  # type: ignore[no-any-return]
