"""Status counts read from `conversation_status_counts` (migration 0006): whatever writes the
conversations (inserts, the worker's upsert and reopen, soft and hard deletes, an agent's reply,
many transactions at once), the API answers what count(*) ... GROUP BY status says."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
import httpx
import pytest

from tests.api.world import World, add_conversation, auth, login
from tests.support import CortexxProcess, ServiceUrls

pytestmark = pytest.mark.usefixtures("api")

STATUSES = ("open", "pending", "closed")

# The worker's statements (processors/writer.py), copied: they must leave the counts right.
UPSERT_CONVERSATION = """
INSERT INTO conversations (company_id, contact_id, channel)
VALUES ($1, $2, $3)
ON CONFLICT (company_id, contact_id) WHERE deleted_at IS NULL
DO UPDATE SET channel = conversations.channel
RETURNING id, (xmax = 0) AS created
"""
BUMP_CONVERSATION = """
UPDATE conversations
   SET unread_count = unread_count + $2,
       status = CASE WHEN $2 > 0 AND status = 'closed' THEN 'open' ELSE status END,
       updated_at = now()
 WHERE id = $1
"""

TRUTH = """
SELECT status, count(*) AS n FROM conversations
 WHERE company_id = $1 AND deleted_at IS NULL GROUP BY status
"""
KEPT = """
SELECT status, sum(n)::bigint AS n FROM conversation_status_counts
 WHERE company_id = $1 GROUP BY status
"""


def _clean(rows: list[asyncpg.Record]) -> dict[str, int]:
    return {r["status"]: int(r["n"]) for r in rows if r["n"]}


async def truth(db: asyncpg.Connection, company_id: int) -> dict[str, int]:
    return _clean(await db.fetch(TRUTH, company_id))


async def kept(db: asyncpg.Connection, company_id: int) -> dict[str, int]:
    return _clean(await db.fetch(KEPT, company_id))


def as_api(counts: dict[str, int]) -> dict[str, int]:
    return {s: counts.get(s, 0) for s in STATUSES} | {"total": sum(counts.values())}


async def new_contact(db: asyncpg.Connection, company_id: int) -> int:
    return int(
        await db.fetchval(
            "INSERT INTO contacts (company_id, phone_number) "
            "VALUES ($1, '49' || (random() * 1e12)::bigint) RETURNING id",
            company_id,
        )
    )


async def test_counts_follow_every_kind_of_write(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    x, y = world.x, world.y
    cookie = await login(client, api, x.agent)
    url = f"{api.url}/api/v1/conversations/counts"

    async def check() -> None:
        expected = await truth(db, x.id)
        assert await kept(db, x.id) == expected
        assert await kept(db, y.id) == await truth(db, y.id)
        response = await client.get(url, headers=auth(cookie))
        assert response.status_code == 200
        assert response.json() == as_api(expected)

    await check()  # the seeded conversations, two of each status
    assert (await client.get(url, headers=auth(cookie))).json() == {
        "open": 2,
        "pending": 2,
        "closed": 2,
        "total": 6,
    }

    # Inserts, one by one and in one statement.
    for status in STATUSES:
        await add_conversation(db, x.id, status=status)
    contacts = [await new_contact(db, x.id) for _ in range(5)]
    await db.execute(
        "INSERT INTO conversations (company_id, contact_id, status) "
        "SELECT $1, c, 'pending' FROM unnest($2::bigint[]) c",
        x.id,
        contacts,
    )
    await check()

    # The worker's upsert: a new contact counts once, the same contact again not at all.
    contact = await new_contact(db, x.id)
    first = await db.fetchrow(UPSERT_CONVERSATION, x.id, contact, "whatsapp")
    again = await db.fetchrow(UPSERT_CONVERSATION, x.id, contact, "whatsapp")
    assert first is not None and again is not None
    assert first["created"] and not again["created"] and first["id"] == again["id"]
    await check()

    # Status changes: the worker's bump without and with a reopen, and a plain update.
    closed = await db.fetchval(
        "SELECT id FROM conversations WHERE company_id = $1 AND status = 'closed' LIMIT 1", x.id
    )
    await db.execute(BUMP_CONVERSATION, closed, 0)  # sets status to itself: no change
    await check()
    await db.execute(BUMP_CONVERSATION, closed, 1)  # an inbound message reopens it
    assert await db.fetchval("SELECT status FROM conversations WHERE id = $1", closed) == "open"
    await check()
    await db.execute(
        "UPDATE conversations SET status = 'closed' WHERE company_id = $1 AND status = 'pending'", x.id
    )
    await check()

    # Soft delete, a second soft delete (a new timestamp, still deleted), undelete, hard delete.
    victim = x.conversations[0]
    await db.execute("UPDATE conversations SET deleted_at = now() WHERE id = $1", victim)
    await check()
    await db.execute(
        "UPDATE conversations SET deleted_at = now() + interval '1 s', status = 'pending' WHERE id = $1",
        victim,
    )
    await check()
    await db.execute("UPDATE conversations SET deleted_at = NULL WHERE id = $1", victim)
    await check()
    orphan = await add_conversation(db, x.id, status="pending")
    await db.execute("DELETE FROM conversations WHERE id = $1", orphan)
    await check()

    # A conversation moved to the other company counts there, not here.
    moved = x.conversations[1]
    await db.execute("UPDATE conversations SET company_id = $2 WHERE id = $1", moved, y.id)
    await check()
    await db.execute("UPDATE conversations SET company_id = $2 WHERE id = $1", moved, x.id)

    # A rolled-back transaction leaves nothing.
    tx = db.transaction()
    await tx.start()
    await add_conversation(db, x.id, status="closed")
    await db.execute("UPDATE conversations SET status = 'pending' WHERE company_id = $1", x.id)
    await tx.rollback()
    await check()

    # An agent's reply touches the conversation (preview, time) but not its status.
    reply = await client.post(
        f"{api.url}/api/v1/conversations/{x.conversations[2]}/messages",
        json={"text": "on it"},
        headers=auth(cookie),
    )
    assert reply.status_code in (202, 503), reply.text
    await check()

    # A fold changes the rows, not the sums.
    await db.execute("SELECT conversation_status_counts_fold($1)", x.id)
    rows = await db.fetchval("SELECT count(*) FROM conversation_status_counts WHERE company_id = $1", x.id)
    assert rows <= len(STATUSES)
    await check()


async def test_opposite_orders_never_wait_on_each_other(services: ServiceUrls, world: World):
    """Two transactions that move their conversations between the same statuses in opposite
    orders (and fold at the same time) would deadlock on per-status counter rows; deltas never
    make a writer wait."""
    company = world.x.id
    mine_a, mine_b = world.x.conversations[:3], world.x.conversations[3:]
    a, b = await asyncio.gather(*(asyncpg.connect(services.database_url) for _ in range(2)))
    try:
        for conn in (a, b):
            # Any lock wait fails the test at once instead of hanging in a deadlock.
            await conn.execute("SET lock_timeout = '500ms'")
        async with a.transaction(), b.transaction():
            await a.execute("UPDATE conversations SET status = 'closed' WHERE id = ANY($1)", mine_a)
            await b.execute("UPDATE conversations SET status = 'open' WHERE id = ANY($1)", mine_b)
            await a.execute("SELECT conversation_status_counts_fold($1)", company)
            await b.execute("SELECT conversation_status_counts_fold($1)", company)
            await a.execute("UPDATE conversations SET status = 'open' WHERE id = ANY($1)", mine_a[:2])
            await b.execute("UPDATE conversations SET status = 'closed' WHERE id = ANY($1)", mine_b[:2])
            await add_conversation(a, company, status="pending")
            await add_conversation(b, company, status="pending")
            await b.execute("SELECT conversation_status_counts_fold($1)", company)
    finally:
        await asyncio.gather(a.close(), b.close())
    check = await asyncpg.connect(services.database_url)
    try:
        assert await kept(check, company) == await truth(check, company)
    finally:
        await check.close()


class _Rollback(Exception):
    pass


async def _writer(url: str, companies: list[int], seed: int, rounds: int, errors: list[str]) -> int:
    """Random transactions of random writes, some rolled back; returns how many committed.

    Each writer changes only the conversations it created (besides inserting and folding in the
    shared companies): so any lock wait, deadlock or timeout would come from the counts."""
    rng = random.Random(seed)
    mine: list[int] = []
    conn = await asyncpg.connect(url)
    committed = 0
    try:
        await conn.execute("SET lock_timeout = '5s'")
        for _ in range(rounds):
            try:
                async with conn.transaction():
                    for _ in range(rng.randint(1, 6)):
                        await _random_write(conn, rng, rng.choice(companies), mine)
                        if rng.random() < 0.3:
                            await asyncio.sleep(0)  # let the other writers interleave
                    if rng.random() < 0.1:
                        raise _Rollback()
                committed += 1
            except _Rollback:
                pass
            except asyncpg.PostgresError as exc:  # a deadlock or a lock timeout lands here
                errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        await conn.close()
    return committed


async def _random_write(conn: asyncpg.Connection, rng: random.Random, company: int, mine: list[int]) -> None:
    op = rng.random()
    some = """SELECT id FROM conversations WHERE company_id = $1 AND id = ANY($2) AND deleted_at IS NULL
              ORDER BY random() LIMIT $3"""
    if op < 0.3:
        contacts = [await new_contact(conn, company) for _ in range(rng.randint(1, 3))]
        statuses = [rng.choice(STATUSES) for _ in contacts]
        rows = await conn.fetch(
            "INSERT INTO conversations (company_id, contact_id, status) "
            "SELECT $1, c, s FROM unnest($2::bigint[], $3::text[]) AS t(c, s) RETURNING id",
            company,
            contacts,
            statuses,
        )
        mine.extend(r["id"] for r in rows)
    elif op < 0.4:
        contact = await new_contact(conn, company)
        first = await conn.fetchrow(UPSERT_CONVERSATION, company, contact, "whatsapp")
        await conn.fetchrow(UPSERT_CONVERSATION, company, contact, "whatsapp")
        assert first is not None
        mine.append(first["id"])
    elif op < 0.65:
        ids = [r["id"] for r in await conn.fetch(some, company, mine, rng.randint(1, 4))]
        await conn.execute(
            "UPDATE conversations SET status = $2 WHERE id = ANY($1)", ids, rng.choice(STATUSES)
        )
    elif op < 0.75:
        for row in await conn.fetch(some, company, mine, 2):
            await conn.execute(BUMP_CONVERSATION, row["id"], rng.randint(0, 1))
    elif op < 0.85:
        ids = [r["id"] for r in await conn.fetch(some, company, mine, 1)]
        await conn.execute("UPDATE conversations SET deleted_at = now() WHERE id = ANY($1)", ids)
    elif op < 0.9:
        # Undelete: each contact has one conversation, so the unique index never objects.
        await conn.execute(
            "UPDATE conversations SET deleted_at = NULL WHERE id IN (SELECT id FROM conversations "
            "WHERE company_id = $1 AND id = ANY($2) AND deleted_at IS NOT NULL LIMIT 1)",
            company,
            mine,
        )
    elif op < 0.95:
        ids = [r["id"] for r in await conn.fetch(some, company, mine, 1)]
        await conn.execute("DELETE FROM conversations WHERE id = ANY($1)", ids)
    else:
        await conn.execute("SELECT conversation_status_counts_fold($1)", company)


async def _snapshot_reader(url: str, companies: list[int], stop: asyncio.Event) -> list[Any]:
    """While the writers run: in one snapshot, the kept counts equal count(*)."""
    conn = await asyncpg.connect(url)
    seen: list[Any] = []
    try:
        while not stop.is_set():
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                for company in companies:
                    pair = (await kept(conn, company), await truth(conn, company))
                    if pair[0] != pair[1]:
                        seen.append((company, *pair))
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    return seen


async def test_concurrent_writers_keep_exact_counts(services: ServiceUrls, world: World):
    url = services.database_url
    companies = [world.x.id, world.y.id]
    errors: list[str] = []
    stop = asyncio.Event()
    reader = asyncio.create_task(_snapshot_reader(url, companies, stop))
    try:
        committed = await asyncio.gather(
            *(_writer(url, companies, seed, rounds=40, errors=errors) for seed in range(6))
        )
    finally:
        stop.set()
    mismatches = await reader
    assert errors == []
    assert sum(committed) > 150
    assert mismatches == []
    check = await asyncpg.connect(url)
    try:
        for company in companies:
            assert await kept(check, company) == await truth(check, company)
            await check.execute("SELECT conversation_status_counts_fold($1)", company)
            assert await kept(check, company) == await truth(check, company)
    finally:
        await check.close()


async def test_a_read_folds_what_a_bulk_change_left(
    client: httpx.AsyncClient, api: CortexxProcess, world: World, db: asyncpg.Connection
):
    """One statement over 1,000 conversations leaves about as many deltas (a transaction folds at
    most once); the next counts read folds them, and the sums stay exact."""
    x = world.x
    contacts = [await new_contact(db, x.id) for _ in range(1000)]
    await db.execute(
        "INSERT INTO conversations (company_id, contact_id, status) "
        "SELECT $1, c, 'closed' FROM unnest($2::bigint[]) c",
        x.id,
        contacts,
    )
    rows = "SELECT count(*) FROM conversation_status_counts WHERE company_id = $1"
    assert await db.fetchval(rows, x.id) > 256
    cookie = await login(client, api, x.agent)
    response = await client.get(f"{api.url}/api/v1/conversations/counts", headers=auth(cookie))
    assert response.json() == as_api(await truth(db, x.id))
    assert response.json()["closed"] == 1002
    assert await db.fetchval(rows, x.id) <= len(STATUSES)
    assert await kept(db, x.id) == await truth(db, x.id)
