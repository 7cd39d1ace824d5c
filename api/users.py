"""Users of a company and their passwords (argon2id, through argon2-cffi).

Hashing and verifying cost tens of milliseconds of CPU by design, so the API runs them in a
thread and the event loop keeps serving. An unknown email is verified against a dummy hash, so
a failed login takes as long whether or not the email exists.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# agent: a company's inbox; admin: a company's administrator; operator: runs the deployment
# (the console at /ops, which spans every company).
Role = Literal["agent", "admin", "operator"]
ROLES: tuple[Role, ...] = ("agent", "admin", "operator")
PASSWORD_MIN = 8
PASSWORD_MAX = 1024

_hasher = PasswordHasher()


class UserError(ValueError):
    """A user that cannot be created as asked."""


@dataclass(frozen=True, slots=True)
class PasswordCheck:
    ok: bool
    # A hash made with weaker parameters than today's: store this stronger one.
    rehashed: str | None = None


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash("no such user: this hash only spends the time a real check spends")


def check_password(stored: str | None, password: str) -> PasswordCheck:
    """Whether `password` matches the stored hash; None or "" (no password set) never matches."""
    if not stored:
        # Spend the same time as a real check, then refuse.
        with contextlib.suppress(VerificationError):
            _hasher.verify(_dummy_hash(), password)
        return PasswordCheck(ok=False)
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return PasswordCheck(ok=False)
    rehashed = _hasher.hash(password) if _hasher.check_needs_rehash(stored) else None
    return PasswordCheck(ok=True, rehashed=rehashed)


async def check_password_async(stored: str | None, password: str) -> PasswordCheck:
    return await asyncio.to_thread(check_password, stored, password)


COMPANY_ID_BY_SLUG = "SELECT id FROM companies WHERE slug = $1"

# An email belongs to one company: re-adding it there updates the user; elsewhere it is refused.
UPSERT_USER = """
INSERT INTO users (company_id, email, name, password_hash, role)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (email) DO UPDATE
   SET name = COALESCE(NULLIF(EXCLUDED.name, ''), users.name),
       password_hash = EXCLUDED.password_hash,
       role = EXCLUDED.role,
       is_active = true
 WHERE users.company_id = EXCLUDED.company_id
RETURNING id, (xmax = 0) AS created
"""


async def add_user(
    conn: asyncpg.Connection,
    *,
    company_slug: str,
    email: str,
    password: str,
    name: str = "",
    role: Role = "agent",
) -> tuple[int, bool]:
    """Create a user of a company (or update it there); return its id and whether it is new."""
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise UserError(f"{email!r} is not an email address")
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise UserError(f"the password must have {PASSWORD_MIN} to {PASSWORD_MAX} characters")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    company_id = await conn.fetchval(COMPANY_ID_BY_SLUG, company_slug)
    if company_id is None:
        raise UserError(f"no company with slug {company_slug!r}; register it with `cortexx tenants add`")
    hashed = await asyncio.to_thread(hash_password, password)
    row = await conn.fetchrow(UPSERT_USER, company_id, email, name.strip(), hashed, role)
    if row is None:
        raise UserError(f"{email} is already a user of another company")
    return int(row["id"]), bool(row["created"])
