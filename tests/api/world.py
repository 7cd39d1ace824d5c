"""What the API tests share: two companies seeded with SQL (users, conversations, messages,
notifications), and the session cookie carried by hand."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from api.users import hash_password
from infra.postgres.tenants import Tenant, upsert_tenant
from tests.support import CortexxProcess

PASSWORD = "correct horse battery staple"
COOKIE = "cortexx_session"
# Hashing costs tens of milliseconds by design: once per test session is enough.
_HASH: dict[str, str] = {}


def password_hash() -> str:
    if PASSWORD not in _HASH:
        _HASH[PASSWORD] = hash_password(PASSWORD)
    return _HASH[PASSWORD]


@dataclass
class Member:
    id: int
    email: str
    company_id: int


@dataclass
class Company:
    tenant: Tenant
    agent: Member
    colleague: Member
    # Newest first, as the API lists them.
    conversations: list[int] = field(default_factory=list)
    messages: dict[int, list[int]] = field(default_factory=dict)
    notifications: list[int] = field(default_factory=list)

    @property
    def id(self) -> int:
        return self.tenant.id


@dataclass
class World:
    x: Company
    y: Company


async def add_member(db: asyncpg.Connection, tenant: Tenant, name: str, *, active: bool = True) -> Member:
    email = f"{name}-{secrets.token_hex(4)}@{tenant.slug}.test"
    user_id = await db.fetchval(
        "INSERT INTO users (company_id, email, name, password_hash, is_active) "
        "VALUES ($1, $2, $3, $4, $5) RETURNING id",
        tenant.id,
        email,
        name.title(),
        password_hash(),
        active,
    )
    return Member(int(user_id), email, tenant.id)


async def add_conversation(
    db: asyncpg.Connection, company_id: int, *, status: str = "open", at: datetime | None = None
) -> int:
    at = at or datetime.now(UTC)
    phone = f"49{secrets.randbelow(10**10):010d}"
    contact_id = await db.fetchval(
        "INSERT INTO contacts (company_id, phone_number, name) VALUES ($1, $2, $3) RETURNING id",
        company_id,
        phone,
        f"Contact {phone[-4:]}",
    )
    return int(
        await db.fetchval(
            "INSERT INTO conversations (company_id, contact_id, status, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4, $4) RETURNING id",
            company_id,
            contact_id,
            status,
            at,
        )
    )


async def add_message(db: asyncpg.Connection, company_id: int, conversation_id: int, *, at: datetime) -> int:
    """An inbound message, written as the worker writes one (and bumping the conversation)."""
    message_id = await db.fetchval(
        "INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body, "
        "status, status_rank, sent_at, created_at) "
        "VALUES ($1, $2, $3, 'inbound', 'text', $4, 'received', 0, $5, $5) RETURNING id",
        company_id,
        conversation_id,
        f"wamid.{secrets.token_hex(12)}",
        f"hello at {at.isoformat()}",
        at,
    )
    await db.execute(
        "UPDATE conversations SET last_message_id = $2, last_message_at = $3, last_message_preview = $4, "
        "unread_count = unread_count + 1, updated_at = now() WHERE id = $1",
        conversation_id,
        message_id,
        at,
        f"hello at {at.isoformat()}",
    )
    return int(message_id)


async def add_notification(
    db: asyncpg.Connection, member: Member, conversation_id: int, message_id: int, *, at: datetime
) -> int:
    return int(
        await db.fetchval(
            "INSERT INTO notifications (company_id, user_id, kind, conversation_id, message_id, title, "
            "body, created_at) VALUES ($1, $2, 'message.received', $3, $4, 'New message', 'hello', $5) "
            "RETURNING id",
            member.company_id,
            member.id,
            conversation_id,
            message_id,
            at,
        )
    )


async def new_company(db: asyncpg.Connection, *, conversations: int = 6, messages: int = 3) -> Company:
    tenant, _ = await upsert_tenant(
        db,
        slug=f"co-{secrets.token_hex(5)}",
        app_secret=secrets.token_hex(16),
        verify_token=secrets.token_hex(8),
        name="Company",
    )
    company = Company(
        tenant, await add_member(db, tenant, "agent"), await add_member(db, tenant, "colleague")
    )
    base = datetime.now(UTC) - timedelta(hours=1)
    statuses = ("open", "pending", "closed")
    for i in range(conversations):
        at = base + timedelta(seconds=i)
        conversation_id = await add_conversation(db, tenant.id, status=statuses[i % 3], at=at)
        company.conversations.insert(0, conversation_id)
        ids = []
        for j in range(messages):
            message_at = at + timedelta(milliseconds=10 * (j + 1))
            message_id = await add_message(db, tenant.id, conversation_id, at=message_at)
            ids.insert(0, message_id)
            company.notifications.insert(
                0, await add_notification(db, company.agent, conversation_id, message_id, at=message_at)
            )
        company.messages[conversation_id] = ids
    return company


def session_cookie(response: httpx.Response) -> str:
    """The session cookie's value from a Set-Cookie header (Secure cookies are not kept by
    httpx's jar over plain http, so the tests carry them by hand)."""
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name.strip() == COOKIE:
            return rest.split(";", 1)[0]
    raise AssertionError(f"no {COOKIE} cookie in {response.headers.get_list('set-cookie')}")


def auth(cookie: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={cookie}"}


async def login(client: httpx.AsyncClient, api: CortexxProcess, member: Member) -> str:
    response = await client.post(
        f"{api.url}/api/v1/sessions", json={"email": member.email, "password": PASSWORD}
    )
    assert response.status_code == 201, response.text
    return session_cookie(response)
