"""What the tests share: Cortexx processes run for real, signed posts, and waiting on conditions."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

from harness.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from harness.meta_samples import sign
from harness.wuzapi_sim import chat_of
from infra.kafka import offsets
from infra.postgres.tenants import Tenant

T = TypeVar("T")


# The Graph API simulator's one token in the tests: the worker's default access token.
META_TOKEN = "cortexx-test-meta-token"


@dataclass
class ServiceUrls:
    database_url: str
    kafka_bootstrap: str
    broker: EmbeddedBroker | None
    data_dir: Path
    wuzapi_url: str = ""
    postgres: EmbeddedPostgres | None = None
    graph_url: str = ""


@dataclass
class CortexxProcess:
    """A `cortexx` subcommand run as a child process, its JSON log kept in a file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    port: int | None = None
    ready_event: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def ingest(
        cls, services: ServiceUrls, *, bootstrap: str | None = None, **settings: Any
    ) -> CortexxProcess:
        port = free_port()
        env = _env(services, bootstrap=bootstrap, **settings)
        return cls(
            "ingest",
            ["ingest", "--port", str(port)],
            env,
            services.data_dir / f"ingest-{port}.log",
            port=port,
        )

    @classmethod
    def api(cls, services: ServiceUrls, *, bootstrap: str | None = None, **settings: Any) -> CortexxProcess:
        port = free_port()
        env = _env(services, bootstrap=bootstrap, **settings)
        return cls("api", ["api", "--port", str(port)], env, services.data_dir / f"api-{port}.log", port=port)

    @classmethod
    def wuzapi_sim(cls, services: ServiceUrls) -> CortexxProcess:
        port = free_port()
        return cls(
            "wuzapi-sim",
            ["wuzapi-sim", "--port", str(port)],
            _env(services),
            services.data_dir / f"wuzapi-sim-{port}.log",
            port=port,
        )

    @classmethod
    def graph_sim(cls, services: ServiceUrls, *args: str) -> CortexxProcess:
        port = free_port()
        return cls(
            "graph-sim",
            ["graph-sim", "--port", str(port), "--auto", *args],
            _env(services),
            services.data_dir / f"graph-sim-{port}.log",
            port=port,
        )

    @classmethod
    def worker(cls, services: ServiceUrls, **settings: Any) -> CortexxProcess:
        settings.setdefault("worker_metrics_port", free_port())
        env = _env(services, **settings)
        return cls(
            "worker",
            ["worker"],
            env,
            services.data_dir / "worker.log",
            ready_event="worker.partitions_assigned",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready(offset):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def _ready(self, offset: int) -> bool:
        if self.port is not None:
            try:
                return httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200
            except httpx.TransportError:
                return False
        assert self.ready_event is not None
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return f'"{self.ready_event}"'.encode() in log.read()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """kill -9: no chance to commit or clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def _env(services: ServiceUrls, *, bootstrap: str | None = None, **settings: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEXX_")}
    env.update(
        CORTEXX_ENV="test",
        CORTEXX_DATABASE_URL=services.database_url,
        CORTEXX_KAFKA_BOOTSTRAP=bootstrap or services.kafka_bootstrap,
        CORTEXX_DATA_DIR=str(services.data_dir),
        CORTEXX_LOG_LEVEL="info",
        CORTEXX_WUZAPI_URL=services.wuzapi_url,
        CORTEXX_GRAPH_API_URL=services.graph_url,
        CORTEXX_META_ACCESS_TOKEN=META_TOKEN,
    )
    env.update({f"CORTEXX_{k.upper()}": str(v) for k, v in settings.items()})
    return env


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout_s: float = 20.0,
    interval_s: float = 0.1,
    what: str = "condition",
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value {last!r}")


async def http_ok(url: str) -> bool:
    """Whether `url` answers 200 now (a process still starting answers nothing)."""
    try:
        async with httpx.AsyncClient(timeout=1) as client:
            return (await client.get(url)).status_code == 200
    except httpx.TransportError:
        return False


async def post_signed(
    client: httpx.AsyncClient,
    base_url: str,
    tenant: Tenant,
    envelope: Any,
    *,
    request_id: str | None = None,
    secret: str | None = None,
) -> httpx.Response:
    body = envelope if isinstance(envelope, bytes) else orjson.dumps(envelope)
    headers = {
        "X-Hub-Signature-256": sign(body, secret or tenant.app_secret),
        "Content-Type": "application/json",
    }
    if request_id:
        headers["X-Request-Id"] = request_id
    return await client.post(f"{base_url}/webhooks/meta/{tenant.slug}", content=body, headers=headers)


async def started_broker(data_dir: Path, *, partitions: int = 4) -> EmbeddedBroker:
    """A broker of a test's own, its topics declared as `cortexx up` declares them."""
    from infra.kafka.topics import declare_topics

    broker = EmbeddedBroker(data_dir)
    await asyncio.to_thread(broker.start)
    try:
        await declare_topics(broker.bootstrap, partitions=partitions, replication=1)
    except BaseException:
        broker.stop()
        raise
    return broker


async def read_topic(bootstrap: str, topic: str, timeout_s: float = 10.0) -> list[Any]:
    """Every record now on `topic`, read to its end."""
    return await offsets.read_to_end(bootstrap, topic, timeout_s=timeout_s)


@dataclass(frozen=True)
class Delivered:
    """What the gateway really delivered to some chats, read from the simulator's ledger: each
    (chat, body) with the ids it reached the chat under (two ids are two messages to the
    recipient; a resend of one id is one), the deliveries that reached these chats, and the
    ledger's duplicates that involve them. Not a lookup by the ids a test expects: a second send
    under an id nobody expected shows here."""

    chats: frozenset[str]
    ids: dict[tuple[str, str | None], list[str]]  # (chat, body) -> the ids it was delivered under
    deliveries: dict[str, dict[str, Any]]  # gateway id -> the ledger's delivery, if it reached these chats
    duplicates: list[dict[str, Any]]

    @property
    def total(self) -> int:
        """Messages delivered to these chats, all bodies."""
        return sum(len(ids) for ids in self.ids.values())

    def bodies(self, phone: str) -> list[str | None]:
        """What one chat received, a body once per message, in no particular order."""
        chat = chat_of(phone)
        return sorted((body for (c, body), ids in self.ids.items() if c == chat for _ in ids), key=str)

    def assert_once(
        self, expected: Iterable[tuple[str, str | None]] | Mapping[tuple[str, str | None], str]
    ) -> None:
        """Exactly `expected` reached these chats: each (phone, body) delivered once (under the
        gateway id given for it, when `expected` maps them to ids), every id to one chat, no
        duplicates, and nothing else delivered to them."""
        pairs = list(expected)
        want = {(chat_of(phone), body) for phone, body in pairs}
        assert len(want) == len(pairs), f"expected (phone, body) pairs repeat: {pairs}"
        assert self.duplicates == [], f"delivered more than once: {self.duplicates}"
        twice = {key: ids for key, ids in self.ids.items() if len(ids) != 1}
        assert twice == {}, f"(phone, body) delivered under more than one id: {twice}"
        assert set(self.ids) == want, (
            f"missing {sorted(want - set(self.ids), key=str)}, "
            f"unexpected {sorted(set(self.ids) - want, key=str)}"
        )
        assert self.total == len(want), (self.total, len(want))
        reused = {k: d["chats"] for k, d in self.deliveries.items() if d["accepted"] != 1}
        assert reused == {}, f"ids delivered to more than one chat: {reused}"
        if isinstance(expected, Mapping):
            wrong = {
                (phone, body): self.ids[(chat_of(phone), body)]
                for (phone, body), gateway_id in expected.items()
                if self.ids[(chat_of(phone), body)] != [gateway_id]
            }
            assert wrong == {}, f"delivered under another id than its own: {wrong}"


class GraphSim:
    """The Graph API simulator's control API, for a test."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def register(self, **spec: Any) -> dict[str, Any]:
        """A file it serves: {id, sha256 (hex), sha256_b64, file_size, mime_type, url (cdn)}."""
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.post(f"{self.url}/_sim/media", json=spec)
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    async def register_many(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(f"{self.url}/_sim/media", json=specs)
            response.raise_for_status()
            items: list[dict[str, Any]] = response.json()["items"]
            return items

    async def faults(self, **faults: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.put(f"{self.url}/_sim/faults", json=faults)
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    async def ledger(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            result: dict[str, Any] = (await client.get(f"{self.url}/_sim/ledger")).json()
            return result

    async def reset(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            (await client.post(f"{self.url}/_sim/reset")).raise_for_status()


class Simulator:
    """The WUZAPI simulator's control API: faults and the ledger of what it delivered."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def faults(self, **faults: Any) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.put(f"{self.url}/_sim/faults", content=orjson.dumps(faults))
            response.raise_for_status()
            return dict(response.json())

    async def reset(self) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            (await client.post(f"{self.url}/_sim/reset")).raise_for_status()

    async def ledger(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{self.url}/_sim/ledger")
            response.raise_for_status()
            return dict(response.json())

    async def delivered_to(self, phones: Iterable[str]) -> Delivered:
        """What the gateway delivered to these phones' chats, by content, not by expected id."""
        return delivered_to(await self.ledger(), phones)


def delivered_to(ledger: Mapping[str, Any], phones: Iterable[str]) -> Delivered:
    """`Simulator.delivered_to` over a ledger already read."""
    chats = frozenset(chat_of(p) for p in phones)
    ids: dict[tuple[str, str | None], list[str]] = {}
    for content in ledger["contents"]:
        if content["phone"] in chats:
            # One body sent as text and as a caption is still one body to the recipient.
            ids.setdefault((content["phone"], content["body"]), []).extend(content["ids"])
    deliveries = {k: d for k, d in ledger["deliveries"].items() if chats.intersection(d["chats"])}
    duplicates = [
        d
        for d in ledger["duplicates"]
        if (d["kind"] == "id" and chats.intersection(d["chats"])) or d.get("phone") in chats
    ]
    return Delivered(chats, ids, deliveries, duplicates)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in an exposition text (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
