"""Media files: served to the company's own users, and attached to agents' replies.

`GET /api/v1/media/{id}` streams a stored file from the media store, with Range requests so audio
and video can seek. Another company's file is a 404, like an absent one. A customer's file is
never active content on the API's origin: only images and audio of a safe type are shown inline
(everything else is `Content-Disposition: attachment`), a type a browser would run (HTML, SVG,
XML, scripts) is sent as `application/octet-stream`, and every answer carries `nosniff` and a
sandboxing CSP.

`POST /api/v1/conversations/{id}/attachments` takes a file (multipart/form-data, at most
`CORTEXX_ATTACHMENT_MAX_BYTES`: 413 over it), stores it the same way and queues the reply on
`wuzapi.outbound` like a text reply (same idempotency id, same 202 and 503 answers). The caller
is authenticated before a byte of the body is read, so nobody without a session can make the API
spool a file (FastAPI would parse a form parameter's body before any dependency runs).

The database is used in short steps and no connection is held while bytes flow (a slow client
downloading a video must not hold a pool connection).
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from api.db import ScopedDb
from api.deps import Service, connection, current_user
from api.errors import ApiError, NotFound, error_response
from api.models import MessageOut
from api.queries import (
    ATTACHMENT_INSERT,
    ATTACHMENT_MEDIA_INSERT,
    MEDIA_FOR_SERVING,
    REPLY_BUMP_CONVERSATION,
    REPLY_EXISTING,
    REPLY_TARGET,
)
from api.routes.conversations import queue_reply, reply_refusal
from api.service import ApiService
from api.sessions import SessionUser
from infra.runtime.logging import get_logger
from infra.storage import MediaNotFound, StoreUnavailable
from schemas.outbound import OutboundMessage
from schemas.previews import clip
from schemas.wuzapi import media_route

log = get_logger("api.media")

router = APIRouter(tags=["media"])

# Shown inline (an <img> or <audio> needs no attachment either way; a tab opened on one of these
# cannot run anything).
INLINE_TYPES = frozenset(
    (
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/webp",
        "audio/ogg",
        "audio/mpeg",
        "audio/mp4",
        "audio/aac",
        "audio/amr",
        "audio/webm",
        "audio/wav",
    )
)
# Types a browser would render as a document and run scripts in: never sent under their name.
ACTIVE_TYPES = re.compile(
    r"^(text/html|application/xhtml\+xml|image/svg\+xml|text/xml|application/xml|.*\+xml|"
    r"text/javascript|application/javascript|application/ecmascript|text/ecmascript|multipart/.*)$"
)
_MIME = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}$")
SANDBOX_CSP = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; sandbox"
CHUNK = 256 * 1024

MediaId = Annotated[uuid.UUID, Path(description="The file's id, from a message's `media[].id`.")]
ConversationId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range (first, last, inclusive) a Range header asks of `size` bytes; None to
    send it whole (no header, a form this server does not serve, several ranges: RFC 9110 lets a
    server ignore Range). Raises RangeNotSatisfiable for a range wholly past the end."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first_s == "":
            suffix = int(last_s)  # bytes=-N: the last N bytes
            if suffix <= 0:
                raise RangeNotSatisfiable()
            return max(0, size - suffix), size - 1
        first = int(first_s)
        last = int(last_s) if last_s else size - 1
    except ValueError:
        return None
    if first >= size:
        raise RangeNotSatisfiable()
    if first < 0 or last < first:
        return None
    return first, min(last, size - 1)


def served_type(mime: str | None) -> str:
    mime = (mime or "").split(";")[0].strip().lower()
    if not _MIME.match(mime) or ACTIVE_TYPES.match(mime):
        return "application/octet-stream"
    return mime


def disposition(mime: str | None, file_name: str | None, kind: str) -> str:
    inline = (mime or "").split(";")[0].strip().lower() in INLINE_TYPES
    name = _safe_name(file_name) or kind
    fallback = name.encode("ascii", "replace").decode().replace("?", "_").replace('"', "_")
    return f"{'inline' if inline else 'attachment'}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"


def _safe_name(name: str | None) -> str:
    if not name:
        return ""
    name = re.sub(r"[\x00-\x1f\x7f/\\]", "_", name).strip(" .")
    return name[:200]


def _security_headers(headers: dict[str, str]) -> dict[str, str]:
    headers.update(
        {
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": SANDBOX_CSP,
            "Cross-Origin-Resource-Policy": "same-origin",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "private, max-age=3600",
        }
    )
    return headers


@router.api_route(
    "/api/v1/media/{media_id}",
    methods=["HEAD"],
    include_in_schema=False,  # a HEAD answer has no body: documented with the GET
)
@router.get(
    "/api/v1/media/{media_id}",
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file."},
        206: {"description": "The range asked for."},
        409: {"description": "Not stored yet (`media_pending`)."},
        410: {"description": "It could not be fetched, or was deleted after the retention period."},
        416: {"description": "The range is past the end of the file."},
    },
)
async def serve_media(media_id: MediaId, request: Request, response: Response, service: Service) -> Response:
    """The file's bytes, for the company's own users only; `Range: bytes=...` answers 206."""
    async with connection(service) as db:
        user = await current_user(request, response, db, service)
        row = await ScopedDb(db, user).fetchrow(MEDIA_FOR_SERVING, media_id)
    if row is None:
        raise NotFound("media")
    if row["state"] == "pending":
        raise ApiError(409, "media_pending", row["reason"] or "the file is being fetched; try again shortly")
    if row["state"] != "stored":
        raise ApiError(410, f"media_{row['state']}", row["reason"] or f"the file is {row['state']}")
    etag = f'"{row["sha256"]}"' if row["sha256"] else None
    headers = _security_headers(
        {
            "Accept-Ranges": "bytes",
            "Content-Disposition": disposition(row["mime_type"], row["file_name"], row["kind"]),
        }
    )
    for name, value in response.headers.items():  # the rolling session cookie
        if name.lower() == "set-cookie":
            headers.setdefault("Set-Cookie", value)
    if etag:
        headers["ETag"] = etag
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
    store = service.media_store
    size = int(row["size_bytes"] or 0)
    wanted: tuple[int, int] | None
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except RangeNotSatisfiable:
        headers["Content-Range"] = f"bytes */{size}"
        return error_response(416, "range_not_satisfiable", f"the file has {size} bytes", headers=headers)
    if wanted is not None and request.headers.get("if-range") not in (None, etag):
        wanted = None  # the client's copy is of another version: send the whole file
    media_type = served_type(row["mime_type"])
    if request.method == "HEAD":
        headers["Content-Length"] = str(size)
        return Response(status_code=200, headers=headers, media_type=media_type)
    try:
        if wanted is None:
            stored = await store.open(row["storage_key"])
        else:
            stored = await store.open(row["storage_key"], start=wanted[0], end=wanted[1])
    except MediaNotFound:
        log.error("media.object_missing", media_id=str(media_id), key=row["storage_key"])
        raise ApiError(410, "media_missing", "the file is no longer in the store") from None
    except StoreUnavailable as exc:
        log.warning("media.store_unavailable", media_id=str(media_id), error=repr(exc))
        raise ApiError(503, "store_unavailable", "the media store is unavailable; retry shortly") from None
    if wanted is None:
        headers["Content-Length"] = str(stored.size)
        code = 200
    else:
        headers["Content-Range"] = f"bytes {wanted[0]}-{wanted[1]}/{stored.size}"
        headers["Content-Length"] = str(wanted[1] - wanted[0] + 1)
        code = 206
    return StreamingResponse(stored.chunks(), status_code=code, headers=headers, media_type=media_type)


def attachment_kind(mime: str) -> str:
    """What WhatsApp (through WUZAPI) delivers a file as: an image, a voice note, a video, or, for
    anything else (a GIF, an MP3, an SVG, a PDF), a document (`schemas.wuzapi.media_route`)."""
    guess = "image" if mime.startswith("image/") else mime.split("/")[0]
    return media_route(guess, mime).kind


async def _spooled(upload: UploadFile) -> AsyncIterator[bytes]:
    await upload.seek(0)
    while chunk := await upload.read(CHUNK):
        yield chunk


class AttachmentFields(BaseModel):
    """The form's text fields, beside its `file`."""

    model_config = ConfigDict(extra="forbid")

    caption: str | None = Field(default=None, max_length=1024)
    id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")


# Documented by hand: the route reads its form itself, after the session is checked.
ATTACHMENT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The file to send."},
                        "caption": {"type": "string", "maxLength": 1024},
                        "id": {
                            "type": "string",
                            "pattern": "^[0-9a-f]{32}$",
                            "description": "The reply's idempotency id: a retry with it is the same reply.",
                        },
                    },
                }
            }
        },
    }
}


def _invalid(loc: str, kind: str, msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body", loc), "msg": msg, "input": None}])


async def attachment_form(request: Request) -> tuple[UploadFile, AttachmentFields]:
    """The form's file and fields, or 415/400/422; the file part is spooled (1 MB in memory, the
    rest on disk) and never more than the body limit lets in."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send the file as multipart/form-data")
    # Malformed multipart is a 400 from Starlette; two files or a flood of fields too.
    form = await request.form(max_files=1, max_fields=4)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise _invalid("file", "missing", "Field required: the file, as a file part named `file`")
        texts: dict[str, str] = {}
        for name, value in form.multi_items():
            if name == "file":
                continue
            if not isinstance(value, str):
                raise _invalid(name, "string_type", "a text field, not a file")
            texts[name] = value
        try:
            fields = AttachmentFields(**texts)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None
    except BaseException:
        await form.close()  # the spooled file, now rather than when collected
        raise
    return upload, fields


@router.post(
    "/api/v1/conversations/{conversation_id}/attachments",
    status_code=status.HTTP_202_ACCEPTED,
    tags=["conversations"],
    responses={
        413: {"description": "The file is over the limit (`attachment_too_large`)."},
        415: {"description": "The body is not multipart/form-data."},
    },
    openapi_extra=ATTACHMENT_BODY,
)
async def reply_with_attachment(
    conversation_id: ConversationId, request: Request, response: Response, service: Service
) -> MessageOut:
    """Send a file as a reply: stored, then queued like a text reply (202; retry with `id`)."""
    async with connection(service) as db:
        user = await current_user(request, response, db, service)
    file, fields = await attachment_form(request)
    try:
        return await _reply_with(conversation_id, service, user, file, fields.caption, fields.id)
    finally:
        await file.close()


async def _reply_with(
    conversation_id: int,
    service: ApiService,
    user: SessionUser,
    file: UploadFile,
    caption: str | None,
    id: str | None,
) -> MessageOut:
    settings = service.settings
    limit = settings.attachment_max_bytes
    if file.size is not None and file.size > limit:
        raise ApiError(413, "attachment_too_large", f"the file is over {limit:,} bytes")
    mime = (file.content_type or "").split(";")[0].strip().lower()
    mime = mime if _MIME.match(mime) else "application/octet-stream"
    kind = attachment_kind(mime)
    file_name = _safe_name(file.filename) or None
    media_id = uuid.uuid4()
    key = f"{user.company_id}/{media_id}"
    hasher = hashlib.sha256()
    size = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal size
        async for chunk in _spooled(file):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "attachment_too_large", f"the file is over {limit:,} bytes")
            hasher.update(chunk)
            yield chunk

    if file.size == 0:
        raise ApiError(422, "empty_attachment", "the file is empty")
    try:
        await service.media_store.put(key, counted(), content_type=mime)
    except StoreUnavailable as exc:
        log.warning("reply.store_unavailable", conversation_id=conversation_id, error=repr(exc))
        raise ApiError(503, "store_unavailable", "the media store is unavailable; retry shortly") from None
    if size == 0:
        raise ApiError(422, "empty_attachment", "the file is empty")
    outbound_id = id or uuid.uuid4().hex
    body = caption or file_name or f"[{kind}]"
    queue = True
    made = row = None
    async with connection(service) as db:
        scoped = ScopedDb(db, user)
        async with db.transaction():
            target = await scoped.fetchrow(REPLY_TARGET, conversation_id)
            problem = reply_refusal(target)
            if problem is None:
                content = {"origin": "agent", "user_id": user.id, "attachment": str(media_id)}
                made = await scoped.fetchrow(
                    ATTACHMENT_INSERT, conversation_id, outbound_id, kind, body, content
                )
                if made is not None:
                    await scoped.execute(
                        ATTACHMENT_MEDIA_INSERT,
                        media_id,
                        outbound_id,
                        kind,
                        mime,
                        file_name,
                        caption,
                        size,
                        hasher.hexdigest(),
                        key,
                    )
                    await scoped.execute(
                        REPLY_BUMP_CONVERSATION, conversation_id, made["id"], made["sent_at"], clip(body)
                    )
            row = await scoped.fetchrow(REPLY_EXISTING, outbound_id) if problem is None else None
    if problem is not None or made is None:
        await service.media_store.delete(key)  # a retry's second copy, or a refused reply's
    if problem is not None:
        raise problem
    if row is None or row["conversation_id"] != conversation_id:
        raise ApiError(409, "id_in_use", "that id belongs to another message")
    if made is None:
        queue = row["status"] == "pending"
        stored = row["media"][0] if row["media"] else None
        key = f"{user.company_id}/{stored['id']}" if stored else key
        if stored is None:
            raise ApiError(409, "id_in_use", "that id belongs to another message")
    if not queue:
        return MessageOut(**dict(row))
    assert target is not None
    record = OutboundMessage(
        id=outbound_id,
        tenant=target["slug"],
        company_id=user.company_id,
        conversation_id=conversation_id,
        to=target["phone_number"],
        kind=row["type"],
        origin="agent",
        created_at_ms=int(time.time() * 1000),
        caption=caption,
        filename=file_name,
        media_key=key,
        mime_type=mime,
        user_id=user.id,
    )
    await queue_reply(service, record)
    return MessageOut(**dict(row))
