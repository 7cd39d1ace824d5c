"""Sessions live in Postgres and the signing key in the data dir: restarts lose nothing."""

from __future__ import annotations

import time

import httpx

from tests.api.world import World, auth, login
from tests.support import CortexxProcess, ServiceUrls


async def test_the_same_cookie_works_across_ten_restarts(
    client: httpx.AsyncClient, services: ServiceUrls, world: World
):
    proc = CortexxProcess.api(services, broker_probe_interval_s=5)
    proc.start()
    try:
        cookie = await login(client, proc, world.x.agent)
        timings = []
        for restart in range(10):
            started = time.monotonic()
            assert proc.stop() == 0, proc.log_tail()
            proc.start()
            timings.append(time.monotonic() - started)
            response = await client.get(f"{proc.url}/api/v1/sessions/me", headers=auth(cookie))
            assert response.status_code == 200, f"restart {restart + 1}: {response.text}"
            assert response.json()["user"]["id"] == world.x.agent.id
            conversations = await client.get(f"{proc.url}/api/v1/conversations", headers=auth(cookie))
            assert conversations.status_code == 200
    finally:
        proc.stop()
