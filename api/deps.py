"""Typed FastAPI dependencies: the service, the request's connection, the session user, and the
database scoped to that user's company.

Routes take `Scoped` for everything tenant-owned: it runs only company and user queries, with
the company id (and user id) supplied from the session, so the scope cannot be forgotten.

Every dependency here is a coroutine: FastAPI runs a plain `def` dependency (or a class) in a
worker thread, and two such hops per request cost more than the query on a busy machine.
`Scoped` is one dependency (connection, session, scope) rather than a chain of four, because
FastAPI's solving costs per dependency, on every request. A route that takes `Scoped` takes its
user from it (`db.user`): `CurrentUser` or `Conn` beside it would check out a second connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Annotated

import structlog
from fastapi import Depends, Query, Request, Response

from api.cursor import START, CursorCodec, Position, Scope
from api.db import Db, ScopedDb, request_db
from api.errors import NotAuthenticated
from api.service import ApiService
from api.sessions import SessionUser

PAGE_DEFAULT = 20
PAGE_MAX = 50


async def get_service(request: Request) -> ApiService:
    service: ApiService = request.app.state.service
    return service


Service = Annotated[ApiService, Depends(get_service)]


def connection(service: ApiService) -> AbstractAsyncContextManager[Db]:
    """A pooled connection under the request's one database deadline (503 when it is down)."""
    settings = service.settings
    return request_db(service.pool, timeout_s=settings.api_db_timeout_s, slow_ms=settings.slow_query_ms)


async def get_db(service: Service) -> AsyncIterator[Db]:
    async with connection(service) as db:
        yield db


Conn = Annotated[Db, Depends(get_db)]


async def current_user(request: Request, response: Response, db: Conn, service: Service) -> SessionUser:
    """The user of the request's session, or a 401 that says why. Never a fallback user."""
    sessions = service.sessions
    cookie = request.cookies.get(sessions.cookie_name)
    if not cookie:
        raise NotAuthenticated("not_authenticated", "no session cookie: log in first")
    sid = sessions.unsign(cookie)
    if sid is None:
        raise NotAuthenticated("invalid_session", "the session cookie is not valid: log in again")
    user = await sessions.load(db, sid)
    if user is None:
        raise NotAuthenticated("session_expired", "the session has expired or was closed: log in again")
    if user.touched:
        # Rolling expiry: the browser's copy of the cookie lives as long as the row now does.
        sessions.set_cookie(response, sid)
    structlog.contextvars.bind_contextvars(user_id=user.id, company_id=user.company_id)
    return user


CurrentUser = Annotated[SessionUser, Depends(current_user)]


async def scoped_db(request: Request, response: Response) -> AsyncIterator[ScopedDb]:
    """The request's connection, bound to the session user (checked on that same connection)."""
    service: ApiService = request.app.state.service
    async with connection(service) as db:
        user = await current_user(request, response, db, service)
        yield ScopedDb(db, user)


Scoped = Annotated[ScopedDb, Depends(scoped_db)]


class Page:
    """`limit` (capped at 50) and `cursor` of a keyset list, decoded against the list's scope."""

    __slots__ = ("_codec", "cursor", "limit")

    def __init__(self, limit: int, cursor: str | None, codec: CursorCodec) -> None:
        self.limit = min(limit, PAGE_MAX)
        self.cursor = cursor
        self._codec = codec

    def start(self, kind: str, scope: Scope) -> Position:
        if self.cursor is None:
            return Position(*START)
        return self._codec.decode(self.cursor, kind, scope)

    def next_cursor(self, kind: str, scope: Scope, last: Position | None) -> str | None:
        return None if last is None else self._codec.encode(kind, scope, last)


async def paging(
    request: Request,
    limit: Annotated[
        int, Query(ge=1, description=f"Rows per page (default {PAGE_DEFAULT}, max {PAGE_MAX}).")
    ] = PAGE_DEFAULT,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
) -> Page:
    service: ApiService = request.app.state.service
    return Page(limit, cursor, service.cursors)


Paging = Annotated[Page, Depends(paging)]
