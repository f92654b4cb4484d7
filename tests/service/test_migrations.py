"""The Alembic migrations: down to base and up again on both stores, and the
migrated schema matches the models exactly."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from app.db import Base, create_engine
from app.migrate import downgrade, upgrade

TABLES = {"products", "tokens", "items", "comments", "jobs", "events"}


def _inspect(database_url: str) -> tuple[set[str], list[object]]:
    def read(connection: Connection) -> tuple[set[str], list[object]]:
        names = set(inspect(connection).get_table_names())
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        return names, list(diff)

    async def run() -> tuple[set[str], list[object]]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(read)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    tables, diff = _inspect(database_url)
    assert tables >= TABLES
    assert diff == []


def test_downgrade_to_base_then_upgrade_again(database_url: str) -> None:
    downgrade(database_url, "base")
    tables, _ = _inspect(database_url)
    assert not tables & TABLES

    upgrade(database_url)
    tables, diff = _inspect(database_url)
    assert tables >= TABLES
    assert diff == []
