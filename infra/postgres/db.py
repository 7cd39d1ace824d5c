"""The asyncpg pool: one per process, created lazily, with JSON codecs on orjson."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

# What a lost, refused or hung database looks like to asyncpg: the caller's 503 or retry, never a 500.
DB_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)

# What a retry cures besides an outage: a conflict between concurrent writers.
CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


def is_transient(exc: BaseException) -> bool:
    """A database outage or a conflict that a retry cures, as opposed to a poison record."""
    return isinstance(exc, DB_DOWN_ERRORS + CONFLICT_ERRORS)


# A server starting up or recovering (after a crash) refuses connections for a few seconds.
STARTING_ERRORS: tuple[type[BaseException], ...] = (asyncpg.CannotConnectNowError, ConnectionRefusedError)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            schema="pg_catalog",
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            format="text",
        )


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10, **kw: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection, **kw)
    assert pool is not None
    return pool


async def connect(url: str, *, wait_s: float = 0.0) -> asyncpg.Connection:
    """A connection with the JSON codecs; waits up to `wait_s` for a server still starting."""
    conn: asyncpg.Connection | None = None
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(STARTING_ERRORS),
        stop=stop_after_delay(wait_s),
        wait=wait_exponential_jitter(multiplier=0.1, max=1.0),
        reraise=True,
    ):
        with attempt:
            conn = await asyncpg.connect(url)
    assert conn is not None
    await _init_connection(conn)
    return conn


def mask_url(url: str) -> str:
    """`url` with its password (if any) shown as `***`: what logs and the console may print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
