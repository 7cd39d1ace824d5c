"""What each WUZAPI answer means to the worker, through an in-process transport (httpx's
MockTransport) answering with WUZAPI's own envelopes: a send, a refusal that no retry can help
(4xx), a wrong token (401, alerted), an outage worth retrying (5xx, 429, timeouts, connection
errors) with WUZAPI's Retry-After, replies that are not JSON, and the breaker an outage opens.
Attachments: streamed into the body from a fresh read of the file for each attempt, never whole
in memory, under their own deadline; a file that cannot be read is no fault of the gateway's."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from processors import wuzapi as wuzapi_module
from processors.wuzapi import (
    BreakerOpen,
    MediaUnavailable,
    WuzapiClient,
    WuzapiPermanent,
    WuzapiTransient,
    WuzapiUnauthorized,
)
from schemas import wuzapi as contract
from schemas.outbound import OutboundMessage, gateway_message_id
from schemas.wuzapi import instance_name

TOKEN = "company-7-token"
Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def gateway(status: int, envelope: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    """WUZAPI's reply: Go's json.Encoder writes sorted keys and a newline after."""
    body = (
        envelope
        if isinstance(envelope, bytes)
        else orjson.dumps(envelope, option=orjson.OPT_SORT_KEYS) + b"\n"
    )
    return httpx.Response(
        status, content=body, headers={"Content-Type": "application/json", **(headers or {})}
    )


def ok(data: dict[str, Any]) -> httpx.Response:
    return gateway(200, contract.ok_envelope(data))


def error(status: int, text: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return gateway(status, contract.error_envelope(status, text), headers)


class Gateway:
    """A WUZAPI stand-in: answers each request with `handler` and remembers every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.handler: Handler = lambda request: ok({"Details": "Sent", "Id": "X", "Timestamp": "1"})

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.handler(request)
        return await answer if isinstance(answer, Awaitable) else answer


@pytest.fixture
def stub() -> Gateway:
    # Not `wuzapi`: that name is the session's simulator process (tests/conftest.py).
    return Gateway()


@pytest.fixture
async def client(stub: Gateway) -> AsyncIterator[WuzapiClient]:
    made = WuzapiClient(
        "http://wuzapi.test:8080/",
        connect_timeout_s=0.2,
        timeout_s=0.3,
        breaker_fail_max=3,
        breaker_reset_s=60.0,
    )
    await made._http.aclose()
    # The client's own pool, on an in-process transport: every call reaches `stub`, no socket.
    made._http = httpx.AsyncClient(base_url=made.base_url, transport=httpx.MockTransport(stub))
    try:
        yield made
    finally:
        await made.close()


def message(kind: str = "text", **fields: Any) -> OutboundMessage:
    defaults: dict[str, Any] = {
        "id": "reply-1",
        "tenant": "acme",
        "company_id": 7,
        "conversation_id": 3,
        "to": "4915112345678",
        "kind": kind,
        "origin": "agent",
        "created_at_ms": 1_717_000_000_000,
    }
    return OutboundMessage(**{**defaults, **fields})


# --------------------------------------------------------------------------- success


async def test_a_send_goes_under_its_gateway_id_and_succeeds_on_whatsapps_answer(
    client: WuzapiClient, stub: Gateway
) -> None:
    stub.handler = lambda r: ok({"Details": "Sent", "Id": "3EB0ABC", "Timestamp": "1717000001"})
    await client.send(TOKEN, message(text="Hello"))
    assert orjson.loads(stub.requests[-1].content)["Id"] == gateway_message_id(7, "reply-1")


async def test_a_send_whose_answer_names_no_id_still_succeeds(client: WuzapiClient, stub: Gateway) -> None:
    stub.handler = lambda r: ok({"Details": "Sent"})
    await client.send(TOKEN, message(text="Hello"))


async def test_a_success_without_data_is_an_empty_answer(client: WuzapiClient, stub: Gateway) -> None:
    stub.handler = lambda r: gateway(200, {"code": 200, "success": True})
    assert await client.call(TOKEN, contract.SESSION_STATUS, {}) == {}


@pytest.mark.parametrize(
    ("outbound", "path", "body"),
    [
        (
            message(text="Hi there"),
            "/chat/send/text",
            {"Phone": "4915112345678", "Body": "Hi there", "Id": gateway_message_id(7, "reply-1")},
        ),
        (
            message("markread", read_ids=("wamid.A", "wamid.B")),
            "/chat/markread",
            {
                "Id": ["wamid.A", "wamid.B"],
                "Chat": "4915112345678@s.whatsapp.net",
                "Sender": "4915112345678@s.whatsapp.net",
            },
        ),
    ],
    ids=["text", "markread"],
)
async def test_each_kind_is_posted_as_wuzapi_expects(
    client: WuzapiClient, stub: Gateway, outbound: OutboundMessage, path: str, body: dict[str, Any]
) -> None:
    await client.send(TOKEN, outbound)
    [request] = stub.requests
    assert request.method == "POST"
    assert request.url == f"http://wuzapi.test:8080{path}"
    assert request.headers[contract.TOKEN_HEADER] == TOKEN
    assert request.headers["content-type"] == "application/json"
    assert orjson.loads(request.content) == body


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("status", "text"),
    [(400, "missing Phone in Payload"), (404, "not found"), (413, "too large"), (422, "bad phone")],
)
async def test_a_4xx_is_permanent_and_says_why(
    client: WuzapiClient, stub: Gateway, status: int, text: str
) -> None:
    stub.handler = lambda r: error(status, text)
    with pytest.raises(WuzapiPermanent) as refused:
        await client.send(TOKEN, message(text="Hi"))
    assert not isinstance(refused.value, WuzapiUnauthorized | WuzapiTransient)
    assert refused.value.status == status
    assert str(refused.value) == f"{status} {text}"


class Log:
    """Stands in for the module's logger: keeps (level, event, fields) of each line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.lines.append((level, event, fields))


async def test_a_401_is_the_tokens_fault_and_raises_an_alert(
    client: WuzapiClient, stub: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    monkeypatch.setattr(wuzapi_module, "log", log)
    stub.handler = lambda r: gateway(401, b'{"code":401,"error":"Unauthorized","success":false}\n')
    with pytest.raises(WuzapiUnauthorized) as refused:
        await client.send(TOKEN, message(text="Hi"))
    assert isinstance(refused.value, WuzapiPermanent)  # no retry can help
    assert refused.value.status == 401
    assert "Unauthorized" in str(refused.value)
    [(level, event, fields)] = log.lines
    assert (level, event, fields["alert"]) == ("error", "wuzapi.unauthorized", True)
    assert TOKEN not in str(log.lines)  # the token itself never reaches the logs


async def test_other_refusals_raise_no_alert(
    client: WuzapiClient, stub: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    monkeypatch.setattr(wuzapi_module, "log", log)
    stub.handler = lambda r: error(400, "missing Phone in Payload")
    with pytest.raises(WuzapiPermanent):
        await client.send(TOKEN, message(text="Hi"))
    assert log.lines == []


async def test_a_200_that_is_not_a_success_envelope_is_not_taken_for_a_send(
    client: WuzapiClient, stub: Gateway
) -> None:
    stub.handler = lambda r: gateway(200, {"code": 200, "error": "odd", "success": False})
    with pytest.raises(WuzapiPermanent, match="unexpected reply"):
        await client.send(TOKEN, message(text="Hi"))


@pytest.mark.parametrize("body", [b"<html>OK</html>", b"", b"[1, 2]", b'"Sent"', b"null"])
async def test_a_200_whose_body_is_not_an_envelope_is_permanent(
    client: WuzapiClient, stub: Gateway, body: bytes
) -> None:
    stub.handler = lambda r: gateway(200, body)
    with pytest.raises(WuzapiPermanent):
        await client.send(TOKEN, message(text="Hi"))


# --------------------------------------------------------------------------- outages


@pytest.mark.parametrize(
    ("status", "text"), [(500, "No session"), (502, "bad gateway"), (503, "down"), (504, "slow")]
)
async def test_a_5xx_is_transient(client: WuzapiClient, stub: Gateway, status: int, text: str) -> None:
    stub.handler = lambda r: error(status, text)
    with pytest.raises(WuzapiTransient) as failed:
        await client.send(TOKEN, message(text="Hi"))
    assert failed.value.status == status
    assert str(failed.value) == f"{status} {text}"
    assert failed.value.retry_after_s is None


async def test_a_proxys_html_error_page_is_transient_and_named_by_its_status(
    client: WuzapiClient, stub: Gateway
) -> None:
    stub.handler = lambda r: httpx.Response(502, content=b"<html><h1>502 Bad Gateway</h1></html>")
    with pytest.raises(WuzapiTransient) as failed:
        await client.send(TOKEN, message(text="Hi"))
    assert str(failed.value) == "502 Bad Gateway"


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("7", 7.0), ("0.5", 0.5), ("0", 0.0), ("-3", 0.0), ("soon", None), ("", None)],
)
@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_are_honoured(
    client: WuzapiClient, stub: Gateway, status: int, retry_after: str, expected: float | None
) -> None:
    stub.handler = lambda r: error(status, "slow down", {"Retry-After": retry_after})
    with pytest.raises(WuzapiTransient) as failed:
        await client.send(TOKEN, message(text="Hi"))
    assert failed.value.status == status
    assert failed.value.retry_after_s == expected


async def test_retry_after_as_an_http_date_is_the_time_until_then(
    client: WuzapiClient, stub: Gateway
) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    waits = []
    for when in (later, earlier):

        def slow_down(request: httpx.Request, when: str = when) -> httpx.Response:
            return error(429, "slow down", {"Retry-After": when})

        stub.handler = slow_down
        with pytest.raises(WuzapiTransient) as failed:
            await client.send(TOKEN, message(text="Hi"))
        waits.append(failed.value.retry_after_s)
    assert waits[0] is not None and 27.0 < waits[0] <= 30.0
    assert waits[1] == 0.0


async def test_a_gateway_that_does_not_answer_in_time_is_a_transient_timeout(
    client: WuzapiClient, stub: Gateway
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return ok({})

    stub.handler = hang
    started = asyncio.get_running_loop().time()
    with pytest.raises(WuzapiTransient, match=r"timeout after 0\.3s on /chat/send/text") as failed:
        await client.send(TOKEN, message(text="Hi"))
    assert asyncio.get_running_loop().time() - started < 2.0  # the client's timeout, not the gateway's
    assert failed.value.status is None


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectTimeout("connect timed out"),
        httpx.ReadTimeout("read timed out"),
        httpx.ConnectError("connection refused"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
    ],
    ids=["connect-timeout", "read-timeout", "refused", "dropped"],
)
async def test_transport_failures_are_transient(
    client: WuzapiClient, stub: Gateway, exc: httpx.TransportError
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    stub.handler = fail
    with pytest.raises(WuzapiTransient) as failed:
        await client.send(TOKEN, message(text="Hi"))
    assert failed.value.status is None
    assert failed.value.__cause__ is exc


# --------------------------------------------------------------------------- the breaker


def breaker_open(token: str) -> float | None:
    """What the operators see: the worker's `cortexx_wuzapi_breaker_open` gauge for that instance."""
    return REGISTRY.get_sample_value("cortexx_wuzapi_breaker_open", {"instance": instance_name(token)})


async def test_an_outage_opens_the_breaker_and_then_nothing_is_sent(
    client: WuzapiClient, stub: Gateway
) -> None:
    stub.handler = lambda r: error(500, "No session")
    for _ in range(2):
        with pytest.raises(WuzapiTransient):
            await client.send(TOKEN, message(text="Hi"))
    with pytest.raises(BreakerOpen) as tripped:
        await client.send(TOKEN, message(text="Hi"))
    assert 59.0 < tripped.value.wait_s <= 60.0
    assert len(stub.requests) == 3
    with pytest.raises(BreakerOpen):
        await client.send(TOKEN, message(text="Hi"))
    assert len(stub.requests) == 3  # refused before any request: no attempt spent
    assert breaker_open(TOKEN) == 1.0


async def test_refusals_never_open_the_breaker(client: WuzapiClient, stub: Gateway) -> None:
    token = "refusals-only-token"  # its own instance: the gauge is the process's
    stub.handler = lambda r: error(400, "missing Phone in Payload")
    for _ in range(5):
        with pytest.raises(WuzapiPermanent):
            await client.send(token, message(text="Hi"))
    stub.handler = lambda r: gateway(401, contract.error_envelope(401, contract.UNAUTHORIZED))
    for _ in range(5):
        with pytest.raises(WuzapiUnauthorized):
            await client.send(token, message(text="Hi"))
    assert breaker_open(token) in (None, 0.0)  # never opened: the gauge is unset or 0


async def test_one_instances_outage_does_not_stop_another(client: WuzapiClient, stub: Gateway) -> None:
    stub.handler = lambda r: (
        error(503, "down") if r.headers[contract.TOKEN_HEADER] == "broken-instance" else ok({"Id": "fine"})
    )
    for _ in range(3):
        with pytest.raises((WuzapiTransient, BreakerOpen)):
            await client.send("broken-instance", message(text="Hi"))
    before = len(stub.requests)
    await client.send(TOKEN, message(text="Hi"))  # answered: the other instance's breaker is its own
    assert len(stub.requests) == before + 1


# --------------------------------------------------------------------------- attachments

FILE = bytes(range(256)) * 40 + b"tail"  # 10 244 bytes: not a multiple of 3


def source(
    data: bytes = FILE, size: int = 1000, opened: list[int] | None = None
) -> Callable[[], AsyncIterator[bytes]]:
    """A media store's reader: each call is a fresh read of the file from its start."""

    def read() -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            if opened is not None:
                opened.append(1)
            for at in range(0, len(data), size):
                yield data[at : at + size]

        return chunks()

    return read


def data_url(prefix: str, data: bytes = FILE) -> str:
    return prefix + base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("kind", "fields", "path", "body"),
    [
        (
            "image",
            {"mime_type": "image/jpeg", "caption": "Our menu"},
            "/chat/send/image",
            {"Caption": "Our menu", "Image": data_url("data:image/jpeg;base64,")},
        ),
        (
            "image",
            {"mime_type": "image/png"},
            "/chat/send/image",
            {"Image": data_url("data:image/png;base64,")},
        ),
        (
            "audio",
            {"mime_type": "audio/ogg"},
            "/chat/send/audio",
            {"Audio": data_url("data:audio/ogg;base64,")},
        ),
        (
            "video",
            {"mime_type": "video/mp4", "caption": "How to"},
            "/chat/send/video",
            {"Caption": "How to", "Video": data_url("data:video/mp4;base64,")},
        ),
        (
            "document",
            {"mime_type": "application/pdf", "filename": "t.pdf", "caption": "Invoice"},
            "/chat/send/document",
            {
                "FileName": "t.pdf",
                "Caption": "Invoice",
                "Document": data_url("data:application/octet-stream;base64,"),
            },
        ),
        # What the gateway cannot send as its kind goes as a document, under a name.
        (
            "audio",
            {"mime_type": "audio/mpeg"},
            "/chat/send/document",
            {"FileName": "document.mp3", "Document": data_url("data:application/octet-stream;base64,")},
        ),
        (
            "image",
            {"mime_type": "image/gif", "filename": "party.gif"},
            "/chat/send/document",
            {"FileName": "party.gif", "Document": data_url("data:application/octet-stream;base64,")},
        ),
    ],
    ids=["image-caption", "image", "audio", "video", "document", "mp3-as-document", "gif-as-document"],
)
async def test_an_attachment_is_streamed_into_its_endpoints_data_url(
    client: WuzapiClient, stub: Gateway, kind: str, fields: dict[str, Any], path: str, body: dict[str, Any]
) -> None:
    await client.send(TOKEN, message(kind, media_key="7/abc", **fields), source())
    [request] = stub.requests
    assert request.url == f"http://wuzapi.test:8080{path}"
    assert request.headers[contract.TOKEN_HEADER] == TOKEN
    assert request.headers["content-type"] == "application/json"
    assert "content-length" not in request.headers  # streamed: chunked
    expected = {"Phone": "4915112345678", "Id": gateway_message_id(7, "reply-1"), **body}
    assert request.content == orjson.dumps(expected)  # byte for byte, the media field last


async def test_an_image_wuzapi_cannot_decode_goes_as_a_document_and_opens_no_breaker(
    client: WuzapiClient, stub: Gateway
) -> None:
    token = "undecodable-images-token"  # its own instance: the gauge is the process's

    def gateway_decodes_nothing(request: httpx.Request) -> httpx.Response:
        if request.url.path == contract.SEND_IMAGE:
            # handlers.go: uploaded to WhatsApp, then image.Decode fails; nothing is sent.
            return error(500, "Could not decode image for thumbnail preparation: image: unknown format")
        return ok({"Details": "Sent", "Id": "X", "Timestamp": "1"})

    stub.handler = gateway_decodes_nothing
    photo = message("image", media_key="7/abc", mime_type="image/jpeg", caption="the receipt")
    for _ in range(5):  # more than breaker_fail_max: none of them counts
        await client.send(token, photo, source())
    assert [r.url.path for r in stub.requests[:2]] == [contract.SEND_IMAGE, contract.SEND_DOCUMENT]
    assert len(stub.requests) == 10
    resent = orjson.loads(stub.requests[1].content)
    assert resent["Id"] == orjson.loads(stub.requests[0].content)["Id"] == gateway_message_id(7, "reply-1")
    assert resent["FileName"] == "document.jpg" and resent["Caption"] == "the receipt"
    assert resent["Document"] == data_url("data:application/octet-stream;base64,")
    assert breaker_open(token) in (None, 0.0)


async def test_each_attempt_reads_the_file_afresh(client: WuzapiClient, stub: Gateway) -> None:
    answers = iter([error(500, "Failed to upload file: timeout"), ok({"Id": "X"})])
    stub.handler = lambda r: next(answers)
    opened: list[int] = []
    outbound = message("image", media_key="7/abc", mime_type="image/png")
    media = source(opened=opened)
    with pytest.raises(WuzapiTransient):
        await client.send(TOKEN, outbound, media)
    await client.send(TOKEN, outbound, media)  # the caller's retry
    assert len(opened) == 2
    first, second = (r.content for r in stub.requests)
    assert first == second and first.endswith(base64.b64encode(FILE) + b'"}')


async def test_an_attachment_without_its_bytes_is_refused_before_any_request(
    client: WuzapiClient, stub: Gateway
) -> None:
    # WUZAPI downloads nothing: a file named only by URL cannot be sent.
    with pytest.raises(WuzapiPermanent, match="no attachment to stream"):
        await client.send(TOKEN, message("image", media_url="https://cdn.test/a.jpg"))
    assert stub.requests == []


async def test_a_file_that_cannot_be_read_is_unavailable_media_not_a_gateway_outage(
    client: WuzapiClient, stub: Gateway
) -> None:
    token = "unreadable-file-token"
    closed: list[bool] = []
    broken = OSError("store went away")

    def failing() -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                yield FILE[:999]
                raise broken
            finally:
                closed.append(True)

        return chunks()

    for _ in range(5):
        with pytest.raises(MediaUnavailable) as failed:
            await client.send(token, message("document", media_key="7/abc"), failing)
        assert isinstance(failed.value, WuzapiTransient)  # retried by the caller
        assert failed.value.__cause__ is broken
    assert len(closed) == 5
    assert breaker_open(token) in (None, 0.0)  # five in a row, past fail_max: the breaker stays shut
    await client.send(token, message(text="Hi"))


class Trickle(httpx.AsyncBaseTransport):
    """A gateway reached over a slow link: reads the body a piece at a time, `delay_s` apart
    from the `after`-th on, decoding the data URL as it comes; answers once it has it all."""

    def __init__(self, delay_s: float = 0.0, after: int = 0) -> None:
        self.delay_s = delay_s
        self.after = after
        self.pieces = 0
        self.largest = 0
        self.digest = hashlib.sha256()
        self.size = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        head, b64, tail, inside = b"", b"", b"", False
        async for piece in request.stream:
            self.largest = max(self.largest, len(piece))
            self.pieces += 1
            if self.pieces > self.after:
                await asyncio.sleep(self.delay_s)
            if not inside:
                head += piece
                if b"base64," not in head:
                    continue
                head, _, piece = head.partition(b"base64,")
                inside = True
            if piece.endswith(b'"}'):
                piece, tail = piece[:-2], b'"}'
            b64 += piece
            whole = len(b64) - len(b64) % 4
            decoded = base64.b64decode(b64[:whole], validate=True)
            self.digest.update(decoded)
            self.size += len(decoded)
            b64 = b64[whole:]
        assert (b64, tail) == (b"", b'"}')
        return ok({"Details": "Sent", "Id": "X"})


def _made(transport: httpx.AsyncBaseTransport, **settings: Any) -> WuzapiClient:
    made = WuzapiClient(
        "http://wuzapi.test:8080/",
        connect_timeout_s=0.2,
        timeout_s=settings.pop("timeout_s", 0.3),
        breaker_fail_max=3,
        breaker_reset_s=60.0,
        **settings,
    )
    made._http = httpx.AsyncClient(base_url=made.base_url, transport=transport)
    return made


async def test_a_16_mb_file_is_never_whole_in_memory() -> None:
    gateway = Trickle()
    client = _made(gateway)
    chunk, count = 64 * 1024, 256  # 16 MiB, read as a media store reads it

    def store() -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            rng = random.Random(7)
            for _ in range(count):
                yield rng.randbytes(chunk)

        return chunks()

    expected = hashlib.sha256()
    rng = random.Random(7)
    for _ in range(count):
        expected.update(rng.randbytes(chunk))
    tracemalloc.start()
    try:
        await client.send(TOKEN, message("video", media_key="7/big", mime_type="video/mp4"), store)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await client.close()
    assert (gateway.size, gateway.digest.hexdigest()) == (chunk * count, expected.hexdigest())
    assert gateway.largest <= chunk * 4 // 3 + 8  # one chunk's base64 at a time
    assert peak < 2 * 1024 * 1024, f"peak {peak:,} bytes for a {chunk * count:,}-byte file"


async def test_an_upload_has_its_own_deadline_not_the_text_timeout() -> None:
    slow = _made(Trickle(delay_s=0.05), timeout_s=0.1, media_timeout_s=5.0)
    try:
        # Eight pieces 50 ms apart: past the 0.1 s a text call has, within the upload's 5 s.
        await slow.send(TOKEN, message("image", media_key="7/abc", mime_type="image/png"), source(size=2000))
    finally:
        await slow.close()
    opened: list[int] = []
    closed: list[bool] = []

    def tracked() -> AsyncIterator[bytes]:
        async def chunks() -> AsyncIterator[bytes]:
            opened.append(1)
            try:
                for at in range(0, len(FILE), 500):
                    yield FILE[at : at + 500]
            finally:
                closed.append(True)

        return chunks()

    stuck = _made(Trickle(delay_s=10, after=3), media_timeout_s=0.3)  # stalls mid-file
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(WuzapiTransient, match=r"timeout after 0\.3s on /chat/send/image"):
            await stuck.send(TOKEN, message("image", media_key="7/abc", mime_type="image/png"), tracked)
    finally:
        await stuck.close()
    assert asyncio.get_running_loop().time() - started < 2.0
    assert (opened, closed) == ([1], [True])  # the file is let go at once, not by the collector


def test_instance_names_do_not_leak_the_token() -> None:
    assert instance_name("abcdefghijkl") == "wuzapi-abcd****"
    assert instance_name("short") == "wuzapi-****"
