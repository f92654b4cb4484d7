"""The `fleetbridge` command line."""

from __future__ import annotations

import asyncio
import logging

import typer

from app.auth.models import Role
from app.config import Settings, get_settings

cli = typer.Typer(help="fleetbridge: an issue tracker joined to a fleet of coding agents.",
                  no_args_is_help=True)
token_cli = typer.Typer(help="Manage bearer tokens.", no_args_is_help=True)
cli.add_typer(token_cli, name="token")


def _settings() -> Settings:
    return get_settings()


@cli.command()
def migrate() -> None:
    """Migrate the database at DATABASE_URL to the newest schema."""
    from app.migrate import upgrade

    upgrade(_settings().database_url)
    typer.echo("database is up to date", err=True)


@cli.command()
def serve(
    host: str | None = typer.Option(None, help="Interface to bind (default FLEET_HOST)."),
    port: int | None = typer.Option(None, help="Port to bind (default FLEET_PORT)."),
) -> None:
    """Serve the GraphQL API with uvicorn.  An empty database is migrated first."""
    import uvicorn

    from app.main import create_app
    from app.migrate import is_empty, upgrade

    settings = _settings()
    if is_empty(settings.database_url):
        upgrade(settings.database_url)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level,
        ws="websockets-sansio",
    )


@token_cli.command("create")
def token_create(
    product: str = typer.Option(..., help="Product id; created if new."),
    role: Role = typer.Option(..., help="member, worker or admin."),
    name: str | None = typer.Option(None, help="A name for the token (comment author)."),
) -> None:
    """Create a token and print it, alone, on stdout (it is not stored in clear)."""
    from app.auth.service import create_token
    from app.db import create_engine
    from app.errors import FleetError
    from app.uow import Database

    async def run() -> str:
        db = Database(create_engine(_settings().database_url))
        try:
            async with db.unit_of_work() as session:
                return await create_token(session, product_id=product, role=role, name=name)
        finally:
            await db.dispose()

    try:
        secret = asyncio.run(run())
    except FleetError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(secret)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
