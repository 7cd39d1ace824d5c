"""Ingest under faults: SIGTERM under load, its stdout closed, the broker stopped. Every request
answered 200 is on the topic; nothing else is ever answered 200."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import orjson
import pytest

from infra.tenants import Tenant
from infra.topics import META_WEBHOOKS
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
            return (await run_load(ingest.url, tenant, concurrency=1, total=1)).codes[200] == 1

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
