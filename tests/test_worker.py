"""The webhooks agent: every message type into rows, once, with statuses that never go back."""

from __future__ import annotations

import dataclasses
import random
import uuid

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from harness.meta_samples import (
    MESSAGE_TYPES,
    messenger_envelope,
    messenger_message,
    wa_change,
    wa_envelope,
    wa_message,
    wa_other_change,
    wa_status,
)
from infra.kafka.topics import META_WEBHOOKS, META_WEBHOOKS_DLQ
from infra.postgres.tenants import Tenant
from schemas.deadletter import DeadLetter
from tests.faults.load import run_load
from tests.support import CortexxProcess, ServiceUrls, post_signed, read_topic, started_broker, wait_until

pytestmark = pytest.mark.usefixtures("ingest", "worker")

PHONE_ID = "106540352242922"


def _wamid() -> str:
    return f"wamid.{uuid.uuid4().hex}"


def _wa(messages=(), statuses=(), contacts=()) -> dict:
    change = wa_change(
        phone_number_id=PHONE_ID,
        display_phone_number="15550783881",
        messages=list(messages),
        statuses=list(statuses),
        contacts=list(contacts),
    )
    return wa_envelope([change], waba_id="102290129340398")


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


async def _post(client, ingest: CortexxProcess, tenant: Tenant, envelope) -> None:
    response = await post_signed(client, ingest.url, tenant, envelope)
    assert response.status_code == 200, response.text


async def _messages(db: asyncpg.Connection, tenant: Tenant) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT external_id, direction, type, body, status, error, conversation_id "
        "FROM messages WHERE company_id = $1 ORDER BY id",
        tenant.id,
    )


async def test_every_whatsapp_message_type_lands_as_rows(client, ingest, db, tenant: Tenant, agent_user: int):
    sender = "4917612345678"
    rng = random.Random(3)
    sent = {t: _wamid() for t in MESSAGE_TYPES}
    messages = [
        wa_message(t, wamid=w, from_=sender, timestamp=1750000000 + i, rng=rng)
        for i, (t, w) in enumerate(sent.items())
    ]
    await _post(client, ingest, tenant, _wa(messages, contacts=[(sender, "Lena Vogel")]))

    # Every type is a message but the reaction, which is a reaction to one (issue 20).
    stored = [t for t in MESSAGE_TYPES if t != "reaction"]
    rows = await wait_until(lambda: _complete(db, tenant, len(stored)), what="every message type stored")
    by_id = {r["external_id"]: r for r in rows}
    assert set(by_id) == {sent[t] for t in stored}
    for msg_type in stored:
        row = by_id[sent[msg_type]]
        assert row["type"] == msg_type
        assert row["direction"] == "inbound"
        assert row["status"] == "received"
        assert row["body"], msg_type
    assert by_id[sent["text"]]["body"] == messages[0]["text"]["body"]
    [reacted] = [m for m in messages if m["type"] == "reaction"]
    reaction = await wait_until(
        lambda: db.fetchrow(
            "SELECT message_external_id, emoji FROM message_reactions WHERE company_id = $1", tenant.id
        ),
        what="the reaction stored",
    )
    assert tuple(reaction) == (reacted["reaction"]["message_id"], reacted["reaction"]["emoji"])

    # The system message said the number changed: one contact, known by the new number now.
    [system] = [m for m in messages if m["type"] == "system"]
    contact = await db.fetchrow("SELECT phone_number, name FROM contacts WHERE company_id = $1", tenant.id)
    assert (contact["phone_number"], contact["name"]) == (system["system"]["wa_id"], "Lena Vogel")
    conversation = await db.fetchrow(
        "SELECT unread_count, last_message_preview, last_message_at FROM conversations WHERE company_id = $1",
        tenant.id,
    )
    assert conversation["unread_count"] == len(stored)
    newest = await db.fetchval(
        "SELECT body FROM messages WHERE company_id = $1 ORDER BY sent_at DESC LIMIT 1", tenant.id
    )
    assert conversation["last_message_preview"] == newest
    notes = await db.fetchval("SELECT count(*) FROM notifications WHERE user_id = $1", agent_user)
    assert notes == len(stored)


async def _complete(db, tenant: Tenant, n: int):
    rows = await _messages(db, tenant)
    return rows if len(rows) >= n else None


async def test_messenger_and_instagram_messages_land_as_rows(client, ingest, db, tenant: Tenant):
    page = "112233445566778"
    events = [
        messenger_message(
            mid=f"m_{uuid.uuid4().hex}",
            sender_id="2471",
            recipient_id=page,
            timestamp_ms=1750000000000,
            text="Hello page",
        ),
        messenger_message(
            mid=f"m_{uuid.uuid4().hex}",
            sender_id="2471",
            recipient_id=page,
            timestamp_ms=1750000001000,
            attachment_type="image",
        ),
    ]
    await _post(client, ingest, tenant, messenger_envelope(events, page_id=page))
    ig = messenger_message(
        mid=f"ig_{uuid.uuid4().hex}",
        sender_id="9001",
        recipient_id="1784",
        timestamp_ms=1750000002000,
        text="Hi from IG",
    )
    await _post(client, ingest, tenant, messenger_envelope([ig], page_id="1784", object_="instagram"))
    rows = await wait_until(lambda: _complete(db, tenant, 3), what="messenger and instagram rows")
    assert sorted(r["body"] for r in rows if r["type"] == "text") == ["Hello page", "Hi from IG"]
    assert any(r["type"] == "image" for r in rows)
    channels = {
        r["channel"]
        for r in await db.fetch("SELECT channel FROM conversations WHERE company_id = $1", tenant.id)
    }
    assert channels == {"messenger", "instagram"}


async def test_redelivered_webhook_gives_one_message_and_one_notification(
    client, ingest, db, tenant: Tenant, agent_user: int
):
    sender = "4915550001111"
    envelope = _wa(
        [wa_message("text", wamid=_wamid(), from_=sender, timestamp=1750000000)], contacts=[(sender, "Max")]
    )
    for _ in range(3):
        await _post(client, ingest, tenant, envelope)
    # A later message proves the redeliveries were processed before we count.
    await _post(
        client, ingest, tenant, _wa([wa_message("text", wamid=_wamid(), from_=sender, timestamp=1750000100)])
    )
    await wait_until(lambda: _complete(db, tenant, 2), what="both messages")
    assert len(await _messages(db, tenant)) == 2
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE user_id = $1", agent_user) == 2
    assert await db.fetchval("SELECT unread_count FROM conversations WHERE company_id = $1", tenant.id) == 2


async def test_removing_an_agent_a_message_or_a_company_takes_their_notifications(
    client, ingest, db, tenant: Tenant, agent_user: int
):
    colleague = await db.fetchval(
        "INSERT INTO users (company_id, email, name) VALUES ($1, $2, 'Colleague') RETURNING id",
        tenant.id,
        f"colleague-{uuid.uuid4().hex[:8]}@{tenant.slug}.test",
    )
    sender = "4915550003333"
    first, second = _wamid(), _wamid()
    messages = [
        wa_message("text", wamid=first, from_=sender, timestamp=1750000000),
        wa_message("text", wamid=second, from_=sender, timestamp=1750000001),
    ]
    await _post(client, ingest, tenant, _wa(messages, contacts=[(sender, "Ida")]))
    await wait_until(lambda: _complete(db, tenant, 2), what="both messages")
    notified = "SELECT user_id, count(*) FROM notifications WHERE company_id = $1 GROUP BY 1"
    assert dict(await db.fetch(notified, tenant.id)) == {agent_user: 2, colleague: 2}

    await db.execute("DELETE FROM users WHERE id = $1", agent_user)
    assert dict(await db.fetch(notified, tenant.id)) == {colleague: 2}

    await db.execute("DELETE FROM messages WHERE company_id = $1 AND external_id = $2", tenant.id, first)
    remaining = await db.fetch(
        "SELECT m.external_id FROM notifications n JOIN messages m ON m.id = n.message_id "
        "WHERE n.user_id = $1",
        colleague,
    )
    assert [r["external_id"] for r in remaining] == [second]
    assert dict(await db.fetch(notified, tenant.id)) == {colleague: 1}  # none left dangling

    # The company goes with everything it had: nothing refuses, nothing is left behind.
    await db.execute("DELETE FROM companies WHERE id = $1", tenant.id)
    assert await db.fetch(notified, tenant.id) == []
    assert await db.fetchval("SELECT count(*) FROM messages WHERE company_id = $1", tenant.id) == 0


async def test_shuffled_statuses_end_at_the_highest(client, ingest, db, tenant: Tenant):
    recipient = "4915550002222"
    read_id, failed_id = _wamid(), _wamid()
    statuses = [
        wa_status(s, wamid=read_id, recipient_id=recipient, timestamp=1750000000 + i)
        for i, s in enumerate(["sent", "delivered", "read"])
    ]
    statuses += [
        wa_status(s, wamid=failed_id, recipient_id=recipient, timestamp=1750000000 + i)
        for i, s in enumerate(["sent", "delivered", "failed"])
    ]
    for order in range(3):
        random.Random(order).shuffle(statuses)
        for status in statuses:
            await _post(client, ingest, tenant, _wa(statuses=[status]))

    async def final():
        rows = {r["external_id"]: r for r in await _messages(db, tenant)}
        done = (
            rows.get(read_id, {}).get("status") == "read"
            and rows.get(failed_id, {}).get("status") == "failed"
        )
        return rows if done else None

    rows = await wait_until(final, what="final statuses")
    assert rows[read_id]["direction"] == "outbound"
    error = rows[failed_id]["error"]
    assert error and error[0]["code"]
    # A late "sent" after "read" changes nothing.
    await _post(
        client,
        ingest,
        tenant,
        _wa(statuses=[wa_status("sent", wamid=read_id, recipient_id=recipient, timestamp=1750000009)]),
    )
    marker = _wamid()
    await _post(
        client, ingest, tenant, _wa([wa_message("text", wamid=marker, from_=recipient, timestamp=1750000010)])
    )
    await wait_until(lambda: _complete(db, tenant, 3), what="marker message")
    assert (await db.fetchval("SELECT status FROM messages WHERE external_id = $1", read_id)) == "read"


async def test_statuses_move_only_messages_the_business_sent_and_played_ranks_above_read(
    client, ingest, db, tenant: Tenant
):
    """A status names a message the business sent: one whose id equals an inbound message's leaves
    that message as it was received. `played` (a voice note listened to) ranks above `read`, in
    whatever order the statuses arrive, alone in a POST or batched with others."""
    customer = "4915550003333"
    inbound_id, voice_id = _wamid(), _wamid()
    await _post(
        client,
        ingest,
        tenant,
        _wa([wa_message("text", wamid=inbound_id, from_=customer, timestamp=1750000000)]),
    )
    await wait_until(lambda: _complete(db, tenant, 1), what="the inbound message")
    statuses = [
        wa_status(s, wamid=voice_id, recipient_id=customer, timestamp=1750000001 + i)
        for i, s in enumerate(["sent", "delivered", "read", "played"])
    ]
    shuffled = [statuses[3], statuses[0], statuses[2], statuses[1]]
    for status in shuffled[:2]:
        await _post(client, ingest, tenant, _wa(statuses=[status]))
    await _post(client, ingest, tenant, _wa(statuses=shuffled[2:]))
    for state in ("read", "delivered"):
        await _post(
            client,
            ingest,
            tenant,
            _wa(statuses=[wa_status(state, wamid=inbound_id, recipient_id=customer, timestamp=1750000009)]),
        )
    marker = _wamid()
    await _post(
        client, ingest, tenant, _wa([wa_message("text", wamid=marker, from_=customer, timestamp=1750000010)])
    )
    await wait_until(lambda: _complete(db, tenant, 3), what="the marker message")
    rows = {r["external_id"]: r for r in await _messages(db, tenant)}
    assert (rows[inbound_id]["direction"], rows[inbound_id]["status"]) == ("inbound", "received")
    assert (rows[voice_id]["direction"], rows[voice_id]["status"]) == ("outbound", "played")
    assert not await db.fetchval(
        "SELECT count(*) FROM webhook_events WHERE company_id = $1 AND payload->>'status' = 'played'",
        tenant.id,
    )


async def test_unknown_change_fields_are_kept_once(client, ingest, db, tenant: Tenant):
    change = wa_other_change("account_update", {"phone_number": "15550783881", "event": "VERIFIED_ACCOUNT"})
    envelope = wa_envelope([change], waba_id="102290129340398")
    await _post(client, ingest, tenant, envelope)
    await _post(client, ingest, tenant, envelope)
    # Same entry and field, so same partition: once this is stored, the re-send was processed.
    later = wa_other_change("account_update", {"phone_number": "15550783881", "event": "ACCOUNT_UPDATE"})
    await _post(client, ingest, tenant, wa_envelope([later], waba_id="102290129340398"))
    other = wa_other_change("brand_new_field", {"anything": [1, 2, 3]})
    await _post(client, ingest, tenant, wa_envelope([other], waba_id="102290129340398"))

    async def kept():
        rows = await db.fetch(
            "SELECT field, payload FROM webhook_events WHERE company_id = $1 ORDER BY field", tenant.id
        )
        return rows if len(rows) >= 3 else None

    rows = await wait_until(kept, what="kept events")
    assert [r["field"] for r in rows] == ["account_update", "account_update", "brand_new_field"]
    assert rows[2]["payload"] == {"anything": [1, 2, 3]}


async def test_poison_record_goes_to_dead_letters_and_the_partition_moves_on(
    client, ingest, db, services: ServiceUrls, tenant: Tenant
):
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
    await producer.start()
    key = f"{tenant.slug}:poison".encode()
    try:
        await producer.send_and_wait(META_WEBHOOKS, b"\x00not json at all", key=key)
        bad_version = orjson.dumps({"v": 99, "tenant": tenant.slug})
        await producer.send_and_wait(META_WEBHOOKS, bad_version, key=key)
        # Valid JSON and schema, but a timestamp no clock can hold: poison, not an outage.
        overflow = _wa(
            [
                {
                    "from": "4915550003333",
                    "id": _wamid(),
                    "timestamp": "9" * 20,
                    "type": "text",
                    "text": {"body": "x"},
                }
            ]
        )
        record = {
            "v": 1,
            "tenant": tenant.slug,
            "object": "whatsapp_business_account",
            "entry_id": "1",
            "entry_time": None,
            "kind": "change",
            "field": "messages",
            "payload": overflow["entry"][0]["changes"][0]["value"],
            "request_id": "r",
            "received_at_ms": 0,
            "seq": 0,
        }
        await producer.send_and_wait(META_WEBHOOKS, orjson.dumps(record), key=key)
    finally:
        await producer.stop()
    sender = "4915550003333"
    await _post(
        client, ingest, tenant, _wa([wa_message("text", wamid=_wamid(), from_=sender, timestamp=1750000000)])
    )
    await wait_until(lambda: _complete(db, tenant, 1), what="the message after the poison")

    async def letters():
        found = []
        for record in await read_topic(services.kafka_bootstrap, META_WEBHOOKS_DLQ):
            letter = DeadLetter.from_bytes(record.value)
            if letter.key == key:
                found.append(letter)
        return found if len(found) >= 3 else None

    found = await wait_until(letters, what="three dead letters")
    assert found[0].value == b"\x00not json at all"
    assert found[0].source_topic == META_WEBHOOKS
    assert found[0].error.type == "RecordError"
    assert "version" in found[1].error.message
    assert found[2].error.type == "PoisonRecord" and "out of range" in found[2].error.message


async def test_worker_killed_mid_stream_loses_and_doubles_nothing(
    client, ingest, worker: CortexxProcess, db, tenant: Tenant, agent_user: int
):
    wamids = []
    envelopes = []
    for i in range(400):
        sender = f"49160{i % 40:07d}"
        wamid = _wamid()
        wamids.append(wamid)
        envelopes.append(
            _wa(
                [wa_message("text", wamid=wamid, from_=sender, timestamp=1750000000 + i)],
                contacts=[(sender, f"Contact {i % 40}")],
            )
        )
    for i, envelope in enumerate(envelopes):
        await _post(client, ingest, tenant, envelope)
        if i in (120, 260):
            worker.kill()
            worker.start()
    rows = await wait_until(lambda: _complete(db, tenant, 400), timeout_s=60, what="all 400 messages")
    assert sorted(r["external_id"] for r in rows) == sorted(wamids)
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE user_id = $1", agent_user) == 400
    assert (
        await db.fetchval("SELECT sum(unread_count) FROM conversations WHERE company_id = $1", tenant.id)
        == 400
    )


async def test_a_backlog_through_a_tiny_stream_buffer_lands_once(
    tmp_path, services: ServiceUrls, db, tenant: Tenant
):
    """A worker behind a backlog fetches while its agent writes: its stream buffer fills, and
    Faust holds those partitions back and takes them up again, through the worker's own consumer
    (processors/faust_transport.py). Through a 16-event buffer, 1,500 webhooks waiting on four
    partitions all land, once. (What the consumer's shorter fetch wait buys is speed, measured
    by `cortexx bench worker` and `cortexx bench latency`, not here.)"""
    broker = await started_broker(tmp_path / "broker")
    own = dataclasses.replace(services, kafka_bootstrap=broker.bootstrap, broker=broker, data_dir=tmp_path)
    ingest = CortexxProcess.ingest(own, produce_timeout_s=2.0)
    worker = CortexxProcess.worker(own, worker_stream_buffer_max=16, worker_batch_max=50)
    ingest.start()
    try:
        load = await run_load(ingest.url, tenant, concurrency=8, total=1500, contacts=40)
        assert load.codes == {200: 1500}
        wamids = set(load.accepted.values())
        worker.start()

        async def stored() -> list[str] | None:
            rows = await db.fetch(
                "SELECT external_id FROM messages WHERE company_id = $1 AND direction = 'inbound'", tenant.id
            )
            return [r["external_id"] for r in rows] if len(rows) >= len(wamids) else None

        found = await wait_until(stored, timeout_s=90, interval_s=0.5, what="1,500 messages")
        assert sorted(found) == sorted(wamids)
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
    finally:
        worker.stop()
        ingest.stop()
        broker.stop()


async def test_batches_fill_under_a_backlog_and_a_lone_webhook_does_not_wait_for_the_window(
    tmp_path, client, services: ServiceUrls, db, tenant: Tenant
):
    """A batch closes when full, or when the stream has gone quiet (processors/faust_stream.py),
    not on a timer: with a 60 s window, a backlog of 1,200 webhooks is written in full batches
    of 400, and a webhook posted afterwards to an idle worker is stored long before the window
    would have closed. (How much sooner is `cortexx bench latency`'s job.)"""
    broker = await started_broker(tmp_path / "broker")
    own = dataclasses.replace(services, kafka_bootstrap=broker.bootstrap, broker=broker, data_dir=tmp_path)
    ingest = CortexxProcess.ingest(own, produce_timeout_s=2.0)
    worker = CortexxProcess.worker(
        own, worker_batch_max=400, worker_batch_within_s=60, worker_batch_idle_ms=50
    )
    ingest.start()
    try:
        load = await run_load(ingest.url, tenant, concurrency=8, total=1200, contacts=40)
        assert load.codes == {200: 1200}
        worker.start()

        async def inbound() -> int:
            return int(
                await db.fetchval(
                    "SELECT count(*) FROM messages WHERE company_id = $1 AND direction = 'inbound'",
                    tenant.id,
                )
            )

        async def backlog_stored() -> bool:
            return await inbound() >= 1200

        await wait_until(backlog_stored, timeout_s=90, interval_s=0.5, what="the backlog")
        batches = [
            orjson.loads(line)
            for line in worker.log_path.read_bytes().splitlines()
            if b'"webhooks.batch_stored"' in line
        ]
        assert max(b["records"] for b in batches) == 400, [b["records"] for b in batches]
        assert sum(b["records"] for b in batches) == 1200

        sender = "4915550009999"
        wamid = _wamid()
        await _post(
            client,
            ingest,
            tenant,
            _wa([wa_message("text", wamid=wamid, from_=sender, timestamp=1750000000)]),
        )

        async def lone_stored() -> bool:
            return bool(
                await db.fetchval(
                    "SELECT 1 FROM messages WHERE company_id = $1 AND external_id = $2", tenant.id, wamid
                )
            )

        await wait_until(lone_stored, timeout_s=20, interval_s=0.1, what="the lone webhook")
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
    finally:
        worker.stop()
        ingest.stop()
        broker.stop()
