"""The API's pool skips asyncpg's reset statement on release (api/service.py): that is only safe
while no statement the API runs leaves session state behind on a pooled connection (a SET, a
LISTEN, an advisory lock, a cursor or prepared statement made by SQL, set_config(..., false), a
temporary table). `Query`, `CompanyQuery` and `UserQuery` (api/db.py) refuse such SQL when they
are built, so a statement declared anywhere in the API fails at import, before any request (the
regex over two modules' constants that this replaces never saw api/login_limits.py's).
"""

from __future__ import annotations

import pytest

from api.db import CompanyQuery, Query, UserQuery, session_state
from infra.kafka import replay as dlq

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
