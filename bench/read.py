"""Read API: p50/p99 of the conversation list at pages 1, 50, 500 and 5,000, the status counts and
a conversation's messages, on a generated data set (bench/gen_read.py), against OFFSET pagination
of the same query as the baseline.

Two levels, on the same data:
- HTTP, what a client sees: `cortexx api` as a real process, a user of the big company logged in
  through `POST /api/v1/sessions`, its cookie kept, one keep-alive connection (aiohttp). Page N is
  reached by following the signed `next_cursor` from page 1 (untimed walk), then requested
  again and again with that cursor. Session lookup, JSON and the request middleware included.
- SQL, the API's own statements (api/queries.py: LIST_CONVERSATIONS, CONVERSATION_COUNTS,
  LIST_MESSAGES) through asyncpg prepared statements; page N starts after the last row of page
  N-1. The OFFSET baseline is the same list query skipping (N-1) x 20 rows (the API has no OFFSET
  mode, so that baseline exists at the SQL level only: an OFFSET API would add the HTTP cost).

Target: p99 under 10 ms over HTTP for every case, flat in depth (chart: p99 against page depth).

    python -m bench.read [--conversations 1000000 --messages 10000000 --samples 200]
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from api.cursor import START
from api.queries import CONVERSATION_COUNTS, LIST_CONVERSATIONS, LIST_MESSAGES
from api.users import hash_password
from bench.common import (
    RESULTS_DIR,
    BenchError,
    Child,
    argument_parser,
    console,
    percentile,
    print_table,
    running,
    save_result,
    services,
)
from bench.gen_read import generate
from harness.embedded import free_port

PAGES = (1, 50, 500, 5000)
PAGE_SIZE = 20
TARGET_P99_MS = 10.0
KEYSET_PREDICATE = "   AND (c.created_at, c.id) < ($2, $3)\n"
PASSWORD = "bench read password"
COOKIE = "cortexx_session"


def offset_sql() -> str:
    """The same list query, paginated by OFFSET instead of the keyset position."""
    sql = LIST_CONVERSATIONS.sql
    assert KEYSET_PREDICATE in sql and "LIMIT $4" in sql
    return sql.replace(KEYSET_PREDICATE, "").replace("LIMIT $4", "LIMIT $2 OFFSET $3")


def page_case(page: int) -> str:
    return f"conversations page {page:,}"


async def _time(call: Callable[[], Awaitable[Any]], samples: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        await call()
    out = []
    for _ in range(samples):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000)
    return out


@dataclass
class Case:
    """One measured case: ours over HTTP and in SQL, and the OFFSET baseline where there is one."""

    name: str
    page: int | None = None
    sql: list[float] = field(default_factory=list)
    http: list[float] = field(default_factory=list)
    offset: list[float] | None = None
    # The ids of the page as the SQL keyset query returns them, to check what HTTP returned.
    ids: list[int] = field(default_factory=list)
    same_rows: bool = True
    plan: list[str] | None = None

    def row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"case": self.name, "page": self.page, "same_rows": self.same_rows}
        for label, values in (("http", self.http), ("sql", self.sql), ("offset", self.offset)):
            if values:
                out[f"{label}_p50_ms"] = round(percentile(values, 50), 3)
                out[f"{label}_p99_ms"] = round(percentile(values, 99), 3)
        if self.plan:
            out["plan"] = self.plan
        return out


@dataclass
class Setup:
    """What the HTTP run needs from the data set."""

    big_company: int
    typical_company: int
    emails: dict[int, str]
    message_conversations: list[int]


async def add_users(url: str, companies: list[int]) -> dict[int, str]:
    """An agent per company, who logs in through the API like anyone else."""
    conn = await asyncpg.connect(url)
    try:
        digest = hash_password(PASSWORD)
        emails = {}
        for company in companies:
            emails[company] = f"agent@read-{company}.bench"
            await conn.execute(
                "INSERT INTO users (company_id, email, name, password_hash) VALUES ($1, $2, 'Agent', $3)",
                company,
                emails[company],
                digest,
            )
        return emails
    finally:
        await conn.close()


async def measure_sql(url: str, setup: Setup, *, samples: int, seed: int) -> dict[str, Case]:
    conn = await asyncpg.connect(url)
    cases: dict[str, Case] = {}
    big = setup.big_company
    try:
        keyset = await conn.prepare(LIST_CONVERSATIONS.sql)
        offset = await conn.prepare(offset_sql())
        for page in PAGES:
            skip = (page - 1) * PAGE_SIZE
            if page == 1:
                at, last_id = START  # a first page: a position past every row, as the API does
            else:
                before = await offset.fetch(big, 1, skip - 1)
                if not before:
                    console.print(f"[yellow]page {page:,} is past the data set's end: skipped[/]")
                    continue
                at, last_id = before[0]["created_at"], before[0]["id"]
            case = Case(page_case(page), page=page)
            case.sql = await _time(partial(keyset.fetch, big, at, last_id, PAGE_SIZE), samples)
            case.offset = await _time(partial(offset.fetch, big, PAGE_SIZE, skip), samples)
            check_ours = await keyset.fetch(big, at, last_id, PAGE_SIZE)
            check_base = await offset.fetch(big, PAGE_SIZE, skip)
            case.ids = [r["id"] for r in check_ours]
            case.same_rows = case.ids == [r["id"] for r in check_base]
            cases[case.name] = case
        counts = await conn.prepare(CONVERSATION_COUNTS.sql)
        for label, company in (("big", big), ("typical", setup.typical_company)):
            n = await conn.fetchval(
                "SELECT count(*) FROM conversations WHERE company_id = $1 AND deleted_at IS NULL", company
            )
            case = Case(f"status counts ({label} company, {n:,} conv.)")
            case.sql = await _time(partial(counts.fetch, company), samples)
            kept = {r["status"]: r["n"] for r in await counts.fetch(company)}
            case.same_rows = sum(kept.values()) == n
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {CONVERSATION_COUNTS.sql}", company)
            case.plan = [r[0] for r in plan]
            cases[f"counts:{label}"] = case
        messages = await conn.prepare(LIST_MESSAGES.sql)
        rng = random.Random(seed)
        ids = setup.message_conversations
        case = Case("messages of a conversation (page 1)")
        case.sql = await _time(lambda: messages.fetch(big, rng.choice(ids), *START, PAGE_SIZE), samples)
        cases["messages"] = case
    finally:
        await conn.close()
    return cases


class ApiClient:
    """One logged-in user on one keep-alive connection, the cookie carried by hand."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self._session = session
        self._base = base
        self._headers: dict[str, str] = {}

    async def login(self, email: str) -> None:
        async with self._session.post(
            f"{self._base}/api/v1/sessions", json={"email": email, "password": PASSWORD}
        ) as response:
            if response.status != 201:
                raise BenchError(f"login of {email}: {response.status} {await response.text()}")
            self._headers = {"Cookie": f"{COOKIE}={response.cookies[COOKIE].value}"}

    async def get(self, path: str, **params: str) -> Any:
        async with self._session.get(f"{self._base}{path}", params=params, headers=self._headers) as response:
            if response.status != 200:
                raise BenchError(f"GET {path}: {response.status} {await response.text()}")
            return await response.json()


async def measure_http(base: str, setup: Setup, cases: dict[str, Case], *, samples: int, seed: int) -> None:
    connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection, as one browser tab
    async with aiohttp.ClientSession(connector=connector) as session:
        big = ApiClient(session, base)
        await big.login(setup.emails[setup.big_company])
        # Walk the list by its signed cursors (untimed) and keep the one that starts each page.
        cursors: dict[int, str | None] = {}
        cursor: str | None = None
        started = time.monotonic()
        with console.status(f"walking to page {max(PAGES):,} over HTTP"):
            for page in range(1, max(PAGES) + 1):
                if page in PAGES:
                    cursors[page] = cursor
                    if page == max(PAGES):
                        break
                doc = await big.get("/api/v1/conversations", **({"cursor": cursor} if cursor else {}))
                cursor = doc["next_cursor"]
                if cursor is None:
                    break
        console.print(f"walked {page:,} pages over HTTP in {time.monotonic() - started:.1f} s")
        for page, start in cursors.items():
            case = cases.get(page_case(page))
            if case is None:
                continue
            params = {"cursor": start} if start else {}
            first = await big.get("/api/v1/conversations", **params)
            case.same_rows = case.same_rows and [c["id"] for c in first["items"]] == case.ids
            case.http = await _time(partial(big.get, "/api/v1/conversations", **params), samples)
        case = cases["counts:big"]
        case.http = await _time(partial(big.get, "/api/v1/conversations/counts"), samples)
        typical = ApiClient(session, base)
        await typical.login(setup.emails[setup.typical_company])
        case = cases["counts:typical"]
        case.http = await _time(partial(typical.get, "/api/v1/conversations/counts"), samples)
        rng = random.Random(seed)
        ids = setup.message_conversations
        case = cases["messages"]
        case.http = await _time(lambda: big.get(f"/api/v1/conversations/{rng.choice(ids)}/messages"), samples)


async def _message_conversations(url: str, company: int) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id FROM conversations WHERE company_id = $1 ORDER BY id LIMIT 5000", company
        )
        return [r["id"] for r in rows]
    finally:
        await conn.close()


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
        setup = Setup(
            big_company=1,
            typical_company=2,
            emails=asyncio.run(add_users(svc.database_url, [1, 2])),
            message_conversations=asyncio.run(_message_conversations(svc.database_url, 1)),
        )
        cases = asyncio.run(measure_sql(svc.database_url, setup, samples=samples, seed=seed))
        port = free_port()
        # Plain http on 127.0.0.1: the cookie must not be Secure-only for a client to send it.
        env = svc.env(session_cookie_secure="false")
        api = Child.cortexx("api", ["api", "--port", str(port)], env, svc.data_dir, port=port)
        with running(api):
            asyncio.run(measure_http(api.url, setup, cases, samples=samples, seed=seed))
    rows = [c.row() for c in cases.values()]
    table = []
    met = True
    for r in rows:
        worst = max(r.get("http_p99_ms", 0.0), r.get("sql_p99_ms", 0.0))
        ok = worst < TARGET_P99_MS and r["same_rows"]
        met = met and ok
        table.append(
            (
                r["case"],
                r.get("http_p50_ms"),
                r.get("http_p99_ms"),
                r.get("sql_p50_ms"),
                r.get("sql_p99_ms"),
                r.get("offset_p50_ms"),
                r.get("offset_p99_ms"),
                (r["offset_p99_ms"] / r["http_p99_ms"]) if r.get("offset_p99_ms") else None,
                "MET" if ok else "MISSED",
            )
        )
    print_table(
        f"read: {conversations:,} conversations, {messages:,} messages, {companies} companies "
        f"({samples} samples each; OFFSET is SQL only)",
        [
            "case",
            "HTTP p50 ms",
            "HTTP p99 ms",
            "SQL p50 ms",
            "SQL p99 ms",
            "OFFSET p50 ms",
            "OFFSET p99 ms",
            "OFFSET SQL / ours HTTP p99",
            "p99 < 10 ms",
        ],
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
    ax.plot(xs, [r["http_p99_ms"] for r in pages], "-o", color="tab:blue", label="keyset (ours), HTTP")
    ax.plot(xs, [r["sql_p99_ms"] for r in pages], ":o", color="tab:cyan", label="keyset (ours), SQL")
    ax.plot(xs, [r["offset_p99_ms"] for r in pages], "--o", color="tab:gray", label="OFFSET, SQL")
    ax.axhline(TARGET_P99_MS, color="tab:red", linewidth=0.8, label="target 10 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([r["page"] for r in pages], [f"{r['page']:,}" for r in pages])
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
    parser = argument_parser(__doc__)
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
