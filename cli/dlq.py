"""`cortexx dlq list | show | replay`: the dead-letter tool."""

from __future__ import annotations

import asyncio
import getpass
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress
from rich.table import Table

from cli.services import need_url
from infra.kafka.producer import DurableProducer
from infra.kafka.replay import LetterFilter, ReplayError, StoredLetter, load_letters, replay
from infra.postgres.db import connect
from infra.postgres.migrate import migrate
from infra.runtime.logging import configure_logging
from infra.runtime.settings import Settings, get_settings

dlq_app = typer.Typer(help="List, inspect and replay dead letters.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def _when(value: str | None) -> datetime | None:
    """An ISO time, or a span back from now: 30m, 2h, 1d."""
    if not value:
        return None
    match = _RELATIVE.match(value)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither an ISO time nor a span like 30m, 2h, 1d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _urls() -> tuple[Settings, str, str]:
    settings = get_settings()
    configure_logging("warning", process="dlq")
    database = need_url(settings.database_url, "CORTEXX_DATABASE_URL")
    bootstrap = need_url(settings.kafka_bootstrap, "CORTEXX_KAFKA_BOOTSTRAP")
    return settings, database, bootstrap


async def _load(
    database: str, bootstrap: str, where: LetterFilter, *, writes: bool = False
) -> list[StoredLetter]:
    """The letters `where` matches. Only a command that writes (replay) migrates the database:
    `list` and `show` inspect it as it is."""
    if writes:
        await migrate(database)
    conn = await connect(database)
    try:
        return [s for s in await load_letters(bootstrap, conn) if where.matches(s)]
    finally:
        await conn.close()


def _filter(
    topic: str | None, tenant: str | None, error_type: str | None, since: str | None, until: str | None
) -> LetterFilter:
    return LetterFilter(
        topic=topic, tenant=tenant, error_type=error_type, since=_when(since), until=_when(until)
    )


TopicOpt = typer.Option(None, help="Source topic (meta.webhooks, wuzapi.outbound) or its .dlq topic.")
TenantOpt = typer.Option(None, help="Company slug.")
ErrorOpt = typer.Option(None, "--error-type", help="Error type, e.g. WuzapiPermanent.")
SinceOpt = typer.Option(None, help="Failed at or after: ISO time, or 30m / 2h / 1d ago.")
UntilOpt = typer.Option(None, help="Failed at or before: ISO time, or 30m / 2h / 1d ago.")


@dlq_app.command("list")
def list_letters(
    topic: str = TopicOpt,
    tenant: str = TenantOpt,
    error_type: str = ErrorOpt,
    since: str = SinceOpt,
    until: str = UntilOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List dead letters, oldest first."""
    _, database, bootstrap = _urls()
    try:
        letters = asyncio.run(_load(database, bootstrap, _filter(topic, tenant, error_type, since, until)))
    except ReplayError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(3) from None
    if as_json:
        for stored in letters:
            typer.echo(orjson.dumps(_summary(stored)).decode())
        return
    table = Table(title=f"{len(letters)} dead letter(s)")
    for column in ("id", "source", "tenant", "error", "attempts", "last failure", "replayed"):
        table.add_column(column)
    for stored in letters:
        s = _summary(stored)
        table.add_row(
            s["id"],
            s["source_topic"],
            s["tenant"] or "-",
            f"{s['error_type']}: {s['error'][:60]}",
            str(s["attempts"]),
            s["last_failure"],
            "yes" if s["replayed"] else "",
        )
    console.print(table)


def _summary(stored: StoredLetter) -> dict[str, Any]:
    letter = stored.letter
    return {
        "id": stored.id,
        "source_topic": letter.source_topic,
        "tenant": letter.tenant,
        "error_type": letter.error.type,
        "error": letter.error.message,
        "attempts": letter.error.attempts,
        "last_failure": stored.failed_at.isoformat(timespec="seconds"),
        "replayed": stored.replayed,
    }


@dlq_app.command("show")
def show(letter_id: str = typer.Argument(..., help="A dead letter id from `cortexx dlq list`.")) -> None:
    """Show one dead letter: its original record and its error history."""
    _, database, bootstrap = _urls()
    try:
        letters = asyncio.run(_load(database, bootstrap, LetterFilter()))
    except ReplayError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(3) from None
    found = next((s for s in letters if s.id == letter_id), None)
    if found is None:
        err.print(f"no dead letter {letter_id!r}")
        raise typer.Exit(1)
    letter = found.letter
    try:
        value: Any = orjson.loads(letter.value)
    except orjson.JSONDecodeError:
        value = letter.value.decode(errors="replace")
    doc = {
        **_summary(found),
        "source": f"{letter.source_topic}:{letter.source_partition}:{letter.source_offset}",
        "key": (letter.key or b"").decode(errors="replace"),
        "headers": {k: (v or b"").decode(errors="replace") for k, v in letter.header_bytes()},
        "value": value,
        "errors": [vars_of(h) for h in [*letter.history, letter.error]],
    }
    console.print_json(orjson.dumps(doc).decode())


def vars_of(info: Any) -> dict[str, Any]:
    return {f: getattr(info, f) for f in info.__dataclass_fields__}


@dlq_app.command("replay")
def replay_letters(
    ids: list[str] = typer.Argument(None, help="Dead letter ids; none: every one the filters match."),
    topic: str = TopicOpt,
    tenant: str = TenantOpt,
    error_type: str = ErrorOpt,
    since: str = SinceOpt,
    until: str = UntilOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be replayed; send nothing."),
    force: bool = typer.Option(False, help="Replay letters that were replayed before, too."),
) -> None:
    """Send dead letters back to their source topic, once each."""
    _, database, bootstrap = _urls()
    where = _filter(topic, tenant, error_type, since, until)
    if not ids and where == LetterFilter():
        err.print("name dead letter ids, or at least one filter (--topic, --tenant, ...), to replay")
        raise typer.Exit(2)

    async def run() -> tuple[list[str], list[str]]:
        letters = await _load(database, bootstrap, where, writes=True)
        if ids:
            wanted = set(ids)
            letters = [s for s in letters if s.id in wanted]
            missing = wanted - {s.id for s in letters}
            if missing:
                err.print(f"[yellow]not found: {', '.join(sorted(missing))}[/]")
        producer = DurableProducer(bootstrap)
        conn = await connect(database)
        try:
            with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), console=err) as bar:
                task = bar.add_task("dry run" if dry_run else "replaying", total=len(letters))
                result = await replay(
                    letters,
                    producer=producer,
                    conn=conn,
                    who=f"cli:{getpass.getuser()}",
                    force=force,
                    dry_run=dry_run,
                    progress=lambda _: bar.advance(task),
                )
        finally:
            await producer.stop()
            await conn.close()
        return result.replayed, result.skipped

    try:
        replayed, skipped = asyncio.run(run())
    except ReplayError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(3) from None
    verb = "would replay" if dry_run else "replayed"
    console.print(f"{verb} {len(replayed)}; skipped {len(skipped)} already replayed (use --force to resend)")
    for letter_id in replayed:
        console.print(f"  {verb}: {letter_id}")
