"""A reply's attachment form: the session is checked before a byte of the body is read, and a
malformed form is a clear 4xx that stores nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.api.world import World, auth, login
from tests.support import CortexxProcess, ServiceUrls


def _url(api: CortexxProcess, conversation: int) -> str:
    return f"{api.url}/api/v1/conversations/{conversation}/attachments"


def _objects(services: ServiceUrls, company_id: int) -> list[Path]:
    root = services.data_dir / "media" / str(company_id)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def test_no_session_is_refused_before_the_body_is_read(api: CortexxProcess, world: World) -> None:
    # A client that announces 8 MB and sends 64 KB: the 401 comes without waiting for the rest,
    # so nobody without a session can make the API spool a file.
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    try:
        boundary = "cortexxboundary"
        head = (
            f"POST /api/v1/conversations/{world.x.conversations[0]}/attachments HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {8 * 1024 * 1024}\r\n\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'
        )
        writer.write(head.encode() + b"\0" * 65_536)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 401"), status_line


async def test_a_malformed_form_is_a_clear_4xx(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, services: ServiceUrls
) -> None:
    cookie = await login(client, api, world.x.agent)
    url = _url(api, world.x.conversations[0])
    pdf = ("a.pdf", b"%PDF-1.4 not much", "application/pdf")

    as_json = await client.post(url, headers=auth(cookie), json={"file": "aGVsbG8="})
    assert as_json.status_code == 415 and as_json.json()["error"] == "unsupported_media_type"

    no_file = await client.post(url, headers=auth(cookie), files={"caption": (None, "hello")})
    assert no_file.status_code == 422, no_file.text
    assert [e["loc"] for e in no_file.json()["fields"]] == ["body.file"]

    file_as_text = await client.post(url, headers=auth(cookie), files={"file": (None, "just text")})
    assert file_as_text.status_code == 422 and file_as_text.json()["fields"][0]["loc"] == "body.file"

    bad_id = await client.post(url, headers=auth(cookie), files={"file": pdf}, data={"id": "not-hex"})
    assert bad_id.status_code == 422 and bad_id.json()["fields"][0]["loc"] == "body.id"

    long_caption = await client.post(
        url, headers=auth(cookie), files={"file": pdf}, data={"caption": "x" * 1025}
    )
    assert long_caption.status_code == 422 and long_caption.json()["fields"][0]["loc"] == "body.caption"

    unknown = await client.post(url, headers=auth(cookie), files={"file": pdf}, data={"captoin": "typo"})
    assert unknown.status_code == 422 and unknown.json()["fields"][0]["loc"] == "body.captoin"

    two_files = await client.post(url, headers=auth(cookie), files=[("file", pdf), ("file", pdf)])
    assert two_files.status_code == 400 and two_files.json()["error"] == "bad_request"

    broken = await client.post(
        url,
        headers={**auth(cookie), "Content-Type": "multipart/form-data; boundary=xyz"},
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nno end',
    )
    assert broken.status_code in (400, 422), broken.text

    empty = await client.post(url, headers=auth(cookie), files={"file": ("e.txt", b"", "text/plain")})
    assert empty.status_code == 422 and empty.json()["error"] == "empty_attachment"

    assert _objects(services, world.x.id) == []


async def test_a_good_form_keeps_its_file_where_the_other_tests_look(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, services: ServiceUrls
) -> None:
    # The control for the "keeps no file" assertions: a file that is kept is seen there.
    cookie = await login(client, api, world.x.agent)
    photo = b"\xff\xd8\xff" + b"\1" * 5_000
    answer = await client.post(
        _url(api, world.x.conversations[0]),
        headers=auth(cookie),
        files={"file": ("photo.jpg", photo, "image/jpeg")},
    )
    assert answer.status_code == 202, answer.text
    (kept,) = _objects(services, world.x.id)
    assert kept.read_bytes() == photo


async def test_another_company_s_conversation_is_a_404_and_keeps_no_file(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, services: ServiceUrls
) -> None:
    cookie = await login(client, api, world.y.agent)
    answer = await client.post(
        _url(api, world.x.conversations[0]),
        headers=auth(cookie),
        files={"file": ("photo.jpg", b"\xff\xd8\xff" + b"\0" * 5_000, "image/jpeg")},
    )
    assert answer.status_code == 404, answer.text
    assert _objects(services, world.x.id) == [] and _objects(services, world.y.id) == []
