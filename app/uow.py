"""Sessions and units of work, and the one place database failures are translated.

One `AsyncSession` per request or unit of work.  Services receive the session and
never commit; `Database.unit_of_work()` commits (or rolls back), and only after a
successful commit hands the recorded events to `on_commit` (publishing, echo).
Reads use `Database.read()`, a session whose transaction is simply closed.

Every failure of the store itself — unreachable, connection cut or closed in the
middle of an operation, connect/statement/pool timeout, server shutting down,
SQLite lock wait exhausted — leaves `read()` and `unit_of_work()` as
`StoreUnavailableError` (SERVICE_UNAVAILABLE, DESIGN §8), raised `from` the driver
error (`store_unavailable`).  The connection it happened on is invalidated (closed
without a round trip), so nothing waits on a dead peer and the pool never hands it
out again.  A unit of work that failed committed nothing; one whose COMMIT itself
was cut off may or may not have committed, all of it or none of it.

One exception: a pooled connection that was already dead when it was handed out
(the pool does not ping, app.db) fails the statement that began the transaction;
that one statement runs again, once, on a fresh connection (`FleetSession`), so a
database restart or a killed backend costs no request an error.

A unit of work whose caller makes one service call and nothing else in it
(`unit_of_work(one_call=True)`: the lease holder's mutations) lets that call run
its statements on a pooled connection's driver with no SQLAlchemy session in
between (`app.lone.LoneUnit`): on PostgreSQL a single statement as its own implicit
transaction — no BEGIN, no COMMIT round trip — or a few in one explicit transaction
that the unit of work commits itself; on SQLite BEGIN, the statements and COMMIT in
one hop to the writer connection's thread.  The contract is the same: the service
never commits, events are published only after the commit, store failures are
SERVICE_UNAVAILABLE, a connection dead when handed out is replaced once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import SqliteWriter, snapshot_engine, sqlite_writer, writer_engine
from app.errors import StoreUnavailableError
from app.events.outbox import EventRecord, discard_recorded, take_recorded
from app.lone import LONE_KEY, LoneUnit, sealed
from app.tasks import run_to_completion

logger = logging.getLogger(__name__)

UNAVAILABLE_MESSAGE = "the database is unavailable; try again"

# SQLSTATE classes of a store that cannot serve now, all safe to retry: 08
# connection exception, 40 transaction rollback (serialization, deadlock), 53
# insufficient resources, 55P03 lock not available, 57 operator intervention
# (statement_timeout's query_canceled, admin shutdown, cannot connect now), 58
# system error.
_RETRYABLE_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")
_RETRYABLE_SQLSTATES = ("55P03",)

# Exceptions that mean the store (or the way to it) failed, whatever wraps them.
_STORE_FAILURES: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,  # SQLite: locked, unable to open; PostgreSQL: connect errors
    sa_exc.InterfaceError,  # connection closed in the middle of an operation
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # the pool had no connection to give within pool_timeout
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # asyncpg's ConnectionDoesNotExistError and friends
    OSError,  # raw socket errors asyncpg lets through while connecting
    TimeoutError,  # asyncpg's connect timeout and command_timeout
)

CommitHook = Callable[[Sequence[EventRecord]], Awaitable[None]]
T = TypeVar("T")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's
        current = orig if isinstance(orig, BaseException) else (
            current.__cause__ or current.__context__
        )


def is_store_failure(exc: BaseException) -> bool:
    """True when `exc` (or what it wraps) says the store could not serve, as opposed
    to a refused statement (constraint, bad SQL) or a domain error."""
    for error in _chain(exc):
        if isinstance(error, (StoreUnavailableError, *_STORE_FAILURES)):
            return True
        if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
            return True
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and (
            sqlstate[:2] in _RETRYABLE_SQLSTATE_CLASSES or sqlstate in _RETRYABLE_SQLSTATES
        ):
            return True
    return False


def found_dead(exc: BaseException) -> bool:
    """True when `exc` says the pooled connection a statement ran on was already dead
    (SQLAlchemy saw a disconnect and invalidated it, and with it the pool's older
    connections) — not a timeout, which a second try would only wait out again."""
    return (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
        and not any(isinstance(error, TimeoutError | sa_exc.TimeoutError)
                    for error in _chain(exc))
    )


class FleetSession(AsyncSession):
    """An AsyncSession whose first statement is retried once, on a fresh connection,
    when the pooled connection it was handed turns out to be dead (`found_dead`).

    The pool does not ping a connection before handing it out (app.db), so a server
    restart or a killed backend shows up as the failure of the first statement that
    uses it.  That statement began the transaction — nothing was pending, nothing was
    loaded, nothing else ran in it — so running it again on a new connection is
    the same as having been given a good one: the request succeeds instead of
    answering SERVICE_UNAVAILABLE.  Only `execute` (and `scalars`, through it),
    `scalar` and `get` are retried, and only when they begin the session's first
    transaction; any later failure is reported as before.  A second failure, or a
    connect that fails, is SERVICE_UNAVAILABLE as always.
    """

    retried = 0  # first statements run again (process-wide; tests, diagnostics)

    def _first_statement(self) -> bool:
        if sealed(self):
            raise RuntimeError("this unit of work ran its one call alone; it takes nothing more")
        return not self.in_transaction() and not self.identity_map

    async def _retried(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except sa_exc.DBAPIError as exc:
            if not found_dead(exc):
                raise
            logger.info("a pooled connection was dead (%s); retrying on a fresh one",
                        type(exc.orig).__name__ if exc.orig is not None else "?")
        await self.rollback()
        FleetSession.retried += 1
        return await call()

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        if not self._first_statement():
            return await super().execute(*args, **kwargs)
        return await self._retried(lambda: super(FleetSession, self).execute(*args, **kwargs))

    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        if not self._first_statement():
            return await super().scalar(*args, **kwargs)
        return await self._retried(lambda: super(FleetSession, self).scalar(*args, **kwargs))

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        if not self._first_statement():
            return await super().get(*args, **kwargs)
        return await self._retried(lambda: super(FleetSession, self).get(*args, **kwargs))

    async def connection(self, *args: Any, **kwargs: Any) -> Any:
        self._first_statement()  # refused once sealed
        return await super().connection(*args, **kwargs)

    async def flush(self, objects: Sequence[Any] | None = None) -> None:
        self._first_statement()
        await super().flush(objects)


def store_unavailable(exc: BaseException) -> StoreUnavailableError:
    """The client-facing error for a store failure (raise it `from exc`)."""
    if isinstance(exc, StoreUnavailableError):
        return exc
    logger.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return StoreUnavailableError(UNAVAILABLE_MESSAGE)


class Database:
    def __init__(self, engine: AsyncEngine, on_commit: CommitHook | None = None) -> None:
        self.engine = engine
        self.on_commit = on_commit
        # Fault seam (tests): awaited with the committed events in the caller's task right
        # after a commit, before they are published (to cancel the caller just there).
        self.after_commit: CommitHook | None = None
        options: dict[str, Any] = {
            "class_": FleetSession, "expire_on_commit": False, "autoflush": False,
        }
        self._options = options
        self._reader = async_sessionmaker(engine, **options)
        self._snapshot = async_sessionmaker(snapshot_engine(engine), **options)
        # SQLite: units of work have one connection of their own (app.db.sqlite_writer),
        # made at the first unit of work; elsewhere they share `engine`'s pool.
        # Event listeners on `engine` see their statements too.
        self._writer: async_sessionmaker[AsyncSession] | None = None
        self._sqlite_writer: SqliteWriter | None = None

    @property
    def writer_engine(self) -> AsyncEngine | None:
        """SQLite: the engine units of work run on (its pool: one connection), once
        one has run; None elsewhere."""
        return self._sqlite_writer.engine if self._sqlite_writer is not None else None

    def _writer_sessions(self) -> async_sessionmaker[AsyncSession]:
        if self._writer is None:
            self._sqlite_writer = sqlite_writer(self.engine)
            self._writer = async_sessionmaker(
                self.writer_engine or writer_engine(self.engine), **self._options
            )
        return self._writer

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read session; store failures leave as `StoreUnavailableError`."""
        async with self.session(self._reader, commit=False) as session:
            yield session

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncSession]:
        """A read-only transaction whose reads all see one snapshot (one query
        operation's, app.graphql.snapshot); store failures as in `read()`."""
        async with self.session(self._snapshot, commit=False) as session:
            yield session

    @asynccontextmanager
    async def unit_of_work(self, *, one_call: bool = False) -> AsyncIterator[AsyncSession]:
        """A write transaction: commit on success, roll back on any error.

        `one_call`: the caller makes one service call in it and nothing else, so that
        call may run alone on a driver connection (`LoneUnit`; on SQLite the writer
        connection); once it has changed something the session refuses any further
        statement.

        On SQLite units of work run on one connection of their own (the process's
        writers queue for it in the pool) and take the write lock when they begin,
        so they never interleave and never fail with "database is locked" (unless
        the connection or, held by another process, the lock is not free within
        FLEET_DB_TIMEOUT_SECONDS: SERVICE_UNAVAILABLE).

        Once the commit has happened, its events are handed to `on_commit` even if the
        caller is cancelled meanwhile (a client dropping its socket): the commit and
        the publishing each run to completion in a task of their own, and the
        cancellation goes through afterwards (issue 11 "no lost live event").
        """
        committed: list[list[EventRecord]] = []
        try:
            async with self.session(
                self._writer_sessions(), commit=True, committed=committed,
                lone=(self.writer_engine or self.engine) if one_call else None,
            ) as session:
                yield session
            if self.after_commit is not None:
                await self.after_commit(committed[0])
        finally:
            if committed and committed[0] and self.on_commit is not None:
                await run_to_completion(self.on_commit(committed[0]))

    async def published(self, records: Sequence[EventRecord]) -> None:
        """Hand the events of a transaction that committed outside any unit of work (a
        statement run alone on a pooled connection's driver, app.bridge.echo_lean) to
        `after_commit` and `on_commit`, as `unit_of_work` hands its own; the publishing
        runs to completion even if the caller is cancelled meanwhile."""
        try:
            if self.after_commit is not None:
                await self.after_commit(records)
        finally:
            if records and self.on_commit is not None:
                await run_to_completion(self.on_commit(records))

    @asynccontextmanager
    async def session(
        self, maker: async_sessionmaker[AsyncSession], *, commit: bool,
        committed: list[list[EventRecord]] | None = None, lone: AsyncEngine | None = None,
    ) -> AsyncIterator[AsyncSession]:
        """The one place a session ends: committed (`commit`), closed, rolled back on
        an error, or invalidated on a store failure — which leaves as
        `StoreUnavailableError` raised from the driver's error.  The commit runs to
        completion even if the caller is cancelled; its recorded events are appended
        to `committed` as soon as it succeeded."""
        done: list[list[EventRecord]] = [] if committed is None else committed
        session = maker()
        if lone is not None:  # the engine its one call may run alone on (app.lone)
            session.info[LONE_KEY] = LoneUnit(lone)
        try:
            try:
                yield session
                if commit:
                    if sealed(session):  # committed by its one call (LoneUnit)
                        _check_nothing_pending(session)
                        done.append(take_recorded(session))
                    else:
                        await run_to_completion(_commit(session, done))
            except BaseException as exc:
                if not done and sealed(session):  # committed alone: publish what it recorded
                    done.append(take_recorded(session))
                if done:  # committed; only the caller was cancelled meanwhile
                    raise
                discard_recorded(session)
                # Cancelled mid-statement, the connection's state is unknown: drop it too.
                if isinstance(exc, asyncio.CancelledError) or is_store_failure(exc):
                    await _invalidate(session)
                else:
                    await session.rollback()
                raise
            finally:
                await _close(session)
        except Exception as exc:
            if is_store_failure(exc):
                raise store_unavailable(exc) from exc
            raise

    async def dispose(self) -> None:
        if self._sqlite_writer is not None:
            await self._sqlite_writer.owner.dispose()
        await self.engine.dispose()


async def _close(session: AsyncSession) -> None:
    """Close `session`.  One that holds no transaction (a unit of work whose one
    call ran alone, a read that read nothing) has no connection to give back and
    nothing to tell the driver: closing it is bookkeeping, done here without
    AsyncSession.close's greenlet hop."""
    if session.in_transaction():
        await session.close()
    else:
        session.sync_session.close()


def _check_nothing_pending(session: AsyncSession) -> None:
    if session.new or session.dirty or session.deleted:
        raise RuntimeError("this unit of work ran its one call alone; it takes nothing more")


async def _commit(session: AsyncSession, committed: list[list[EventRecord]]) -> None:
    await session.commit()
    committed.append(take_recorded(session))


async def _invalidate(session: AsyncSession) -> None:
    """Drop the session's connections without talking to the server (it may not answer)."""
    try:
        await asyncio.shield(session.invalidate())
    except Exception:  # the connection is gone either way
        logger.debug("invalidating a failed session raised", exc_info=True)
