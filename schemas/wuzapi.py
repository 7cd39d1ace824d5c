"""WUZAPI's HTTP contract, the part Cortexx uses (asternic/wuzapi API.md and handlers.go).

Every reply is an envelope (`Respond` in handlers.go): `{"code": 200, "data": {...}, "success":
true}` on success, `{"code": N, "error": "...", "success": false}` on failure, written by Go's
json encoder (keys sorted, a newline after). Requests carry the user's token in the `Token` header
(or a `token` query parameter) and JSON bodies with capitalised keys. A token that is not a user,
or none, is refused by the auth middleware before any handler: 401 `Unauthorized`.

Files go inside the JSON body as RFC 2397 data URLs, base64 (vincent-petithory/dataurl's
DecodeString, which takes base64.StdEncoding: padded, newlines ignored): the gateway takes no URL
to download. Each media handler compares the value's first bytes with a fixed prefix (a value
shorter than that prefix panics the handler, and Go drops the connection unanswered), decodes
it, uploads the file to WhatsApp and sends the message under `Id`; a send answers
`{"Details": "Sent", "Id": ..., "Timestamp": ...}` as text does.
"""

from __future__ import annotations

import binascii
import mimetypes
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

TOKEN_HEADER = "Token"

SEND_TEXT = "/chat/send/text"
SEND_IMAGE = "/chat/send/image"
SEND_AUDIO = "/chat/send/audio"
SEND_VIDEO = "/chat/send/video"
SEND_DOCUMENT = "/chat/send/document"
SEND_STICKER = "/chat/send/sticker"
MARK_READ = "/chat/markread"
SESSION_STATUS = "/session/status"

# The gateway's own error texts (handlers.go), for what Cortexx can meet.
UNAUTHORIZED = "Unauthorized"  # authalice: the token is no user (401)
NO_SESSION = "No session"  # the user has no WhatsApp client (500)
UNDECODABLE_PAYLOAD = "Could not decode Payload"  # json.Decoder refused the body (400)
UNPARSABLE_PHONE = "Could not parse Phone"  # validateMessageFields (400)
UNDECODABLE_MEDIA = "Could not decode base64 encoded data from payload"  # dataurl.DecodeString (400)

WHATSAPP_SERVER = "s.whatsapp.net"  # whatsmeow's types.DefaultUserServer


def missing(field: str) -> str:
    """The 400 a handler answers when a required field is empty or absent."""
    return f"Missing {field} in Payload"


MediaKind = Literal["image", "audio", "video", "document", "sticker"]


@dataclass(frozen=True, slots=True)
class MediaEndpoint:
    """One media handler: the JSON field the data URL goes in, what the value must start with
    (handlers.go compares `t.<Field>[0:len(prefix)]`) and the 400 it answers otherwise."""

    kind: MediaKind
    path: str
    field: str
    required_prefix: str
    refusal: str


_ANY_DATA = 'Data should start with "data:mime/type;base64,"'
MEDIA_ENDPOINTS: dict[str, MediaEndpoint] = {
    e.path: e
    for e in (
        # SendImage: `t.Image[0:10] == "data:image"`; its refusal names png, it takes any image/*.
        MediaEndpoint(
            "image",
            SEND_IMAGE,
            "Image",
            "data:image",
            'Image data should start with "data:image/png;base64,"',
        ),
        # SendAudio: `t.Audio[0:14] == "data:audio/ogg"`; sent as a voice note (PTT), its mime type
        # fixed to "audio/ogg; codecs=opus" whatever the file is.
        MediaEndpoint(
            "audio",
            SEND_AUDIO,
            "Audio",
            "data:audio/ogg",
            'Audio data should start with "data:audio/ogg;base64,"',
        ),
        # SendVideo and SendSticker: `[0:4] == "data"`, any type.
        MediaEndpoint("video", SEND_VIDEO, "Video", "data", _ANY_DATA),
        MediaEndpoint("sticker", SEND_STICKER, "Sticker", "data", _ANY_DATA),
        # SendDocument: `t.Document[0:29] == "data:application/octet-stream"`, whatever the file:
        # WhatsApp is told the type http.DetectContentType sniffs from the bytes.
        MediaEndpoint(
            "document",
            SEND_DOCUMENT,
            "Document",
            "data:application/octet-stream",
            'Document data should start with "data:application/octet-stream;base64,"',
        ),
    )
}
MEDIA_BY_KIND: dict[str, MediaEndpoint] = {e.kind: e for e in MEDIA_ENDPOINTS.values()}

# SendImage makes a thumbnail with Go's image.Decode, which knows the formats linked into the
# binary: JPEG (handlers.go imports image/jpeg) and PNG (go-qrcode imports image/png). Any other
# image fails with a 500 after the upload, so it goes as a document.
IMAGE_TYPES = {"image/jpeg": "image/jpeg", "image/jpg": "image/jpeg", "image/png": "image/png"}
# SendImage's 500 when image.Decode refuses the bytes (a corrupt or mislabelled file), after its
# upload to WhatsApp and before any message is sent: the same file can go as a document.
THUMBNAIL_FAILED = "Could not decode image for thumbnail preparation"
# What WhatsApp plays as a video message (the gateway itself takes any "data..." value).
VIDEO_TYPES = frozenset({"video/mp4", "video/3gpp"})
# A voice note is Ogg Opus: the gateway labels every audio it sends so.
AUDIO_TYPES = frozenset({"audio/ogg"})

_EXTENSIONS = mimetypes.MimeTypes(filenames=())  # Python's own table: the same on every host


@dataclass(frozen=True, slots=True)
class MediaRoute:
    """How one attachment is sent: the endpoint, and the data URL's start (its base64 follows)."""

    endpoint: MediaEndpoint
    prefix: str

    @property
    def kind(self) -> MediaKind:
        return self.endpoint.kind

    @property
    def path(self) -> str:
        return self.endpoint.path

    @property
    def field(self) -> str:
        return self.endpoint.field


def _base_type(mime_type: str | None) -> str:
    return (mime_type or "").split(";", 1)[0].strip().lower()


def media_route(kind: str, mime_type: str | None) -> MediaRoute:
    """The one rule for what an attachment of `kind` and `mime_type` is sent as: an image as
    `data:image/jpeg|png;base64,`, a voice note as `data:audio/ogg;base64,`, a video as
    `data:video/mp4|3gpp;base64,`; anything the gateway or WhatsApp could not send as that kind
    (a GIF, an MP3, a WebM, no type at all) goes as a document, which takes any file under
    `data:application/octet-stream;base64,`."""
    base = _base_type(mime_type)
    if kind == "image" and base in IMAGE_TYPES:
        return MediaRoute(MEDIA_BY_KIND["image"], f"data:{IMAGE_TYPES[base]};base64,")
    if kind == "audio" and base in AUDIO_TYPES:
        return MediaRoute(MEDIA_BY_KIND["audio"], "data:audio/ogg;base64,")
    if kind == "video" and base in VIDEO_TYPES:
        return MediaRoute(MEDIA_BY_KIND["video"], f"data:{base};base64,")
    return MediaRoute(MEDIA_BY_KIND["document"], "data:application/octet-stream;base64,")


def default_filename(mime_type: str | None) -> str:
    """A document needs a FileName (the recipient's phone opens it by its extension); without
    the sender's: "document" and the type's extension."""
    return "document" + (_EXTENSIONS.guess_extension(_base_type(mime_type)) or "")


def ok_envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {"code": 200, "data": data, "success": True}


def error_envelope(code: int, error: str) -> dict[str, Any]:
    return {"code": code, "error": error, "success": False}


def text_request(phone: str, body: str, message_id: str) -> dict[str, Any]:
    return {"Phone": phone, "Body": body, "Id": message_id}


# The media requests put the data URL last: a streamed body writes the small fields first.


def image_request(phone: str, image: str, caption: str | None, message_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"Phone": phone, "Id": message_id}
    if caption:
        out["Caption"] = caption
    out["Image"] = image
    return out


def audio_request(phone: str, audio: str, message_id: str) -> dict[str, Any]:
    # audioStruct has a Caption, but SendAudio never puts it in the message: not sent.
    return {"Phone": phone, "Id": message_id, "Audio": audio}


def video_request(phone: str, video: str, caption: str | None, message_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"Phone": phone, "Id": message_id}
    if caption:
        out["Caption"] = caption
    out["Video"] = video
    return out


def document_request(
    phone: str, document: str, filename: str, message_id: str, caption: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"Phone": phone, "Id": message_id, "FileName": filename}
    if caption:
        out["Caption"] = caption
    out["Document"] = document
    return out


def media_request(
    route: MediaRoute,
    phone: str,
    message_id: str,
    *,
    caption: str | None = None,
    filename: str | None = None,
    mime_type: str | None = None,
    data: bytes = b"",
) -> dict[str, Any]:
    """The request for `route`, its data URL holding `data` (by default none: only the prefix,
    which `streamed_json` then extends with the file's base64)."""
    url = route.prefix + binascii.b2a_base64(data, newline=False).decode()
    if route.kind == "image":
        return image_request(phone, url, caption, message_id)
    if route.kind == "audio":
        return audio_request(phone, url, message_id)
    if route.kind == "video":
        return video_request(phone, url, caption, message_id)
    name = filename or default_filename(mime_type)
    return document_request(phone, url, name, message_id, caption)


def _member(key: str, value: Any) -> bytes:
    return orjson.dumps(key) + b":" + orjson.dumps(value)


async def streamed_json(
    payload: Mapping[str, Any], field: str, chunks: AsyncIterable[bytes]
) -> AsyncGenerator[bytes, None]:
    """`orjson.dumps(payload)` with the base64 of `chunks` appended to the string at
    `payload[field]`, written a piece at a time: the file is never whole in memory. Each chunk's
    base64 is written as it comes; the 0-2 bytes that do not fill a 3-byte group wait for the
    next chunk, and the last group is padded. Base64's alphabet needs no JSON escape, so the
    pieces join to exactly what orjson writes for the whole payload."""
    keys = list(payload)
    if field not in payload or not isinstance(payload[field], str):
        raise ValueError(f"{field!r} is not a string of the payload")
    at = keys.index(field)
    members = [_member(k, payload[k]) for k in keys[:at]]
    opened = orjson.dumps(payload[field])[:-1]  # the string without its closing quote
    yield b"{" + b"".join(m + b"," for m in members) + orjson.dumps(field) + b":" + opened
    carry = b""
    async for chunk in chunks:
        if not chunk:
            continue
        data = carry + chunk if carry else bytes(chunk)
        whole = len(data) - len(data) % 3
        if whole:
            yield binascii.b2a_base64(memoryview(data)[:whole], newline=False)
        carry = data[whole:]
    rest = b"".join(b"," + _member(k, payload[k]) for k in keys[at + 1 :])
    yield (binascii.b2a_base64(carry, newline=False) if carry else b"") + b'"' + rest + b"}"


def user_jid(phone: str) -> str:
    """The JID of a phone's one-to-one chat as whatsmeow's ParseJID reads it: a bare number would
    parse as a server of that name, not as a user."""
    phone = phone.removeprefix("+")
    return phone if "@" in phone else f"{phone}@{WHATSAPP_SERVER}"


def markread_request(ids: list[str], chat_phone: str) -> dict[str, Any]:
    # MarkRead decodes Chat and Sender as types.JID (TextUnmarshaler, ParseJID); WhatsApp reads
    # Sender only in groups, and in a one-to-one chat the sender is the chat itself.
    jid = user_jid(chat_phone)
    return {"Id": ids, "Chat": jid, "Sender": jid}


def instance_name(token: str) -> str:
    """The name of a WUZAPI instance (its breaker, metrics, the console) that does not leak its
    token into logs and metrics: the worker and the read API must agree on it."""
    return f"wuzapi-{token[:4]}{'*' * 4}" if len(token) > 8 else "wuzapi-" + "*" * 4
