"""The operators' console's ingest p99: Prometheus' histogram_quantile over what a real
prometheus_client histogram counted between two scrapes (parsed from its text format), with
a restarted process counted from zero and an idle minute shown as no figure."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from api.ops.collector import Scrape, _quantile, parse_metrics

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
NAME = "cortexx_ingest_request_seconds"


class Process:
    """A process with a latency histogram that the console scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(NAME, "POST latency", buckets=BUCKETS, registry=self.registry)

    def observe(self, seconds: float, times: int = 1) -> None:
        for _ in range(times):
            self.latency.observe(seconds)

    def buckets(self) -> dict[str, float]:
        scrape = Scrape(up=True, values=parse_metrics(generate_latest(self.registry).decode()))
        return scrape.by_label(f"{NAME}_bucket", "le")


def test_the_quantile_interpolates_inside_its_bucket() -> None:
    ingest = Process()
    before = ingest.buckets()
    ingest.observe(0.2, times=100)  # all in (0.1, 0.25]
    after = ingest.buckets()
    assert _quantile(0.5, after, before) == pytest.approx(0.175)
    assert _quantile(0.99, after, before) == pytest.approx(0.1 + 0.15 * 0.99)


def test_only_what_happened_between_the_scrapes_counts() -> None:
    ingest = Process()
    ingest.observe(0.9, times=1000)  # an old slow spell, before the window
    before = ingest.buckets()
    ingest.observe(0.003, times=100)
    assert _quantile(0.99, ingest.buckets(), before) == pytest.approx(0.005 * 0.99)


def test_the_p99_lands_in_the_bucket_holding_the_slowest_one_percent() -> None:
    ingest = Process()
    before = ingest.buckets()
    ingest.observe(0.004, times=980)
    ingest.observe(0.4, times=20)  # 2%: the p99 is among them, in (0.25, 0.5]
    p99 = _quantile(0.99, ingest.buckets(), before)
    assert p99 is not None and 0.25 < p99 <= 0.5
    p50 = _quantile(0.5, ingest.buckets(), before)
    assert p50 is not None and p50 <= 0.005


def test_beyond_the_last_bound_the_answer_is_that_bound() -> None:
    ingest = Process()
    before = ingest.buckets()
    ingest.observe(7.0, times=10)
    assert _quantile(0.99, ingest.buckets(), before) == 1.0


def test_an_idle_window_has_no_quantile() -> None:
    ingest = Process()
    ingest.observe(0.01, times=5)
    same = ingest.buckets()
    assert _quantile(0.99, same, same) is None
    assert _quantile(0.99, {}, {}) is None


def test_a_restarted_process_is_counted_from_zero() -> None:
    old_process, new_process = Process(), Process()
    old_process.observe(0.004, times=500)
    before = old_process.buckets()
    new_process.observe(0.2, times=10)  # fewer than before: its counters started again
    assert _quantile(0.5, new_process.buckets(), before) == pytest.approx(0.175)
