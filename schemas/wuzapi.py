"""WUZAPI's HTTP contract, the part Cortexx uses (asternic/wuzapi API.md and handlers.go).

Every reply is an envelope (`Respond` in handlers.go): `{"code": 200, "data": {...}, "success":
true}` on success, `{"code": N, "error": "...", "success": false}` on failure, written by Go's
json encoder (keys sorted, a newline after). Requests carry the user's token in the `Token` header
(or a `token` query parameter) and JSON bodies with capitalised keys. A token that is not a user,
or none, is refused by the auth middleware before any handler: 401 `Unauthorized`.
"""

from __future__ import annotations

from typing import Any

TOKEN_HEADER = "Token"

SEND_TEXT = "/chat/send/text"
SEND_IMAGE = "/chat/send/image"
SEND_DOCUMENT = "/chat/send/document"
MARK_READ = "/chat/markread"
SESSION_STATUS = "/session/status"

# The gateway's own error texts (handlers.go), for what Cortexx can meet.
UNAUTHORIZED = "Unauthorized"  # authalice: the token is no user (401)
NO_SESSION = "No session"  # the user has no WhatsApp client (500)


def ok_envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {"code": 200, "data": data, "success": True}


def error_envelope(code: int, error: str) -> dict[str, Any]:
    return {"code": code, "error": error, "success": False}


def text_request(phone: str, body: str, message_id: str) -> dict[str, Any]:
    return {"Phone": phone, "Body": body, "Id": message_id}


def image_request(phone: str, image: str, caption: str | None, message_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {"Phone": phone, "Image": image, "Id": message_id}
    if caption:
        out["Caption"] = caption
    return out


def document_request(phone: str, document: str, filename: str, message_id: str) -> dict[str, Any]:
    return {"Phone": phone, "Document": document, "FileName": filename, "Id": message_id}


def markread_request(ids: list[str], chat_phone: str) -> dict[str, Any]:
    # In a one-to-one chat the sender of the messages we mark read is the chat itself.
    return {"Id": ids, "ChatPhone": chat_phone, "SenderPhone": chat_phone}


def instance_name(token: str) -> str:
    """The name of a WUZAPI instance (its breaker, metrics, the console) that does not leak its
    token into logs and metrics: the worker and the read API must agree on it."""
    return f"wuzapi-{token[:4]}{'*' * 4}" if len(token) > 8 else "wuzapi-" + "*" * 4
