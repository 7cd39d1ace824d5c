"""Outbound through WUZAPI: breaker, retries, rate limits, dead letters and their replay,
against the real worker, broker, Postgres and the WUZAPI simulator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from harness.meta_samples import wa_change, wa_envelope, wa_message
from infra.kafka.topics import WUZAPI_OUTBOUND, WUZAPI_OUTBOUND_DLQ
from infra.postgres.tenants import Tenant, upsert_tenant
from schemas.deadletter import DeadLetter
from schemas.outbound import OutboundMessage, gateway_message_id
from tests.support import (
    CortexxProcess,
    ServiceUrls,
    Simulator,
    delivered_to,
    metric,
    post_signed,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(autouse=True)
async def clean_simulator(wuzapi: Simulator):
    async def answers() -> bool:
        try:
            await wuzapi.reset()
            return True
        except httpx.TransportError:
            return False  # still down from a test that failed early

    await wait_until(answers, timeout_s=40, what="the simulator back")
    yield
    await wait_until(answers, timeout_s=40, what="the simulator back")


async def _conversation(db: asyncpg.Connection, tenant: Tenant, phone: str) -> int:
    contact = await db.fetchval(
        "INSERT INTO contacts (company_id, phone_number) VALUES ($1, $2) RETURNING id", tenant.id, phone
    )
    return int(
        await db.fetchval(
            "INSERT INTO conversations (company_id, contact_id) VALUES ($1, $2) RETURNING id",
            tenant.id,
            contact,
        )
    )


async def _queue_replies(
    db: asyncpg.Connection,
    services: ServiceUrls,
    tenant: Tenant,
    phones: list[str],
    per_phone: int = 1,
    ids: list[str] | None = None,
    text: str = "Reply",
) -> list[OutboundMessage]:
    """What the read API does for an agent's reply: a pending row, then a record on the topic."""
    messages = []
    chosen = iter(ids or ())
    for phone in phones:
        conversation = await _conversation(db, tenant, phone)
        for i in range(per_phone):
            message = OutboundMessage(
                id=next(chosen, None) or uuid.uuid4().hex,
                tenant=tenant.slug,
                company_id=tenant.id,
                conversation_id=conversation,
                to=phone,
                kind="text",
                origin="agent",
                created_at_ms=int(time.time() * 1000),
                text=f"{text} {i} to {phone}",
            )
            await db.execute(
                "INSERT INTO messages (company_id, conversation_id, external_id, direction, type, body,"
                " status, status_rank, sent_at)"
                " VALUES ($1, $2, $3, 'outbound', 'text', $4, 'pending', 0, now())",
                tenant.id,
                conversation,
                message.id,
                message.text,
            )
            messages.append(message)
    await _produce(messages, services)
    return messages


async def _produce(messages: list[OutboundMessage], services: ServiceUrls) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(WUZAPI_OUTBOUND, m.to_bytes(), key=m.key) for m in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _statuses(db: asyncpg.Connection, messages: list[OutboundMessage]) -> dict[str, str]:
    rows = await db.fetch(
        "SELECT external_id, status FROM messages WHERE external_id = ANY($1::text[])",
        [m.id for m in messages],
    )
    return {r["external_id"]: r["status"] for r in rows}


async def _all_sent(db, messages):
    statuses = await _statuses(db, messages)
    return statuses if all(statuses.get(m.id) == "sent" for m in messages) else None


async def _dead_letters(services: ServiceUrls, tenant: Tenant) -> list[tuple[str, DeadLetter]]:
    out = []
    for record in await read_topic(services.kafka_bootstrap, WUZAPI_OUTBOUND_DLQ):
        letter = DeadLetter.from_bytes(record.value)
        if letter.tenant == tenant.slug:
            out.append((f"{WUZAPI_OUTBOUND_DLQ}:{record.partition}:{record.offset}", letter))
    return out


async def _delivered_once(wuzapi: Simulator, messages: list[OutboundMessage]) -> None:
    """What the gateway delivered to these messages' phones is these messages, each once and
    under its own gateway id: a second send under any other id, or anything else sent to them,
    fails it (the ledger counts by content, not only by the ids looked up)."""
    delivered = await wuzapi.delivered_to({m.to for m in messages})
    delivered.assert_once({(m.to, m.text): m.gateway_id for m in messages})


async def _fast_tenant(db, tenant: Tenant, rate: float = 500.0) -> None:
    await db.execute(
        "UPDATE companies SET rate_limit_per_s = $2, rate_limit_burst = $3 WHERE id = $1",
        tenant.id,
        rate,
        max(1, int(rate)),
    )


async def test_a_reply_is_sent_once_and_marked_sent(db, services, tenant: Tenant, wuzapi: Simulator):
    [message] = await _queue_replies(db, services, tenant, ["4915770000001"])
    await wait_until(lambda: _all_sent(db, [message]), what="the reply sent")
    ledger = await wuzapi.ledger()
    delivery = ledger["deliveries"][message.gateway_id]
    assert delivery == {
        **delivery,
        "accepted": 1,
        "phone": "4915770000001",
        "path": "/chat/send/text",
        "body": message.text,
    }
    await _delivered_once(wuzapi, [message])


async def test_two_companies_sharing_a_gateway_may_pick_the_same_reply_id(
    db, services, tenant: Tenant, wuzapi: Simulator
):
    """A reply id is unique per company; the id WUZAPI gets is unique across companies. Two
    companies on one gateway (one WhatsApp number: the default token) answer the same customer
    with the same reply id: the gateway would take the second for a resend of the first."""
    other, _ = await upsert_tenant(
        db, slug=f"t-{uuid.uuid4().hex[:12]}", app_secret="s" * 16, verify_token="v" * 8, name="Other Co"
    )
    customer = "4915770000011"
    [first] = await _queue_replies(db, services, tenant, [customer])
    await wait_until(lambda: _all_sent(db, [first]), what="the first reply sent")
    [second] = await _queue_replies(db, services, other, [customer], ids=[first.id], text="Other reply")
    assert first.id == second.id
    await wait_until(lambda: _all_sent(db, [second]), what="the second reply sent")
    assert first.gateway_id != second.gateway_id
    # Both reached the customer, each once, under its company's own id.
    await _delivered_once(wuzapi, [first, second])


async def test_wuzapi_down_costs_only_delay(db, services, tenant: Tenant, wuzapi: Simulator):
    """Down for 30 s while 500 replies are queued: none dead-lettered, all delivered once after."""
    await _fast_tenant(db, tenant)
    await wuzapi.faults(down_for_s=30)
    started = time.monotonic()
    messages = await _queue_replies(
        db, services, tenant, [f"49157711{i:05d}" for i in range(100)], per_phone=5
    )
    await wait_until(lambda: _all_sent(db, messages), timeout_s=120, interval_s=0.5, what="500 replies sent")
    assert time.monotonic() - started >= 29, "nothing can be delivered while WUZAPI is down"
    await _delivered_once(wuzapi, messages)
    assert await _dead_letters(services, tenant) == []


async def test_hanging_wuzapi_opens_the_breaker_and_ingest_is_unaffected(
    db, services, tenant: Tenant, wuzapi: Simulator, worker: CortexxProcess, ingest: CortexxProcess
):
    await _fast_tenant(db, tenant)
    await wuzapi.faults(hang=True)
    metrics_url = f"http://127.0.0.1:{worker.env['CORTEXX_WORKER_METRICS_PORT']}/metrics"
    async with httpx.AsyncClient(timeout=10) as client:
        before = metric((await client.get(metrics_url)).text, "cortexx_wuzapi_calls_total", outcome="timeout")
        messages = await _queue_replies(db, services, tenant, [f"49157722{i:05d}" for i in range(20)])

        async def opened():
            row = await db.fetchrow("SELECT state FROM wuzapi_breakers ORDER BY updated_at DESC LIMIT 1")
            return row is not None and row["state"] == "open"

        await wait_until(opened, timeout_s=30, what="the breaker open")
        text = (await client.get(metrics_url)).text
        assert metric(text, "cortexx_wuzapi_calls_total", outcome="timeout") - before >= 5
        assert metric(text, "cortexx_wuzapi_breaker_open") >= 1

        # Meanwhile ingest answers as fast as ever.
        latencies = []
        for i in range(20):
            sender = f"4915773{i:06d}"
            envelope = wa_envelope(
                [
                    wa_change(
                        phone_number_id="1",
                        display_phone_number="2",
                        messages=[
                            wa_message(
                                "text", wamid=f"wamid.{uuid.uuid4().hex}", from_=sender, timestamp=1750000000
                            )
                        ],
                    )
                ],
                waba_id="3",
            )
            t0 = time.perf_counter()
            response = await post_signed(client, ingest.url, tenant, envelope)
            latencies.append(time.perf_counter() - t0)
            assert response.status_code == 200
        assert max(latencies) < 0.5

    await wuzapi.faults(hang=False)
    await wait_until(lambda: _all_sent(db, messages), timeout_s=60, what="replies sent after the hang")
    # Every call that hung was delivered when the hang ended, and every retry of it went under
    # the same id: one message each to the 20 recipients.
    await _delivered_once(wuzapi, messages)
    assert await _dead_letters(services, tenant) == []


async def test_erratic_5xx_every_message_once_retries_in_metrics(
    db, services, tenant: Tenant, wuzapi: Simulator, worker: CortexxProcess
):
    await _fast_tenant(db, tenant)
    metrics_url = f"http://127.0.0.1:{worker.env['CORTEXX_WORKER_METRICS_PORT']}/metrics"
    async with httpx.AsyncClient(timeout=10) as client:
        before = metric((await client.get(metrics_url)).text, "cortexx_outbound_retries_total")
        await wuzapi.faults(error_rate=0.2, error_status=500)
        messages = await _queue_replies(
            db, services, tenant, [f"49157733{i:05d}" for i in range(50)], per_phone=4
        )
        await wait_until(
            lambda: _all_sent(db, messages), timeout_s=120, interval_s=0.5, what="200 replies sent"
        )
        after = metric((await client.get(metrics_url)).text, "cortexx_outbound_retries_total")
    assert after - before >= 10
    await _delivered_once(wuzapi, messages)
    assert await _dead_letters(services, tenant) == []


def _cortexx(services: ServiceUrls, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
    env.update(
        CORTEXX_DATABASE_URL=services.database_url,
        CORTEXX_KAFKA_BOOTSTRAP=services.kafka_bootstrap,
        CORTEXX_DATA_DIR=str(services.data_dir),
    )
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_a_400_is_dead_lettered_and_replay_after_the_fix_delivers_once(
    db, services, tenant: Tenant, wuzapi: Simulator
):
    phone = "4915774400001"
    await wuzapi.faults(fail_phones={phone: 400})
    good, bad = await _queue_replies(db, services, tenant, ["4915774400002", phone])
    await wait_until(lambda: _all_sent(db, [good]), what="the good reply")
    letters = await wait_until(lambda: _dead_letters(services, tenant), what="the dead letter")
    [(letter_id, letter)] = letters
    assert letter.error.type == "WuzapiPermanent"
    assert "400" in letter.error.message and letter.error.attempts == 1
    assert OutboundMessage.from_bytes(letter.value) == bad
    row = await db.fetchrow("SELECT status, error FROM messages WHERE external_id = $1", bad.id)
    assert row["status"] == "failed" and row["error"]["source"] == "wuzapi"

    listed = _cortexx(services, "dlq", "list", "--tenant", tenant.slug, "--json")
    assert listed.returncode == 0, listed.stderr
    summaries = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [s["id"] for s in summaries] == [letter_id]
    assert summaries[0]["error_type"] == "WuzapiPermanent"
    shown = _cortexx(services, "dlq", "show", letter_id)
    assert shown.returncode == 0 and bad.id in shown.stdout

    dry = _cortexx(services, "dlq", "replay", letter_id, "--dry-run")
    assert dry.returncode == 0 and "would replay 1" in dry.stdout
    await wuzapi.faults(fail_phones={})  # the cause is fixed
    replayed = _cortexx(services, "dlq", "replay", "--tenant", tenant.slug)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 1" in replayed.stdout
    await wait_until(lambda: _all_sent(db, [bad]), what="the replayed reply sent")

    sends_of_bad = (await wuzapi.ledger())["deliveries"][bad.gateway_id]["requests"]

    again = _cortexx(services, "dlq", "replay", letter_id)
    assert "replayed 0; skipped 1" in again.stdout
    forced = _cortexx(services, "dlq", "replay", letter_id, "--force")
    assert "replayed 1" in forced.stdout
    # Forced or not, the gateway sees the message once: the worker knows it was sent.
    marker = (await _queue_replies(db, services, tenant, ["4915774400003"]))[0]
    await wait_until(lambda: _all_sent(db, [marker]), what="a later reply")
    await _delivered_once(wuzapi, [good, bad, marker])
    # Same lane, so the forced replay was handled before the marker: it sent nothing at all, not
    # even a resend of the same id (which the ledger would count as one message).
    assert (await wuzapi.ledger())["deliveries"][bad.gateway_id]["requests"] == sends_of_bad


async def test_a_replay_that_fails_again_keeps_its_attempts(db, services, tenant: Tenant, wuzapi: Simulator):
    phone = "4915774500001"
    await wuzapi.faults(fail_phones={phone: 422})
    [message] = await _queue_replies(db, services, tenant, [phone])
    [(first_id, first)] = await wait_until(lambda: _dead_letters(services, tenant), what="first dead letter")
    assert _cortexx(services, "dlq", "replay", first_id).returncode == 0

    async def two():
        letters = await _dead_letters(services, tenant)
        return letters if len(letters) == 2 else None

    letters = await wait_until(two, what="second dead letter")
    second = next(letter for lid, letter in letters if lid != first_id)
    assert second.error.attempts == first.error.attempts + 1
    assert second.history == [first.error]
    assert second.value == first.value
    assert dict(second.header_bytes())["cortexx-replay-of"] == first_id.encode()
    # Refused twice: nothing reached the phone, under its id or any other, nor went anywhere
    # under its id.
    ledger = await wuzapi.ledger()
    assert message.gateway_id not in ledger["deliveries"]
    nothing = delivered_to(ledger, [phone])
    assert (nothing.total, nothing.deliveries, nothing.duplicates) == (0, {}, [])


async def test_unauthorized_token_dead_letters_with_the_reason(
    db, services, tenant: Tenant, wuzapi: Simulator
):
    await db.execute("UPDATE companies SET wuzapi_token = 'not-a-user' WHERE id = $1", tenant.id)
    await wuzapi.faults(fail_phones={})
    # The simulator accepts any token unless told otherwise; this one it refuses.
    async with httpx.AsyncClient() as client:
        await client.put(
            f"{wuzapi.url}/_sim/faults", content=orjson.dumps({"fail_phones": {"4915774600001": 401}})
        )
    await _queue_replies(db, services, tenant, ["4915774600001"])
    [(_, letter)] = await wait_until(lambda: _dead_letters(services, tenant), what="dead letter")
    assert letter.error.type == "WuzapiUnauthorized"


async def test_poison_outbound_record_is_dead_lettered(db, services, tenant: Tenant, wuzapi: Simulator):
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(WUZAPI_OUTBOUND, b"{not json", key=tenant.slug.encode())
    finally:
        await producer.stop()
    [message] = await _queue_replies(db, services, tenant, ["4915774700001"])
    await wait_until(lambda: _all_sent(db, [message]), what="the reply after the poison")

    async def poison():
        found = [
            DeadLetter.from_bytes(r.value)
            for r in await read_topic(services.kafka_bootstrap, WUZAPI_OUTBOUND_DLQ)
        ]
        return [f for f in found if f.value == b"{not json"]

    [letter] = await wait_until(poison, what="the poison dead letter")
    assert letter.error.type == "OutboundRecordError"


async def test_rate_limit_per_tenant_holds(db, services, tenant: Tenant, wuzapi: Simulator, worker):
    await db.execute(
        "UPDATE companies SET rate_limit_per_s = 5, rate_limit_burst = 1 WHERE id = $1", tenant.id
    )
    metrics_url = f"http://127.0.0.1:{worker.env['CORTEXX_WORKER_METRICS_PORT']}/metrics"
    async with httpx.AsyncClient() as client:
        before = metric((await client.get(metrics_url)).text, "cortexx_outbound_rate_limit_waits_total")
        messages = await _queue_replies(db, services, tenant, ["4915774800001"], per_phone=11)
        await wait_until(lambda: _all_sent(db, messages), timeout_s=30, what="11 replies")
        after = metric((await client.get(metrics_url)).text, "cortexx_outbound_rate_limit_waits_total")
    delivered = await wuzapi.delivered_to(["4915774800001"])
    delivered.assert_once({(m.to, m.text): m.gateway_id for m in messages})
    times = sorted(d["first_at"] for d in delivered.deliveries.values())
    assert len(times) == 11
    # 5 per second with a bucket of 1: ten gaps of at least ~0.2 s.
    assert times[-1] - times[0] >= 1.8
    assert after - before >= 5


async def test_auto_replies_once_per_window_even_when_redelivered(
    db, services, tenant: Tenant, wuzapi: Simulator, ingest
):
    await db.execute(
        "UPDATE companies SET welcome_message = 'Welcome to Test Co!', away_message = 'We are closed.', "
        "business_hours = NULL WHERE id = $1",
        tenant.id,
    )
    sender = "4915774900001"

    def inbound(i: int) -> dict:
        return wa_envelope(
            [
                wa_change(
                    phone_number_id="1",
                    display_phone_number="2",
                    contacts=[(sender, "Eve")],
                    messages=[
                        wa_message(
                            "text",
                            wamid=f"wamid.{tenant.slug}.{i}",
                            from_=sender,
                            timestamp=int(time.time()) + i,
                        )
                    ],
                )
            ],
            waba_id="3",
        )

    async with httpx.AsyncClient() as client:
        for envelope in (inbound(0), inbound(0), inbound(1), inbound(0)):
            assert (await post_signed(client, ingest.url, tenant, envelope)).status_code == 200

        async def welcomed():
            # Every message the gateway delivered to the sender, by body (not by expected id).
            return (await wuzapi.delivered_to([sender])).bodies(sender) or None

        assert await wait_until(welcomed, what="the welcome") == ["Welcome to Test Co!"]
        # Closed all week from now on: the next message gets the away reply, once.
        await db.execute("UPDATE companies SET business_hours = '{}'::jsonb WHERE id = $1", tenant.id)
        deadline = time.monotonic() + 20  # the worker re-reads company settings after a moment
        i = 2
        while time.monotonic() < deadline:
            for _ in range(2):
                assert (await post_signed(client, ingest.url, tenant, inbound(i))).status_code == 200
            bodies = await welcomed()
            if "We are closed." in bodies:
                break
            i += 1
            await asyncio.sleep(1)
        for _ in range(3):
            assert (await post_signed(client, ingest.url, tenant, inbound(i + 1))).status_code == 200
        # Same contact, same partition: once this one is stored, the ones before it were processed.
        assert (await post_signed(client, ingest.url, tenant, inbound(i + 2))).status_code == 200

        async def marker_stored():
            return await db.fetchval(
                "SELECT 1 FROM messages WHERE external_id = $1", f"wamid.{tenant.slug}.{i + 2}"
            )

        await wait_until(marker_stored, what="the last message stored")
    bodies = await wait_until(welcomed, what="both replies")
    assert sorted(bodies) == ["We are closed.", "Welcome to Test Co!"]
    replies = await db.fetch(
        "SELECT kind, window_key, outbound_id FROM auto_replies WHERE company_id = $1 ORDER BY kind",
        tenant.id,
    )
    assert [r["kind"] for r in replies] == ["away", "welcome"]
    # Each once, under the id its auto_replies row holds: none again under another id.
    texts = {"away": "We are closed.", "welcome": "Welcome to Test Co!"}
    delivered = await wuzapi.delivered_to([sender])
    delivered.assert_once(
        {(sender, texts[r["kind"]]): gateway_message_id(tenant.id, r["outbound_id"]) for r in replies}
    )
