"""Sessions and units of work.

One `AsyncSession` per request or unit of work.  Services receive the session and
never commit; `Database.unit_of_work()` commits (or rolls back), and only after a
successful commit hands the recorded events to `on_commit` (publishing, echo).
Reads use `Database.read()`, a session whose transaction is simply closed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import writer_engine
from app.errors import StoreUnavailableError
from app.events.outbox import EventRecord, discard_recorded, take_recorded

logger = logging.getLogger(__name__)

# What a database that cannot be reached raises: SQLAlchemy's wrappers, and the raw
# socket errors asyncpg lets through while connecting.
_UNAVAILABLE = (OperationalError, InterfaceError, OSError, TimeoutError)

CommitHook = Callable[[Sequence[EventRecord]], Awaitable[None]]


class Database:
    def __init__(self, engine: AsyncEngine, on_commit: CommitHook | None = None) -> None:
        self.engine = engine
        self.on_commit = on_commit
        self._reader = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        self._writer = async_sessionmaker(
            writer_engine(engine), expire_on_commit=False, autoflush=False
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._reader() as session:
                yield session
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError("the database is unavailable; try again") from exc

    @asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: commit on success, roll back on any error.

        On SQLite the transaction takes the write lock when it begins, so units of
        work never interleave and never fail with "database is locked".
        """
        try:
            async with self._writer() as session:
                try:
                    yield session
                    await session.commit()
                except BaseException:
                    discard_recorded(session)
                    await session.rollback()
                    raise
                records = take_recorded(session)
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError("the database is unavailable; try again") from exc
        if records and self.on_commit is not None:
            await self.on_commit(records)

    async def dispose(self) -> None:
        await self.engine.dispose()
