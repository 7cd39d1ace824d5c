"""The API's pool skips asyncpg's reset statement on release (api/service.py): that is only safe
while no statement the API runs leaves session state behind on a pooled connection."""

from __future__ import annotations

import re

from api import queries
from api.db import CompanyQuery, Query, UserQuery
from api.ops import queries as ops_queries
from infra.kafka import replay as dlq

_SESSION_STATE = re.compile(
    r"\A\s*(SET|RESET|LISTEN|DECLARE|PREPARE|LOAD|DISCARD)\b|\bset_config\s*\(|\bpg_(try_)?advisory_lock",
    re.IGNORECASE,
)


def test_no_statement_leaves_session_state_on_a_pooled_connection():
    statements = [
        value
        for module in (queries, ops_queries)
        for value in vars(module).values()
        if isinstance(value, Query | CompanyQuery | UserQuery)
    ]
    # The console's replays run infra/kafka/replay.py's statements on the API's pool too.
    statements += [Query(name, getattr(dlq, name)) for name in ("REPLAYED", "RECORD_REPLAY")]
    assert len(statements) > 20
    for statement in statements:
        for part in statement.sql.split(";"):
            assert not _SESSION_STATE.search(part), f"{statement.name} leaves session state: {part}"
    assert _SESSION_STATE.search("\n  SET statement_timeout = 0")
    assert not _SESSION_STATE.search("UPDATE t\n   SET a = 1")
