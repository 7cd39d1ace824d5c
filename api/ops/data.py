"""What the console shows, assembled from the collector, /ready's checks, Postgres and the
dead-letter topics. The routes (HTML and JSON) both call these, so the page never shows a number
that the JSON API does not have.

Dead letters are read and replayed with `infra.kafka.replay`, the same code as `cortexx dlq`:
the one place the API leans on the processors package, so that the console and the CLI can never
disagree about what a replay is.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg

from api.db import Db, request_db
from api.errors import ApiError, NotFound
from api.ops.models import (
    BreakerOut,
    FailureOut,
    IngestOut,
    LagOut,
    LetterDetailOut,
    LetterFilterIn,
    LetterOut,
    LettersOut,
    MediaCountsOut,
    MediaFailureOut,
    MediaFailuresOut,
    OverviewOut,
    PointOut,
    ProcessOut,
    ReplayEventOut,
    ReplayIn,
    ReplayOut,
    TenantOut,
    TenantsOut,
    WhatsAppContactsOut,
    WorkerOut,
)
from api.ops.queries import MEDIA_FAILURES, MESSAGE_STATUS, REPLAY_EVENTS, REPLAY_EVENTS_OF, TENANTS
from api.service import ApiService
from api.sessions import SessionUser
from infra.kafka.replay import LetterFilter, ReplayError, StoredLetter, replay
from infra.kafka.topics import WUZAPI_OUTBOUND
from infra.runtime.logging import get_logger
from schemas.deadletter import FailureInfo
from schemas.outbound import OutboundMessage, OutboundRecordError
from schemas.wuzapi import instance_name

log = get_logger("api.ops")

LETTERS_MAX = 500
SILENCE_FACTOR = 3.0  # "longer than usual": three usual gaps...
SILENCE_MIN_S = 300.0  # ...and never less than five minutes


# Overview.


async def overview(service: ApiService) -> OverviewOut:
    collector = service.ops.collector
    summary = collector.summary()
    _, ready = await service.readiness.check()
    checks = ready["checks"]
    processes = {
        "api": ProcessOut(status="up"),
        **{
            name: ProcessOut(status=p["status"], error=p.get("error"))
            for name, p in summary.get("processes", {}).items()
        },
        "postgres": ProcessOut(status=checks["postgres"]["status"], error=checks["postgres"].get("error")),
        "broker": ProcessOut(status=checks["broker"]["status"], error=checks["broker"].get("error")),
        "media_store": ProcessOut(
            status=checks["media_store"]["status"], error=checks["media_store"].get("error")
        ),
    }
    for name in ("ingest", "worker"):
        processes.setdefault(name, ProcessOut(status="unknown", error="not scraped yet"))
    breakers = [BreakerOut(**b) for b in checks["wuzapi"].get("breakers", [])]
    known = {b.instance for b in breakers}
    # An instance the worker reports open before its row was written still shows.
    for instance, is_open in summary.get("worker", {}).get("breakers_open", {}).items():
        if instance not in known:
            breakers.append(BreakerOut(instance=instance, state="open" if is_open else "closed"))
    snap = service.readiness.snapshot
    worker = {k: v for k, v in summary.get("worker", {}).items() if k != "breakers_open"}
    return OverviewOut(
        at=summary.get("at"),
        window_s=summary.get("window_s", 0),
        processes=processes,
        ingest=IngestOut(**summary.get("ingest", {})),
        worker=WorkerOut(**worker),
        lag=LagOut(
            topics=snap.lag,
            partitions=snap.lag_partitions,
            total=sum(snap.lag.values()),
            error=snap.error,
        ),
        dead_letters=snap.dead_letters,
        breakers=breakers,
        series=[PointOut(**p) for p in collector.series()],
    )


# Dead letters.


@contextlib.asynccontextmanager
async def _connection(service: ApiService) -> AsyncIterator[asyncpg.Connection]:
    settings = service.settings
    timeout_s, slow_ms = settings.api_db_timeout_s, settings.slow_query_ms
    async with request_db(service.pool, timeout_s=timeout_s, slow_ms=slow_ms) as db:
        yield db.connection


def _failure(info: FailureInfo) -> FailureOut:
    return FailureOut(
        type=info.type,
        message=info.message,
        attempts=info.attempts,
        first_failure_at=datetime.fromtimestamp(info.first_failure_ms / 1000, tz=UTC),
        last_failure_at=datetime.fromtimestamp(info.last_failure_ms / 1000, tz=UTC),
    )


def _letter(stored: StoredLetter) -> LetterOut:
    letter = stored.letter
    return LetterOut(
        id=stored.id,
        source_topic=letter.source_topic,
        source_partition=letter.source_partition,
        source_offset=letter.source_offset,
        tenant=letter.tenant,
        error=_failure(letter.error),
        replayed=stored.replayed,
    )


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode()


def to_filter(f: LetterFilterIn | None) -> LetterFilter:
    if f is None:
        return LetterFilter()

    def aware(when: datetime | None) -> datetime | None:
        return when if when is None or when.tzinfo else when.replace(tzinfo=UTC)

    return LetterFilter(
        topic=f.topic or None,
        tenant=f.tenant or None,
        error_type=f.error_type or None,
        since=aware(f.since),
        until=aware(f.until),
    )


async def _load(service: ApiService, conn: asyncpg.Connection) -> list[StoredLetter]:
    assert service.settings.kafka_bootstrap
    try:
        return await service.ops.dead_letters.letters(conn)
    except ReplayError as exc:
        raise ApiError(503, "broker_unavailable", str(exc)) from exc


async def letters(service: ApiService, where: LetterFilterIn | None, limit: int = LETTERS_MAX) -> LettersOut:
    match = to_filter(where)
    async with _connection(service) as conn:
        stored = [s for s in await _load(service, conn) if match.matches(s)]
    stored.sort(key=lambda s: s.letter.error.last_failure_ms, reverse=True)
    return LettersOut(items=[_letter(s) for s in stored[:limit]], total=len(stored))


async def letter(service: ApiService, db: Db, letter_id: str) -> LetterDetailOut:
    async with _connection(service) as conn:
        found = next((s for s in await _load(service, conn) if s.id == letter_id), None)
    if found is None:
        raise NotFound("dead letter")
    events = await db.fetch(REPLAY_EVENTS_OF, letter_id)
    item = found.letter
    status = None
    if item.source_topic == WUZAPI_OUTBOUND:
        try:
            message = OutboundMessage.from_bytes(item.value)
        except OutboundRecordError:
            message = None  # a poison record: there is no message to show
        if message is not None:
            status = await db.fetchval(MESSAGE_STATUS, message.company_id, message.id)
    return LetterDetailOut(
        **_letter(found).model_dump(),
        key=_text(item.key),
        value=_text(item.value) or "",
        headers={k: _text(v) for k, v in item.header_bytes()},
        history=[_failure(h) for h in item.history],
        replays=[ReplayEventOut(**dict(r)) for r in events],
        message_status=status,
    )


async def replay_letters(service: ApiService, user: SessionUser, body: ReplayIn) -> ReplayOut:
    """A selection (`ids`) or a filter; a dry run unless `dry_run` is false."""
    if body.ids is None and body.filter is None:
        raise ApiError(422, "invalid_request", "give `ids` or a `filter` of the dead letters to replay")
    who = f"ops:{user.email}"
    async with _connection(service) as conn:
        stored = await _load(service, conn)
        missing: list[str] = []
        if body.ids is not None:
            by_id = {s.id: s for s in stored}
            missing = [i for i in body.ids if i not in by_id]
            chosen = [by_id[i] for i in dict.fromkeys(body.ids) if i in by_id]
            if body.filter is not None:
                match = to_filter(body.filter)
                chosen = [s for s in chosen if match.matches(s)]
        else:
            match = to_filter(body.filter)
            chosen = [s for s in stored if match.matches(s)]
        try:
            result = await replay(
                chosen,
                producer=service.producer,
                conn=conn,
                who=who,
                force=body.force,
                dry_run=body.dry_run,
            )
        except ReplayError as exc:
            raise ApiError(503, "broker_unavailable", str(exc)) from exc
    if not body.dry_run:
        log.info("ops.replayed", by=who, replayed=len(result.replayed), skipped=len(result.skipped))
    return ReplayOut(
        dry_run=body.dry_run,
        matched=len(chosen),
        replayed=result.replayed,
        skipped=result.skipped,
        missing=missing,
        replayed_by=who,
    )


async def media_failures(db: Db, limit: int = 200) -> MediaFailuresOut:
    """Files that could not be fetched, or are being retried, newest first. Their dead letters
    are on `meta.media.dlq`, in the dead-letter views (topic `meta.media`)."""
    return MediaFailuresOut(items=[MediaFailureOut(**dict(r)) for r in await db.fetch(MEDIA_FAILURES, limit)])


async def replay_events(db: Db, limit: int = 50) -> list[ReplayEventOut]:
    return [ReplayEventOut(**dict(r)) for r in await db.fetch(REPLAY_EVENTS, limit)]


# Tenants.


async def tenants(service: ApiService, db: Db, limit: int = 500) -> TenantsOut:
    rows = await db.fetch(TENANTS, limit)
    _, ready = await service.readiness.check()
    states: dict[str, Any] = {
        b["instance"]: b["state"] for b in ready["checks"]["wuzapi"].get("breakers", [])
    }
    items = []
    for r in rows:
        instance = instance_name(r["wuzapi_token"] or service.settings.wuzapi_token)
        gap = float(r["usual_gap_s"]) if r["usual_gap_s"] is not None else None
        silent_s = float(r["silent_s"]) if r["silent_s"] is not None else None
        silent = (
            gap is not None and silent_s is not None and silent_s > max(SILENCE_FACTOR * gap, SILENCE_MIN_S)
        )
        items.append(
            TenantOut(
                slug=r["slug"],
                name=r["name"],
                messages_total=r["total"],
                messages_24h=r["last_24h"],
                whatsapp_contacts=WhatsAppContactsOut(
                    total=r["wa_total"], with_phone=r["wa_with_phone"], username_only=r["wa_username_only"]
                ),
                media=MediaCountsOut(
                    stored=r["media_stored"],
                    pending=r["media_pending"],
                    failed=r["media_failed"],
                    bytes=r["media_bytes"],
                ),
                last_webhook_at=r["last_at"],
                usual_gap_s=None if gap is None else round(gap, 1),
                silent_s=None if silent_s is None else round(silent_s, 1),
                silent=silent,
                rate_limit_per_s=r["rate_limit_per_s"],
                rate_limit_burst=r["rate_limit_burst"],
                breaker_instance=instance,
                breaker_state=states.get(instance, "closed"),
            )
        )
    return TenantsOut(items=items)
