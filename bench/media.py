"""Media: the media agent's path against a plain streamed download of the same files, in
interleaved rounds of one run (ours, bare, ours, bare, ...), at the same concurrency.

Ours is `MediaFetcher.handle` as the worker runs it: the row's state read from Postgres, the
Graph API lookup, the download streamed through the size and SHA-256 checks into the media store
(local disk in the bench's temp dir, or `--store s3` on moto's server), the row marked stored.
The bare path, a plain download, asks the same lookup, then streams the URL (bearer token,
httpx `aiter_bytes`) into a file on the same disk: no hashing, no store, no database.
Rows are inserted before a round's clock starts; afterwards every row must be stored with the
simulator's SHA-256 and size, and the objects and files are deleted outside the clock.

Files come from the Graph API simulator, a child process (its CPU is not this process's). Per
round: files/s, MB/s, this process's CPU per file, and its peak RSS growth during the round
(psutil, sampled every 50 ms); then the medians and the ours/bare ratios.

    python -m bench.media [--files 24] [--size-mb 50] [--concurrency 4] [--rounds 3] [--store local|s3]
    python -m bench.media --files 500 --size-mb 0.2     # small files: the per-file cost
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
import psutil

from bench.common import (
    BenchError,
    BenchServices,
    Child,
    add_tenant,
    argument_parser,
    console,
    print_table,
    running,
    save_result,
    services,
)
from harness.embedded import free_port
from harness.s3_server import S3Server
from infra.postgres.db import create_pool
from infra.postgres.tenants import Tenant
from infra.storage import MediaStore
from processors.media import CHUNK, GraphMedia, MediaFetcher
from processors.webhooks import RawRecord
from schemas.deadletter import DeadLetter
from schemas.media import MediaJob

TOKEN = "bench-token"
VERSION = "v23.0"
SAMPLE_S = 0.05
Store = Literal["local", "s3"]

INSERT_MEDIA = """
INSERT INTO media (id, company_id, message_external_id, direction, source, source_ref, kind,
                   mime_type, expected_sha256)
VALUES ($1, $2, $3, 'inbound', 'whatsapp', $4, 'video', $5, $6)
"""

STORED_ROWS = """
SELECT id, state, sha256, size_bytes, storage_key FROM media WHERE id = ANY($1::uuid[])
"""


class _NoDeadLetters:
    """Nothing fails in this benchmark, so nothing is dead-lettered: a letter is a fault of the run."""

    async def write(self, topic: str, letter: DeadLetter) -> None:
        raise BenchError(f"unexpected dead letter on {topic}: {letter.error}")


class _PeakRss:
    """This process's peak RSS above its RSS at the start, sampled every 50 ms by a task."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._proc.memory_info().rss)
            await asyncio.sleep(SAMPLE_S)

    async def __aenter__(self) -> _PeakRss:
        self._task = asyncio.create_task(self._sample(), name="rss-sampler")
        await asyncio.sleep(0)  # the first sample before the work starts
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self._task.cancel()

    @property
    def growth_mb(self) -> float:
        return float(self.peak - self.base) / 1e6


@dataclass(frozen=True, slots=True)
class SimFile:
    """A file the simulator serves (what `POST /_sim/media` answered)."""

    id: str
    sha256: str  # hex
    size: int
    mime_type: str


@dataclass(frozen=True, slots=True)
class Round:
    round: int
    path: str  # "ours" or "bare"
    seconds: float
    files_per_s: float
    mb_per_s: float
    cpu_ms_per_file: float
    rss_growth_mb: float


def _cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


async def _timed(n: int, path: str, files: list[SimFile], work: Any) -> Round:
    cpu = _cpu_s()
    started = time.perf_counter()
    async with _PeakRss() as rss:
        await work
    wall = time.perf_counter() - started
    cpu_s = _cpu_s() - cpu
    total = sum(f.size for f in files)
    return Round(
        n, path, wall, len(files) / wall, total / 1e6 / wall, 1000 * cpu_s / len(files), rss.growth_mb
    )


# --------------------------------------------------------------------------- ours


async def _jobs(pool: Any, company: Tenant, files: list[SimFile]) -> list[RawRecord]:
    """One pending row per file (as the webhook writer makes them) and its job's record."""
    records: list[RawRecord] = []
    sent_ms = int(time.time() * 1000)
    for i, f in enumerate(files):
        media_id = uuid.uuid4()
        external = f"wamid.bench-{media_id.hex}"
        await pool.execute(INSERT_MEDIA, media_id, company.id, external, f.id, f.mime_type, f.sha256)
        job = MediaJob(
            media_id=str(media_id),
            tenant=company.slug,
            company_id=company.id,
            message_external_id=external,
            source="whatsapp",
            ref=f.id,
            kind="video",
            sent_at_ms=sent_ms,
            mime_type=f.mime_type,
        )
        records.append(RawRecord("meta.media", 0, i, job.key, job.to_bytes(), []))
    return records


async def _verify(pool: Any, store: MediaStore, records: list[RawRecord], files: list[SimFile]) -> None:
    """Every row stored with the simulator's SHA-256 and size, its object that size; then the
    objects deleted (outside the clock) so that rounds do not fill the disk."""
    ids = [uuid.UUID(MediaJob.from_bytes(r.value).media_id) for r in records]
    rows = {row["id"]: row for row in await pool.fetch(STORED_ROWS, ids)}
    for media_id, f in zip(ids, files, strict=True):
        row = rows.get(media_id)
        if row is None or row["state"] != "stored":
            raise BenchError(f"media {media_id} not stored: {dict(row) if row else 'no row'}")
        if row["sha256"] != f.sha256 or row["size_bytes"] != f.size:
            raise BenchError(
                f"media {media_id}: stored {row['sha256']} {row['size_bytes']}, sim {f.sha256} {f.size}"
            )
        if await store.size(row["storage_key"]) != f.size:
            raise BenchError(f"media {media_id}: the stored object is not {f.size} bytes")
        await store.delete(row["storage_key"])


# --------------------------------------------------------------------------- the plain download


async def _plain(graph_url: str, files: list[SimFile], concurrency: int, out: Path) -> None:
    slots = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=60, follow_redirects=True) as client:

        async def one(f: SimFile) -> None:
            async with slots:
                found = await client.get(f"{graph_url}/{VERSION}/{f.id}", headers=headers)
                found.raise_for_status()
                async with client.stream("GET", found.json()["url"], headers=headers) as response:
                    response.raise_for_status()
                    # Plain blocking writes, as a plain client makes them (ours go through obstore).
                    with open(out / uuid.uuid4().hex, "wb") as sink:  # noqa: ASYNC230
                        async for chunk in response.aiter_bytes(CHUNK):
                            sink.write(chunk)

        await asyncio.gather(*(one(f) for f in files))


def _check_and_clear(out: Path, files: list[SimFile]) -> None:
    written = list(out.iterdir())
    if len(written) != len(files) or {p.stat().st_size for p in written} != {f.size for f in files}:
        raise BenchError(f"the plain download wrote {len(written)} files, not {len(files)} of the right size")
    for p in written:
        p.unlink()


# --------------------------------------------------------------------------- the run


def _register(graph_url: str, files: int, size: int) -> list[SimFile]:
    answer = httpx.post(
        f"{graph_url}/_sim/media",
        json=[{"mime_type": "video/mp4", "size": size} for _ in range(files)],
        timeout=300,
    )
    answer.raise_for_status()
    doc = answer.json()
    items = doc["items"] if isinstance(doc, dict) else doc
    return [SimFile(i["id"], i["sha256"], int(i["file_size"]), i["mime_type"]) for i in items]


def run(
    files: int = 24, size_mb: float = 50.0, concurrency: int = 4, rounds: int = 3, *, store: Store = "local"
) -> dict[str, Any]:
    """Measure `rounds` interleaved rounds; the result as saved to bench/results/media.json."""
    size = int(size_mb * 1e6)
    with services("media") as svc:
        port = free_port()
        sim = Child.cortexx(
            "graph-sim",
            ["graph-sim", "--port", str(port), "--any-token"],
            {**svc.env(), "CORTEXX_LOG_LEVEL": "warning"},
            svc.data_dir,
            port=port,
        )
        with running(sim), contextlib.ExitStack() as stack:
            registered = _register(sim.url, files, size)
            media_store = _media_store(stack, store, svc.data_dir)
            measured = asyncio.run(_rounds(svc, sim.url, media_store, registered, concurrency, rounds))
    return _summary(measured, files=files, size_mb=size_mb, concurrency=concurrency, store=store)


def _media_store(stack: contextlib.ExitStack, store: Store, data_dir: Path) -> MediaStore:
    """The store the run puts files in: a directory, or a bucket on moto's server (stopped by
    `stack`)."""
    if store == "local":
        return MediaStore.from_url((data_dir / "media").as_uri())
    s3 = stack.enter_context(S3Server(data_dir / "s3"))
    s3.create_bucket("media-bench")
    return MediaStore.from_url(
        "s3://media-bench",
        endpoint=s3.endpoint,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
    )


async def _rounds(
    svc: BenchServices,
    graph_url: str,
    store: MediaStore,
    files: list[SimFile],
    concurrency: int,
    rounds: int,
) -> list[Round]:
    company = await add_tenant(svc.database_url, "media-bench", agents=0)
    pool = await create_pool(svc.database_url, min_size=1, max_size=concurrency + 2)
    graph = GraphMedia(graph_url, VERSION, connect_timeout_s=3, lookup_timeout_s=10, read_timeout_s=60)
    fetcher = MediaFetcher(
        pool,
        graph,
        store,
        _NoDeadLetters(),  # type: ignore[arg-type]
        default_token=TOKEN,
        max_bytes=2**40,
        concurrency=concurrency,
        max_attempts=1,
        backoff_initial_s=0.1,
        backoff_max_s=0.1,
        download_max_s=3600,
        breaker_fail_max=5,
        breaker_reset_s=5,
    )
    plain_dir = svc.data_dir / "bare"
    plain_dir.mkdir(exist_ok=True)
    measured: list[Round] = []
    try:
        # One untimed pass of each on a few files: connections, imports and buffers warmed.
        warm = files[:concurrency]
        records = await _jobs(pool, company, warm)
        await asyncio.gather(*(fetcher.handle(r) for r in records))
        await _verify(pool, store, records, warm)
        await _plain(graph_url, warm, concurrency, plain_dir)
        _check_and_clear(plain_dir, warm)
        for n in range(1, rounds + 1):
            records = await _jobs(pool, company, files)
            ours = await _timed(n, "ours", files, asyncio.gather(*(fetcher.handle(r) for r in records)))
            await _verify(pool, store, records, files)
            bare = await _timed(n, "bare", files, _plain(graph_url, files, concurrency, plain_dir))
            _check_and_clear(plain_dir, files)
            for r in (ours, bare):
                measured.append(r)
                console.print(
                    f"round {n} {r.path}: {r.files_per_s:.2f} files/s, {r.mb_per_s:.0f} MB/s, "
                    f"{r.cpu_ms_per_file:.1f} ms CPU/file, +{r.rss_growth_mb:.1f} MB RSS"
                )
    finally:
        await graph.close()
        await store.close()
        await pool.close()
    return measured


def _summary(measured: list[Round], **config: Any) -> dict[str, Any]:
    def median(path: str, field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in measured if r.path == path))

    fields = ("files_per_s", "mb_per_s", "cpu_ms_per_file", "rss_growth_mb")
    medians = {path: {f: median(path, f) for f in fields} for path in ("ours", "bare")}
    pairs = list(zip(measured[0::2], measured[1::2], strict=True))
    return {
        **config,
        "rounds": [asdict(r) for r in measured],
        "median": medians,
        "ratio_files_per_s": [o.files_per_s / p.files_per_s for o, p in pairs],
        "ratio_cpu_per_file": [o.cpu_ms_per_file / p.cpu_ms_per_file for o, p in pairs],
        "median_ratio_files_per_s": statistics.median(o.files_per_s / p.files_per_s for o, p in pairs),
        "median_ratio_cpu_per_file": statistics.median(
            o.cpu_ms_per_file / p.cpu_ms_per_file for o, p in pairs
        ),
        "max_rss_growth_mb": {
            path: max(r.rss_growth_mb for r in measured if r.path == path) for path in ("ours", "bare")
        },
    }


def print_run(result: dict[str, Any]) -> None:
    """Print the rounds, the medians and the ratios; append the run to bench/results/media.json."""
    title = (
        f"media: {result['files']} files of {result['size_mb']} MB, {result['concurrency']} at a time, "
        f"store {result['store']}; ours vs a plain streamed download"
    )
    columns = ["round", "path", "files/s", "MB/s", "CPU ms/file", "peak RSS growth MB", "ours/bare files/s"]
    rows: list[list[Any]] = []
    for i, r in enumerate(result["rounds"]):
        ratio = result["ratio_files_per_s"][i // 2] if r["path"] == "ours" else None
        rows.append(
            [
                r["round"],
                r["path"],
                r["files_per_s"],
                r["mb_per_s"],
                r["cpu_ms_per_file"],
                r["rss_growth_mb"],
                ratio,
            ]
        )
    for path in ("ours", "bare"):
        m = result["median"][path]
        ratio = result["median_ratio_files_per_s"] if path == "ours" else None
        rows.append(
            ["median", path, m["files_per_s"], m["mb_per_s"], m["cpu_ms_per_file"], m["rss_growth_mb"], ratio]
        )
    print_table(title, columns, rows)
    console.print(
        f"ours/bare: files/s {result['median_ratio_files_per_s']:.2f}, CPU per file "
        f"{result['median_ratio_cpu_per_file']:.2f} (medians of the rounds)"
    )
    saved = save_result("media", result)
    console.print(f"saved to {saved}")


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--files", type=int, default=24, help="files per round")
    parser.add_argument("--size-mb", type=float, default=50.0, help="size of each file, MB (10^6 bytes)")
    parser.add_argument("--concurrency", type=int, default=4, help="downloads at once, both paths")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ours then the plain download")
    parser.add_argument("--store", choices=("local", "s3"), default="local", help="the media store")
    args = parser.parse_args()
    print_run(run(args.files, args.size_mb, args.concurrency, args.rounds, store=args.store))


if __name__ == "__main__":
    main()
