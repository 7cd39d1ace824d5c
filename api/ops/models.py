"""The console's JSON bodies (`/api/v1/ops/...`); they are its OpenAPI documentation too."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

ProcessStatus = Literal["up", "down", "unknown"]


class ProcessOut(BaseModel):
    status: ProcessStatus
    error: str | None = None


class IngestOut(BaseModel):
    accepted_per_min: float | None = Field(None, description="200 answers over the last minute.")
    refused_per_min: float | None = Field(None, description="Non-200 answers over the last minute.")
    p99_ms: float | None = Field(None, description="p99 POST latency over the last minute.")
    cache_hit_rate: float | None = Field(None, description="Tenant cache hits / lookups, last minute.")


class WorkerOut(BaseModel):
    records_per_min: float | None = None
    stored_per_min: float | None = None
    sends_per_min: float | None = Field(None, description="Messages accepted by WUZAPI per minute.")
    rate_limit_waits_per_min: float | None = None
    records_total: float = 0


class BreakerOut(BaseModel):
    instance: str
    state: str
    failures: int = 0
    opened_at: datetime | None = None
    updated_at: datetime | None = None


class LagOut(BaseModel):
    topics: dict[str, int] = Field(description="Lag of the worker group per source topic.")
    partitions: dict[str, int] = Field(description='Lag per "topic:partition".')
    total: int
    error: str | None = Field(None, description="Why the last broker refresh failed, if it did.")


class PointOut(BaseModel):
    at: float = Field(description="Unix time of the scrape.")
    records_per_s: float | None
    accepted_per_s: float | None
    lag: int
    dead_letters: int


class OverviewOut(BaseModel):
    at: float | None = Field(description="Unix time of the newest scrape (None before the first).")
    window_s: float = Field(description="The span the per-minute rates were measured over.")
    processes: dict[str, ProcessOut] = Field(description="api, ingest, worker, postgres, broker.")
    ingest: IngestOut
    worker: WorkerOut
    lag: LagOut
    dead_letters: dict[str, int] = Field(description="Records per dead-letter topic.")
    breakers: list[BreakerOut]
    series: list[PointOut] = Field(description="One point per scrape over the last 15 minutes.")


class FailureOut(BaseModel):
    type: str
    message: str
    attempts: int
    first_failure_at: datetime
    last_failure_at: datetime


class LetterOut(BaseModel):
    id: str = Field(description="dlq_topic:partition:offset")
    source_topic: str
    source_partition: int
    source_offset: int
    tenant: str | None
    error: FailureOut
    replayed: bool


class LettersOut(BaseModel):
    items: list[LetterOut]
    total: int = Field(description="Dead letters matching the filter (the list holds at most `limit`).")


class ReplayEventOut(BaseModel):
    dlq_id: str
    source_topic: str
    tenant: str | None
    error_type: str
    replayed_by: str
    replayed_at: datetime


class LetterDetailOut(LetterOut):
    key: str | None = Field(description="The original key (UTF-8, or base64 if binary).")
    value: str = Field(description="The original value (UTF-8, or base64 if binary).")
    headers: dict[str, str | None]
    history: list[FailureOut] = Field(description="Earlier failures, oldest first; `error` is the latest.")
    replays: list[ReplayEventOut]
    message_status: str | None = Field(
        None, description="For an outbound letter: its message's status in Postgres now (e.g. sent)."
    )


class LetterFilterIn(BaseModel):
    topic: str | None = None
    tenant: str | None = None
    error_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None


class ReplayIn(BaseModel):
    ids: list[str] | None = Field(None, max_length=1000, description="These dead letters...")
    filter: LetterFilterIn | None = Field(None, description="...or every one matching this filter.")
    dry_run: bool = Field(True, description="Preview only (the default): nothing is sent or recorded.")
    force: bool = Field(False, description="Replay letters that were replayed before too.")


class ReplayOut(BaseModel):
    dry_run: bool
    matched: int
    replayed: list[str] = Field(description="Replayed (or, for a dry run, would be).")
    skipped: list[str] = Field(description="Replayed before, and not forced.")
    missing: list[str] = Field(description="Ids asked for that are not on a dead-letter topic.")
    replayed_by: str


class WhatsAppContactsOut(BaseModel):
    total: int = Field(description="The company's WhatsApp contacts (merged duplicates not counted).")
    with_phone: int = Field(description="Known by phone number (with or without a business-scoped user id).")
    username_only: int = Field(
        description="Known by business-scoped user id and username alone: no phone number to reply to."
    )


class MediaCountsOut(BaseModel):
    stored: int
    pending: int = Field(description="Being fetched (or retried).")
    failed: int = Field(description="Could not be fetched: see the console's media failures.")
    bytes: int = Field(description="Bytes stored.")


class MediaFailureOut(BaseModel):
    id: str
    tenant: str
    message_external_id: str
    kind: str
    source: str
    state: str
    reason: str | None
    attempts: int
    updated_at: datetime


class MediaFailuresOut(BaseModel):
    items: list[MediaFailureOut]


class TenantOut(BaseModel):
    slug: str
    name: str
    messages_total: int
    messages_24h: int
    whatsapp_contacts: WhatsAppContactsOut
    media: MediaCountsOut
    last_webhook_at: datetime | None
    usual_gap_s: float | None = Field(description="Mean gap between webhooks over the last 7 days.")
    silent_s: float | None = Field(description="Seconds since the last webhook.")
    silent: bool = Field(description="No webhook for longer than 3 usual gaps (and at least 5 minutes).")
    rate_limit_per_s: float
    rate_limit_burst: int
    breaker_instance: str
    breaker_state: str


class TenantsOut(BaseModel):
    items: list[TenantOut]


class ReplaysOut(BaseModel):
    items: list[ReplayEventOut]
