"""Login, logout and who am I: `/api/v1/sessions`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from api.deps import Conn, CurrentUser, Service
from api.errors import ApiError
from api.metrics import LOGINS
from api.models import CompanyOut, LoginIn, SessionOut, UserOut
from api.queries import USER_FOR_LOGIN, USER_LOGGED_IN
from api.sessions import SessionUser
from api.users import check_password_async
from infra.logging import get_logger

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


@router.post("", status_code=status.HTTP_201_CREATED)
async def login(
    body: LoginIn, request: Request, response: Response, db: Conn, service: Service
) -> SessionOut:
    """Log in: a new session (and a new sid, whatever cookie came with the request)."""
    sessions = service.sessions
    # A session the browser already holds is closed, never reused: no fixation.
    previous = sessions.unsign(request.cookies.get(sessions.cookie_name) or "")
    if previous is not None:
        await sessions.delete(db, previous)
    row = await db.fetchrow(USER_FOR_LOGIN, body.email.strip())
    check = await check_password_async(row["password_hash"] if row else None, body.password)
    if row is None or not check.ok or not row["is_active"]:
        LOGINS.labels("refused").inc()
        log.info("session.login_refused", known_email=row is not None)
        raise ApiError(401, "invalid_credentials", "email or password is wrong")
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
