"""The webhook edge: Meta's verification handshake and the signed, durable POST.

A POST is answered 200 only after the broker acknowledged every record it was split into
(acks=all). Bad input is refused at once with a JSON error and never produces anything.

The POST is the hot path: it is served as a plain ASGI handler in front of FastAPI (no routing,
dependency solving, middleware stack or exception machinery per request); everything else (the
handshake, /health, /metrics, the JSON 404 and 405 answers, the lifespan) goes through FastAPI.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from infra.kafka.producer import BrokerUnavailable, DurableProducer
from infra.kafka.topics import META_WEBHOOKS, declare_in_background
from infra.postgres.db import DB_DOWN_ERRORS, create_pool
from infra.postgres.tenants import SLUG_RE, Tenant, get_tenant
from infra.runtime.compare import same_secret
from infra.runtime.heap import tune_gc
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings
from ingest.envelope import Budget, OverBudget, split_envelope
from ingest.tenant_cache import TenantCache
from schemas.errors import error_body
from schemas.meta import EnvelopeError, validate_envelope

log = get_logger("ingest")

REQUESTS = Counter("cortexx_ingest_requests_total", "Webhook POSTs by answer", ["status"])
RECORDS = Counter("cortexx_ingest_records_total", "Records produced to meta.webhooks")
LATENCY = Histogram(
    "cortexx_ingest_request_seconds",
    "Webhook POST latency",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

SIGNATURE_HEADER = "x-hub-signature-256"
WEBHOOK_PREFIX = "/webhooks/meta/"
ACCEPTED = b'{"status":"accepted"}'
JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class IngestError(Exception):
    """A refusal with its HTTP status, error code and a detail for the caller."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is no one to answer."""


def error_response(status: int, code: str, detail: str) -> Response:
    return Response(error_body(code, detail), status_code=status, media_type="application/json")


def signature_ok(body: bytes, header: str | None, secret: str) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return same_secret(header[7:].strip().lower(), expected)


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """Read the body, refusing (413) as soon as it is known to exceed `limit`: before reading
    when Content-Length says so, else once the chunks read so far pass it."""
    if declared is not None:
        try:
            if int(declared) > limit:
                raise IngestError(413, "body_too_large", f"body exceeds {limit} bytes")
        except ValueError:
            raise IngestError(400, "bad_content_length", "Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise IngestError(413, "body_too_large", f"body exceeds {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# Tenant lookups waiting on Postgres at once; past this a slug nobody has cached is refused at once
# rather than queued behind a stalled database.
MAX_PENDING_LOOKUPS = 100


class IngestService:
    """What the routes need, with an explicit lifecycle (started by the app's lifespan)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url and settings.kafka_bootstrap
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self._declaring: asyncio.Task[None] | None = None
        self._lookups: dict[str, asyncio.Task[Tenant | None]] = {}
        bootstrap = settings.kafka_bootstrap

        self.producer = DurableProducer(
            bootstrap,
            linger_ms=settings.producer_linger_ms,
            request_timeout_ms=int(settings.produce_timeout_s * 1000),
        )
        self.tenants = TenantCache(
            self._load_tenant,
            ttl_s=settings.tenant_cache_ttl_s,
            negative_ttl_s=settings.tenant_cache_negative_ttl_s,
            max_size=settings.tenant_cache_size,
        )

    async def start(self) -> None:
        assert self.settings.database_url
        self.pool = await create_pool(
            self.settings.database_url,
            min_size=self.settings.db_pool_min,
            max_size=self.settings.db_pool_max,
        )
        self._declaring = declare_in_background(
            self.settings.kafka_bootstrap or "",
            partitions=self.settings.topic_partitions,
            replication=self.settings.topic_replication,
        )

    async def stop(self) -> None:
        if self._declaring is not None:
            self._declaring.cancel()
        for lookup in list(self._lookups.values()):
            lookup.cancel()
        await self.producer.stop()
        if self.pool is not None:
            await self.pool.close()

    async def _load_tenant(self, slug: str) -> Tenant | None:
        """The company from Postgres, waited for at most `tenant_lookup_timeout_s`.

        The lookup runs as a task of its own, one per slug at a time, that is left to finish
        when the wait gives up: cancelling asyncpg mid-query makes it talk to the stalled server
        again (to cancel and reset the connection), and that wait has no bound of ours.
        """
        assert self.pool is not None
        lookup = self._lookups.get(slug)
        if lookup is None:
            if len(self._lookups) >= MAX_PENDING_LOOKUPS:
                raise IngestError(503, "database_unavailable", "tenant store unavailable")
            lookup = asyncio.create_task(get_tenant(self.pool, slug))
            self._lookups[slug] = lookup
            lookup.add_done_callback(lambda task: self._lookup_done(slug, task))
        done, _ = await asyncio.wait({lookup}, timeout=self.settings.tenant_lookup_timeout_s)
        if not done:
            raise IngestError(503, "database_unavailable", "tenant store did not answer in time")
        try:
            return lookup.result()
        except (*DB_DOWN_ERRORS, asyncpg.PostgresError) as exc:
            raise IngestError(503, "database_unavailable", "tenant store unavailable") from exc

    def _lookup_done(self, slug: str, task: asyncio.Task[Tenant | None]) -> None:
        if self._lookups.get(slug) is task:
            del self._lookups[slug]
        if not task.cancelled():
            task.exception()  # retrieved here: a caller that gave up never looks

    async def tenant(self, slug: str) -> Tenant:
        tenant = await self.tenants.get(slug) if SLUG_RE.match(slug) else None
        if tenant is None:
            raise IngestError(404, "unknown_tenant", f"no company with slug {slug!r}")
        return tenant


class WebhookReceiver:
    """POST /webhooks/meta/{slug}: verify, validate, split, produce durably, answer."""

    def __init__(self, service: IngestService) -> None:
        self.service = service
        settings = service.settings
        self.body_limit = settings.body_limit_bytes
        self.produce_timeout_s = settings.produce_timeout_s
        self.budget = Budget(
            max_records=settings.ingest_max_records,
            max_bytes=settings.ingest_max_post_bytes,
            max_record_bytes=settings.ingest_max_record_bytes,
        )
        # prometheus_client's labels() takes a lock and builds a key on every call.
        self._answers: dict[int, Any] = {}

    def _count(self, status: int) -> None:
        child = self._answers.get(status)
        if child is None:
            child = self._answers[status] = REQUESTS.labels(str(status))
        child.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send, slug: str) -> None:
        started = time.perf_counter()
        # The headers looked up once, as Starlette's Headers.get would (first one wins, latin-1).
        declared = signature = request_id = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = declared if declared is not None else value.decode("latin-1")
            elif name == b"x-hub-signature-256":
                signature = signature if signature is not None else value.decode("latin-1")
            elif name == b"x-request-id":
                request_id = request_id if request_id is not None else value.decode("latin-1")
        request_id = request_id or uuid.uuid4().hex
        try:
            status, body = await self._receive(slug, receive, declared, signature, request_id)
        except IngestError as exc:
            log.info(
                "webhook.refused",
                request_id=request_id,
                tenant=slug,
                status=exc.status,
                error=exc.code,
                detail=exc.detail,
            )
            status, body = exc.status, error_body(exc.code, exc.detail)
        except ClientGone:
            log.info("webhook.client_gone", request_id=request_id, tenant=slug)
            return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    JSON_CONTENT_TYPE,
                    (b"x-request-id", request_id.encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        self._count(status)
        LATENCY.observe(time.perf_counter() - started)

    async def _receive(
        self, slug: str, receive: Receive, declared: str | None, signature: str | None, request_id: str
    ) -> tuple[int, bytes]:
        started = time.perf_counter()
        body = await read_body(receive, declared, self.body_limit)
        tenant = await self.service.tenant(slug)
        if not signature_ok(body, signature, tenant.app_secret):
            raise IngestError(401, "bad_signature", "X-Hub-Signature-256 missing or wrong")
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise IngestError(400, "invalid_json", f"body is not JSON: {exc}") from None
        try:
            validate_envelope(doc)
        except EnvelopeError as exc:
            raise IngestError(422, "invalid_envelope", str(exc)) from None
        try:
            records = split_envelope(
                doc,
                tenant=slug,
                request_id=request_id,
                received_at_ms=int(time.time() * 1000),
                budget=self.budget,
            )
        except OverBudget as exc:
            raise IngestError(413, "envelope_too_large", str(exc)) from None
        except orjson.JSONEncodeError as exc:
            # Valid JSON that cannot be written back (orjson reads 1,024 levels of nesting but
            # writes 254): no Meta webhook looks like this, and nothing of it is kept.
            raise IngestError(422, "invalid_envelope", f"the envelope cannot be stored: {exc}") from None
        try:
            await self.service.producer.send_all(META_WEBHOOKS, records, timeout_s=self.produce_timeout_s)
        except BrokerUnavailable as exc:
            log.warning("webhook.broker_unavailable", request_id=request_id, tenant=slug, error=str(exc))
            raise IngestError(503, "broker_unavailable", "could not store the webhook; retry") from None
        RECORDS.inc(len(records))
        # The one event of an accepted POST: everything needed to trace it, no bound context.
        log.info(
            "webhook.accepted",
            request_id=request_id,
            tenant=slug,
            topic=META_WEBHOOKS,
            records=len(records),
            object=doc["object"],
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return 200, ACCEPTED


class IngestApp:
    """The ASGI app: the webhook POST served directly, everything else by the FastAPI app."""

    def __init__(self, app: FastAPI, receiver: WebhookReceiver) -> None:
        self.app = app
        self.receiver = receiver
        self.service = receiver.service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            # What Starlette's `{slug}` matches: one non-empty path segment (decoded).
            if path.startswith(WEBHOOK_PREFIX):
                slug = path[len(WEBHOOK_PREFIX) :]
                if slug and "/" not in slug:
                    await self.receiver(scope, receive, send, slug)
                    return
        await self.app(scope, receive, send)


def create_app(settings: Settings) -> IngestApp:
    service = IngestService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        tune_gc()
        log.info("ingest.started", body_limit=settings.body_limit_bytes)
        try:
            yield
        finally:
            await service.stop()
            log.info("ingest.stopped")

    app = FastAPI(
        title="Cortexx ingest",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # A path with a trailing slash is an unknown route (a JSON 404), not a redirect.
        redirect_slashes=False,
    )
    app.state.service = service

    @app.exception_handler(IngestError)
    async def _ingest_error(_: Request, exc: IngestError) -> Response:
        return error_response(exc.status, exc.code, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/webhooks/meta/{slug}")
    async def verify(slug: str, request: Request) -> Response:
        params = request.query_params
        tenant = await service.tenant(slug)
        token = params.get("hub.verify_token", "")
        if params.get("hub.mode") == "subscribe" and same_secret(token, tenant.verify_token):
            log.info("webhook.verified", tenant=slug)
            return PlainTextResponse(params.get("hub.challenge", ""))
        log.warning("webhook.verify_refused", tenant=slug)
        return error_response(403, "verification_failed", "hub.mode or hub.verify_token mismatch")

    return IngestApp(app, WebhookReceiver(service))
