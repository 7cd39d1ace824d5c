"""The read API application: `create_app(settings)`, its lifespan and its error handlers.

Every answer carries `X-Request-Id` (the caller's, or a new one) and every log line of the
request carries it too. Every error is JSON `{"error": code, "detail": message}`: bad input is
a 4xx at once, a missing or dead session a 401, a dependency down a 503, and a bug a 500 that
is logged once, here.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_response
from api.metrics import REQUEST_SECONDS, REQUESTS
from api.models import ErrorOut
from api.ops import routes as ops
from api.routes import conversations, health, media, notifications, sessions
from api.service import ApiService
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings

log = get_logger("api")

_HTTP_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    416: "range_not_satisfiable",
    415: "unsupported_media_type",
}


# Every answer: no content sniffing, no referrer beyond our origin, never framed.
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]
# The console's pages load only their own script, style and charts, and nothing may frame them
# (their replay buttons included). Not on /docs, whose page loads Swagger UI from elsewhere.
_CONSOLE_CSP = (
    b"content-security-policy",
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
)


class RequestContext:
    """Binds a request id to the request's logs and answer, adds the security headers, and counts
    the request by route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        # Each request runs in its own task: what is bound here dies with it, and is still bound
        # when the server-error handler logs a crash of this request.
        structlog.contextvars.bind_contextvars(request_id=request_id)
        counted = False

        def count(status: int) -> None:
            # Counted as the answer starts, so that the count is there before the client can
            # ask /metrics for it (a `finally` would run after the answer left).
            nonlocal counted
            counted = True
            label = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], label, str(status)).inc()
            REQUEST_SECONDS.labels(label).observe(time.perf_counter() - started)

        extra = [(b"x-request-id", request_id.encode()), *_SECURITY_HEADERS]
        path: str = scope.get("path", "")
        if path == "/ops" or path.startswith("/ops/"):
            extra.append(_CONSOLE_CSP)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *((name, value) for name, value in extra if name not in present),
                ]
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not counted:
                count(500)  # crashed before answering: the server-error handler answers 500


# Reply attachments: the file, plus room for the multipart framing and the form's fields.
ATTACHMENT_PATH = re.compile(r"^/api/v1/conversations/[^/]+/attachments$")
MULTIPART_SLACK = 64 * 1024


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413 `body_too_large`: at once when its
    Content-Length says so, else as soon as the chunks read pass it (raised from `receive`, so the
    route stops reading and the HTTP error handler answers). No body is read to its end first.
    A reply's attachment may be larger (`attachment_limit`)."""

    def __init__(self, app: ASGIApp, limit: int, attachment_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.attachment_limit = attachment_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        if self.attachment_limit is not None and ATTACHMENT_PATH.match(scope.get("path", "")):
            limit = self.attachment_limit + MULTIPART_SLACK
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    await _too_large(limit)(scope, receive, send)
                    return
                break
        read = 0

        async def limited() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise StarletteHTTPException(413, _too_large_detail(limit))
            return message

        await self.app(scope, limited, send)


def _too_large_detail(limit: int) -> str:
    return f"the body is over {limit:,} bytes"


def _too_large(limit: int) -> Response:
    return error_response(413, "body_too_large", _too_large_detail(limit))


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = str(value.decode("latin-1"))
            # Only a sane id is echoed into our logs and headers.
            if 0 < len(given) <= 128 and given.isprintable():
                return given
    return uuid.uuid4().hex


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": ".".join(str(part) for part in err.get("loc", ())), "msg": str(err.get("msg", ""))}
        for err in exc.errors()
    ]


def create_app(settings: Settings) -> FastAPI:
    service = ApiService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        log.info(
            "api.started",
            host=settings.api_host,
            port=settings.api_port,
            secure_cookie=service.sessions.secure,
        )
        try:
            yield
        finally:
            await service.stop()
            log.info("api.stopped")

    app = FastAPI(
        title="Cortexx read API",
        version="1",
        redirect_slashes=False,  # a trailing slash is an unknown route (JSON 404), not a redirect
        description="Sessions, conversations, replies and notifications for the agents' web app. "
        'Every error is `{"error": code, "detail": message}`.',
        lifespan=lifespan,
        responses={
            400: {"model": ErrorOut},
            401: {"model": ErrorOut},
            404: {"model": ErrorOut},
            422: {"model": ErrorOut},
            503: {"model": ErrorOut},
        },
    )
    app.state.service = service
    # Added first, so it runs inside RequestContext: a 413 carries the request id and is counted.
    app.add_middleware(
        BodyLimit, limit=settings.api_body_limit_bytes, attachment_limit=settings.attachment_max_bytes
    )
    app.add_middleware(RequestContext)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        if exc.status >= 500:
            log.warning("request.unavailable", status=exc.status, error=exc.code)
        return error_response(exc.status, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        errors = _validation_errors(exc)
        detail = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors) or "invalid request"
        return error_response(422, "invalid_request", detail, fields=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        # The one place an unexpected error is logged, with the request's context bound.
        log.error("request.crashed", method=request.method, path=request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "an unexpected error; it has been logged")

    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(conversations.router)
    app.include_router(media.router)
    app.include_router(notifications.router)
    app.include_router(ops.api)
    app.include_router(ops.pages)
    return app
