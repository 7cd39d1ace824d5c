"""Limits on login attempts per account and per client address, counted in Postgres.

Every API replica sees the same counts: one row per key (`login_attempts`, migration 0013) holds
the attempts since its window began and when that window ends. An attempt takes a slot on its
client address, then one on its account, before any password is checked: past either limit it
is refused (429 with Retry-After) for the price of a statement, and no argon2. A failed attempt
keeps its slots; a success gives the address's back and resets the account. A refused attempt
takes no slot, so hammering a locked account does not keep it locked: its user waits one window
at most. The account limit stops guessing one user's password; the address limit stops one
client spraying guesses over many accounts.

The account is the email as typed, trimmed and lower-cased, whether or not a user has it (a
refusal must not tell which emails exist). The address is the client's as uvicorn resolves it:
X-Forwarded-For is believed only from the proxies that FORWARDED_ALLOW_IPS names (loopback by
default). An IPv6 client counts as its /64, which one subscriber usually holds whole.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Literal

from api.db import Db, Query, delete_in_batches
from infra.runtime.settings import Settings

Limit = Literal["account", "address"]
PRUNE_BATCH = 1000

# One statement per key: take a slot (a new window if the last one ended), or, past the limit,
# take nothing and say how many seconds are left of the window.
ATTEMPT_TAKE = Query(
    "login_attempt.take",
    """
WITH taken AS (
    INSERT INTO login_attempts AS a (kind, key, failures, window_ends)
    VALUES ($1, $2, 1, now() + make_interval(secs => $3::float8))
    ON CONFLICT (kind, key) DO UPDATE
       SET failures = CASE WHEN a.window_ends <= now() THEN 1 ELSE a.failures + 1 END,
           window_ends = CASE WHEN a.window_ends <= now() THEN EXCLUDED.window_ends ELSE a.window_ends END
     WHERE a.window_ends <= now() OR a.failures < $4::int
    RETURNING 1
)
SELECT NULL::int AS retry_after_s FROM taken
UNION ALL
SELECT greatest(1, ceil(extract(epoch FROM window_ends - now())))::int
  FROM login_attempts
 WHERE kind = $1 AND key = $2 AND NOT EXISTS (SELECT FROM taken)
""",
)

# An attempt that checked no password (refused on its account, or the hashing was busy).
ATTEMPT_GIVE_BACK = Query(
    "login_attempt.give_back",
    """
UPDATE login_attempts SET failures = failures - 1
 WHERE failures > 0 AND ((kind = 'address' AND key = $1) OR (kind = 'account' AND key = $2))
""",
)

ATTEMPT_SUCCEEDED = Query(
    "login_attempt.succeeded",
    """
WITH reset AS (DELETE FROM login_attempts WHERE kind = 'account' AND key = $2)
UPDATE login_attempts SET failures = failures - 1
 WHERE kind = 'address' AND key = $1 AND failures > 0
""",
)

# SKIP LOCKED: replicas pruning at once split the work instead of queueing behind each other.
ATTEMPT_PRUNE = Query(
    "login_attempt.prune",
    """
DELETE FROM login_attempts
 WHERE (kind, key) IN (SELECT kind, key FROM login_attempts
                        WHERE window_ends <= now()
                        ORDER BY window_ends
                        LIMIT $1
                        FOR UPDATE SKIP LOCKED)
""",
)


class LoginThrottled(Exception):
    """Too many attempts on the account or from the address: refused before any password check."""

    def __init__(self, limit: Limit, retry_after_s: int) -> None:
        super().__init__(f"too many login attempts for this {limit}")
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class AttemptKeys:
    """The attempt's rows: HMACs, so the table names no email (nor a password typed in its place)."""

    account: bytes
    address: bytes


def address_bucket(host: str | None) -> str:
    """What one client address counts as: the address itself, or an IPv6 client's /64."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP (a unix socket's peer): still one client
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginLimits:
    def __init__(self, settings: Settings, key: bytes) -> None:
        self.window_s = settings.api_login_window_s
        self._max: dict[Limit, int] = {
            "address": settings.api_login_address_failures_max,
            "account": settings.api_login_account_failures_max,
        }
        self._key = key

    def _hmac(self, limit: Limit, value: str) -> bytes:
        message = f"{limit}\0{value}".encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def keys(self, email: str, client: str) -> AttemptKeys:
        """The rows of an attempt on `email` from `client` (an `address_bucket`)."""
        return AttemptKeys(
            account=self._hmac("account", email.strip().lower()),
            address=self._hmac("address", client),
        )

    async def _take(self, db: Db, limit: Limit, key: bytes) -> int | None:
        """None when a slot was taken, else the seconds until the window ends."""
        row = await db.fetchrow(ATTEMPT_TAKE, limit, key, self.window_s, self._max[limit])
        if row is None:
            # The row appeared after this statement's snapshot began: taken by a concurrent attempt.
            return 1
        retry_after: int | None = row["retry_after_s"]
        return retry_after

    async def admit(self, db: Db, keys: AttemptKeys) -> None:
        """Take the attempt's slots, or raise LoginThrottled having taken none."""
        retry = await self._take(db, "address", keys.address)
        if retry is not None:
            raise LoginThrottled("address", retry)
        retry = await self._take(db, "account", keys.account)
        if retry is not None:
            await db.execute(ATTEMPT_GIVE_BACK, keys.address, None)
            raise LoginThrottled("account", retry)

    async def give_back(self, db: Db, keys: AttemptKeys) -> None:
        """The attempt was admitted but checked no password: it counts for nothing."""
        await db.execute(ATTEMPT_GIVE_BACK, keys.address, keys.account)

    async def succeeded(self, db: Db, keys: AttemptKeys) -> None:
        await db.execute(ATTEMPT_SUCCEEDED, keys.address, keys.account)

    async def prune(self, db: Db) -> int:
        """Delete the rows whose window has ended; return how many."""
        return await delete_in_batches(db, ATTEMPT_PRUNE, PRUNE_BATCH)
