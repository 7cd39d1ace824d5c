"""The WUZAPI simulator against WUZAPI's own contract (asternic/wuzapi handlers.go), over real HTTP:
its 401 for a token that is no user, hanging calls that end when the hang is cleared or the
simulator stops, a ledger that counts what the gateway really delivered, the media endpoints
(their data URL prefixes, base64 and error texts; files streamed, hashed in the ledger) and
markread's Chat and Sender."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.embedded import free_port
from harness.wuzapi_sim import _STRUCTS, BadPayload, WuzapiSimulator, read_payload
from processors.wuzapi import (
    ImageUndecodable,
    Upload,
    WuzapiClient,
    WuzapiPermanent,
    WuzapiUnauthorized,
)
from schemas import wuzapi as contract
from schemas.outbound import OutboundMessage
from schemas.wuzapi import TOKEN_HEADER, text_request
from tests.support import CortexxProcess, ServiceUrls, Simulator, wait_until
from tests.unit.strategies import fast, json_values

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
    markread = orjson.dumps({"Id": ["X"], "Chat": "4915700000000@s.whatsapp.net"})
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


# Media ----------------------------------------------------------------------------------------

# Files as their formats begin: what the gateway's sniffing (and image.Decode's magic) sees.
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + random.Random(1).randbytes(5000)
PNG = b"\x89PNG\r\n\x1a\n" + random.Random(2).randbytes(4001)
GIF = b"GIF89a" + random.Random(3).randbytes(300)
OGG = b"OggS\x00\x02" + random.Random(4).randbytes(7002)
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + random.Random(5).randbytes(9000)
PDF = b"%PDF-1.7\n" + random.Random(6).randbytes(6000)
WEBP = b"RIFF\x00\x00\x00\x00WEBPVP8 " + random.Random(7).randbytes(100)


def _outbound(kind: str, mime: str | None, **fields: Any) -> OutboundMessage:
    return OutboundMessage(
        id=uuid.uuid4().hex,
        tenant="acme",
        company_id=7,
        conversation_id=3,
        to=fields.pop("to", None) or _phone(),
        kind=kind,  # type: ignore[arg-type]
        origin="agent",
        created_at_ms=1_717_000_000_000,
        mime_type=mime,
        media_key="7/file",
        **fields,
    )


def _file(data: bytes, size: int = 1000) -> Any:
    def read() -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            for at in range(0, len(data), size):
                yield data[at : at + size]

        return chunks()

    return read


@pytest.fixture
async def worker_client(sim: Simulator) -> AsyncIterator[WuzapiClient]:
    """The worker's own client, streaming to the simulator."""
    client = WuzapiClient(
        sim.url,
        connect_timeout_s=2,
        timeout_s=5,
        breaker_fail_max=1000,
        breaker_reset_s=1,
        media_timeout_s=30,
    )
    try:
        yield client
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("kind", "mime", "data", "fields", "sent_as", "told", "body"),
    [
        ("image", "image/jpeg", JPEG, {"caption": "menu"}, "image", "image/jpeg", "menu"),
        ("image", "image/png", PNG, {}, "image", "image/png", None),
        ("audio", "audio/ogg", OGG, {}, "audio", "audio/ogg; codecs=opus", None),
        ("video", "video/mp4", MP4, {"caption": "how to"}, "video", "video/mp4", "how to"),
        ("document", "application/pdf", PDF, {"filename": "t.pdf"}, "document", "application/pdf", "t.pdf"),
        ("image", "image/gif", GIF, {"filename": "party.gif"}, "document", "image/gif", "party.gif"),
    ],
    ids=["jpeg", "png", "voice-note", "mp4", "pdf", "gif-as-document"],
)
async def test_each_media_endpoint_takes_the_workers_streamed_file_and_the_ledger_has_its_bytes(
    sim: Simulator,
    worker_client: WuzapiClient,
    kind: str,
    mime: str,
    data: bytes,
    fields: dict[str, Any],
    sent_as: str,
    told: str,
    body: str | None,
) -> None:
    outbound = _outbound(kind, mime, **fields)
    await worker_client.send(TOKEN, outbound, _file(data, size=777))
    delivery = (await sim.ledger())["deliveries"][outbound.gateway_id]
    assert delivery == {
        **delivery,
        "kind": sent_as,
        "path": f"/chat/send/{sent_as}",
        "mime_type": told,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "body": body,
        "accepted": 1,
    }


async def test_a_file_past_a_mebibyte_is_read_as_a_stream_and_hashed_exactly(
    sim: Simulator, worker_client: WuzapiClient
) -> None:
    data = PDF + random.Random(8).randbytes(3 * 1024 * 1024 + 1)  # past aiohttp's 1 MiB read limit
    outbound = _outbound("document", "application/pdf", filename="big.pdf")
    await worker_client.send(TOKEN, outbound, _file(data, size=64 * 1024 + 1))
    delivery = (await sim.ledger())["deliveries"][outbound.gateway_id]
    assert (delivery["size"], delivery["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert delivery["declared_type"] == "application/octet-stream"


async def _post(sim: Simulator, path: str, body: bytes, token: str = TOKEN) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(
            f"{sim.url}{path}",
            content=body,
            headers={TOKEN_HEADER: token, "Content-Type": "application/json"},
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


IMAGE_REFUSED = 'Image data should start with "data:image/png;base64,"'
AUDIO_REFUSED = 'Audio data should start with "data:audio/ogg;base64,"'
DOCUMENT_REFUSED = 'Document data should start with "data:application/octet-stream;base64,"'
ANY_REFUSED = 'Data should start with "data:mime/type;base64,"'
UNDECODABLE = "Could not decode base64 encoded data from payload"


@pytest.mark.parametrize(
    ("path", "fields", "status", "error"),
    [
        # The handlers' prefix checks: WUZAPI downloads no URL.
        ("/chat/send/image", {"Image": "https://cdn.test/menu/today.jpg"}, 400, IMAGE_REFUSED),
        (
            "/chat/send/image",
            {"Image": "data:application/octet-stream;base64," + _b64(JPEG)},
            400,
            IMAGE_REFUSED,
        ),
        ("/chat/send/audio", {"Audio": "data:audio/mpeg;base64," + _b64(OGG)}, 400, AUDIO_REFUSED),
        (
            "/chat/send/document",
            {"Document": "data:application/pdf;base64," + _b64(PDF), "FileName": "t"},
            400,
            DOCUMENT_REFUSED,
        ),
        ("/chat/send/video", {"Video": "https://cdn.test/clip.mp4"}, 400, ANY_REFUSED),
        ("/chat/send/sticker", {"Sticker": "http://cdn.test/s.webp"}, 400, ANY_REFUSED),
        # dataurl.DecodeString: base64.StdEncoding, padded, its alphabet only.
        ("/chat/send/image", {"Image": "data:image/png;base64,iVBORw0KGgo=="}, 400, UNDECODABLE),
        (
            "/chat/send/image",
            {"Image": "data:image/png;base64," + _b64(PNG).rstrip("=")[:-1]},
            400,
            UNDECODABLE,
        ),
        (
            "/chat/send/document",
            {"Document": "data:application/octet-stream;base64,a b=", "FileName": "t"},
            400,
            UNDECODABLE,
        ),
        ("/chat/send/video", {"Video": "data:video/mp4;base64,QQ==QQ=="}, 400, UNDECODABLE),
        ("/chat/send/video", {"Video": "data:nothing/mp4;base64,QQ=="}, 400, UNDECODABLE),
        ("/chat/send/video", {"Video": "database"}, 400, UNDECODABLE),
        # The fields each handler requires, in its order.
        ("/chat/send/image", {"Phone": ""}, 400, "Missing Phone in Payload"),
        ("/chat/send/image", {"Image": ""}, 400, "Missing Image in Payload"),
        ("/chat/send/audio", {"Audio": None}, 400, "Missing Audio in Payload"),
        (
            "/chat/send/document",
            {"Document": "data:application/octet-stream;base64,QQ=="},
            400,
            "Missing FileName in Payload",
        ),
        ("/chat/send/image", {"Image": 5}, 400, "Could not decode Payload"),
        ("/chat/send/image", {"Phone": "@s.whatsapp.net"}, 400, "Could not parse Phone"),
        # Decodable, but not by Go's image.Decode (JPEG and PNG only): after the upload, a 500.
        (
            "/chat/send/image",
            {"Image": "data:image/gif;base64," + _b64(GIF)},
            500,
            "Could not decode image for thumbnail preparation: image: unknown format",
        ),
    ],
)
async def test_a_media_send_the_gateway_refuses_gets_its_error_and_delivers_nothing(
    sim: Simulator, path: str, fields: dict[str, Any], status: int, error: str
) -> None:
    field = contract.MEDIA_ENDPOINTS[path].field
    payload = {
        "Phone": _phone(),
        "Id": uuid.uuid4().hex,
        field: "data:image/png;base64," + _b64(PNG),
        **fields,
    }
    if path == "/chat/send/document" and "FileName" not in fields and "Document" not in fields:
        payload["FileName"] = "t.pdf"
    answer = await _post(sim, path, orjson.dumps(payload))
    assert (answer.status_code, answer.json()) == (status, contract.error_envelope(status, error))
    assert (await sim.ledger())["deliveries"] == {}


async def test_the_worker_takes_those_refusals_as_permanent_never_retried(
    sim: Simulator, worker_client: WuzapiClient
) -> None:
    # The worker never sends these: it routes a GIF as a document. Forced here through the call.
    gif = contract.media_request(
        contract.MediaRoute(contract.MEDIA_BY_KIND["image"], "data:image/gif;base64,"), _phone(), "ID1"
    )
    # The file's fault, not the gateway's: no retry as an image (`send` resends it as a document).
    with pytest.raises(ImageUndecodable, match="thumbnail"):
        await worker_client.call(TOKEN, "/chat/send/image", gif, Upload("Image", _file(GIF)))
    url = contract.image_request(_phone(), "https://cdn.test/menu/today.jpg", None, "ID2")
    with pytest.raises(WuzapiPermanent, match="should start with"):
        await worker_client.call(TOKEN, "/chat/send/image", url)


async def test_a_value_shorter_than_the_handlers_prefix_drops_the_connection(sim: Simulator) -> None:
    # `t.Document[0:29]` on a shorter string panics the Go handler: net/http closes the connection.
    body = orjson.dumps({"Phone": _phone(), "Document": "https://x.io/a", "FileName": "a.pdf"})
    with pytest.raises(httpx.TransportError):
        await _post(sim, "/chat/send/document", body)
    assert (await sim.ledger())["deliveries"] == {}


async def test_the_gateways_json_decoding_is_gos(sim: Simulator) -> None:
    data = _b64(JPEG)
    phone = _phone()
    # Keys match case-insensitively, unknown keys are ignored, escapes are decoded, what follows
    # the object is not read.
    escaped = "data:image/jpeg;base64," + "".join(
        f"\\u{ord(c):04x}" if i % 7 == 0 else c for i, c in enumerate(data)
    )
    head = b'{"phone":' + orjson.dumps(phone) + b',"ID":"ESC1","image":"' + escaped.encode()
    body = head + b'","Unknown":[1,{"a":null}]} trailing'
    answer = await _post(sim, "/chat/send/image", body)
    assert answer.status_code == 200, answer.text
    delivery = (await sim.ledger())["deliveries"]["ESC1"]
    assert delivery["sha256"] == hashlib.sha256(JPEG).hexdigest()
    # Newlines in the base64 are skipped by Go's decoder.
    wrapped = "\n".join(data[i : i + 76] for i in range(0, len(data), 76))
    body = orjson.dumps({"Phone": phone, "Id": "WRAP1", "Image": "data:image/jpeg;base64," + wrapped})
    assert (await _post(sim, "/chat/send/image", body)).status_code == 200
    assert (await sim.ledger())["deliveries"]["WRAP1"]["sha256"] == hashlib.sha256(JPEG).hexdigest()
    for broken in [
        b"",
        b"{",
        b'{"Phone":"1","Image":"data:image/png;base64,QQ==",}',
        b'{"Phone":"\x01"}',
        b"[]",
    ]:
        answer = await _post(sim, "/chat/send/image", broken)
        assert answer.json() == contract.error_envelope(400, "Could not decode Payload"), broken
    # A top-level null decodes to an empty struct: the first check then fails.
    assert (await _post(sim, "/chat/send/image", b"null")).json()["error"] == "Missing Phone in Payload"


@pytest.mark.parametrize("path", ["/chat/send/image", "/chat/send/document"])
async def test_the_fault_switches_apply_to_media_sends(sim: Simulator, path: str) -> None:
    phone = _phone()
    field = contract.MEDIA_ENDPOINTS[path].field
    prefix = contract.MEDIA_ENDPOINTS[path].required_prefix
    payload = {
        "Phone": phone,
        "Id": uuid.uuid4().hex,
        "FileName": "a.png",
        field: f"{prefix}/png;base64,{_b64(PNG)}",
    }
    if path == "/chat/send/document":
        payload[field] = f"{prefix};base64,{_b64(PNG)}"
    body = orjson.dumps(payload)
    await sim.faults(session_lost=True)
    assert (await _post(sim, path, body)).json() == contract.error_envelope(500, "No session")
    await sim.faults(session_lost=False, error_rate=1.0, error_status=503)
    assert (await _post(sim, path, body)).status_code == 503
    await sim.faults(error_rate=0.0, fail_phones={phone: 400})
    assert (await _post(sim, path, body)).json() == contract.error_envelope(400, "Could not parse Phone")
    await sim.faults(fail_phones={}, hang=True)
    held = asyncio.create_task(_post(sim, path, body))
    await asyncio.sleep(0.3)
    assert not held.done()
    await sim.faults(hang=False)
    assert (await asyncio.wait_for(held, timeout=5)).status_code == 200
    ledger = await sim.ledger()
    assert list(ledger["deliveries"]) == [payload["Id"]]


async def test_a_wrong_token_is_a_401_to_the_worker_even_mid_upload(sim: Simulator) -> None:
    # Refused before the body is read: the worker still reads the 401, not a broken connection.
    client = WuzapiClient(sim.url, connect_timeout_s=2, timeout_s=5, breaker_fail_max=1000, breaker_reset_s=1)
    big = PDF + random.Random(9).randbytes(2 * 1024 * 1024)
    try:
        with pytest.raises(WuzapiUnauthorized):
            await client.send("not-a-user", _outbound("document", "application/pdf"), _file(big, 65536))
    finally:
        await client.close()
    assert (await sim.ledger())["deliveries"] == {}


# Markread -------------------------------------------------------------------------------------


async def test_markread_reads_chat_and_sender_as_jids(sim: Simulator, worker_client: WuzapiClient) -> None:
    phone = _phone()
    read = OutboundMessage(
        id="r1",
        tenant="acme",
        company_id=7,
        conversation_id=3,
        to=phone,
        kind="markread",
        origin="read_receipt",
        created_at_ms=0,
        read_ids=("wamid.A", "wamid.B"),
    )
    await worker_client.send(TOKEN, read)
    [receipt] = (await sim.ledger())["reads"]
    assert receipt == {**receipt, "chat": f"{phone}@s.whatsapp.net", "ids": ["wamid.A", "wamid.B"]}
    # The names our client sent before: WUZAPI ignores them and finds no Chat.
    old = await _post(
        sim, "/chat/markread", orjson.dumps({"Id": ["X"], "ChatPhone": phone, "SenderPhone": phone})
    )
    assert old.json() == contract.error_envelope(400, "Missing Chat in Payload")
    no_id = await _post(sim, "/chat/markread", orjson.dumps({"Chat": f"{phone}@s.whatsapp.net", "Id": []}))
    assert no_id.json() == contract.error_envelope(400, "Missing Id in Payload")
    bad_jid = await _post(sim, "/chat/markread", orjson.dumps({"Chat": "1.2.3@s.whatsapp.net", "Id": ["X"]}))
    assert bad_jid.json() == contract.error_envelope(400, "Could not decode Payload")
    # A bare number is accepted, but ParseJID makes it a server: the receipt reaches no user.
    bare = await _post(sim, "/chat/markread", orjson.dumps({"Chat": phone, "Id": ["X"]}))
    assert bare.status_code == 200
    assert (await sim.ledger())["reads"][-1]["chat"] == phone


# The decoder itself, over any chunking ----------------------------------------------------------


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited on something")


async def _pieces(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    at = 0
    for cut in sorted(cuts):
        yield body[at:cut]
        at = max(at, cut)
    yield body[at:]


@fast(200)
@given(
    phone=st.text(max_size=10),
    caption=st.text(max_size=10),
    extra=st.dictionaries(
        st.text(max_size=5).filter(
            lambda k: k.lower() not in {"phone", "caption", "image", "id", "contextinfo"}
        ),
        json_values,
        max_size=3,
    ),
    data=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 400), max_size=10),
)
def test_the_simulators_decoder_reads_any_chunking_as_orjson_writes_it(
    phone: str, caption: str, extra: dict[str, Any], data: bytes, cuts: list[int]
) -> None:
    payload = {"Phone": phone, **extra, "Caption": caption, "Image": "data:image/png;base64," + _b64(data)}
    body = orjson.dumps(payload)
    read = _run(read_payload(_pieces(body, cuts), _STRUCTS["/chat/send/image"], "Image"))
    assert read.fields == {"Phone": phone, "Caption": caption}
    assert read.media is not None and read.media.error is None
    assert (read.media.size, read.media.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert read.media.start == payload["Image"].encode()[:64]
    with pytest.raises(BadPayload):
        _run(read_payload(_pieces(body[:-1], cuts), _STRUCTS["/chat/send/image"], "Image"))
