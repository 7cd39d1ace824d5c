"""Login, logout and who am I: `/api/v1/sessions`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from api.deps import Conn, CurrentUser, Service, connection
from api.errors import ApiError, error_response
from api.login_limits import LoginThrottled, address_bucket
from api.metrics import LOGINS
from api.models import CompanyOut, ErrorOut, LoginIn, SessionOut, UserOut
from api.queries import USER_FOR_LOGIN, USER_LOGGED_IN
from api.sessions import SessionUser
from api.users import HashingBusy
from infra.runtime.logging import get_logger

log = get_logger("api.sessions")

router = APIRouter(prefix="/api/v1/sessions", tags=["sessions"])


def session_out(user: SessionUser) -> SessionOut:
    return SessionOut(
        user=UserOut(
            id=user.id,
            email=user.email,
            name=user.name,
            role=user.role,
            company=CompanyOut(id=user.company_id, slug=user.company_slug, name=user.company_name),
        ),
        expires_at=user.expire,
    )


def _retry_later(status_code: int, code: str, detail: str, retry_after_s: int) -> Response:
    # Returned, not raised: the API's error handler gives an ApiError no headers.
    return error_response(status_code, code, detail, headers={"Retry-After": str(retry_after_s)})


def _busy(client: str) -> Response:
    LOGINS.labels("busy").inc()
    log.info("session.login_busy", client=client)
    return _retry_later(503, "login_busy", "too many logins at once; retry shortly", 1)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionOut,
    responses={
        429: {"model": ErrorOut, "description": "Too many attempts: retry after `Retry-After` seconds."},
        503: {"model": ErrorOut, "description": "Too many logins at once, or the database is down."},
    },
)
async def login(
    body: LoginIn, request: Request, response: Response, service: Service
) -> SessionOut | Response:
    """Log in: a new session (and a new sid, whatever cookie came with the request).

    Too many attempts on the account or from the client address are refused (429) before any
    password is checked; so are logins beyond what the password checks can queue (503)."""
    sessions = service.sessions
    limits = sessions.login_limits
    client = address_bucket(request.client.host if request.client else None)
    keys = limits.keys(body.email, client)
    if sessions.password_hashing.full:
        return _busy(client)  # refused before any query: a storm of logins costs the database nothing
    # No connection is held while the password is checked: logins queued for argon2 must not
    # take the pool's few connections from every other request.
    async with connection(service) as db:
        try:
            await limits.admit(db, keys)
        except LoginThrottled as exc:
            LOGINS.labels("throttled").inc()
            log.info("session.login_throttled", limit=exc.limit, client=client, retry_s=exc.retry_after_s)
            detail = f"too many login attempts for this {exc.limit}; retry in {exc.retry_after_s} s"
            return _retry_later(429, "too_many_attempts", detail, exc.retry_after_s)
        # A session the browser already holds is closed, never reused: no fixation.
        previous = sessions.unsign(request.cookies.get(sessions.cookie_name) or "")
        if previous is not None:
            await sessions.delete(db, previous)
        row = await db.fetchrow(USER_FOR_LOGIN, body.email.strip())
    try:
        check = await sessions.password_hashing.check(row["password_hash"] if row else None, body.password)
    except HashingBusy:
        async with connection(service) as db:
            await limits.give_back(db, keys)  # no password was checked: the attempt counts for nothing
        return _busy(client)
    if row is None or not check.ok or not row["is_active"]:
        # The attempt keeps the slots it took: it counts against the account and the address.
        LOGINS.labels("refused").inc()
        log.info("session.login_refused", known_email=row is not None)
        raise ApiError(401, "invalid_credentials", "email or password is wrong")
    async with connection(service) as db:
        await limits.succeeded(db, keys)
        await db.execute(USER_LOGGED_IN, row["id"], check.rehashed)
        sid = await sessions.create(
            db,
            user_id=row["id"],
            company_id=row["company_id"],
            meta={"user_agent": request.headers.get("user-agent", "")[:200]},
        )
        user = await sessions.load(db, sid)
    if user is None:  # the user was deactivated between the two statements
        raise ApiError(401, "invalid_credentials", "email or password is wrong")
    sessions.set_cookie(response, sid)
    LOGINS.labels("ok").inc()
    log.info("session.created", user_id=user.id, company_id=user.company_id)
    return session_out(user)


@router.get("/me")
async def me(user: CurrentUser) -> SessionOut:
    """The session's user and company, and when the session expires unless used."""
    return session_out(user)


@router.delete("", status_code=status.HTTP_204_NO_CONTENT)
async def logout(user: CurrentUser, db: Conn, service: Service) -> Response:
    """Log out: the session is deleted, so its cookie is worthless from now on."""
    await service.sessions.delete(db, user.sid)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    service.sessions.clear_cookie(response)
    log.info("session.deleted", user_id=user.id, company_id=user.company_id)
    return response
