"""`cortexx simulate`: post a realistic signed webhook stream to a running ingest, then check
that Postgres holds what it stands for: every message once with its final status (its type,
the message it replies to, forward and ad referral), every reaction on its message with the
last emoji sent (or removed), every edit applied, every revoked message marked deleted, and
every username user one contact with their username and no phone, and (beside the Graph API
simulator) every file of every media message stored; reactions, edits and revokes never as
messages."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
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

# Messages by external id: the plan's messages, and the ids of its reactions, edits and revokes
# (which must not be messages).
FETCH_MESSAGES = """
SELECT m.external_id, m.direction, m.type, m.status, m.body, m.reply_to, m.forwarded,
       m.referral IS NOT NULL AS referral, cv.referral IS NOT NULL AS conversation_referral,
       m.edited_at IS NOT NULL AS edited, m.deleted_at IS NOT NULL AS deleted,
       count(*) OVER (PARTITION BY m.external_id) AS copies
  FROM messages m JOIN conversations cv ON cv.id = m.conversation_id
 WHERE m.company_id = $1 AND m.external_id = ANY($2::text[])
"""

# Reactions on the plan's targets, with the contact of the conversation their target is in: in a
# one-to-one chat the reacting user is that contact.
FETCH_REACTIONS = """
SELECT r.message_external_id AS target, r.emoji, r.contact_id, cv.contact_id AS owner
  FROM message_reactions r
  LEFT JOIN messages m ON m.company_id = r.company_id AND m.external_id = r.message_external_id
  LEFT JOIN conversations cv ON cv.id = m.conversation_id
 WHERE r.company_id = $1 AND r.message_external_id = ANY($2::text[])
"""

# The files of the plan's media messages, by message: stored, all of them?
FETCH_MEDIA = """
SELECT message_external_id, bool_and(state = 'stored') AS stored, min(reason) AS reason
  FROM media
 WHERE company_id = $1 AND message_external_id = ANY($2::text[])
 GROUP BY message_external_id
"""
MEDIA_TYPES = frozenset(("image", "video", "audio", "document", "sticker", "file"))

# The live contacts the plan's BSUIDs name (any BSUID a contact has had names it).
FETCH_CONTACTS = """
SELECT cu.user_id, c.id, c.phone_number, c.username
  FROM contact_user_ids cu JOIN contacts c ON c.id = cu.contact_id AND c.deleted_at IS NULL
 WHERE cu.company_id = $1 AND cu.channel = 'whatsapp' AND cu.user_id = ANY($2::text[])
"""


@dataclass
class Verdict:
    """What Postgres holds of a plan, check by check (each list holds what is off)."""

    stored: int = 0
    missing: list[str] = field(default_factory=list)
    wrong_status: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)  # type, reply, forward, referral
    as_messages: list[str] = field(default_factory=list)  # reactions/edits/revokes stored as messages
    reactions_ok: int = 0
    reactions_off: list[str] = field(default_factory=list)
    edits_ok: int = 0
    edits_off: list[str] = field(default_factory=list)
    revokes_ok: int = 0
    revokes_off: list[str] = field(default_factory=list)
    username_ok: int = 0
    username_off: list[str] = field(default_factory=list)
    media_ok: int = 0
    media_off: list[str] = field(default_factory=list)  # media messages whose files are not all stored

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.wrong_status
            or self.doubled
            or self.wrong_shape
            or self.as_messages
            or self.reactions_off
            or self.edits_off
            or self.revokes_off
            or self.username_off
            or self.media_off
        )


async def check(
    conn: asyncpg.Connection, company_id: int, plan: SimulationPlan, *, media: bool = False
) -> Verdict:
    """Compare what Postgres holds for ``company_id`` with what ``plan`` should leave there
    (and, with ``media``, that every file of its media messages is stored)."""
    verdict = Verdict()
    if media:
        wanted = [k for k, e in plan.expected.items() if e.direction == "inbound" and e.type in MEDIA_TYPES]
        files = {r["message_external_id"]: r for r in await conn.fetch(FETCH_MEDIA, company_id, wanted)}
        for key in wanted:
            row = files.get(key)
            if row is not None and row["stored"]:
                verdict.media_ok += 1
            else:
                verdict.media_off.append(f"{key} ({row['reason'] if row else 'no media row'})")
    amendments = plan.amendment_ids()
    rows = await conn.fetch(FETCH_MESSAGES, company_id, [*plan.expected, *amendments])
    found = {r["external_id"]: r for r in rows if r["external_id"] not in amendments}
    verdict.stored = len(found)
    verdict.as_messages = sorted({r["external_id"] for r in rows if r["external_id"] in amendments})
    for key, exp in plan.expected.items():
        row = found.get(key)
        if row is None:
            verdict.missing.append(key)
            continue
        if row["status"] != exp.final_status:
            verdict.wrong_status.append(key)
        if row["copies"] > 1:
            verdict.doubled.append(key)
        if exp.direction == "inbound" and (
            row["type"] != exp.type
            or row["reply_to"] != exp.reply_to
            or row["forwarded"] != exp.forwarded
            or row["referral"] != exp.referral
            or (exp.referral and not row["conversation_referral"])
        ):
            verdict.wrong_shape.append(key)

    for target, edit in plan.edits.items():
        row = found.get(target)
        if row is not None and row["edited"] and row["body"] == edit.body:
            verdict.edits_ok += 1
        else:
            verdict.edits_off.append(target)
    for target in plan.revokes:
        row = found.get(target)
        if row is not None and row["deleted"]:
            verdict.revokes_ok += 1
        else:
            verdict.revokes_off.append(target)

    targets = sorted({target for target, _ in plan.reactions})
    held: dict[str, list[asyncpg.Record]] = {}
    for r in await conn.fetch(FETCH_REACTIONS, company_id, targets):
        held.setdefault(r["target"], []).append(r)
    for (target, user), reaction in plan.reactions.items():
        # Once, on a stored message, by the contact whose conversation it is in (only they
        # reacted to it), with the last emoji sent (NULL: removed).
        rows_of = held.get(target, [])
        if (
            len(rows_of) == 1
            and rows_of[0]["owner"] is not None
            and rows_of[0]["contact_id"] == rows_of[0]["owner"]
            and rows_of[0]["emoji"] == reaction.emoji
        ):
            verdict.reactions_ok += 1
        else:
            verdict.reactions_off.append(f"{target} by {user}")

    usernames = [u for u in plan.users.values() if u.kind == "username"]
    contacts: dict[str, asyncpg.Record] = {
        r["user_id"]: r
        for r in await conn.fetch(
            FETCH_CONTACTS, company_id, sorted({i for u in usernames for i in u.user_ids})
        )
    }
    for u in usernames:
        known = [contacts.get(i) for i in u.user_ids]
        one = {c["id"] for c in known if c is not None}
        current = contacts.get(u.user_id or "")
        if (
            len(one) == 1
            and None not in known
            and current is not None
            and current["phone_number"] is None
            and current["username"] == u.username
        ):
            verdict.username_ok += 1
        else:
            verdict.username_off.append(u.key)
    return verdict


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


async def _verify(
    url: str, tenant: Tenant, plan: SimulationPlan, timeout_s: float, *, media: bool
) -> Verdict:
    deadline = time.monotonic() + timeout_s
    conn = await connect(url)
    try:
        while True:
            verdict = await check(conn, tenant.id, plan, media=media)
            if verdict.ok or time.monotonic() > deadline:
                return verdict
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


def _graph_simulator(url: str) -> bool:
    """Whether the Graph API the worker fetches from is the simulator (it serves the samples)."""
    try:
        return httpx.get(f"{url}/_sim/faults", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _of(ok: int, off: list[str]) -> str:
    return f"{ok} of {ok + len(off)}"


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
        # Beside `cortexx up`'s Graph API simulator, attachments are on it, and every file of the
        # stream is checked stored; against Meta's own, the sample files do not exist.
        cdn_base=settings.graph_api if (media := _graph_simulator(settings.graph_api)) else None,
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
    amended = (plan.reactions, plan.edits, plan.revokes)
    table.add_row("reactions, edits, revokes", ", ".join(str(len(x)) for x in amended))
    table.add_row("posting took", f"{posted_s:.2f} s")
    ok = codes.get(200, 0) == len(plan.webhooks)
    if verify:
        result = asyncio.run(_verify(database_url, demo, plan, timeout_s, media=media))
        stored_s = time.monotonic() - started
        table.add_row("messages in Postgres", str(result.stored))
        table.add_row("missing", str(len(result.missing)))
        table.add_row("wrong final status", str(len(result.wrong_status)))
        table.add_row("stored twice", str(len(result.doubled)))
        table.add_row("wrong type, reply, forward or referral", str(len(result.wrong_shape)))
        table.add_row("reactions/edits/revokes stored as messages", str(len(result.as_messages)))
        table.add_row("reactions on their message", _of(result.reactions_ok, result.reactions_off))
        table.add_row("edits applied", _of(result.edits_ok, result.edits_off))
        table.add_row("deleted marked", _of(result.revokes_ok, result.revokes_off))
        table.add_row("username-only contacts", _of(result.username_ok, result.username_off))
        if media:
            table.add_row("media messages with their files stored", _of(result.media_ok, result.media_off))
        table.add_row("all stored after", f"{stored_s:.2f} s")
        ok = ok and result.ok
        for what, off in (
            ("missing", result.missing),
            ("wrong final status", result.wrong_status),
            ("stored twice", result.doubled),
            ("wrong type, reply, forward or referral", result.wrong_shape),
            ("stored as messages", result.as_messages),
            ("reactions not on their message as last sent", result.reactions_off),
            ("edits not applied", result.edits_off),
            ("revoked but not marked deleted", result.revokes_off),
            ("username users not one contact with their username and no phone", result.username_off),
            ("media messages whose files are not stored", result.media_off),
        ):
            if off:
                more = " ..." if len(off) > 5 else ""
                console.print(f"[red]{what}[/] ({len(off)}): {', '.join(off[:5])}{more}")
    table.add_row("result", "[green]OK[/]" if ok else "[red]FAILED[/]")
    Console().print(table)
    return ok
