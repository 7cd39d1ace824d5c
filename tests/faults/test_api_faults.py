"""The read API under faults: WUZAPI misbehaving does not move its p99; its stdout closed, it
exits 0; and so does `cortexx up` with everything it started."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import asyncpg
import httpx
import psutil

from harness.embedded import free_port
from tests.api.world import auth, login, new_company
from tests.faults.report import record
from tests.support import CortexxProcess, ServiceUrls, Simulator, http_ok, wait_until


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def _poll(client: httpx.AsyncClient, url: str, cookie: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        response = await client.get(url, headers=auth(cookie))
        samples.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return samples


async def test_wuzapi_down_slow_erratic_does_not_move_the_api_p99(
    api: CortexxProcess, worker: CortexxProcess, wuzapi: Simulator, db: asyncpg.Connection
):
    company = await new_company(db, conversations=30)
    await db.execute(
        "UPDATE companies SET rate_limit_per_s = 500, rate_limit_burst = 500 WHERE id = $1", company.id
    )
    async with httpx.AsyncClient(timeout=10) as client:
        cookie = await login(client, api, company.agent)
        url = f"{api.url}/api/v1/conversations"
        await _poll(client, url, cookie, 20)  # warm up
        baseline = await _poll(client, url, cookie, 300)

        # Replies queue up while WUZAPI is down, then hangs, then answers slowly and erratically.
        for conversation in company.conversations[:20]:
            reply = await client.post(
                f"{url}/{conversation}/messages", json={"text": "On it"}, headers=auth(cookie)
            )
            assert reply.status_code == 202, reply.text
        during: list[float] = []
        for faults in (
            {"down": True},
            {"down": False, "hang": True},
            {"hang": False, "latency_ms": 800, "error_rate": 0.5, "error_status": 503},
        ):
            await wuzapi.faults(**faults)
            during += await _poll(client, url, cookie, 150)
        await wuzapi.faults(latency_ms=0, error_rate=0.0)
    base_p99, fault_p99 = _p99(baseline), _p99(during)
    record(
        "WUZAPI down, hanging, slow and erratic while the read API is polled",
        requests=len(baseline) + len(during),
        p99_ms_before=round(base_p99 * 1000, 2),
        p99_ms_during=round(fault_p99 * 1000, 2),
    )
    # On a shared 2-core machine "does not move" means: within noise, not within a microsecond.
    assert fault_p99 <= max(2 * base_p99, base_p99 + 0.025), (base_p99, fault_p99)


async def test_api_stdout_closed_exits_0(services: ServiceUrls, api: CortexxProcess):
    probe = CortexxProcess.api(services)
    proc = subprocess.Popen(  # noqa: ASYNC220 - one start; the test then waits on it in a thread
        [sys.executable, "-m", "cli.main", *probe.args],
        env=probe.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        await wait_until(lambda: http_ok(f"{probe.url}/health"), what="api up")
        proc.stdout.close()
        code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    record("api stdout closed", exit_code=code)


async def test_up_stdout_closed_stops_everything_cleanly(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
    env.update(
        CORTEXX_DATA_DIR=str(tmp_path / "data"),
        CORTEXX_INGEST_PORT=str(port),
        CORTEXX_API_PORT=str(free_port()),
        CORTEXX_WUZAPI_SIM_PORT=str(free_port()),
        CORTEXX_WORKER_METRICS_PORT=str(free_port()),
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - one start; the test then waits on it in a thread
        [sys.executable, "-m", "cli.main", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        await wait_until(
            lambda: http_ok(f"http://127.0.0.1:{port}/health"), timeout_s=60, what="the stack up"
        )
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.stdout.close()
        code = await asyncio.to_thread(proc.wait, 60)
        _, alive = psutil.wait_procs(children, timeout=10)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert code == 0
    assert not alive, alive
    record("cortexx up stdout closed", exit_code=code, processes_left=len(alive))


async def test_postgres_stalled_api_answers_503_within_one_deadline(
    services: ServiceUrls, db: asyncpg.Connection
):
    """Postgres paused (SIGSTOP) under the read API: a request, whether it waits for a connection
    or for a statement on one it holds, answers 503 within one `CORTEXX_API_DB_TIMEOUT_S`, not after
    the acquire's timeout and then the statement's (or the release's) one after the other."""
    assert services.postgres is not None, "needs the embedded Postgres"
    company = await new_company(db, conversations=3)
    api = CortexxProcess.api(services, api_db_timeout_s=1.5, db_pool_min=2, db_pool_max=2)
    api.start()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            cookie = await login(client, api, company.agent)
            url = f"{api.url}/api/v1/conversations"
            assert (await client.get(url, headers=auth(cookie))).status_code == 200
            services.postgres.pause()
            try:
                # Two hold the pool's connections on stalled statements; the next ones wait to acquire.
                started = time.monotonic()
                answers = await asyncio.gather(*(client.get(url, headers=auth(cookie)) for _ in range(4)))
                elapsed = time.monotonic() - started
            finally:
                services.postgres.resume()
            assert [a.status_code for a in answers] == [503] * 4, [a.text for a in answers]
            assert {a.json()["error"] for a in answers} == {"database_unavailable"}
            assert elapsed < 1.5 + 1.0, elapsed
            await wait_until(
                lambda: _status(client, url, cookie, 200), timeout_s=15, what="the API answering again"
            )
        record(
            "Postgres paused under the read API", db_timeout_s=1.5, answered_503_within_s=round(elapsed, 2)
        )
    finally:
        api.stop()


async def _status(client: httpx.AsyncClient, url: str, cookie: str, status: int) -> bool:
    return (await client.get(url, headers=auth(cookie))).status_code == status
