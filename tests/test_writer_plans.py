"""The worker's database connections keep their foreign-key checks on an index.

Postgres plans a foreign-key check once per connection and keeps the plan. Planned while the
referenced table is nearly empty (a fresh deployment, or an autovacuum ANALYZE at that moment),
the check is a sequential scan, and stays one while the table grows: in the worker benchmark that
turned 60 µs of Postgres CPU per record into 990 until the next ANALYZE. The webhook writer's
pool (`create_writer_pool`, the one the worker writes through) plans no sequential scans, so the
same check uses the key.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from infra.postgres.db import create_pool
from processors.webhooks import create_writer_pool
from tests.support import ServiceUrls


async def _parent_scans(pool: asyncpg.Pool) -> dict[str, Any]:
    """Scans of the referenced table by 500 foreign-key checks run when it holds 20,000 rows, their
    plan made when it held one (Postgres plans the first five checks afresh, then keeps a plan)."""
    # A pool of one connection: the setup and the checks run on the same one, released to the
    # pool (and reset by it) in between, as the worker's batches are.
    async with pool.acquire() as conn:
        for statement in (  # one transaction each, as the worker's batches
            "CREATE TEMP TABLE parent (id bigint PRIMARY KEY)",
            "CREATE TEMP TABLE child (parent_id bigint NOT NULL REFERENCES parent)",
            "ANALYZE parent",
            "INSERT INTO parent VALUES (1)",
            "INSERT INTO child SELECT 1 FROM generate_series(1, 10)",
            "INSERT INTO parent SELECT generate_series(2, 20000)",
        ):
            await conn.execute(statement)
    async with pool.acquire() as conn:
        # Scan counts not yet flushed to the shared statistics include the earlier statements':
        # the difference across the 500 checks is theirs alone.
        scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_all_tables WHERE relid = 'parent'::regclass"
        async with conn.transaction():
            before = await conn.fetchrow(scans)
            await conn.execute("INSERT INTO child SELECT generate_series(1, 500)")
            after = await conn.fetchrow(scans)
        assert before is not None and after is not None
        return {k: after[k] - before[k] for k in ("seq_scan", "idx_scan")}


async def test_writer_foreign_key_checks_use_the_key_when_planned_on_a_tiny_table(
    services: ServiceUrls,
) -> None:
    # A plain pool: every check scans the whole table (the failure this guards against).
    plain = await create_pool(services.database_url, max_size=1)
    try:
        default = await _parent_scans(plain)
    finally:
        await plain.close()
    assert default["seq_scan"] == 500, default

    writer = await create_writer_pool(services.database_url, max_size=1)
    try:
        scans = await _parent_scans(writer)
    finally:
        await writer.close()
    assert scans == {"seq_scan": 0, "idx_scan": 500}, scans
