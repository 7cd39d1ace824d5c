"""The worker's database connections keep their foreign-key checks on an index.

Postgres plans a foreign-key check once per connection and keeps the plan. Planned while the
referenced table is nearly empty (a fresh deployment, or an autovacuum ANALYZE at that moment),
the check is a sequential scan, and stays one while the table grows: in the worker benchmark that
turned 60 µs of Postgres CPU per record into 990 until the next ANALYZE. The webhook writer's
connections are opened with `WRITER_SERVER_SETTINGS`, under which the same check uses the key.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from processors.webhooks import WRITER_SERVER_SETTINGS
from tests.support import ServiceUrls


async def _parent_scans(url: str, server_settings: dict[str, str]) -> dict[str, Any]:
    """Scans of the referenced table by 500 foreign-key checks run when it holds 20,000 rows, their
    plan made when it held one (Postgres plans the first five checks afresh, then keeps a plan)."""
    conn = await asyncpg.connect(url, server_settings=server_settings)
    try:
        for statement in (  # one transaction each, as the worker's batches
            "CREATE TEMP TABLE parent (id bigint PRIMARY KEY)",
            "CREATE TEMP TABLE child (parent_id bigint NOT NULL REFERENCES parent)",
            "ANALYZE parent",
            "INSERT INTO parent VALUES (1)",
            "INSERT INTO child SELECT 1 FROM generate_series(1, 10)",
            "INSERT INTO parent SELECT generate_series(2, 20000)",
        ):
            await conn.execute(statement)
        # Scan counts not yet flushed to the shared statistics include the earlier statements':
        # the difference across the 500 checks is theirs alone.
        scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_all_tables WHERE relid = 'parent'::regclass"
        async with conn.transaction():
            before = await conn.fetchrow(scans)
            await conn.execute("INSERT INTO child SELECT generate_series(1, 500)")
            after = await conn.fetchrow(scans)
        assert before is not None and after is not None
        return {k: after[k] - before[k] for k in ("seq_scan", "idx_scan")}
    finally:
        await conn.close()


async def test_writer_foreign_key_checks_use_the_key_when_planned_on_a_tiny_table(
    services: ServiceUrls,
) -> None:
    # Without the writer's settings: every check scans the whole table (the failure this guards).
    default = await _parent_scans(services.database_url, {})
    assert default["seq_scan"] == 500, default

    writer = await _parent_scans(services.database_url, WRITER_SERVER_SETTINGS)
    assert writer == {"seq_scan": 0, "idx_scan": 500}, writer
