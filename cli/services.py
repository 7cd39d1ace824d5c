"""Resolve the services a command needs: the ones given by URL, or embedded ones in development."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import typer

from infra.runtime.logging import configure_logging
from infra.runtime.settings import Settings, get_settings

if TYPE_CHECKING:
    from harness.embedded import EmbeddedBroker, EmbeddedPostgres


def harness(module: str, needed_for: str) -> ModuleType:
    """A module of the development harness (embedded services, the WUZAPI simulator, Meta
    samples), which the production image leaves out: without it, a clear exit 2, not a traceback."""
    try:
        return importlib.import_module(f"harness.{module}")
    except ImportError:
        typer.echo(
            f"{needed_for} needs the development harness (pip install 'cortexx-stream[harness]'); "
            "in production, set the service URLs (CORTEXX_DATABASE_URL, CORTEXX_KAFKA_BOOTSTRAP, "
            "CORTEXX_WUZAPI_URL).",
            err=True,
        )
        raise typer.Exit(2) from None


@dataclass
class Services:
    database_url: str
    kafka_bootstrap: str | None
    owned: list[EmbeddedPostgres | EmbeddedBroker] = field(default_factory=list)

    def stop(self) -> None:
        # Stop in reverse start order: the broker before Postgres is fine either way.
        for service in reversed(self.owned):
            service.stop()
        self.owned.clear()


def process_settings(process: str) -> Settings:
    """The settings of a command, its logging configured under its process name."""
    settings = get_settings()
    configure_logging(settings.log_level, process=process, log_file=settings.log_file)
    return settings


def need_url(value: str | None, variable: str) -> str:
    if value:
        return value
    typer.echo(
        f"{variable} is not set and no embedded service is running: start the stack with "
        "`cortexx up` (which shares its services with other commands), or set the URL.",
        err=True,
    )
    raise typer.Exit(2)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """Postgres for a one-shot command: the configured one, or the embedded one for its duration."""
    if settings.database_url:
        yield settings.database_url
        return
    if not settings.uses_embedded:
        need_url(None, "CORTEXX_DATABASE_URL")
    pg = harness("embedded", "an embedded Postgres").EmbeddedPostgres(settings.data_dir / "postgres")
    pg.start()
    try:
        yield pg.url
    finally:
        pg.stop()


def start_services(settings: Settings) -> Services:
    """Everything `cortexx up` runs on: configured URLs, or embedded services it owns."""
    services = Services(database_url=settings.database_url or "", kafka_bootstrap=None)
    try:
        if not settings.database_url:
            pg = harness("embedded", "an embedded Postgres").EmbeddedPostgres(settings.data_dir / "postgres")
            pg.start()
            services.owned.append(pg)
            services.database_url = pg.url
        if settings.kafka_bootstrap:
            services.kafka_bootstrap = settings.kafka_bootstrap
        else:
            broker = harness("embedded", "an embedded broker").EmbeddedBroker(settings.data_dir / "broker")
            broker.start()
            services.owned.append(broker)
            services.kafka_bootstrap = broker.bootstrap
    except BaseException:
        services.stop()
        raise
    return services
