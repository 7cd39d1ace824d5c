"""The console's routes: `/api/v1/ops/...` (JSON, in the OpenAPI schema) and `/ops` (HTML).

Operators only (the role that runs the deployment): an agent or a company admin gets 403 (JSON
or a page), no session a 401 (JSON) or the login page.
A replay that sends (`dry_run: false`) needs the session's CSRF token in `X-CSRF-Token`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from api.deps import Conn, CurrentUser, Service, current_user
from api.errors import ApiError, NotAuthenticated
from api.models import ErrorOut
from api.ops import data
from api.ops.chart import line_chart
from api.ops.models import (
    LetterDetailOut,
    LetterFilterIn,
    LettersOut,
    MediaFailuresOut,
    OverviewOut,
    ReplayIn,
    ReplayOut,
    ReplaysOut,
    TenantsOut,
)
from api.sessions import SessionUser

HERE = Path(__file__).resolve().parent
STATIC = {"ops.js": "text/javascript", "ops.css": "text/css"}
CSRF_HEADER = "X-CSRF-Token"
_templates = Environment(
    loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]), auto_reload=False
)


# The console shows every company's dead letters and tenants: it is for the deployment's
# operators, not for a company's own admins (who must never see another company's data).
OPERATOR = "operator"


async def require_operator(user: CurrentUser) -> SessionUser:
    if user.role != OPERATOR:
        raise ApiError(403, "forbidden", "the operators' console is for operators")
    return user


Operator = Annotated[SessionUser, Depends(require_operator)]


def check_csrf(request: Request, user: SessionUser, service: Any) -> None:
    if not service.ops.csrf_ok(user.sid, request.headers.get(CSRF_HEADER)):
        raise ApiError(403, "csrf_failed", f"a replay needs the page's CSRF token in {CSRF_HEADER}")


def _filter(
    topic: str | None, tenant: str | None, error_type: str | None, since: str | None, until: str | None
) -> LetterFilterIn:
    def when(value: str | None) -> datetime | None:
        if not value:
            return None
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ApiError(422, "invalid_request", f"{value!r} is not an ISO time") from None

    return LetterFilterIn(
        topic=topic or None,
        tenant=tenant or None,
        error_type=error_type or None,
        since=when(since),
        until=when(until),
    )


# JSON.

api = APIRouter(
    prefix="/api/v1/ops",
    tags=["ops"],
    responses={403: {"model": ErrorOut, "description": "Not an operator, or a bad CSRF token"}},
)

TopicQ = Annotated[str | None, Query(description="Source topic or its .dlq topic.")]
TenantQ = Annotated[str | None, Query(description="Company slug.")]
ErrorQ = Annotated[str | None, Query(description="Error type, e.g. WuzapiPermanent.")]
SinceQ = Annotated[str | None, Query(description="Failed at or after (ISO time).")]
UntilQ = Annotated[str | None, Query(description="Failed at or before (ISO time).")]


@api.get("/overview")
async def overview_json(_: Operator, service: Service) -> OverviewOut:
    """Processes up or down, ingest and worker rates, lag, dead letters, breakers, 15 minutes of history."""
    return await data.overview(service)


@api.get("/dead-letters")
async def letters_json(
    _: Operator,
    service: Service,
    topic: TopicQ = None,
    tenant: TenantQ = None,
    error_type: ErrorQ = None,
    since: SinceQ = None,
    until: UntilQ = None,
    limit: Annotated[int, Query(ge=1, le=data.LETTERS_MAX)] = 100,
) -> LettersOut:
    """Dead letters of both dead-letter topics, newest failure first."""
    return await data.letters(service, _filter(topic, tenant, error_type, since, until), limit)


@api.get("/dead-letters/{letter_id}")
async def letter_json(letter_id: str, _: Operator, service: Service, db: Conn) -> LetterDetailOut:
    """One dead letter: its original record, its error history and its replays."""
    return await data.letter(service, db, letter_id)


@api.post("/dead-letters/replay")
async def replay_json(body: ReplayIn, request: Request, user: Operator, service: Service) -> ReplayOut:
    """Replay a selection (`ids`) or a `filter`. A dry run (the default) previews; sending needs
    the CSRF token, and every replay is recorded with who and when."""
    if not body.dry_run:
        check_csrf(request, user, service)
    return await data.replay_letters(service, user, body)


@api.get("/replays")
async def replays_json(_: Operator, db: Conn, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> ReplaysOut:
    """The replay audit: who replayed which dead letter, when (newest first)."""
    return ReplaysOut(items=await data.replay_events(db, limit))


@api.get("/media-failures")
async def media_failures_json(_: Operator, db: Conn) -> MediaFailuresOut:
    """Files that could not be fetched (with the reason) or are being retried, newest first; their
    dead letters are on `meta.media.dlq`."""
    return await data.media_failures(db)


@api.get("/tenants")
async def tenants_json(_: Operator, service: Service, db: Conn) -> TenantsOut:
    """Every company: volume, last webhook, rate limit, breaker, and whether it has gone silent."""
    return await data.tenants(service, db)


# HTML.

pages = APIRouter(prefix="/ops", include_in_schema=False)


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_templates.get_template(name).render(**context), status_code=status)


async def page_user(request: Request, response: Response, db: Conn, service: Service) -> SessionUser | None:
    try:
        return await current_user(request, response, db, service)
    except NotAuthenticated:
        return None


PageUser = Annotated[SessionUser | None, Depends(page_user)]


def _gate(request: Request, user: SessionUser | None) -> Response | None:
    if user is None:
        target = quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        return RedirectResponse(f"/ops/login?next={target}", status_code=303)
    if user.role != OPERATOR:
        return _page("forbidden.html", 403, user=user)
    return None


def _context(service: Any, user: SessionUser, active: str) -> dict[str, Any]:
    return {"user": user, "csrf": service.ops.csrf_token(user.sid), "active": active}


@pages.get("/login")
async def login_page(next: str = "/ops") -> HTMLResponse:
    safe = next if next.startswith("/ops") else "/ops"
    return _page("login.html", next=safe)


@pages.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        raise ApiError(404, "not_found", "no such file")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name])


@pages.get("")
async def overview_page(request: Request, user: PageUser, service: Service) -> Response:
    if (denied := _gate(request, user)) is not None:
        return denied
    assert user is not None
    view = await data.overview(service)
    return _page("overview.html", view=view, **_context(service, user, "overview"))


@pages.get("/charts/{name}.svg")
async def chart(name: str, request: Request, user: PageUser, service: Service) -> Response:
    if (denied := _gate(request, user)) is not None:
        return denied
    series = service.ops.collector.series()
    fields = {
        "throughput": ("records_per_s", "Worker throughput", "records/s"),
        "ingest": ("accepted_per_s", "Ingest accepted", "POST/s"),
        "lag": ("lag", "Consumer lag", "records"),
    }
    if name not in fields:
        raise ApiError(404, "not_found", "no such chart")
    key, title, unit = fields[name]
    svg = line_chart(
        [(p["at"], p[key]) for p in series],
        title=title,
        unit=unit,
        span_s=service.settings.ops_history_s,
    )
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


@pages.get("/dead-letters")
async def letters_page(
    request: Request,
    user: PageUser,
    service: Service,
    db: Conn,
    topic: str | None = None,
    tenant: str | None = None,
    error_type: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> Response:
    if (denied := _gate(request, user)) is not None:
        return denied
    assert user is not None
    where = _filter(topic, tenant, error_type, since, until)
    listed = await data.letters(service, where, data.LETTERS_MAX)
    return _page(
        "dead_letters.html",
        letters=listed,
        where=where,
        raw={"since": since or "", "until": until or ""},
        replays=await data.replay_events(db, 20),
        **_context(service, user, "dead-letters"),
    )


@pages.get("/dead-letters/{letter_id}")
async def letter_page(
    letter_id: str, request: Request, user: PageUser, service: Service, db: Conn
) -> Response:
    if (denied := _gate(request, user)) is not None:
        return denied
    assert user is not None
    detail = await data.letter(service, db, letter_id)
    return _page("letter.html", letter=detail, **_context(service, user, "dead-letters"))


@pages.get("/media")
async def media_page(request: Request, user: PageUser, service: Service, db: Conn) -> Response:
    if (denied := _gate(request, user)) is not None:
        return denied
    assert user is not None
    failures = await data.media_failures(db)
    return _page("media.html", failures=failures, **_context(service, user, "media"))


@pages.get("/tenants")
async def tenants_page(request: Request, user: PageUser, service: Service, db: Conn) -> Response:
    if (denied := _gate(request, user)) is not None:
        return denied
    assert user is not None
    listed = await data.tenants(service, db)
    return _page("tenants.html", tenants=listed, **_context(service, user, "tenants"))
