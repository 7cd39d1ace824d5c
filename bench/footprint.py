"""Footprint: resident memory of `cortexx ingest` and `cortexx worker` under a steady load.

A paced (open-loop) load generator (a minimal keep-alive HTTP/1.1 client on uvloop, far cheaper than an HTTP
library, since it shares the 2 cores with what it measures) POSTs fresh signed 1-change webhooks
(a new message id each, from 5,000 contacts) at `--rate` per second for `--duration` seconds (a
slot is dropped, and counted, when all connections are busy: the load never bursts to catch up),
while both processes' RSS is sampled every 5 s (psutil). Targets: under 250 MB each, and no
growth over the last 5 minutes (the least-squares slope over that window, times its length,
under 5 MB). Chart: RSS over time.

    python -m bench.footprint [--duration 600] [--rate 1000]
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from bench.common import (
    RESULTS_DIR,
    BenchServices,
    Child,
    add_setting_option,
    add_tenant,
    argument_parser,
    console,
    percentile,
    print_table,
    running,
    save_result,
    services,
)
from harness.embedded import free_port
from harness.meta_samples import sign, wa_change, wa_envelope
from infra.postgres.tenants import Tenant

TARGET_RSS_MB = 250.0
TARGET_GROWTH_MB = 5.0
# The broker is "flat" when it grew less than this share of its peak over the growth window, and
# spent at most this many points of a core more in the last minute than in the first.
BROKER_FLAT_FRACTION = 0.05
BROKER_FLAT_CPU_POINTS = 10.0
SLUG = "bench-footprint"
TEXTS = (
    "Hi! Is my order on its way?",
    "Can you send me the invoice for last month please?",
    "Thanks, that worked",
    "What time do you open tomorrow?",
    "I'd like to change my delivery address",
)


@dataclass
class Load:
    sent: int = 0
    dropped: int = 0
    ok: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


def body(n: int, rng: random.Random) -> bytes:
    wa_id = f"1555{rng.randrange(5000):07d}"
    message = {
        "from": wa_id,
        "id": f"wamid.footprint{n:012d}",
        "timestamp": str(1_700_000_000 + n // 1000),
        "type": "text",
        "text": {"body": rng.choice(TEXTS)},
    }
    change = wa_change(
        phone_number_id="106540352242922",
        display_phone_number="15550783881",
        messages=[message],
        contacts=[(wa_id, f"Contact {wa_id[-4:]}")],
    )
    return orjson.dumps(wa_envelope([change], waba_id="102290129340398"))


async def _connection(
    port: int, path: str, secret: str, queue: asyncio.Queue[int | None], load: Load, rng: random.Random
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (n := await queue.get()) is not None:
            payload = body(n, rng)
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"X-Hub-Signature-256: {sign(payload, secret)}\r\nContent-Length: {len(payload)}\r\n\r\n"
            )
            started = time.perf_counter()
            writer.write(head.encode() + payload)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            load.latencies_ms.append((time.perf_counter() - started) * 1000)
            if status_line.split(b" ", 2)[1:2] == [b"200"]:
                load.ok += 1
            else:
                load.errors += 1
    finally:
        writer.close()


async def _drive(
    port: int,
    tenant: Tenant,
    pids: dict[str, int],
    *,
    rate: float,
    duration_s: float,
    connections: int,
    interval_s: float,
    postgres_cpu_s: Callable[[], float],
) -> tuple[Load, list[dict[str, Any]]]:
    load = Load()
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=connections * 4)
    rng = random.Random(7)
    path = f"/webhooks/meta/{tenant.slug}"
    workers = [
        asyncio.create_task(_connection(port, path, tenant.app_secret, queue, load, rng))
        for _ in range(connections)
    ]
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    for proc in procs.values():
        proc.cpu_percent(None)  # primes the first interval
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    next_sample = started
    pg_cpu, pg_at = postgres_cpu_s(), started

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=console
    ) as bar:
        task = bar.add_task("steady load", total=duration_s)
        scheduled = 0
        while (now := time.monotonic()) < started + duration_s:
            due = int((now - started) * rate)
            while scheduled < due:
                if queue.full():
                    # The server is behind: these slots are not sent (and not made up later).
                    load.dropped += due - scheduled
                    scheduled = due
                    break
                queue.put_nowait(scheduled)
                scheduled += 1
                load.sent += 1
            if now >= next_sample:
                sample: dict[str, Any] = {
                    "t": round(now - started, 1),
                    "sent": load.sent,
                    "ok": load.ok,
                    "dropped": load.dropped,
                }
                for name, proc in procs.items():
                    sample[f"{name}_rss_mb"] = round(proc.memory_info().rss / 2**20, 1)
                    sample[f"{name}_cpu"] = round(proc.cpu_percent(None))  # % of a core
                # Postgres is a server and its backends: a process tree.
                cpu = postgres_cpu_s()
                sample["postgres_cpu"] = round(100 * (cpu - pg_cpu) / max(now - pg_at, 1e-3))
                pg_cpu, pg_at = cpu, now
                samples.append(sample)
                bar.update(
                    task,
                    completed=now - started,
                    description=" ".join(
                        f"{k} {v}" for k, v in sample.items() if k != "t" and not k.endswith("_cpu")
                    ),
                )
                next_sample += interval_s
            await asyncio.sleep(0.005)
    for _ in workers:
        await queue.put(None)
    await asyncio.gather(*workers, return_exceptions=True)
    return load, samples


def growth_mb(samples: list[dict[str, Any]], key: str, window_s: float) -> float:
    """Least-squares slope of `key` over the last `window_s` seconds, times the window (MB)."""
    end = samples[-1]["t"]
    points = [(s["t"], s[key]) for s in samples if s["t"] >= end - window_s]
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0
    return float(slope * (points[-1][0] - points[0][0]))


def _broker_pid(svc: BenchServices) -> dict[str, int]:
    # The embedded broker's CPU and memory are reported beside ours: it shares the two cores, and
    # the earlier broker's cost grew with what it kept (BENCHMARKS.md, Footprint).
    return {"broker": svc.broker.proc.pid} if svc.broker.proc is not None else {}


def run(
    duration_s: float = 600.0,
    *,
    rate: float = 1000.0,
    connections: int = 64,
    worker_settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    import uvloop

    with services("footprint") as svc:
        tenant = asyncio.run(add_tenant(svc.database_url, SLUG, agents=2))
        port = free_port()
        ingest = Child.cortexx("ingest", ["ingest", "--port", str(port)], svc.env(), svc.data_dir, port=port)
        worker = Child.cortexx(
            "worker",
            ["worker"],
            svc.env(**(worker_settings or {})),
            svc.data_dir,
            ready_line='"worker.partitions_assigned"',
        )
        with running(ingest, worker):
            load, samples = uvloop.run(
                _drive(
                    port,
                    tenant,
                    {"ingest": ingest.pid, "worker": worker.pid, **_broker_pid(svc)},
                    postgres_cpu_s=svc.postgres_cpu_s,
                    rate=rate,
                    duration_s=duration_s,
                    connections=connections,
                    interval_s=5.0,
                )
            )
    window = min(300.0, duration_s / 2)
    report: dict[str, Any] = {
        "duration_s": duration_s,
        "rate_target": rate,
        "rate_achieved": round(load.ok / duration_s, 1),
        "errors": load.errors,
        "dropped": load.dropped,
        "latency_p50_ms": round(percentile(load.latencies_ms, 50), 2),
        "latency_p99_ms": round(percentile(load.latencies_ms, 99), 2),
        "window_s": window,
        "samples": samples,
    }
    rows = []
    met = True
    first, last = _cpu_means(samples, 60.0, first=True), _cpu_means(samples, 60.0, first=False)
    for name in ("ingest", "worker", "broker"):
        key = f"{name}_rss_mb"
        if key not in samples[-1]:
            continue
        peak = max(s[key] for s in samples)
        grown = growth_mb(samples, key, window)
        if name == "broker":
            # Not ours, and a JVM that grows its heap to its bound: judged flat, not by our 250 MB.
            ok = grown < BROKER_FLAT_FRACTION * peak and last[name] <= first[name] + BROKER_FLAT_CPU_POINTS
            verdict = "flat" if ok else "GROWS"
        else:
            ok = peak < TARGET_RSS_MB and grown < TARGET_GROWTH_MB
            verdict = "MET" if ok else "MISSED"
        met = met and ok
        report[name] = {"peak_mb": peak, "last_mb": samples[-1][key], "growth_mb": round(grown, 2), "met": ok}
        rows.append(
            (
                name,
                samples[0][key],
                peak,
                samples[-1][key],
                grown,
                f"{first[name]:.0f} -> {last[name]:.0f}",
                verdict,
            )
        )
    print_table(
        f"footprint: {duration_s:.0f} s at {rate:.0f} webhooks/s (achieved {report['rate_achieved']}/s, "
        f"{load.errors} errors, {load.dropped:,} slots dropped while the server was behind)",
        [
            "process",
            "first MB",
            "peak MB",
            "last MB",
            f"growth MB (last {window:.0f} s)",
            "CPU % first -> last min",
            "target",
        ],
        rows,
    )
    report["target_met"] = met
    report["cpu_first_minute"], report["cpu_last_minute"] = first, last
    per_webhook = _cpu_us_per_webhook(samples, report["rate_achieved"])
    report["cpu_us_per_webhook"] = per_webhook
    print_table(
        "CPU per webhook, end to end (mean over the run after the first minute)",
        ["process", "µs of CPU per webhook"],
        [*per_webhook.items()],
    )
    console.print(
        "CPU, % of a core, first minute -> last minute: "
        + ", ".join(f"{name} {first[name]:.0f} -> {last[name]:.0f}" for name in first)
    )
    report["chart"] = str(chart(samples, window))
    path = save_result("footprint", report)
    console.print(f"results appended to {path}; chart {report['chart']}")
    return report


def _cpu_us_per_webhook(samples: list[dict[str, Any]], rate: float) -> dict[str, float]:
    """Each process's CPU per webhook at the achieved rate: the mean % of a core over the run
    (after its first minute, which holds the start) times 10,000 µs, over webhooks per second."""
    steady = [s for s in samples if s["t"] > 60.0] or samples[1:]
    names = [k.removesuffix("_cpu") for k in samples[-1] if k.endswith("_cpu")]
    out = {
        n: round(sum(s[f"{n}_cpu"] for s in steady) / len(steady) * 10_000 / max(rate, 1e-9), 1)
        for n in names
    }
    out["total"] = round(sum(out.values()), 1)
    return out


def _cpu_means(samples: list[dict[str, Any]], span_s: float, *, first: bool) -> dict[str, float]:
    """Mean CPU (% of a core) of each process over the first or the last `span_s` seconds."""
    end = samples[-1]["t"]
    inside = [s for s in samples[1:] if (s["t"] <= span_s if first else s["t"] >= end - span_s)]
    names = [k.removesuffix("_cpu") for k in samples[-1] if k.endswith("_cpu")]
    return {n: round(sum(s[f"{n}_cpu"] for s in inside) / max(1, len(inside)), 1) for n in names}


def chart(samples: list[dict[str, Any]], window_s: float, path: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or RESULTS_DIR / "footprint.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, cpu) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    minutes = [s["t"] / 60 for s in samples]
    colors = {"ingest": "tab:blue", "worker": "tab:orange", "broker": "tab:green", "postgres": "tab:purple"}
    for name in ("ingest", "worker", "broker"):
        if f"{name}_rss_mb" in samples[-1]:
            label = f"cortexx {name}" if name != "broker" else "embedded Kafka broker"
            ax.plot(minutes, [s[f"{name}_rss_mb"] for s in samples], color=colors[name], label=label)
    for name, color in colors.items():
        if f"{name}_cpu" in samples[-1]:
            cpu.plot(minutes[1:], [s[f"{name}_cpu"] for s in samples[1:]], color=color, label=name)
    ax.axhline(
        TARGET_RSS_MB,
        color="tab:red",
        linewidth=0.8,
        linestyle="--",
        label="target 250 MB (cortexx processes)",
    )
    end = minutes[-1]
    ax.axvspan(end - window_s / 60, end, color="tab:gray", alpha=0.12, label="growth window")
    ax.set_ylabel("RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Resident memory and CPU under a steady webhook load")
    cpu.set_xlabel("minutes under load")
    cpu.set_ylabel("CPU (% of a core)")
    cpu.set_ylim(bottom=0)
    cpu.grid(True, alpha=0.3)
    cpu.legend(loc="upper right", ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds under load (default 10 min)")
    parser.add_argument("--rate", type=float, default=1000.0, help="webhooks per second")
    parser.add_argument("--connections", type=int, default=64)
    add_setting_option(parser, "a worker setting, e.g. worker_batch_idle_ms=250")
    args = parser.parse_args(argv)
    run(args.duration, rate=args.rate, connections=args.connections, worker_settings=dict(args.setting))


if __name__ == "__main__":
    main()
