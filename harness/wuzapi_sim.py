"""A WUZAPI simulator: WUZAPI's HTTP contract for what Cortexx uses (asternic/wuzapi handlers.go),
with fault injection switched at run time and a ledger of what it delivered.

Users: the gateway knows a fixed set of tokens (`tokens`); any other token, or none, gets 401
`{"code":401,"error":"Unauthorized","success":false}` before anything else, as WUZAPI's auth
middleware answers. `any_token` (asked for explicitly) makes every non-empty token a user.

Faults (`PUT /_sim/faults`): an error rate answering a chosen status, added latency, hanging calls,
connections reset (`down`), a listener closed for a while (`down_for_s`), a lost WhatsApp session,
and per-phone forced statuses. `latency_ms` and `hang` stand for the WhatsApp round trip of a call
that passed auth and validation: a hung call waits until `hang` is cleared and then goes on (it is
delivered and answered), or is dropped, undelivered, when the simulator is reset or stopped.

Bodies are read as they arrive and decoded as the gateway's Go code does (`read_payload`): the
json.Decoder (field names matched case-insensitively, unknown fields ignored, a wrong type is a
400), the handlers' checks in their order with their texts, and a media field's data URL as
vincent-petithory/dataurl and base64.StdEncoding take it, decoded, counted and hashed a piece at a
time: a 16 MB file is never whole here. A value shorter than its handler's prefix panics the Go
handler (`t.Document[0:29]`), which net/http answers by closing the connection: so does this.

Deliveries: WUZAPI sends with `context.Background()`, so a send it has begun is delivered whether
or not the caller is still waiting for the answer. It keeps no record of message ids; WhatsApp keys
a message by its chat and id, so a send of a known id to the same chat is the same message (a
resend: `requests` grows, `accepted` does not), while the same reply under another id is a second
message to the recipient. The ledger counts both, by id and by (phone, body), and lists as
`duplicates` what reached a recipient more than once. A delivery records its kind, the mime type
WhatsApp was told, and the decoded file's size and SHA-256; `reads` lists the receipts markread sent.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import random
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import orjson
from aiohttp import web

from infra.runtime.logging import get_logger
from schemas.wuzapi import (
    MARK_READ,
    MEDIA_ENDPOINTS,
    NO_SESSION,
    SEND_AUDIO,
    SEND_DOCUMENT,
    SEND_IMAGE,
    SEND_STICKER,
    SEND_TEXT,
    SEND_VIDEO,
    SESSION_STATUS,
    TOKEN_HEADER,
    UNAUTHORIZED,
    UNDECODABLE_MEDIA,
    UNDECODABLE_PAYLOAD,
    UNPARSABLE_PHONE,
    MediaEndpoint,
    error_envelope,
    missing,
    ok_envelope,
)

log = get_logger("wuzapi_sim")

# How long a stop waits for calls still in flight before cancelling them; hung ones are woken
# (and dropped) at once, so this bounds only a handler that is stuck elsewhere.
SHUTDOWN_TIMEOUT_S = 1.0

WHATSAPP_SERVER = "@s.whatsapp.net"
# SendAudio labels every voice note so, whatever the file (handlers.go).
VOICE_NOTE_TYPE = "audio/ogg; codecs=opus"
# The formats Go's image.Decode knows in WUZAPI's binary, by their registered magic: JPEG and PNG.
THUMBNAIL_MAGIC = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n")
THUMBNAIL_FAILED = "Could not decode image for thumbnail preparation: image: unknown format"

# The Go types of the handlers' request structs (handlers.go), by field name.
_STRING, _STRINGS, _STRUCT, _BYTES, _JID = "string", "[]string", "struct", "[]byte", "types.JID"
_SEND = {"Phone": _STRING, "Id": _STRING, "ContextInfo": _STRUCT}
_STRUCTS: dict[str, dict[str, str]] = {
    SEND_TEXT: {**_SEND, "Body": _STRING},
    SEND_IMAGE: {**_SEND, "Image": _STRING, "Caption": _STRING},
    SEND_AUDIO: {**_SEND, "Audio": _STRING, "Caption": _STRING},
    SEND_VIDEO: {**_SEND, "Video": _STRING, "Caption": _STRING, "JPEGThumbnail": _BYTES},
    SEND_DOCUMENT: {**_SEND, "Document": _STRING, "FileName": _STRING, "Caption": _STRING},
    SEND_STICKER: {**_SEND, "Sticker": _STRING, "PngThumbnail": _BYTES},
    MARK_READ: {"Id": _STRINGS, "Chat": _JID, "Sender": _JID},
}
_KINDS = {SEND_TEXT: "text", **{path: e.kind for path, e in MEDIA_ENDPOINTS.items()}}


# Go's decoding, streamed ----------------------------------------------------------------------


class BadPayload(Exception):
    """A body that json.Decoder does not decode into the handler's struct (a syntax error, an
    early end, a wrong type): the handler answers 400 `Could not decode Payload`."""


@dataclass(frozen=True)
class Jid:
    """whatsmeow's types.JID, as ParseJID reads a string and String writes it back."""

    user: str
    server: str
    agent: int = 0
    device: int = 0

    def __str__(self) -> str:
        if self.agent > 0:
            return f"{self.user}.{self.agent}:{self.device}@{self.server}"
        if self.device > 0:
            return f"{self.user}:{self.device}@{self.server}"
        return f"{self.user}@{self.server}" if self.user else self.server


_GO_INT = re.compile(r"[+-]?[0-9]+")


def _go_int(text: str) -> int:
    if not _GO_INT.fullmatch(text):
        raise ValueError("failed to parse device from JID")
    return int(text)


def parse_jid(text: str) -> Jid:
    """whatsmeow's ParseJID: a string without "@" is a server, not a user; raises ValueError."""
    parts = text.split("@")
    if len(parts) == 1:
        return Jid("", parts[0])
    user, server = parts[0], parts[1]
    if "." in user:
        dotted = user.split(".")
        if len(dotted) != 2:
            raise ValueError("unexpected number of dots in JID")
        ad = dotted[1].split(":")
        if len(ad) > 2:
            raise ValueError("unexpected number of colons in JID")
        agent = _go_int(ad[0]) % 256
        device = _go_int(ad[1]) % 65536 if len(ad) == 2 else 0
        return Jid(dotted[0], server, agent, device)
    if ":" in user:
        colon = user.split(":")
        if len(colon) != 2:
            raise ValueError("unexpected number of colons in JID")
        return Jid(colon[0], server, 0, _go_int(colon[1]) % 65536)
    return Jid(user, server)


def phone_parses(phone: str) -> bool:
    """WUZAPI's parseJID of a Phone (wmiau.go): a bare number is a user on the WhatsApp server;
    with an "@" it must parse and name a user."""
    phone = phone.removeprefix("+")
    if "@" not in phone:
        return True
    try:
        return parse_jid(phone).user != ""
    except ValueError:
        return False


def detect_content_type(data: bytes) -> str:
    """Go's http.DetectContentType over a file's first 512 bytes (net/http/sniff.go), for the
    types a reply can carry: what WhatsApp is told an image, video or document is."""
    data = data[:512]
    rest = data.lstrip(b"\t\n\x0c\r ")
    for tag in _HTML_TAGS:
        if len(rest) > len(tag) and rest[: len(tag)].upper() == tag and rest[len(tag)] in b" >":
            return "text/html; charset=utf-8"
    if rest.startswith(b"<?xml"):
        return "text/xml; charset=utf-8"
    for magic, mime in _EXACT:
        if data.startswith(magic):
            return mime
    for pattern, mask, mime in _MASKED:
        if len(data) >= len(pattern) and all(
            d & m == p for d, m, p in zip(data, mask, pattern, strict=False)
        ):
            return mime
    if _is_mp4(data):
        return "video/mp4"
    if not any(b <= 0x08 or b == 0x0B or 0x0E <= b <= 0x1A or 0x1C <= b <= 0x1F for b in rest):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


_HTML_TAGS = [
    b"<!DOCTYPE HTML",
    b"<HTML",
    b"<HEAD",
    b"<SCRIPT",
    b"<IFRAME",
    b"<H1",
    b"<DIV",
    b"<FONT",
    b"<TABLE",
    b"<A",
    b"<STYLE",
    b"<TITLE",
    b"<B",
    b"<BODY",
    b"<BR",
    b"<P",
    b"<!--",
]
_EXACT = [
    (b"%PDF-", "application/pdf"),
    (b"%!PS-Adobe-", "application/postscript"),
    (b"BM", "image/bmp"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x1a\x45\xdf\xa3", "video/webm"),
    (b"\x1f\x8b\x08", "application/x-gzip"),
    (b"PK\x03\x04", "application/zip"),
    (b"Rar!\x1a\x07\x00", "application/x-rar-compressed"),
    (b"Rar!\x1a\x07\x01\x00", "application/x-rar-compressed"),
    (b"\x00asm", "application/wasm"),
]
_ANY4 = b"\x00\x00\x00\x00"
_MASKED = [
    (b"\xfe\xff\x00\x00", b"\xff\xff\x00\x00", "text/plain; charset=utf-16be"),
    (b"\xff\xfe\x00\x00", b"\xff\xff\x00\x00", "text/plain; charset=utf-16le"),
    (b"\xef\xbb\xbf\x00", b"\xff\xff\xff\x00", "text/plain; charset=utf-8"),
    (b"\x00\x00\x01\x00", b"\xff" * 4, "image/x-icon"),
    (b"\x00\x00\x02\x00", b"\xff" * 4, "image/x-icon"),
    (b"RIFF" + _ANY4 + b"WEBPVP", b"\xff" * 4 + _ANY4 + b"\xff" * 6, "image/webp"),
    (b".snd", b"\xff" * 4, "audio/basic"),
    (b"FORM" + _ANY4 + b"AIFF", b"\xff" * 4 + _ANY4 + b"\xff" * 4, "audio/aiff"),
    (b"ID3", b"\xff" * 3, "audio/mpeg"),
    (b"OggS\x00", b"\xff" * 5, "application/ogg"),
    (b"MThd\x00\x00\x00\x06", b"\xff" * 8, "audio/midi"),
    (b"RIFF" + _ANY4 + b"AVI ", b"\xff" * 4 + _ANY4 + b"\xff" * 4, "video/avi"),
    (b"RIFF" + _ANY4 + b"WAVE", b"\xff" * 4 + _ANY4 + b"\xff" * 4, "audio/wave"),
]


def _is_mp4(data: bytes) -> bool:
    if len(data) < 12:
        return False
    box = int.from_bytes(data[:4], "big")
    if len(data) < box or box % 4 != 0 or data[4:8] != b"ftyp":
        return False
    return any(data[at : at + 3] == b"mp4" for at in range(8, box, 4) if at != 12)


# dataurl's lexer: a token is ASCII, no control, no space, none of ()<>@,;:\"/[]?=
_T = rb"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]"
_DATA_HEAD = re.compile(
    rb"data:(?:(?P<type>[xX]-" + _T + rb"*|" + _T + rb"+)/" + _T + rb"*)?"
    rb"(?:;" + _T + rb"+=(?:" + _T + rb'+|"(?:[^"\\\x80-\xff]|\\[\x00-\x7f])*"))*'
    rb"(?P<base64>;base64)?,"
)
_DISCRETE = (b"text", b"image", b"audio", b"video", b"application", b"message", b"multipart")
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=\n]")
_PADDED = re.compile(rb"[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=")
_NOT_URL_CHAR = re.compile(rb"[^!$-;=?-Z_a-z~]")
_ESCAPED = re.compile(rb"(?:[^%]|%[0-9A-Fa-f]{2})*")


class MediaValue:
    """One media field's string as the gateway decodes it (dataurl.DecodeString: an RFC 2397
    header, then base64.StdEncoding, padded, newlines ignored; or %-escaped text), fed the
    string a piece at a time: it keeps the value's first bytes (the handler's prefix check), its
    length, and the decoded file's size, SHA-256 and first 512 bytes, never the file."""

    HEAD_LIMIT = 64 * 1024

    def __init__(self) -> None:
        self.length = 0
        self.start = b""
        self.error: str | None = None
        self.declared_type = "text/plain"
        self.size = 0
        self.head512 = b""
        self._sha = hashlib.sha256()
        self._head: bytearray | None = bytearray()
        self._base64 = False
        self._carry = b""
        self._padding: bytes | None = None
        self._text = bytearray()

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def _fail(self, why: str) -> None:
        self.error = self.error or why

    def _decoded(self, data: bytes) -> None:
        self.size += len(data)
        self._sha.update(data)
        if len(self.head512) < 512:
            self.head512 += data[: 512 - len(self.head512)]

    def feed(self, piece: bytes) -> None:
        self.length += len(piece)
        if len(self.start) < 64:
            self.start += piece[: 64 - len(self.start)]
        if self.error is not None:
            return
        if self._head is not None:
            comma = piece.find(b",")
            self._head += piece if comma < 0 else piece[: comma + 1]
            if comma < 0:
                if len(self._head) > self.HEAD_LIMIT:
                    self._fail("missing comma before data")
                return
            self._header(bytes(self._head))
            self._head = None
            piece = piece[comma + 1 :]
            if self.error is not None:
                return
        if self._base64:
            self._feed_base64(piece)
        elif _NOT_URL_CHAR.search(piece):
            self._fail("invalid data character")
        else:
            self._text += piece

    def _header(self, head: bytes) -> None:
        match = _DATA_HEAD.fullmatch(head)
        kind = match["type"] if match else None
        if match is None or (
            kind is not None and kind[:2] not in (b"x-", b"X-") and not kind.startswith(_DISCRETE)
        ):
            self._fail("invalid data URL header")
            return
        self._base64 = match["base64"] is not None
        media_type = head[5:].split(b";", 1)[0].split(b",", 1)[0]
        if media_type:
            self.declared_type = media_type.decode()

    def _feed_base64(self, piece: bytes) -> None:
        if _NOT_BASE64.search(piece):
            self._fail("invalid data character")
            return
        piece = piece.replace(b"\n", b"")
        if self._padding is not None:
            # Nothing may follow the padding: the quantum it ends is the last.
            self._padding += piece
            if len(self._padding) > 4:
                self._fail("illegal base64 data: data after padding")
            return
        data = self._carry + piece if self._carry else piece
        pad = data.find(b"=")
        if pad >= 0:
            last = pad - pad % 4
            self._decoded(binascii.a2b_base64(data[:last]))
            self._carry, self._padding = b"", data[last:]
            if len(self._padding) > 4:
                self._fail("illegal base64 data: data after padding")
            return
        whole = len(data) - len(data) % 4
        if whole:
            self._decoded(binascii.a2b_base64(data[:whole]))
        self._carry = data[whole:]

    def finish(self) -> None:
        if self.error is not None:
            return
        if self._head is not None:
            self._fail("missing comma before data")
        elif self._base64:
            if self._padding is not None:
                if _PADDED.fullmatch(self._padding):
                    self._decoded(binascii.a2b_base64(self._padding))
                else:
                    self._fail("illegal base64 data: bad padding")
            elif self._carry:
                self._fail("illegal base64 data: incomplete quantum")
        elif _ESCAPED.fullmatch(self._text):
            self._decoded(urllib.parse.unquote_to_bytes(bytes(self._text)))
        else:
            self._fail("rfc2396: invalid unescape sequence")


_STRING_STOP = re.compile(rb'["\\\x00-\x1f]')
_HEX4 = re.compile(rb"[0-9A-Fa-f]{4}")
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset(b"+-.0123456789eE")
_SIMPLE_ESCAPES = {
    ord('"'): b'"',
    ord("\\"): b"\\",
    ord("/"): b"/",
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
}
_REPLACEMENT = "\ufffd".encode()
_MAX_DEPTH = 200


def _fold(name: str) -> str:
    # encoding/json matches a key to a field case-insensitively (Unicode simple folding).
    return name.replace("\u212a", "k").replace("\u017f", "s").lower()


class _JsonReader:
    """JSON read from a stream of chunks as encoding/json scans it; strings go to a sink in
    pieces, so a long one is never held whole."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.buf = b""
        self.pos = 0

    async def _more(self) -> bool:
        """Read the next non-empty chunk into the buffer; False at the end of the body."""
        chunk = b""
        while not chunk:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return False
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        return True

    async def _have(self, n: int) -> bool:
        while len(self.buf) - self.pos < n:
            if not await self._more():
                return False
        return True

    async def peek(self) -> int:
        """The next byte past any whitespace, not consumed; -1 at the end of the body."""
        while True:
            if self.pos >= len(self.buf) and not await self._more():
                return -1
            byte = self.buf[self.pos]
            if byte not in b" \t\n\r":
                return byte
            self.pos += 1

    async def expect(self, byte: int) -> None:
        if await self.peek() != byte:
            raise BadPayload(f"expected {chr(byte)!r}")
        self.pos += 1

    async def string(self, sink: Callable[[bytes], None]) -> None:
        """A string's content (its opening quote consumed), unescaped, to `sink` in pieces."""
        while True:
            if self.pos >= len(self.buf) and not await self._more():
                raise BadPayload("unexpected end of JSON input in a string")
            stop = _STRING_STOP.search(self.buf, self.pos)
            end = len(self.buf) if stop is None else stop.start()
            if end > self.pos:
                sink(self.buf[self.pos : end])
                self.pos = end
            if stop is None:
                continue
            byte = self.buf[end]
            if byte == 0x22:
                self.pos += 1
                return
            if byte < 0x20:
                raise BadPayload("invalid character in string literal")
            sink(await self._escape())

    async def _u4(self) -> int | None:
        """The code unit of a \\uXXXX at the position, or None if there is none."""
        if not await self._have(6) or self.buf[self.pos : self.pos + 2] != b"\\u":
            return None
        digits = self.buf[self.pos + 2 : self.pos + 6]
        return int(digits, 16) if _HEX4.fullmatch(digits) else None

    async def _escape(self) -> bytes:
        if not await self._have(2):
            raise BadPayload("unexpected end of JSON input in an escape")
        simple = _SIMPLE_ESCAPES.get(self.buf[self.pos + 1])
        if simple is not None:
            self.pos += 2
            return simple
        unit = await self._u4()
        if unit is None:
            raise BadPayload("invalid escape in string literal")
        self.pos += 6
        if not 0xD800 <= unit < 0xE000:
            return chr(unit).encode()
        # A surrogate: a pair with the next escape if that is its low half, else U+FFFD (as Go).
        low = await self._u4() if unit < 0xDC00 else None
        if low is not None and 0xDC00 <= low < 0xE000:
            self.pos += 6
            return chr(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)).encode()
        return _REPLACEMENT

    async def text(self) -> str:
        parts: list[bytes] = []
        await self.string(parts.append)
        return b"".join(parts).decode("utf-8", "replace")  # as Go, invalid UTF-8 becomes U+FFFD

    async def value(self, depth: int = 0) -> Any:
        if depth > _MAX_DEPTH:
            raise BadPayload("exceeded max depth")
        byte = await self.peek()
        if byte == 0x22:
            self.pos += 1
            return await self.text()
        if byte == ord("{"):
            self.pos += 1
            out: dict[str, Any] = {}
            if await self.peek() == ord("}"):
                self.pos += 1
                return out
            while True:
                await self.expect(0x22)
                key = await self.text()
                await self.expect(ord(":"))
                out[key] = await self.value(depth + 1)
                if await self.closes(ord("}")):
                    return out
        if byte == ord("["):
            self.pos += 1
            items: list[Any] = []
            if await self.peek() == ord("]"):
                self.pos += 1
                return items
            while True:
                items.append(await self.value(depth + 1))
                if await self.closes(ord("]")):
                    return items
        for literal, meaning in ((b"true", True), (b"false", False), (b"null", None)):
            if byte == literal[0]:
                if (
                    not await self._have(len(literal))
                    or self.buf[self.pos : self.pos + len(literal)] != literal
                ):
                    raise BadPayload("invalid literal")
                self.pos += len(literal)
                return meaning
        if byte in _NUMBER_CHARS:
            number = bytearray()
            while (self.pos < len(self.buf) or await self._more()) and self.buf[self.pos] in _NUMBER_CHARS:
                number.append(self.buf[self.pos])
                self.pos += 1
            if not _NUMBER.fullmatch(number):
                raise BadPayload("invalid number")
            return orjson.loads(bytes(number))
        raise BadPayload("invalid character looking for beginning of value")

    async def closes(self, closing: int) -> bool:
        byte = await self.peek()
        self.pos += 1
        if byte == closing:
            return True
        if byte != ord(","):
            raise BadPayload("invalid character after a value")
        return False


@dataclass
class Payload:
    """A request struct as the handler sees it: the fields given (by Go field name, typed), and
    the media field's data URL as decoded while it streamed in."""

    fields: dict[str, Any]
    media: MediaValue | None = None

    def text(self, name: str) -> str:
        value = self.fields.get(name)
        return value if isinstance(value, str) else ""


def _typed(given: dict[str, Any], struct: dict[str, str]) -> dict[str, Any]:
    """What Unmarshal makes of the keys matching the struct's fields; a wrong type is its error."""
    out: dict[str, Any] = {}
    for name, go_type in struct.items():
        value = given.get(_fold(name))
        if value is None:  # absent, or null: the field keeps its zero value
            continue
        if go_type == _STRING and isinstance(value, str):
            out[name] = value
        elif (
            go_type == _STRINGS
            and isinstance(value, list)
            and all(v is None or isinstance(v, str) for v in value)
        ):
            out[name] = [v or "" for v in value]
        elif go_type == _STRUCT and isinstance(value, dict):
            out[name] = value
        elif go_type == _BYTES and isinstance(value, str):
            try:
                out[name] = binascii.a2b_base64(re.sub("[\r\n]", "", value), strict_mode=True)
            except binascii.Error as exc:
                raise BadPayload(f"illegal base64 data in {name}") from exc
        elif go_type == _JID and isinstance(value, str):
            try:
                out[name] = parse_jid(value)
            except ValueError as exc:
                raise BadPayload(str(exc)) from exc
        else:
            raise BadPayload(f"cannot unmarshal {type(value).__name__} into {name} of type {go_type}")
    return out


async def read_payload(
    chunks: AsyncIterator[bytes], struct: dict[str, str], media_field: str | None = None
) -> Payload:
    """A body as `json.NewDecoder(r.Body).Decode(&t)` reads it into a handler's struct, the
    string at `media_field` streamed into a MediaValue. Raises BadPayload as Decode errs: on a
    syntax error or an early end anywhere, or a type that does not fit (a top-level null is no
    error: the struct stays empty). What follows the object is not read, as Decode leaves it."""
    reader = _JsonReader(chunks)
    if await reader.peek() != ord("{"):
        # A syntax error, or a value of the wrong type: both refused; but null decodes to nothing.
        if await reader.value() is None:
            return Payload({})
        raise BadPayload("cannot unmarshal a non-object into the request")
    reader.pos += 1
    given: dict[str, Any] = {}
    media: MediaValue | None = None
    wanted = _fold(media_field) if media_field else None
    if await reader.peek() == ord("}"):
        reader.pos += 1
    else:
        while True:
            await reader.expect(0x22)
            key = _fold(await reader.text())
            await reader.expect(ord(":"))
            if key == wanted and await reader.peek() == 0x22:
                reader.pos += 1
                media = MediaValue()
                await reader.string(media.feed)
                media.finish()
                given.pop(key, None)
            else:
                value = await reader.value(1)
                if value is not None:  # null leaves a field as it was, even a value given before
                    given[key] = value
                    if key == wanted:
                        media = None
            if await reader.closes(ord("}")):
                break
    return Payload(_typed(given, struct), media)


def _context_problem(context: dict[str, Any] | None) -> str | None:
    """validateMessageFields: a quoted message names both its StanzaID and its Participant."""
    if context is None:
        return None
    stanza, participant = context.get("StanzaID"), context.get("Participant")
    if stanza is not None and participant is None:
        return "Missing Participant in ContextInfo"
    if participant is not None and stanza is None:
        return "Missing StanzaID in ContextInfo"
    return None


@dataclass
class Faults:
    error_rate: float = 0.0
    error_status: int = 500
    latency_ms: float = 0.0
    hang: bool = False
    down: bool = False
    session_lost: bool = False
    retry_after_s: float | None = None
    # phone -> status to answer for sends to it (e.g. 400 for a number WUZAPI refuses).
    fail_phones: dict[str, int] = field(default_factory=dict)


@dataclass
class Delivery:
    id: str
    path: str
    phone: str  # as first sent
    body: str | None  # Body, Caption or FileName of the first send
    accepted: int  # new messages under this id: one per chat it reached (1 unless an id is reused)
    requests: int  # sends of this id the gateway accepted, resends of the same message included
    first_at: float
    chats: list[str] = field(default_factory=list)  # the chats it reached, in order
    # What the first send carried: text, image, audio, video, document or sticker; for a file,
    # the type WhatsApp was told (sniffed from the bytes, or the voice note's), the type its data
    # URL declared, and the decoded file's size and SHA-256.
    kind: str = "text"
    mime_type: str | None = None
    declared_type: str | None = None
    size: int | None = None
    sha256: str | None = None


@dataclass
class Content:
    """One (phone, body) and the ids it was delivered under: more than one is a double message."""

    phone: str
    path: str
    body: str | None
    media: str | None  # the SHA-256 of the file sent, if any
    ids: list[str] = field(default_factory=list)


@dataclass
class Read:
    """A read receipt markread sent: to `chat` (a JID as whatsmeow writes it), for `ids`."""

    chat: str
    sender: str
    ids: list[str]
    at: float


_Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


class Dropped(Exception):
    """The call is dropped without an answer (its connection reset) and delivers nothing."""


def chat_of(phone: str) -> str:
    """The chat a Phone names, as WUZAPI's parseJID reads it: a leading + is dropped and a bare
    number is a user on the WhatsApp server."""
    phone = phone.removeprefix("+")
    return phone.removesuffix(WHATSAPP_SERVER) if phone.endswith(WHATSAPP_SERVER) else phone


class WuzapiSimulator:
    def __init__(
        self, *, tokens: Iterable[str] = (), any_token: bool = False, seed: int | None = None
    ) -> None:
        self.faults = Faults()
        # The gateway's users; with any_token, every non-empty token is one.
        self.tokens: set[str] = {t for t in tokens if t}
        self.any_token = any_token
        self.deliveries: dict[str, Delivery] = {}
        self.contents: dict[tuple[str, str, str | None, str | None], Content] = {}
        self.reads: list[Read] = []
        self.requests = 0
        self.errors = 0
        self.resends = 0
        self.random = random.Random(seed)
        self.site: web.TCPSite | None = None
        self.runner: web.AppRunner | None = None
        self._down_task: asyncio.Task[None] | None = None
        self._port = 0
        # A call that waits (latency, hang) wakes on every change of faults, a reset or the stop.
        self._changed = asyncio.Event()
        # Bumped by a reset: a call begun before it is dropped instead of delivered into the new ledger.
        self._epoch = 0
        self._stopping = False

    # The WUZAPI contract ---------------------------------------------------------------------

    def _reply(self, code: int, body: dict[str, Any]) -> web.Response:
        # As Go's json.Encoder writes a map: keys sorted, a newline after.
        payload = orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
        return web.Response(body=payload, status=code, content_type="application/json")

    def _error(self, code: int, message: str, *, retry_after: float | None = None) -> web.Response:
        self.errors += 1
        response = self._reply(code, error_envelope(code, message))
        if retry_after is not None:
            response.headers["Retry-After"] = str(int(retry_after) if retry_after >= 1 else retry_after)
        return response

    def _drop(self, request: web.Request, why: str) -> NoReturn:
        # Reset the connection: to the client it is a gateway that is not there (or went away).
        if request.transport is not None:
            request.transport.abort()
        log.info("wuzapi_sim.dropped", path=request.path, why=why)
        raise Dropped(why)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _live(self, epoch: int) -> bool:
        return not self._stopping and epoch == self._epoch

    def authorized(self, request: web.Request) -> bool:
        # authalice: the Token header, else the token query parameter(s); no user for it: 401.
        token = request.headers.get(TOKEN_HEADER) or "".join(request.query.getall("token", []))
        return token in self.tokens or (self.any_token and bool(token))

    def _refused(self, request: web.Request) -> web.Response | None:
        """What every gateway call meets first: a reset connection (`down`), auth, the session."""
        self.requests += 1
        if self.faults.down:
            self._drop(request, "down")
        if not self.authorized(request):
            return self._error(401, UNAUTHORIZED)
        if self.faults.session_lost:
            return self._error(500, NO_SESSION)
        return None

    async def _round_trip(self, request: web.Request, epoch: int) -> None:
        """The WhatsApp part of a call: `latency_ms` long, held while `hang` is on. Raises Dropped
        when the simulator is reset or stopped meanwhile."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.faults.latency_ms / 1000
        while self._live(epoch):
            left = until - loop.time()
            if not self.faults.hang and left <= 0:
                return
            changed = self._changed
            try:
                async with asyncio.timeout(None if self.faults.hang else left):
                    await changed.wait()
            except TimeoutError:
                pass
        self._drop(request, "stopped" if self._stopping else "reset")

    def _erratic(self, failure: str) -> web.Response | None:
        faults = self.faults
        if faults.error_rate and self.random.random() < faults.error_rate:
            status = faults.error_status
            message = failure if status >= 500 else "simulated"
            return self._error(status, message, retry_after=faults.retry_after_s if status == 429 else None)
        return None

    async def _payload(self, request: web.Request, media_field: str | None = None) -> Payload | web.Response:
        """The body as the handler's json.Decoder reads it, as it arrives; else the 400."""
        try:
            return await read_payload(request.content.iter_any(), _STRUCTS[request.path], media_field)
        except BadPayload:
            return self._error(400, UNDECODABLE_PAYLOAD)

    async def _guarded(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request, self._epoch)
        except Dropped:
            # The connection is reset already: nothing can be answered on it.
            raise asyncio.CancelledError from None

    async def send(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._send)

    async def _send(self, request: web.Request, epoch: int) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        path = request.path
        endpoint = MEDIA_ENDPOINTS.get(path)
        payload = await self._payload(request, endpoint.field if endpoint else None)
        if isinstance(payload, web.Response):
            return payload
        # The handler's checks, in its order (handlers.go).
        phone = payload.text("Phone")
        if not phone:
            return self._error(400, missing("Phone"))
        media = payload.media
        if endpoint is None:
            if not payload.text("Body"):
                return self._error(400, missing("Body"))
        elif media is None or media.length == 0:
            return self._error(400, missing(endpoint.field))
        if path == SEND_DOCUMENT and not payload.text("FileName"):
            return self._error(400, missing("FileName"))
        if not phone_parses(phone):
            return self._error(400, UNPARSABLE_PHONE)
        context = _context_problem(payload.fields.get("ContextInfo"))
        if context is not None:
            return self._error(400, context)
        forced = self.faults.fail_phones.get(phone)
        if forced is not None:
            message = {401: UNAUTHORIZED, 400: UNPARSABLE_PHONE}.get(forced, "simulated")
            return self._error(forced, message if forced < 500 else "Error sending message: simulated")
        message_id = payload.text("Id") or f"{self.random.getrandbits(128):032X}"
        if endpoint is not None and media is not None:
            refusal = self._media_refusal(request, endpoint, media)
            if refusal is not None:
                return refusal
        await self._round_trip(request, epoch)
        if path == SEND_IMAGE and media is not None and not media.head512.startswith(THUMBNAIL_MAGIC):
            # Uploaded already, then image.Decode fails: nothing is sent.
            return self._error(500, THUMBNAIL_FAILED)
        erratic = self._erratic("Error sending message: simulated failure")
        if erratic is not None:
            return erratic
        # Sent with context.Background(): delivered even if the caller gave up meanwhile.
        self._accept(message_id, path, phone, payload)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return self._reply(200, ok_envelope({"Details": "Sent", "Id": message_id, "Timestamp": now}))

    def _media_refusal(
        self, request: web.Request, endpoint: MediaEndpoint, media: MediaValue
    ) -> web.Response | None:
        if media.length < len(endpoint.required_prefix):
            # `t.Document[0:29]` on a shorter string panics; net/http closes the connection.
            self._drop(request, "panic: slice bounds out of range")
        if not media.start.startswith(endpoint.required_prefix.encode()):
            return self._error(400, endpoint.refusal)
        if media.error is not None:
            log.info("wuzapi_sim.undecodable_media", path=request.path, why=media.error)
            return self._error(400, UNDECODABLE_MEDIA)
        return None

    def _accept(self, message_id: str, path: str, phone: str, payload: Payload) -> None:
        chat = chat_of(phone)
        raw_body = payload.text("Body") or payload.text("Caption") or payload.text("FileName")
        body = raw_body or None
        media = payload.media
        digest = media.sha256 if media is not None else None
        delivery = self.deliveries.get(message_id)
        if delivery is None:
            delivery = Delivery(message_id, path, phone, body, 0, 0, time.time(), kind=_KINDS[path])
            if media is not None:
                delivery.mime_type = (
                    VOICE_NOTE_TYPE if path == SEND_AUDIO else detect_content_type(media.head512)
                )
                delivery.declared_type = media.declared_type
                delivery.size, delivery.sha256 = media.size, digest
            self.deliveries[message_id] = delivery
        delivery.requests += 1
        if chat in delivery.chats:
            # The same id to the same chat is the same WhatsApp message: the recipient has it once.
            self.resends += 1
            log.info("wuzapi_sim.resend", id=message_id, requests=delivery.requests)
            if (path, body, digest) != (delivery.path, delivery.body, delivery.sha256):
                log.warning("wuzapi_sim.resend_differs", id=message_id, path=path)
            return
        delivery.chats.append(chat)
        delivery.accepted += 1
        if delivery.accepted > 1:
            log.warning("wuzapi_sim.id_reused", id=message_id, chats=delivery.chats)
        content = self.contents.setdefault((chat, path, body, digest), Content(chat, path, body, digest))
        content.ids.append(message_id)
        if len(content.ids) > 1:
            log.warning("wuzapi_sim.double_message", phone=chat, ids=content.ids)

    async def markread(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._markread)

    async def _markread(self, request: web.Request, epoch: int) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        payload = await self._payload(request)
        if isinstance(payload, web.Response):
            return payload
        # MarkRead checks Chat (a types.JID: a bare number parses as a server) before Id.
        chat: Jid | None = payload.fields.get("Chat")
        if chat is None or str(chat) == "":
            return self._error(400, missing("Chat"))
        ids: list[str] = payload.fields.get("Id") or []
        if not ids:
            return self._error(400, missing("Id"))
        await self._round_trip(request, epoch)
        erratic = self._erratic("Failure marking messages as read")
        if erratic is not None:
            return erratic
        sender: Jid | None = payload.fields.get("Sender")
        if not chat.user:
            log.warning("wuzapi_sim.receipt_to_no_user", chat=str(chat))
        self.reads.append(Read(str(chat), str(sender) if sender else "", ids, time.time()))
        return self._reply(200, ok_envelope({"Details": "Message(s) marked as read"}))

    async def status(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._status)

    async def _status(self, request: web.Request, epoch: int) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        await self._round_trip(request, epoch)
        return self._reply(200, ok_envelope({"Connected": True, "LoggedIn": True}))

    # Control ---------------------------------------------------------------------------------

    async def get_faults(self, _: web.Request) -> web.Response:
        return self._reply(200, asdict(self.faults))

    async def put_faults(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            down_for = changes.pop("down_for_s", None)
            self.faults = Faults(**{**asdict(self.faults), **changes})
        except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
            return self._reply(400, {"error": "bad_faults", "detail": str(exc)})
        log.info("wuzapi_sim.faults", **asdict(self.faults), down_for_s=down_for)
        self._notify()  # a hang cleared lets its calls go on
        if down_for:
            self._down_task = asyncio.create_task(self._close_for(float(down_for)))
        return self._reply(200, asdict(self.faults))

    async def _close_for(self, seconds: float) -> None:
        """Stop listening for `seconds`: connections are refused, as with a gateway that is down."""
        assert self.site is not None and self.runner is not None
        port = self.port
        # New connections are refused; kept-alive ones are reset on their next request.
        self.faults.down = True
        await self.site.stop()
        await asyncio.sleep(seconds)
        self.faults.down = False
        self.site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True)
        await self.site.start()
        log.info("wuzapi_sim.back_up", port=port)

    async def reset(self, _: web.Request) -> web.Response:
        self.faults = Faults()
        self.deliveries.clear()
        self.contents.clear()
        self.reads.clear()
        self.requests = self.errors = self.resends = 0
        self._epoch += 1  # calls still waiting are dropped, not delivered into the new ledger
        self._notify()
        return self._reply(200, {"status": "reset"})

    def ledger_view(self) -> dict[str, Any]:
        contents = [{**asdict(c), "delivered": len(c.ids)} for c in self.contents.values()]
        duplicates: list[dict[str, Any]] = [
            {"kind": "id", "id": d.id, "accepted": d.accepted, "chats": d.chats}
            for d in self.deliveries.values()
            if d.accepted > 1
        ]
        duplicates += [{"kind": "content", **c} for c in contents if c["delivered"] > 1]
        return {
            "requests": self.requests,
            "errors": self.errors,
            "delivered": sum(d.accepted for d in self.deliveries.values()),
            "resends": self.resends,
            "deliveries": {k: asdict(v) for k, v in self.deliveries.items()},
            "contents": contents,
            "duplicates": duplicates,
            "reads": [asdict(r) for r in self.reads],
        }

    async def ledger(self, _: web.Request) -> web.Response:
        return self._reply(200, self.ledger_view())

    async def health(self, _: web.Request) -> web.Response:
        return self._reply(200, {"status": "ok"})

    async def _on_shutdown(self, _: web.Application) -> None:
        # However the runner is cleaned up, calls held by a hang or latency end now.
        self._stopping = True
        self._notify()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(SEND_TEXT, self.send)
        for path in MEDIA_ENDPOINTS:
            app.router.add_post(path, self.send)
        app.router.add_post(MARK_READ, self.markread)
        app.router.add_get(SESSION_STATUS, self.status)
        app.router.add_get("/_sim/faults", self.get_faults)
        app.router.add_put("/_sim/faults", self.put_faults)
        app.router.add_post("/_sim/reset", self.reset)
        app.router.add_get("/_sim/ledger", self.ledger)
        app.router.add_get("/health", self.health)
        app.on_shutdown.append(self._on_shutdown)
        return app

    @property
    def port(self) -> int:
        return self._port

    async def start(self, host: str, port: int) -> None:
        self.runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await self.site.start()
        server = self.runner.server and self.runner.addresses
        self._port = int(server[0][1]) if server else port
        log.info(
            "wuzapi_sim.started",
            url=f"http://{host}:{self.port}",
            users=len(self.tokens),
            any_token=self.any_token,
        )

    async def stop(self) -> None:
        self._stopping = True
        self._notify()
        if self._down_task is not None:
            self._down_task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()


async def serve(
    host: str,
    port: int,
    tokens: Iterable[str] = (),
    *,
    any_token: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the simulator until `stop` is set (or the task is cancelled)."""
    sim = WuzapiSimulator(tokens=tokens, any_token=any_token)
    await sim.start(host, port)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await sim.stop()
