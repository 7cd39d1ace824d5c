"""Media: the media agent's path (Graph API lookup, streamed download checked for size and
SHA-256, streamed into the media store, the row marked stored) against a plain streamed download
of the same files (lookup, then the bytes written to a file on the same disk: no hashing, no
store, no database), at the same concurrency, in interleaved rounds of one run.

Files come from the Graph API simulator, a child process (its CPU is not this process's). For
each round: files per second, MB/s, this process's CPU per file, and its peak RSS growth while
the round ran (psutil, sampled every 20 ms): the store streams, so memory should stay far below
the file size whatever it is.

    python -m bench.media [--files 16] [--size-mb 32] [--concurrency 4] [--rounds 2]
    python -m bench.media --files 400 --size-mb 0.1     # small files: the per-file cost
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import ROOT, add_tenant, argument_parser, console, print_table, save_result, services
from harness.embedded import free_port
from infra.postgres.db import create_pool
from infra.storage import MediaStore
from processors.media import GraphMedia, MediaFetcher
from processors.webhooks import RawRecord
from schemas.media import MediaJob

TOKEN = "bench-token"


class _NoDeadLetters:
    """Nothing fails in this benchmark: a dead letter would be a fault of the run."""

    async def write(self, topic: str, letter: Any) -> None:
        raise RuntimeError(f"unexpected dead letter on {topic}: {letter.error}")


class _Peak:
    """This process's peak RSS above where it started, sampled every 20 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            await asyncio.sleep(0.02)

    def __enter__(self) -> _Peak:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def growth_mb(self) -> float:
        return float(self.peak - self.base) / 2**20


async def _ours(fetcher: MediaFetcher, pool: Any, company: Any, files: list[dict[str, Any]]) -> None:
    jobs: list[RawRecord] = []
    for f in files:
        media_id = uuid.uuid4()
        external = f"wamid.bench-{media_id.hex}"
        await pool.execute(
            "INSERT INTO media (id, company_id, message_external_id, direction, source, source_ref, kind,"
            " mime_type, expected_sha256) VALUES ($1, $2, $3, 'inbound', 'whatsapp', $4, 'video', $5, $6)",
            media_id,
            company.id,
            external,
            f["id"],
            f["mime_type"],
            f["sha256"],
        )
        job = MediaJob(
            str(media_id),
            company.slug,
            company.id,
            external,
            "whatsapp",
            f["id"],
            "video",
            int(time.time() * 1000),
            f["mime_type"],
            f["sha256"],
        )
        jobs.append(RawRecord("meta.media", 0, len(jobs), job.key, job.to_bytes(), []))
    await asyncio.gather(*(fetcher.handle(raw) for raw in jobs))
    stored = await pool.fetchval(
        "SELECT count(*) FROM media WHERE company_id = $1 AND state = 'stored' AND id = ANY($2::uuid[])",
        company.id,
        [uuid.UUID(MediaJob.from_bytes(r.value).media_id) for r in jobs],
    )
    if stored != len(jobs):
        raise RuntimeError(f"only {stored} of {len(jobs)} files stored")


async def _bare(graph_url: str, files: list[dict[str, Any]], concurrency: int, out: Path) -> None:
    slots = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(f: dict[str, Any]) -> None:
            async with slots:
                found = (await client.get(f"{graph_url}/v23.0/{f['id']}", headers=headers)).json()
                path = out / uuid.uuid4().hex
                async with client.stream("GET", found["url"], headers=headers) as response:
                    # Plain blocking writes, as a plain client makes them (ours go through obstore).
                    with open(path, "wb") as sink:  # noqa: ASYNC230
                        async for chunk in response.aiter_bytes(256 * 1024):
                            sink.write(chunk)
                path.unlink()

        await asyncio.gather(*(one(f) for f in files))


def run(files_n: int, size_mb: float, concurrency: int, rounds: int) -> dict[str, Any]:
    with services("media") as svc:
        port = free_port()
        sim = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "graph-sim", "--port", str(port), "--token", TOKEN],
            cwd=ROOT,
            env={**os.environ, "CORTEXX_LOG_LEVEL": "warning"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        graph_url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx.get(f"{graph_url}/health", timeout=0.5).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            size = int(size_mb * 2**20)
            registered = httpx.post(
                f"{graph_url}/_sim/media",
                json=[{"mime_type": "video/mp4", "size": size} for _ in range(files_n)],
                timeout=120,
            ).json()["items"]
            rows = asyncio.run(
                _rounds(svc.database_url, svc.data_dir, graph_url, registered, concurrency, rounds)
            )
        finally:
            sim.terminate()
            sim.wait(10)
    ours = [r for r in rows if r["path"] == "ours"]
    bare = [r for r in rows if r["path"] == "bare"]
    summary: dict[str, Any] = {
        "files": files_n,
        "size_mb": size_mb,
        "concurrency": concurrency,
        "rounds": rows,
        "ours_files_per_s": statistics.median(r["files_per_s"] for r in ours),
        "bare_files_per_s": statistics.median(r["files_per_s"] for r in bare),
        "ours_rss_growth_mb": max(r["rss_growth_mb"] for r in ours),
        "bare_rss_growth_mb": max(r["rss_growth_mb"] for r in bare),
    }
    summary["ratio"] = summary["ours_files_per_s"] / summary["bare_files_per_s"]
    return summary


async def _rounds(
    database_url: str,
    data_dir: Path,
    graph_url: str,
    registered: list[dict[str, Any]],
    concurrency: int,
    rounds: int,
) -> list[dict[str, Any]]:
    files_n = len(registered)
    size = int(registered[0]["file_size"])
    company = await add_tenant(database_url, "media-bench", agents=0)
    pool = await create_pool(database_url, min_size=1, max_size=4)
    store = MediaStore.from_url((data_dir / "media").as_uri())
    graph = GraphMedia(graph_url, "v23.0", connect_timeout_s=3, lookup_timeout_s=10, read_timeout_s=30)
    fetcher = MediaFetcher(
        pool,
        graph,
        store,
        _NoDeadLetters(),  # type: ignore[arg-type]
        default_token=TOKEN,
        max_bytes=2**31,
        concurrency=concurrency,
        max_attempts=1,
        backoff_initial_s=0.1,
        backoff_max_s=0.1,
        download_max_s=600,
        breaker_fail_max=5,
        breaker_reset_s=5,
    )
    bare_dir = data_dir / "bare"
    bare_dir.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for n in range(rounds):
            for name in ("ours", "bare"):
                cpu = psutil.Process().cpu_times()
                started = time.perf_counter()
                with _Peak() as peak:
                    if name == "ours":
                        await _ours(fetcher, pool, company, registered)
                    else:
                        await _bare(graph_url, registered, concurrency, bare_dir)
                wall = time.perf_counter() - started
                after = psutil.Process().cpu_times()
                cpu_s = (after.user - cpu.user) + (after.system - cpu.system)
                rows.append(
                    {
                        "round": n + 1,
                        "path": name,
                        "files_per_s": files_n / wall,
                        "mb_per_s": files_n * size / 2**20 / wall,
                        "cpu_ms_per_file": 1000 * cpu_s / files_n,
                        "rss_growth_mb": peak.growth_mb,
                    }
                )
                console.print(rows[-1])
    finally:
        await graph.close()
        await store.close()
        await pool.close()
    return rows


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--size-mb", type=float, default=32.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print_run(run(args.files, args.size_mb, args.concurrency, args.rounds))


def print_run(result: dict[str, Any]) -> None:
    print_table(
        f"media path against a plain streamed download: {result['files']} files of {result['size_mb']} MB, "
        f"{result['concurrency']} at a time",
        ["round", "path", "files/s", "MB/s", "CPU ms/file", "peak RSS growth MB"],
        [
            [r["round"], r["path"], r["files_per_s"], r["mb_per_s"], r["cpu_ms_per_file"], r["rss_growth_mb"]]
            for r in result["rounds"]
        ],
    )
    console.print(
        f"ours/bare (median files/s): {result['ratio']:.2f}; peak RSS growth: ours "
        f"{result['ours_rss_growth_mb']:.1f} MB, bare {result['bare_rss_growth_mb']:.1f} MB"
    )
    path = save_result("media", result)
    console.print(f"saved to {path}")


if __name__ == "__main__":
    main()
