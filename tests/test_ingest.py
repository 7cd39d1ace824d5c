"""The ingest contract: every status code, durability, and nothing produced for a refusal."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import orjson
import psutil
import pytest
from aiokafka.partitioner import DefaultPartitioner

from harness.meta_samples import sign, wa_change, wa_envelope, wa_message, wa_other_change
from infra.kafka.offsets import BrokerOffsets
from infra.kafka.producer import partition_index
from infra.kafka.topics import META_WEBHOOKS
from infra.postgres.tenants import Tenant
from tests.support import CortexxProcess, ServiceUrls, post_signed, read_topic

pytestmark = pytest.mark.usefixtures("ingest")


def _envelope(n_messages: int = 1, *, sender: str = "4915112345678") -> dict:
    messages = [
        wa_message("text", wamid=f"wamid.{uuid.uuid4().hex}", from_=sender, timestamp=1750000000 + i)
        for i in range(n_messages)
    ]
    change = wa_change(
        phone_number_id="1065", display_phone_number="15550001", messages=messages, contacts=[(sender, "Ann")]
    )
    return wa_envelope([change], waba_id="1022")


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


def _request_id(record: Any) -> str | None:
    """A record's request id; None for the poison records the worker's tests put on the topic."""
    try:
        return str(orjson.loads(record.value)["request_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


async def _request_ids_on_topic(services: ServiceUrls) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in await read_topic(services.kafka_bootstrap, META_WEBHOOKS):
        request_id = _request_id(record)
        if request_id is not None:
            counts[request_id] = counts.get(request_id, 0) + 1
    return counts


async def test_verification_handshake(client, ingest: CortexxProcess, tenant: Tenant):
    url = f"{ingest.url}/webhooks/meta/{tenant.slug}"
    ok = await client.get(
        url,
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": tenant.verify_token,
            "hub.challenge": "1158201444",
        },
    )
    assert ok.status_code == 200
    assert ok.text == "1158201444"
    assert ok.headers["content-type"].startswith("text/plain")
    wrong = await client.get(
        url, params={"hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "1"}
    )
    assert wrong.status_code == 403
    assert wrong.json()["error"] == "verification_failed"
    bad_mode = await client.get(
        url, params={"hub.mode": "unsubscribe", "hub.verify_token": tenant.verify_token}
    )
    assert bad_mode.status_code == 403
    unknown = await client.get(
        f"{ingest.url}/webhooks/meta/no-such-co", params={"hub.mode": "subscribe", "hub.verify_token": "x"}
    )
    assert unknown.status_code == 404


async def test_signed_post_is_on_the_topic_when_answered(
    client, ingest: CortexxProcess, services: ServiceUrls, tenant: Tenant
):
    request_id = uuid.uuid4().hex
    response = await post_signed(client, ingest.url, tenant, _envelope(3), request_id=request_id)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    # 200 means acknowledged with acks=all: the records are readable right away.
    assert (await _request_ids_on_topic(services)).get(request_id) == 3
    # One log event per POST, carrying what traces it.
    events = [
        orjson.loads(line) for line in ingest.log_path.read_bytes().splitlines() if line.startswith(b"{")
    ]
    accepted = [
        e for e in events if e.get("event") == "webhook.accepted" and e.get("request_id") == request_id
    ]
    assert len(accepted) == 1
    assert accepted[0]["tenant"] == tenant.slug
    assert accepted[0]["topic"] == META_WEBHOOKS
    assert accepted[0]["records"] == 3


def test_cached_partitioner_is_aiokafkas():
    """The producer's cached key -> partition is aiokafka's default partitioner, so a key's
    records land where they always did and keep their order."""
    for count in (1, 3, 4, 12):
        partitions = list(range(count))
        for i in range(2000):
            key = f"tenant-{i % 7}:1065:4915{i:08d}".encode()
            expected = DefaultPartitioner()(key, partitions, partitions)
            assert partitions[partition_index(key, count)] == expected
            assert partitions[partition_index(key, count)] == expected  # from the cache


async def test_batched_post_keeps_every_record_and_each_conversations_order(
    client, ingest: CortexxProcess, services: ServiceUrls, tenant: Tenant
):
    """A many-record POST is produced one batch per partition: every record is kept, each on
    its key's partition, in the order Meta sent them."""
    senders = [f"4917000{c:05d}" for c in range(12)]
    changes = []
    for i in range(10):  # interleaved: contact 0..11 each send message i
        for sender in senders:
            message = wa_message("text", wamid=f"wamid.{sender}.{i}", from_=sender, timestamp=1750000000 + i)
            changes.append(
                wa_change(
                    phone_number_id="1065",
                    display_phone_number="15550001",
                    messages=[message],
                    contacts=[(sender, "Ann")],
                )
            )
    request_id = uuid.uuid4().hex
    response = await post_signed(
        client, ingest.url, tenant, wa_envelope(changes, waba_id="1022"), request_id=request_id
    )
    assert response.status_code == 200, response.text
    ours = [
        r for r in await read_topic(services.kafka_bootstrap, META_WEBHOOKS) if _request_id(r) == request_id
    ]
    assert len(ours) == 120
    offsets = BrokerOffsets(services.kafka_bootstrap)
    await offsets.start()
    try:
        partitions = [tp.partition for tp in await offsets.partitions([META_WEBHOOKS])]
    finally:
        await offsets.stop()
    assert len(partitions) > 1
    by_key: dict[bytes, list] = {}
    for record in sorted(ours, key=lambda r: (r.partition, r.offset)):
        by_key.setdefault(record.key, []).append(record)
    assert len(by_key) == 12
    for key, records in by_key.items():
        assert {r.partition for r in records} == {DefaultPartitioner()(key, partitions, partitions)}
        values = [orjson.loads(r.value) for r in records]
        sender = key.decode().rsplit(":", 1)[1]
        assert [v["payload"]["messages"][0]["id"] for v in values] == [
            f"wamid.{sender}.{i}" for i in range(10)
        ]
        assert [v["seq"] for v in values] == sorted(v["seq"] for v in values)


async def test_every_update_of_a_large_batch_is_kept(
    client, ingest: CortexxProcess, services: ServiceUrls, tenant: Tenant
):
    """Meta batches up to 1,000 updates: every entry and change, not only the first."""
    changes = []
    for i in range(10):
        env = _envelope(10, sender=f"49151000{i:05d}")
        changes.extend(env["entry"][0]["changes"])
    entries = [{"id": f"waba{j}", "changes": changes[j * 10 : (j + 1) * 10]} for j in range(10)]
    envelope = {"object": "whatsapp_business_account", "entry": entries}
    request_id = uuid.uuid4().hex
    response = await post_signed(client, ingest.url, tenant, envelope, request_id=request_id)
    assert response.status_code == 200, response.text
    assert (await _request_ids_on_topic(services)).get(request_id) == 100


async def test_refusals_have_their_status_and_produce_nothing(
    client, ingest: CortexxProcess, services: ServiceUrls, tenant: Tenant
):
    good = orjson.dumps(_envelope())
    url = f"{ingest.url}/webhooks/meta/{tenant.slug}"
    cases: list[tuple[str, int, str, bytes, dict[str, str | bytes]]] = []

    def case(name: str, status: int, code: str, body: bytes, signature: str | bytes | None) -> None:
        headers: dict[str, str | bytes] = {"X-Request-Id": f"{name}-{uuid.uuid4().hex}"}
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature
        cases.append((name, status, code, body, headers))

    case("tampered", 401, "bad_signature", good.replace(b"Ann", b"Bob"), sign(good, tenant.app_secret))
    case("missing-signature", 401, "bad_signature", good, None)
    case("wrong-secret", 401, "bad_signature", good, sign(good, "not-the-secret"))
    case("malformed-signature", 401, "bad_signature", good, "md5=abc")
    # Header values arrive as latin-1 text; one that is not ASCII is a wrong signature, not a 500.
    case("non-ascii-signature", 401, "bad_signature", good, ("sha256=" + "é" * 64).encode("latin-1"))
    case("utf8-signature", 401, "bad_signature", good, ("sha256=" + "ü" * 32).encode("utf-8"))
    deep: object = "bottom"
    for _ in range(300):
        deep = {"nested": deep}
    nested = _envelope()
    nested["entry"][0]["changes"][0]["value"]["extra"] = deep  # copied into the change's record
    too_deep = json.dumps(nested).encode()  # orjson writes 254 levels at most
    case("nested-300-deep", 422, "invalid_envelope", too_deep, sign(too_deep, tenant.app_secret))
    not_json = b"{'object': whatsapp"
    case("not-json", 400, "invalid_json", not_json, sign(not_json, tenant.app_secret))
    for i, doc in enumerate(
        [
            [],
            {"entry": []},
            {"object": "page"},
            {"object": "page", "entry": []},
            {"object": "page", "entry": [{"id": "1"}]},
            {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": 3}]}]},
            {
                "object": "whatsapp_business_account",
                "entry": [{"id": "1", "changes": [{"field": "x", "value": []}]}],
            },
            {"object": "page", "entry": [{"id": "1", "messaging": ["x"]}]},
            "just a string",
        ]
    ):
        body = orjson.dumps(doc)
        case(f"envelope{i}", 422, "invalid_envelope", body, sign(body, tenant.app_secret))

    for name, status, code, body, headers in cases:
        response = await client.post(url, content=body, headers=headers)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"] == code, name
        assert response.json()["detail"]

    # The oversize body, declared and streamed without a length.
    big = b'{"object":"page","entry":[' + b" " * (4 * 1024 * 1024) + b"]}"
    declared = await client.post(
        url, content=big, headers={"X-Hub-Signature-256": sign(big, tenant.app_secret)}
    )
    assert declared.status_code == 413
    assert declared.json()["error"] == "body_too_large"

    async def chunks():
        for _ in range(5):
            yield b" " * (1024 * 1024)

    streamed = await client.post(url, content=chunks(), headers={"X-Hub-Signature-256": "sha256=00"})
    assert streamed.status_code == 413

    unknown = await post_signed(client, ingest.url, Tenant(0, "no-such-co", "", "x", "x"), _envelope())
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "unknown_tenant"
    invalid_slug = await client.post(f"{ingest.url}/webhooks/meta/NOT_A_SLUG", content=good)
    assert invalid_slug.status_code == 404

    # An accepted request afterwards proves the topic was read up to date; none of the refused are on it.
    marker = uuid.uuid4().hex
    assert (await post_signed(client, ingest.url, tenant, _envelope(), request_id=marker)).status_code == 200
    on_topic = await _request_ids_on_topic(services)
    assert marker in on_topic
    refused = {headers["X-Request-Id"] for _, _, _, _, headers in cases}
    assert not refused & set(on_topic)


async def test_body_limit_admits_the_largest_batch(client, ingest: CortexxProcess, tenant: Tenant):
    """1,000 updates of realistic size fit under the default 4 MiB limit."""
    envelope = wa_envelope(
        [
            wa_other_change(
                "message_template_status_update",
                {
                    "event": "APPROVED",
                    "message_template_id": i,
                    "message_template_name": "x" * 200,
                    "message_template_language": "en_US",
                    "reason": None,
                },
            )
            for i in range(1000)
        ],
        waba_id="1022",
    )
    body = orjson.dumps(envelope)
    assert 200_000 < len(body) < 4 * 1024 * 1024
    response = await post_signed(client, ingest.url, tenant, body)
    assert response.status_code == 200, response.text


async def test_one_post_cannot_multiply_into_more_than_its_budget(
    client, ingest: CortexxProcess, services: ServiceUrls, tenant: Tenant
):
    """Each message's record copies its change's other fields: a 1 MiB extra field beside 1,000
    messages would be a gigabyte of records. Such a POST is refused whole (413, nothing kept, no
    gigabyte in memory); a single update too large for the broker is refused the same way, instead of
    a 503 that Meta would retry forever; a legitimate batch of Meta's largest size still goes through."""
    assert ingest.proc is not None
    rss_before = psutil.Process(ingest.proc.pid).memory_info().rss

    amplified = _envelope(1000)
    amplified["entry"][0]["changes"][0]["value"]["extra"] = "x" * (1024 * 1024)
    wide = _envelope(1)
    wide["entry"][0]["changes"][0]["value"]["messages"][0]["text"]["body"] = "y" * 1_100_000
    many = _envelope(6000)  # tiny records, but more than a POST may make
    ids = {}
    for name, envelope in (("amplified", amplified), ("one-huge-update", wide), ("too-many", many)):
        ids[name] = request_id = f"{name}-{uuid.uuid4().hex}"
        response = await post_signed(client, ingest.url, tenant, envelope, request_id=request_id)
        assert response.status_code == 413, (name, response.text)
        assert response.json()["error"] == "envelope_too_large", name
        assert response.json()["detail"]
    # The budget is checked while records are built: far less than the gigabyte the copies would take.
    assert psutil.Process(ingest.proc.pid).memory_info().rss - rss_before < 200 * 1024 * 1024

    # Meta's largest batch: 1,000 messages of near WhatsApp's longest text, under the 4 MiB body limit.
    largest = _envelope(1000)
    for message in largest["entry"][0]["changes"][0]["value"]["messages"]:
        message["text"]["body"] = "z" * 3900
    assert 3.5 * 1024 * 1024 < len(orjson.dumps(largest)) < 4 * 1024 * 1024
    marker = uuid.uuid4().hex
    response = await post_signed(client, ingest.url, tenant, largest, request_id=marker)
    assert response.status_code == 200, response.text
    on_topic = await _request_ids_on_topic(services)
    assert on_topic.get(marker) == 1000
    assert not set(ids.values()) & set(on_topic)


async def test_broker_unreachable_answers_503_never_200(client, services: ServiceUrls, tenant: Tenant):
    # An ingest whose broker address answers nothing: Meta must be told to retry.
    from harness.embedded import free_port

    dead = CortexxProcess.ingest(services, bootstrap=f"127.0.0.1:{free_port()}", produce_timeout_s=1.0)
    dead.start()
    try:
        response = await post_signed(client, dead.url, tenant, _envelope())
        assert response.status_code == 503
        assert response.json()["error"] == "broker_unavailable"
    finally:
        dead.stop()


async def test_paused_broker_answers_503_then_recovers(
    client, ingest: CortexxProcess, services: ServiceUrls, tenant: Tenant
):
    if services.broker is None:
        pytest.skip("the broker is given by URL; only an embedded broker can be paused here")
    assert (await post_signed(client, ingest.url, tenant, _envelope())).status_code == 200
    services.broker.pause()
    try:
        request_id = uuid.uuid4().hex
        response = await post_signed(client, ingest.url, tenant, _envelope(), request_id=request_id)
        assert response.status_code == 503
    finally:
        services.broker.resume()
    for _ in range(50):
        response = await post_signed(client, ingest.url, tenant, _envelope())
        if response.status_code == 200:
            break
        await asyncio.sleep(0.2)
    assert response.status_code == 200


async def test_tenant_lookups_are_cached_and_counted(client, ingest: CortexxProcess, tenant: Tenant):
    def counts(text: str) -> dict[str, float]:
        out = {}
        for line in text.splitlines():
            if line.startswith("cortexx_ingest_tenant_cache_total{"):
                result = line.split('result="')[1].split('"')[0]
                out[result] = float(line.rsplit(" ", 1)[1])
        return out

    before = counts((await client.get(f"{ingest.url}/metrics")).text)
    for _ in range(5):
        assert (await post_signed(client, ingest.url, tenant, _envelope())).status_code == 200
    after = counts((await client.get(f"{ingest.url}/metrics")).text)
    assert after["miss"] - before.get("miss", 0) == 1
    assert after["hit"] - before.get("hit", 0) == 4


async def test_health(client, ingest: CortexxProcess):
    response = await client.get(f"{ingest.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert (await client.get(f"{ingest.url}/nope")).json()["error"] == "not_found"


async def test_a_contact_whose_wa_id_is_not_a_string_is_stored_not_a_500(
    client, ingest: CortexxProcess, services: ServiceUrls, tenant: Tenant
):
    """Valid JSON in an odd shape is kept as Meta sent it: the contact cannot be matched to its
    message's sender, so it travels with the message."""
    for odd in (["4915550001"], {"id": "4915550001"}):
        envelope = _envelope(1)
        change = envelope["entry"][0]["changes"][0]["value"]
        change["contacts"] = [{"wa_id": odd, "profile": {"name": "Odd"}}]
        request_id = uuid.uuid4().hex
        response = await post_signed(client, ingest.url, tenant, envelope, request_id=request_id)
        assert response.status_code == 200, response.text
        assert (await _request_ids_on_topic(services)).get(request_id) == 1
