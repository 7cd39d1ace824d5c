"""Opaque keyset cursors: where the next page starts, signed so a client cannot craft one.

A cursor is base64url(orjson payload) "." base64url(HMAC-SHA256). The payload names the list
it belongs to and the scope it was issued in (company, user, filter, conversation), so a cursor
of one list or company is refused (400) in another; and even a valid cursor only ever narrows
a query that is already scoped to the session user's company.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from api.errors import InvalidCursor

CURSOR_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_MAX_LEN = 512

# Before every row: where a first page starts.
START = (datetime(9999, 12, 31, tzinfo=UTC), 2**63 - 1)

Scope = tuple[str | int | None, ...]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Position:
    """The last row of a page: the next page holds what sorts after it (older)."""

    at: datetime
    id: int


class CursorCodec:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def encode(self, kind: str, scope: Scope, position: Position) -> str:
        micros = (position.at - _EPOCH) // _MICRO
        payload = orjson.dumps(
            {"v": CURSOR_VERSION, "k": kind, "s": list(scope), "t": micros, "i": position.id}
        )
        return f"{_b64(payload)}.{_b64(self._sign(payload))}"

    def decode(self, token: str, kind: str, scope: Scope) -> Position:
        """The position in `token`; InvalidCursor (a 400) unless we issued it for this very list."""
        if len(token) > _MAX_LEN or token.count(".") != 1:
            raise InvalidCursor("cursor is malformed")
        body, signature = token.split(".")
        try:
            payload = _unb64(body)
            given = _unb64(signature)
        except (binascii.Error, ValueError):
            raise InvalidCursor("cursor is malformed") from None
        if not hmac.compare_digest(given, self._sign(payload)):
            raise InvalidCursor("cursor signature does not match")
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise InvalidCursor("cursor is malformed") from None
        if not isinstance(doc, dict) or doc.get("v") != CURSOR_VERSION:
            raise InvalidCursor("cursor version is not supported")
        if doc.get("k") != kind or doc.get("s") != list(scope):
            raise InvalidCursor("cursor belongs to another list")
        micros, row_id = doc.get("t"), doc.get("i")
        if not isinstance(micros, int) or not isinstance(row_id, int):
            raise InvalidCursor("cursor is malformed")
        try:
            return Position(_EPOCH + micros * _MICRO, row_id)
        except OverflowError:
            raise InvalidCursor("cursor is malformed") from None
