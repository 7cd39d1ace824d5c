"""Real services for the test session: embedded Postgres and Kafka unless URLs are given, and
the Cortexx processes run as real child processes against them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from harness.embedded import (
    KAFKA_PREREQUISITES,
    EmbeddedBroker,
    EmbeddedPostgres,
    missing_kafka_prerequisites,
)
from infra.kafka.topics import declare_topics
from infra.postgres.db import connect
from infra.postgres.migrate import migrate
from infra.postgres.tenants import Tenant, upsert_tenant
from tests.containers import NoDockerEngine, docker_answers, kafka_and_postgres
from tests.desk import Desk, open_desk
from tests.support import CortexxProcess, GraphSim, ServiceUrls, Simulator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceUrls]:
    data = tmp_path_factory.mktemp("services")
    owned: list[EmbeddedPostgres | EmbeddedBroker] = []
    database_url = os.environ.get("CORTEXX_DATABASE_URL")
    bootstrap = os.environ.get("CORTEXX_KAFKA_BOOTSTRAP")
    broker: EmbeddedBroker | None = None
    containers = contextlib.ExitStack()
    if os.environ.get("CORTEXX_TEST_SERVICES") == "containers":
        try:
            docker_answers()
        except NoDockerEngine as exc:
            pytest.skip(f"CORTEXX_TEST_SERVICES=containers but no Docker engine answers: {exc}")
        started = containers.enter_context(kafka_and_postgres())
        database_url, bootstrap = started.database_url, started.kafka_bootstrap
    try:
        if not database_url:
            # fsync off: test data need not survive a power cut, and it saves seconds.
            pg = EmbeddedPostgres(data / "postgres", fsync=False)
            pg.start()
            owned.append(pg)
            database_url = pg.url
        if not bootstrap:
            if missing_kafka_prerequisites():
                pytest.exit(KAFKA_PREREQUISITES, returncode=2)
            broker = EmbeddedBroker(data / "broker")
            broker.start()
            owned.append(broker)
            bootstrap = broker.bootstrap
        asyncio.run(migrate(database_url))
        asyncio.run(declare_topics(bootstrap, partitions=4, replication=1))
        postgres = next((s for s in owned if isinstance(s, EmbeddedPostgres)), None)
        yield ServiceUrls(
            database_url=database_url,
            kafka_bootstrap=bootstrap,
            broker=broker,
            data_dir=data,
            postgres=postgres,
        )
    finally:
        for service in reversed(owned):
            service.stop()
        containers.close()


@pytest.fixture(scope="session")
def wuzapi(services: ServiceUrls) -> Iterator[Simulator]:
    """The WUZAPI simulator, a real HTTP process; every process started after it uses it."""
    proc = CortexxProcess.wuzapi_sim(services)
    proc.start()
    services.wuzapi_url = proc.url
    try:
        yield Simulator(proc.url)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def graph(services: ServiceUrls) -> Iterator[GraphSim]:
    """The Graph API simulator (media), a real HTTP process that knows the tests' Meta token;
    every process started after it uses it."""
    proc = CortexxProcess.graph_sim(services)
    proc.start()
    services.graph_url = proc.url
    try:
        yield GraphSim(proc.url)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def ingest(services: ServiceUrls) -> Iterator[CortexxProcess]:
    proc = CortexxProcess.ingest(services, produce_timeout_s=2.0)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def api(services: ServiceUrls) -> Iterator[CortexxProcess]:
    """The read API as a real process."""
    proc = CortexxProcess.api(
        services,
        session_prune_interval_s=0.5,
        produce_timeout_s=2.0,
        broker_probe_interval_s=0.5,
        # Every test client is 127.0.0.1; the limit tests run APIs of their own.
        api_login_address_failures_max=1_000_000,
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def worker(services: ServiceUrls, wuzapi: Simulator, graph: GraphSim) -> Iterator[CortexxProcess]:
    proc = CortexxProcess.worker(
        services,
        breaker_reset_s=1.0,
        wuzapi_timeout_s=1.0,
        wuzapi_backoff_max_s=1.0,
        company_cache_ttl_s=0.5,
        media_backoff_initial_s=0.05,
        media_backoff_max_s=0.5,
        # A wrong hash is retried this often (about 10 s at these waits): the media fault test's
        # phase of wrong hashes is shorter, so no file is lost to it.
        media_max_attempts=40,
        media_breaker_reset_s=1.0,
        media_lookup_timeout_s=2.0,
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def ops_api(
    services: ServiceUrls, ingest: CortexxProcess, worker: CortexxProcess
) -> Iterator[CortexxProcess]:
    """A read API that scrapes this session's ingest and worker, for the operators' console."""
    proc = CortexxProcess.api(
        services,
        ingest_metrics_url=f"{ingest.url}/metrics",
        worker_metrics_url=f"http://127.0.0.1:{worker.env['CORTEXX_WORKER_METRICS_PORT']}/metrics",
        ops_scrape_interval_s=0.5,
        broker_probe_interval_s=0.5,
        produce_timeout_s=2.0,
        session_cookie_secure="false",  # the browser test talks plain http to 127.0.0.1
        api_login_address_failures_max=1_000_000,
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def db(services: ServiceUrls) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(services.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def tenant(db: asyncpg.Connection) -> Tenant:
    """A fresh company per test, so tests never see each other's rows."""
    created, _ = await upsert_tenant(
        db,
        slug=f"t-{secrets.token_hex(6)}",
        app_secret=secrets.token_hex(16),
        verify_token=secrets.token_hex(8),
        name="Test Co",
    )
    return created


@pytest.fixture
async def agent_user(db: asyncpg.Connection, tenant: Tenant) -> int:
    """An agent of the tenant, who receives notifications."""
    user_id = await db.fetchval(
        "INSERT INTO users (company_id, email, name) VALUES ($1, $2, 'Agent') RETURNING id",
        tenant.id,
        f"agent-{secrets.token_hex(4)}@{tenant.slug}.test",
    )
    return int(user_id)


@pytest.fixture
async def desk(db: asyncpg.Connection, ingest: CortexxProcess, api: CortexxProcess) -> AsyncIterator[Desk]:
    """A company with one agent logged in to the read API, posting its webhooks to ingest."""
    async with httpx.AsyncClient(timeout=20) as client:
        yield await open_desk(db, client, ingest, api)
