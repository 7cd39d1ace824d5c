"""`cortexx up`: services, migrations and topics, then the WUZAPI simulator, ingest, the worker and
the read API as supervised child processes.

The children run in their own sessions, so Ctrl-C reaches only this supervisor, which then stops
them in order (edges first, so in-flight work drains, then the services they depend on). A child
that dies is restarted with a growing delay; so is an embedded Postgres or broker, on its own
data and its own port, and the children reconnect to it by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import typer

from cli.services import Services, start_services
from harness.embedded import EmbeddedBroker, EmbeddedPostgres, EmbeddedServiceError
from infra.kafka.topics import declare_topics
from infra.postgres.db import mask_url
from infra.postgres.migrate import migrate
from infra.runtime.lifecycle import lifecycle
from infra.runtime.logging import get_logger
from infra.runtime.settings import Settings

log = get_logger("up")

CHILD_GRACE_S = 15.0
# A process that ran this long was healthy: its next crash starts the back-off from the bottom.
HEALTHY_RUN_S = 10.0
# A clean exit (code 0: someone stopped it, and it drained) is not a crash: start it again soon.
CLEAN_EXIT_DELAY_S = 0.2
CRASH_DELAY_S = 0.5
MAX_DELAY_S = 30.0


@dataclass
class Restarts:
    """When to start again something that exited: soon after a clean exit, and after a delay
    that doubles while it keeps crashing quickly; a healthy run resets the delay."""

    name: str
    crashes: int = 0
    next_start: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    def delay(self, code: int | None, now: float) -> float:
        """How long to wait before starting it again, after it exited with `code` at `now`."""
        if now - self.started_at > HEALTHY_RUN_S:
            self.crashes = 0
        if code == 0:
            return CLEAN_EXIT_DELAY_S
        delay: float = min(MAX_DELAY_S, CRASH_DELAY_S * 2.0**self.crashes)
        self.crashes += 1
        return delay

    def check(self, running: bool, code: int | None, start: Callable[[], None]) -> None:
        if running:
            return
        now = time.monotonic()
        if self.next_start == 0.0:
            delay = self.delay(code, now)
            self.next_start = now + delay
            log.log(
                logging.INFO if code == 0 else logging.ERROR,
                "up.child_exited",
                child=self.name,
                code=code,
                restart_in_s=delay,
            )
        elif now >= self.next_start:
            self.next_start = 0.0
            self.started_at = now
            try:
                start()
            except EmbeddedServiceError as exc:
                log.error("up.restart_failed", child=self.name, error=str(exc))
            else:
                log.info("up.restarted", child=self.name, crashes=self.crashes)


@dataclass
class Child:
    name: str
    args: list[str]
    url: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *self.args],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.info("up.child_started", child=self.name, pid=self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("up.child_killed", child=self.name, pid=self.proc.pid)
            self.proc.kill()
            self.proc.wait()
        log.info("up.child_stopped", child=self.name, code=self.proc.returncode)


DEV_META_TOKEN = "cortexx-dev-meta-token"


def _child_env(settings: Settings, services: Services) -> dict[str, str]:
    env = dict(os.environ)
    env["CORTEXX_DATABASE_URL"] = services.database_url
    env["CORTEXX_KAFKA_BOOTSTRAP"] = services.kafka_bootstrap or ""
    env["CORTEXX_DATA_DIR"] = str(settings.data_dir)
    env["CORTEXX_WUZAPI_URL"] = settings.wuzapi_url or f"http://127.0.0.1:{settings.wuzapi_sim_port}"
    if not settings.wuzapi_url:
        # The simulator's users, as a real gateway's: the worker's token, and those of companies
        # with their own if the operator lists them; any other gets 401. Through the environment,
        # not argv, so no token shows in the process list.
        listed = os.environ.get("CORTEXX_WUZAPI_SIM_TOKENS", "").split()
        env["CORTEXX_WUZAPI_SIM_TOKENS"] = " ".join(dict.fromkeys([settings.wuzapi_token, *listed]))
    env["CORTEXX_GRAPH_API_URL"] = settings.graph_api
    if not settings.graph_api_url and not settings.meta_access_token:
        # The simulator's one token, and the worker's for companies without their own.
        env["CORTEXX_META_ACCESS_TOKEN"] = DEV_META_TOKEN
    return env


def _write_services_env(settings: Settings, services: Services) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # It holds the database password: readable by this user alone, from its creation on.
    path = settings.services_env_path
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as env_file:
        env_file.write(
            f"CORTEXX_DATABASE_URL={services.database_url}\n"
            f"CORTEXX_KAFKA_BOOTSTRAP={services.kafka_bootstrap}\n"
            f"CORTEXX_INGEST_PORT={settings.ingest_port}\n"
            f"CORTEXX_API_PORT={settings.api_port}\n"
            f"CORTEXX_WUZAPI_URL={settings.wuzapi_url or f'http://127.0.0.1:{settings.wuzapi_sim_port}'}\n"
            f"CORTEXX_GRAPH_API_URL={settings.graph_api}\n"
        )


def run_up(settings: Settings) -> int:
    settings.services_env_path.unlink(missing_ok=True)
    lifecycle.install("up")
    services = start_services(settings)
    children = [
        Child("ingest", ["ingest"], url=f"http://{settings.ingest_host}:{settings.ingest_port}"),
        Child("worker", ["worker"]),
        Child("api", ["api"], url=f"http://{settings.api_host}:{settings.api_port}"),
    ]
    if not settings.wuzapi_url:
        # No gateway configured: run the simulator, first, so the worker finds it.
        sim_url = f"http://127.0.0.1:{settings.wuzapi_sim_port}"
        children.insert(0, Child("wuzapi-sim", ["wuzapi-sim"], url=sim_url))
    if not settings.graph_api_url:
        # Nor a Graph API: the media simulator, serving the sample stream's files (--auto).
        graph_url = f"http://127.0.0.1:{settings.graph_sim_port}"
        children.insert(0, Child("graph-sim", ["graph-sim", "--auto"], url=graph_url))

    def force() -> None:
        # A second Ctrl-C: no more waiting, but leave nothing running behind us.
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.kill()
        for service in services.owned:
            if service.proc is not None:
                service.proc.kill()

    lifecycle.on_force(force)
    try:
        asyncio.run(migrate(services.database_url))
        assert services.kafka_bootstrap is not None
        asyncio.run(
            declare_topics(
                services.kafka_bootstrap,
                partitions=settings.topic_partitions,
                replication=settings.topic_replication,
            )
        )
        _write_services_env(settings, services)
        env = _child_env(settings, services)
        for child in children:
            child.start(env)
        typer.echo("Cortexx is up:")
        for child in children:
            if child.url:
                typer.echo(f"  {child.name:<8} {child.url}")
        typer.echo(f"  postgres {mask_url(services.database_url)}")
        typer.echo(f"  kafka    {services.kafka_bootstrap}")
        typer.echo("Press Ctrl-C to stop.")
        restarts = {
            name: Restarts(name) for name in [c.name for c in children] + [s.name for s in services.owned]
        }
        while not lifecycle.stop_requested.is_set():
            time.sleep(0.2)
            for service in services.owned:
                _supervise_service(service, restarts[service.name])
            for child in children:
                _supervise(child, env, restarts[child.name])
        log.info("up.stopping")
        return 0
    finally:
        # Reverse start order: the worker drains its sends before the simulator goes away.
        for child in reversed(children):
            child.stop()
        settings.services_env_path.unlink(missing_ok=True)
        services.stop()
        log.info("up.stopped")


def _supervise(child: Child, env: dict[str, str], restarts: Restarts) -> None:
    if child.proc is None:
        return
    code = child.proc.poll()
    restarts.check(code is None, code, lambda: child.start(env))


def _supervise_service(service: EmbeddedPostgres | EmbeddedBroker, restarts: Restarts) -> None:
    """An embedded service that died comes back on its data dir and its port, so the URLs the
    children were given stay right."""
    if lifecycle.stop_requested.is_set():
        return
    code = service.proc.poll() if service.proc is not None else None
    restarts.check(service.running, code, service.start)
