"""The two commands a user runs: `cortexx up` brings the stack up on embedded services,
`cortexx simulate` proves the path end to end, and Ctrl-C stops everything cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from harness.embedded import free_port


def _env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
    env.update(
        CORTEXX_DATA_DIR=str(data_dir),
        CORTEXX_INGEST_PORT=str(port),
        CORTEXX_API_PORT=str(free_port()),
        CORTEXX_WUZAPI_SIM_PORT=str(free_port()),
        CORTEXX_WORKER_METRICS_PORT=str(free_port()),
    )
    return env


def _cortexx(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _start_up(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    # Its output (and its children's, which share it) goes to a file: a pipe nobody reads fills
    # up, and then every process of the stack blocks on its next log line.
    out = open(Path(env["CORTEXX_DATA_DIR"]).parent / f"up-{port}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up"],
        env=env,
        stdout=out,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    proc.stdout = out
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "cortexx up exited early"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("cortexx up did not serve /health")


def _stop_up(proc: subprocess.Popen[str]) -> tuple[int, str]:
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.stdout is not None
    proc.stdout.seek(0)
    out = proc.stdout.read()
    proc.stdout.close()
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes left running after Ctrl-C: {alive}"
    return proc.returncode, out


def test_up_simulate_and_stop(tmp_path: Path):
    port = free_port()
    env = _env(tmp_path / "data", port)
    up = _start_up(env, port)
    try:
        simulated = _cortexx("simulate", "--contacts", "12", "--messages", "3", "--timeout", "30", env=env)
        assert simulated.returncode == 0, simulated.stdout + simulated.stderr
        assert "OK" in simulated.stdout

        added = _cortexx(
            "tenants", "add", "--slug", "acme", "--app-secret", "s1", "--verify-token", "v1", env=env
        )
        assert added.returncode == 0, added.stderr
        assert "registered company acme" in added.stdout
        updated = _cortexx(
            "tenants", "add", "--slug", "acme", "--app-secret", "s2", "--verify-token", "v2", env=env
        )
        assert "updated company acme" in updated.stdout
        bad = _cortexx(
            "tenants", "add", "--slug", "Not A Slug", "--app-secret", "s", "--verify-token", "v", env=env
        )
        assert bad.returncode == 2
        assert "slug" in bad.stderr
    finally:
        code, out = _stop_up(up)
    assert code == 0
    assert f"http://127.0.0.1:{port}" in out

    # Postgres data survives a restart of the whole stack.
    up = _start_up(env, port)
    try:
        again = _cortexx("simulate", "--contacts", "12", "--messages", "3", "--timeout", "30", env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "registered demo company" not in again.stderr
    finally:
        code, _ = _stop_up(up)
    assert code == 0


def test_service_commands_explain_a_missing_stack(tmp_path: Path):
    env = _env(tmp_path / "empty", free_port())
    result = _cortexx("ingest", env=env, timeout=30)
    assert result.returncode == 2
    assert "cortexx up" in result.stderr


def _service(up: subprocess.Popen[str], marker: str) -> psutil.Process:
    """The one process under `up` whose command line has `marker` (the broker's JVM, the postmaster)."""
    found = [
        p
        for p in psutil.Process(up.pid).children(recursive=True)
        if any(marker in part for part in p.cmdline())
    ]
    assert len(found) >= 1, f"no {marker} under cortexx up"
    return min(found, key=lambda p: p.create_time())  # Postgres' backends are the postmaster's children


def test_up_restarts_a_killed_broker_and_postgres(tmp_path: Path):
    """Kill -9 the embedded broker and Postgres under a running `up`: it starts each again on its
    own data, the processes reconnect by themselves, and the stack serves again: a second
    simulate finds the first one's company and stores its own messages."""
    port = free_port()
    env = _env(tmp_path / "data", port)
    up = _start_up(env, port)
    try:
        first = _cortexx("simulate", "--contacts", "8", "--messages", "2", "--timeout", "30", env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        killed = []
        for marker in ("kafka.Kafka", "bin/postgres"):
            victim = _service(up, marker)
            victim.kill()
            victim.wait(10)
            killed.append((marker, victim.pid))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                back = all(_service(up, marker).pid != pid for marker, pid in killed)
            except (AssertionError, psutil.NoSuchProcess):
                back = False
            if back:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("cortexx up did not restart the broker and Postgres")
        again = _cortexx("simulate", "--contacts", "8", "--messages", "2", "--timeout", "60", env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "registered demo company" not in again.stderr  # Postgres came back on its data
    finally:
        code, _ = _stop_up(up)
    assert code == 0


async def test_dlq_list_and_show_inspect_a_database_without_migrating_it(services, db):
    """The read-only ops commands change nothing in the database they look at: an operator
    pointing `dlq list` at the wrong database (or one not migrated yet) finds it as it was."""
    import secrets
    from urllib.parse import urlsplit, urlunsplit

    name = f"bare_{secrets.token_hex(4)}"
    await db.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(services.database_url)
    bare = urlunsplit(parts._replace(path=f"/{name}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
    env.update(CORTEXX_DATABASE_URL=bare, CORTEXX_KAFKA_BOOTSTRAP=services.kafka_bootstrap)
    listed = _cortexx("dlq", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    shown = _cortexx("dlq", "show", "meta.webhooks.dlq:0:999999999", env=env)
    assert "Traceback" not in shown.stderr, shown.stderr
    import asyncpg

    conn = await asyncpg.connect(bare)
    try:
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    assert tables == 0
