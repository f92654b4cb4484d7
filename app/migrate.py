"""Running the Alembic migrations from code (the CLI, `serve`, `/readyz` and the tests).

The migrations ship inside the package (`app/migrations`, found with
`importlib.resources`), so an installed wheel migrates from any working directory.
The Alembic configuration is built here; the repository's `alembic.ini` is only for
developers running the `alembic` command itself.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import create_engine
from app.redact import mask_url


def script_location() -> Path:
    """The directory holding env.py and versions/ (inside the installed package)."""
    location = resources.files("app.migrations")
    if not isinstance(location, Path):  # a zipped install cannot be migrated from
        raise RuntimeError(f"the migrations must be installed as files, not {location!r}")
    return location


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def head_revision() -> str | None:
    """The newest revision this version of fleetbridge ships."""
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database to `revision`.  Must not be called from a running event loop."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def is_empty(database_url: str) -> bool:
    """True when the database has no tables at all (a new SQLite file, say)."""

    async def check() -> bool:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as connection:
                names = await connection.run_sync(lambda c: inspect(c).get_table_names())
        finally:
            await engine.dispose()
        return not names

    return asyncio.run(check())


class NotMigratedError(Exception):
    """The database is missing, empty or behind this version's migrations."""


def sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite URL (None for other stores and in-memory databases)."""
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


async def require_migrated(engine: AsyncEngine, database_url: str) -> None:
    """Raise NotMigratedError unless the database is at this version's head revision.

    A SQLite file that does not exist is reported without being created (call this
    before anything connects)."""
    advice = "run `fleetbridge migrate` first"
    path = sqlite_file(database_url)
    if path is not None and not path.exists():
        raise NotMigratedError(f"there is no database at {path}; {advice}")
    async with engine.connect() as connection:
        current = await connection.run_sync(
            lambda c: MigrationContext.configure(c).get_current_revision()
        )
    head = head_revision()
    if current is None:
        raise NotMigratedError(f"the database {mask_url(database_url)} has not been "
                               f"migrated; {advice}")
    if current != head:
        raise NotMigratedError(f"the database is at revision {current}, this fleetbridge "
                               f"needs {head}; {advice}")
