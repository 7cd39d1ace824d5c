"""The operators' console's view of the other processes: scrape, remember, summarise.

Ingest and the worker expose Prometheus text; every `ops_scrape_interval_s` one background task
per API process scrapes both, adds the readiness monitor's lag and dead-letter snapshot, and keeps
the last `ops_history_s` (15 minutes) in a ring buffer in memory. Rates, the ingest p99 and the
cache hit rate are derived from the difference between the newest sample and the one about a
minute older. A process whose scrape fails is "down". Nothing here writes anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from api.readiness import BrokerSnapshot
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings

log = get_logger("api.ops")

RATE_WINDOW_S = 60.0
SCRAPE_TIMEOUT_S = 1.5

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Scrape:
    """One process's metrics at one instant, or why they could not be read."""

    up: bool
    values: dict[tuple[str, Labels], float] = field(default_factory=dict)
    error: str | None = None

    def total(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and want <= set(ls))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for (n, ls), v in self.values.items():
            if n == name:
                key = dict(ls).get(label, "")
                out[key] = out.get(key, 0.0) + v
        return out


def parse_metrics(text: str) -> dict[tuple[str, Labels], float]:
    values: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return values


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.time()
    ingest: Scrape
    worker: Scrape
    lag: dict[str, int]
    lag_partitions: dict[str, int]
    dead_letters: dict[str, int]
    broker_error: str | None


def _delta(new: float, old: float) -> float:
    # A counter that went down belongs to a restarted process: it counted from zero since.
    return new - old if new >= old else new


def _quantile(q: float, new: dict[str, float], old: dict[str, float]) -> float | None:
    """Prometheus' histogram_quantile over the buckets' increase between two scrapes."""
    buckets = sorted(
        ((math.inf if le == "+Inf" else float(le), _delta(v, old.get(le, 0.0))) for le, v in new.items()),
        key=lambda b: b[0],
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = upper, count
    return lower


class OpsCollector:
    """The ring buffer of samples and the background task that fills it."""

    def __init__(self, settings: Settings, snapshot: Callable[[], BrokerSnapshot]) -> None:
        self.ingest_url = settings.ingest_metrics
        self.worker_url = settings.worker_metrics
        self.interval_s = settings.ops_scrape_interval_s
        self._snapshot = snapshot
        self.samples: deque[Sample] = deque(maxlen=max(2, int(settings.ops_history_s / self.interval_s) + 1))
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=SCRAPE_TIMEOUT_S)
        self._task = asyncio.create_task(self._run(), name="ops-scrape")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.collect()
            except Exception:
                # A bug in summarising must not stop the console's refresh; it only reads.
                log.exception("ops.collect_crashed")
            await asyncio.sleep(max(0.1, self.interval_s - (time.monotonic() - started)))

    async def _scrape(self, url: str | None) -> Scrape:
        if url is None:
            return Scrape(up=False, error="no metrics endpoint configured")
        assert self._client is not None
        try:
            response = await self._client.get(url)
            response.raise_for_status()
            return Scrape(up=True, values=parse_metrics(response.text))
        except (httpx.HTTPError, ValueError) as exc:
            return Scrape(up=False, error=f"{type(exc).__name__}: {exc}"[:300])

    async def collect(self) -> Sample:
        ingest, worker = await asyncio.gather(self._scrape(self.ingest_url), self._scrape(self.worker_url))
        snap = self._snapshot()
        sample = Sample(
            at=time.time(),
            ingest=ingest,
            worker=worker,
            lag=dict(snap.lag),
            lag_partitions=dict(snap.lag_partitions),
            dead_letters=dict(snap.dead_letters),
            broker_error=snap.error,
        )
        self.samples.append(sample)
        return sample

    # Summaries.

    def _pair(self, window_s: float = RATE_WINDOW_S) -> tuple[Sample, Sample] | None:
        """The newest sample and the oldest one within `window_s` of it."""
        if len(self.samples) < 2:
            return None
        new = self.samples[-1]
        old = next((s for s in self.samples if new.at - s.at <= window_s + self.interval_s / 2), new)
        if old is new:
            old = self.samples[-2]
        return new, old

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"at": None, "ingest": {}, "worker": {}, "processes": {}, "window_s": 0}
        new = self.samples[-1]
        pair = self._pair()
        if pair is None:
            old = new
            span = 0.0
        else:
            _, old = pair
            span = new.at - old.at

        def per_min(delta: float) -> float | None:
            return round(delta * 60.0 / span, 1) if span > 0 else None

        def counter(scrape: str, name: str, **labels: str) -> float:
            a: Scrape = getattr(new, scrape)
            b: Scrape = getattr(old, scrape)
            if not a.up or not b.up:
                return 0.0
            return _delta(a.total(name, **labels), b.total(name, **labels))

        accepted = counter("ingest", "cortexx_ingest_requests_total", status="200")
        all_requests = counter("ingest", "cortexx_ingest_requests_total")
        hits = counter("ingest", "cortexx_ingest_tenant_cache_total", result="hit")
        lookups = counter("ingest", "cortexx_ingest_tenant_cache_total")
        p99 = None
        if new.ingest.up and old.ingest.up and span > 0:
            p99_s = _quantile(
                0.99,
                new.ingest.by_label("cortexx_ingest_request_seconds_bucket", "le"),
                old.ingest.by_label("cortexx_ingest_request_seconds_bucket", "le"),
            )
            p99 = None if p99_s is None else round(p99_s * 1000, 2)
        records = counter("worker", "cortexx_worker_records_total")
        breakers = {
            k: int(v) for k, v in new.worker.by_label("cortexx_wuzapi_breaker_open", "instance").items()
        }
        return {
            "at": new.at,
            "window_s": round(span, 1),
            "processes": {
                "ingest": {"status": "up" if new.ingest.up else "down", "error": new.ingest.error},
                "worker": {"status": "up" if new.worker.up else "down", "error": new.worker.error},
            },
            "ingest": {
                "accepted_per_min": per_min(accepted),
                "refused_per_min": per_min(all_requests - accepted),
                "p99_ms": p99,
                "cache_hit_rate": round(hits / lookups, 4) if lookups > 0 else None,
            },
            "worker": {
                "records_per_min": per_min(records),
                "stored_per_min": per_min(
                    counter("worker", "cortexx_worker_records_total", outcome="stored")
                ),
                "sends_per_min": per_min(counter("worker", "cortexx_outbound_sends_total", outcome="sent")),
                "rate_limit_waits_per_min": per_min(
                    counter("worker", "cortexx_outbound_rate_limit_waits_total")
                ),
                "records_total": new.worker.total("cortexx_worker_records_total"),
                "breakers_open": breakers,
            },
        }

    def series(self) -> list[dict[str, Any]]:
        """Per scrape interval over the history: worker records/s, ingest accepted/s, total lag."""
        out: list[dict[str, Any]] = []
        previous: Sample | None = None
        for sample in self.samples:
            point: dict[str, Any] = {
                "at": sample.at,
                "lag": sum(sample.lag.values()),
                "dead_letters": sum(sample.dead_letters.values()),
                "records_per_s": None,
                "accepted_per_s": None,
            }
            if previous is not None and sample.at > previous.at:
                dt = sample.at - previous.at
                if sample.worker.up and previous.worker.up:
                    point["records_per_s"] = round(
                        _delta(
                            sample.worker.total("cortexx_worker_records_total"),
                            previous.worker.total("cortexx_worker_records_total"),
                        )
                        / dt,
                        2,
                    )
                if sample.ingest.up and previous.ingest.up:
                    point["accepted_per_s"] = round(
                        _delta(
                            sample.ingest.total("cortexx_ingest_requests_total", status="200"),
                            previous.ingest.total("cortexx_ingest_requests_total", status="200"),
                        )
                        / dt,
                        2,
                    )
            out.append(point)
            previous = sample
        return out
