"""The embedded Postgres lets no one in without its password: not over TCP, not on its unix
socket, not for replication; it converts a cluster made when it trusted everyone, keeps its
data and its password across restarts, and runs as its own user and group, not root's."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from cli.services import Services
from cli.up import _write_services_env
from harness.embedded import (
    PG_HBA,
    PG_PASSWORD_FILE,
    PG_SYSTEM_USER,
    EmbeddedPostgres,
    free_port,
    mask_url,
)
from infra.runtime.settings import Settings

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the server changes user only when we are root")


@pytest.fixture(autouse=True)
def _no_ambient_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No password from the environment or a ~/.pgpass: a refusal must be the server's."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))


@pytest.fixture
def home() -> Iterator[Path]:
    """Where a test's clusters live: not under pytest's tmp_path, whose /tmp/pytest-of-<user>
    every pytest session that starts chmods back to 0700, locking the server's user out of a
    cluster another session is just creating."""
    path = Path(tempfile.mkdtemp(prefix="cortexx-pg-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pg(home: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(home / "postgres", fsync=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _fetchval(sql: str, dsn: str | None = None, **connect: Any) -> object:
    conn = await asyncpg.connect(dsn, **connect)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _query(pg: EmbeddedPostgres, sql: str) -> object:
    return asyncio.run(_fetchval(sql, pg.url))


async def _execute_async(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _execute(pg: EmbeddedPostgres, sql: str) -> None:
    asyncio.run(_execute_async(pg.url, sql))


def _refused(pg: EmbeddedPostgres, **connect: Any) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(_fetchval("SELECT 1", user="postgres", database="cortexx", port=pg.port, **connect))


def _psql(pg: EmbeddedPostgres, conninfo: str, sql: str) -> subprocess.CompletedProcess[str]:
    """psql that never prompts (-w): with no password it fails rather than waits."""
    return subprocess.run(
        [str(pg._bin("psql")), "-w", "-tA", "-d", conninfo, "-c", sql],
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_connection_without_the_password_is_refused(home: Path, capfd: pytest.CaptureFixture[str]) -> None:
    pg = EmbeddedPostgres(home / "postgres", fsync=False)
    pg.start()
    try:
        _check_refusals(pg, capfd)
    finally:
        pg.stop()


def _check_refusals(pg: EmbeddedPostgres, capfd: pytest.CaptureFixture[str]) -> None:
    _refused(pg, host="127.0.0.1")
    _refused(pg, host="127.0.0.1", password="wrong")
    _refused(pg, host="127.0.0.1", password=pg.password[:-1])
    _refused(pg, host=str(pg.data_dir / "pgsock"))  # the unix socket asks for it too
    replication = _psql(
        pg,
        f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres replication=database",
        "IDENTIFY_SYSTEM",
    )
    assert replication.returncode != 0
    assert "no password supplied" in replication.stderr

    assert _query(pg, "SELECT current_user") == "postgres"
    # Nothing trusts anyone, replication lines included; TCP on the loopback only.
    assert asyncio.run(_methods(pg)) == {"scram-sha-256"}
    assert (pg.pgdata / "pg_hba.conf").read_text() == PG_HBA
    assert _query(pg, "SHOW listen_addresses") == "127.0.0.1"
    assert _query(pg, "SHOW unix_socket_permissions") == "0700"
    assert _query(pg, "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'postgres'")
    assert stat.S_IMODE((pg.data_dir / "pgsock").stat().st_mode) == 0o700

    # The URL carries the password; the log and the console never do.
    assert pg.password in pg.url
    out, err = capfd.readouterr()
    assert "postgres.started" in out + err
    assert pg.password not in out + err
    assert pg.password not in (pg.data_dir / "postgres.log").read_text()
    assert stat.S_IMODE((pg.data_dir / "postgres.log").stat().st_mode) == 0o600


async def _methods(pg: EmbeddedPostgres) -> set[str]:
    conn = await asyncpg.connect(pg.url)
    try:
        rows = await conn.fetch("SELECT auth_method, error FROM pg_hba_file_rules")
    finally:
        await conn.close()
    assert all(row["error"] is None for row in rows)
    return {row["auth_method"] for row in rows}


def test_the_password_file_is_private_and_kept_across_restarts(home: Path) -> None:
    data_dir = home / "postgres"
    first = EmbeddedPostgres(data_dir, fsync=False)
    first.start()
    try:
        _execute(first, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before')")
    finally:
        first.stop()
    path = data_dir / PG_PASSWORD_FILE
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert (info.st_uid, info.st_gid) == (os.geteuid(), os.getegid())  # not the server's user
    assert path.read_text() == first.password
    assert len(first.password) >= 32
    assert not list(data_dir.glob(".*"))  # no temporary copy left behind (initdb's included)

    again = EmbeddedPostgres(data_dir, fsync=False)  # a new process would do the same
    again.start()
    try:
        assert again.password == first.password
        assert _query(again, "SELECT v FROM kept") == "before"
    finally:
        again.stop()


def test_a_lost_password_file_gets_a_new_password(home: Path) -> None:
    """As with the session key: delete it to have one generated; the old one stops working."""
    data_dir = home / "postgres"
    first = EmbeddedPostgres(data_dir, fsync=False)
    first.start()
    _execute(first, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before')")
    first.stop()
    (data_dir / PG_PASSWORD_FILE).unlink()

    renewed = EmbeddedPostgres(data_dir, fsync=False)
    renewed.start()
    try:
        assert renewed.password != first.password
        assert _query(renewed, "SELECT v FROM kept") == "before"
        _refused(renewed, host="127.0.0.1", password=first.password)
        assert (renewed.pgdata / "pg_hba.conf").read_text() == PG_HBA
    finally:
        renewed.stop()


def _old_style_cluster(data_dir: Path) -> None:
    """What start() made before this change: initdb --auth=trust, the server run with only its
    uid changed (group root), a database and a row written without any password."""
    pg = EmbeddedPostgres(data_dir, fsync=False)
    who = pg._run_as()
    data_dir.mkdir(parents=True)
    pg.pgdata.mkdir()
    sockets = data_dir / "pgsock"
    sockets.mkdir()
    if who.uid is not None:
        for path in (pg.pgdata, sockets):
            os.chown(path, who.uid, who.gid or -1)
        for parent in [data_dir, *data_dir.parents]:
            parent.chmod(parent.stat().st_mode | 0o055)
    subprocess.run(
        [str(pg._bin("initdb")), "-D", str(pg.pgdata), "-U", "postgres", "--auth=trust", "--no-instructions"],
        check=True,
        capture_output=True,
        user=who.uid,
    )
    assert "trust" in (pg.pgdata / "pg_hba.conf").read_text()
    server = subprocess.Popen(
        [
            str(pg._bin("postgres")),
            "-D",
            str(pg.pgdata),
            "-h",
            "127.0.0.1",
            "-p",
            str(pg.port),
            "-k",
            str(sockets),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=who.uid,
    )
    try:
        conninfo = f"host=127.0.0.1 port={pg.port} user=postgres"
        deadline = time.monotonic() + 30
        while _psql(pg, f"{conninfo} dbname=postgres", "SELECT 1").returncode != 0:
            assert time.monotonic() < deadline, "the old-style server did not start"
            assert server.poll() is None
            time.sleep(0.1)
        assert _psql(pg, f"{conninfo} dbname=postgres", "CREATE DATABASE cortexx").returncode == 0
        created = _psql(
            pg, f"{conninfo} dbname=cortexx", "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('old')"
        )
        assert created.returncode == 0, created.stderr
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    assert not (data_dir / PG_PASSWORD_FILE).exists()


def test_a_cluster_made_trusting_everyone_is_converted_and_keeps_its_data(
    home: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data_dir = home / "postgres"
    _old_style_cluster(data_dir)
    pg = EmbeddedPostgres(data_dir, fsync=False)
    pg.start()
    try:
        assert _query(pg, "SELECT v FROM kept") == "old"
        _refused(pg, host="127.0.0.1")
        _refused(pg, host=str(data_dir / "pgsock"))
        assert asyncio.run(_methods(pg)) == {"scram-sha-256"}
        assert stat.S_IMODE((data_dir / PG_PASSWORD_FILE).stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "pgsock").stat().st_mode) == 0o700  # it was 0755
        out, err = capfd.readouterr()
        assert "postgres.auth_converted" in out + err
        assert pg.password not in out + err
        if os.geteuid() == 0:
            account = pwd.getpwnam(PG_SYSTEM_USER)
            wrong = [
                p
                for p in [pg.pgdata, *pg.pgdata.rglob("*")]
                if (p.lstat().st_uid, p.lstat().st_gid) != (account.pw_uid, account.pw_gid)
            ]
            assert not wrong, f"files not owned by {PG_SYSTEM_USER}'s user and group: {wrong[:5]}"
    finally:
        pg.stop()

    # Converted once: the next start finds it as it left it, password included.
    again = EmbeddedPostgres(data_dir, fsync=False)
    again.start()
    try:
        assert again.password == pg.password
        assert _query(again, "SELECT v FROM kept") == "old"
        out, err = capfd.readouterr()
        assert "postgres.auth_converted" not in out + err
    finally:
        again.stop()


def _groups(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return [int(g) for g in line.split()[1:]]
    raise AssertionError(f"no Groups line for {pid}")


async def _identities(pg: EmbeddedPostgres) -> list[tuple[int, tuple[int, ...], tuple[int, ...], list[int]]]:
    """(pid, uids, gids, supplementary groups) of the server's processes, while a connection
    of ours is open so that a backend forked for a client is among them."""
    assert pg.proc is not None
    conn = await asyncpg.connect(pg.url)
    try:
        server = psutil.Process(pg.proc.pid)
        return [
            (proc.pid, tuple(proc.uids()), tuple(proc.gids()), _groups(proc.pid))
            for proc in [server, *server.children(recursive=True)]
        ]
    finally:
        await conn.close()


@root_only
def test_the_server_runs_with_its_own_user_and_group_only(home: Path) -> None:
    """Even when the root that starts it has supplementary groups (a login shell's root does;
    this test gives itself root's group 0 and `disk`'s 6, as `id` shows them there)."""
    account = pwd.getpwnam(PG_SYSTEM_USER)
    ours = os.getgroups()
    os.setgroups([0, 6])
    pg = EmbeddedPostgres(home / "postgres", fsync=False)
    try:
        pg.start()
    finally:
        os.setgroups(ours)
    try:
        _check_identities(pg, account)
    finally:
        pg.stop()


def _check_identities(pg: EmbeddedPostgres, account: pwd.struct_passwd) -> None:
    identities = asyncio.run(_identities(pg))
    assert len(identities) > 2  # the postmaster, its workers, and our connection's backend
    for pid, uids, gids, groups in identities:
        assert uids == (account.pw_uid,) * 3, pid
        assert gids == (account.pw_gid,) * 3, pid
        assert set(groups) <= {account.pw_gid}, pid
        assert 0 not in groups, pid
    for path in [pg.pgdata, *pg.pgdata.glob("*")]:
        assert path.lstat().st_gid == account.pw_gid, path


@root_only
def test_another_local_user_gets_nowhere(pg: EmbeddedPostgres) -> None:
    socket_path = pg.data_dir / "pgsock" / f".s.PGSQL.{pg.port}"
    assert socket_path.is_socket()
    nobody = pwd.getpwnam("nobody")
    # The wheel's psql, which the server's user (and so anyone) may run: refused at connect(),
    # before any password is asked for.
    probe = subprocess.run(
        [
            str(pg._bin("psql")),
            "-w",
            "-d",
            f"host={socket_path.parent} port={pg.port} user=postgres",
            "-c",
            "SELECT 1",
        ],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0
    assert f'socket "{socket_path}" failed: Permission denied' in probe.stderr, probe.stderr
    # Over TCP it reaches the server, which wants the password it does not have.
    tcp = subprocess.run(
        [str(pg._bin("psql")), "-w", "-d", f"host=127.0.0.1 port={pg.port} user=postgres", "-c", "SELECT 1"],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert tcp.returncode != 0
    assert "no password supplied" in tcp.stderr, tcp.stderr


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("postgresql://postgres:s3cr%2Ft@127.0.0.1:5432/cortexx") == (
        "postgresql://postgres:***@127.0.0.1:5432/cortexx"
    )
    assert (
        mask_url("postgresql://postgres@127.0.0.1:5432/cortexx")
        == "postgresql://postgres@127.0.0.1:5432/cortexx"
    )
    assert mask_url("postgresql://u:p@h1:5432,h2:5433/db?sslmode=require") == (
        "postgresql://u:***@h1:5432,h2:5433/db?sslmode=require"
    )


def test_services_env_is_private(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    settings.services_env_path.write_text("stale\n")
    settings.services_env_path.chmod(0o644)
    url = f"postgresql://postgres:secret-password@127.0.0.1:{free_port()}/cortexx"
    _write_services_env(settings, Services(database_url=url, kafka_bootstrap="127.0.0.1:9092"))
    assert stat.S_IMODE(settings.services_env_path.stat().st_mode) == 0o600
    assert f"CORTEXX_DATABASE_URL={url}\n" in settings.services_env_path.read_text()
