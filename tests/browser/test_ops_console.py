"""The operators' console in a real browser (Debian's Chromium through Playwright) against the
real stack: log in as admin, watch the overview move while `cortexx simulate` runs, see a failed
reply in the dead letters with its error, fix the cause, preview and replay it, and check that it
was delivered once. An agent gets 403. Screenshots of each step go to tests/artifacts/ops/."""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from infra.postgres.tenants import Tenant
from schemas.outbound import gateway_message_id
from tests.api.world import PASSWORD, add_member, auth, login
from tests.support import CortexxProcess, Simulator, wait_until

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "ops"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium: `apt-get install -y chromium` (as .ci/run does)"
)


async def _simulate(
    ops_api: CortexxProcess, ingest: CortexxProcess, tenant: Tenant
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "simulate",
        "--url",
        ingest.url,
        "--tenant",
        tenant.slug,
        "--contacts",
        "8",
        "--messages",
        "8",
        "--concurrency",
        "2",
        env=ops_api.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_operator_finds_and_replays_a_failed_webhook(
    db: asyncpg.Connection,
    tenant: Tenant,
    ops_api: CortexxProcess,
    ingest: CortexxProcess,
    wuzapi: Simulator,
):
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await wuzapi.reset()
    admin = await add_member(db, tenant, "admin")
    await db.execute("UPDATE users SET role = 'operator' WHERE id = $1", admin.id)
    agent = await add_member(db, tenant, "agent")
    phone = f"49157{secrets.randbelow(10**8):08d}"
    contact = await db.fetchval(
        "INSERT INTO contacts (company_id, phone_number) VALUES ($1, $2) RETURNING id", tenant.id, phone
    )
    conversation = await db.fetchval(
        "INSERT INTO conversations (company_id, contact_id) VALUES ($1, $2) RETURNING id", tenant.id, contact
    )

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 1000})
            page = await context.new_page()
            page.set_default_timeout(20_000)

            # 1. Log in as admin.
            await page.goto(f"{ops_api.url}/ops")
            await expect(page.locator("#login")).to_be_visible()
            await page.fill("#email", admin.email)
            await page.fill("#password", PASSWORD)
            await page.screenshot(path=ARTIFACTS / "01-login.png")
            await page.click("#login-button")
            await page.wait_for_url(f"{ops_api.url}/ops")
            for name in ("ingest", "worker", "postgres", "broker"):
                await expect(page.locator(f'[data-process="{name}"] [data-status]')).to_have_text("up")
            await page.screenshot(path=ARTIFACTS / "02-overview.png", full_page=True)

            # 2. The overview moves by itself while `cortexx simulate` runs.
            total = page.locator('[data-field="worker.records_total"]')
            before = await total.text_content()
            sim = await _simulate(ops_api, ingest, tenant)
            await page.wait_for_function(
                "b => document.querySelector('[data-field=\"worker.records_total\"]').textContent !== b",
                arg=before,
            )
            await expect(page.locator('[data-field="ingest.accepted_per_min"]')).not_to_have_text("0")
            out, _ = await asyncio.wait_for(sim.communicate(), timeout=90)
            assert sim.returncode == 0, out.decode(errors="replace")[-2000:]
            await page.wait_for_timeout(1200)  # a refresh or two after the run, for the picture
            await page.screenshot(path=ARTIFACTS / "03-overview-live.png", full_page=True)
            assert await total.text_content() != before

            # 3. A reply that WUZAPI refuses (400) lands in the dead letters with its error.
            await wuzapi.faults(fail_phones={phone: 400})
            cookie = next(c["value"] for c in await context.cookies() if c["name"] == "cortexx_session")
            async with httpx.AsyncClient(timeout=10) as client:
                sent = await client.post(
                    f"{ops_api.url}/api/v1/conversations/{conversation}/messages",
                    json={"text": "Your order has shipped"},
                    headers=auth(cookie),
                )
            assert sent.status_code == 202, sent.text
            message_id = sent.json()["external_id"]

            async def failed() -> bool:
                status = await db.fetchval("SELECT status FROM messages WHERE external_id = $1", message_id)
                return status == "failed"

            await wait_until(failed, what="the reply failed")
            row = page.locator("#letters tbody tr[data-tenant]")

            async def listed() -> bool:
                await page.goto(f"{ops_api.url}/ops/dead-letters?tenant={tenant.slug}")
                return await row.count() == 1

            await wait_until(listed, timeout_s=20, interval_s=0.5, what="the dead letter in the console")
            await expect(row).to_contain_text("WuzapiPermanent")
            await expect(row).to_contain_text("400")
            await page.screenshot(path=ARTIFACTS / "04-dead-letters.png", full_page=True)
            letter_id = await row.get_attribute("data-id")
            assert letter_id and letter_id.startswith("wuzapi.outbound.dlq:")

            await row.locator("a").click()
            await expect(page.locator("#error")).to_contain_text("WuzapiPermanent")
            await expect(page.locator("#value")).to_contain_text(message_id)
            await expect(page.locator("#message-status")).to_have_text("failed")
            await page.screenshot(path=ARTIFACTS / "05-dead-letter.png", full_page=True)

            # 4. Fix the cause, preview the replay (dry run), then replay.
            await wuzapi.faults(fail_phones={})
            await page.goto(f"{ops_api.url}/ops/dead-letters?tenant={tenant.slug}")
            await page.locator(f'input.pick[value="{letter_id}"]').check()
            await page.click("#preview-selected")
            await expect(page.locator("#replay-preview")).to_contain_text("Dry run: would replay 1 of 1")
            await page.screenshot(path=ARTIFACTS / "06-replay-preview.png", full_page=True)
            assert (
                await db.fetchval("SELECT count(*) FROM dlq_replay_events WHERE dlq_id = $1", letter_id) == 0
            )
            await page.click("#replay-confirm")
            await expect(page.locator("#replay-result")).to_contain_text("Replayed 1, skipped 0")
            await page.screenshot(path=ARTIFACTS / "07-replayed.png", full_page=True)

            # 5. Delivered once: Postgres, the gateway's ledger, and the console agree.
            async def delivered() -> bool:
                status = await db.fetchval("SELECT status FROM messages WHERE external_id = $1", message_id)
                return status == "sent"

            await wait_until(delivered, what="the replayed reply sent")
            # The one message the phone got is the reply, under its own id: the failed first
            # send delivered nothing and the replay sent it once.
            delivered = await wuzapi.delivered_to([phone])
            delivered.assert_once(
                {(phone, "Your order has shipped"): gateway_message_id(tenant.id, message_id)}
            )
            assert await db.fetchval("SELECT count(*) FROM messages WHERE external_id = $1", message_id) == 1
            audit = await db.fetch("SELECT replayed_by FROM dlq_replay_events WHERE dlq_id = $1", letter_id)
            assert [r["replayed_by"] for r in audit] == [f"ops:{admin.email}"]
            await page.goto(f"{ops_api.url}/ops/dead-letters/{letter_id}")
            await expect(page.locator("#message-status")).to_have_text("sent")
            await expect(page.locator("main")).to_contain_text(f"ops:{admin.email}")
            await page.screenshot(path=ARTIFACTS / "08-delivered.png", full_page=True)

            await page.goto(f"{ops_api.url}/ops/tenants")
            await expect(page.locator(f'#tenants tr[data-slug="{tenant.slug}"]')).to_be_visible()
            await page.screenshot(path=ARTIFACTS / "09-tenants.png", full_page=True)

            # 6. An agent's cookie gets 403.
            async with httpx.AsyncClient(timeout=10) as client:
                agent_cookie = await login(client, ops_api, agent)
            agent_context = await browser.new_context()
            await agent_context.add_cookies(
                [{"name": "cortexx_session", "value": agent_cookie, "url": ops_api.url}]
            )
            agent_page = await agent_context.new_page()
            response = await agent_page.goto(f"{ops_api.url}/ops")
            assert response is not None and response.status == 403
            await expect(agent_page.locator("#forbidden")).to_be_visible()
            await agent_page.screenshot(path=ARTIFACTS / "10-agent-403.png")
        finally:
            await browser.close()
