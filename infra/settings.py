"""The one settings class of every Cortexx process, read once at start.

Environment variables carry the `CORTEXX_` prefix. In development a process with no service URL
falls back to the embedded services: `cortexx up` writes their URLs to `.cortexx/services.env`,
which this class reads after the real environment (so an explicit variable always wins).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR_DEFAULT = Path(".cortexx")
SERVICES_ENV = "services.env"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CORTEXX_",
        env_file=(DATA_DIR_DEFAULT / SERVICES_ENV,),
        env_file_encoding="utf-8",
        extra="ignore",
    )

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = DATA_DIR_DEFAULT
    log_level: Literal["debug", "info", "warning", "error"] = "info"

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

    # Worker.
    worker_app_id: str = "cortexx"
    worker_batch_max: int = Field(default=500, ge=1)
    worker_batch_within_s: float = Field(default=0.05, gt=0)
    worker_web_port: int = 6066
    worker_session_timeout_s: float = Field(default=6.0, gt=0)
    db_retry_max_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env == "production":
            missing = [
                name
                for name, value in (
                    ("CORTEXX_DATABASE_URL", self.database_url),
                    ("CORTEXX_KAFKA_BOOTSTRAP", self.kafka_bootstrap),
                )
                if not value
            ]
            if missing:
                raise ValueError("production needs explicit service URLs; missing: " + ", ".join(missing))
        return self

    @property
    def services_env_path(self) -> Path:
        return self.data_dir / SERVICES_ENV

    @property
    def uses_embedded(self) -> bool:
        return self.env != "production"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    settings = Settings()
    if settings.data_dir != DATA_DIR_DEFAULT:
        # The services file lives in the configured data dir; read it from there instead.
        settings = Settings(_env_file=settings.services_env_path)  # type: ignore[call-arg]
    return settings
