"""`cortexx users add`: a user of a company, who can log in to the read API."""

from __future__ import annotations

import asyncio
import sys

import typer

from cli.services import process_settings

users_app = typer.Typer(
    help="Users of a company: the agents who log in to the web app.", no_args_is_help=True
)


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
    from infra.postgres.db import connect
    from infra.postgres.migrate import migrate as apply

    settings = process_settings("users")
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
