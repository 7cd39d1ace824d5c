"""The Graph API simulator speaks Meta's media contract (harness/graph_sim.py), in process over
real HTTP: the lookup's answer, the bearer token on both calls, expiring URLs, the error bodies,
CDN attachment URLs, each fault switch and the ledger."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest

from harness.graph_sim import GraphSimulator, auto_sha256_b64, media_digest

TOKEN = "good-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def sim() -> AsyncIterator[GraphSimulator]:
    sim = GraphSimulator(tokens=[TOKEN], expired_tokens=["old-token"], auto=True, url_ttl_s=1.0, seed=1)
    await sim.start("127.0.0.1", 0)
    try:
        yield sim
    finally:
        await sim.stop()


async def test_a_lookup_gives_a_url_that_serves_bytes_of_the_given_hash(sim: GraphSimulator) -> None:
    media = sim.register(mime_type="audio/ogg", size=200_000)
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        found = (await client.get(f"/v23.0/{media.id}", headers=AUTH)).json()
        assert set(found) == {"messaging_product", "url", "mime_type", "sha256", "file_size", "id"}
        assert (found["mime_type"], found["file_size"], found["id"]) == ("audio/ogg", 200_000, media.id)
        body = (await client.get(found["url"], headers=AUTH)).content
    assert hashlib.sha256(body).hexdigest() == found["sha256"] == media.sha256
    assert media.view(sim.base_url)["sha256_b64"] == base64.b64encode(bytes.fromhex(media.sha256)).decode()
    assert sim.ledger_view()["media"][media.id]["downloads"] == 1


async def test_tokens_are_checked_on_the_lookup_and_the_download(sim: GraphSimulator) -> None:
    media = sim.register(size=1000)
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        bad = await client.get(f"/v23.0/{media.id}", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == 190
        expired = await client.get(f"/v23.0/{media.id}", headers={"Authorization": "Bearer old-token"})
        assert expired.json()["error"]["error_subcode"] == 463
        url = (await client.get(f"/v23.0/{media.id}?access_token={TOKEN}")).json()["url"]
        assert (await client.get(url)).status_code == 401


async def test_unknown_media_is_meta_s_code_100_and_urls_expire(sim: GraphSimulator) -> None:
    gone = sim.register(size=1000, gone=True)
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        answer = await client.get(f"/v23.0/{gone.id}", headers=AUTH)
        error = answer.json()["error"]
        assert answer.status_code == 400 and (error["code"], error["error_subcode"]) == (100, 33)
        assert error["type"] == "GraphMethodException" and error["fbtrace_id"]
        live = sim.register(size=1000)
        url = (await client.get(f"/v23.0/{live.id}", headers=AUTH)).json()["url"]
        assert (await client.get(url.replace("hash=", "hash=0"), headers=AUTH)).status_code == 404
        await asyncio.sleep(1.1)
        assert (await client.get(url, headers=AUTH)).status_code == 404


async def test_auto_files_match_the_hash_the_samples_put_in_webhooks(sim: GraphSimulator) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        found = (await client.get("/v23.0/1234567890", headers=AUTH)).json()
        body = (await client.get(found["url"], headers=AUTH)).content
    assert base64.b64encode(hashlib.sha256(body).digest()).decode() == auto_sha256_b64("1234567890")


async def test_cdn_urls_need_no_token_and_expire(sim: GraphSimulator) -> None:
    clip = sim.register(kind="cdn", size=5000).view(sim.base_url)
    async with httpx.AsyncClient() as client:
        assert hashlib.sha256((await client.get(clip["url"])).content).hexdigest() == clip["sha256"]
        expired = clip["url"].split("?")[0] + "?oe=5f5e1000"
        answer = await client.get(expired)
        assert answer.status_code == 403 and "expired" in answer.text


async def test_each_fault_switch_does_what_it_says(sim: GraphSimulator) -> None:
    media = sim.register(size=100_000)
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=5) as client:
        await client.put("/_sim/faults", json={"error_rate": 1.0, "error_status": 500})
        failed = await client.get(f"/v23.0/{media.id}", headers=AUTH)
        assert failed.status_code == 500 and failed.json()["error"]["code"] == 2
        await client.put("/_sim/faults", json={"down": True, "applies_to": "lookups"})
        with pytest.raises(httpx.TransportError):
            await client.get(f"/v23.0/{media.id}", headers=AUTH)
        await client.put("/_sim/faults", json={"wrong_hash": 1.0})
        url = (await client.get(f"/v23.0/{media.id}", headers=AUTH)).json()["url"]
        assert hashlib.sha256((await client.get(url, headers=AUTH)).content).hexdigest() != media.sha256
        await client.put("/_sim/faults", json={"expired_urls": True})
        assert (await client.get(url, headers=AUTH)).status_code == 404
        await client.put("/_sim/faults", json={"hang": True})
        held = asyncio.create_task(client.get(f"/v23.0/{media.id}", headers=AUTH))
        await asyncio.sleep(0.3)
        assert not held.done()
        await client.put("/_sim/faults", json={})
        assert (await held).status_code == 200
        await client.put("/_sim/faults", json={"latency_ms": 300})
        started = asyncio.get_running_loop().time()
        await client.get(f"/v23.0/{media.id}", headers=AUTH)
        assert asyncio.get_running_loop().time() - started >= 0.3
        assert (await client.put("/_sim/faults", json={"nonsense": 1})).status_code == 400
    outcomes = sim.ledger_view()["media"][media.id]["outcomes"]
    assert outcomes["download_corrupted"] == 1 and outcomes["download_expired"] == 1


def test_content_is_the_same_for_the_same_id_and_differs_between_ids() -> None:
    assert media_digest("1", 70_000) == media_digest("1", 70_000)
    assert media_digest("1", 70_000) != media_digest("2", 70_000)
