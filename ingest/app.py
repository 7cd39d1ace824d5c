"""The webhook edge: Meta's verification handshake and the signed, durable POST.

A POST is answered 200 only after the broker acknowledged every record it was split into
(acks=all). Bad input is refused at once with a JSON error and never produces anything.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from infra.db import create_pool
from infra.kafka import BrokerUnavailable, DurableProducer
from infra.logging import get_logger
from infra.settings import Settings
from infra.tenants import SLUG_RE, Tenant, get_tenant
from infra.topics import META_WEBHOOKS, declare_topics
from ingest.envelope import split_envelope
from ingest.tenant_cache import TenantCache
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


class IngestError(Exception):
    """A refusal with its HTTP status, error code and a detail for the caller."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def error_response(status: int, code: str, detail: str) -> Response:
    return Response(
        orjson.dumps({"error": code, "detail": detail}),
        status_code=status,
        media_type="application/json",
    )


def signature_ok(body: bytes, header: str | None, secret: str) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header[7:].strip().lower(), expected)


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise IngestError(413, "body_too_large", f"body exceeds {limit} bytes")
        except ValueError:
            raise IngestError(400, "bad_content_length", "Content-Length is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise IngestError(413, "body_too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class IngestService:
    """What the routes need, with an explicit lifecycle (started by the app's lifespan)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.database_url and settings.kafka_bootstrap
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        bootstrap = settings.kafka_bootstrap

        async def prepare() -> None:
            await declare_topics(
                bootstrap,
                partitions=settings.topic_partitions,
                replication=settings.topic_replication,
            )

        self.producer = DurableProducer(
            bootstrap,
            linger_ms=settings.producer_linger_ms,
            request_timeout_ms=int(settings.produce_timeout_s * 1000),
            prepare=prepare,
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

    async def stop(self) -> None:
        await self.producer.stop()
        if self.pool is not None:
            await self.pool.close()

    async def _load_tenant(self, slug: str) -> Tenant | None:
        assert self.pool is not None
        try:
            return await get_tenant(self.pool, slug)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise IngestError(503, "database_unavailable", "tenant store unavailable") from exc

    async def tenant(self, slug: str) -> Tenant:
        tenant = await self.tenants.get(slug) if SLUG_RE.match(slug) else None
        if tenant is None:
            raise IngestError(404, "unknown_tenant", f"no company with slug {slug!r}")
        return tenant


def create_app(settings: Settings) -> FastAPI:
    service = IngestService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
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
        if params.get("hub.mode") == "subscribe" and hmac.compare_digest(
            token.encode(), tenant.verify_token.encode()
        ):
            log.info("webhook.verified", tenant=slug)
            return PlainTextResponse(params.get("hub.challenge", ""))
        log.warning("webhook.verify_refused", tenant=slug)
        return error_response(403, "verification_failed", "hub.mode or hub.verify_token mismatch")

    @app.post("/webhooks/meta/{slug}")
    async def receive(slug: str, request: Request) -> Response:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id, tenant=slug)
        try:
            response = await _receive(slug, request, request_id)
        except IngestError as exc:
            log.info("webhook.refused", status=exc.status, error=exc.code, detail=exc.detail)
            response = error_response(exc.status, exc.code, exc.detail)
        finally:
            structlog.contextvars.unbind_contextvars("request_id", "tenant")
        REQUESTS.labels(str(response.status_code)).inc()
        LATENCY.observe(time.perf_counter() - started)
        response.headers["x-request-id"] = request_id
        return response

    async def _receive(slug: str, request: Request, request_id: str) -> Response:
        body = await read_body(request, settings.body_limit_bytes)
        tenant = await service.tenant(slug)
        if not signature_ok(body, request.headers.get(SIGNATURE_HEADER), tenant.app_secret):
            raise IngestError(401, "bad_signature", "X-Hub-Signature-256 missing or wrong")
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise IngestError(400, "invalid_json", f"body is not JSON: {exc}") from None
        try:
            validate_envelope(doc)
        except EnvelopeError as exc:
            raise IngestError(422, "invalid_envelope", str(exc)) from None
        records = split_envelope(
            doc, tenant=slug, request_id=request_id, received_at_ms=int(time.time() * 1000)
        )
        try:
            await service.producer.send_all(META_WEBHOOKS, records, timeout_s=settings.produce_timeout_s)
        except BrokerUnavailable as exc:
            log.warning("webhook.broker_unavailable", error=str(exc))
            raise IngestError(503, "broker_unavailable", "could not store the webhook; retry") from None
        RECORDS.inc(len(records))
        log.info("webhook.accepted", records=len(records), object=doc["object"])
        return Response(b'{"status":"accepted"}', media_type="application/json")

    return app
