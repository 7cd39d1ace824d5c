"""Records on `meta.media`: one media of one message to fetch and store, and the shapes shared
by whoever fetches, stores and serves media.

A job names its `media` row (`media_id`, a uuid): the webhook writer makes the row pending in the
transaction that makes the message, and puts the job on the topic after the commit (and again on
a redelivery while the row is still pending). The media agent fetches it and marks the row; a job
whose row is already stored is done, so a redelivery or a replay stores nothing twice.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

MEDIA_VERSION = 1

MediaSource = Literal["whatsapp", "messenger", "instagram"]
MediaState = Literal["pending", "stored", "failed", "expired"]

# WhatsApp's media message types, and Messenger's / Instagram's attachment types.
WHATSAPP_MEDIA_KINDS = frozenset(("image", "audio", "video", "document", "sticker"))
MESSAGING_MEDIA_KINDS = frozenset(("image", "audio", "video", "file"))

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def sha256_hex(value: Any) -> str | None:
    """A SHA-256 as Meta gives it (hex in the Graph API's lookup, base64 in webhooks) as lower-case
    hex; None for anything that is not one (left unchecked rather than refused)."""
    if not isinstance(value, str) or not value:
        return None
    if _HEX64.match(value):
        return value.lower()
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return None
    return raw.hex() if len(raw) == 32 else None


class MediaRecordError(ValueError):
    """A media record that does not decode into its schema."""


@dataclass(frozen=True, slots=True)
class MediaJob:
    media_id: str  # the `media` row (uuid)
    tenant: str
    company_id: int
    message_external_id: str
    source: MediaSource
    ref: str  # the Graph API media id (WhatsApp) or the attachment's URL (Messenger, Instagram)
    kind: str
    sent_at_ms: int  # when the customer sent it: media ids and URLs expire from then
    mime_type: str | None = None
    expected_sha256: str | None = None  # hex
    file_name: str | None = None
    v: int = MEDIA_VERSION

    @property
    def key(self) -> bytes:
        # Spread over partitions: fetches need no order among themselves.
        return f"{self.tenant}:{self.media_id}".encode()

    def to_bytes(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_bytes(cls, raw: bytes) -> MediaJob:
        try:
            doc: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MediaRecordError(f"not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("v") != MEDIA_VERSION:
            raise MediaRecordError("unsupported media record version")
        try:
            job = cls(**doc)
        except TypeError as exc:
            raise MediaRecordError(f"malformed media record: {exc}") from exc
        if job.source not in ("whatsapp", "messenger", "instagram") or not job.ref or not job.media_id:
            raise MediaRecordError("media record names no media")
        return job
