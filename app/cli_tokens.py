"""`fleetbridge token create | list | revoke` (DESIGN §7, issue 10 §2).

These commands work on the database directly (DATABASE_URL), like `migrate`: they
need no running server.  A revoke reaches running instances at once — by a
PostgreSQL NOTIFY, or on SQLite by the database's sidecar file, bumped after the
commit (app.auth.revocations) — and their open websockets at the latest at the
periodic re-check (FLEET_TOKEN_CHECK_SECONDS); see app.auth.guard.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Role, Token
from app.auth.service import (
    create_token,
    list_tokens,
    parse_duration,
    revoke_token,
    token_state,
)
from app.config import Settings
from app.db import create_engine, utcnow
from app.errors import FleetError
from app.migrate import NotMigratedError, require_migrated
from app.uow import Database

token_cli = typer.Typer(help="Create, list and revoke bearer tokens.", no_args_is_help=True)
T = TypeVar("T")

SettingsLoader = Callable[[], Settings]
_load_settings: SettingsLoader | None = None


def use_settings(loader: SettingsLoader) -> None:
    """The CLI's settings loader (it turns invalid settings into a friendly exit)."""
    global _load_settings
    _load_settings = loader


def _with_session(work: Callable[[AsyncSession], Awaitable[T]], *, write: bool) -> T:
    """Run `work` in one unit of work (or read) on a migrated database; errors exit 2."""
    assert _load_settings is not None
    database_url = _load_settings().database_url

    async def run() -> T:
        engine = create_engine(database_url)
        db = Database(engine)
        try:
            await require_migrated(engine, database_url)
            if write:
                async with db.unit_of_work() as session:
                    return await work(session)
            async with db.read() as session:
                return await work(session)
        finally:
            await db.dispose()

    try:
        return asyncio.run(run())
    except NotMigratedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except FleetError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    except (OSError, ConnectionError) as exc:
        typer.echo(f"error: the database is unavailable ({exc})", err=True)
        raise typer.Exit(2) from None


@token_cli.command("create")
def create(
    product: str = typer.Option(..., help="Product id; created if new."),
    role: Role = typer.Option(..., help="member, worker or admin."),
    name: str | None = typer.Option(None, help="A name for the token (comment author)."),
    expires_in: str | None = typer.Option(
        None, "--expires-in", help="Lifetime such as 30d, 12h, 45m, 2w (default: never)."
    ),
    replace: bool = typer.Option(
        False, "--replace", help="First revoke the product's active tokens of this --name."
    ),
) -> None:
    """Create a token and print it, alone, on stdout (it is not stored in clear)."""
    try:
        lifetime = parse_duration(expires_in) if expires_in is not None else None
    except FleetError as exc:
        typer.echo(f"error: --{exc.message}", err=True)
        raise typer.Exit(2) from None
    if replace and name is None:
        typer.echo("error: --replace needs --name", err=True)
        raise typer.Exit(2)

    async def work(session: AsyncSession) -> str:
        return await create_token(session, product_id=product, role=role, name=name,
                                  expires_in=lifetime, replace=replace)

    typer.echo(_with_session(work, write=True))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


def _row(token: Token, now: datetime) -> dict[str, object]:
    return {
        "id": token.id, "name": token.name, "product": token.product_id,
        "role": token.role.value, "state": token_state(token, now).value,
        "created": _when(token.created_at), "expires": _when(token.expires_at),
        "lastUsed": _when(token.last_used_at),
    }


@token_cli.command("list")
def list_command(
    product: str | None = typer.Option(None, help="Only this product's tokens."),
    show_all: bool = typer.Option(False, "--all", help="Also revoked and expired tokens."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List tokens: id, name, product, role, created, expires, last used (never the secret).

    Last use is recorded at most once a minute per token."""

    async def work(session: AsyncSession) -> list[Token]:
        return await list_tokens(session, product, include_inactive=show_all)

    now = utcnow()
    rows = [_row(token, now) for token in _with_session(work, write=False)]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table(box=None, header_style="bold")
    columns = ["id", "name", "product", "role", "created", "expires", "last used"]
    if show_all:
        columns.insert(4, "state")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row["lastUsed" if c == "last used" else c]) for c in columns))
    Console(width=200).print(table)
    if not rows:
        typer.echo("no tokens" + (" (--all shows revoked and expired ones)" if not show_all
                                  else ""), err=True)


@token_cli.command("revoke")
def revoke(token_id: int = typer.Argument(..., help="The id shown by `token list`.")) -> None:
    """Revoke a token: its next request is UNAUTHENTICATED and its open websockets are
    closed (4403) within seconds on every instance."""

    async def work(session: AsyncSession) -> tuple[Token, bool]:
        return await revoke_token(session, token_id)

    token, changed = _with_session(work, write=True)
    what = f"token {token.id} ({token.name}, {token.product_id}/{token.role.value})"
    typer.echo(f"revoked {what}" if changed else f"{what} was already revoked", err=True)
