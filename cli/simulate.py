"""`cortexx simulate`: post a realistic signed webhook stream to a running ingest, then check
that Postgres holds every message once with its final status."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from cli.services import need_url
from harness.meta_samples import SimulationPlan, build_plan, sign
from infra.postgres.db import connect
from infra.postgres.migrate import migrate
from infra.postgres.tenants import Tenant, get_tenant, upsert_tenant
from infra.runtime.settings import Settings

console = Console(stderr=True)

FETCH_MESSAGES = """
SELECT m.external_id, m.status, count(*) OVER (PARTITION BY m.external_id) AS copies
  FROM messages m WHERE m.company_id = $1 AND m.external_id = ANY($2::text[])
"""


async def _demo_tenant(url: str, slug: str) -> Tenant:
    # Run beside `cortexx up`, whose Postgres may be restarting: wait for it a while.
    await migrate(url, wait_s=30)
    conn = await connect(url, wait_s=30)
    try:
        tenant = await get_tenant(conn, slug)
        if tenant is None:
            tenant, _ = await upsert_tenant(
                conn,
                slug=slug,
                name=f"{slug.title()} (simulated)",
                app_secret=secrets.token_hex(16),
                verify_token=secrets.token_hex(8),
            )
            console.print(f"registered demo company [bold]{slug}[/]")
        return tenant
    finally:
        await conn.close()


async def _post_all(plan: SimulationPlan, base_url: str, tenant: Tenant, concurrency: int) -> Counter[int]:
    codes: Counter[int] = Counter()
    url = f"{base_url.rstrip('/')}/webhooks/meta/{tenant.slug}"
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for envelope in plan.webhooks:
        queue.put_nowait(orjson.dumps(envelope))
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("posting webhooks", total=len(plan.webhooks))
        async with httpx.AsyncClient(timeout=30) as client:

            async def sender() -> None:
                while not queue.empty():
                    body = queue.get_nowait()
                    # A 503 means "retry later", exactly as Meta would.
                    for attempt in range(10):
                        try:
                            response = await client.post(
                                url,
                                content=body,
                                headers={
                                    "X-Hub-Signature-256": sign(body, tenant.app_secret),
                                    "Content-Type": "application/json",
                                },
                            )
                            status = response.status_code
                        except httpx.TransportError:
                            status = 0
                        if status not in (0, 503):
                            break
                        await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
                    codes[status] += 1
                    progress.advance(task)

            await asyncio.gather(*(sender() for _ in range(concurrency)))
    return codes


async def _verify(url: str, tenant: Tenant, plan: SimulationPlan, timeout_s: float) -> dict[str, Any]:
    keys = list(plan.expected)
    deadline = time.monotonic() + timeout_s
    conn = await connect(url)
    try:
        while True:
            rows = await conn.fetch(FETCH_MESSAGES, tenant.id, keys)
            found = {r["external_id"]: r for r in rows}
            missing = [k for k in keys if k not in found]
            wrong = [
                k for k, exp in plan.expected.items() if k in found and found[k]["status"] != exp.final_status
            ]
            doubled = [k for k, r in found.items() if r["copies"] > 1]
            if (not missing and not wrong) or time.monotonic() > deadline:
                return {"missing": missing, "wrong_status": wrong, "doubled": doubled, "stored": len(found)}
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def run_simulation(
    settings: Settings,
    *,
    base_url: str,
    tenant: str,
    contacts: int,
    messages: int,
    concurrency: int,
    seed: int,
    verify: bool,
    timeout_s: float,
) -> bool:
    database_url = need_url(settings.database_url, "CORTEXX_DATABASE_URL")
    demo = asyncio.run(_demo_tenant(database_url, tenant))
    plan = build_plan(
        seed=seed,
        contacts=contacts,
        messages_per_contact=messages,
        phone_number_id="106540352242922",
        display_phone_number="15550783881",
        waba_id="102290129340398",
        page_id="112233445566778",
        start_ts=int(time.time()) - 3600,
    )
    started = time.monotonic()
    codes = asyncio.run(_post_all(plan, base_url, demo, concurrency))
    posted_s = time.monotonic() - started
    table = Table(title="cortexx simulate")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("webhooks posted", str(len(plan.webhooks)))
    table.add_row("of which re-sends", str(plan.duplicates))
    for code, count in sorted(codes.items()):
        table.add_row(f"answered {code or 'no connection'}", str(count))
    table.add_row("distinct messages", str(len(plan.expected)))
    table.add_row("posting took", f"{posted_s:.2f} s")
    ok = codes.get(200, 0) == len(plan.webhooks)
    if verify:
        result = asyncio.run(_verify(database_url, demo, plan, timeout_s))
        stored_s = time.monotonic() - started
        table.add_row("messages in Postgres", str(result["stored"]))
        table.add_row("missing", str(len(result["missing"])))
        table.add_row("wrong final status", str(len(result["wrong_status"])))
        table.add_row("stored twice", str(len(result["doubled"])))
        table.add_row("all stored after", f"{stored_s:.2f} s")
        ok = ok and not result["missing"] and not result["wrong_status"] and not result["doubled"]
    table.add_row("result", "[green]OK[/]" if ok else "[red]FAILED[/]")
    Console().print(table)
    return ok
