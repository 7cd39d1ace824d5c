"""The `media` agent's work: one file of one message fetched from Meta and stored, once.

Per job (`schemas.media.MediaJob`, its row made pending by the webhook writer):
- a row already stored is done (a redelivery, a second replay); a failed one is retried only by a
  replay from `meta.media.dlq`;
- WhatsApp: ask the Graph API for the media's URL with the company's access token, then download
  it with the same token. A URL lives about 5 minutes, so every attempt asks for a new one.
  Messenger and Instagram: download the attachment's own URL, which cannot be renewed;
- the bytes stream into the media store (`infra.storage`) while their size and SHA-256 are
  checked against what the webhook (or the lookup) said; a file that does not match is aborted
  before it is stored, so nothing half-right is ever kept.

Failures fall in three kinds (`MediaTransient`, `MediaRetry`, `MediaPermanent`):
- an outage (a timeout, a connection error, a 5xx, a rate limit, an expired download URL, the
  store away) is retried with capped exponential backoff and full jitter for as long as the
  media can still be fetched (a media id lives about 7 days): it costs delay, never the file.
  Graph API outages count on a breaker per company token (per host for attachment URLs), and
  while it is open nothing is asked and nothing is spent;
- a failure of this file (a wrong hash, a wrong size) spends one of `max_attempts`;
- the media gone, the token refused, a file too large: at once to `meta.media.dlq` with the
  reason, and the row says `failed` with it, for the agents and the console.
Downloads run at most `concurrency` at a time; jobs waiting for a retry hold no download slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson
from aiobreaker import CircuitBreaker, CircuitBreakerError, CircuitBreakerListener, CircuitBreakerState
from prometheus_client import Counter, Gauge, Histogram

from infra.kafka.deadletters import DeadLetterWriter, prior_of
from infra.kafka.topics import META_MEDIA_DLQ
from infra.postgres.db import is_transient
from infra.runtime.logging import get_logger
from infra.runtime.retry import until_it_passes
from infra.runtime.ttl_cache import TtlCache
from infra.storage import MediaStore, StoreUnavailable
from processors.webhooks import RawRecord
from schemas.media import MediaJob, MediaRecordError, sha256_hex

log = get_logger("processors.media")

FETCHES = Counter(
    "cortexx_media_fetches_total", "Media fetch jobs by source and outcome", ["source", "outcome"]
)
FETCH_BYTES = Counter("cortexx_media_bytes_total", "Bytes of media stored", ["source"])
ATTEMPT_FAILURES = Counter(
    "cortexx_media_attempt_failures_total", "Failed fetch attempts by reason", ["source", "reason"]
)
FETCH_SECONDS = Histogram(
    "cortexx_media_fetch_seconds",
    "A successful fetch, lookup to stored",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
DOWNLOADS = Gauge("cortexx_media_downloads_in_progress", "Downloads running now")
BREAKER_OPEN = Gauge("cortexx_media_breaker_open", "1 while a media breaker is not closed", ["instance"])

# How long Meta keeps a media id (WhatsApp says 30 days for uploads, about 7 for what users
# send): past it a fetch can only fail, so an outage is waited out until then and no longer.
MEDIA_VALIDITY_S = 7 * 24 * 3600.0
CHUNK = 256 * 1024

MEDIA_STATE = "SELECT state, company_id FROM media WHERE id = $1::uuid"

COMPANY_TOKEN = "SELECT meta_access_token FROM companies WHERE id = $1"

MARK_STORED = """
UPDATE media
   SET state = 'stored', storage_key = $2, size_bytes = $3, sha256 = $4,
       mime_type = COALESCE(mime_type, $5), stored_at = now(), reason = NULL,
       attempts = attempts + $6, updated_at = now()
 WHERE id = $1::uuid AND state <> 'stored'
"""

MARK_FAILED = """
UPDATE media SET state = 'failed', reason = $2, attempts = attempts + $3, updated_at = now()
 WHERE id = $1::uuid AND state <> 'stored'
"""

# What the last attempt met, while the job goes on (the agents see "pending: <reason>").
NOTE_ATTEMPT = """
UPDATE media SET reason = $2, attempts = attempts + 1, updated_at = now()
 WHERE id = $1::uuid AND state = 'pending'
"""


class MediaFailure(Exception):
    """A fetch that did not store the file; `reason` is a short code the agents and the console
    show (`media_not_found`, `token_refused`, `sha256_mismatch`, ...)."""

    def __init__(self, reason: str, detail: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class MediaTransient(MediaFailure):
    """An outage: retried while the media can still be fetched; counted by the breaker."""


class MediaRetry(MediaFailure):
    """Something wrong with this download (a wrong hash or size): retried, spending an attempt."""


class MediaPermanent(MediaFailure):
    """No attempt can succeed: the media is gone, the token refused, the file too large."""


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """The Graph API's answer for a media id."""

    url: str
    mime_type: str | None
    sha256: str | None  # hex
    file_size: int | None


@dataclass(frozen=True, slots=True)
class Stored:
    key: str
    size: int
    sha256: str
    mime_type: str | None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def graph_failure(status: int, body: bytes, retry_after_s: float | None = None) -> MediaFailure:
    """What a Graph API error answer means (its `error.code`, else its status)."""
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    detail = f"{status} {error.get('message') or ''}".strip()[:300]
    # 4, 17, 32, 613, 80007, 130429: the app's, the user's or the number's rate limits.
    if status == 429 or code in (4, 17, 32, 613, 80007, 130429):
        return MediaTransient("rate_limited", detail, retry_after_s=retry_after_s)
    # 1 and 2: "an unknown error", "service temporarily unavailable": Meta says retry.
    if status >= 500 or code in (1, 2):
        return MediaTransient("graph_unavailable", detail, retry_after_s=retry_after_s)
    if status == 401 or code == 190:
        return MediaPermanent("token_refused", detail)
    if status == 403 or code == 10 or (isinstance(code, int) and 200 <= code < 300):
        return MediaPermanent("permission_denied", detail)
    if code == 100 or status in (400, 404, 410):
        return MediaPermanent("media_not_found", detail)
    return MediaPermanent(f"graph_{status}", detail)


class GraphMedia:
    """Meta's Graph API, the media part: a lookup (`GET /{version}/{media_id}`) and downloads,
    each with its own timeouts. One attempt per call; retrying is the fetcher's."""

    def __init__(
        self,
        base_url: str,
        version: str,
        *,
        connect_timeout_s: float,
        lookup_timeout_s: float,
        read_timeout_s: float,
        max_connections: int = 100,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.version = version
        self.lookup_timeout_s = lookup_timeout_s
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=20),
            follow_redirects=True,
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def lookup(self, token: str, media_id: str) -> MediaInfo:
        url = f"{self.base_url}/{self.version}/{media_id}"
        try:
            async with asyncio.timeout(self.lookup_timeout_s):
                response = await self._http.get(url, headers={"Authorization": f"Bearer {token}"})
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise MediaTransient("lookup_timeout", f"after {self.lookup_timeout_s}s") from exc
        except httpx.TransportError as exc:
            raise MediaTransient("graph_unreachable", f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise graph_failure(response.status_code, response.content, _retry_after(response))
        try:
            doc: Any = orjson.loads(response.content)
            size = doc.get("file_size")
            return MediaInfo(
                url=str(doc["url"]),
                mime_type=doc.get("mime_type") if isinstance(doc.get("mime_type"), str) else None,
                sha256=sha256_hex(doc.get("sha256")),
                file_size=int(size) if size is not None else None,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MediaTransient("lookup_unreadable", repr(response.content[:200])) from exc

    @asynccontextmanager
    async def download(self, url: str, token: str | None) -> AsyncIterator[httpx.Response]:
        """The download's response, its body not read yet; errors raised as MediaFailure."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        renewable = token is not None  # a Graph URL can be asked for again; an attachment's not
        try:
            async with self._http.stream("GET", url, headers=headers) as response:
                status = response.status_code
                if status == 200:
                    yield response
                    return
                body = await response.aread()
                if status in (403, 404, 410):
                    if renewable:
                        # A URL that expired (or was refused) just after the lookup: ask again.
                        raise MediaTransient("url_expired", f"{status} from the media host")
                    raise MediaPermanent("attachment_url_expired", f"{status} {body[:200]!r}")
                if status == 401:
                    raise MediaPermanent("token_refused", f"401 from the media host {body[:200]!r}")
                if status == 429 or status >= 500:
                    raise MediaTransient(
                        "media_host_unavailable", f"{status}", retry_after_s=_retry_after(response)
                    )
                raise MediaPermanent(f"download_{status}", repr(body[:200]))
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise MediaTransient("download_timeout", type(exc).__name__) from exc
        except httpx.TransportError as exc:
            raise MediaTransient("media_host_unreachable", f"{type(exc).__name__}: {exc}") from exc


class _BreakerEvents(CircuitBreakerListener):  # type: ignore[misc]
    def state_change(self, breaker: CircuitBreaker, old: Any, new: Any) -> None:
        state = new.state.name.lower().replace("_", "-")
        BREAKER_OPEN.labels(breaker.name).set(0 if state == "closed" else 1)
        log.warning("media.breaker", instance=breaker.name, state=state, failures=breaker.fail_counter)


class Breakers:
    """One aiobreaker per instance (a company's token, an attachment host), opened by outages
    only; while one is open its jobs wait, and once half-open one call at a time probes it."""

    def __init__(self, *, fail_max: int, reset_s: float) -> None:
        self._fail_max = fail_max
        self._reset = timedelta(seconds=reset_s)
        self._listener = _BreakerEvents()
        self._breakers: dict[str, tuple[CircuitBreaker, asyncio.Lock]] = {}

    def _get(self, instance: str) -> tuple[CircuitBreaker, asyncio.Lock]:
        found = self._breakers.get(instance)
        if found is None:
            breaker = CircuitBreaker(
                fail_max=self._fail_max,
                timeout_duration=self._reset,
                # Only outages open it: a wrong file or a refusal says nothing about the service.
                exclude=[MediaRetry, MediaPermanent, StoreUnavailable],
                listeners=[self._listener],
                name=instance,
            )
            found = (breaker, asyncio.Lock())
            self._breakers[instance] = found
        return found

    def time_left(self, instance: str) -> float:
        breaker, _ = self._get(instance)
        if breaker.current_state is not CircuitBreakerState.OPEN:
            return 0.0
        opened_at = breaker._state_storage.opened_at  # naive UTC, as aiobreaker keeps it
        if opened_at is None:
            return 0.0
        left = opened_at + breaker.timeout_duration - datetime.utcnow()
        return max(0.0, float(left.total_seconds()))

    async def call(self, instance: str, fn: Any) -> Any:
        """`await fn()` through the instance's breaker; waits (spending nothing) while it is open."""
        breaker, probe = self._get(instance)
        while True:
            if breaker.current_state is CircuitBreakerState.CLOSED:
                return await self._guarded(breaker, fn)
            async with probe:
                left = self.time_left(instance)
                if left <= 0:
                    return await self._guarded(breaker, fn)
            await asyncio.sleep(max(left, 0.05))

    async def _guarded(self, breaker: CircuitBreaker, fn: Any) -> Any:
        try:
            return await breaker.call_async(fn)
        except CircuitBreakerError as exc:
            cause = exc.__cause__
            if isinstance(cause, MediaFailure):
                raise cause from None
            # Opened by another call meanwhile: an outage, like the one that opened it.
            raise MediaTransient("breaker_open", breaker.name) from exc


def _instance(job: MediaJob, token: str | None) -> str:
    if job.source == "whatsapp" and token:
        return f"graph-{token[:4]}****" if len(token) > 8 else "graph-****"
    return f"{job.source}-{urlsplit(job.ref).hostname or 'unknown'}"


class MediaFetcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        graph: GraphMedia,
        store: MediaStore,
        dead_letters: DeadLetterWriter,
        *,
        default_token: str | None,
        max_bytes: int,
        concurrency: int,
        max_attempts: int,
        backoff_initial_s: float,
        backoff_max_s: float,
        download_max_s: float,
        breaker_fail_max: int,
        breaker_reset_s: float,
        config_ttl_s: float = 30.0,
        validity_s: float = MEDIA_VALIDITY_S,
    ) -> None:
        self.pool = pool
        self.graph = graph
        self.store = store
        self.dead_letters = dead_letters
        self.default_token = default_token
        self.max_bytes = max_bytes
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.download_max_s = download_max_s
        self.validity_s = validity_s
        self.breakers = Breakers(fail_max=breaker_fail_max, reset_s=breaker_reset_s)
        self._downloads = asyncio.Semaphore(concurrency)
        self._tokens: TtlCache[int, str | None] = TtlCache(ttl_s=config_ttl_s)

    async def _db(self, query: str, *args: Any) -> Any:
        return await until_it_passes(
            lambda: self.pool.fetchrow(query, *args), retry_if=is_transient, event="media.db_retry"
        )

    async def _token(self, company_id: int) -> str | None:
        entry = self._tokens.entry(company_id)
        if entry is not None and entry.fresh:
            return entry.value
        row = await self._db(COMPANY_TOKEN, company_id)
        token = (row["meta_access_token"] if row else None) or self.default_token
        self._tokens.put(company_id, token)
        return token

    async def handle(self, raw: RawRecord) -> None:
        prior = prior_of(raw.headers)
        try:
            job = MediaJob.from_bytes(raw.value)
        except MediaRecordError as exc:
            await self._dead_letter(raw, None, exc, attempts=0)
            return
        context = {
            "tenant": job.tenant,
            "media_id": job.media_id,
            "message": job.message_external_id,
            "partition": raw.partition,
            "offset": raw.offset,
        }
        row = await self._db(MEDIA_STATE, job.media_id)
        if row is None or row["company_id"] != job.company_id:
            FETCHES.labels(job.source, "unknown").inc()
            log.warning("media.unknown_row", **context)
            return
        if row["state"] == "stored" or (row["state"] != "pending" and prior.replay_of is None):
            # Stored already, or failed or expired and not replayed by an operator.
            FETCHES.labels(job.source, f"already_{row['state']}").inc()
            log.info("media.already_done", state=row["state"], **context)
            return
        started = time.monotonic()
        try:
            stored, attempts = await self._fetch(job)
        except MediaFailure as exc:
            FETCHES.labels(job.source, "failed").inc()
            await self._db(MARK_FAILED, job.media_id, str(exc)[:500], 1)
            log.error("media.failed", reason=exc.reason, detail=str(exc)[:300], **context)
            await self._dead_letter(raw, job.tenant, exc, attempts=1)
            return
        await self._db(
            MARK_STORED, job.media_id, stored.key, stored.size, stored.sha256, stored.mime_type, attempts
        )
        FETCHES.labels(job.source, "stored").inc()
        FETCH_BYTES.labels(job.source).inc(stored.size)
        FETCH_SECONDS.observe(time.monotonic() - started)
        log.info("media.stored", bytes=stored.size, attempts=attempts, kind=job.kind, **context)

    async def _fetch(self, job: MediaJob) -> tuple[Stored, int]:
        """Attempts until the file is stored; raises MediaFailure when none can succeed."""
        token = await self._token(job.company_id) if job.source == "whatsapp" else None
        if job.source == "whatsapp" and not token:
            raise MediaPermanent("no_access_token", "the company has no Meta access token")
        deadline = job.sent_at_ms / 1000 + self.validity_s
        instance = _instance(job, token)
        retries = 0  # attempts spent on this file's own failures
        tries = 0
        while True:
            if time.time() > deadline:
                raise MediaPermanent("expired", "the media id is past its validity")
            tries += 1
            try:
                stored = await self.breakers.call(instance, lambda: self._attempt(job, token))
                return stored, tries
            except MediaPermanent:
                raise
            except (MediaFailure, StoreUnavailable) as exc:
                reason = exc.reason if isinstance(exc, MediaFailure) else "store_unavailable"
                ATTEMPT_FAILURES.labels(job.source, reason).inc()
                if isinstance(exc, MediaRetry):
                    retries += 1
                    if retries >= self.max_attempts:
                        raise MediaPermanent(exc.reason, f"{exc} ({retries} attempts)") from exc
                wait = random.uniform(
                    0, min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(tries, 30))
                )
                if isinstance(exc, MediaFailure) and exc.retry_after_s:
                    wait = max(wait, exc.retry_after_s)
                log.warning(
                    "media.retry",
                    tenant=job.tenant,
                    media_id=job.media_id,
                    reason=reason,
                    detail=str(exc)[:200],
                    attempt=tries,
                    wait_s=round(wait, 2),
                )
                await self._db(NOTE_ATTEMPT, job.media_id, f"retrying: {str(exc)[:200]}")
                await asyncio.sleep(wait)

    async def _attempt(self, job: MediaJob, token: str | None) -> Stored:
        async with self._downloads:
            DOWNLOADS.inc()
            try:
                async with asyncio.timeout(self.download_max_s):
                    return await self._download(job, token)
            except TimeoutError as exc:
                raise MediaTransient("download_timeout", f"not done in {self.download_max_s}s") from exc
            finally:
                DOWNLOADS.dec()

    async def _download(self, job: MediaJob, token: str | None) -> Stored:
        info: MediaInfo | None = None
        if job.source == "whatsapp":
            assert token is not None
            info = await self.graph.lookup(token, job.ref)
            url = info.url
        else:
            url = job.ref
        expected_sha = job.expected_sha256 or (info.sha256 if info else None)
        expected_size = info.file_size if info else None
        if expected_size is not None and expected_size > self.max_bytes:
            raise MediaPermanent("too_large", f"{expected_size} bytes, over {self.max_bytes}")
        key = f"{job.company_id}/{job.media_id}"
        async with self.graph.download(url, token) as response:
            length = response.headers.get("content-length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise MediaPermanent("too_large", f"{length} bytes, over {self.max_bytes}")
            header_type = response.headers.get("content-type", "").split(";")[0].strip() or None
            mime = job.mime_type or (info.mime_type if info else None) or header_type
            hasher = hashlib.sha256()
            size = 0

            async def checked() -> AsyncIterator[bytes]:
                nonlocal size
                async for chunk in response.aiter_bytes(CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise MediaPermanent("too_large", f"over {self.max_bytes} bytes")
                    hasher.update(chunk)
                    yield chunk
                # Raised before the upload completes: a file that does not match is never stored.
                if expected_size is not None and size != expected_size:
                    raise MediaRetry("size_mismatch", f"{size} bytes, expected {expected_size}")
                if expected_sha is not None and hasher.hexdigest() != expected_sha:
                    raise MediaRetry("sha256_mismatch", f"got {hasher.hexdigest()[:16]}…")

            await self.store.put(key, checked(), content_type=mime)
        return Stored(key, size, hasher.hexdigest(), mime)

    async def _dead_letter(
        self, raw: RawRecord, tenant: str | None, exc: BaseException, *, attempts: int
    ) -> None:
        letter = raw.dead_letter(tenant, exc, attempts=attempts)
        await self.dead_letters.write(META_MEDIA_DLQ, letter)


PRUNE_BATCH = """
SELECT id, storage_key FROM media
 WHERE state = 'stored' AND stored_at < now() - make_interval(secs => $1)
 ORDER BY stored_at
 LIMIT $2
 FOR UPDATE SKIP LOCKED
"""

MARK_EXPIRED = """
UPDATE media SET state = 'expired', reason = 'deleted after the retention period',
                 storage_key = NULL, updated_at = now()
 WHERE id = ANY($1::uuid[])
"""


async def prune_media(pool: asyncpg.Pool, store: MediaStore, *, older_than_s: float, batch: int = 500) -> int:
    """Delete stored media older than `older_than_s` and mark their rows expired; returns how
    many. Rows are locked while their objects go (SKIP LOCKED: many workers prune apart), and
    an object is deleted before its row says so, so a crash leaves a row to prune again, never
    an object no row names."""
    total = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(PRUNE_BATCH, older_than_s, batch)
            if not rows:
                return total
            for row in rows:
                await store.delete(row["storage_key"])
            await conn.execute(MARK_EXPIRED, [row["id"] for row in rows])
        total += len(rows)
        log.info("media.pruned", media=len(rows), total=total)
