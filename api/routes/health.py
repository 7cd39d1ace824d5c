"""Liveness, readiness and metrics: `/health`, `/ready`, `/metrics`."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import Service

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up and serving (no dependency is consulted)."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Postgres or the broker is down"}})
async def ready(service: Service) -> Response:
    """200 when Postgres and the broker answer, 503 otherwise; the body lists every dependency."""
    ok, body = await service.readiness.check()
    return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus text format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
