"""Structured JSON logging for every process: one line per event, through structlog.

Standard-library loggers (uvicorn, aiokafka, faust) are routed through the same renderer so that
a process writes nothing but JSON lines.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_configured = False


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure_logging(level: str = "info", *, process: str) -> None:
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
        handler = logging.StreamHandler(sys.stderr)
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
