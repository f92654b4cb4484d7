"""One snapshot per query operation (DESIGN §8, issue 11 item 5).

graphql-core resolves the root fields of a query concurrently; if each read in its
own session, a change committed between two of them could be in one and not the
other — `viewer { eventCursor }` could cover an item that `items` lacks.  So every
read of one query operation goes through one read-only transaction:

* `OneSnapshotPerQuery` (a schema extension) opens a `Snapshot` around the
  execution of each `query` operation (not mutations: each mutation field is its
  own unit of work; not subscriptions: each event is read when it is delivered);
* `Context.read()` hands the resolvers and DataLoaders its session, one at a time
  (an `AsyncSession` is not safe for concurrent use), or a fresh read session
  outside a query;
* the transaction begins with the first read and ends with the operation: on
  PostgreSQL `REPEATABLE READ READ ONLY`, on SQLite one deferred read transaction
  (WAL keeps its snapshot from its first read).

A store failure inside it leaves as SERVICE_UNAVAILABLE (app.uow) and the rest of
the operation's reads fail the same way; any other database error ends the
transaction and the next read begins a new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

from app.errors import StoreUnavailableError
from app.uow import Database, is_store_failure, store_unavailable

_current: ContextVar[Snapshot | None] = ContextVar("fleet_query_snapshot", default=None)


class Snapshot:
    """The read transaction shared by the resolvers of one query operation."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = asyncio.Lock()
        self._scope: AbstractAsyncContextManager[AsyncSession] | None = None
        self._session: AsyncSession | None = None
        self._failure: StoreUnavailableError | None = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """The snapshot's session, for one resolver or loader at a time.  Raises
        StoreUnavailableError when the store failed (now or earlier in the operation)."""
        async with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._session is None:
                self._scope = self.db.snapshot()
                self._session = await self._scope.__aenter__()
            try:
                yield self._session
            except Exception as exc:
                if is_store_failure(exc):
                    self._failure = store_unavailable(exc)
                    await self._end(exc)
                    raise self._failure from exc
                if isinstance(exc, sa_exc.DBAPIError):  # the transaction is aborted
                    await self._end(exc)
                raise

    async def close(self) -> None:
        async with self._lock:
            await self._end(None)

    async def _end(self, exc: BaseException | None) -> None:
        scope, self._scope, self._session = self._scope, None, None
        if scope is None:
            return
        try:
            if exc is None:
                await scope.__aexit__(None, None, None)
            else:
                await scope.__aexit__(type(exc), exc, exc.__traceback__)
        except Exception:  # what ended it is already being reported
            if exc is None:
                raise


def read_session(db: Database) -> AbstractAsyncContextManager[AsyncSession]:
    """Inside a query operation its snapshot's session; elsewhere a fresh read session."""
    snapshot = _current.get()
    return snapshot.read() if snapshot is not None and snapshot.db is db else db.read()


class OneSnapshotPerQuery(SchemaExtension):
    """Runs each query operation's resolvers in one `Snapshot`."""

    async def on_execute(self) -> AsyncIterator[None]:
        context: Any = self.execution_context.context
        db = getattr(context, "db", None)
        try:
            is_query = self.execution_context.operation_type is OperationType.QUERY
        except Exception:  # no single operation to run: nothing will read
            is_query = False
        if not is_query or not isinstance(db, Database):
            yield
            return
        snapshot = Snapshot(db)
        token = _current.set(snapshot)
        try:
            yield
        finally:
            _current.reset(token)
            await snapshot.close()
