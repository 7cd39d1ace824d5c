"""Ingest under faults: SIGTERM under load, its stdout closed, the broker stopped. Every request
answered 200 is on the topic; nothing else is ever answered 200."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys

import orjson
import pytest

from infra.kafka.topics import META_WEBHOOKS
from infra.postgres.tenants import Tenant
from tests.faults.load import run_load
from tests.faults.report import record
from tests.support import CortexxProcess, ServiceUrls, http_ok, read_topic, started_broker, wait_until


async def _on_topic(bootstrap: str) -> set[str]:
    return {
        orjson.loads(r.value)["request_id"] for r in await read_topic(bootstrap, META_WEBHOOKS, timeout_s=30)
    }


async def test_sigterm_under_load_loses_no_acknowledged_webhook(services: ServiceUrls, tenant: Tenant):
    ingest = CortexxProcess.ingest(services, shutdown_grace_s=10)
    ingest.start()
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(ingest.url, tenant, concurrency=32, stop=stop))
    await asyncio.sleep(2.0)
    assert ingest.proc is not None
    ingest.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(ingest.proc.wait, 30)
    stop.set()
    result = await load
    assert code == 0, ingest.log_tail()
    assert result.codes[200] > 20
    assert set(result.codes) <= {200, 503, 0}, result.codes
    on_topic = await _on_topic(services.kafka_bootstrap)
    lost = set(result.accepted) - on_topic
    assert not lost
    assert '"http.drained"' in ingest.log_path.read_text()
    record(
        "ingest SIGTERM under load (32 connections)",
        sent=result.sent,
        acknowledged=result.codes[200],
        refused_503=result.codes[503],
        connection_refused=result.codes[0],
        stored=len(result.accepted) - len(lost),
        lost=len(lost),
        exit_code=code,
    )


async def test_stdout_closed_under_load_exits_0_and_loses_nothing(services: ServiceUrls, tenant: Tenant):
    ingest = CortexxProcess.ingest(services)
    port = ingest.port
    proc = subprocess.Popen(  # noqa: ASYNC220 - one start; the test then waits on it in a thread
        [sys.executable, "-m", "cli.main", *ingest.args],
        env=ingest.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        await wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), what="ingest up")
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(ingest.url, tenant, concurrency=16, stop=stop))
        await asyncio.sleep(1.0)
        proc.stdout.close()  # the reader goes away: the next log line meets EPIPE
        code = await asyncio.to_thread(proc.wait, 30)
        stop.set()
        result = await load
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert result.codes[200] > 10
    on_topic = await _on_topic(services.kafka_bootstrap)
    lost = set(result.accepted) - on_topic
    assert not lost
    record(
        "ingest stdout closed under load",
        sent=result.sent,
        acknowledged=result.codes[200],
        stored=len(result.accepted) - len(lost),
        lost=len(lost),
        exit_code=code,
    )


@pytest.mark.parametrize("outage", ["stopped", "paused", "killed"])
async def test_broker_down_answers_503_never_200_until_back(
    services: ServiceUrls, tenant: Tenant, tmp_path, outage: str
):
    """Stopped, paused (SIGSTOP) or killed (SIGKILL), the broker is down for 4 s: ingest answers
    503 and never 200 meanwhile, 200 again once it is back, and every record acknowledged
    before or after is on the topic, since the broker's log is on disk."""
    broker = await started_broker(tmp_path / "broker")
    ingest = CortexxProcess.ingest(services, bootstrap=broker.bootstrap, produce_timeout_s=1.0)
    ingest.start()
    try:
        before = await run_load(ingest.url, tenant, concurrency=4, total=40)
        assert before.codes == {200: 40}
        if outage == "stopped":
            broker.stop()
        elif outage == "killed":
            broker.kill()
        else:
            broker.pause()
        during = await run_load(ingest.url, tenant, concurrency=4, duration_s=4.0)
        assert during.codes[200] == 0 and during.codes[503] > 0, during.codes
        if outage == "paused":
            broker.resume()
        else:
            broker.start()

        async def back() -> bool:
            # Every partition led again: after a SIGKILL the broker recovers them one by one, and
            # the first 200 may come from one that is back while another still answers 503.
            return (await run_load(ingest.url, tenant, concurrency=4, total=8)).codes[200] == 8

        await wait_until(back, timeout_s=30, interval_s=0.5, what="ingest answering 200 again")
        after = await run_load(ingest.url, tenant, concurrency=4, total=40)
        assert after.codes == {200: 40}
        on_topic = await _on_topic(broker.bootstrap)
        acknowledged = set(before.accepted) | set(after.accepted)
        assert acknowledged <= on_topic, f"{len(acknowledged - on_topic)} acknowledged records lost"
        record(
            f"broker {outage} for 4 s",
            sent=before.sent + during.sent + after.sent,
            acknowledged=before.codes[200] + after.codes[200],
            refused_503_during=during.codes[503],
            acknowledged_during=during.codes[200],
            lost_of_acknowledged=len(acknowledged - on_topic),
        )
    finally:
        ingest.stop()
        broker.stop()


async def test_postgres_stalled_ingest_answers_in_time_and_keeps_known_companies(
    services: ServiceUrls, tenant: Tenant, db
):
    """Postgres paused (SIGSTOP): a company ingest has seen before is served from its last entry
    and its webhooks are accepted; a slug it has not seen gets 503 within the lookup bound, not
    after the stall; and Meta's verification GET the same. All as before once Postgres is back."""
    import secrets
    import time

    import httpx

    from infra.postgres.tenants import upsert_tenant
    from tests.faults.load import webhook
    from tests.support import post_signed

    assert services.postgres is not None, "needs the embedded Postgres"
    unseen, _ = await upsert_tenant(
        db, slug=f"t-{secrets.token_hex(6)}", app_secret="s" * 16, verify_token="v" * 8, name="Unseen"
    )
    ingest = CortexxProcess.ingest(
        services, tenant_cache_ttl_s=0.3, tenant_cache_negative_ttl_s=0.3, tenant_lookup_timeout_s=1.0
    )
    ingest.start()
    try:
        assert (await run_load(ingest.url, tenant, concurrency=1, total=3)).codes == {200: 3}
        await asyncio.sleep(0.5)  # its cache entry has expired
        services.postgres.pause()
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                started = time.monotonic()
                known = await run_load(ingest.url, tenant, concurrency=2, total=6)
                assert known.codes == {200: 6}, known.codes
                assert time.monotonic() - started < 8
                body, _ = webhook("4917000001", 1)
                for slug_tenant in (unseen, dataclasses.replace(unseen, slug="no-such-company")):
                    started = time.monotonic()
                    refused = await post_signed(client, ingest.url, slug_tenant, body)
                    assert refused.status_code == 503, refused.text
                    assert refused.json()["error"] == "database_unavailable"
                    assert time.monotonic() - started < 3
                started = time.monotonic()
                verify = await client.get(
                    f"{ingest.url}/webhooks/meta/{unseen.slug}",
                    params={"hub.mode": "subscribe", "hub.verify_token": "v" * 8, "hub.challenge": "42"},
                )
                assert verify.status_code == 503 and time.monotonic() - started < 3
        finally:
            services.postgres.resume()
        async with httpx.AsyncClient(timeout=30) as client:
            body, _ = webhook("4917000001", 2)
            back = await post_signed(client, ingest.url, unseen, body)
            assert back.status_code == 200, back.text
        record(
            "Postgres paused under ingest",
            known_company_accepted=known.codes[200],
            unseen_company="503 within 3 s",
        )
    finally:
        ingest.stop()
