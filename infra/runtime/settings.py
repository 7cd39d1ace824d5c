"""The one settings class of every Cortexx process, read once at start.

Environment variables carry the `CORTEXX_` prefix. In development a process with no service URL
falls back to the embedded services: `cortexx up` writes their URLs to `.cortexx/services.env`,
which this class reads after the real environment (so an explicit variable always wins).

Settings are frozen once read: a command that needs other values (a port from its options, a URL
it resolved) makes a resolved copy (`settings.resolved(...)`), so no module sees values change.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR_DEFAULT = Path(".cortexx")
SERVICES_ENV = "services.env"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CORTEXX_",
        env_file=(DATA_DIR_DEFAULT / SERVICES_ENV,),
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = DATA_DIR_DEFAULT
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: Path | None = None  # where logs go if stdout is closed (else stderr)
    shutdown_grace_s: float = Field(default=15.0, gt=0)  # drain time after SIGTERM / SIGINT
    # A process still running this long after a stop was requested exits anyway (code 124).
    stop_deadline_s: float = Field(default=45.0, gt=0)

    # Services. None means: use the embedded one (development and tests only).
    database_url: str | None = None
    kafka_bootstrap: str | None = None
    db_pool_min: int = 1
    db_pool_max: int = 10

    # Topics.
    topic_partitions: int = Field(default=4, ge=1)
    topic_replication: int = Field(default=1, ge=1)

    # Ingest.
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 8000
    body_limit_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    produce_timeout_s: float = Field(default=5.0, gt=0)
    producer_linger_ms: int = Field(default=2, ge=0)
    tenant_cache_ttl_s: float = Field(default=30.0, ge=0)
    tenant_cache_negative_ttl_s: float = Field(default=2.0, ge=0)
    tenant_cache_size: int = Field(default=10_000, ge=1)
    tenant_lookup_timeout_s: float = Field(default=1.0, gt=0)  # then 503, or the company's last known entry
    # What one POST may produce (413 envelope_too_large over it, nothing kept); see ingest/envelope.py.
    ingest_max_records: int = Field(default=5000, ge=1000)
    ingest_max_record_bytes: int = Field(default=1_000_000, ge=64 * 1024)
    ingest_max_post_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024)

    # Read API.
    api_host: str = "127.0.0.1"
    api_port: int = 8001
    session_cookie_name: str = "cortexx_session"
    session_cookie_secure: bool | None = None  # None: Secure everywhere but development
    session_ttl_s: float = Field(default=8 * 3600.0, gt=0)  # rolling: renewed on use
    session_touch_s: float = Field(default=60.0, ge=0)  # renew at most this often: not a write per request
    # Signs session cookies and pagination cursors. Development keeps a generated one in
    # data_dir/session.key, so sessions survive restarts; production must set it (32+ chars).
    session_secret: SecretStr | None = None
    session_prune_interval_s: float = Field(default=300.0, gt=0)  # each process, jittered by ±50%
    slow_query_ms: float = Field(default=100.0, ge=0)
    ready_timeout_s: float = Field(default=0.07, gt=0)  # per check, all concurrent: /ready < 100 ms
    broker_probe_interval_s: float = Field(default=1.5, gt=0)  # lag and dead-letter snapshot refresh
    api_db_timeout_s: float = Field(default=5.0, gt=0)
    # The API's bodies are logins and replies; larger ones are refused (413) before being read.
    api_body_limit_bytes: int = Field(default=256 * 1024, ge=1024)
    # Logins (api/login_limits.py): attempts are counted in Postgres, so across replicas, per
    # account (the email, whichever company) and per client address. Past either limit a login is
    # 429 with Retry-After until the window begun by the first attempt ends; a success resets the
    # account's count. Argon2 runs on `hash_threads` threads (None: one per CPU less one, at least
    # one); with `hash_queue_max` logins already waiting for one, a login is 503 at once.
    api_login_account_failures_max: int = Field(default=5, ge=1)
    api_login_address_failures_max: int = Field(default=20, ge=1)
    api_login_window_s: float = Field(default=900.0, gt=0)
    api_login_hash_threads: int | None = Field(default=None, ge=1)
    api_login_hash_queue_max: int = Field(default=8, ge=0)

    # Both HTTP edges (ingest, the read API): slow clients are cut off (infra/runtime/http_server.py).
    # A request's headers must arrive within this (from connect, or from their first byte after a
    # keep-alive wait), else 408 and the connection closed; Meta sends them at once.
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    # Its whole body within this of the headers, else 408: Meta's few MB take well under a second.
    http_body_timeout_s: float = Field(default=30.0, gt=0)
    # An idle keep-alive connection is closed after this; behind a load balancer, set it above
    # the balancer's own idle timeout.
    http_keep_alive_s: int = Field(default=5, ge=1)

    # Worker.
    worker_app_id: str = "cortexx"
    # Bigger transactions cost Postgres less per record (BENCHMARKS.md, Worker). A batch closes
    # when full, `within` after its first record, or when no record has arrived for `idle`
    # (processors/faust_stream.py): under load the first two size it, and on a quiet system a
    # record waits `idle` for company, not the whole window.
    worker_batch_max: int = Field(default=2000, ge=1)
    worker_batch_within_s: float = Field(default=0.25, gt=0)
    worker_batch_idle_ms: float = Field(default=10.0, gt=0)
    # Take the next batch while Postgres writes this one (still one write at a time, in order).
    # Off by default: Faust keeps fetching and buffering while the agent awaits a write anyway,
    # and without the overlap the next take finds a full batch waiting; measured slower
    # (BENCHMARKS.md, Worker).
    worker_overlap_writes: bool = False
    # Faust's per-stream buffer; at 80% of it Faust stops fetching the partition (flow control).
    worker_stream_buffer_max: int = Field(default=4096, ge=1)
    # How long the broker may hold a fetch that finds no records (Faust's own is 1,500 ms). The
    # client has one fetch in flight per broker, so while it waits on the idle partitions the
    # busy ones, once drained, wait behind it (processors/faust_transport.py).
    worker_fetch_max_wait_ms: int = Field(default=200, ge=1, le=1500)
    worker_event_loop: Literal["asyncio", "uvloop"] = "uvloop"
    worker_web_port: int = 6066
    worker_session_timeout_s: float = Field(default=6.0, gt=0)
    db_retry_max_s: float = Field(default=5.0, gt=0)

    # Outbound through WUZAPI. No URL: `cortexx up` starts the simulator.
    wuzapi_url: str | None = None
    wuzapi_token: str = "cortexx-dev-token"  # used for companies without a token of their own
    wuzapi_connect_timeout_s: float = Field(default=2.0, gt=0)
    wuzapi_timeout_s: float = Field(default=5.0, gt=0)
    # A call carrying a file: the upload included (WUZAPI's own write timeout is 120 s).
    wuzapi_media_timeout_s: float = Field(default=120.0, gt=0)
    wuzapi_max_attempts: int = Field(default=10, ge=1)
    wuzapi_backoff_initial_s: float = Field(default=0.2, gt=0)
    wuzapi_backoff_max_s: float = Field(default=10.0, gt=0)
    breaker_fail_max: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=5.0, gt=0)
    outbound_max_in_flight: int = Field(default=2000, ge=1)
    company_cache_ttl_s: float = Field(default=30.0, ge=0)  # how soon the worker sees changed settings
    worker_metrics_port: int = Field(default=9101, ge=0)  # 0: no metrics endpoint
    # Loopback by default (metrics say much about tenants); 0.0.0.0 where a scraper runs elsewhere.
    worker_metrics_host: str = "127.0.0.1"
    wuzapi_sim_port: int = 8090

    # Media (processors/media.py, infra/storage/). Inbound media is fetched from Meta's Graph API
    # with the company's access token (`companies.meta_access_token`, else this one) and stored;
    # no URL: `cortexx up` starts the Graph API simulator (production: Meta's own).
    graph_api_url: str | None = None
    graph_api_version: str = "v23.0"
    meta_access_token: SecretStr | None = None
    graph_sim_port: int = 8091
    # Where media is kept: file:///path or s3://bucket/prefix. None: data_dir/media (development).
    media_store_url: str | None = None
    media_s3_endpoint: str | None = None  # an S3-compatible server's URL; None: AWS itself
    media_s3_region: str = "us-east-1"
    media_s3_access_key_id: str | None = None
    media_s3_secret_access_key: SecretStr | None = None
    media_max_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)  # WhatsApp's largest document
    media_fetch_concurrency: int = Field(default=8, ge=1)  # downloads at once, per worker
    media_max_in_flight: int = Field(default=1000, ge=1)  # fetch jobs taken, waiting or running
    media_connect_timeout_s: float = Field(default=3.0, gt=0)
    media_lookup_timeout_s: float = Field(default=10.0, gt=0)  # the Graph API's URL lookup
    media_read_timeout_s: float = Field(default=15.0, gt=0)  # a download's wait for its next bytes
    media_download_max_s: float = Field(default=600.0, gt=0)  # a whole download, however it drips
    # Attempts on failures of one media (an expired URL, a wrong hash); an outage spends none.
    media_max_attempts: int = Field(default=6, ge=1)
    media_backoff_initial_s: float = Field(default=0.5, gt=0)
    media_backoff_max_s: float = Field(default=30.0, gt=0)
    media_breaker_fail_max: int = Field(default=5, ge=1)
    media_breaker_reset_s: float = Field(default=10.0, gt=0)
    # Stored media older than this is deleted (the message says so); 0 keeps it for ever.
    media_retention_days: float = Field(default=365.0, ge=0)
    media_prune_interval_s: float = Field(default=3600.0, gt=0)  # each worker, jittered by ±50%
    # A file an agent attaches to a reply (413 over it); WhatsApp takes up to 16 MB of video.
    attachment_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    # Operators' console. None: the local process on its configured port.
    ingest_metrics_url: str | None = None
    worker_metrics_url: str | None = None
    ops_scrape_interval_s: float = Field(default=2.0, gt=0)  # the overview's resolution
    ops_history_s: float = Field(default=900.0, gt=0)  # kept in memory: the chart's 15 minutes

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env == "production":
            missing = [
                name
                for name, value in (
                    ("CORTEXX_DATABASE_URL", self.database_url),
                    ("CORTEXX_KAFKA_BOOTSTRAP", self.kafka_bootstrap),
                    ("CORTEXX_SESSION_SECRET", self.session_secret),
                    ("CORTEXX_WUZAPI_URL", self.wuzapi_url),
                    # A container's disk is no place to keep customers' files.
                    ("CORTEXX_MEDIA_STORE_URL", self.media_store_url),
                )
                if not value
            ]
            if missing:
                raise ValueError("production needs explicit service URLs; missing: " + ", ".join(missing))
        return self

    def resolved(self, **values: object) -> Settings:
        """A copy with `values` in place of the read ones, validated as if they had been read."""
        return type(self).model_validate({**self.model_dump(), **values})

    @property
    def services_env_path(self) -> Path:
        return self.data_dir / SERVICES_ENV

    @property
    def uses_embedded(self) -> bool:
        return self.env != "production"

    @property
    def graph_api(self) -> str:
        """The Graph API's base URL: the configured one, else Meta's own (production) or the
        simulator `cortexx up` starts."""
        if self.graph_api_url:
            return self.graph_api_url.rstrip("/")
        if self.env == "production":
            return "https://graph.facebook.com"
        return f"http://127.0.0.1:{self.graph_sim_port}"

    @property
    def media_store(self) -> str:
        """Where media is kept, as a URL (file:// or s3://)."""
        return self.media_store_url or (self.data_dir / "media").resolve().as_uri()

    @property
    def ingest_metrics(self) -> str:
        return self.ingest_metrics_url or f"http://127.0.0.1:{self.ingest_port}/metrics"

    @property
    def worker_metrics(self) -> str | None:
        if self.worker_metrics_url:
            return self.worker_metrics_url
        if not self.worker_metrics_port:
            return None
        host = "127.0.0.1" if self.worker_metrics_host in ("0.0.0.0", "::") else self.worker_metrics_host
        return f"http://{host}:{self.worker_metrics_port}/metrics"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    if settings.data_dir != DATA_DIR_DEFAULT:
        # The services file lives in the configured data dir; read it from there instead.
        settings = Settings(_env_file=settings.services_env_path)  # type: ignore[call-arg]
    return settings
