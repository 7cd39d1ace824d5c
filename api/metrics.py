"""The read API's Prometheus metrics (the default registry: the API is a process of its own)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "cortexx_api_requests_total", "API requests by route and answer", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "cortexx_api_request_seconds",
    "API request latency by route",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
QUERY_SECONDS = Histogram(
    "cortexx_api_query_seconds",
    "Postgres statement latency by query name",
    ["query"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
SLOW_QUERIES = Counter(
    "cortexx_api_slow_queries_total", "Statements over the slow-query threshold", ["query"]
)
LOGINS = Counter("cortexx_api_logins_total", "Login attempts by outcome", ["outcome"])
SESSIONS_PRUNED = Counter("cortexx_api_sessions_pruned_total", "Expired sessions deleted")
REPLIES = Counter("cortexx_api_replies_total", "Agent replies by outcome", ["outcome"])
CONSUMER_LAG = Gauge("cortexx_api_consumer_lag", "Records the worker group has not committed yet", ["topic"])
DEAD_LETTERS = Gauge("cortexx_api_dead_letter_depth", "Records on a dead-letter topic", ["topic"])
READY = Gauge("cortexx_api_dependency_up", "1 when the last /ready saw the dependency up", ["dependency"])
