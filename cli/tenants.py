"""`cortexx tenants add`: register a company, or update its secrets."""

from __future__ import annotations

import asyncio

import typer

from cli.services import process_settings

tenants_app = typer.Typer(help="Register and update companies (tenants).", no_args_is_help=True)


@tenants_app.command("add")
def tenants_add(
    slug: str = typer.Option(..., help="URL name of the company: /webhooks/meta/SLUG"),
    app_secret: str = typer.Option(..., help="The Meta app secret that signs its webhooks."),
    verify_token: str = typer.Option(..., help="The token Meta's verification handshake sends."),
    name: str = typer.Option("", help="Display name (defaults to the slug)."),
    meta_access_token: str | None = typer.Option(
        None,
        envvar="CORTEXX_TENANT_META_ACCESS_TOKEN",
        help="The Graph API token its media is fetched with (kept as it is when left out).",
    ),
) -> None:
    """Register a company, or update its secrets when it exists."""
    from cli.services import database
    from infra.postgres.db import connect
    from infra.postgres.migrate import migrate as apply
    from infra.postgres.tenants import InvalidSlug, upsert_tenant

    settings = process_settings("tenants")

    async def run(url: str) -> tuple[int, bool]:
        await apply(url)
        conn = await connect(url)
        try:
            tenant, created = await upsert_tenant(
                conn,
                slug=slug,
                app_secret=app_secret,
                verify_token=verify_token,
                name=name,
                meta_access_token=meta_access_token,
            )
        finally:
            await conn.close()
        return tenant.id, created

    with database(settings) as url:
        try:
            company_id, created = asyncio.run(run(url))
        except InvalidSlug as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    typer.echo(f"{'registered' if created else 'updated'} company {slug} (id {company_id})")
