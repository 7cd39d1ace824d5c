"""Named statements and the connection wrappers that run them: timed, and scoped to a company.

A statement is a `Query` (not about one company: sessions, login, health), a `CompanyQuery`
(`$1` is the company id) or a `UserQuery` (`$1` the company id, `$2` the user id). Only
`ScopedDb`, built from the session user, runs the last two, and it supplies those leading
parameters itself: a route cannot pass another company's id, nor forget to pass one.
Every statement is timed under its name; one over the slow-query threshold is logged.

No statement may leave state on the session once its transaction ends (a SET, LISTEN, cursor,
prepared statement, advisory lock, set_config(..., false) or temporary table): the API's pool does
not reset a connection on release (api/service.py), so the next request, another company's,
would inherit it. Each of the three refuses such SQL when it is built, at import time.

A request has one database deadline (`CORTEXX_API_DB_TIMEOUT_S`) for everything it does there:
waiting for a pooled connection and every statement on it draw on the same budget, so a stalled
database answers 503 after that time, not after the acquire's timeout and then the statement's.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from asyncpg.transaction import Transaction

from api.errors import DatabaseUnavailable
from api.metrics import QUERY_SECONDS, SLOW_QUERIES
from infra.postgres.db import DB_DOWN_ERRORS
from infra.runtime.logging import get_logger

if TYPE_CHECKING:
    from api.sessions import SessionUser

log = get_logger("api.db")

T = TypeVar("T")

# What a statement may not do, as the start of one of its `;`-separated parts (SET and RESET of
# any kind, LISTEN, DECLARE, PREPARE, DEALLOCATE, DISCARD, LOAD, CREATE TEMP ...), or anywhere in
# it (set_config, session-level advisory locks, SELECT ... INTO TEMP). The transaction-scoped
# forms that would be safe (SET LOCAL, set_config(..., true)) are refused too: nothing needs them.
# pg_advisory_xact_lock is allowed: it ends with the transaction, and the pool rolls back one left
# open.
_SESSION_STATE_START = re.compile(
    r"(SET|RESET|LISTEN|DECLARE|PREPARE|DEALLOCATE|DISCARD|LOAD"
    r"|CREATE\s+(GLOBAL\s+|LOCAL\s+)?(TEMP|TEMPORARY)|CREATE\s+(OR\s+REPLACE\s+)?FUNCTION\s+pg_temp)\b",
    re.IGNORECASE,
)
_SESSION_STATE_ANYWHERE = re.compile(
    r"\bset_config\s*\(|\bpg_(try_)?advisory_lock|\bINTO\s+(TEMP|TEMPORARY)\b", re.IGNORECASE
)
_LEADING_COMMENTS = re.compile(r"\A(\s+|--[^\n]*(\n|\Z)|/\*.*?\*/)+", re.DOTALL)


def session_state(sql: str) -> str | None:
    """The part of `sql` that would leave state on the session after its transaction, or None."""
    for part in sql.split(";"):
        statement = _LEADING_COMMENTS.sub("", part)
        if _SESSION_STATE_START.match(statement) or _SESSION_STATE_ANYWHERE.search(statement):
            return part.strip()
    return None


def _check_session_state(name: str, sql: str) -> None:
    # Once per statement, where it is defined (module constants): never on a request's path.
    found = session_state(sql)
    if found is not None:
        raise ValueError(f"{name}: a statement may not leave session state on a pooled connection: {found}")


@dataclass(frozen=True, slots=True)
class Query:
    """A statement about no particular company."""

    name: str
    sql: str

    def __post_init__(self) -> None:
        _check_session_state(self.name, self.sql)


@dataclass(frozen=True, slots=True)
class CompanyQuery:
    """A statement whose `$1` is the session user's company id."""

    name: str
    sql: str

    def __post_init__(self) -> None:
        _check_session_state(self.name, self.sql)
        if "company_id = $1" not in self.sql:
            raise ValueError(f"{self.name}: a company query must filter on company_id = $1")


@dataclass(frozen=True, slots=True)
class UserQuery:
    """A statement whose `$1` is the session user's company id and `$2` the user's id."""

    name: str
    sql: str

    def __post_init__(self) -> None:
        _check_session_state(self.name, self.sql)
        if "company_id = $1" not in self.sql or "user_id = $2" not in self.sql:
            raise ValueError(f"{self.name}: a user query must filter on company_id = $1 and user_id = $2")


class Deadline:
    """The time left of a request's database budget."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def left(self) -> float:
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's database deadline has passed")
        return left


# Any named statement: Db runs what it is given; ScopedDb supplies a company or user query's
# leading parameters first.
Statement = Query | CompanyQuery | UserQuery


class Db:
    """One pooled connection for one request: every statement named, timed, bounded by the
    request's deadline (none: the pool's command timeout), and mapped to 503 when the database
    is down."""

    def __init__(self, conn: asyncpg.Connection, *, slow_ms: float, deadline: Deadline | None = None) -> None:
        self._conn = conn
        self._slow_ms = slow_ms
        self._deadline = deadline
        # A statement failed for want of a database: the connection is not worth resetting.
        self.broken = False

    @property
    def connection(self) -> asyncpg.Connection:
        """The raw connection, for code that runs its own SQL (the console's dead-letter pages)."""
        return self._conn

    def _timeout(self) -> float | None:
        return None if self._deadline is None else self._deadline.left()

    async def _run(self, query: Statement, call: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        try:
            return await call()
        except DB_DOWN_ERRORS as exc:
            self.broken = True
            log.warning("db.unavailable", query=query.name, error=f"{type(exc).__name__}: {exc}")
            raise DatabaseUnavailable() from exc
        finally:
            elapsed = time.perf_counter() - started
            QUERY_SECONDS.labels(query.name).observe(elapsed)
            if elapsed * 1000 >= self._slow_ms:
                SLOW_QUERIES.labels(query.name).inc()
                log.warning("db.slow_query", query=query.name, ms=round(elapsed * 1000, 2))

    async def fetch(self, query: Statement, *args: Any) -> list[asyncpg.Record]:
        return await self._run(query, lambda: self._conn.fetch(query.sql, *args, timeout=self._timeout()))

    async def fetchrow(self, query: Statement, *args: Any) -> asyncpg.Record | None:
        return await self._run(query, lambda: self._conn.fetchrow(query.sql, *args, timeout=self._timeout()))

    async def fetchval(self, query: Statement, *args: Any) -> Any:
        return await self._run(query, lambda: self._conn.fetchval(query.sql, *args, timeout=self._timeout()))

    async def execute(self, query: Statement, *args: Any) -> str:
        return await self._run(query, lambda: self._conn.execute(query.sql, *args, timeout=self._timeout()))

    def transaction(self) -> Transaction:
        return self._conn.transaction()


async def delete_in_batches(db: Db, query: Query, batch: int) -> int:
    """Run a `DELETE ... LIMIT $1` statement until a batch deletes fewer than `batch` rows; return
    how many in all (pruning jobs: short statements, no long lock)."""
    total = 0
    while True:
        status = await db.execute(query, batch)
        deleted = int(status.rsplit(" ", 1)[-1])
        total += deleted
        if deleted < batch:
            return total


@asynccontextmanager
async def request_db(pool: asyncpg.Pool, *, timeout_s: float, slow_ms: float) -> AsyncIterator[Db]:
    """A pooled connection for one request under one deadline; a database that is down is a 503."""
    deadline = Deadline(timeout_s)
    try:
        conn = await pool.acquire(timeout=deadline.left())
    except DB_DOWN_ERRORS as exc:
        log.warning("db.acquire_failed", error=f"{type(exc).__name__}: {exc}")
        raise DatabaseUnavailable() from exc
    db = Db(conn, slow_ms=slow_ms, deadline=deadline)
    try:
        yield db
    finally:
        if db.broken:
            # Resetting it would wait on the same stalled server; closing it is instant.
            conn.terminate()
        await pool.release(conn)


class ScopedDb:
    """The request's connection bound to the session user: runs company and user queries only."""

    def __init__(self, db: Db, user: SessionUser) -> None:
        self._db = db
        self.user = user
        self.company_id = user.company_id
        self.user_id = user.id

    def _bind(self, query: CompanyQuery | UserQuery, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if isinstance(query, UserQuery):
            return (self.company_id, self.user_id, *args)
        return (self.company_id, *args)

    async def fetch(self, query: CompanyQuery | UserQuery, *args: Any) -> list[asyncpg.Record]:
        return await self._db.fetch(query, *self._bind(query, args))

    async def fetchrow(self, query: CompanyQuery | UserQuery, *args: Any) -> asyncpg.Record | None:
        return await self._db.fetchrow(query, *self._bind(query, args))

    async def fetchval(self, query: CompanyQuery | UserQuery, *args: Any) -> Any:
        return await self._db.fetchval(query, *self._bind(query, args))

    async def execute(self, query: CompanyQuery | UserQuery, *args: Any) -> str:
        return await self._db.execute(query, *self._bind(query, args))

    def transaction(self) -> Transaction:
        return self._db.transaction()
