"""The `fleetbridge` command line.

Settings come from the environment and `.env` (app.config); an invalid one stops
the command with one line naming the variable and what it accepts, exit code 2.
"""

from __future__ import annotations

import asyncio
import logging
from importlib import metadata
from pathlib import Path
from typing import Literal

import typer
from dotenv import load_dotenv
from pydantic import ValidationError

from app.cli_tokens import token_cli, use_settings
from app.config import Settings, get_settings

cli = typer.Typer(help="fleetbridge: an issue tracker joined to a fleet of coding agents.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
cli.add_typer(token_cli, name="token")


def _settings() -> Settings:
    from app.config_errors import explain

    try:
        return get_settings()
    except ValidationError as exc:
        typer.echo(f"error: invalid configuration\n{explain(exc)}", err=True)
        raise typer.Exit(2) from None


use_settings(_settings)


def version() -> str:
    try:
        return metadata.version("fleetbridge")
    except metadata.PackageNotFoundError:  # running from a checkout without install
        return "0+unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"fleetbridge {version()}")
        raise typer.Exit()


@cli.callback()
def _root(
    _version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                  help="Print the version and exit."),
) -> None:
    """fleetbridge: an issue tracker joined to a fleet of coding agents."""


def _configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    from app.observability import configure_logging
    from app.redact import install

    configure_logging(level, fmt)  # FLEET_LOG_FORMAT: text or json lines
    install("uvicorn", "uvicorn.error", "uvicorn.access")


def _database_error(exc: Exception, database_url: str) -> typer.Exit:
    from app.redact import mask_url, redact

    detail = redact(str(getattr(exc, "orig", None) or exc).splitlines()[0])
    typer.echo(f"error: cannot use the database {mask_url(database_url)}: {detail}", err=True)
    return typer.Exit(2)


@cli.command()
def migrate() -> None:
    """Migrate the database at DATABASE_URL to the newest schema."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.migrate import upgrade
    from app.redact import mask_url

    settings = _settings()
    _configure_logging(settings.log_level)
    try:
        upgrade(settings.database_url)
    except (SQLAlchemyError, OSError) as exc:
        raise _database_error(exc, settings.database_url) from None
    typer.echo(f"database {mask_url(settings.database_url)} is up to date", err=True)


@cli.command()
def serve(
    host: str | None = typer.Option(None, help="Interface to bind (default FLEET_HOST)."),
    port: int | None = typer.Option(None, help="Port to bind (default FLEET_PORT)."),
) -> None:
    """Serve the GraphQL API with uvicorn.  An empty database is migrated first."""
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from app.main import create_app
    from app.migrate import is_empty, upgrade
    from app.redact import install, mask_url
    from app.server import server_options, tune_gc

    settings = _settings()
    _configure_logging(settings.log_level, settings.log_format)
    try:
        if is_empty(settings.database_url):
            upgrade(settings.database_url)
    except (SQLAlchemyError, OSError) as exc:
        raise _database_error(exc, settings.database_url) from None
    host, port = host or settings.host, port or settings.port
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through _configure_logging's handler
        access_log=False,  # app.observability logs one line per request
        **server_options(settings),
    )
    install("uvicorn", "uvicorn.error", "uvicorn.access")  # uvicorn set up its handlers
    tune_gc(settings)  # after start-up's objects exist, before serving
    logging.getLogger("app.cli").info(
        "fleetbridge %s on %s: GraphQL at http://%s:%d/graphql, metrics at /metrics",
        version(), mask_url(settings.database_url), host, port,
    )
    uvicorn.Server(config).run()


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
    dotenv = Path.cwd() / ".env"
    if dotenv.is_file():  # also for options read from the environment (FLEET_TOKEN, …)
        load_dotenv(dotenv, override=False)
    cli()


if __name__ == "__main__":
    main()
