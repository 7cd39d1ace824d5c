"""WUZAPI's media contract on our side: the streamed request body is exactly the JSON orjson writes
for the whole payload, however the file is cut into chunks; an attachment goes to the endpoint
whose handler takes it, under a data URL that passes that handler's prefix check; markread names
the chat as a JID."""

from __future__ import annotations

import base64
import itertools
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from schemas import wuzapi as contract
from tests.unit.strategies import fast, json_values


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never waits on anything outside itself: no event loop needed."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine waited on something")


async def _chunks(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def _joined(payload: dict[str, Any], field: str, pieces: list[bytes]) -> tuple[bytes, list[bytes]]:
    out = [p async for p in contract.streamed_json(payload, field, _chunks(pieces))]
    return b"".join(out), out


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _expected(payload: dict[str, Any], field: str, data: bytes) -> bytes:
    return orjson.dumps({**payload, field: payload[field] + base64.b64encode(data).decode()})


@fast(300)
@given(
    before=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    after=st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    field=st.text(max_size=8),
    prefix=st.text(max_size=24),
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=12),
    empties=st.lists(st.integers(0, 12), max_size=3),
)
@example(before={}, after={}, field="Image", prefix="data:image/png;base64,", data=b"", cuts=[], empties=[0])
def test_the_streamed_body_is_orjsons_for_any_chunking(
    before: dict[str, Any],
    after: dict[str, Any],
    field: str,
    prefix: str,
    data: bytes,
    cuts: list[int],
    empties: list[int],
) -> None:
    payload = {**{k: v for k, v in before.items() if k != field}, field: prefix}
    payload.update({k: v for k, v in after.items() if k not in payload})
    pieces = _cut(data, cuts)
    for at in empties:  # empty chunks anywhere
        pieces.insert(min(at, len(pieces)), b"")
    joined, _ = run(_joined(payload, field, pieces))
    assert joined == _expected(payload, field, data)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64])
@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 6, 100, 1000])
def test_chunks_of_every_small_size_carry_their_leftover_bytes(size: int, length: int) -> None:
    data = bytes((i * 37 + 11) % 256 for i in range(length))
    payload = contract.media_request(contract.media_route("image", "image/png"), "4915112345678", "ID1")
    pieces = [data[i : i + size] for i in range(0, length, size)]
    interleaved = [p for piece in pieces for p in (piece, b"")]
    for chunks in (pieces, interleaved, [b"", *pieces, b""]):
        joined, out = run(_joined(payload, "Image", chunks))
        assert joined == _expected(payload, "Image", data)
        # Each piece is written as it comes: nothing waits for the end but the last group.
        assert max(map(len, out)) <= max(len(out[0]), len(out[-1]), (size + 2) // 3 * 4 + 4)


def test_the_field_must_be_a_string_of_the_payload() -> None:
    with pytest.raises(ValueError):
        run(_joined({"Phone": "1"}, "Image", []))
    with pytest.raises(ValueError):
        run(_joined({"Image": 1}, "Image", []))


# --------------------------------------------------------------------------- routes


@pytest.mark.parametrize(
    ("kind", "mime", "path", "prefix"),
    [
        ("image", "image/jpeg", "/chat/send/image", "data:image/jpeg;base64,"),
        ("image", "IMAGE/JPG", "/chat/send/image", "data:image/jpeg;base64,"),
        ("image", "image/png", "/chat/send/image", "data:image/png;base64,"),
        # Go's image.Decode in WUZAPI knows JPEG and PNG only: a GIF would fail after the upload.
        ("image", "image/gif", "/chat/send/document", "data:application/octet-stream;base64,"),
        ("image", "image/webp", "/chat/send/document", "data:application/octet-stream;base64,"),
        ("image", None, "/chat/send/document", "data:application/octet-stream;base64,"),
        # A voice note is Ogg Opus; SendAudio refuses any other prefix.
        ("audio", "audio/ogg", "/chat/send/audio", "data:audio/ogg;base64,"),
        ("audio", "audio/ogg; codecs=opus", "/chat/send/audio", "data:audio/ogg;base64,"),
        ("audio", "audio/mpeg", "/chat/send/document", "data:application/octet-stream;base64,"),
        ("video", "video/mp4", "/chat/send/video", "data:video/mp4;base64,"),
        ("video", "video/3gpp", "/chat/send/video", "data:video/3gpp;base64,"),
        ("video", "video/webm", "/chat/send/document", "data:application/octet-stream;base64,"),
        # SendDocument takes only application/octet-stream, whatever the file is.
        ("document", "application/pdf", "/chat/send/document", "data:application/octet-stream;base64,"),
        ("document", None, "/chat/send/document", "data:application/octet-stream;base64,"),
    ],
)
def test_each_attachment_goes_where_the_gateway_takes_it(
    kind: str, mime: str | None, path: str, prefix: str
) -> None:
    route = contract.media_route(kind, mime)
    assert (route.path, route.prefix) == (path, prefix)
    assert route.field == {"image": "Image", "audio": "Audio", "video": "Video"}.get(route.kind, "Document")


@given(kind=st.sampled_from(["image", "audio", "video", "document"]), mime=st.none() | st.text(max_size=30))
def test_every_route_passes_its_handlers_prefix_check(kind: str, mime: str | None) -> None:
    route = contract.media_route(kind, mime)
    assert route.prefix.startswith(route.endpoint.required_prefix)
    assert route.prefix.endswith(";base64,")
    assert orjson.dumps(route.prefix) == b'"' + route.prefix.encode() + b'"'  # no escape needed


def test_each_media_request_has_the_handlers_field_names_and_the_data_url_last() -> None:
    def build(kind: str, mime: str, **fields: Any) -> dict[str, Any]:
        route = contract.media_route(kind, mime)
        return contract.media_request(route, "4915112345678", "ID1", mime_type=mime, data=b"hi", **fields)

    assert build("image", "image/png", caption="menu") == {
        "Phone": "4915112345678",
        "Id": "ID1",
        "Caption": "menu",
        "Image": "data:image/png;base64,aGk=",
    }
    # SendAudio ignores a Caption: none is sent.
    assert build("audio", "audio/ogg", caption="listen") == {
        "Phone": "4915112345678",
        "Id": "ID1",
        "Audio": "data:audio/ogg;base64,aGk=",
    }
    assert list(build("video", "video/mp4", caption="clip")) == ["Phone", "Id", "Caption", "Video"]
    assert build("document", "application/pdf", caption="here", filename="t.pdf") == {
        "Phone": "4915112345678",
        "Id": "ID1",
        "FileName": "t.pdf",
        "Caption": "here",
        "Document": "data:application/octet-stream;base64,aGk=",
    }
    # A document always has a FileName: the recipient's phone opens it by its extension.
    assert build("audio", "audio/mpeg")["FileName"] == "document.mp3"
    assert build("document", "application/x-unknown")["FileName"] == "document"


def test_markread_names_the_chat_and_sender_as_jids() -> None:
    # MarkRead reads Chat and Sender (types.JID); a bare number would parse as a server.
    assert contract.markread_request(["A", "B"], "+4915112345678") == {
        "Id": ["A", "B"],
        "Chat": "4915112345678@s.whatsapp.net",
        "Sender": "4915112345678@s.whatsapp.net",
    }
    assert contract.user_jid("4915112345678@s.whatsapp.net") == "4915112345678@s.whatsapp.net"
