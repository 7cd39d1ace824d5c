"""How the read API serves a customer's file: ranges, types, dispositions (api/routes/media.py)."""

from __future__ import annotations

import pytest

from api.routes.media import (
    RangeNotSatisfiable,
    attachment_kind,
    disposition,
    parse_range,
    served_type,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-99", (0, 99)),
        ("bytes=100-", (100, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),  # a suffix longer than the file is the whole file
        ("bytes=990-5000", (990, 999)),  # a last byte past the end is the end
        ("bytes=0-0", (0, 0)),
        ("bytes=0-1,5-6", None),  # several ranges: sent whole, as RFC 9110 allows
        ("items=0-1", None),
        ("bytes=abc", None),
        ("bytes=5-1", None),
    ],
)
def test_a_range_header_is_read_as_a_seeking_player_sends_it(
    header: str | None, expected: tuple[int, int] | None
) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_a_range_past_the_end_is_not_satisfiable(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 1000)


@pytest.mark.parametrize(
    "mime",
    [
        "text/html",
        "image/svg+xml",
        "application/xhtml+xml",
        "text/xml",
        "application/rss+xml",
        "text/javascript",
        "multipart/related",
        "",
        None,
        "not a type",
        "text/html; charset=utf-8",
    ],
)
def test_types_a_browser_would_run_are_never_sent_under_their_name(mime: str | None) -> None:
    assert served_type(mime) == "application/octet-stream"


def test_harmless_types_keep_their_name() -> None:
    assert served_type("application/pdf") == "application/pdf"
    assert served_type("image/JPEG") == "image/jpeg"


def test_only_safe_images_and_audio_are_shown_inline() -> None:
    assert disposition("image/jpeg", "receipt.jpg", "image").startswith("inline;")
    assert disposition("audio/ogg; codecs=opus", None, "voice").startswith("inline;")
    for mime in ("image/svg+xml", "text/html", "application/pdf", "video/mp4", None):
        assert disposition(mime, "x", "document").startswith("attachment;")


def test_a_file_name_cannot_break_out_of_its_header() -> None:
    header = disposition("application/pdf", 'a"b\r\nSet-Cookie: x=1/../évier.pdf', "document")
    assert "\r" not in header and "\n" not in header
    fallback = header.split('filename="', 1)[1].split('"', 1)[0]
    assert '"' not in fallback and "/" not in fallback
    assert "filename*=UTF-8''" in header and "%C3%A9vier.pdf" in header


def test_an_attachment_goes_out_as_the_whatsapp_type_of_its_file() -> None:
    assert attachment_kind("image/jpeg") == "image"
    assert attachment_kind("image/svg+xml") == "document"
    assert attachment_kind("audio/ogg") == "audio"
    assert attachment_kind("audio/mpeg") == "document"  # WUZAPI sends only Ogg as a voice note
    assert attachment_kind("video/mp4") == "video"
    assert attachment_kind("application/pdf") == "document"
