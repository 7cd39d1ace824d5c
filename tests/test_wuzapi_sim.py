"""The WUZAPI simulator against WUZAPI's own contract (asternic/wuzapi handlers.go), over real HTTP:
its 401 for a token that is no user, hanging calls that end when the hang is cleared or the
simulator stops, and a ledger that counts what the gateway really delivered."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from harness.embedded import free_port
from harness.wuzapi_sim import WuzapiSimulator
from schemas.wuzapi import TOKEN_HEADER, text_request
from tests.support import CortexxProcess, ServiceUrls, Simulator, wait_until

TOKEN = "sim-test-token"
# What WUZAPI's authalice answers, byte for byte (Go's json.Encoder: keys sorted, a newline after).
UNAUTHORIZED_BODY = b'{"code":401,"error":"Unauthorized","success":false}\n'


def _sim_process(tmp: Path, *args: str, env: dict[str, str] | None = None) -> CortexxProcess:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
    base.update(CORTEXX_ENV="test", CORTEXX_DATA_DIR=str(tmp), CORTEXX_LOG_LEVEL="info", **(env or {}))
    return CortexxProcess(
        "wuzapi-sim",
        ["wuzapi-sim", "--port", str(port), *args],
        base,
        tmp / f"wuzapi-sim-{port}.log",
        port=port,
    )


@pytest.fixture(scope="module")
def sim_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CortexxProcess]:
    proc = _sim_process(tmp_path_factory.mktemp("wuzapi-sim"), "--token", TOKEN)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def sim(sim_proc: CortexxProcess) -> AsyncIterator[Simulator]:
    simulator = Simulator(sim_proc.url)
    await simulator.reset()
    yield simulator
    await simulator.reset()


async def _send(
    client: httpx.AsyncClient, url: str, phone: str, body: str, message_id: str, token: str = TOKEN
) -> httpx.Response:
    return await client.post(
        f"{url}/chat/send/text",
        content=orjson.dumps(text_request(phone, body, message_id)),
        headers={TOKEN_HEADER: token, "Content-Type": "application/json"},
    )


def _phone() -> str:
    return f"49157{uuid.uuid4().int % 10**8:08d}"


# Tokens -------------------------------------------------------------------------------------


async def test_a_wrong_or_missing_token_gets_the_gateways_401(sim: Simulator) -> None:
    body = orjson.dumps(text_request(_phone(), "hello", uuid.uuid4().hex))
    markread = orjson.dumps({"Id": ["X"], "ChatPhone": "4915700000000"})
    async with httpx.AsyncClient(timeout=5) as client:
        for method, path, content in [
            ("POST", "/chat/send/text", body),
            ("POST", "/chat/markread", markread),
            ("GET", "/session/status", None),
        ]:
            for headers, params in [
                ({}, {}),  # no token at all
                ({TOKEN_HEADER: "not-a-user"}, {}),
                ({TOKEN_HEADER: TOKEN.upper()}, {}),  # tokens are compared exactly
                ({}, {"token": "not-a-user"}),
            ]:
                response = await client.request(
                    method, f"{sim.url}{path}", content=content, headers=headers, params=params
                )
                assert response.status_code == 401, (path, headers, params)
                assert response.content == UNAUTHORIZED_BODY
                assert response.headers["content-type"] == "application/json"
        # The user's token, in the header or (as WUZAPI also reads it) in the query.
        ok = await client.post(f"{sim.url}/chat/send/text", content=body, headers={TOKEN_HEADER: TOKEN})
        assert ok.status_code == 200 and ok.json()["success"] is True
        by_query = await client.get(f"{sim.url}/session/status", params={"token": TOKEN})
        assert by_query.json() == {
            "code": 200,
            "data": {"Connected": True, "LoggedIn": True},
            "success": True,
        }
    ledger = await sim.ledger()
    assert len(ledger["deliveries"]) == 1  # nothing refused was delivered
    assert ledger["errors"] == 12


async def test_by_default_only_the_workers_token_is_a_user_and_any_token_is_asked_for(tmp_path: Path) -> None:
    # As tests/conftest.py starts it (no --token): the worker's CORTEXX_WUZAPI_TOKEN is the user.
    default = _sim_process(tmp_path, env={"CORTEXX_WUZAPI_TOKEN": "the-workers-token"})
    # As `cortexx up` starts it: its users in CORTEXX_WUZAPI_SIM_TOKENS.
    listed = _sim_process(tmp_path, env={"CORTEXX_WUZAPI_SIM_TOKENS": "first second"})
    anyone = _sim_process(tmp_path, "--any-token")
    procs = [default, listed, anyone]
    try:
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
        async with httpx.AsyncClient(timeout=5) as client:

            async def status(proc: CortexxProcess, token: str) -> int:
                response = await client.get(f"{proc.url}/session/status", headers={TOKEN_HEADER: token})
                return response.status_code

            assert await status(default, "the-workers-token") == 200
            assert await status(default, "cortexx-dev-token") == 401
            assert await status(listed, "first") == 200
            assert await status(listed, "second") == 200
            assert await status(listed, "third") == 401
            assert await status(anyone, "whatever") == 200
            assert await status(anyone, "") == 401
    finally:
        for proc in procs:
            proc.stop()


def test_any_token_and_a_token_exclude_each_other(tmp_path: Path) -> None:
    proc = _sim_process(tmp_path, "--any-token", "--token", TOKEN)
    with pytest.raises(RuntimeError, match="exited 2"):
        proc.start(timeout_s=20)


async def test_the_conftest_simulator_takes_the_workers_default_token(tmp_path: Path) -> None:
    proc = CortexxProcess.wuzapi_sim(ServiceUrls("", "", None, tmp_path))
    await asyncio.to_thread(proc.start)
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            good = await _send(client, proc.url, _phone(), "hi", uuid.uuid4().hex, token="cortexx-dev-token")
            bad = await _send(client, proc.url, _phone(), "hi", uuid.uuid4().hex, token="not-a-user")
        assert good.status_code == 200
        assert (bad.status_code, bad.content) == (401, UNAUTHORIZED_BODY)
    finally:
        proc.stop()


# Hang -----------------------------------------------------------------------------------------


async def _requests_seen(sim: Simulator, n: int) -> bool:
    return bool((await sim.ledger())["requests"] >= n)


async def test_a_cleared_hang_lets_the_held_calls_through_even_one_whose_caller_gave_up(
    sim: Simulator,
) -> None:
    await sim.faults(hang=True)
    waiting, gave_up = (_phone(), uuid.uuid4().hex), (_phone(), uuid.uuid4().hex)
    async with httpx.AsyncClient(timeout=30) as client, httpx.AsyncClient(timeout=0.5) as impatient:
        held = asyncio.create_task(_send(client, sim.url, waiting[0], "held", waiting[1]))
        with pytest.raises(httpx.TimeoutException):
            await _send(impatient, sim.url, gave_up[0], "given up", gave_up[1])
        await wait_until(lambda: _requests_seen(sim, 2), what="both calls in")
        await asyncio.sleep(0.3)
        assert not held.done(), "a hung call must not be answered"
        assert (await sim.ledger())["deliveries"] == {}
        cleared = time.monotonic()
        await sim.faults(hang=False)
        response = await asyncio.wait_for(held, timeout=2)
    assert time.monotonic() - cleared < 1.0
    assert response.status_code == 200 and response.json()["data"]["Id"] == waiting[1]
    deliveries = (await sim.ledger())["deliveries"]
    # WUZAPI sends with context.Background(): a call it began is delivered, caller there or not.
    await wait_until(lambda: _delivered(sim, gave_up[1]), timeout_s=2, what="the abandoned call delivered")
    assert deliveries[waiting[1]]["accepted"] == 1


async def _delivered(sim: Simulator, message_id: str) -> bool:
    return message_id in (await sim.ledger())["deliveries"]


async def test_a_reset_drops_the_held_calls_instead_of_delivering_them(sim: Simulator) -> None:
    await sim.faults(hang=True)
    async with httpx.AsyncClient(timeout=30) as client:
        held = asyncio.create_task(_send(client, sim.url, _phone(), "held", uuid.uuid4().hex))
        await wait_until(lambda: _requests_seen(sim, 1), what="the call in")
        await sim.reset()
        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(held, timeout=2)
    await asyncio.sleep(0.2)
    assert (await sim.ledger())["deliveries"] == {}


@pytest.mark.parametrize("clear_first", [True, False], ids=["cleared-then-sigterm", "sigterm-while-hung"])
async def test_sigterm_stops_a_simulator_that_caught_calls_hanging_within_2s(
    tmp_path: Path, clear_first: bool
) -> None:
    proc = _sim_process(tmp_path, "--token", TOKEN)
    await asyncio.to_thread(proc.start)
    try:
        sim = Simulator(proc.url)
        await sim.faults(hang=True)
        async with httpx.AsyncClient(timeout=30) as client:
            held = [
                asyncio.create_task(_send(client, proc.url, _phone(), "held", uuid.uuid4().hex))
                for _ in range(3)
            ]
            await wait_until(lambda: _requests_seen(sim, 3), what="three calls hanging")
            if clear_first:
                await sim.faults(hang=False)
                answers = await asyncio.wait_for(asyncio.gather(*held), timeout=2)
                assert [r.status_code for r in answers] == [200, 200, 200]
            assert proc.proc is not None
            sent = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(asyncio.to_thread(proc.proc.wait), timeout=5)
            took = time.monotonic() - sent
            if not clear_first:
                # Dropped, not answered: a gateway that went away mid-send.
                outcomes = await asyncio.gather(*held, return_exceptions=True)
                assert all(isinstance(o, httpx.TransportError) for o in outcomes), outcomes
        assert took < 2.0, f"stopped after {took:.2f}s\n{proc.log_tail()}"
        assert code == 0, proc.log_tail()
    finally:
        proc.stop(timeout_s=5)


async def test_a_runner_cleanup_ends_a_hung_call_at_once() -> None:
    simulator = WuzapiSimulator(tokens={TOKEN})
    await simulator.start("127.0.0.1", 0)
    simulator.faults.hang = True
    async with httpx.AsyncClient(timeout=30) as client:
        held = asyncio.create_task(_send(client, f"http://127.0.0.1:{simulator.port}", _phone(), "x", "ID1"))

        async def caught() -> bool:
            return simulator.requests >= 1

        await wait_until(caught, interval_s=0.02, what="the call in")
        assert simulator.runner is not None
        started = time.monotonic()
        await asyncio.wait_for(simulator.runner.cleanup(), timeout=5)
        assert time.monotonic() - started < 1.0
        with pytest.raises(httpx.TransportError):
            await held
    assert simulator.deliveries == {}


# The ledger ---------------------------------------------------------------------------------


async def test_the_same_reply_under_two_ids_is_two_deliveries_and_a_duplicate(sim: Simulator) -> None:
    phone, first, second, other = _phone(), uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    async with httpx.AsyncClient(timeout=5) as client:
        for message_id in (first, second):
            assert (await _send(client, sim.url, phone, "Your order shipped", message_id)).status_code == 200
        assert (await _send(client, sim.url, phone, "Something else", other)).status_code == 200
    ledger = await sim.ledger()
    assert {k: (v["accepted"], v["requests"]) for k, v in ledger["deliveries"].items()} == {
        first: (1, 1),
        second: (1, 1),
        other: (1, 1),
    }
    assert ledger["delivered"] == 3 and ledger["resends"] == 0
    by_content = {(c["phone"], c["body"]): c for c in ledger["contents"]}
    assert by_content[(phone, "Your order shipped")]["delivered"] == 2
    assert by_content[(phone, "Something else")]["delivered"] == 1
    [duplicate] = ledger["duplicates"]
    assert duplicate == {
        **duplicate,
        "kind": "content",
        "phone": phone,
        "body": "Your order shipped",
        "ids": [first, second],
        "delivered": 2,
    }


async def test_a_resend_of_the_same_id_is_one_delivery(sim: Simulator) -> None:
    phone, message_id = _phone(), uuid.uuid4().hex
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await _send(client, sim.url, phone, "Once", message_id)).status_code == 200
        # A retry after a lost answer; "+49..." is the same chat to WUZAPI's parseJID.
        again = await _send(client, sim.url, f"+{phone}", "Once", message_id)
        assert again.status_code == 200 and again.json()["data"]["Id"] == message_id
    ledger = await sim.ledger()
    delivery = ledger["deliveries"][message_id]
    assert (delivery["accepted"], delivery["requests"], delivery["phone"]) == (1, 2, phone)
    assert ledger["delivered"] == 1 and ledger["resends"] == 1
    assert ledger["duplicates"] == []
    assert [c["delivered"] for c in ledger["contents"]] == [1]


async def test_an_id_reused_for_another_chat_is_a_second_message(sim: Simulator) -> None:
    message_id, alice, bob = uuid.uuid4().hex, _phone(), _phone()
    async with httpx.AsyncClient(timeout=5) as client:
        await _send(client, sim.url, alice, "Hi", message_id)
        await _send(client, sim.url, bob, "Hi", message_id)
    ledger = await sim.ledger()
    assert ledger["deliveries"][message_id]["accepted"] == 2
    assert ledger["duplicates"] == [{"kind": "id", "id": message_id, "accepted": 2, "chats": [alice, bob]}]


async def test_refused_and_failed_sends_are_not_delivered(sim: Simulator) -> None:
    phone = _phone()
    await sim.faults(fail_phones={phone: 400}, session_lost=False)
    async with httpx.AsyncClient(timeout=5) as client:
        refused = await _send(client, sim.url, phone, "no", uuid.uuid4().hex)
        await sim.faults(fail_phones={}, session_lost=True)
        lost = await _send(client, sim.url, _phone(), "no", uuid.uuid4().hex)
    assert refused.status_code == 400
    assert lost.json() == {"code": 500, "error": "No session", "success": False}
    ledger = await sim.ledger()
    assert ledger["deliveries"] == {} and ledger["delivered"] == 0
