"""A seeded data set for the read benchmark, loaded with COPY: companies, contacts, conversations
and messages (default 100 companies, 1,000,000 conversations, 10,000,000 messages).

One company is large (a fifth of the conversations), so that page 5,000 of its conversation list
(100,000 rows deep at 20 a page) exists; the others share the rest. Secondary indexes and foreign
keys are dropped for the load and rebuilt after it (the way a bulk load is done), then ANALYZE.
The status-count triggers of conversations (0006) are disabled for the load too (COPY fires row
triggers: one delta row per conversation), and the counts computed once after it.

    python -m bench.gen_read --database-url URL [--conversations 1000000 --messages 10000000]
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bench.common import argument_parser, console

TABLES = ("contacts", "conversations", "messages")
COUNT_TRIGGERS = (
    "conversations_status_counts_insert",
    "conversations_status_counts_update",
    "conversations_status_counts_delete",
)
RECOUNT = """
DELETE FROM conversation_status_counts;
INSERT INTO conversation_status_counts (company_id, status, n)
SELECT company_id, status, count(*) FROM conversations WHERE deleted_at IS NULL GROUP BY company_id, status;
"""
CHUNK = 100_000
BIG_SHARE = 0.2
START = datetime(2025, 1, 1, tzinfo=UTC)
YEAR_S = 365 * 86_400
PREVIEWS = (
    "Hi! Is my order on its way?",
    "Can you send me the invoice for last month please?",
    "Thanks, that worked",
    "What time do you open tomorrow?",
    "[image]",
    "I'd like to change my delivery address",
)
STATUSES = ("open",) * 6 + ("pending",) + ("closed",) * 3

SAVED_DDL = """
SELECT 'c' AS kind, con.conrelid::regclass::text AS tbl, con.conname AS name,
       pg_get_constraintdef(con.oid) AS def, con.contype::text AS contype
  FROM pg_constraint con
 WHERE con.conrelid::regclass::text = ANY($1) AND con.contype IN ('u', 'f')
UNION ALL
SELECT 'i', i.tablename, i.indexname, i.indexdef, ''
  FROM pg_indexes i
 WHERE i.schemaname = 'public' AND i.tablename = ANY($1)
   AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)
"""


def company_of(i: int, companies: int, conversations: int) -> int:
    """Conversation i's company (1-based): the first fifth to company 1, the rest round-robin."""
    big = int(conversations * BIG_SHARE)
    return 1 if i < big else 2 + (i - big) % (companies - 1)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


async def _copy(
    conn: asyncpg.Connection,
    table: str,
    columns: list[str],
    rows: Iterator[list[tuple[Any, ...]]],
    total: int,
) -> None:
    with _progress() as progress:
        task = progress.add_task(f"COPY {table}", total=total)
        for chunk in rows:
            await conn.copy_records_to_table(table, records=chunk, columns=columns)
            progress.update(task, advance=len(chunk))


def _contacts(companies: int, conversations: int) -> Iterator[list[tuple[Any, ...]]]:
    for start in range(0, conversations, CHUNK):
        yield [
            (i + 1, company_of(i, companies, conversations), f"1555{i:08d}", "whatsapp", f"Contact {i}")
            for i in range(start, min(conversations, start + CHUNK))
        ]


def _conversations(
    companies: int, conversations: int, counts: list[int], created: list[datetime], seed: int
) -> Iterator[list[tuple[Any, ...]]]:
    rng = random.Random(seed + 1)
    first_message = 0
    for start in range(0, conversations, CHUNK):
        chunk = []
        for i in range(start, min(conversations, start + CHUNK)):
            first_message += counts[i]
            last_at = created[i] + timedelta(seconds=counts[i] * 60)
            chunk.append(
                (
                    i + 1,
                    company_of(i, companies, conversations),
                    i + 1,
                    "whatsapp",
                    rng.choice(STATUSES),
                    first_message,  # the id of its last message
                    last_at,
                    rng.choice(PREVIEWS),
                    rng.randrange(4),
                    created[i],
                    last_at,
                )
            )
        yield chunk


def _messages(
    companies: int, conversations: int, counts: list[int], created: list[datetime], total: int
) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    message_id = 0
    for i in range(conversations):
        company = company_of(i, companies, conversations)
        base = created[i]
        for k in range(counts[i]):
            message_id += 1
            inbound = k % 2 == 0
            at = base + timedelta(seconds=k * 60)
            chunk.append(
                (
                    message_id,
                    company,
                    i + 1,
                    f"wamid.read{message_id:010d}",
                    "inbound" if inbound else "outbound",
                    "text",
                    PREVIEWS[message_id % len(PREVIEWS)],
                    "{}",
                    "received" if inbound else "read",
                    0 if inbound else 3,
                    at,
                    at,
                    at,
                )
            )
            if len(chunk) >= CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


async def generate(
    url: str,
    *,
    companies: int = 100,
    conversations: int = 1_000_000,
    messages: int = 10_000_000,
    seed: int = 42,
) -> dict[str, Any]:
    """Load the data set into an empty, migrated database; return its shape and how long it took."""
    started = time.monotonic()
    rng = random.Random(seed)
    # Messages per conversation: 1..(2*mean - 1), summing to exactly `messages`.
    mean = messages / conversations
    counts = [max(1, round(rng.uniform(1, 2 * mean - 1))) for _ in range(conversations)]
    drift = messages - sum(counts)
    step = 1 if drift > 0 else -1
    i = 0
    while drift:
        if counts[i % conversations] + step >= 1:
            counts[i % conversations] += step
            drift -= step
        i += 1
    # Creation times: increasing with the id within a year, so newest-first is a real order.
    created = [START + timedelta(seconds=YEAR_S * i / conversations) for i in range(conversations)]

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET synchronous_commit = off; SET maintenance_work_mem = '512MB'")
        saved = await conn.fetch(SAVED_DDL, list(TABLES))
        for row in saved:
            if row["kind"] == "c" and row["contype"] == "f":
                await conn.execute(f'ALTER TABLE {row["tbl"]} DROP CONSTRAINT "{row["name"]}"')
        for row in saved:
            if row["kind"] == "c" and row["contype"] == "u":
                await conn.execute(f'ALTER TABLE {row["tbl"]} DROP CONSTRAINT "{row["name"]}"')
            elif row["kind"] == "i":
                await conn.execute(f'DROP INDEX "{row["name"]}"')
        for trigger in COUNT_TRIGGERS:
            await conn.execute(f"ALTER TABLE conversations DISABLE TRIGGER {trigger}")
        await conn.execute(
            "INSERT INTO companies (id, slug, name, app_secret, verify_token) "
            "SELECT i, 'read-' || i, 'Company ' || i, md5(i::text), 'bench' FROM generate_series(1, $1) i",
            companies,
        )
        await _copy(
            conn,
            "contacts",
            ["id", "company_id", "phone_number", "channel", "name"],
            _contacts(companies, conversations),
            conversations,
        )
        await _copy(
            conn,
            "conversations",
            [
                "id",
                "company_id",
                "contact_id",
                "channel",
                "status",
                "last_message_id",
                "last_message_at",
                "last_message_preview",
                "unread_count",
                "created_at",
                "updated_at",
            ],
            _conversations(companies, conversations, counts, created, seed),
            conversations,
        )
        await _copy(
            conn,
            "messages",
            [
                "id",
                "company_id",
                "conversation_id",
                "external_id",
                "direction",
                "type",
                "body",
                "content",
                "status",
                "status_rank",
                "sent_at",
                "created_at",
                "updated_at",
            ],
            _messages(companies, conversations, counts, created, messages),
            messages,
        )
        loaded = time.monotonic() - started
        with console.status("rebuilding indexes and foreign keys"):
            for row in saved:
                if row["kind"] == "i":
                    await conn.execute(row["def"])
                elif row["contype"] == "u":
                    await conn.execute(
                        f'ALTER TABLE {row["tbl"]} ADD CONSTRAINT "{row["name"]}" {row["def"]}'
                    )
            for row in saved:
                if row["kind"] == "c" and row["contype"] == "f":
                    await conn.execute(
                        f'ALTER TABLE {row["tbl"]} ADD CONSTRAINT "{row["name"]}" {row["def"]}'
                    )
            for table in ("companies", *TABLES):
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
                )
            # One statement, while nothing else writes: the same rows the triggers would have left.
            await conn.execute(RECOUNT)
            for trigger in COUNT_TRIGGERS:
                await conn.execute(f"ALTER TABLE conversations ENABLE TRIGGER {trigger}")
            await conn.execute("ANALYZE")
    finally:
        await conn.close()
    total = time.monotonic() - started
    console.print(f"generated in {total:.0f} s (COPY {loaded:.0f} s, indexes {total - loaded:.0f} s)")
    return {
        "companies": companies,
        "conversations": conversations,
        "messages": messages,
        "big_company_conversations": int(conversations * BIG_SHARE),
        "copy_s": round(loaded, 1),
        "total_s": round(total, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--database-url", required=True, help="an empty, migrated database")
    parser.add_argument("--companies", type=int, default=100)
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    asyncio.run(
        generate(
            args.database_url,
            companies=args.companies,
            conversations=args.conversations,
            messages=args.messages,
            seed=args.seed,
        )
    )


if __name__ == "__main__":
    main()
