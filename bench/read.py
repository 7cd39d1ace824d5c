"""Read API: p50/p99 of the conversation list at pages 1, 50, 500 and 5,000, the status counts and
a conversation's messages, on a generated data set (bench/gen_read.py), against OFFSET pagination
of the same query as the baseline.

It times the read API's own SQL (api/queries.py: LIST_CONVERSATIONS, CONVERSATION_COUNTS,
LIST_MESSAGES) through asyncpg prepared statements, as the API runs them; HTTP and session
handling are not included. Page N of the keyset list starts after the last row of page N-1 (found
once, untimed); the OFFSET baseline skips (N-1) x 20 rows. Target: p99 under 10 ms for every
page, flat in depth (chart: p99 against page depth, ours and OFFSET's).

    python -m bench.read [--conversations 1000000 --messages 10000000 --samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg

from api.cursor import START
from api.queries import CONVERSATION_COUNTS, LIST_CONVERSATIONS, LIST_MESSAGES
from bench.common import RESULTS_DIR, console, percentile, print_table, save_result, services
from bench.gen_read import generate

PAGES = (1, 50, 500, 5000)
PAGE_SIZE = 20
TARGET_P99_MS = 10.0
KEYSET_PREDICATE = "   AND (c.created_at, c.id) < ($2, $3)\n"


def offset_sql() -> str:
    """The same list query, paginated by OFFSET instead of the keyset position."""
    sql = LIST_CONVERSATIONS.sql
    assert KEYSET_PREDICATE in sql and "LIMIT $4" in sql
    return sql.replace(KEYSET_PREDICATE, "").replace("LIMIT $4", "LIMIT $2 OFFSET $3")


async def _time(call: Callable[[], Awaitable[Any]], samples: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        await call()
    out = []
    for _ in range(samples):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def measure(url: str, *, big_company: int, samples: int, seed: int) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    rows: list[dict[str, Any]] = []
    try:
        keyset = await conn.prepare(LIST_CONVERSATIONS.sql)
        offset = await conn.prepare(offset_sql())
        for page in PAGES:
            skip = (page - 1) * PAGE_SIZE
            if page == 1:
                at, last_id = START  # a first page: a position past every row, as the API does
            else:
                before = await offset.fetch(big_company, 1, skip - 1)
                if not before:
                    console.print(f"[yellow]page {page:,} is past the data set's end: skipped[/]")
                    continue
                at, last_id = before[0]["created_at"], before[0]["id"]
            ours = await _time(partial(keyset.fetch, big_company, at, last_id, PAGE_SIZE), samples)
            base = await _time(partial(offset.fetch, big_company, PAGE_SIZE, skip), samples)
            check_ours = await keyset.fetch(big_company, at, last_id, PAGE_SIZE)
            check_base = await offset.fetch(big_company, PAGE_SIZE, skip)
            same = [r["id"] for r in check_ours] == [r["id"] for r in check_base]
            rows.append(_row(f"conversations page {page:,}", ours, base, page=page, same_rows=same))
        counts = await conn.prepare(CONVERSATION_COUNTS.sql)
        small_company = big_company + 1
        for label, company in (("big", big_company), ("typical", small_company)):
            n = await conn.fetchval("SELECT count(*) FROM conversations WHERE company_id = $1", company)
            timings = await _time(partial(counts.fetch, company), samples)
            rows.append(_row(f"status counts ({label} company, {n:,} conv.)", timings, None))
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {CONVERSATION_COUNTS.sql}", company)
            rows[-1]["plan"] = [r[0] for r in plan]
        messages = await conn.prepare(LIST_MESSAGES.sql)
        ids = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM conversations WHERE company_id = $1 ORDER BY id LIMIT 5000", big_company
            )
        ]
        rng = random.Random(seed)
        timings = await _time(
            lambda: messages.fetch(big_company, rng.choice(ids), *START, PAGE_SIZE), samples
        )
        rows.append(_row("messages of a conversation (page 1)", timings, None))
    finally:
        await conn.close()
    return rows


def _row(
    case: str, ours: list[float], base: list[float] | None, *, page: int | None = None, same_rows: bool = True
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "case": case,
        "page": page,
        "p50_ms": round(percentile(ours, 50), 3),
        "p99_ms": round(percentile(ours, 99), 3),
        "same_rows": same_rows,
    }
    if base is not None:
        row["offset_p50_ms"] = round(percentile(base, 50), 3)
        row["offset_p99_ms"] = round(percentile(base, 99), 3)
    return row


def run(
    *,
    companies: int = 100,
    conversations: int = 1_000_000,
    messages: int = 10_000_000,
    samples: int = 200,
    seed: int = 42,
) -> dict[str, Any]:
    with services("read") as svc:
        shape = asyncio.run(
            generate(
                svc.database_url,
                companies=companies,
                conversations=conversations,
                messages=messages,
                seed=seed,
            )
        )
        rows = asyncio.run(measure(svc.database_url, big_company=1, samples=samples, seed=seed))
    table = []
    met = True
    for r in rows:
        ok = r["p99_ms"] < TARGET_P99_MS
        met = met and ok
        table.append(
            (
                r["case"],
                r["p50_ms"],
                r["p99_ms"],
                r.get("offset_p50_ms"),
                r.get("offset_p99_ms"),
                (r["offset_p99_ms"] / r["p99_ms"]) if r.get("offset_p99_ms") else None,
                "MET" if ok else "MISSED",
            )
        )
    print_table(
        f"read: {conversations:,} conversations, {messages:,} messages, {companies} companies "
        f"(SQL of api/queries.py, {samples} samples each)",
        ["case", "p50 ms", "p99 ms", "OFFSET p50 ms", "OFFSET p99 ms", "OFFSET/ours p99", "p99 < 10 ms"],
        table,
    )
    result: dict[str, Any] = {"data": shape, "samples": samples, "rows": rows, "target_met": met}
    result["chart"] = str(chart(rows))
    path = save_result("read", result)
    console.print(f"results appended to {path}; chart {result['chart']}")
    return result


def chart(rows: list[dict[str, Any]], path: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or RESULTS_DIR / "read.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    pages = [r for r in rows if r["page"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [r["page"] for r in pages]
    ax.plot(xs, [r["p99_ms"] for r in pages], "-o", color="tab:blue", label="keyset (ours)")
    ax.plot(xs, [r["offset_p99_ms"] for r in pages], "--o", color="tab:gray", label="OFFSET")
    ax.axhline(TARGET_P99_MS, color="tab:red", linewidth=0.8, label="target 10 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(PAGES), [f"{p:,}" for p in PAGES])
    ax.set_xlabel("page (20 conversations a page)")
    ax.set_ylabel("p99 latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Conversation list: p99 against page depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--companies", type=int, default=100)
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=10_000_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    run(
        companies=args.companies,
        conversations=args.conversations,
        messages=args.messages,
        samples=args.samples,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
