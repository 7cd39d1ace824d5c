"""An agent's reply: stored at once as pending, queued on wuzapi.outbound, answered 202."""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from infra.kafka.topics import WUZAPI_OUTBOUND
from schemas.outbound import OutboundMessage
from tests.api.world import World, auth, login
from tests.support import CortexxProcess, ServiceUrls, read_topic

pytestmark = pytest.mark.usefixtures("api")


async def _outbound(services: ServiceUrls, record_id: str) -> list[OutboundMessage]:
    records = [
        OutboundMessage.from_bytes(r.value)
        for r in await read_topic(services.kafka_bootstrap, WUZAPI_OUTBOUND)
    ]
    return [r for r in records if r.id == record_id]


async def test_reply_is_pending_at_once_and_queued(
    client: httpx.AsyncClient,
    api: CortexxProcess,
    services: ServiceUrls,
    world: World,
    db: asyncpg.Connection,
):
    cookie = await login(client, api, world.x.agent)
    conversation_id = world.x.conversations[0]
    url = f"{api.url}/api/v1/conversations/{conversation_id}/messages"
    response = await client.post(url, json={"text": "Hello from the agent"}, headers=auth(cookie))
    assert response.status_code == 202, response.text
    message = response.json()
    assert message["status"] == "pending"
    assert message["direction"] == "outbound"
    assert message["body"] == "Hello from the agent"
    assert len(message["external_id"]) == 32

    # In the conversation at once, newest first (the outbound worker may already have sent it
    # when the whole suite runs, so a later status is fine too).
    listed = (await client.get(url, headers=auth(cookie))).json()["items"][0]
    assert listed["id"] == message["id"]
    assert listed["status"] in ("pending", "sent", "delivered")
    detail = (
        await client.get(f"{api.url}/api/v1/conversations/{conversation_id}", headers=auth(cookie))
    ).json()
    assert detail["last_message_preview"] == "Hello from the agent"

    [record] = await _outbound(services, message["external_id"])
    phone = await db.fetchval(
        "SELECT ct.phone_number FROM conversations c JOIN contacts ct ON ct.id = c.contact_id "
        "WHERE c.id = $1",
        conversation_id,
    )
    assert record.to == phone
    assert record.kind == "text"
    assert record.origin == "agent"
    assert record.text == "Hello from the agent"
    assert record.tenant == world.x.tenant.slug
    assert record.company_id == world.x.id
    assert record.conversation_id == conversation_id
    assert record.user_id == world.x.agent.id


async def test_a_retry_with_the_same_id_makes_one_message(
    client: httpx.AsyncClient,
    api: CortexxProcess,
    services: ServiceUrls,
    world: World,
    db: asyncpg.Connection,
):
    cookie = await login(client, api, world.x.agent)
    conversation_id = world.x.conversations[1]
    url = f"{api.url}/api/v1/conversations/{conversation_id}/messages"
    reply_id = uuid.uuid4().hex
    first = await client.post(url, json={"text": "once", "id": reply_id}, headers=auth(cookie))
    again = await client.post(url, json={"text": "once", "id": reply_id}, headers=auth(cookie))
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE external_id = $1", reply_id) == 1
    # The same id for another text or conversation is a conflict, not a second message.
    other = await client.post(url, json={"text": "twice", "id": reply_id}, headers=auth(cookie))
    assert other.status_code == 409
    assert other.json()["error"] == "id_in_use"


@pytest.mark.parametrize(
    "body", [{}, {"text": ""}, {"text": "x" * 4097}, {"text": 5}, {"text": "a", "id": "nope"}]
)
async def test_bad_replies_are_422(client: httpx.AsyncClient, api: CortexxProcess, world: World, body):
    cookie = await login(client, api, world.x.agent)
    url = f"{api.url}/api/v1/conversations/{world.x.conversations[0]}/messages"
    response = await client.post(url, json=body, headers=auth(cookie))
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"


async def test_not_json_and_unknown_routes_are_json_errors(
    client: httpx.AsyncClient, api: CortexxProcess, world: World
):
    cookie = await login(client, api, world.x.agent)
    url = f"{api.url}/api/v1/conversations/{world.x.conversations[0]}/messages"
    response = await client.post(
        url, content=b"{not json", headers={**auth(cookie), "Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    missing = await client.get(f"{api.url}/api/v1/nothing-here", headers=auth(cookie))
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong_method = await client.put(f"{api.url}/api/v1/sessions/me", headers=auth(cookie))
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method_not_allowed"
    huge_id = await client.get(f"{api.url}/api/v1/conversations/{2**70}", headers=auth(cookie))
    assert huge_id.status_code == 422


async def test_replies_only_on_whatsapp(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    conversation_id = world.x.conversations[2]
    await db.execute("UPDATE conversations SET channel = 'messenger' WHERE id = $1", conversation_id)
    cookie = await login(client, api, world.x.agent)
    url = f"{api.url}/api/v1/conversations/{conversation_id}/messages"
    response = await client.post(url, json={"text": "hi"}, headers=auth(cookie))
    assert response.status_code == 409
    assert response.json()["error"] == "unsupported_channel"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1 AND direction = 'outbound'",
            conversation_id,
        )
        == 0
    )
