"""What a message's files are, and what a Graph API refusal means (processors/rows.py,
processors/media.py): the rules the media agent acts on."""

from __future__ import annotations

import base64
import hashlib

import orjson
import pytest

from processors.media import MediaPermanent, MediaTransient, graph_failure
from processors.rows import messaging_media, whatsapp_media

DIGEST = hashlib.sha256(b"voice note").digest()


def test_a_whatsapp_voice_note_is_a_file_to_fetch_with_its_hash_in_hex() -> None:
    message = {
        "id": "wamid.1",
        "type": "audio",
        "audio": {
            "id": "1203",
            "mime_type": "audio/ogg; codecs=opus",
            "sha256": base64.b64encode(DIGEST).decode(),
            "voice": True,
        },
    }
    (part,) = whatsapp_media(message)
    assert (part.source, part.ref, part.kind, part.sha256) == ("whatsapp", "1203", "voice", DIGEST.hex())


def test_a_document_keeps_its_name_and_caption() -> None:
    message = {"type": "document", "document": {"id": "9", "filename": "invoice.pdf", "caption": "March"}}
    (part,) = whatsapp_media(message)
    assert (part.kind, part.file_name, part.caption, part.sha256) == (
        "document",
        "invoice.pdf",
        "March",
        None,
    )


@pytest.mark.parametrize(
    "message",
    [
        {"type": "text", "text": {"body": "hi"}},
        {"type": "image", "image": {"caption": "no id"}},
        {"type": "image", "image": "not an object"},
        {"type": "location", "location": {"id": "1"}},
    ],
)
def test_a_message_without_a_media_id_has_no_file(message: dict[str, object]) -> None:
    assert whatsapp_media(message) == ()


def test_messenger_attachments_with_a_url_are_files_in_their_order() -> None:
    message = {
        "mid": "m.1",
        "attachments": [
            {"type": "image", "payload": {"url": "https://cdn.example/a.jpg"}},
            {"type": "template", "payload": {"url": "https://cdn.example/t"}},
            {"type": "file", "payload": {"url": "https://cdn.example/b.pdf", "title": "b.pdf"}},
            {"type": "video", "payload": {"url": "javascript:alert(1)"}},
        ],
    }
    parts = messaging_media("instagram", message)
    assert [(p.position, p.kind, p.ref, p.file_name) for p in parts] == [
        (0, "image", "https://cdn.example/a.jpg", None),
        (2, "file", "https://cdn.example/b.pdf", "b.pdf"),
    ]
    assert {p.source for p in parts} == {"instagram"}


def _error(code: int, status: int = 400) -> tuple[int, bytes]:
    return status, orjson.dumps({"error": {"message": "m", "type": "T", "code": code, "fbtrace_id": "x"}})


@pytest.mark.parametrize(
    ("status", "body", "kind", "reason"),
    [
        (*_error(100), MediaPermanent, "media_not_found"),
        (*_error(190, 401), MediaPermanent, "token_refused"),
        (*_error(10, 403), MediaPermanent, "permission_denied"),
        (*_error(4), MediaTransient, "rate_limited"),
        (*_error(80007), MediaTransient, "rate_limited"),
        (*_error(2, 500), MediaTransient, "graph_unavailable"),
        (*_error(1), MediaTransient, "graph_unavailable"),
        (503, b"<html>Service Unavailable</html>", MediaTransient, "graph_unavailable"),
        (429, b"", MediaTransient, "rate_limited"),
        (404, b"", MediaPermanent, "media_not_found"),
    ],
)
def test_a_graph_api_error_is_an_outage_or_a_verdict_by_its_code(
    status: int, body: bytes, kind: type, reason: str
) -> None:
    failure = graph_failure(status, body)
    assert isinstance(failure, kind)
    assert failure.reason == reason
