"""The `cortexx` command: every process and ops tool of Cortexx Stream."""

from __future__ import annotations

import asyncio

import typer

from cli.bench_commands import bench_app
from cli.dlq import dlq_app
from cli.services import harness, process_settings
from cli.tenants import tenants_app
from cli.users import users_app
from infra.runtime.logging import configure_logging
from infra.runtime.settings import Settings

app = typer.Typer(
    name="cortexx",
    help="Cortexx Stream: Meta webhooks to Postgres and WhatsApp, through Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command()
def up(
    ingest_port: int = typer.Option(None, help="Port of the ingest endpoint (default 8000)."),
) -> None:
    """Run the whole system: Postgres and Kafka (embedded unless URLs are set), migrations, topics,
    the WUZAPI simulator (unless CORTEXX_WUZAPI_URL is set), ingest, the worker and the read API,
    each supervised and restarted if it dies."""
    embedded = harness("embedded", "cortexx up")
    from cli.up import run_up

    settings = Settings(_env_file=None)  # type: ignore[call-arg]  # up owns services.env
    if not settings.kafka_bootstrap and embedded.missing_kafka_prerequisites():
        typer.echo(f"cortexx up: {embedded.KAFKA_PREREQUISITES}", err=True)
        raise typer.Exit(2)
    configure_logging(settings.log_level, process="up")
    if ingest_port is not None:
        settings = settings.resolved(ingest_port=ingest_port)
    raise typer.Exit(run_up(settings))


@app.command()
def migrate() -> None:
    """Apply the database migrations not yet applied."""
    from cli.services import database
    from infra.postgres.migrate import migrate as apply

    settings = process_settings("migrate")
    with database(settings) as url:
        applied = asyncio.run(apply(url))
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@app.command()
def ingest(
    port: int = typer.Option(None, help="Port to listen on (default CORTEXX_INGEST_PORT)."),
) -> None:
    """Serve the Meta webhook endpoint."""
    from cli.services import need_url
    from infra.runtime.http_server import serve_edge
    from ingest.app import create_app

    settings = process_settings("ingest")
    settings = settings.resolved(
        database_url=need_url(settings.database_url, "CORTEXX_DATABASE_URL"),
        kafka_bootstrap=need_url(settings.kafka_bootstrap, "CORTEXX_KAFKA_BOOTSTRAP"),
    )
    code = serve_edge(
        create_app(settings),
        settings,
        host=settings.ingest_host,
        port=port or settings.ingest_port,
        process="ingest",
    )
    raise typer.Exit(code)


@app.command()
def worker() -> None:
    """Run the stream worker (the Faust app and its agents)."""
    from cli.services import need_url
    from processors.app import run_worker

    settings = process_settings("worker")
    settings = settings.resolved(
        database_url=need_url(settings.database_url, "CORTEXX_DATABASE_URL"),
        kafka_bootstrap=need_url(settings.kafka_bootstrap, "CORTEXX_KAFKA_BOOTSTRAP"),
        wuzapi_url=need_url(settings.wuzapi_url, "CORTEXX_WUZAPI_URL"),
    )
    raise typer.Exit(run_worker(settings))


@app.command("wuzapi-sim")
def wuzapi_sim(
    port: int = typer.Option(None, help="Port to listen on (default CORTEXX_WUZAPI_SIM_PORT)."),
    token: list[str] = typer.Option(
        None,
        envvar="CORTEXX_WUZAPI_SIM_TOKENS",
        help="A WUZAPI user's token (repeatable, or CORTEXX_WUZAPI_SIM_TOKENS space-separated); any"
        " other gets 401. Default: CORTEXX_WUZAPI_TOKEN, the worker's.",
    ),
    any_token: bool = typer.Option(
        False, "--any-token", help="Take every non-empty token as a user's (401 only without one)."
    ),
) -> None:
    """Run the WUZAPI simulator (faults switched at run time through /_sim/faults)."""
    serve = harness("wuzapi_sim", "cortexx wuzapi-sim").serve
    from infra.runtime.lifecycle import lifecycle

    if any_token and token:
        typer.echo(
            "cortexx wuzapi-sim: --any-token and --token (or CORTEXX_WUZAPI_SIM_TOKENS) exclude each other",
            err=True,
        )
        raise typer.Exit(2)
    settings = process_settings("wuzapi-sim")
    lifecycle.install("wuzapi-sim")
    tokens = set(token or ()) or {settings.wuzapi_token}

    async def run() -> None:
        stop = asyncio.Event()
        lifecycle.watch_loop(asyncio.get_running_loop())
        lifecycle.on_stop(lambda _: stop.set())
        # A stop is an event, not a cancel: the simulator's own shutdown then wakes and drops the
        # calls a hang holds, instead of waiting for them.
        await serve(
            "127.0.0.1",
            port or settings.wuzapi_sim_port,
            () if any_token else tokens,
            any_token=any_token,
            stop=stop,
        )

    asyncio.run(run())


@app.command("graph-sim")
def graph_sim(
    port: int = typer.Option(None, help="Port to listen on (default CORTEXX_GRAPH_SIM_PORT)."),
    token: list[str] = typer.Option(
        None,
        envvar="CORTEXX_GRAPH_SIM_TOKENS",
        help="An access token it accepts (repeatable); any other gets Meta's 401 (code 190)."
        " Default: CORTEXX_META_ACCESS_TOKEN, the worker's.",
    ),
    any_token: bool = typer.Option(False, "--any-token", help="Accept every non-empty token."),
    auto: bool = typer.Option(
        False, "--auto", help="Serve any numeric media id (and any CDN name) as a file made from it."
    ),
    url_ttl_s: float = typer.Option(300.0, help="How long a download URL it gives lives."),
) -> None:
    """Run the Graph API (media) simulator (faults switched at run time through /_sim/faults)."""
    serve = harness("graph_sim", "cortexx graph-sim").serve
    from infra.runtime.lifecycle import lifecycle

    settings = process_settings("graph-sim")
    lifecycle.install("graph-sim")
    default = settings.meta_access_token.get_secret_value() if settings.meta_access_token else None
    tokens = set(token or ()) or ({default} if default else set())
    if not tokens and not any_token:
        typer.echo("cortexx graph-sim: give --token, CORTEXX_META_ACCESS_TOKEN or --any-token", err=True)
        raise typer.Exit(2)

    async def run() -> None:
        stop = asyncio.Event()
        lifecycle.watch_loop(asyncio.get_running_loop())
        lifecycle.on_stop(lambda _: stop.set())
        await serve(
            "127.0.0.1",
            port or settings.graph_sim_port,
            tokens,
            any_token=any_token,
            auto=auto,
            url_ttl_s=url_ttl_s,
            stop=stop,
        )

    asyncio.run(run())


@app.command()
def simulate(
    url: str = typer.Option(None, help="Ingest base URL (default http://127.0.0.1:INGEST_PORT)."),
    tenant: str = typer.Option("demo", help="Slug of the demo company (registered if missing)."),
    contacts: int = typer.Option(50, min=1, help="Distinct contacts writing in."),
    messages: int = typer.Option(10, min=1, help="Inbound messages per contact."),
    concurrency: int = typer.Option(16, min=1, help="POSTs in flight at once."),
    seed: int = typer.Option(7, help="Seed of the generated stream."),
    verify: bool = typer.Option(True, help="Wait until Postgres holds every message."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for Postgres when verifying."),
) -> None:
    """Post a stream of realistic signed webhooks to a running ingest, then check Postgres."""
    harness("meta_samples", "cortexx simulate")
    from cli.simulate import run_simulation

    settings = process_settings("simulate")
    base = url or f"http://127.0.0.1:{settings.ingest_port}"
    ok = run_simulation(
        settings,
        base_url=base,
        tenant=tenant,
        contacts=contacts,
        messages=messages,
        concurrency=concurrency,
        seed=seed,
        verify=verify,
        timeout_s=timeout,
    )
    raise typer.Exit(0 if ok else 1)


@app.command("api")
def api(
    port: int = typer.Option(None, help="Port to listen on (default CORTEXX_API_PORT)."),
) -> None:
    """Serve the read API (sessions, conversations, replies, notifications, health)."""
    from api.app import create_app
    from api.sessions import SessionSecretMissing
    from cli.services import need_url
    from infra.runtime.http_server import serve_edge

    settings = process_settings("api")
    settings = settings.resolved(
        database_url=need_url(settings.database_url, "CORTEXX_DATABASE_URL"),
        kafka_bootstrap=need_url(settings.kafka_bootstrap, "CORTEXX_KAFKA_BOOTSTRAP"),
        api_port=port or settings.api_port,
    )
    try:
        application = create_app(settings)
    except SessionSecretMissing as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    # Signals, the drain of requests in flight and the exit code are the lifecycle's.
    code = serve_edge(application, settings, host=settings.api_host, port=settings.api_port, process="api")
    raise typer.Exit(code)


# The command groups, each a Typer of its own module.
for _name, _group in (("tenants", tenants_app), ("users", users_app), ("dlq", dlq_app), ("bench", bench_app)):
    app.add_typer(_group, name=_name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
