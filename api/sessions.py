"""Server-side sessions in Postgres (`user_sessions`), and the signed cookie that names one.

The cookie holds a random sid and its HMAC under a key derived from `session_secret`, so a
forged or altered cookie is refused before any query. The row holds who the user is; it is
judged expired by the database clock, renewed on use (rolling), and deleted at logout. A new
sid is issued at every login (no fixation), and one pruning job per process deletes expired
rows (and the login attempts whose window has ended) at a jittered interval. Nothing lives in
process memory, so sessions survive restarts.
The row is keyed by the sid's SHA-256, not the sid: a leaked table (a backup, a replica, a
read-only SQL hole) names no live session. (A fast hash is enough: the sid is 256 random bits.)
`Sessions` also holds what a login needs before a session exists: the limits on attempts
(api/login_limits.py) and the bounded pool that checks passwords (api/users.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import Response

from api.db import Db, delete_in_batches
from api.errors import DatabaseUnavailable
from api.login_limits import LoginLimits
from api.metrics import SESSIONS_PRUNED
from api.queries import SESSION_CREATE, SESSION_DELETE, SESSION_LOAD, SESSION_PRUNE
from api.users import PasswordHashing, default_hashing_threads
from infra.postgres.db import DB_DOWN_ERRORS
from infra.runtime.compare import same_secret
from infra.runtime.logging import get_logger
from infra.runtime.secret_file import UnusableSecret, persisted_secret
from infra.runtime.settings import Settings

log = get_logger("api.sessions")

SESSION_KEY_FILE = "session.key"
PRUNE_BATCH = 1000
_PRUNE_DOWN_ERRORS: tuple[type[BaseException], ...] = (DatabaseUnavailable, *DB_DOWN_ERRORS)


class SessionSecretMissing(RuntimeError):
    """Production without CORTEXX_SESSION_SECRET, or with one too short to sign anything."""


def load_session_secret(settings: Settings) -> bytes:
    """The configured secret; in development, one generated once and kept under data_dir."""
    if settings.session_secret is not None:
        secret = settings.session_secret.get_secret_value().encode()
        if settings.env == "production" and len(secret) < 32:
            raise SessionSecretMissing("CORTEXX_SESSION_SECRET must be at least 32 characters")
        return secret
    if settings.env == "production":
        raise SessionSecretMissing("production needs CORTEXX_SESSION_SECRET")
    return _persisted_key(settings.data_dir / SESSION_KEY_FILE)


def _persisted_key(path: Path) -> bytes:
    try:
        return persisted_secret(path).encode()
    except UnusableSecret as exc:
        raise SessionSecretMissing(str(exc)) from None


def derive_key(secret: bytes, purpose: str) -> bytes:
    """One key per use (cookies, cursors), so a value signed for one is worthless to the other."""
    return hmac.new(secret, f"cortexx:{purpose}".encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class SessionUser:
    """Who the request is from; the company scope of every query comes from here."""

    sid: str
    id: int
    company_id: int
    company_slug: str
    company_name: str
    email: str
    name: str
    role: str
    expire: datetime
    touched: bool


def stored_sid(sid: str) -> str:
    """What `user_sessions.sid` holds for a session: the hex SHA-256 of its sid."""
    return hashlib.sha256(sid.encode()).hexdigest()


class Sessions:
    def __init__(self, settings: Settings, secret: bytes) -> None:
        self.cookie_name = settings.session_cookie_name
        self.ttl_s = settings.session_ttl_s
        self.touch_s = min(settings.session_touch_s, settings.session_ttl_s)
        self.secure = (
            settings.session_cookie_secure
            if settings.session_cookie_secure is not None
            else settings.env != "development"
        )
        self._key = derive_key(secret, "session-cookie")
        self.login_limits = LoginLimits(settings, derive_key(secret, "login-attempts"))
        self.password_hashing = PasswordHashing(
            threads=settings.api_login_hash_threads or default_hashing_threads(),
            queue_max=settings.api_login_hash_queue_max,
        )

    # The cookie.

    def _mac(self, sid: str) -> str:
        digest = hmac.new(self._key, sid.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, sid: str) -> str:
        return f"{sid}.{self._mac(sid)}"

    def unsign(self, cookie: str) -> str | None:
        """The sid of a cookie we issued, or None for anything forged, altered or malformed."""
        sid, dot, mac = cookie.partition(".")
        if not dot or not sid or len(cookie) > 200:
            return None
        return sid if same_secret(mac, self._mac(sid)) else None

    def set_cookie(self, response: Response, sid: str) -> None:
        response.set_cookie(
            self.cookie_name,
            self.sign(sid),
            max_age=int(self.ttl_s),
            path="/",
            httponly=True,
            samesite="lax",
            secure=self.secure,
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(self.cookie_name, path="/", httponly=True, samesite="lax", secure=self.secure)

    # The row.

    async def create(self, db: Db, *, user_id: int, company_id: int, meta: dict[str, Any]) -> str:
        sid = secrets.token_urlsafe(32)
        sess = {"user_id": user_id, "company_id": company_id, **meta}
        await db.fetchval(SESSION_CREATE, stored_sid(sid), sess, self.ttl_s)
        return sid

    async def load(self, db: Db, sid: str) -> SessionUser | None:
        """The session's user if the session exists and has not expired; renews it when due."""
        row = await db.fetchrow(SESSION_LOAD, stored_sid(sid), self.ttl_s, self.touch_s)
        if row is None:
            return None
        return SessionUser(
            sid=sid,
            id=row["id"],
            company_id=row["company_id"],
            company_slug=row["company_slug"],
            company_name=row["company_name"],
            email=row["email"],
            name=row["name"],
            role=row["role"],
            expire=row["expire"],
            touched=row["touched"],
        )

    async def delete(self, db: Db, sid: str) -> None:
        await db.execute(SESSION_DELETE, stored_sid(sid))

    # Pruning.

    async def prune(self, db: Db) -> int:
        return await delete_in_batches(db, SESSION_PRUNE, PRUNE_BATCH)

    async def prune_forever(self, pool: asyncpg.Pool, *, interval_s: float, slow_ms: float) -> None:
        """One job per process. The jitter keeps replicas that started together from pruning together."""
        while True:
            await asyncio.sleep(interval_s * random.uniform(0.5, 1.5))
            try:
                async with pool.acquire(timeout=interval_s) as conn:
                    db = Db(conn, slow_ms=slow_ms)
                    deleted = await self.prune(db)
                    attempts = await self.login_limits.prune(db)
            except _PRUNE_DOWN_ERRORS as exc:
                log.warning("session.prune_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            except asyncpg.PostgresError as exc:
                log.error("session.prune_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            if deleted:
                SESSIONS_PRUNED.inc(deleted)
                log.info("session.pruned", sessions=deleted)
            if attempts:
                log.info("login_attempts.pruned", rows=attempts)
