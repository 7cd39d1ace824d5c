"""`cortexx bench ingest|worker|read|footprint|latency|media`: the benchmarks of bench/, one command each.

Each starts its own embedded Postgres and broker in a temp dir (never the ports of a running
stack), runs its baselines in the same run, prints a table and appends its results to
bench/results/<name>.json. See BENCHMARKS.md.
"""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks against same-run baselines (see BENCHMARKS.md).", no_args_is_help=True
)


@bench_app.command("ingest")
def bench_ingest(
    duration: float = typer.Option(10.0, help="Seconds per measurement."),
    profile: bool = typer.Option(False, help="Also profile ingest (py-spy) at 32 connections."),
    profile_only: bool = typer.Option(False, help="Only the profiles, no measurement."),
) -> None:
    """Ingest req/s and p50/p99 (wrk) vs a bare FastAPI endpoint and the old Node + BullMQ design."""
    from bench.ingest import run

    run(duration, profile=profile, profile_only=profile_only)


@bench_app.command("worker")
def bench_worker(
    records: int = typer.Option(100_000, help="Size of the backlog on meta.webhooks."),
    seed: int = typer.Option(42, help="Seed of the generated backlog."),
    profile: bool = typer.Option(False, help="Also profile the bare Faust agent and the worker."),
    variants: bool = typer.Option(False, help="Also try Faust settings and two hand-written loops."),
    profile_only: bool = typer.Option(False, help="Only the profiled runs."),
    scaling_only: bool = typer.Option(
        False, help="Only x1 / x2, bare Faust and worker, joined before the load."
    ),
    rounds: int = typer.Option(1, min=1, help="With --scaling-only: repeat it, report the median."),
    setting: list[str] = typer.Option(
        [], help="NAME=VALUE: a worker setting for every worker run, e.g. worker_batch_max=500."
    ),
    timeout: float = typer.Option(900.0, help="Seconds allowed per run."),
) -> None:
    """Worker records/s to Postgres vs a bare Faust agent and a hand-written aiokafka loop."""
    from bench.worker import run

    worker_settings = _worker_settings(setting)
    run(
        records,
        seed=seed,
        profile=profile,
        variants=variants,
        profile_only=profile_only,
        scaling_only=scaling_only,
        rounds=rounds,
        worker_settings=worker_settings,
        timeout_s=timeout,
    )


@bench_app.command("read")
def bench_read(
    companies: int = typer.Option(100, help="Companies in the generated data set."),
    conversations: int = typer.Option(1_000_000, help="Conversations in the data set."),
    messages: int = typer.Option(10_000_000, help="Messages in the data set."),
    samples: int = typer.Option(200, help="Timed queries per case."),
    seed: int = typer.Option(42, help="Seed of the generated data set."),
) -> None:
    """Keyset pagination p50/p99 at pages 1..5,000 vs OFFSET, on a generated data set."""
    from bench.read import run

    run(companies=companies, conversations=conversations, messages=messages, samples=samples, seed=seed)


@bench_app.command("footprint")
def bench_footprint(
    duration: float = typer.Option(600.0, help="Seconds under load."),
    rate: float = typer.Option(1000.0, help="Webhooks per second."),
    setting: list[str] = typer.Option(
        [], help="NAME=VALUE: a worker setting, e.g. worker_batch_idle_ms=250."
    ),
) -> None:
    """RSS of ingest and worker under a steady load (chart: RSS over time), and CPU."""
    from bench.footprint import run

    worker_settings = _worker_settings(setting)
    run(duration, rate=rate, worker_settings=worker_settings)


@bench_app.command("latency")
def bench_latency(
    samples: int = typer.Option(100, help="Webhooks per block, sent one at a time."),
    blocks: int = typer.Option(2, help="Alternations of our worker and the two baselines."),
    seed: int = typer.Option(42, help="Seed of the arrival jitter."),
) -> None:
    """POST to message row on a quiet system, vs window-only batches and Faust's fetch wait."""
    from bench.latency import run

    run(samples, blocks, seed)


@bench_app.command("media")
def bench_media(
    files: int = typer.Option(
        24, min=1, help="Files fetched per round (500 with --size-mb 0.2: per-file cost)."
    ),
    size_mb: float = typer.Option(50.0, help="Size of each file, in MB (10^6 bytes)."),
    concurrency: int = typer.Option(4, min=1, help="Downloads at once (both paths)."),
    rounds: int = typer.Option(3, min=1, help="Rounds of ours then the plain download; medians reported."),
    store: str = typer.Option("local", help="The media store: local (disk, in the temp dir) or s3 (moto)."),
) -> None:
    """The media agent's path (lookup, checked download, store, row) vs a plain streamed download."""
    from bench.media import print_run, run

    if store not in ("local", "s3"):
        raise typer.BadParameter("local or s3", param_hint="--store")
    print_run(run(files, size_mb, concurrency, rounds, store="s3" if store == "s3" else "local"))


def _worker_settings(setting: list[str]) -> dict[str, str]:
    """`--setting NAME=VALUE` options as worker settings; a malformed one is a usage error."""
    from bench.common import parse_setting

    try:
        return dict(parse_setting(s) for s in setting)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--setting") from None
