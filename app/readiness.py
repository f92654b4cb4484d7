"""Readiness (`/readyz`, issue 10 item 6): the database answers within a few
seconds and its migrations are at head.  A problem is one line of text (the caller
logs it as one warning and answers 503); never a traceback."""

from __future__ import annotations

import asyncio
from functools import cache

from alembic.script import ScriptDirectory
from sqlalchemy import text

from app.metrics import describe_failure
from app.migrate import alembic_config
from app.uow import Database


@cache
def head_revisions() -> frozenset[str]:
    """The migration heads the code ships (read once from the migration scripts)."""
    return frozenset(ScriptDirectory.from_config(alembic_config("")).get_heads())


async def check_ready(db: Database, timeout: float) -> str | None:
    """None when ready; otherwise what is wrong, in one line.  Bounded by `timeout`
    seconds (FLEET_DB_TIMEOUT_SECONDS): a silent partition answers in time."""
    try:
        async with asyncio.timeout(timeout):
            async with db.read() as session:
                result = await session.execute(text("SELECT version_num FROM alembic_version"))
                current = frozenset(result.scalars())
    except Exception as exc:
        if "alembic_version" in str(exc):
            return "the database is not migrated (run `fleetbridge migrate`)"
        return f"the database does not answer: {describe_failure(exc)}"
    heads = head_revisions()
    if current != heads:
        return (
            f"the database is at migration {', '.join(sorted(current)) or 'none'}, the code "
            f"at {', '.join(sorted(heads))} (run `fleetbridge migrate`)"
        )
    return None
