"""Slow clients on both HTTP edges: a connection that stalls in its request's headers or body is
closed within the bound (408 JSON when it had started a request), a keep-alive connection is not
held past its bounds either, and good clients are served quickly all the while."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from harness.meta_samples import sign, wa_change, wa_envelope, wa_message
from infra.postgres.tenants import Tenant
from tests.faults.report import record
from tests.support import CortexxProcess, ServiceUrls, metric, post_signed

HEADER_S, BODY_S, KEEP_ALIVE_S = 1.0, 2.0, 2
SLACK_S = 2.5  # 400 sockets closed at once on a shared 2-core machine
N_STALLED = 200  # per phase
N_IDLE = 20
FAST_S = 1.0  # what a good client's request may take meanwhile


@pytest.fixture(scope="module")
def slow_ingest(services: ServiceUrls) -> Iterator[CortexxProcess]:
    proc = CortexxProcess.ingest(
        services, http_header_timeout_s=HEADER_S, http_body_timeout_s=BODY_S, http_keep_alive_s=KEEP_ALIVE_S
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def slow_api(services: ServiceUrls) -> Iterator[CortexxProcess]:
    proc = CortexxProcess.api(
        services, http_header_timeout_s=HEADER_S, http_body_timeout_s=BODY_S, http_keep_alive_s=KEEP_ALIVE_S
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Stalled:
    kind: str
    # From its connect for a stall in the headers (the server's clock starts at accept), from its
    # last byte sent for one in the body; None: still open when the test gave up.
    closed_after_s: float | None
    answer: bytes


async def _stall(port: int, kind: str, payload: bytes, give_up_s: float) -> Stalled:
    """Connect, send `payload` (a request cut short) and wait for the server to close."""
    connecting = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if payload:
            writer.write(payload)
            await writer.drain()
        sent = time.monotonic() if kind == "body" else connecting
        try:
            async with asyncio.timeout(give_up_s):
                answer = await reader.read()  # to EOF: the server's close
        except TimeoutError:
            return Stalled(kind, None, b"")
        except ConnectionResetError:
            answer = b""
        return Stalled(kind, time.monotonic() - sent, answer)
    finally:
        writer.close()


def _answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, orjson.loads(body)


def _envelope() -> dict[str, object]:
    sender = "4915112345678"
    message = wa_message(
        "text", wamid=f"wamid.slow-{time.monotonic_ns()}", from_=sender, timestamp=1750000000
    )
    change = wa_change(
        phone_number_id="1065",
        display_phone_number="15550001",
        messages=[message],
        contacts=[(sender, "Ann")],
    )
    return wa_envelope([change], waba_id="1022")


async def _good_client(base_url: str, tenant: Tenant | None, n: int) -> list[float]:
    """`n` requests of a good client (GET /health, and signed webhooks if `tenant`), each timed."""
    took = []
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(n):
            started = time.perf_counter()
            if tenant is not None and i % 2:
                response = await post_signed(client, base_url, tenant, _envelope())
            else:
                response = await client.get(f"{base_url}/health")
            took.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return took


async def _slow_clients_are_cut_off(
    proc: CortexxProcess, process: str, body_request: bytes, tenant: Tenant | None
) -> dict[str, object]:
    assert proc.port is not None
    await _good_client(proc.url, tenant, 4)  # warm: the first produce opens the producer's connections
    async with httpx.AsyncClient(timeout=10) as client:
        before = (await client.get(f"{proc.url}/metrics")).text
    give_up_s = BODY_S + SLACK_S + 1.0
    partial_line = b"POST /webhooks/met"
    partial_headers = b"GET /health HTTP/1.1\r\nHost: cortexx\r\nX-Slow: "
    payloads = (
        [("idle", b"")] * N_IDLE
        + [("line", partial_line)] * (N_STALLED // 2)
        + [("headers", partial_headers)] * (N_STALLED - N_STALLED // 2)
        + [("body", body_request)] * N_STALLED
    )
    started = time.monotonic()
    stalls = [asyncio.create_task(_stall(proc.port, kind, p, give_up_s)) for kind, p in payloads]
    await asyncio.sleep(0.3)  # all connected and stalled
    during = await _good_client(proc.url, tenant, 10)
    results = await asyncio.gather(*stalls)
    all_closed_s = time.monotonic() - started
    after = await _good_client(proc.url, tenant, 10)
    async with httpx.AsyncClient(timeout=10) as client:
        now = (await client.get(f"{proc.url}/metrics")).text

    still_open = Counter(r.kind for r in results if r.closed_after_s is None)
    assert not still_open, f"connections the server never closed, by kind: {dict(still_open)}"
    for r in results:
        assert r.closed_after_s is not None
        bound = BODY_S if r.kind == "body" else HEADER_S
        # Not before its bound (the timeout closed it, nothing else), not long after it.
        assert bound - 0.2 <= r.closed_after_s <= bound + SLACK_S, (r.kind, r.closed_after_s)
        if r.kind == "idle":
            assert r.answer == b""  # nothing was asked: nothing is answered
        else:
            status, body = _answer(r.answer)
            assert status == 408, r
            assert body["error"] == "request_timeout", body
            assert isinstance(body["detail"], str)
    assert max(during) < FAST_S, during
    assert max(after) < FAST_S, after

    def timeouts(text: str, phase: str) -> float:
        return metric(text, "cortexx_http_client_timeouts_total", process=process, phase=phase)

    assert timeouts(now, "headers") - timeouts(before, "headers") == N_IDLE + N_STALLED
    assert timeouts(now, "body") - timeouts(before, "body") == N_STALLED
    log = proc.log_path.read_text()
    # One warning for the lot (then one per 10 s window), not one per connection.
    assert 1 <= log.count('"http.client_timeouts"') <= 2, log.count('"http.client_timeouts"')
    assert "Exception in ASGI application" not in log
    assert proc.proc is not None and proc.proc.poll() is None
    closed = [r.closed_after_s for r in results if r.closed_after_s is not None]
    return {
        "stalled_connections": len(results),
        "max_close_after_s": round(max(closed), 2),
        "all_closed_within_s": round(all_closed_s, 2),
        "good_max_ms_during": round(max(during) * 1000, 1),
        "good_max_ms_after": round(max(after) * 1000, 1),
    }


async def test_ingest_cuts_off_slow_clients_and_keeps_serving(slow_ingest: CortexxProcess, tenant: Tenant):
    body = orjson.dumps(_envelope())
    request = (
        f"POST /webhooks/meta/{tenant.slug} HTTP/1.1\r\nHost: cortexx\r\n"
        f"Content-Type: application/json\r\nX-Hub-Signature-256: {sign(body, tenant.app_secret)}\r\n"
        f"Content-Length: 1000\r\n\r\n"
    ).encode() + body[:10]
    figures = await _slow_clients_are_cut_off(slow_ingest, "ingest", request, tenant)
    record(f"ingest: {N_IDLE} idle, {N_STALLED} header- and {N_STALLED} body-stalled connections", **figures)


async def test_api_cuts_off_slow_clients_and_keeps_serving(slow_api: CortexxProcess):
    request = (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: cortexx\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
        b'{"email": '
    )
    figures = await _slow_clients_are_cut_off(slow_api, "api", request, None)
    record(
        f"read API: {N_IDLE} idle, {N_STALLED} header- and {N_STALLED} body-stalled connections", **figures
    )


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def _after_a_request(port: int, kind: str) -> Stalled:
    """One good request on a keep-alive connection, then: idle, a stalled next request, or stray
    CRLFs every half second (each of which cancels uvicorn's own keep-alive timer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: cortexx\r\n\r\n")
        assert await _read_response(reader) == 200
        answered = time.monotonic()
        await asyncio.sleep(0.5)
        if kind == "partial":
            writer.write(b"GET /hea")
        elif kind == "crlf":
            writer.write(b"\r\n")
        sent = time.monotonic()
        read = asyncio.ensure_future(reader.read())
        try:
            async with asyncio.timeout(KEEP_ALIVE_S + HEADER_S + SLACK_S + 1.0):
                while not read.done():
                    await asyncio.wait([read], timeout=0.5)
                    if kind == "crlf" and not read.done():
                        writer.write(b"\r\n")
        except TimeoutError:
            read.cancel()
            return Stalled(kind, None, b"")
        try:
            answer = read.result()
        except ConnectionResetError:
            answer = b""
        return Stalled(kind, time.monotonic() - (answered if kind != "partial" else sent), answer)
    finally:
        writer.close()


@pytest.mark.parametrize("edge", ["ingest", "api"])
async def test_keep_alive_connections_are_bounded(edge: str, request: pytest.FixtureRequest):
    proc: CortexxProcess = request.getfixturevalue(f"slow_{edge}")
    assert proc.port is not None
    kinds = ["idle", "partial", "crlf"] * 10
    results = await asyncio.gather(*(_after_a_request(proc.port, kind) for kind in kinds))
    still_open = Counter(r.kind for r in results if r.closed_after_s is None)
    assert not still_open, f"keep-alive connections never closed, by kind: {dict(still_open)}"
    for r in results:
        assert r.closed_after_s is not None
        if r.kind == "idle":  # uvicorn's keep-alive timeout, from the answer
            assert KEEP_ALIVE_S - 0.2 <= r.closed_after_s <= KEEP_ALIVE_S + SLACK_S, r
            assert r.answer == b""
        elif r.kind == "partial":  # the header timeout, from the request's first byte
            assert HEADER_S - 0.2 <= r.closed_after_s <= HEADER_S + SLACK_S, r
            assert _answer(r.answer)[0] == 408
        else:  # keep-alive then header timeout, from the answer, however many CRLFs come
            assert r.closed_after_s <= KEEP_ALIVE_S + HEADER_S + SLACK_S, r


async def test_a_slow_but_steady_client_within_the_bounds_is_served(
    slow_ingest: CortexxProcess, tenant: Tenant
):
    assert slow_ingest.port is not None
    body = orjson.dumps(_envelope())
    head = (
        f"POST /webhooks/meta/{tenant.slug} HTTP/1.1\r\nHost: cortexx\r\n"
        f"Content-Type: application/json\r\nX-Hub-Signature-256: {sign(body, tenant.app_secret)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", slow_ingest.port)
    try:
        # Headers over 0.6 s (of 1 s), the body over 1.2 s (of 2 s).
        for piece in (head[:20], head[20:60], head[60:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.2)
        step = len(body) // 4 + 1
        for i in range(0, len(body), step):
            await asyncio.sleep(0.3)
            writer.write(body[i : i + step])
            await writer.drain()
        async with asyncio.timeout(5):
            assert await _read_response(reader) == 200
    finally:
        writer.close()
