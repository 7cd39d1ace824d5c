"""The API's pool skips asyncpg's reset statement on release (api/service.py): that is only safe
while no statement the API runs leaves session state behind on a pooled connection (a SET, a
LISTEN, an advisory lock, a cursor or prepared statement made by SQL, set_config(..., false), a
temporary table). Two guarantees, neither a scan of module constants:

- Structural: `Query`, `CompanyQuery` and `UserQuery` (api/db.py) refuse such SQL when they are
  built, so a statement written anywhere in the API fails at import, before any request.
- Behavioural: a real API whose every connection to Postgres goes through a wire proxy
  (tests/pg_wire.py) serves every route it has (the test checks that against the app's routers),
  and after each request the proxy asks the pooled connections themselves, on their own session,
  what they carry: settings changed in the session, channels listened to, cursors, statements
  prepared by SQL, temporary relations, advisory locks, the custom setting the schema's trigger
  uses. The proxy also sees every statement text the API sent, by whatever code (asyncpg's own
  included, and the console's dead-letter statements from infra/kafka/replay.py, which run as
  raw SQL on the API's connection): each must pass the same rule as a Query, and every declared
  statement must have been sent (what the exercise did not run, it did not test). From a separate
  connection, the API's backends are idle (not idle in a transaction) and hold no lock.

What it cannot see: state made inside a server-side function (the schema's functions use only
set_config(..., true) and a function-level SET, both undone with their transaction or call), a
custom setting other than the one it asks for by name (pg_settings does not list placeholders),
and routes it does not call (hence the check that it calls them all). The pool has two
connections, not one, and the probe asks each: the console's dead-letter views hold the request's
connection (the operator's session) and take a second for the dead letters; with a pool of one,
GET /api/v1/ops/dead-letters waited for it and answered 503 at the request's deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import pkgutil
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from fastapi.routing import APIRoute

import api
from api.db import CompanyQuery, Query, UserQuery, session_state
from infra.kafka import replay as dlq
from infra.kafka.deadletters import letter_for
from infra.kafka.topics import WUZAPI_OUTBOUND, WUZAPI_OUTBOUND_DLQ
from schemas.outbound import OutboundMessage
from tests.api.world import PASSWORD, Company, add_conversation, auth, new_company, session_cookie
from tests.pg_wire import WireRecorder
from tests.support import CortexxProcess, ServiceUrls, wait_until

# Asked of each pooled connection, on its own session, between requests.
SESSION_PROBE = """
SELECT pg_backend_pid(),
       (SELECT coalesce(string_agg(name || '=' || setting, ', ' ORDER BY name), '')
          FROM pg_settings WHERE source = 'session'),
       (SELECT coalesce(string_agg(channel, ', '), '') FROM pg_listening_channels() AS channel),
       (SELECT coalesce(string_agg(name, ', '), '') FROM pg_cursors WHERE name <> ''),
       (SELECT coalesce(string_agg(name, ', '), '') FROM pg_prepared_statements WHERE from_sql),
       (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
       (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'),
       coalesce(current_setting('cortexx.counts_folded', true), '')
"""
PROBED = ("settings", "listening", "cursors", "prepared", "temp_relations", "advisory_locks", "counts_folded")
CLEAN = {"settings": "", "listening": "", "cursors": "", "prepared": "", "temp_relations": "0",
         "advisory_locks": "0", "counts_folded": ""}  # fmt: skip


# Structural ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SET statement_timeout = 0",
        "  set search_path TO other",
        "SET LOCAL lock_timeout = '1s'",
        "RESET ALL",
        "SELECT 1; LISTEN changes",
        "-- a comment first\nSET application_name = 'x'",
        "/* a comment */ DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "PREPARE q AS SELECT 1",
        "DEALLOCATE ALL",
        "DISCARD TEMP",
        "LOAD 'auto_explain'",
        "CREATE TEMP TABLE t (a int)",
        "CREATE LOCAL TEMPORARY TABLE t (a int)",
        "SELECT * INTO TEMP t FROM companies",
        "SELECT set_config('search_path', 'x', false)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock_shared(1, 2)",
    ],
)
def test_a_statement_that_leaves_session_state_is_refused_when_built(sql: str) -> None:
    assert session_state(sql) is not None
    with pytest.raises(ValueError, match="session state"):
        Query("probe", sql)
    with pytest.raises(ValueError, match="session state"):
        CompanyQuery("probe", f"{sql} -- WHERE company_id = $1")
    with pytest.raises(ValueError, match="session state"):
        UserQuery("probe", f"{sql} -- WHERE company_id = $1 AND user_id = $2")


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE users\n   SET name = $2 WHERE company_id = $1",
        "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = EXCLUDED.a",
        "SELECT setting FROM pg_settings WHERE name = 'offset'",
        "SELECT pg_advisory_xact_lock(1)",  # released with its transaction
        "SELECT 'a; b' AS reset_at",
        "WITH settled AS (SELECT 1) SELECT * FROM settled",
    ],
)
def test_a_statement_that_leaves_nothing_is_built(sql: str) -> None:
    assert session_state(sql) is None
    Query("probe", sql)


def test_the_replay_statements_the_console_runs_raw_pass_the_rule() -> None:
    """infra/kafka/replay.py's statements run on the API's connection as raw SQL (shared with the
    CLI): built as Queries here, so that the rule covers them without a request too."""
    for name in ("REPLAYED", "RECORD_REPLAY"):
        Query(name, getattr(dlq, name))


# Behavioural ---------------------------------------------------------------------------------


def _declared_statements() -> dict[str, str]:
    """Every Query, CompanyQuery and UserQuery in the api package, and the replay statements
    that the console runs raw: sql -> name."""
    found: dict[str, str] = {}
    for module_info in pkgutil.walk_packages(api.__path__, "api."):
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if isinstance(value, Query | CompanyQuery | UserQuery):
                found[value.sql] = value.name
    found[dlq.REPLAYED] = "dlq.replayed"
    found[dlq.RECORD_REPLAY] = "dlq.record_replay"
    return found


def _app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of the API's routers, as api/app.py includes them."""
    from api.ops import routes as ops
    from api.routes import conversations, health, notifications, sessions

    routers = (health.router, sessions.router, conversations.router, notifications.router, ops.api, ops.pages)
    return {
        (method, route.path)
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }


class Exercise:
    """Requests to the API, each followed by a look at every pooled connection's session."""

    def __init__(self, client: httpx.AsyncClient, base: str, recorder: WireRecorder) -> None:
        self.client = client
        self.base = base
        self.recorder = recorder
        self.routes: set[tuple[str, str]] = set()
        self.backends: set[int] = set()

    async def call(
        self,
        method: str,
        route: str,
        *,
        cookie: str | None = None,
        expect: int | tuple[int, ...] = 200,
        **kw: Any,
    ) -> httpx.Response:
        """`route` is the router's path; `path=` fills its parameters."""
        params: dict[str, Any] = kw.pop("path", {})
        headers = {**(auth(cookie) if cookie else {}), **kw.pop("headers", {})}
        response = await self.client.request(
            method, self.base + route.format(**params), headers=headers, **kw
        )
        wanted = expect if isinstance(expect, tuple) else (expect,)
        assert response.status_code in wanted, f"{method} {route}: {response.status_code} {response.text}"
        self.routes.add((method, route))
        await self.nothing_left(f"{method} {route}")
        return response

    async def nothing_left(self, after: str) -> None:
        probed = await self.recorder.probe(SESSION_PROBE)
        assert probed, "no connection to probe"
        for conn, [row] in probed:
            pid, *values = row
            assert pid is not None
            self.backends.add(int(pid))
            state = dict(zip(PROBED, values, strict=True))
            assert state == CLEAN, f"after {after}, backend {pid} keeps session state: {state}"
            assert conn.parameter_changes == [], (
                f"after {after}: reported settings changed {conn.parameter_changes}"
            )


async def _bulk_company(db: asyncpg.Connection) -> Company:
    """A company with 300 conversations made in one REPEATABLE READ transaction: 300 count
    deltas the trigger does not fold (it folds only under READ COMMITTED), so the counts route
    folds them."""
    company = await new_company(db, conversations=0)
    async with db.transaction(isolation="repeatable_read"):
        await db.execute(
            "WITH c AS (INSERT INTO contacts (company_id, phone_number)"
            " SELECT $1, '48' || lpad(g::text, 10, '0') FROM generate_series(1, 300) AS g RETURNING id)"
            " INSERT INTO conversations (company_id, contact_id) SELECT $1, id FROM c",
            company.id,
        )
    return company


async def _dead_letter(services: ServiceUrls, company: Company, conversation_id: int) -> str:
    """A refused read receipt of the company's on wuzapi.outbound.dlq (a replay of it marks
    messages read: nothing is delivered to anyone); its id."""
    message = OutboundMessage(
        id=uuid.uuid4().hex,
        tenant=company.tenant.slug,
        company_id=company.id,
        conversation_id=conversation_id,
        to="4900000000000",
        kind="markread",
        origin="read_receipt",
        created_at_ms=int(time.time() * 1000),
        read_ids=(f"wamid.{secrets.token_hex(8)}",),
    )
    letter = letter_for(
        topic=WUZAPI_OUTBOUND,
        partition=0,
        offset=0,
        key=message.key,
        value=message.to_bytes(),
        headers=[],
        tenant=company.tenant.slug,
        exc=RuntimeError("refused for the pool-state test"),
        attempts=1,
    )
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(WUZAPI_OUTBOUND_DLQ, letter.to_bytes(), key=message.key)
    finally:
        await producer.stop()
    return f"{WUZAPI_OUTBOUND_DLQ}:{sent.partition}:{sent.offset}"


@pytest.fixture
async def recorded_api(services: ServiceUrls) -> AsyncIterator[tuple[CortexxProcess, WireRecorder]]:
    """A read API whose connections to Postgres all go through a WireRecorder."""
    recorder = WireRecorder.for_url(services.database_url)
    await recorder.start()
    proc = CortexxProcess.api(
        dataclasses.replace(services, database_url=recorder.url(services.database_url)),
        db_pool_min=1,
        db_pool_max=2,
        session_prune_interval_s=0.3,  # the pruner's statements run during the test too
        api_login_account_failures_max=2,
        api_login_address_failures_max=1_000_000,
        broker_probe_interval_s=0.5,
        produce_timeout_s=2.0,
    )
    # The proxy runs on this event loop: the start's polling must not block it.
    await asyncio.to_thread(proc.start)
    try:
        yield proc, recorder
    finally:
        await asyncio.to_thread(proc.stop)
        await recorder.stop()


async def test_no_request_leaves_session_state_on_a_pooled_connection(
    recorded_api: tuple[CortexxProcess, WireRecorder], services: ServiceUrls, db: asyncpg.Connection
) -> None:
    api_proc, recorder = recorded_api
    company = await new_company(db, conversations=3, messages=2)
    empty = await add_conversation(db, company.id)
    operator = company.colleague
    await db.execute("UPDATE users SET role = 'operator' WHERE id = $1", operator.id)
    bulk = await _bulk_company(db)
    conversation = company.conversations[0]
    notification = company.notifications[0]

    async with httpx.AsyncClient(timeout=15) as client:
        run = Exercise(client, api_proc.url, recorder)
        await run.nothing_left("the start")
        call = run.call

        for route in ("/health", "/ready", "/metrics"):
            await call("GET", route)

        # Logins: refused, throttled (the account's limit is 2), accepted, and again with a cookie.
        stranger = {"email": f"nobody-{secrets.token_hex(4)}@example.test", "password": "wrong password"}
        await call("POST", "/api/v1/sessions", json=stranger, expect=401)
        for _ in range(3):
            answer = await call("POST", "/api/v1/sessions", json=stranger, expect=(401, 429))
            if answer.status_code == 429:
                break
        assert answer.status_code == 429, "the account's limit never refused"
        first = session_cookie(
            await call(
                "POST",
                "/api/v1/sessions",
                json={"email": company.agent.email, "password": PASSWORD},
                expect=201,
            )
        )
        agent = session_cookie(
            await call(
                "POST",
                "/api/v1/sessions",
                cookie=first,
                json={"email": company.agent.email, "password": PASSWORD},
                expect=201,
            )
        )
        await call("GET", "/api/v1/sessions/me", cookie=agent)

        # The agents' app.
        page = await call("GET", "/api/v1/conversations", cookie=agent, params={"limit": 2})
        await call(
            "GET", "/api/v1/conversations", cookie=agent, params={"cursor": page.json()["next_cursor"]}
        )
        await call("GET", "/api/v1/conversations", cookie=agent, params={"status": "open"})
        await call("GET", "/api/v1/conversations/counts", cookie=agent)
        await call(
            "GET",
            "/api/v1/conversations/{conversation_id}",
            cookie=agent,
            path={"conversation_id": conversation},
        )
        messages = "/api/v1/conversations/{conversation_id}/messages"
        await call("GET", messages, cookie=agent, path={"conversation_id": conversation})
        await call("GET", messages, cookie=agent, path={"conversation_id": empty})
        await call(
            "GET", messages, cookie=agent, path={"conversation_id": empty}, params={"cursor": "x"}, expect=400
        )
        reply = {"id": uuid.uuid4().hex, "text": "Thanks, on its way"}
        await call(
            "POST", messages, cookie=agent, path={"conversation_id": conversation}, json=reply, expect=202
        )
        await call(
            "POST", messages, cookie=agent, path={"conversation_id": conversation}, json=reply, expect=202
        )
        # A reply with a file, twice under one id, then the file served whole and in part.
        attachments = "/api/v1/conversations/{conversation_id}/attachments"
        upload = {"files": {"file": ("menu.png", b"\x89PNG" + secrets.token_bytes(2000), "image/png")}}
        form = {"id": uuid.uuid4().hex, "caption": "Our menu"}
        for _ in range(2):
            sent = await call(
                "POST",
                attachments,
                cookie=agent,
                path={"conversation_id": conversation},
                data=form,
                expect=202,
                **upload,
            )
        media_id = sent.json()["media"][0]["id"]
        await call("GET", "/api/v1/media/{media_id}", cookie=agent, path={"media_id": media_id})
        await call(
            "GET",
            "/api/v1/media/{media_id}",
            cookie=agent,
            path={"media_id": media_id},
            headers={"Range": "bytes=0-99"},
            expect=206,
        )
        await call("GET", "/api/v1/notifications", cookie=agent)
        await call("GET", "/api/v1/notifications/unread-count", cookie=agent)
        await call(
            "POST",
            "/api/v1/notifications/{notification_id}/read",
            cookie=agent,
            path={"notification_id": notification},
        )
        await call("POST", "/api/v1/notifications/read-all", cookie=agent)

        # A company with many count deltas: the counts route folds them.
        bulk_agent = session_cookie(
            await call(
                "POST", "/api/v1/sessions", json={"email": bulk.agent.email, "password": PASSWORD}, expect=201
            )
        )
        counts = await call("GET", "/api/v1/conversations/counts", cookie=bulk_agent)
        assert counts.json()["total"] == 300

        # The operators' console, a dead letter and its replay (dry run, then for real) included.
        ops = session_cookie(
            await call(
                "POST", "/api/v1/sessions", json={"email": operator.email, "password": PASSWORD}, expect=201
            )
        )
        letter_id = await _dead_letter(services, company, conversation)
        where = {"tenant": company.tenant.slug}

        async def listed() -> bool:
            found = await call("GET", "/api/v1/ops/dead-letters", cookie=ops, params=where)
            return bool(found.json()["total"] == 1)

        await wait_until(listed, timeout_s=20, what="the dead letter listed")
        await call("GET", "/api/v1/ops/overview", cookie=ops)
        await call("GET", "/api/v1/ops/dead-letters/{letter_id}", cookie=ops, path={"letter_id": letter_id})
        await call("GET", "/api/v1/ops/replays", cookie=ops)
        await call("GET", "/api/v1/ops/tenants", cookie=ops)
        await call("GET", "/ops/login")
        await call("GET", "/ops/static/{name}", path={"name": "ops.css"})
        await call("GET", "/ops", cookie=ops)
        await call("GET", "/ops/charts/{name}.svg", cookie=ops, path={"name": "throughput"})
        await call("GET", "/ops/tenants", cookie=ops)
        await call("GET", "/api/v1/ops/media-failures", cookie=ops)
        await call("GET", "/ops/media", cookie=ops)
        await call("GET", "/ops/dead-letters/{letter_id}", cookie=ops, path={"letter_id": letter_id})
        html = (await call("GET", "/ops/dead-letters", cookie=ops, params=where)).text
        csrf = html.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
        replay = "/api/v1/ops/dead-letters/replay"
        dry = await call("POST", replay, cookie=ops, json={"ids": [letter_id]})
        assert dry.json()["replayed"] == [letter_id] and dry.json()["dry_run"] is True
        done = await call(
            "POST",
            replay,
            cookie=ops,
            json={"ids": [letter_id], "dry_run": False},
            headers={"X-CSRF-Token": csrf},
        )
        assert done.json()["replayed"] == [letter_id]

        await call("DELETE", "/api/v1/sessions", cookie=agent, expect=204)

        # The pruner (every 0.3 s) runs its statements too.
        declared = _declared_statements()

        async def pruned() -> bool:
            sent = set(recorder.statements)
            return all(sql in sent for sql, name in declared.items() if name.endswith(".prune"))

        await wait_until(pruned, timeout_s=10, what="the pruner's statements")
        await run.nothing_left("the pruner")

    # Every route the API has was requested.
    assert _app_routes() <= run.routes, sorted(_app_routes() - run.routes)
    # Every statement the API sent passes the rule, and every declared one was sent.
    sent = recorder.statements
    refused = {sql: found for sql in set(sent) if (found := session_state(sql)) is not None}
    assert refused == {}, refused
    unsent = sorted(name for sql, name in declared.items() if sql not in set(sent))
    assert unsent == [], f"declared statements the exercise never ran: {unsent}"
    # Seen from outside: the API's backends are idle, out of any transaction, and hold no lock.
    rows = await db.fetch(
        "SELECT a.pid, a.state, a.backend_xid::text AS xid,"
        " (SELECT count(*) FROM pg_locks l WHERE l.pid = a.pid) AS locks"
        " FROM pg_stat_activity a WHERE a.pid = ANY($1::int[])",
        sorted(run.backends),
    )
    assert rows, run.backends
    assert [(r["state"], r["xid"], r["locks"]) for r in rows] == [("idle", None, 0)] * len(rows), rows
