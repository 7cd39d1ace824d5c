"""A user of company X never reads company Y's rows: not by list, not by id, not by cursor."""

from __future__ import annotations

import base64

import httpx
import orjson
import pytest

from tests.api.world import World, auth, login
from tests.support import CortexxProcess

pytestmark = pytest.mark.usefixtures("api")


async def _all_ids(client: httpx.AsyncClient, url: str, cookie: str) -> list[int]:
    ids: list[int] = []
    cursor = None
    while True:
        params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = await client.get(url, params=params, headers=auth(cookie))
        assert page.status_code == 200, page.text
        ids += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return ids


async def test_lists_show_only_the_users_company(
    client: httpx.AsyncClient, api: CortexxProcess, world: World
):
    cookie = await login(client, api, world.x.agent)
    conversations = await _all_ids(client, f"{api.url}/api/v1/conversations", cookie)
    assert conversations == world.x.conversations
    for status in ("open", "pending", "closed"):
        some = await _all_ids(client, f"{api.url}/api/v1/conversations?status={status}", cookie)
        assert set(some) <= set(world.x.conversations)
    notifications = await _all_ids(client, f"{api.url}/api/v1/notifications", cookie)
    assert notifications == world.x.notifications
    counts = (await client.get(f"{api.url}/api/v1/conversations/counts", headers=auth(cookie))).json()
    assert counts == {"open": 2, "pending": 2, "closed": 2, "total": 6}
    unread = (await client.get(f"{api.url}/api/v1/notifications/unread-count", headers=auth(cookie))).json()
    assert unread == {"unread": len(world.x.notifications)}
    # A colleague has no notifications of their own: notifications are per user.
    colleague = await login(client, api, world.x.colleague)
    assert await _all_ids(client, f"{api.url}/api/v1/notifications", colleague) == []


async def test_another_companys_rows_are_404_by_id(
    client: httpx.AsyncClient, api: CortexxProcess, world: World
):
    cookie = await login(client, api, world.x.agent)
    theirs = world.y.conversations[0]
    for method, path, body in (
        ("GET", f"/api/v1/conversations/{theirs}", None),
        ("GET", f"/api/v1/conversations/{theirs}/messages", None),
        ("POST", f"/api/v1/conversations/{theirs}/messages", {"text": "hi"}),
        ("POST", f"/api/v1/notifications/{world.y.notifications[0]}/read", None),
    ):
        response = await client.request(method, f"{api.url}{path}", json=body, headers=auth(cookie))
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"] == "not_found"
    # Ours answer.
    mine = world.x.conversations[0]
    assert (
        await client.get(f"{api.url}/api/v1/conversations/{mine}", headers=auth(cookie))
    ).status_code == 200


async def test_a_cursor_from_another_company_or_list_is_refused(
    client: httpx.AsyncClient, api: CortexxProcess, world: World
):
    x = await login(client, api, world.x.agent)
    y = await login(client, api, world.y.agent)
    page = await client.get(f"{api.url}/api/v1/conversations", params={"limit": 2}, headers=auth(y))
    their_cursor = page.json()["next_cursor"]
    assert their_cursor
    # Y's genuine cursor, presented by X: refused, not used to show X anything of Y's.
    response = await client.get(
        f"{api.url}/api/v1/conversations", params={"cursor": their_cursor}, headers=auth(x)
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_cursor"
    # A cursor of one list is no good in another (status filter, messages, notifications).
    mine = await client.get(f"{api.url}/api/v1/conversations", params={"limit": 2}, headers=auth(x))
    my_cursor = mine.json()["next_cursor"]
    for path, params in (
        ("/api/v1/conversations", {"status": "open"}),
        (f"/api/v1/conversations/{world.x.conversations[0]}/messages", {}),
        ("/api/v1/notifications", {}),
    ):
        response = await client.get(
            f"{api.url}{path}", params={**params, "cursor": my_cursor}, headers=auth(x)
        )
        assert response.status_code == 400, path
        assert response.json()["error"] == "invalid_cursor"


async def test_a_crafted_cursor_is_refused(client: httpx.AsyncClient, api: CortexxProcess, world: World):
    cookie = await login(client, api, world.x.agent)
    page = await client.get(f"{api.url}/api/v1/conversations", params={"limit": 2}, headers=auth(cookie))
    body, _, signature = page.json()["next_cursor"].partition(".")
    payload = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    # Point the cursor at company Y, or at another position, keeping the old signature.
    crafted = []
    for change in ({"s": [world.y.id, None]}, {"i": 2**62}, {"t": 0}):
        doc = {**payload, **change}
        forged = base64.urlsafe_b64encode(orjson.dumps(doc)).rstrip(b"=").decode()
        crafted.append(f"{forged}.{signature}")
    crafted += [body, f"{body}.", "not-a-cursor", "a.b", "%%%.%%%", "x" * 600]
    for cursor in crafted:
        response = await client.get(
            f"{api.url}/api/v1/conversations", params={"cursor": cursor}, headers=auth(cookie)
        )
        assert response.status_code == 400, (cursor, response.text)
        assert response.json()["error"] in ("invalid_cursor", "invalid_request")
