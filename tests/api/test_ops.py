"""The operators' console over HTTP: operators only, CSRF on replays, every view also JSON."""

from __future__ import annotations

import asyncpg
import httpx

from harness.meta_samples import messenger_envelope, messenger_message
from tests.api.world import World, auth, login
from tests.desk import NOW, bsuid, card, envelope, text, wamid
from tests.support import CortexxProcess, post_signed, wait_until


async def _make_operator(db: asyncpg.Connection, world: World) -> None:
    await db.execute("UPDATE users SET role = 'operator' WHERE id = $1", world.x.agent.id)


async def test_agents_and_company_admins_get_403_and_strangers_401(
    client: httpx.AsyncClient, ops_api: CortexxProcess, db, world
):
    anonymous = await client.get(f"{ops_api.url}/api/v1/ops/overview")
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "not_authenticated"
    page = await client.get(f"{ops_api.url}/ops", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/ops/login")

    # A company's admin runs that company, not the deployment: the console shows every company.
    await db.execute("UPDATE users SET role = 'admin' WHERE id = $1", world.x.colleague.id)
    for user in (world.x.agent, world.x.colleague):
        cookie = await login(client, ops_api, user)
        for path in ("overview", "dead-letters", "tenants", "replays", "media-failures"):
            response = await client.get(f"{ops_api.url}/api/v1/ops/{path}", headers=auth(cookie))
            assert response.status_code == 403, path
            assert response.json()["error"] == "forbidden"
        html = await client.get(f"{ops_api.url}/ops", headers=auth(cookie))
        assert html.status_code == 403 and "operators only" in html.text
    replay = await client.post(
        f"{ops_api.url}/api/v1/ops/dead-letters/replay",
        json={"ids": [], "dry_run": False},
        headers=auth(cookie),
    )
    assert replay.status_code == 403


async def test_operator_sees_live_overview_and_every_json_view(
    client: httpx.AsyncClient, ops_api: CortexxProcess, db, world
):
    await _make_operator(db, world)
    cookie = await login(client, ops_api, world.x.agent)

    async def scraped():
        r = await client.get(f"{ops_api.url}/api/v1/ops/overview", headers=auth(cookie))
        assert r.status_code == 200, r.text
        body = r.json()
        procs = body["processes"]
        named = ("api", "ingest", "worker", "postgres", "broker", "media_store")
        up = all(procs[p]["status"] == "up" for p in named)
        # The broker's lag snapshot comes from its own probe, which may not have run yet.
        return body if up and len(body["series"]) >= 2 and body["lag"]["topics"] else None

    body = await wait_until(scraped, timeout_s=20, what="ingest and worker scraped up")
    assert set(body["lag"]["topics"]) == {"meta.webhooks", "wuzapi.outbound", "meta.media"}
    assert any(k.startswith("meta.webhooks:") for k in body["lag"]["partitions"])
    assert set(body["dead_letters"]) == {"meta.webhooks.dlq", "wuzapi.outbound.dlq", "meta.media.dlq"}

    tenants = (await client.get(f"{ops_api.url}/api/v1/ops/tenants", headers=auth(cookie))).json()
    mine = next(t for t in tenants["items"] if t["slug"] == world.x.tenant.slug)
    assert mine["messages_total"] == 18 and mine["last_webhook_at"] is not None
    assert mine["breaker_state"] in ("closed", "open", "half-open")
    assert "wuzapi_token" not in mine

    letters = await client.get(f"{ops_api.url}/api/v1/ops/dead-letters?tenant=nobody", headers=auth(cookie))
    assert letters.status_code == 200 and letters.json() == {"items": [], "total": 0}
    missing = await client.get(f"{ops_api.url}/api/v1/ops/dead-letters/nope:0:0", headers=auth(cookie))
    assert missing.status_code == 404

    for page in ("/ops", "/ops/dead-letters", "/ops/tenants", "/ops/charts/throughput.svg", "/ops/login"):
        response = await client.get(f"{ops_api.url}{page}", headers=auth(cookie))
        assert response.status_code == 200, page
        # Never framed (its replay buttons included), never sniffed, only its own scripts.
        assert response.headers["x-frame-options"] == "DENY", page
        assert response.headers["x-content-type-options"] == "nosniff", page
        assert response.headers["referrer-policy"] == "same-origin", page
        csp = response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, page
        assert "unsafe-inline" not in csp, page
    schema = (await client.get(f"{ops_api.url}/openapi.json")).json()
    for path in (
        "overview",
        "dead-letters",
        "dead-letters/{letter_id}",
        "dead-letters/replay",
        "tenants",
        "replays",
    ):
        assert f"/api/v1/ops/{path}" in schema["paths"], path


async def test_a_replay_that_sends_needs_the_csrf_token(
    client: httpx.AsyncClient, ops_api: CortexxProcess, db, world
):
    await _make_operator(db, world)
    cookie = await login(client, ops_api, world.x.agent)
    url = f"{ops_api.url}/api/v1/ops/dead-letters/replay"
    body = {"filter": {"tenant": "nobody"}, "dry_run": False}
    refused = await client.post(url, json=body, headers=auth(cookie))
    assert refused.status_code == 403 and refused.json()["error"] == "csrf_failed"
    forged = await client.post(url, json=body, headers={**auth(cookie), "X-CSRF-Token": "0" * 64})
    assert forged.status_code == 403
    # Not ASCII (header values arrive as latin-1 text): refused like any wrong token, never a 500.
    for odd in ("é" * 64, "\u00ff" * 3):
        strange = await client.post(
            url, json=body, headers={**auth(cookie), "X-CSRF-Token": odd.encode("latin-1")}
        )
        assert strange.status_code == 403, strange.text
        assert strange.json()["error"] == "csrf_failed"
    page = (await client.get(f"{ops_api.url}/ops/dead-letters", headers=auth(cookie))).text
    token = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    accepted = await client.post(url, json=body, headers={**auth(cookie), "X-CSRF-Token": token})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["matched"] == 0 and accepted.json()["dry_run"] is False
    # A dry run previews without the token.
    dry = await client.post(url, json={"filter": {"tenant": "nobody"}}, headers=auth(cookie))
    assert dry.status_code == 200 and dry.json()["dry_run"] is True


async def test_tenants_count_whatsapp_contacts_by_how_they_are_known(
    client: httpx.AsyncClient, ops_api: CortexxProcess, ingest: CortexxProcess, db, world
):
    """Webhooks through ingest and the worker: users by BSUID and phone, by BSUID and username
    alone, by phone alone (before BSUIDs), one named by a status's BSUID only, one on Messenger;
    each company's figures count its own WhatsApp contacts by what they are known by."""
    await _make_operator(db, world)
    cookie = await login(client, ops_api, world.x.agent)
    with_phone, ana, bea, status_only = bsuid(), bsuid(), bsuid(), bsuid()
    for doc in (
        envelope(
            contacts=[
                card(user_id=with_phone, phone="5511987650101", name="Pablo"),
                card(user_id=ana, phone=None, name="Ana", username="@ana"),
                card(user_id=bea, phone=None, name="Bea", username="@bea"),
                {"profile": {"name": "Gert"}, "wa_id": "4917600000102"},
            ],
            messages=[
                text(user_id=with_phone, phone="5511987650101", body="hi", at=NOW),
                text(user_id=ana, phone=None, body="hola", at=NOW + 1),
                text(user_id=bea, phone=None, body="oi", at=NOW + 2),
                text(user_id=None, phone="4917600000102", body="hallo", at=NOW + 3),
            ],
        ),
        # Ana writes again: still one contact, still without a phone.
        envelope(
            contacts=[card(user_id=ana, phone=None, name="Ana", username="@ana")],
            messages=[text(user_id=ana, phone=None, body="again", at=NOW + 4)],
        ),
        envelope(
            statuses=[
                {"id": wamid(), "status": "read", "timestamp": str(NOW + 5), "recipient_user_id": status_only}
            ]
        ),
        messenger_envelope(
            [
                messenger_message(
                    mid=f"m_{wamid()}", sender_id="24242424242424", recipient_id="1", timestamp_ms=NOW * 1000
                )
            ],
            page_id="1",
        ),
    ):
        response = await post_signed(client, ingest.url, world.x.tenant, doc)
        assert response.status_code == 200, response.text

    # The company's six seeded contacts have a phone; the status's user has neither phone nor
    # username (counted, in neither figure); the Messenger user is no WhatsApp contact.
    figures = {"total": 11, "with_phone": 8, "username_only": 2}

    async def counted():
        r = await client.get(f"{ops_api.url}/api/v1/ops/tenants", headers=auth(cookie))
        assert r.status_code == 200, r.text
        items = {t["slug"]: t for t in r.json()["items"]}
        mine = items[world.x.tenant.slug]["whatsapp_contacts"]
        return items if mine == figures else None

    items = await wait_until(counted, timeout_s=20, what="the company's WhatsApp contacts counted")
    assert items[world.y.tenant.slug]["whatsapp_contacts"] == {
        "total": 6,
        "with_phone": 6,
        "username_only": 0,
    }
    page = await client.get(f"{ops_api.url}/ops/tenants", headers=auth(cookie))
    assert page.status_code == 200
    row = page.text.split(f'data-slug="{world.x.tenant.slug}"', 1)[1].split("</tr>", 1)[0]
    assert 'data-whatsapp-contacts="11"' in row
    assert "<span data-with-phone>8</span> with phone" in row
    assert "<span data-username-only>2</span> username only" in row


async def test_operators_see_media_that_could_not_be_fetched_and_why(
    client: httpx.AsyncClient, ops_api: CortexxProcess, db, world
):
    await _make_operator(db, world)
    company = world.x.tenant.id
    for n, (state, reason) in enumerate(
        [
            ("failed", "media_not_found: 400 Unsupported get request"),
            ("pending", "retrying: graph_unavailable: 500"),
            ("stored", None),
            ("pending", None),
        ]
    ):
        await db.execute(
            "INSERT INTO media (company_id, message_external_id, direction, source, kind, state, reason,"
            " storage_key, size_bytes) VALUES ($1, $2, 'inbound', 'whatsapp', 'image', $3, $4, $5, 1000)",
            company,
            f"wamid.ops-media-{n}",
            state,
            reason,
            "k" if state == "stored" else None,
        )
    cookie = await login(client, ops_api, world.x.agent)
    listed = (await client.get(f"{ops_api.url}/api/v1/ops/media-failures", headers=auth(cookie))).json()
    mine = {m["message_external_id"]: m for m in listed["items"] if m["tenant"] == world.x.tenant.slug}
    assert set(mine) == {"wamid.ops-media-0", "wamid.ops-media-1"}  # the failed, and the retried
    assert mine["wamid.ops-media-0"]["reason"].startswith("media_not_found")

    tenants = (await client.get(f"{ops_api.url}/api/v1/ops/tenants", headers=auth(cookie))).json()
    media = next(t for t in tenants["items"] if t["slug"] == world.x.tenant.slug)["media"]
    assert media == {"stored": 1, "pending": 2, "failed": 1, "bytes": 1000}

    page = await client.get(f"{ops_api.url}/ops/media", headers=auth(cookie))
    assert page.status_code == 200
    assert "media_not_found: 400 Unsupported get request" in page.text
    assert "/ops/dead-letters?topic=meta.media" in page.text
