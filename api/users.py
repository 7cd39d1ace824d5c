"""Users of a company and their passwords (argon2id, through argon2-cffi).

Hashing and verifying cost tens of milliseconds of CPU by design (argon2 spreads one over
several cores), so the API runs them in `PasswordHashing`: a few threads of their own, at a lower
CPU priority, with a bounded queue in front. The event loop (and Postgres beside it) keeps the
CPU it needs however many logins arrive; past the queue a login is refused at once. An unknown
email is verified against a dummy hash, so a failed login takes as long whether or not the email
exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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


# Hashing threads run this much nicer (Linux), so that a burst of logins yields the CPU to the
# event loop and to Postgres; argon2's own threads inherit it (BENCHMARKS.md, "Figures behind the
# code's choices").
HASHING_NICENESS = 10


def default_hashing_threads() -> int:
    """One per CPU this process may use, less one left to the event loop; at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):  # best effort: not every OS has it
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)


class HashingBusy(Exception):
    """Every hashing thread is busy and the queue before them is full."""


class PasswordHashing:
    """Argon2 on at most `threads` threads; at most `queue_max` checks waiting for one.

    A dedicated pool, not asyncio's default executor (which serves DNS lookups, and would run as
    many hashes at once as it has threads). Past the queue a check is refused at once rather
    than queued: waiting longer would only make every login slow, and the client can retry.
    """

    def __init__(self, *, threads: int, queue_max: int) -> None:
        self.threads = threads
        self._capacity = threads + queue_max
        self._in_flight = 0  # only touched on the event loop: no lock
        self._executor = ThreadPoolExecutor(
            threads, thread_name_prefix="password-hashing", initializer=_lower_priority
        )

    @property
    def full(self) -> bool:
        """Every thread busy and the queue full: a check asked for now would be refused."""
        return self._in_flight >= self._capacity

    async def check(self, stored: str | None, password: str) -> PasswordCheck:
        """`check_password` in the pool; HashingBusy if the pool and its queue are full."""
        if self.full:
            raise HashingBusy()
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            # If the request is cancelled, a check already running still finishes in its thread:
            # the pool's size, not this count, is what bounds the CPU.
            return await loop.run_in_executor(self._executor, check_password, stored, password)
        finally:
            self._in_flight -= 1


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
