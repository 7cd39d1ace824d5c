"""A company's help desk for end-to-end tests of WhatsApp conversations: signed webhooks into a
real ingest, and what one of its agents sees through the real read API; Meta's 2026 payload
shapes (business-scoped user ids, phone numbers only where shared)."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx

from infra.postgres.tenants import Tenant, upsert_tenant
from tests.api.world import Member, add_member, auth, login
from tests.support import CortexxProcess, post_signed, wait_until

PHONE_ID = "106540352242922"
Json = dict[str, Any]
NOW = int(time.time()) - 600


def bsuid() -> str:
    return f"US.{secrets.randbelow(10**19):019d}"


def wamid() -> str:
    return f"wamid.{uuid.uuid4().hex}"


def card(*, user_id: str | None, phone: str | None, name: str = "Pablo", username: str | None = None) -> Json:
    """A `contacts[]` entry as Meta sends it since 2026: wa_id only when the phone is shared."""
    profile: Json = {"name": name}
    if username:
        profile["username"] = username
    out: Json = {"profile": profile}
    if phone:
        out["wa_id"] = phone
    if user_id:
        out["user_id"] = user_id
    return out


def text(*, user_id: str | None, phone: str | None, body: str, at: int, id_: str | None = None) -> Json:
    message: Json = {
        "id": id_ or wamid(),
        "timestamp": str(at),
        "type": "text",
        "text": {"body": body},
    }
    if phone:
        message["from"] = phone
    if user_id:
        message["from_user_id"] = user_id
    return message


def envelope(field: str = "messages", **value: Any) -> Json:
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_ID},
        **value,
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": field, "value": value}]}],
    }


@dataclass
class Desk:
    """A company, one of its agents logged in to the read API, and a way to post its webhooks."""

    tenant: Tenant
    agent: Member
    cookie: str
    client: httpx.AsyncClient
    ingest: CortexxProcess
    api: CortexxProcess
    db: asyncpg.Connection

    async def post(self, doc: Json) -> None:
        response = await post_signed(self.client, self.ingest.url, self.tenant, doc)
        assert response.status_code == 200, response.text

    async def get(self, path: str) -> Any:
        response = await self.client.get(f"{self.api.url}/api/v1{path}", headers=auth(self.cookie))
        assert response.status_code == 200, response.text
        return response.json()

    async def conversations(self, count: int) -> list[Json]:
        async def listed() -> list[Json]:
            items: list[Json] = (await self.get("/conversations?limit=50"))["items"]
            return items if len(items) == count else []

        return await wait_until(listed, timeout_s=20)

    async def messages_of(self, conversation_id: int, count: int) -> list[Json]:
        async def listed() -> list[Json]:
            items: list[Json] = (await self.get(f"/conversations/{conversation_id}/messages"))["items"]
            return items if len(items) >= count else []

        return await wait_until(listed, timeout_s=20)


async def open_desk(
    db: asyncpg.Connection, client: httpx.AsyncClient, ingest: CortexxProcess, api: CortexxProcess
) -> Desk:
    """A new company with one agent, logged in."""
    tenant, _ = await upsert_tenant(
        db,
        slug=f"u-{secrets.token_hex(5)}",
        app_secret=secrets.token_hex(16),
        verify_token=secrets.token_hex(8),
        name="Desk",
    )
    agent = await add_member(db, tenant, "agent")
    cookie = await login(client, api, agent)
    return Desk(tenant, agent, cookie, client, ingest, api, db)
