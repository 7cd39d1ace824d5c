"""Media the agents can open, end to end: a customer's photo, voice note or document arrives as a
signed webhook at ingest, the worker's media agent fetches it from the Graph API simulator
(a real HTTP process), keeps it in the media store, and the read API lists and serves it to the
company's own users only; an agent's reply carries a file to WUZAPI's media endpoints."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from infra.kafka.topics import META_MEDIA, META_MEDIA_DLQ
from schemas.deadletter import DeadLetter
from schemas.media import MediaJob
from tests.api.world import auth
from tests.desk import NOW as AT
from tests.desk import Desk, bsuid, card, envelope, open_desk, wamid
from tests.support import CortexxProcess, GraphSim, ServiceUrls, Simulator, metric, read_topic, wait_until

Json = dict[str, Any]
PAGE = "112233445566"


def media_message(kind: str, media: Json, *, phone: str, user_id: str, **part: Any) -> Json:
    """A WhatsApp media message as Meta sends it: the media id, its type and its hash (base64)."""
    body: Json = {"id": media["id"], "mime_type": media["mime_type"], "sha256": media["sha256_b64"], **part}
    return {
        "id": wamid(),
        "from": phone,
        "from_user_id": user_id,
        "timestamp": str(AT),
        "type": kind,
        kind: body,
    }


def whatsapp(message: Json, *, phone: str, user_id: str) -> Json:
    return envelope(contacts=[card(user_id=user_id, phone=phone)], messages=[message])


async def media_of(desk: Desk, external_id: str, state: str = "stored", timeout_s: float = 30) -> Json:
    """The message's first file as the agent's app lists it, once in `state`."""
    found: Json = {}

    async def there() -> bool:
        for conversation in (await desk.get("/conversations?limit=50"))["items"]:
            for message in (await desk.get(f"/conversations/{conversation['id']}/messages?limit=50"))[
                "items"
            ]:
                if message["external_id"] == external_id and message["media"]:
                    found.update(message["media"][0])
                    return bool(found["state"] == state)
        return False

    await wait_until(there, timeout_s=timeout_s, what=f"{external_id}'s media {state}")
    return found


@pytest.fixture
async def customer() -> tuple[str, str]:
    return f"3467{secrets.randbelow(10**7):07d}", bsuid()


async def test_a_photo_is_fetched_checked_kept_and_served_to_the_company_only(
    desk: Desk,
    graph: GraphSim,
    worker: CortexxProcess,
    db: asyncpg.Connection,
    ingest: CortexxProcess,
    api: CortexxProcess,
    customer: tuple[str, str],
) -> None:
    phone, user_id = customer
    photo = await graph.register(mime_type="image/jpeg", size=300_000)
    message = media_message("image", photo, phone=phone, user_id=user_id, caption="my receipt")
    await desk.post(whatsapp(message, phone=phone, user_id=user_id))

    media = await media_of(desk, message["id"])
    assert (media["type"], media["mime_type"], media["size"], media["caption"]) == (
        "image",
        "image/jpeg",
        300_000,
        "my receipt",
    )
    served = await desk.client.get(f"{api.url}{media['url']}", headers=auth(desk.cookie))
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == photo["sha256"]
    assert served.headers["content-type"] == "image/jpeg"
    assert served.headers["content-disposition"].startswith("inline")
    assert served.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in served.headers["content-security-policy"]

    # A player seeking: the bytes asked for, and only those.
    ranged = await desk.client.get(
        f"{api.url}{media['url']}", headers={**auth(desk.cookie), "Range": "bytes=1000-1999"}
    )
    assert ranged.status_code == 206
    assert ranged.headers["content-range"] == "bytes 1000-1999/300000"
    assert ranged.content == served.content[1000:2000]
    past = await desk.client.get(
        f"{api.url}{media['url']}", headers={**auth(desk.cookie), "Range": "bytes=400000-"}
    )
    assert past.status_code == 416

    # Another company's agent, and no one at all, get nothing.
    async with httpx.AsyncClient(timeout=20) as other_client:
        other = await open_desk(db, other_client, ingest, api)
        assert (
            await other_client.get(f"{api.url}{media['url']}", headers=auth(other.cookie))
        ).status_code == 404
    assert (await desk.client.get(f"{api.url}{media['url']}")).status_code == 401

    # The worker counts fetches by outcome, and bytes.
    port = worker.env["CORTEXX_WORKER_METRICS_PORT"]
    text = (await desk.client.get(f"http://127.0.0.1:{port}/metrics")).text
    assert metric(text, "cortexx_media_fetches_total", source="whatsapp", outcome="stored") >= 1
    assert metric(text, "cortexx_media_bytes_total", source="whatsapp") >= 300_000


async def test_a_redelivered_webhook_fetches_and_stores_its_file_once(
    desk: Desk,
    graph: GraphSim,
    worker: CortexxProcess,
    db: asyncpg.Connection,
    services: ServiceUrls,
    customer: tuple[str, str],
) -> None:
    phone, user_id = customer
    note = await graph.register(mime_type="audio/ogg", size=40_000)
    message = media_message("audio", note, phone=phone, user_id=user_id, voice=True)
    webhook = whatsapp(message, phone=phone, user_id=user_id)
    await desk.post(webhook)
    media = await media_of(desk, message["id"])
    assert media["type"] == "voice"
    for _ in range(3):
        await desk.post(webhook)
    # And the job itself twice more, as a replay (or a second worker after a rebalance) would.
    row = await db.fetchrow(
        "SELECT id::text FROM media WHERE company_id = $1 AND message_external_id = $2",
        desk.tenant.id,
        message["id"],
    )
    job = MediaJob(
        row["id"], desk.tenant.slug, desk.tenant.id, message["id"], "whatsapp", note["id"], "voice", AT * 1000
    )
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for _ in range(2):
            await producer.send_and_wait(META_MEDIA, job.to_bytes(), key=job.key)
    finally:
        await producer.stop()
    # Give the redeliveries time to reach the agent, then count what was downloaded.
    await wait_until(
        lambda: _stored_count(db, desk.tenant.id, message["id"], 1), timeout_s=10, what="one row"
    )
    await asyncio.sleep(2)  # the redeliveries' jobs, had they been queued, run in well under this
    downloads = (await graph.ledger())["media"][note["id"]]["downloads"]
    assert downloads == 1


async def _stored_count(db: asyncpg.Connection, company_id: int, external_id: str, n: int) -> bool:
    count = await db.fetchval(
        "SELECT count(*) FROM media WHERE company_id = $1 AND message_external_id = $2 AND state = 'stored'",
        company_id,
        external_id,
    )
    return bool(count == n)


async def test_media_meta_no_longer_has_is_shown_unavailable_with_the_reason_and_dead_lettered(
    desk: Desk, graph: GraphSim, worker: CortexxProcess, services: ServiceUrls, customer: tuple[str, str]
) -> None:
    phone, user_id = customer
    gone = await graph.register(mime_type="application/pdf", size=1_000, gone=True)
    message = media_message("document", gone, phone=phone, user_id=user_id, filename="contract.pdf")
    await desk.post(whatsapp(message, phone=phone, user_id=user_id))
    media = await media_of(desk, message["id"], state="failed")
    assert media["reason"].startswith("media_not_found")
    assert media["url"] is None and media["file_name"] == "contract.pdf"
    letters = [
        DeadLetter.from_bytes(r.value) for r in await read_topic(services.kafka_bootstrap, META_MEDIA_DLQ)
    ]
    mine = [
        letter
        for letter in letters
        if orjson.loads(base64.b64decode(letter.value_b64))["message_external_id"] == message["id"]
    ]
    assert len(mine) == 1 and "media_not_found" in mine[0].error.message


async def test_a_file_that_does_not_match_its_hash_is_never_stored(
    desk: Desk, graph: GraphSim, worker: CortexxProcess, api: CortexxProcess, customer: tuple[str, str]
) -> None:
    phone, user_id = customer
    photo = await graph.register(mime_type="image/png", size=20_000)
    wrong = {**photo, "sha256_b64": base64.b64encode(hashlib.sha256(b"other").digest()).decode()}
    message = media_message("image", wrong, phone=phone, user_id=user_id)
    await desk.post(whatsapp(message, phone=phone, user_id=user_id))
    media = await media_of(desk, message["id"], state="failed", timeout_s=60)
    assert media["reason"].startswith("sha256_mismatch")
    served = await desk.client.get(f"{api.url}/api/v1/media/{media['id']}", headers=auth(desk.cookie))
    assert served.status_code == 410


async def test_an_svg_document_is_never_served_as_active_content(
    desk: Desk, graph: GraphSim, worker: CortexxProcess, api: CortexxProcess, customer: tuple[str, str]
) -> None:
    phone, user_id = customer
    svg = await graph.register(mime_type="image/svg+xml", size=2_000)
    message = media_message("document", svg, phone=phone, user_id=user_id, filename="logo.svg")
    await desk.post(whatsapp(message, phone=phone, user_id=user_id))
    media = await media_of(desk, message["id"])
    served = await desk.client.get(f"{api.url}{media['url']}", headers=auth(desk.cookie))
    assert served.headers["content-type"] == "application/octet-stream"
    assert served.headers["content-disposition"].startswith("attachment")
    assert 'filename="logo.svg"' in served.headers["content-disposition"]


async def test_a_messenger_attachment_is_fetched_from_its_own_url(
    desk: Desk, graph: GraphSim, worker: CortexxProcess, api: CortexxProcess
) -> None:
    clip_ = await graph.register(mime_type="video/mp4", size=120_000, kind="cdn")
    user = str(secrets.randbelow(10**16))
    mid = f"m_{secrets.token_hex(8)}"
    webhook = {
        "object": "page",
        "entry": [
            {
                "id": PAGE,
                "time": AT * 1000,
                "messaging": [
                    {
                        "sender": {"id": user},
                        "recipient": {"id": PAGE},
                        "timestamp": AT * 1000,
                        "message": {
                            "mid": mid,
                            "attachments": [{"type": "video", "payload": {"url": clip_["url"]}}],
                        },
                    }
                ],
            }
        ],
    }
    await desk.post(webhook)
    media = await media_of(desk, mid)
    served = await desk.client.get(f"{api.url}{media['url']}", headers=auth(desk.cookie))
    assert hashlib.sha256(served.content).hexdigest() == clip_["sha256"]
    assert served.headers["content-disposition"].startswith("attachment")  # video: not inline


async def test_a_reply_carries_a_file_to_the_customer_once(
    desk: Desk, wuzapi: Simulator, worker: CortexxProcess, api: CortexxProcess, customer: tuple[str, str]
) -> None:
    phone, conversation = await _conversation_with(desk, customer, "can you send the invoice?")
    invoice = secrets.token_bytes(50_000)
    reply_id = secrets.token_hex(16)
    url = f"{api.url}/api/v1/conversations/{conversation['id']}/attachments"
    for _ in range(2):  # a retry with the same id is the same reply
        answer = await desk.client.post(
            url,
            headers=auth(desk.cookie),
            files={"file": ("invoice.pdf", invoice, "application/pdf")},
            data={"caption": "here it is", "id": reply_id},
        )
        assert answer.status_code == 202, answer.text
    sent = answer.json()
    assert sent["type"] == "document" and sent["media"][0]["size"] == len(invoice)

    async def delivered() -> list[Any]:
        ledger = await wuzapi.ledger()
        return [d for d in ledger["deliveries"].values() if d["phone"] == phone and d.get("sha256")]

    await wait_until(lambda: _nonempty(delivered), timeout_s=30, what="the file at WUZAPI")
    (delivery,) = await delivered()
    assert delivery["sha256"] == hashlib.sha256(invoice).hexdigest()
    assert delivery["accepted"] == 1

    too_big = await desk.client.post(
        url,
        headers=auth(desk.cookie),
        files={"file": ("huge.bin", b"\0" * (16 * 1024 * 1024 + 1), "application/octet-stream")},
    )
    assert too_big.status_code == 413
    assert too_big.json()["error"] in ("attachment_too_large", "body_too_large")


async def test_a_photo_wuzapi_cannot_decode_reaches_the_customer_as_a_document(
    desk: Desk, wuzapi: Simulator, worker: CortexxProcess, api: CortexxProcess, customer: tuple[str, str]
) -> None:
    # Labelled a JPEG, but not one: WUZAPI's SendImage answers 500 after its upload. Retrying it
    # as an image would only open the company's breaker; it goes once, as a document.
    phone, conversation = await _conversation_with(desk, customer, "a photo of the damage please")
    not_a_jpeg = b"HEIC-ish" + secrets.token_bytes(20_000)
    answer = await desk.client.post(
        f"{api.url}/api/v1/conversations/{conversation['id']}/attachments",
        headers=auth(desk.cookie),
        files={"file": ("damage.jpg", not_a_jpeg, "image/jpeg")},
        data={"caption": "the damage"},
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["type"] == "image"

    async def delivered() -> list[Any]:
        ledger = await wuzapi.ledger()
        return [d for d in ledger["deliveries"].values() if d["phone"] == phone and d.get("sha256")]

    await wait_until(lambda: _nonempty(delivered), timeout_s=30, what="the file at WUZAPI")
    (delivery,) = await delivered()
    assert delivery["kind"] == "document" and delivery["accepted"] == 1
    assert delivery["sha256"] == hashlib.sha256(not_a_jpeg).hexdigest()
    message_id = answer.json()["id"]

    async def sent() -> bool:
        listed = await desk.client.get(
            f"{api.url}/api/v1/conversations/{conversation['id']}/messages", headers=auth(desk.cookie)
        )
        return any(m["id"] == message_id and m["status"] == "sent" for m in listed.json()["items"])

    await wait_until(sent, timeout_s=10, what="the reply marked sent")


async def _conversation_with(desk: Desk, customer: tuple[str, str], text: str) -> tuple[str, dict[str, Any]]:
    """The customer writes `text`: their phone and the one conversation it opens."""
    phone, user_id = customer
    message = {
        "id": wamid(),
        "from": phone,
        "from_user_id": user_id,
        "timestamp": str(AT),
        "type": "text",
        "text": {"body": text},
    }
    await desk.post(whatsapp(message, phone=phone, user_id=user_id))
    (conversation,) = await desk.conversations(1)
    return phone, conversation


async def _nonempty(probe: Any) -> bool:
    return bool(await probe())
