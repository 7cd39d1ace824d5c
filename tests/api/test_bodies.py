"""The read routes write their JSON from the rows (api/responses.py), not through pydantic: their
bodies must be the bytes their models would write, and they must still roll the session."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from pydantic import BaseModel

from api.models import ConversationOut, ConversationPage, MessagePage, NotificationPage, StatusCounts
from api.sessions import stored_sid
from tests.api.world import add_conversation, add_message, auth, login, new_company, session_cookie
from tests.support import CortexxProcess

pytestmark = pytest.mark.usefixtures("api")


def assert_model_bytes(response: httpx.Response, model: type[BaseModel]) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.content == model.model_validate_json(response.content).model_dump_json().encode()


async def test_bodies_are_the_bytes_the_models_write(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection
):
    company = await new_company(db, conversations=3, messages=2)
    company_id = company.agent.company_id
    # The awkward values: a contact without a name, a conversation without messages, whole
    # seconds (no microseconds), non-ASCII and control characters, and a JSON error.
    bare = await add_conversation(db, company_id, at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    await db.execute(
        "UPDATE contacts SET name = NULL WHERE id = (SELECT contact_id FROM conversations WHERE id = $1)",
        bare,
    )
    busy = company.conversations[0]
    message_id = await add_message(db, company_id, busy, at=datetime.now(UTC).replace(microsecond=0))
    await db.execute(
        "UPDATE messages SET body = $2, status = 'failed', status_at = now(), error = $3 WHERE id = $1",
        message_id,
        'ol\u00e1 \U0001f600 "quoted" \\ </script>\n\t\x01',
        {"code": 131026, "title": "Message undeliverable", "ratio": 0.25, "big": 10**17, "list": [1, None]},
    )
    cookie = await login(client, api, company.agent)
    base = f"{api.url}/api/v1"
    pages = [await client.get(f"{base}/conversations", headers=auth(cookie), params={"limit": 2})]
    while cursor := pages[-1].json()["next_cursor"]:
        pages.append(
            await client.get(f"{base}/conversations", headers=auth(cookie), params={"cursor": cursor})
        )
    for page in pages:
        assert_model_bytes(page, ConversationPage)
    listed = [c for page in pages for c in page.json()["items"]]
    assert [c["id"] for c in listed] == [*company.conversations, bare]
    assert listed[-1]["contact"]["name"] is None and listed[-1]["last_message_at"] is None
    assert listed[-1]["created_at"] == "2026-01-02T03:04:05Z"

    filtered = await client.get(f"{base}/conversations", headers=auth(cookie), params={"status": "pending"})
    assert_model_bytes(filtered, ConversationPage)
    assert_model_bytes(await client.get(f"{base}/conversations/counts", headers=auth(cookie)), StatusCounts)
    assert_model_bytes(
        await client.get(f"{base}/conversations/{bare}", headers=auth(cookie)), ConversationOut
    )

    messages = await client.get(f"{base}/conversations/{busy}/messages", headers=auth(cookie))
    assert_model_bytes(messages, MessagePage)
    assert messages.json()["items"][0]["error"]["big"] == 10**17
    empty = await client.get(f"{base}/conversations/{bare}/messages", headers=auth(cookie))
    assert_model_bytes(empty, MessagePage)
    assert empty.json() == {"items": [], "next_cursor": None}
    assert_model_bytes(await client.get(f"{base}/notifications", headers=auth(cookie)), NotificationPage)


async def test_messages_of_a_deleted_or_missing_conversation_are_404(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection
):
    company = await new_company(db, conversations=2, messages=2)
    deleted, kept = company.conversations
    await db.execute("UPDATE conversations SET deleted_at = now() WHERE id = $1", deleted)
    cookie = await login(client, api, company.agent)
    base = f"{api.url}/api/v1/conversations"
    first = await client.get(f"{base}/{kept}/messages", headers=auth(cookie), params={"limit": 1})
    cursor = first.json()["next_cursor"]
    for conversation_id in (deleted, 2**62):
        for params in ({}, {"cursor": "bogus"}, {"cursor": cursor}):
            response = await client.get(
                f"{base}/{conversation_id}/messages", headers=auth(cookie), params=params
            )
            assert response.status_code == 404
            assert response.json() == {"error": "not_found", "detail": "no such conversation"}


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/conversations",
        "/api/v1/conversations/counts",
        "/api/v1/conversations/{id}",
        "/api/v1/conversations/{id}/messages",
        "/api/v1/notifications",
    ],
)
async def test_read_routes_roll_the_session(
    client: httpx.AsyncClient, api: CortexxProcess, db: asyncpg.Connection, path: str
):
    company = await new_company(db, conversations=1, messages=1)
    cookie = await login(client, api, company.agent)
    sid = stored_sid(cookie.split(".")[0])
    url = api.url + path.format(id=company.conversations[0])
    # Not due for renewal: no write, no cookie.
    response = await client.get(url, headers=auth(cookie))
    assert response.status_code == 200 and "set-cookie" not in response.headers
    # Due: the row and the browser's cookie are renewed together.
    await db.execute("UPDATE user_sessions SET expire = now() + interval '10 minutes' WHERE sid = $1", sid)
    response = await client.get(url, headers=auth(cookie))
    assert response.status_code == 200
    assert session_cookie(response) == cookie
    expire = await db.fetchval("SELECT expire - now() FROM user_sessions WHERE sid = $1", sid)
    assert expire > timedelta(hours=1)


async def test_a_body_over_the_limit_is_413_before_it_is_read(client: httpx.AsyncClient, api: CortexxProcess):
    """A login or reply body is small; a large one is refused with 413 and the error body, whether
    its Content-Length says so or it comes in chunks with none, and the API keeps serving."""
    url = f"{api.url}/api/v1/sessions"
    big = b'{"email": "' + b"a" * (2 * 1024 * 1024) + b'", "password": "x"}'
    declared = await client.post(url, content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"] == "body_too_large"
    assert declared.headers["x-request-id"]

    async def chunks():
        for _ in range(64):
            yield b"a" * 65536

    streamed = await client.post(url, content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413, streamed.text
    assert streamed.json()["error"] == "body_too_large"
    # A body under the limit still gets its ordinary answer.
    small = await client.post(url, json={"email": "nobody@example.com", "password": "wrong"})
    assert small.status_code == 401
