"""Worker: webhooks/s from `meta.webhooks` to committed Postgres rows, against two baselines.

A seeded backlog of N mixed records (WhatsApp messages of every type and their statuses out of
order, Messenger and Instagram messages, other fields, 10% redelivered envelopes; several
companies with two agents each) is produced once, in ingest's record format
(`ingest.envelope.split_envelope` over `harness.meta_samples.build_plan` envelopes). Then each
consumer reads the whole backlog in its own consumer group, on the same broker and database:

- `faust-bare take(2000)` and `faust-bare noack_take(500)`: a Faust agent that only decodes each
  record (bench/faust_bare.py): Faust's ceiling, the first with the issue's `take(2000)`, the
  second with the worker's own stream usage;
- `faust-bare take(2000) uvloop`: the same on uvloop, as the worker runs;
- `cortexx worker x1` and `x2`: the real worker process(es) (uvloop, `processors.writer`, writes
  written while Faust fetches and buffers the next one), until every row is committed; and x1
  with writes overlapped with gathering the next batch, and on the asyncio loop, to price both
  settings;
- `hand store`: aiokafka + asyncpg loop running the worker's writer record by record
  (processors.writer, a batch of one each): the price of not batching;
- `hand sets`: the same loop with the worker's writer over whole batches (processors.writer) and
  overlapped batches: the machine's ceiling without Faust.

The database is emptied before each writing run, and the rows each one leaves are compared.
Rates are records/s from the first committed batch to the last (join and start-up excluded).
Each run reports the CPU its consumers, Postgres and the broker spent per record.
Targets: worker x1 >= 85% of the bare Faust agent; two workers split the partitions between them
and leave exactly the rows one worker leaves (nothing doubled, nothing lost). Their x2 / x1
throughput is reported, not judged: two cores shared with Postgres and the broker cannot show it.

    python -m bench.worker [--records 100000] [--profile] [--variants]
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bench.common import (
    PARTITIONS,
    BenchError,
    BenchServices,
    Child,
    Profile,
    add_setting_option,
    add_tenant,
    argument_parser,
    console,
    keep_profile,
    print_profile,
    print_table,
    py_spy_available,
    save_result,
    services,
    summarize_profile,
    tree_cpu_s,
)
from harness.embedded import EmbeddedBroker
from harness.meta_samples import build_plan
from infra.kafka.topics import META_WEBHOOKS, declare_topics
from infra.postgres.db import connect
from ingest.envelope import split_envelope

TENANTS = ("bench-a", "bench-b", "bench-c", "bench-d")
TARGET_OF_BARE = 0.85
OVERLAPPED = "cortexx worker x1, writes overlapped with the next take"
ASYNCIO_LOOP = "cortexx worker x1, asyncio loop (not uvloop)"
LIVE_BARE_X1 = "faust-bare take(2000) x1, joined before the load"
LIVE_BARE_X2 = "faust-bare take(2000) x2, joined before the load"
LIVE_X1 = "cortexx worker x1, joined before the load"
LIVE_X2 = "cortexx worker x2, joined before the load"

TRUNCATE = """
TRUNCATE notifications, auto_replies, messages, conversations, contacts, webhook_events
RESTART IDENTITY CASCADE
"""

# As an agent sees them: contacts and conversations folded into others (one user known by two
# ids, found out in whatever batch the order of the stream makes) are left out.
SNAPSHOT = """
SELECT (SELECT count(*) FROM contacts WHERE deleted_at IS NULL) AS contacts,
       (SELECT count(*) FROM conversations WHERE deleted_at IS NULL) AS conversations,
       (SELECT count(*) FROM messages) AS messages,
       (SELECT count(*) FROM messages WHERE status = 'received') AS received,
       (SELECT count(*) FROM messages WHERE status = 'sent') AS sent,
       (SELECT count(*) FROM messages WHERE status = 'delivered') AS delivered,
       (SELECT count(*) FROM messages WHERE status = 'read') AS read,
       (SELECT count(*) FROM messages WHERE status = 'failed') AS failed,
       (SELECT count(*) FROM notifications) AS notifications,
       (SELECT count(*) FROM webhook_events) AS events,
       (SELECT coalesce(sum(unread_count), 0) FROM conversations WHERE deleted_at IS NULL) AS unread,
       (SELECT count(*) FROM conversations c JOIN messages m ON m.id = c.last_message_id
         WHERE c.deleted_at IS NULL) AS last_set
"""


# --------------------------------------------------------------------------- the backlog


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def generate(n: int, seed: int = 42) -> list[tuple[bytes, bytes]]:
    """N topic records (key, value) exactly as ingest produces them, from seeded plans."""
    records: list[tuple[bytes, bytes]] = []
    chunk = 0
    with _progress() as progress:
        task = progress.add_task("generating webhooks", total=n)
        while len(records) < n:
            tenant = TENANTS[chunk % len(TENANTS)]
            plan = build_plan(
                seed=seed * 100_003 + chunk,
                contacts=100,
                messages_per_contact=10,
                phone_number_id=f"1065403522{chunk:05d}",
                display_phone_number=f"1555{chunk:07d}",
                waba_id=f"1022901293{chunk:05d}",
                page_id=f"1122334455{chunk:05d}",
                start_ts=1_700_000_000 + chunk * 86_400,
            )
            for i, envelope in enumerate(plan.webhooks):
                records.extend(
                    split_envelope(
                        envelope,
                        tenant=tenant,
                        request_id=f"bench-{seed}-{chunk}-{i}",
                        received_at_ms=1_700_000_000_000 + chunk * 86_400_000 + i,
                    )
                )
            progress.update(task, completed=min(n, len(records)))
            chunk += 1
    return records[:n]


async def produce(bootstrap: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
        enable_idempotence=False,
    )
    await producer.start()
    try:
        with _progress() as progress:
            task = progress.add_task(f"producing to {META_WEBHOOKS}", total=len(records))
            for start in range(0, len(records), 5000):
                chunk = records[start : start + 5000]
                futures = [await producer.send(META_WEBHOOKS, value, key=key) for key, value in chunk]
                await asyncio.gather(*futures)
                progress.update(task, advance=len(chunk))
    finally:
        await producer.stop()


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    name: str
    kind: str  # "bare" | "worker" | "hand"
    records: int = 0
    measured: int = 0  # the records of the timed window (those after the feed, in a fed run)
    seconds: float = 0.0
    rate: float = 0.0
    cpu_s: float = 0.0
    pg_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    batches: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    stalled: bool = False
    split: str = ""  # meta.webhooks partitions held by each process, e.g. "2+2"

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "records": self.records,
            "measured": self.measured,
            "seconds": round(self.seconds, 2),
            "rate": round(self.rate, 1),
            "cpu_s": round(self.cpu_s, 2),
            "pg_cpu_s": round(self.pg_cpu_s, 2),
            "broker_cpu_s": round(self.broker_cpu_s, 2),
            "batches": self.batches,
            "stalled": self.stalled,
            "split": self.split,
            "rows": self.rows,
            "profile": self.profile,
        }


def _batches(child: Child) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []
    for line in child.log_lines():
        event = line.get("event")
        if event == "bench.batch":
            out.append((float(line["t"]), int(line["records"])))
        elif event == "webhooks.batch_stored":
            at = datetime.fromisoformat(str(line["timestamp"])).timestamp()
            out.append((at, int(line["records"])))
    return out


def _assignments(child: Child) -> set[int] | None:
    """The `meta.webhooks` partitions of a worker's latest assignment (None before the first)."""
    latest: set[int] | None = None
    for line in child.log_lines():
        if line.get("event") == "worker.partitions_assigned":
            latest = {
                int(tp.rsplit(":", 1)[1])
                for tp in line.get("partitions", [])
                if tp.startswith(META_WEBHOOKS + ":")
            }
    return latest


def wait_settled(children: list[Child], partitions: int, timeout_s: float = 120.0) -> list[set[int]]:
    """Until the group has settled: every worker holds partitions, together all, none twice.
    Returns what each holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = [_assignments(c) for c in children]
        owned = [h for h in held if h]
        if len(owned) == len(children) and sum(map(len, owned)) == partitions == len(set().union(*owned)):
            time.sleep(1.0)  # a last rebalance may still be under way
            if [_assignments(c) for c in children] == held:
                return owned
        for child in children:
            if not child.alive():
                raise BenchError(f"{child.name} exited:\n{child.log_tail()}")
        time.sleep(0.25)
    raise BenchError(f"the group did not settle in {timeout_s}s")


def measure(
    svc: BenchServices,
    run: Run,
    children: list[Child],
    expect: int,
    *,
    timeout_s: float,
    stall_s: float = 10.0,
    profile_dir: Path | None = None,
    feed: Callable[[list[Child]], None] | None = None,
    broker: EmbeddedBroker | None = None,
) -> Run:
    """Start the children, wait until they handled `expect` records, stop them; fill in `run`.
    With `feed`, the children start on an empty topic and `feed(children)` gives them the load
    (from `broker`, when it is not the services' own); the run is then measured from the end of
    the feed, when the consumers have the machine to themselves as in a run on a backlog (while
    the benchmark produces, it and the broker take CPU from them, more of a pair's short run
    than of a single consumer's)."""
    broker = broker or svc.broker
    pg_before = svc.postgres_cpu_s()
    broker_before = _broker_cpu_s(broker)
    spies: list[Profile] = []
    fed_at: float | None = None
    cpu_first: float | None = None
    try:
        for child in children:
            child.start()
        if feed is not None:
            feed(children)
            fed_at = time.time()
            cpu_first = sum(tree_cpu_s(c.pid) for c in children)
            pg_before = svc.postgres_cpu_s()
            broker_before = _broker_cpu_s(broker)
        deadline = time.monotonic() + timeout_s
        done = last_done = 0
        last_progress = time.monotonic()
        with _progress() as progress:
            task = progress.add_task(run.name, total=expect)
            while True:
                batches = [b for child in children for b in _batches(child)]
                done = sum(n for _, n in batches)
                progress.update(task, completed=min(done, expect))
                if batches and cpu_first is None:
                    # From the first batch on: start-up (imports, group join) is not the work.
                    cpu_first = sum(tree_cpu_s(c.pid) for c in children)
                    if profile_dir is not None:
                        spies = [
                            Profile(
                                c.pid, profile_dir / f"{run.name.replace(' ', '_')}-{i}.pyspy.txt"
                            ).start()
                            for i, c in enumerate(children)
                        ]
                if spies and done >= 0.9 * expect:
                    for spy in spies:
                        spy.stop()  # the steady state only, not the drain at the end
                if done >= expect:
                    break
                if done > last_done:
                    last_done, last_progress = done, time.monotonic()
                elif done and time.monotonic() - last_progress > stall_s:
                    console.print(f"[yellow]{run.name}: stalled at {done:,}/{expect:,} records[/]")
                    run.stalled = True
                    break
                for child in children:
                    if not child.alive():
                        raise BenchError(f"{child.name} exited:\n{child.log_tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{run.name}: {done}/{expect} records after {timeout_s}s")
                time.sleep(0.25)
        for spy in spies:
            spy.stop()
        run.cpu_s = sum(tree_cpu_s(c.pid) for c in children) - (cpu_first or 0.0)
        run.pg_cpu_s = svc.postgres_cpu_s() - pg_before
        run.broker_cpu_s = _broker_cpu_s(broker) - broker_before
    finally:
        for spy in spies:
            spy.stop()
        for child in children:
            child.stop()
    batches = sorted(b for child in children for b in _batches(child))
    run.batches = len(batches)
    run.records = run.measured = sum(n for _, n in batches)
    if fed_at is not None:
        after = [b for b in batches if b[0] >= fed_at]
        if len(after) >= 2 and sum(n for _, n in after) >= 0.2 * run.records:
            batches = after
            run.measured = sum(n for _, n in after)
        else:
            console.print(f"[yellow]{run.name}: little left after the feed; measured from its start[/]")
    if len(batches) >= 2:
        run.seconds = batches[-1][0] - batches[0][0]
        run.rate = (run.measured - batches[0][1]) / run.seconds if run.seconds > 0 else 0.0
    if spies:
        keep_profile(spies[0].out, f"worker-{run.name.removeprefix('profile: ')}")
        run.profile = summarize_profile(spies[0].out)
    return run


def _broker_cpu_s(broker: EmbeddedBroker) -> float:
    # The producing of a "joined before the load" backlog counts too: the broker's cost of a record.
    return tree_cpu_s(broker.proc.pid) if broker.proc is not None else 0.0


async def _sql(url: str, query: str) -> dict[str, int]:
    conn = await connect(url)
    try:
        row = await conn.fetchrow(query) if query.lstrip().startswith("SELECT") else None
        if row is None:
            await conn.execute(query)
            return {}
        return {k: int(v) for k, v in row.items()}
    finally:
        await conn.close()


def run(
    records: int = 100_000,
    *,
    seed: int = 42,
    profile: bool = False,
    variants: bool = False,
    profile_only: bool = False,
    scaling_only: bool = False,
    rounds: int = 1,
    worker_settings: dict[str, str] | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    profile = profile or profile_only
    worker_settings = worker_settings or {}
    with services("worker") as svc:
        for slug in TENANTS:
            asyncio.run(add_tenant(svc.database_url, slug, agents=2))
        backlog = generate(records, seed)
        size = sum(len(v) for _, v in backlog) / len(backlog)
        console.print(f"{len(backlog):,} records, {size:.0f} bytes each on average")
        asyncio.run(produce(svc.bootstrap, backlog))
        log_dir = svc.data_dir
        profile_dir = log_dir if profile and py_spy_available() else None
        runs: list[Run] = []
        n = 0

        def group(name: str) -> str:
            nonlocal n
            n += 1
            return f"bench-{n}-{name}"

        def bare(name: str, *args: str, prof: bool = False) -> Run:
            g = group("bare")
            child = Child.module(
                f"bare-{n}",
                "bench.faust_bare",
                ["--bootstrap", svc.bootstrap, "--group", g, *args],
                svc.env(),
                log_dir,
            )
            result = measure(
                svc,
                Run(name, "bare"),
                [child],
                records,
                timeout_s=timeout_s,
                profile_dir=profile_dir if prof else None,
            )
            console.print(f"{name}: {result.rate:,.0f} records/s")
            return result

        def workers(name: str, count: int, *, prof: bool = False, **settings: Any) -> Run:
            asyncio.run(_sql(svc.database_url, TRUNCATE))
            g = group("worker")
            children = [
                Child.cortexx(
                    f"worker-{n}-{i}",
                    ["worker"],
                    svc.env(worker_app_id=g, **{**worker_settings, **settings}),
                    log_dir,
                )
                for i in range(count)
            ]
            result = measure(
                svc,
                Run(name, "worker"),
                children,
                records,
                timeout_s=timeout_s,
                profile_dir=profile_dir if prof else None,
            )
            result.rows = asyncio.run(_sql(svc.database_url, SNAPSHOT))
            console.print(f"{name}: {result.rate:,.0f} records/s")
            return result

        def live_workers(name: str, count: int, bare_args: list[str] | None = None) -> Run:
            """Workers that joined their group before the load: no rebalance inside the window
            (with a backlog waiting, the second worker's join pauses and redelivers, which is a
            cost of starting, not of throughput). They get a broker of their own, empty until
            the whole group holds its partitions, then the backlog."""
            asyncio.run(_sql(svc.database_url, TRUNCATE))
            # A fresh log each time: Kafka keeps its topics on disk, and a broker started on the
            # previous live run's log would hand this group that run's backlog as well.
            log = svc.data_dir / f"broker-live-{count}"
            shutil.rmtree(log, ignore_errors=True)
            broker = EmbeddedBroker(log)
            broker.start()
            try:
                asyncio.run(declare_topics(broker.bootstrap, partitions=PARTITIONS, replication=1))
                g = group("live")
                env = svc.env(worker_app_id=g, kafka_bootstrap=broker.bootstrap, **worker_settings)
                if bare_args is None:
                    children = [
                        Child.cortexx(f"live-{n}-{i}", ["worker"], env, log_dir) for i in range(count)
                    ]
                else:
                    argv = ["--bootstrap", broker.bootstrap, "--group", g, *bare_args]
                    children = [
                        Child.module(f"live-bare-{n}-{i}", "bench.faust_bare", argv, env, log_dir)
                        for i in range(count)
                    ]

                split = ""

                def feed(started: list[Child]) -> None:
                    nonlocal split
                    split = "+".join(str(len(h)) for h in wait_settled(started, PARTITIONS))
                    asyncio.run(produce(broker.bootstrap, backlog))

                kind = "worker" if bare_args is None else "bare"
                result = measure(
                    svc, Run(name, kind), children, records, timeout_s=timeout_s, feed=feed, broker=broker
                )
            finally:
                broker.stop()
            result.split = split
            if bare_args is None:
                result.rows = asyncio.run(_sql(svc.database_url, SNAPSHOT))
            console.print(f"{name}: {result.rate:,.0f} records/s, partitions {split}")
            return result

        take = ["--mode", "take", "--batch", "2000"]
        if scaling_only:
            # One round's ratio moves by ±20% on a shared 2-core machine: rounds give its spread.
            figures = []
            for _ in range(rounds):
                round_runs = [
                    live_workers(LIVE_BARE_X1, 1, take),
                    live_workers(LIVE_BARE_X2, 2, take),
                    live_workers(LIVE_X1, 1),
                    live_workers(LIVE_X2, 2),
                ]
                figures.append(_scaling_report(round_runs))
                runs += round_runs
            if rounds > 1:
                _scaling_summary(figures)
            scaling = {"records": records, "runs": [r.row() for r in runs], "scaling": figures}
            console.print(f"results appended to {save_result('worker-scaling', scaling)}")
            return scaling

        def hand(name: str, *args: str, count: int = 1) -> Run:
            asyncio.run(_sql(svc.database_url, TRUNCATE))
            g = group("hand")
            children = [
                Child.module(
                    f"hand-{n}-{i}",
                    "bench.handloop",
                    ["--bootstrap", svc.bootstrap, "--database-url", svc.database_url, "--group", g, *args],
                    svc.env(),
                    log_dir,
                )
                for i in range(count)
            ]
            result = measure(svc, Run(name, "hand"), children, records, timeout_s=timeout_s)
            result.rows = asyncio.run(_sql(svc.database_url, SNAPSHOT))
            console.print(f"{name}: {result.rate:,.0f} records/s")
            return result

        if not profile_only:
            runs.append(bare("faust-bare take(2000)", "--mode", "take", "--batch", "2000"))
            runs.append(bare("faust-bare noack_take(500)", "--mode", "noack_take", "--batch", "500"))
            runs.append(bare("faust-bare take(2000) uvloop", "--mode", "take", "--batch", "2000", "--uvloop"))
            if variants:
                runs.append(
                    bare(
                        "faust-bare take(2000) big buffers",
                        "--mode",
                        "take",
                        "--batch",
                        "2000",
                        "--setting",
                        "stream_buffer_maxsize=32768",
                        "--setting",
                        "broker_max_poll_records=5000",
                    )
                )
            runs.append(workers("cortexx worker x1", 1))
            runs.append(workers("cortexx worker x2", 2))
            runs.append(workers(OVERLAPPED, 1, worker_overlap_writes="true"))
            runs.append(workers(ASYNCIO_LOOP, 1, worker_event_loop="asyncio"))
            runs.append(live_workers(LIVE_BARE_X1, 1, take))
            runs.append(live_workers(LIVE_BARE_X2, 2, take))
            runs.append(live_workers(LIVE_X1, 1))
            runs.append(live_workers(LIVE_X2, 2))
            if variants:
                runs.append(
                    workers(
                        "cortexx worker x1, batches of 2000 / 250 ms",
                        1,
                        worker_batch_max=2000,
                        worker_batch_within_s=0.25,
                    )
                )
            runs.append(hand("hand store (per-record SQL)", "--writer", "store", "--no-overlap"))
            runs.append(hand("hand sets (set-based, overlapped)", "--writer", "sets"))
            if variants:
                runs.append(hand("hand sets x2", "--writer", "sets", count=2))
        if profile_dir is not None:
            profiled = [
                bare("profile: faust-bare take(2000)", "--mode", "take", "--batch", "2000", prof=True),
                workers(
                    "profile: cortexx worker x1 (asyncio loop: py-spy cannot see into uvloop)",
                    1,
                    prof=True,
                    worker_event_loop="asyncio",
                ),
                bare(
                    "profile: faust-bare take(2000) uvloop",
                    "--mode",
                    "take",
                    "--batch",
                    "2000",
                    "--uvloop",
                    prof=True,
                ),
            ]
            for p in profiled:
                if p.profile:
                    print_profile(p.name, p.profile)
            runs += profiled
    if profile_only:
        result = {"records": records, "runs": [r.row() for r in runs]}
        save_result("worker-profile", result)
        return result
    return _report(records, runs)


def _scaling_report(runs: list[Run]) -> dict[str, float]:
    """x2 / x1 of the worker against x2 / x1 of bare Faust: what the machine allows."""
    by = {r.name: r for r in runs}
    live = [by[name] for name in (LIVE_BARE_X1, LIVE_BARE_X2, LIVE_X1, LIVE_X2)]
    print_table(
        "joined before the load: CPU per record of each party (2 cores in all)",
        ["consumer", "partitions", "records/s", "proc µs/rec", "PG µs/rec", "broker µs/rec", "cores busy"],
        [
            (
                r.name,
                r.split,
                r.rate,
                1e6 * r.cpu_s / max(1, r.measured),
                1e6 * r.pg_cpu_s / max(1, r.measured),
                1e6 * r.broker_cpu_s / max(1, r.measured),
                (r.cpu_s + r.pg_cpu_s + r.broker_cpu_s) / r.seconds if r.seconds else 0.0,
            )
            for r in live
        ],
    )
    figures = {
        "bare_x2_vs_x1": round(by[LIVE_BARE_X2].rate / by[LIVE_BARE_X1].rate, 3),
        "worker_x2_vs_x1": round(by[LIVE_X2].rate / by[LIVE_X1].rate, 3),
    }
    console.print(
        f"x2 / x1, joined before the load: bare Faust {figures['bare_x2_vs_x1']:.2f}, "
        f"worker {figures['worker_x2_vs_x1']:.2f}"
    )
    return figures


def _scaling_summary(figures: list[dict[str, float]]) -> None:
    keys = ("bare_x2_vs_x1", "worker_x2_vs_x1")
    rows: list[tuple[Any, ...]] = [(str(i + 1), *(f[k] for k in keys)) for i, f in enumerate(figures)]
    rows.append(("median", *(statistics.median(f[k] for f in figures) for k in keys)))
    rows.append(
        ("min - max", *(f"{min(f[k] for f in figures):.2f} - {max(f[k] for f in figures):.2f}" for k in keys))
    )
    print_table("x2 / x1 by round, joined before the load", ["round", "bare Faust", "worker"], rows)


def _report(records: int, runs: list[Run]) -> dict[str, Any]:
    measured = [r for r in runs if not r.name.startswith("profile:")]
    by = {r.name: r for r in measured}
    bare = by["faust-bare take(2000)"]
    rows = []
    for r in measured:
        rows.append(
            (
                r.name,
                r.rate,
                r.rate / bare.rate if bare.rate else 0.0,
                r.seconds,
                1e6 * r.cpu_s / max(1, r.measured),
                1e6 * r.pg_cpu_s / max(1, r.measured),
                1e6 * r.broker_cpu_s / max(1, r.measured),
                r.rows.get("messages"),
                r.rows.get("notifications"),
                f"{r.records:,}" + (" (stalled)" if r.stalled else ""),
            )
        )
    print_table(
        f"worker: {records:,} records from meta.webhooks (same run)",
        [
            "consumer",
            "records/s",
            "vs bare",
            "seconds",
            "CPU µs/rec (proc)",
            "CPU µs/rec (PG)",
            "CPU µs/rec (broker)",
            "messages",
            "notif.",
            "handled",
        ],
        rows,
    )
    writing = [r for r in measured if r.rows]
    reference = writing[0].rows if writing else {}
    same_rows = all(r.rows == reference for r in writing)
    if not same_rows:
        print_table(
            "rows left by each writing run (they must be equal)",
            ["run", *reference.keys()],
            [(r.name, *r.rows.values()) for r in writing],
        )
    one = by["cortexx worker x1"]
    two = by["cortexx worker x2"]
    live_one, live_two = by[LIVE_X1], by[LIVE_X2]
    hand_sets = by["hand sets (set-based, overlapped)"]
    bare_uvloop = by["faust-bare take(2000) uvloop"]
    ratio_bare = one.rate / bare.rate if bare.rate else 0.0
    # Scaling is judged on workers that joined before the load: a join under load is a start-up
    # cost (a rebalance: a pause, then redelivery), reported beside it as x2 from a backlog.
    scaling = live_two.rate / live_one.rate if live_one.rate else 0.0
    summary = {
        "worker_vs_bare": round(ratio_bare, 3),
        "worker_vs_bare_noack500": round(one.rate / by["faust-bare noack_take(500)"].rate, 3),
        "x2_vs_x1": round(scaling, 3),
        "x2_vs_x1_joining_under_load": round(two.rate / one.rate, 3) if one.rate else None,
        "worker_vs_hand_store": round(one.rate / by["hand store (per-record SQL)"].rate, 3),
        "worker_vs_hand_sets": round(one.rate / hand_sets.rate, 3) if hand_sets.rate else None,
        "worker_vs_bare_uvloop": round(one.rate / bare_uvloop.rate, 3),
        "overlap_gain": round(by[OVERLAPPED].rate / one.rate, 3),
        "uvloop_gain_in_worker": round(one.rate / by[ASYNCIO_LOOP].rate, 3),
        "uvloop_bare_vs_bare": round(bare_uvloop.rate / bare.rate, 3),
        "same_rows": same_rows,
        "target_bare_met": ratio_bare >= TARGET_OF_BARE,
        "x2_split": live_two.split,
        # Against the backlog run of one worker, which reads every record: a run ends once its
        # batches hold as many records as the backlog, so one that had records delivered twice
        # ends before its last ones are stored.
        "x2_rows_as_x1": live_two.rows == one.rows,
    }
    halves = "+".join([str(PARTITIONS // 2)] * 2)
    summary["target_two_workers_met"] = live_two.split == halves and bool(summary["x2_rows_as_x1"])
    console.print(
        f"worker x1 vs bare Faust: {ratio_bare:.2f} (>= {TARGET_OF_BARE}): "
        f"[bold]{'MET' if summary['target_bare_met'] else 'MISSED'}[/]"
    )
    console.print(
        f"two workers: partitions {live_two.split} (want {halves}), rows as one worker's: "
        f"{summary['x2_rows_as_x1']}: [bold]{'MET' if summary['target_two_workers_met'] else 'MISSED'}[/]; "
        f"x2 / x1 {scaling:.2f} (reported, not judged)"
    )
    console.print(
        f"worker x1 vs bare Faust on uvloop: {summary['worker_vs_bare_uvloop']:.2f}; uvloop raises the "
        f"bare ceiling x{summary['uvloop_bare_vs_bare']:.2f}"
    )
    console.print(
        f"in the worker: overlapped writes x{summary['overlap_gain']:.2f}, "
        f"uvloop x{summary['uvloop_gain_in_worker']:.2f}"
    )
    console.print(
        f"worker vs hand-written loop: {summary['worker_vs_hand_sets']} (same batch path), "
        f"{summary['worker_vs_hand_store']:.2f} (per-record SQL); rows identical across runs: {same_rows}"
    )
    summary.update(_scaling_report(measured))
    result = {"records": records, "runs": [r.row() for r in runs], "summary": summary}
    path = save_result("worker", result)
    console.print(f"results appended to {path}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--records", type=int, default=100_000, help="backlog size")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--profile", action="store_true", help="extra py-spy profiled runs (bare Faust, worker)"
    )
    parser.add_argument("--variants", action="store_true", help="also try Faust settings and 2 hand loops")
    parser.add_argument("--profile-only", action="store_true", help="only the profiled runs")
    parser.add_argument(
        "--scaling-only",
        action="store_true",
        help="only x1 / x2, bare Faust and worker, joined before the load",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="with --scaling-only: repeat it, report the median"
    )
    add_setting_option(
        parser, "a worker setting for every cortexx worker run, e.g. worker_overlap_writes=true"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run")
    args = parser.parse_args(argv)
    run(
        args.records,
        seed=args.seed,
        profile=args.profile,
        variants=args.variants,
        profile_only=args.profile_only,
        scaling_only=args.scaling_only,
        rounds=args.rounds,
        worker_settings=dict(args.setting),
        timeout_s=args.timeout,
    )


if __name__ == "__main__":
    main()
