"""`cortexx api` (serve the read API) and `cortexx users add` (a user who can log in to it)."""

from __future__ import annotations

import asyncio
import sys

import typer

from infra.logging import configure_logging
from infra.settings import Settings, get_settings


def _settings(process: str) -> Settings:
    settings = get_settings()
    configure_logging(settings.log_level, process=process, log_file=settings.log_file)
    return settings


def register(app: typer.Typer) -> None:
    """Add the read API's commands to the `cortexx` command."""
    users_app = typer.Typer(
        help="Users of a company: the agents who log in to the web app.", no_args_is_help=True
    )
    app.add_typer(users_app, name="users")

    @app.command("api")
    def api(
        port: int = typer.Option(None, help="Port to listen on (default CORTEXX_API_PORT)."),
    ) -> None:
        """Serve the read API (sessions, conversations, replies, notifications, health)."""
        from api.app import create_app
        from api.sessions import SessionSecretMissing
        from cli.services import need_url
        from infra.http_server import serve_http

        settings = _settings("api")
        settings.database_url = need_url(settings.database_url, "CORTEXX_DATABASE_URL")
        settings.kafka_bootstrap = need_url(settings.kafka_bootstrap, "CORTEXX_KAFKA_BOOTSTRAP")
        settings.api_port = port or settings.api_port
        try:
            application = create_app(settings)
        except SessionSecretMissing as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        # Signals, the drain of requests in flight and the exit code are the lifecycle's.
        code = serve_http(
            application,
            host=settings.api_host,
            port=settings.api_port,
            process="api",
            grace_s=settings.shutdown_grace_s,
            stop_deadline_s=settings.stop_deadline_s,
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            keep_alive_s=settings.http_keep_alive_s,
        )
        raise typer.Exit(code)

    @users_app.command("add")
    def users_add(
        company: str = typer.Option(..., help="Slug of the user's company."),
        email: str = typer.Option(..., help="The login; unique across companies."),
        password: str = typer.Option(None, help="The password (prefer --password-stdin: argv is visible)."),
        password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the password from stdin."),
        name: str = typer.Option("", help="Display name."),
        role: str = typer.Option(
            "agent",
            help="agent, admin (of the company), or operator (runs the deployment: the console at /ops).",
        ),
    ) -> None:
        """Create a user of a company, or update their password, name and role."""
        from api.users import ROLES, UserError, add_user
        from cli.services import database
        from infra.db import connect
        from infra.migrate import migrate as apply

        settings = _settings("users")
        if role not in ROLES:
            typer.echo(f"--role must be one of {', '.join(ROLES)}", err=True)
            raise typer.Exit(2)
        if password_stdin:
            secret = sys.stdin.readline().rstrip("\r\n")
        elif password is not None:
            secret = password
        else:
            secret = typer.prompt("Password", hide_input=True, confirmation_prompt=True)

        async def run(url: str) -> tuple[int, bool]:
            await apply(url)
            conn = await connect(url)
            try:
                return await add_user(
                    conn,
                    company_slug=company,
                    email=email,
                    password=secret,
                    name=name,
                    role=next(r for r in ROLES if r == role),
                )
            finally:
                await conn.close()

        with database(settings) as url:
            try:
                user_id, created = asyncio.run(run(url))
            except UserError as exc:
                typer.echo(str(exc), err=True)
                raise typer.Exit(2) from None
        typer.echo(
            f"{'added' if created else 'updated'} user {email.strip().lower()} (id {user_id}) of {company}"
        )
