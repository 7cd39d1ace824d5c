"""Keyset pagination (default 20, max 50, newest first), status counts, and notifications."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from tests.api.world import add_conversation, add_message, add_notification, auth, login, new_company
from tests.support import CortexxProcess

pytestmark = pytest.mark.usefixtures("api")


async def test_limits_default_20_capped_at_50(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection
):
    company = await new_company(db, conversations=60, messages=0)
    cookie = await login(client, api, company.agent)
    url = f"{api.url}/api/v1/conversations"
    first = await client.get(url, headers=auth(cookie))
    assert [c["id"] for c in first.json()["items"]] == company.conversations[:20]
    capped = await client.get(url, params={"limit": 500}, headers=auth(cookie))
    assert capped.status_code == 200
    assert [c["id"] for c in capped.json()["items"]] == company.conversations[:50]
    rest = await client.get(
        url, params={"limit": 50, "cursor": capped.json()["next_cursor"]}, headers=auth(cookie)
    )
    assert [c["id"] for c in rest.json()["items"]] == company.conversations[50:]
    assert rest.json()["next_cursor"] is None


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": -1}, {"limit": "ten"}, {"status": "archived"}])
async def test_bad_parameters_are_422_json(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection, params
):
    company = await new_company(db, conversations=1, messages=0)
    cookie = await login(client, api, company.agent)
    response = await client.get(f"{api.url}/api/v1/conversations", params=params, headers=auth(cookie))
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert isinstance(response.json()["detail"], str)


async def test_bad_cursor_is_400(client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection):
    company = await new_company(db, conversations=1, messages=1)
    cookie = await login(client, api, company.agent)
    for path in (
        "/api/v1/conversations",
        f"/api/v1/conversations/{company.conversations[0]}/messages",
        "/api/v1/notifications",
    ):
        response = await client.get(f"{api.url}{path}", params={"cursor": "bogus"}, headers=auth(cookie))
        assert response.status_code == 400
        assert response.json() == {"error": "invalid_cursor", "detail": "cursor is malformed"}


async def test_paging_while_messages_arrive_neither_repeats_nor_skips(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection
):
    company = await new_company(db, conversations=45, messages=1)
    cookie = await login(client, api, company.agent)
    rng = random.Random(7)
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": 10, **({"cursor": cursor} if cursor else {})}
        page = (
            await client.get(f"{api.url}/api/v1/conversations", params=params, headers=auth(cookie))
        ).json()
        seen += [c["id"] for c in page["items"]]
        # Between pages, the inbox moves: messages land in conversations seen and not yet seen
        # (bumping their activity), and a new conversation starts.
        for conversation_id in rng.sample(company.conversations, 8):
            await add_message(db, company.id, conversation_id, at=datetime.now(UTC))
        await add_conversation(db, company.id)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert seen == company.conversations


async def test_messages_of_a_conversation_page_newest_first(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection
):
    company = await new_company(db, conversations=1, messages=25)
    conversation_id = company.conversations[0]
    cookie = await login(client, api, company.agent)
    url = f"{api.url}/api/v1/conversations/{conversation_id}/messages"
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(url, params=params, headers=auth(cookie))).json()
        seen += [m["id"] for m in page["items"]]
        assert all(
            m["conversation_id"] == conversation_id and m["direction"] == "inbound" for m in page["items"]
        )
        await add_message(db, company.id, conversation_id, at=datetime.now(UTC))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == company.messages[conversation_id]


async def test_conversation_detail_and_status_filter(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection
):
    company = await new_company(db, conversations=6, messages=2)
    cookie = await login(client, api, company.agent)
    detail = (
        await client.get(f"{api.url}/api/v1/conversations/{company.conversations[0]}", headers=auth(cookie))
    ).json()
    assert detail["id"] == company.conversations[0]
    assert detail["contact"]["phone_number"].startswith("49")
    assert detail["unread_count"] == 2
    assert detail["last_message_preview"].startswith("hello at")
    pending = await client.get(
        f"{api.url}/api/v1/conversations", params={"status": "pending"}, headers=auth(cookie)
    )
    items = pending.json()["items"]
    assert len(items) == 2
    assert {c["status"] for c in items} == {"pending"}
    await db.execute("UPDATE conversations SET deleted_at = now() WHERE id = $1", items[0]["id"])
    counts = (await client.get(f"{api.url}/api/v1/conversations/counts", headers=auth(cookie))).json()
    assert counts == {"open": 2, "pending": 1, "closed": 2, "total": 5}
    gone = await client.get(f"{api.url}/api/v1/conversations/{items[0]['id']}", headers=auth(cookie))
    assert gone.status_code == 404


async def test_notifications_unread_and_mark_read(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection
):
    company = await new_company(db, conversations=3, messages=2)
    cookie = await login(client, api, company.agent)
    base = f"{api.url}/api/v1/notifications"
    first = (await client.get(base, params={"limit": 4}, headers=auth(cookie))).json()
    assert [n["id"] for n in first["items"]] == company.notifications[:4]
    assert not any(n["is_read"] for n in first["items"])
    rest = (await client.get(base, params={"cursor": first["next_cursor"]}, headers=auth(cookie))).json()
    assert [n["id"] for n in rest["items"]] == company.notifications[4:]

    unread = await client.get(f"{base}/unread-count", headers=auth(cookie))
    assert unread.json() == {"unread": 6}
    one = await client.post(f"{base}/{company.notifications[0]}/read", headers=auth(cookie))
    assert one.status_code == 200
    assert one.json()["is_read"] is True
    assert (await client.get(f"{base}/unread-count", headers=auth(cookie))).json() == {"unread": 5}
    # Marking it again changes nothing; an unknown id is a 404.
    assert (
        await client.post(f"{base}/{company.notifications[0]}/read", headers=auth(cookie))
    ).status_code == 200
    assert (await client.post(f"{base}/999999999/read", headers=auth(cookie))).status_code == 404
    everything = await client.post(f"{base}/read-all", headers=auth(cookie))
    assert everything.json() == {"updated": 5}
    assert (await client.get(f"{base}/unread-count", headers=auth(cookie))).json() == {"unread": 0}
    # A new one arrives: unread again.
    conversation_id = company.conversations[0]
    message_id = await add_message(db, company.id, conversation_id, at=datetime.now(UTC))
    await add_notification(db, company.agent, conversation_id, message_id, at=datetime.now(UTC))
    assert (await client.get(f"{base}/unread-count", headers=auth(cookie))).json() == {"unread": 1}
