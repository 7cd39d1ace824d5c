"""Hostile requests by kind against a real ingest and read API: every one gets its 4xx with the
JSON error body, none a 5xx, and the figures (cases by kind, answers by status) go to
RELIABILITY.md. The deep cases of each kind live beside their contract; this is the census."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from harness.meta_samples import sign, wa_change, wa_envelope, wa_message
from infra.postgres.tenants import Tenant
from tests.api.world import PASSWORD, Company, auth, login, new_company
from tests.faults.report import record
from tests.support import CortexxProcess, ServiceUrls

Case = tuple[str, str, dict[str, Any]]  # method, path, httpx request arguments


def _envelope(n: int = 1, **value: Any) -> dict[str, Any]:
    sender = "4915112345678"
    messages = [
        wa_message("text", wamid=f"wamid.{uuid.uuid4().hex}", from_=sender, timestamp=1750000000 + i)
        for i in range(n)
    ]
    change = wa_change(phone_number_id="1065", display_phone_number="15550001", messages=messages)
    change["value"].update(value)
    return wa_envelope([change], waba_id="1022")


def _signed(tenant: Tenant, body: bytes, signature: str | bytes | None = None) -> Case:
    headers: dict[str, str | bytes] = {"content-type": "application/json"}
    headers["X-Hub-Signature-256"] = sign(body, tenant.app_secret) if signature is None else signature
    return "POST", f"/webhooks/meta/{tenant.slug}", {"content": body, "headers": headers}


def _ingest_cases(tenant: Tenant) -> dict[str, list[Case]]:
    good = orjson.dumps(_envelope())
    deep: object = "x"
    for _ in range(300):
        deep = [deep]
    signatures = [
        _signed(tenant, good.replace(b"1065", b"1066"), sign(good, tenant.app_secret)),
        _signed(tenant, good, sign(good, "wrong")),
        _signed(tenant, good, ""),
        _signed(tenant, good, "sha1=" + "0" * 40),
        *(_signed(tenant, good, ("sha256=" + ch * 64).encode("latin-1")) for ch in "éÿ\x80"),
        _signed(tenant, good, ("sha256=" + "ü" * 32).encode()),
    ]
    bodies = [
        _signed(tenant, b"{"),
        _signed(tenant, b"\xff\xfe"),
        _signed(tenant, b'{"object": NaN}'),
        _signed(tenant, json.dumps(_envelope(extra=deep)).encode()),
        *(
            _signed(tenant, orjson.dumps(doc))
            for doc in ([], "s", 1, {"object": "page"}, {"object": "page", "entry": "x"}, {"entry": []})
        ),
    ]
    sizes = [
        _signed(tenant, b" " * (4 * 1024 * 1024 + 1)),
        _signed(tenant, orjson.dumps(_envelope(1000, extra="x" * (1024 * 1024)))),
        _signed(tenant, orjson.dumps(_envelope(6000))),
    ]
    slugs = [
        ("POST", path, {"content": good, "headers": {"X-Hub-Signature-256": sign(good, "x")}})
        for path in (
            "/webhooks/meta/no-such-co",
            "/webhooks/meta/..%2f..%2fetc",
            "/webhooks/meta/%00",
            "/webhooks/",
        )
    ]
    verify = [
        ("GET", f"/webhooks/meta/{tenant.slug}", {"params": {"hub.mode": "subscribe", "hub.verify_token": t}})
        for t in ("wrong", "é" * 8, "", tenant.verify_token + "x")
    ]
    return {
        "ingest: forged or odd signatures": signatures * 25,
        "ingest: bodies that are not a Meta envelope": bodies * 20,
        "ingest: bodies too large, or that would multiply": sizes,
        "ingest: unknown or odd company paths": slugs * 25,
        "ingest: wrong verification tokens": verify * 25,
    }


def _api_cases(x: Company, y: Company, cookie: str) -> dict[str, list[Case]]:
    theirs = y.conversations[0]
    with_cookie = auth(cookie)
    forged = [
        {"cookie": f"cortexx_session={value}"}
        for value in (
            "x",
            "a.b",
            secrets.token_urlsafe(43) + "." + secrets.token_urlsafe(43),
            "é".encode().hex(),
        )
    ]
    anonymous = [
        ("GET", path, {"headers": headers})
        for path in ("/api/v1/conversations", "/api/v1/notifications", "/api/v1/conversations/counts", "/ops")
        for headers in ({}, *forged)
    ]
    cross_tenant = [
        ("GET", f"/api/v1/conversations/{theirs}", {"headers": with_cookie}),
        ("GET", f"/api/v1/conversations/{theirs}/messages", {"headers": with_cookie}),
        (
            "POST",
            f"/api/v1/conversations/{theirs}/messages",
            {"headers": with_cookie, "json": {"text": "hi"}},
        ),
        ("POST", f"/api/v1/notifications/{y.notifications[0]}/read", {"headers": with_cookie}),
        ("GET", "/api/v1/conversations", {"headers": with_cookie, "params": {"cursor": "eyJ4Ijox"}}),
    ]
    mine = x.conversations[0]
    malformed = [
        ("POST", f"/api/v1/conversations/{mine}/messages", {"headers": with_cookie, "content": b"{"}),
        ("POST", f"/api/v1/conversations/{mine}/messages", {"headers": with_cookie, "json": {"text": ""}}),
        (
            "POST",
            f"/api/v1/conversations/{mine}/messages",
            {"headers": with_cookie, "json": {"text": "x" * 5000}},
        ),
        (
            "POST",
            f"/api/v1/conversations/{mine}/messages",
            {"headers": with_cookie, "json": {"text": "a", "id": "Z"}},
        ),
        ("GET", "/api/v1/conversations", {"headers": with_cookie, "params": {"limit": "-1"}}),
        ("GET", "/api/v1/conversations", {"headers": with_cookie, "params": {"status": "x' OR 1=1"}}),
        ("GET", "/api/v1/conversations/99999999999999999999", {"headers": with_cookie}),
        ("POST", "/api/v1/sessions", {"json": {"email": ["x"], "password": 1}}),
    ]
    too_large = [
        ("POST", "/api/v1/sessions", {"content": b"{" + b" " * (300 * 1024) + b"}"}),
        (
            "POST",
            f"/api/v1/conversations/{mine}/messages",
            {"headers": with_cookie, "content": b" " * (300 * 1024)},
        ),
    ]
    return {
        "api: no, forged or odd session cookies": anonymous * 5,
        "api: another company's rows": cross_tenant * 20,
        "api: malformed requests": malformed * 12,
        "api: bodies over the limit": too_large * 5,
    }


async def _census(
    client: httpx.AsyncClient, base: str, cases: dict[str, list[Case]]
) -> dict[str, Counter[int]]:
    answers: dict[str, Counter[int]] = {}
    limit = asyncio.Semaphore(16)

    async def one(kind: str, method: str, path: str, kwargs: dict[str, Any]) -> None:
        async with limit:
            response = await client.request(method, base + path, **kwargs)
        answers.setdefault(kind, Counter())[response.status_code] += 1
        if response.status_code != 200 and response.headers.get("content-type", "").startswith(
            "application/json"
        ):
            body = response.json()
            assert body.get("error") and body.get("detail"), (kind, path, body)
        if response.status_code >= 500:
            pytest.fail(f"{kind}: {method} {path} answered {response.status_code}: {response.text[:300]}")

    await asyncio.gather(
        *(one(kind, method, path, kwargs) for kind, group in cases.items() for method, path, kwargs in group)
    )
    return answers


def _by_status(answers: Counter[int]) -> dict[str, int]:
    return {str(status): n for status, n in sorted(answers.items())}


def _rows(answers: dict[str, Counter[int]]) -> Iterator[tuple[str, int, dict[str, int]]]:
    for kind, counts in answers.items():
        yield kind, sum(counts.values()), _by_status(counts)


async def test_hostile_requests_get_their_4xx_and_never_a_5xx(
    services: ServiceUrls, tenant: Tenant, db: asyncpg.Connection
):
    x, y = await new_company(db), await new_company(db)
    ingest = CortexxProcess.ingest(services)
    api = CortexxProcess.api(services)
    for process in (ingest, api):
        process.start()
    try:
        # An address of its own (uvicorn believes X-Forwarded-For from loopback): the login limits
        # are counted in Postgres, where the other tests' attempts from 127.0.0.1 are too.
        address = f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"
        async with httpx.AsyncClient(timeout=60, headers={"X-Forwarded-For": address}) as client:
            cookie = await login(client, api, x.agent)
            answers = await _census(client, ingest.url, _ingest_cases(tenant))
            answers |= await _census(client, api.url, _api_cases(x, y, cookie))
            # Guessing one user's password: refused, then refused before any hashing, never in.
            guesses = Counter[int]()
            for i in range(30):
                response = await client.post(
                    f"{api.url}/api/v1/sessions", json={"email": x.colleague.email, "password": f"guess{i}"}
                )
                guesses[response.status_code] += 1
            right = await client.post(
                f"{api.url}/api/v1/sessions", json={"email": x.colleague.email, "password": PASSWORD}
            )
            guesses[right.status_code] += 1
            answers["api: password guessing, 30 wrong then the right one"] = guesses
    finally:
        for process in (api, ingest):
            process.stop()
    expected: dict[str, Callable[[int], bool]] = {
        "ingest: forged or odd signatures": lambda s: s == 401,
        "ingest: bodies that are not a Meta envelope": lambda s: s in (400, 422),
        "ingest: bodies too large, or that would multiply": lambda s: s == 413,
        "ingest: unknown or odd company paths": lambda s: s in (404, 405),
        "ingest: wrong verification tokens": lambda s: s == 403,
        # The console's pages send a browser to its login page instead.
        "api: no, forged or odd session cookies": lambda s: s in (401, 303),
        "api: another company's rows": lambda s: s in (400, 404),
        "api: malformed requests": lambda s: s in (400, 401, 404, 422),
        "api: bodies over the limit": lambda s: s == 413,
        "api: password guessing, 30 wrong then the right one": lambda s: s in (401, 429),
    }
    for kind, counts in answers.items():
        assert all(expected[kind](status) for status in counts), (kind, counts)
    assert answers["api: password guessing, 30 wrong then the right one"][429] >= 20
    total = sum(sum(c.values()) for c in answers.values())
    record(
        "hostile requests by kind",
        requests=total,
        kinds=[{"kind": kind, "requests": n, "answers": by} for kind, n, by in _rows(answers)],
        server_errors=0,
    )
