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
    retry_max_seconds: float = typer.Option(
        30.0, min=0.1, help="Longest wait between retries of a failed request."),
    timeout: float = typer.Option(30.0, min=0.1, help="Seconds one request may take."),
    once: bool = typer.Option(False, "--once", help="Process at most one job, then exit."),
    status: bool | None = typer.Option(
        None, "--status/--no-status", help="Live status line (default: on a terminal)."),
) -> None:
    """Claim jobs and run COMMAND for each: `fleetbridge worker --token T -- ./run-agent.sh`.

    The job's fields are in FLEET_JOB_* environment variables and its bodyMd on stdin.
    Exit 0 ships the job; any other exit fails it with the exit code as the reason;
    exit 75 (EX_TEMPFAIL) fails it as retryable.  One line per job event on stderr.
    Unavailable or unreachable service: retried, never fatal.  SIGINT/SIGTERM release
    the held job (its attempt not counted) and exit 130/143; a command that cannot be
    started releases the job and exits 2.  See app/worker.py.
    """
    from app.client import FleetApiError, FleetClient, RetryPolicy, describe
    from app.worker import CommandError, WorkerConfig, run_worker
    from app.worker_report import Reporter

    config = WorkerConfig(
        command=command, capabilities=capability, engine_classes=engine_class,
        profiles=profile, lease_seconds=lease_seconds, poll_seconds=poll_seconds, once=once,
        **({"worker_id": worker_id} if worker_id else {}),
    )
    client = FleetClient(url, token, timeout=timeout,
                         retry=RetryPolicy(max_seconds=retry_max_seconds))
    with Reporter(live=status) as reporter:
        try:
            finished = asyncio.run(run_worker(client, config, reporter))
        except CommandError as exc:
            reporter.line(f"error: {exc}")
            raise typer.Exit(2) from exc
        except FleetApiError as exc:
            reporter.line(f"error: {exc}")
            raise typer.Exit(2) from exc
        except Exception as exc:  # a transport failure that was not retried
            reporter.line(f"error: {describe(exc)}")
            raise typer.Exit(2) from exc
    if finished.signal is not None:
        reporter.line(f"worker stopped by {finished.signal.name}")
        raise typer.Exit(128 + int(finished.signal))


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
    from app.client import FleetApiError, FleetClient, FleetEvent, describe
    from app.watch import WatchOptions, choose_streams
    from app.watch import watch as run_watch

    if only not in (None, "job", "item"):
        typer.echo("error: --only takes `job` or `item`", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")

    def show(event: FleetEvent) -> None:
        typer.echo(event.as_json() if as_json else event.line())

    options = WatchOptions(streams=choose_streams(job, item, only), after=after, limit=limit,
                           reconnect=reconnect)
    try:
        asyncio.run(run_watch(FleetClient(url, token), options, show))
    except FleetApiError as exc:
        typer.echo(f"error: {exc.message} ({exc.code})", err=True)
        raise typer.Exit(2) from exc
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # the first connection failed
        typer.echo(f"error: cannot connect to {url}: {describe(exc)}", err=True)
        raise typer.Exit(2) from exc


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
