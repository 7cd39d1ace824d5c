"""The worker under faults: killed again and again, Postgres stopped mid-stream, stdout closed.
Afterwards every message is in Postgres exactly once and no auto-reply was sent twice."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from harness.embedded import EmbeddedBroker, EmbeddedPostgres
from infra.postgres.tenants import Tenant
from schemas.outbound import gateway_message_id
from tests.api.world import auth, login, new_company
from tests.faults.load import LoadResult, run_load
from tests.faults.report import record
from tests.support import (
    CortexxProcess,
    Delivered,
    ServiceUrls,
    Simulator,
    started_broker,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("wuzapi")


async def _stored(db: asyncpg.Connection, tenant: Tenant) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM messages WHERE company_id = $1 AND direction = 'inbound'", tenant.id
        )
    )


async def _check_exactly_once(db: asyncpg.Connection, tenant: Tenant, wamids: set[str]) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT external_id, count(*) AS n FROM messages WHERE company_id = $1 AND direction = 'inbound' "
        "GROUP BY external_id",
        tenant.id,
    )
    found = {r["external_id"]: r["n"] for r in rows}
    return {
        "lost": len(wamids - set(found)),
        "duplicated": sum(1 for n in found.values() if n > 1),
        "stored": len(set(found) & wamids),
    }


async def test_worker_killed_5_times_during_5000_webhooks(
    services: ServiceUrls, ingest: CortexxProcess, db: asyncpg.Connection, tenant: Tenant, wuzapi: Simulator
):
    await db.execute(
        "UPDATE companies SET welcome_message = 'Hello from Test Co', rate_limit_per_s = 1000, "
        "rate_limit_burst = 1000 WHERE id = $1",
        tenant.id,
    )
    await wuzapi.reset()  # a ledger of this test's sends only
    worker = CortexxProcess.worker(services, company_cache_ttl_s=0.5)
    worker.log_path = services.data_dir / "worker-kill9.log"
    worker.start()
    try:
        load = asyncio.create_task(
            run_load(ingest.url, tenant, concurrency=16, total=5000, contacts=200, retries=5)
        )
        kills = 0
        while kills < 5:
            await asyncio.sleep(1.5)
            worker.kill()
            kills += 1
            worker.start()
        result = await load
        assert result.codes == {200: 5000}, result.codes
        wamids = set(result.accepted.values())
        await wait_until(
            lambda: _all_stored(db, tenant, 5000), timeout_s=180, interval_s=1, what="5000 stored"
        )
        figures = await _check_exactly_once(db, tenant, wamids)
        assert figures == {"lost": 0, "duplicated": 0, "stored": 5000}

        # One welcome per conversation (200 contacts): one auto_replies row each.
        welcomes = {
            r["phone_number"]: r["outbound_id"]
            for r in await db.fetch(
                "SELECT c.phone_number, ar.outbound_id FROM auto_replies ar"
                " JOIN conversations cv ON cv.id = ar.conversation_id"
                " JOIN contacts c ON c.id = cv.contact_id"
                " WHERE ar.company_id = $1 AND ar.kind = 'welcome'",
                tenant.id,
            )
        }
        assert len(welcomes) == 200

        async def welcomed() -> Delivered | None:
            delivered = await wuzapi.delivered_to(welcomes)
            return delivered if delivered.total >= 200 else None

        await wait_until(welcomed, timeout_s=60, what="200 welcomes")
        await asyncio.sleep(1)
        # Each delivered once, under its row's id: a kill between a send and its "sent" row
        # resends the same id (the same WhatsApp message, counted once), never a second welcome
        # under a new id, and nothing else reached the 200 contacts.
        delivered = await wuzapi.delivered_to(welcomes)
        delivered.assert_once(
            {
                (phone, "Hello from Test Co"): gateway_message_id(tenant.id, outbound_id)
                for phone, outbound_id in welcomes.items()
            }
        )
        record(
            "worker kill -9 five times during 5,000 webhooks",
            sent=result.sent,
            acknowledged=result.codes[200],
            stored=figures["stored"],
            duplicated=figures["duplicated"],
            lost=figures["lost"],
            auto_replies_sent=delivered.total,
            auto_replies_twice=len(delivered.duplicates),
            auto_reply_resends_of_same_id=sum(d["requests"] - 1 for d in delivered.deliveries.values()),
        )
    finally:
        worker.stop()


async def _api_back(api: CortexxProcess, cookie: str) -> bool:
    return (await _api_statuses(api, cookie))[:2] == (200, 200)


async def _all_stored(db, tenant, n):
    return await _stored(db, tenant) >= n


async def _api_statuses(api: CortexxProcess, cookie: str) -> tuple[int, int, str]:
    async with httpx.AsyncClient(timeout=5) as client:
        ready = await client.get(f"{api.url}/ready")
        listed = await client.get(f"{api.url}/api/v1/conversations", headers=auth(cookie))
    return ready.status_code, listed.status_code, ready.text


async def test_postgres_stopped_10s_mid_stream_worker_resumes_by_itself(
    services: ServiceUrls,
    ingest: CortexxProcess,
    worker: CortexxProcess,
    api: CortexxProcess,
    db,
    tenant: Tenant,
):
    if services.postgres is None:
        pytest.skip("Postgres is given by URL; only the embedded one can be stopped here")
    company = await new_company(db)
    async with httpx.AsyncClient(timeout=10) as client:
        cookie = await login(client, api, company.agent)
    assert (await _api_statuses(api, cookie))[:2] == (200, 200)
    first = await run_load(ingest.url, tenant, concurrency=8, total=300)
    await wait_until(lambda: _all_stored(db, tenant, 300), what="first 300 stored")
    await db.close()
    services.postgres.stop()
    try:
        # Ingest keeps accepting webhooks for tenants it has cached; the worker waits for Postgres.
        load = asyncio.create_task(run_load(ingest.url, tenant, concurrency=8, duration_s=10.0))
        ready, listed, body = await _api_statuses(api, cookie)
        assert (ready, listed) == (503, 503), body
        assert "postgres" in body
        during = await load
    finally:
        services.postgres.start()
    await wait_until(lambda: _api_back(api, cookie), timeout_s=30, what="the API answering 200 again")
    from infra.postgres.db import connect

    conn = await connect(services.database_url)
    try:
        after = await run_load(ingest.url, tenant, concurrency=8, total=300)
        accepted = set(first.accepted.values()) | set(during.accepted.values()) | set(after.accepted.values())
        await wait_until(
            lambda: _all_stored(conn, tenant, len(accepted)),
            timeout_s=90,
            interval_s=1,
            what="every accepted webhook stored",
        )
        figures = await _check_exactly_once(conn, tenant, accepted)
        assert figures["lost"] == 0 and figures["duplicated"] == 0
        assert worker.proc is not None and worker.proc.poll() is None, "the worker must not have died"
        assert set(during.codes) <= {200, 503}, during.codes
        record(
            "Postgres stopped for 10 s mid-stream",
            sent=first.sent + during.sent + after.sent,
            acknowledged=len(accepted),
            acknowledged_during_outage=during.codes[200],
            refused_503_during_outage=during.codes[503],
            **figures,
        )
    finally:
        await conn.close()


async def test_worker_stdout_closed_exits_0_and_loses_nothing(
    services: ServiceUrls, ingest: CortexxProcess, worker: CortexxProcess, db, tenant: Tenant
):
    probe = CortexxProcess.worker(services)
    proc = subprocess.Popen(  # noqa: ASYNC220 - one start; the test then waits on it in a thread
        [sys.executable, "-m", "cli.main", "worker"],
        env=probe.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        load = asyncio.create_task(run_load(ingest.url, tenant, concurrency=8, duration_s=6.0))
        await asyncio.to_thread(proc.stdout.readline)
        await asyncio.sleep(2)
        proc.stdout.close()
        code = await asyncio.to_thread(proc.wait, 60)
        result = await load
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    # Whatever it had not committed, the session's worker (same group) now finishes.
    accepted = set(result.accepted.values())
    await wait_until(lambda: _all_stored(db, tenant, len(accepted)), timeout_s=90, what="all stored")
    figures = await _check_exactly_once(db, tenant, accepted)
    assert figures["lost"] == 0 and figures["duplicated"] == 0
    record(
        "worker stdout closed under load",
        sent=result.sent,
        acknowledged=result.codes[200],
        exit_code=code,
        **figures,
    )


def test_worker_stops_by_its_deadline_when_postgres_and_the_broker_are_gone(
    tmp_path: Path, services: ServiceUrls
) -> None:
    """A SIGTERM while both services are gone: Faust's graceful stop waits on them, forever if
    let; the stop deadline ends the process anyway, so no operator needs kill -9."""
    from infra.kafka.topics import declare_topics
    from infra.postgres.migrate import migrate

    postgres = EmbeddedPostgres(tmp_path / "postgres", fsync=False)
    broker = EmbeddedBroker(tmp_path / "broker")
    postgres.start()
    broker.start()
    try:
        asyncio.run(migrate(postgres.url))
        asyncio.run(declare_topics(broker.bootstrap, partitions=4, replication=1))
        own = ServiceUrls(
            database_url=postgres.url,
            kafka_bootstrap=broker.bootstrap,
            broker=broker,
            data_dir=tmp_path,
            wuzapi_url=services.wuzapi_url,
        )
        worker = CortexxProcess.worker(own, stop_deadline_s=5)
        worker.start()
        postgres.stop()
        broker.stop()
        time.sleep(1)
        assert worker.proc is not None
        started = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        try:
            code = worker.proc.wait(30)
        finally:
            worker.stop()
        took = time.monotonic() - started
    finally:
        broker.stop()
        postgres.stop()
    # Either its graceful stop managed (0) or the deadline ended it (124); never a hang.
    assert code in (0, 124), worker.log_tail()
    assert took < 5 + 10, took
    record("worker SIGTERM with Postgres and the broker gone", exit_code=code, seconds_to_exit=round(took, 1))


async def test_broker_killed_under_load_loses_no_acknowledged_webhook(
    tmp_path: Path, services: ServiceUrls, db: asyncpg.Connection, tenant: Tenant
) -> None:
    """The broker is killed with SIGKILL while webhooks are being posted and the worker stores
    them, and restarted 4 s later on its own log. Every POST answered 200 ends up in Postgres
    exactly once; every POST made while the broker was down was answered 503; ingest and the
    worker reconnect by themselves."""
    broker = await started_broker(tmp_path / "broker")
    own = dataclasses.replace(services, kafka_bootstrap=broker.bootstrap, broker=broker, data_dir=tmp_path)
    ingest = CortexxProcess.ingest(own, produce_timeout_s=1.0)
    worker = CortexxProcess.worker(own, worker_app_id=f"kill-{tenant.slug}")
    ingest.start()
    worker.start()
    try:
        stop = asyncio.Event()
        progress = LoadResult()
        load = asyncio.create_task(
            run_load(ingest.url, tenant, concurrency=8, stop=stop, contacts=100, into=progress)
        )
        await asyncio.sleep(3)
        broker.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(4)
        restarting_at = time.monotonic()
        await asyncio.to_thread(broker.start)
        back_at = time.monotonic()

        async def acknowledged_again() -> bool:
            return any(code == 200 and sent > back_at for sent, _, code in progress.answers)

        await wait_until(acknowledged_again, timeout_s=30, interval_s=0.2, what="200s after the restart")
        await asyncio.sleep(3)
        stop.set()
        result = await load
        assert set(result.codes) <= {200, 503}, result.codes
        during = result.within(killed_at, restarting_at)
        assert during[200] == 0 and during[503] > 0, during
        assert result.within(0, killed_at)[200] > 0
        assert any(code == 200 and sent > back_at for sent, _, code in result.answers)

        wamids = set(result.accepted.values())
        started = time.monotonic()
        await wait_until(
            lambda: _has_all(db, tenant, wamids), timeout_s=120, interval_s=0.5, what="every 200 stored"
        )
        took = time.monotonic() - started
        figures = await _check_exactly_once(db, tenant, wamids)
        assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
        assert ingest.proc is not None and ingest.proc.poll() is None, ingest.log_tail()
        record(
            "broker killed (SIGKILL) under load, restarted 4 s later",
            sent=result.sent,
            acknowledged=result.codes[200],
            answered_503=result.codes[503],
            during_outage=dict(during),
            broker_restart_s=round(back_at - restarting_at, 1),
            seconds_to_store_the_rest=round(took, 1),
            **figures,
        )
    finally:
        worker.stop()
        ingest.stop()
        broker.stop()


async def _has_all(db: asyncpg.Connection, tenant: Tenant, wamids: set[str]) -> bool:
    found = await db.fetchval(
        "SELECT count(*) FROM messages WHERE company_id = $1 AND external_id = ANY($2::text[])",
        tenant.id,
        list(wamids),
    )
    return int(found) == len(wamids)
