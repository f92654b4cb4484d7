"""The `fleetbridge` command line."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

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


@cli.command(context_settings={"allow_interspersed_args": False})
def worker(
    command: list[str] = typer.Argument(..., help="The command to run for each job (after --)."),
    url: str = typer.Option("http://127.0.0.1:8000/graphql", envvar="FLEET_URL",
                            help="The GraphQL endpoint."),
    token: str = typer.Option(..., envvar="FLEET_TOKEN", help="A worker (or admin) token."),
    worker_id: str | None = typer.Option(None, help="Lease holder name (default host-pid)."),
    capability: list[str] = typer.Option([], help="A capability this worker has (repeat)."),
    engine_class: list[str] = typer.Option([], help="An engine class it runs (repeat)."),
    profile: list[str] = typer.Option([], help="A profile it serves (repeat)."),
    lease_seconds: int | None = typer.Option(None, help="Lease length (default: the server's)."),
    poll_seconds: float = typer.Option(5.0, min=0.1, help="Wait between empty claims."),
    once: bool = typer.Option(False, "--once", help="Process at most one job, then exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each job to stderr."),
) -> None:
    """Claim jobs and run COMMAND for each: `fleetbridge worker --token T -- ./run-agent.sh`.

    The job's fields are in FLEET_JOB_* environment variables and its bodyMd on stdin.
    Exit 0 ships the job; any other exit fails it with the exit code as the reason;
    exit 75 (EX_TEMPFAIL) fails it as retryable.  See app/worker.py.
    """
    import httpx

    from app.worker import FleetApiError, WorkerConfig, run_worker

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = WorkerConfig(
        command=command, capabilities=capability, engine_classes=engine_class,
        profiles=profile, lease_seconds=lease_seconds, poll_seconds=poll_seconds, once=once,
        **({"worker_id": worker_id} if worker_id else {}),
    )
    try:
        outcomes = asyncio.run(run_worker(url, token, config))
    except (FleetApiError, httpx.HTTPError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for outcome in outcomes:
        state = "lease lost" if outcome.lease_lost else outcome.stage
        typer.echo(f"job {outcome.job_id}: exit {outcome.exit_code} -> {state}", err=True)


@cli.command()
def watch(
    url: str = typer.Option("ws://127.0.0.1:8000/graphql", envvar="FLEET_WS_URL",
                            help="The GraphQL websocket endpoint (http:// works too)."),
    token: str = typer.Option(..., envvar="FLEET_TOKEN", help="Any token of the product."),
    job: str | None = typer.Option(None, help="Only this job's stage changes."),
    item: str | None = typer.Option(None, help="Only this item's status changes."),
    only: str | None = typer.Option(None, help="Only `job` or `item` events."),
    after: str | None = typer.Option(None, help="Replay the events after this cursor first."),
    limit: int | None = typer.Option(None, min=1, help="Exit after this many events."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    reconnect: bool = typer.Option(True, help="Resume from the last cursor when dropped."),
) -> None:
    """Print live job stage and item status changes, one line per event.

    With --job or --item only the named streams are watched; otherwise both (or the
    one named by --only).
    """
    from app.watch import Stream, WatchError, WatchOptions
    from app.watch import watch as run_watch

    if only not in (None, "job", "item"):
        typer.echo("error: --only takes `job` or `item`", err=True)
        raise typer.Exit(2)
    streams = [Stream(kind, entity) for kind, entity in (("job", job), ("item", item))
               if entity is not None]
    if not streams:
        streams = [Stream(kind) for kind in ("job", "item") if only in (None, kind)]

    def show(event: Any) -> None:
        typer.echo(event.as_json() if as_json else event.line())

    options = WatchOptions(url=url, token=token, streams=streams, after=after, limit=limit,
                           reconnect=reconnect)
    try:
        asyncio.run(run_watch(options, show))
    except WatchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
