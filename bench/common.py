"""What every benchmark shares: real services in a temp dir, Cortexx processes as children,
the machine's description, profiles, tables and the results file.

Absolute figures on a shared 2-core machine move from run to run; each benchmark therefore runs
its baselines in the same run, interleaved with ours, and reports ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from harness.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from infra.kafka.topics import declare_topics
from infra.postgres.db import connect
from infra.postgres.migrate import migrate
from infra.postgres.tenants import Tenant, upsert_tenant

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PARTITIONS = 4

console = Console(stderr=True)


class BenchError(RuntimeError):
    """A benchmark could not run (a tool missing, a process that died, a deadline passed)."""


# --------------------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine already was."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet"], cwd=ROOT, check=False).returncode != 0
    return out.stdout.strip() + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------- results


def save_result(bench: str, result: dict[str, Any]) -> Path:
    """Append one run to bench/results/<bench>.json (a JSON list, newest last)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{bench}.json"
    runs: list[Any] = []
    if path.exists():
        with contextlib.suppress(ValueError):
            runs = json.loads(path.read_text())
    runs.append(
        {
            "bench": bench,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "machine": machine(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            **result,
        }
    )
    path.write_text(json.dumps(runs, indent=1, default=str) + "\n")
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    Console(width=170).print(table)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    # Nearest rank: the ceil(q/100 * n)-th value (round() would round halves to even).
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


# --------------------------------------------------------------------------- services


@dataclass
class BenchServices:
    """Embedded Postgres and Kafka in one temp dir, migrated, topics declared."""

    data_dir: Path
    postgres: EmbeddedPostgres
    broker: EmbeddedBroker

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    def env(self, **settings: Any) -> dict[str, str]:
        """The environment of a `cortexx` child process on these services."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
        env.update(
            CORTEXX_ENV="test",
            CORTEXX_DATABASE_URL=self.database_url,
            CORTEXX_KAFKA_BOOTSTRAP=self.bootstrap,
            CORTEXX_DATA_DIR=str(self.data_dir),
            CORTEXX_LOG_LEVEL="info",
            CORTEXX_WORKER_METRICS_PORT="0",
            # Nothing is sent in a benchmark (no company has an auto-reply), but the worker
            # needs a gateway URL to start; nothing listens there.
            CORTEXX_WUZAPI_URL=f"http://127.0.0.1:{free_port()}",
        )
        env.update({f"CORTEXX_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    def postgres_cpu_s(self) -> float:
        """CPU seconds used so far by the Postgres server and its backends."""
        assert self.postgres.proc is not None
        return tree_cpu_s(self.postgres.proc.pid)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _interrupt_on_signals() -> None:
    """SIGTERM (and SIGINT, which a shell leaves ignored for background jobs) end a benchmark
    through KeyboardInterrupt, so that every `finally` stops the processes it started."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


@contextlib.contextmanager
def services(name: str, *, keep: bool = False) -> Iterator[BenchServices]:
    """Start embedded Postgres (fsync on, as in production) and Kafka in a fresh temp dir."""
    _interrupt_on_signals()
    data_dir = Path(tempfile.mkdtemp(prefix=f"cortexx-bench-{name}-"))
    postgres = EmbeddedPostgres(data_dir / "postgres")
    broker = EmbeddedBroker(data_dir / "broker")
    try:
        with console.status("starting embedded Postgres and Kafka"):
            postgres.start()
            broker.start()
            asyncio.run(migrate(postgres.url))
            asyncio.run(declare_topics(broker.bootstrap, partitions=PARTITIONS, replication=1))
        yield BenchServices(data_dir, postgres, broker)
    finally:
        broker.stop()
        postgres.stop()
        if keep:
            console.print(f"kept {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


async def add_tenant(url: str, slug: str, *, agents: int = 2) -> Tenant:
    """A company with `agents` active users (each inbound message notifies every one)."""
    conn = await connect(url)
    try:
        tenant, _ = await upsert_tenant(
            conn, slug=slug, app_secret=secrets.token_hex(16), verify_token="bench", name=slug
        )
        for i in range(agents):
            await conn.execute(
                "INSERT INTO users (company_id, email, name) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                tenant.id,
                f"agent{i}@{slug}.bench",
                f"Agent {i}",
            )
        return tenant
    finally:
        await conn.close()


# --------------------------------------------------------------------------- processes


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@dataclass
class Child:
    """A benchmark child process (a `cortexx` command or a bench module), its output in a file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int | None = None
    ready_line: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def cortexx(cls, name: str, args: list[str], env: dict[str, str], log_dir: Path, **kw: Any) -> Child:
        argv = [sys.executable, "-m", "cli.main", *args]
        return cls(name, argv, env, log_dir / f"{name}.log", **kw)

    @classmethod
    def module(
        cls, name: str, module: str, args: list[str], env: dict[str, str], log_dir: Path, **kw: Any
    ) -> Child:
        return cls(name, [sys.executable, "-m", module, *args], env, log_dir / f"{name}.log", **kw)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Child:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if self.port is None and self.ready_line is None:
            return self
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.port is not None:
            try:
                return httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200
            except httpx.TransportError:
                return False
        assert self.ready_line is not None
        return self.ready_line.encode() in self.log_path.read_bytes()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines the process wrote (others skipped)."""
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_bytes().splitlines():
            start = line.find(b"{")  # a terminal escape (Faust's spinner) may precede the JSON
            if start >= 0:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line[start:]))
        return out

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 20.0) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)


@contextlib.contextmanager
def running(*children: Child, timeout_s: float = 60.0) -> Iterator[tuple[Child, ...]]:
    """Start the children in order; stop every one that started, in reverse, whatever happens."""
    started: list[Child] = []
    try:
        for child in children:
            started.append(child)
            child.start(timeout_s)
        yield children
    finally:
        for child in reversed(started):
            child.stop()


# --------------------------------------------------------------------------- profiles


def py_spy_available() -> bool:
    return shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()


def py_spy_bin() -> str:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else "py-spy"


@dataclass
class Profile:
    """A py-spy sampling profile of a running process, as collapsed stacks."""

    pid: int
    out: Path
    idle: bool = True
    rate: int = 97
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Profile:
        argv = [py_spy_bin(), "record", "--pid", str(self.pid), "--format", "raw", "--rate", str(self.rate)]
        argv += ["--output", str(self.out), "--nonblocking", "--threads"]
        if self.idle:
            argv.append("--idle")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# Frames every sample passes through (start-up, the event loop, threads): no news in a profile.
ENTRY_FRAMES = (
    "(_click/",
    "(typer/",
    "(<frozen runpy>)",
    "(cli/main.py)",
    "(asyncio/runners.py)",
    "(asyncio/base_events.py)",
    "(asyncio/events.py)",
    "(infra/runtime/http_server.py)",
    "(mode/worker.py)",
    "(mode/threads.py)",
    "(threading.py)",
    "(faust/worker.py)",
    "(bench/faust_bare.py)",
    "(uvicorn/server.py)",
    "(uvicorn/main.py)",
    "(uvloop/",
)


def keep_profile(path: Path, name: str) -> Path | None:
    """Copy a raw py-spy profile to bench/results/profiles/ (for flame graphs later)."""
    if not path.exists():
        return None
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    target = RESULTS_DIR / "profiles" / f"{'-'.join(filter(None, slug.split('-')))}.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Where a process spends its time, from py-spy's raw output (`--threads --idle`).

    Each line is one distinct stack, `thread (tid): name;frame;...;leaf count`. Per thread: its
    share of samples and how much of it was idle (waiting in the selector). Per function: its
    share of the *busy* samples of all threads, self (the leaf) and inclusive.
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    thread_total: Counter[str] = Counter()
    thread_idle: Counter[str] = Counter()
    total = busy = 0
    empty: dict[str, Any] = {"samples": 0, "busy_samples": 0, "threads": [], "self": [], "inclusive": []}
    if not path.exists():
        return empty
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw = [f for f in stack.split(";") if f.strip()]
        thread = "main"
        if raw and raw[0].startswith("thread ("):
            thread = raw.pop(0).split(":", 1)[-1].strip() or "thread"
        frames = [_short(f) for f in raw if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        thread_total[thread] += count
        if _is_idle(frames):
            thread_idle[thread] += count
            continue
        busy += count
        own[frames[-1]] += count
        for frame in set(frames):
            if not any(entry in frame for entry in ENTRY_FRAMES):
                inclusive[frame] += count
    if total == 0:
        return empty

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / max(1, busy), 1)) for name, n in counter.most_common(top)]

    threads = [
        (name, round(100 * n / total, 1), round(100 * thread_idle[name] / n, 1))
        for name, n in thread_total.most_common()
    ]
    return {
        "samples": total,
        "busy_samples": busy,
        "threads": threads,
        "self": pct(own),
        "inclusive": pct(inclusive),
    }


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({short})"


def _is_idle(frames: list[str]) -> bool:
    """Waiting in the event loop's selector (asyncio). Under uvloop the wait is in C, inside
    the frame that entered the loop, and cannot be told apart from the loop's own work."""
    name = frames[-1].split(" (", 1)[0]
    return name.endswith((".select", ".poll", "EpollSelector.select")) or name in ("select", "poll")


def print_profile(title: str, summary: dict[str, Any]) -> None:
    threads = ", ".join(
        f"{name}: {share}% of samples, {idle}% idle" for name, share, idle in summary["threads"]
    )
    console.print(f"[bold]{title}[/]: {summary['samples']} samples ({threads})")
    rows = [(f"{name}", own) for name, own in summary["self"]]
    print_table(f"{title}: self time, % of busy samples", ["function", "%"], rows)
    rows = [(f"{name}", share) for name, share in summary["inclusive"]]
    print_table(f"{title}: inclusive time, % of busy samples", ["function", "%"], rows)


def parse_setting(text: str) -> tuple[str, str]:
    """`worker_batch_max=500` -> ("worker_batch_max", "500"): a worker setting for a benchmark."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=VALUE, got {text!r}")
    return name.strip().lower(), value.strip()


def setting_arg(text: str) -> tuple[str, str]:
    """`parse_setting` for argparse's `type=`."""
    try:
        return parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_setting_option(parser: argparse.ArgumentParser, help: str) -> None:
    """`--setting NAME=VALUE`, repeatable: worker settings for a benchmark's runs."""
    parser.add_argument(
        "--setting", action="append", default=[], type=setting_arg, metavar="NAME=VALUE", help=help
    )


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line, its module docstring as the help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
