"""Property-based fuzz of the ingest endpoint (hypothesis, 5,000 cases against the real process):
never a 5xx, never a crash, and no record on the topic for a request that was refused."""

from __future__ import annotations

import asyncio
import json
import uuid
from urllib.parse import quote

import httpx
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.meta_samples import sign
from infra.kafka.topics import META_WEBHOOKS
from infra.postgres.tenants import Tenant
from tests.faults.report import record
from tests.support import CortexxProcess, ServiceUrls, read_topic

ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
changes = st.fixed_dictionaries(
    {
        "field": st.one_of(st.just("messages"), st.text(max_size=12), ints),
        "value": st.one_of(
            json_values, st.fixed_dictionaries({"messages": json_values, "statuses": json_values})
        ),
    }
)
entries = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=10), ints, st.none())},
    optional={
        "changes": st.one_of(st.lists(changes, max_size=3), json_values),
        "messaging": st.one_of(st.lists(json_values, max_size=3), json_values),
        "time": json_values,
    },
)
envelopes = st.fixed_dictionaries(
    {"object": st.one_of(st.sampled_from(["whatsapp_business_account", "page", "instagram"]), json_values)},
    optional={"entry": st.one_of(st.lists(entries, max_size=3), json_values)},
)


def dump(value: object) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # a value orjson refuses (e.g. a huge int): the stdlib writes it anyway
        return json.dumps(value, default=str).encode()


# Bodies JSON encoders will not produce: huge numbers, deep nesting, lone surrogates, NaN.
nasty = st.sampled_from(
    [
        b'{"object":"page","entry":[{"id":123456789012345678901234567890,"messaging":[{}]}]}',
        b'{"object":"page","entry":[{"id":"1","time":1e999,"messaging":[{"timestamp":-1e999}]}]}',
        b"[" * 5000 + b"]" * 5000,
        b'{"object":"\\ud800","entry":[{"id":"1","messaging":[{}]}]}',
        b'{"object":NaN}',
        b'{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages",'
        b'"value":{"messages":[{"id":"w","from":"1","timestamp":"99999999999999999999","type":"text"}]}}]}]}',
    ]
)
bodies = st.one_of(
    nasty,
    envelopes.map(dump),
    json_values.map(dump),
    st.binary(max_size=300),
    st.text(max_size=300).map(str.encode),
)
# Mostly the real tenant and a valid signature, so most cases reach the envelope checks.
signatures = st.sampled_from(["valid", "valid", "valid", "missing", "wrong", "garbage"])
slugs = st.one_of(st.just("<tenant>"), st.just("<tenant>"), st.just("<tenant>"), st.text(max_size=20))


def test_fuzz_ingest_no_5xx_and_refusals_produce_nothing(
    ingest: CortexxProcess, services: ServiceUrls, tenant: Tenant
):
    refused: set[str] = set()
    accepted: set[str] = set()
    statuses: dict[int, int] = {}
    client = httpx.Client(timeout=10)

    @settings(
        max_examples=5000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=bodies, signature=signatures, slug=slugs)
    def case(body: bytes, signature: str, slug: str) -> None:
        request_id = uuid.uuid4().hex
        headers = {"X-Request-Id": request_id, "Content-Type": "application/json"}
        if signature == "valid":
            headers["X-Hub-Signature-256"] = sign(body, tenant.app_secret)
        elif signature == "wrong":
            headers["X-Hub-Signature-256"] = sign(body, "not-the-secret")
        elif signature == "garbage":
            headers["X-Hub-Signature-256"] = "sha256=" + body[:10].hex()
        target = tenant.slug if slug == "<tenant>" else quote(slug, safe="")
        response = client.post(f"{ingest.url}/webhooks/meta/{target}", content=body, headers=headers)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text, body[:200])
        if response.status_code == 200:
            accepted.add(request_id)
        else:
            assert response.headers["content-type"].startswith("application/json")
            assert "error" in response.json()
            refused.add(request_id)

    try:
        case()
    finally:
        client.close()
    assert ingest.proc is not None and ingest.proc.poll() is None, "ingest must survive the fuzz"
    on_topic = {
        orjson.loads(r.value)["request_id"]
        for r in asyncio.run(read_topic(services.kafka_bootstrap, META_WEBHOOKS, timeout_s=60))
    }
    assert not refused & on_topic
    assert accepted <= on_topic
    record(
        "ingest fuzz (hypothesis)",
        cases=len(refused) + len(accepted),
        acknowledged=len(accepted),
        refused=len(refused),
        refused_on_topic=len(refused & on_topic),
        server_errors=0,
        statuses=statuses,
    )
