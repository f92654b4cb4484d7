"""A unit of work that runs alone on a pooled connection's driver.

`Database.unit_of_work(one_call=True)` (app.uow) declares that the caller makes one
service call in it and nothing else — the lease holder's mutations.  The service
may then ask for the `LoneUnit` (`lone_unit(session)`, None when not granted) and
run its statements on the driver directly, with no SQLAlchemy session, execution
context or greenlet hop in between.  PostgreSQL (asyncpg):

* `run(work, then, transaction=False)`: `work` sends ONE statement, which is its own
  implicit transaction: PostgreSQL commits it when it ends.  No BEGIN and no COMMIT
  round trip, and any row lock it takes (the product row the event sequence bumps,
  app.events.outbox) is held only while the server runs it, not while a client
  round trip and the client's event loop go by.
* `run(work, then, transaction=True)`: BEGIN, `work`'s statements, COMMIT.

SQLite (aiosqlite, the process's one writer connection): `run_sqlite(work, then)`:
BEGIN IMMEDIATE, `work`'s statements and COMMIT in ONE hop to the driver's thread
(`SqliteHop`), where a session takes a hop for each of them and one more for the
pool's reset-on-return ROLLBACK.

Why commit order is still sequence order (DESIGN §5).  A change-with-event
statement bumps `products.last_event_seq` with an UPDATE; that row lock is held
until the transaction ends — for an implicit transaction, until the statement's own
commit, exactly as for an explicit one.  A concurrent bump waits for the lock, and
under READ COMMITTED re-reads the committed row, so it gets the next number, and it
can only commit after the first one has committed and become visible (PostgreSQL
releases a transaction's locks after its commit is recorded and visible).  Hence
seq n+1 commits after seq n, every snapshot that shows n+1 shows n, and NOTIFY —
queued at commit, under the same lock — reaches listeners in sequence order.

Group commit (`run_queued`, app.fleet.change_groups).  While one change of a product
is in flight, the process's next changes of it queue, and then run as ONE implicit
transaction: asyncpg's `fetchmany`, one Bind and Execute per change and a single
Sync.  The argument above holds for that transaction of N statements: the first
bump takes the row lock and keeps it to the end, so the N bumps take N consecutive
numbers with nobody else's in between, and all N commit at once — a snapshot shows
none of them or all of them, each after every number before it; the NOTIFYs are
queued at that one commit, in statement order.

The unit of work's contract holds:
* the service does not commit: `run` does, as the unit of work's machinery, and
  only because the caller declared the call to be the whole unit of work; once a
  call has changed something (`work` returned a row), the session is *sealed*:
  any further statement, flush or pending ORM change is a RuntimeError, so nothing
  can silently run outside that transaction;
* side effects only after commit: `then`, called once committed, remembers the
  event records on the session; the unit of work publishes them when it ends — and
  the run goes to completion in a task of its own, so a caller cancelled meanwhile
  (a client gone) cannot leave a committed change unpublished;
* store failures leave as the driver's errors (SQLite's as SQLAlchemy's DBAPIError),
  which app.uow turns into SERVICE_UNAVAILABLE; a PostgreSQL connection is then
  invalidated (a SQLite one was rolled back in its thread and goes back to the pool);
* a dead pooled connection is replaced once: one found closed when handed out, and
  (explicit transaction) a BEGIN that fails on a lost connection, run again on a
  fresh one — nothing was sent, or nothing committed.  A single statement whose
  connection is lost while it runs is not run again: it may have committed, as a
  COMMIT cut off may have (SERVICE_UNAVAILABLE).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import asyncpg
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.util import greenlet_spawn

from app.tasks import run_to_completion

LONE_KEY = "fleet.lone_unit"
T = TypeVar("T")
R = TypeVar("R")
Work = Callable[[Any], Awaitable[R | None]]

LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)


class LoneUnit:
    retried = 0  # connections replaced (process-wide; tests, diagnostics)

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.used = False
        self.sealed = False

    async def run(self, work: Work[R], then: Callable[[R], T], *,
                  transaction: bool) -> T | None:
        """PostgreSQL: `work(driver)` on an asyncpg connection of the pool, alone (see
        the module docstring); None when it found nothing to change (it returned None), else
        `then` of what it returned, called once committed — at once, so that the
        locks of an explicit transaction are held no longer than they must be."""
        self.used = True
        return await run_to_completion(self._run(work, then, transaction))

    async def run_queued(self, done: Callable[[], Awaitable[R | None]],
                         then: Callable[[R], T]) -> T | None:
        """PostgreSQL: as `run`, for a statement another task runs for this call — the
        group commit of `app.fleet.change_groups`: `done()` waits until it has run
        (committed) and returns its row, or None when it changed nothing."""
        self.used = True
        return await run_to_completion(self._finish(done, then))

    async def _run(self, work: Work[R], then: Callable[[R], T],
                   transaction: bool) -> T | None:
        return await self._finish(lambda: on_driver(self.engine, work, transaction), then)

    async def _finish(self, done: Callable[[], Awaitable[R | None]],
                      then: Callable[[R], T]) -> T | None:
        row = await done()
        if row is None:
            return None
        self.sealed = True
        return then(row)

    async def run_sqlite(self, work: Callable[[SqliteHop], R | None],
                         then: Callable[[R], T]) -> T | None:
        """SQLite: BEGIN IMMEDIATE, `work(hop)`, COMMIT — all in ONE hop to the
        writer connection's thread (`SqliteHop`); rolled back when `work` returns
        None (it found nothing to change) or raises.  `then` as in `run`."""
        self.used = True
        return await run_to_completion(self._run_sqlite(work, then))

    async def _run_sqlite(self, work: Callable[[SqliteHop], R | None],
                          then: Callable[[R], T]) -> T | None:

        def unit(hop: SqliteHop) -> R | None:
            assert hop.connection is not None
            hop.connection.execute("BEGIN IMMEDIATE")  # waits for another process's writer
            try:
                done = work(hop)
                hop.connection.execute("COMMIT" if done is not None else "ROLLBACK")
            except BaseException:
                if hop.connection.in_transaction:
                    hop.connection.execute("ROLLBACK")
                raise
            return done

        fairy = await self.engine.raw_connection()
        try:
            done = await SqliteHop(self.engine.dialect).call(
                fairy.driver_connection, unit, self.engine.sync_engine)
        except BaseException as exc:
            if isinstance(exc, DBAPIError):
                await _give_back(fairy)  # the transaction was rolled back or never began
            else:
                fairy.invalidate()
            raise
        await _give_back(fairy)
        if done is None:
            return None
        self.sealed = True
        return then(done)


async def on_driver(engine: AsyncEngine, work: Work[R], transaction: bool) -> R | None:
    """`work(driver)` on an asyncpg connection of `engine`'s pool, alone: its own
    implicit transaction (`transaction` False: `work` sends ONE statement, or one
    pipeline of executions ending in one Sync) or BEGIN … COMMIT around it.  A
    connection found dead before anything was sent is replaced once; after a
    failure the connection is invalidated and the error leaves (see the module
    docstring)."""
    for attempt in (1, 2):
        fairy = await engine.raw_connection()
        driver: Any = fairy.driver_connection
        replace = driver is None or driver.is_closed()
        if not replace and transaction:
            try:
                await driver.execute("BEGIN")
            except LOST:
                replace = True
            except BaseException:
                fairy.invalidate()
                raise
        if replace:
            fairy.invalidate()
            if attempt == 2:
                raise asyncpg.InterfaceError("the pooled connection was closed")
            LoneUnit.retried += 1
            continue
        try:
            done = await work(driver)
            if transaction:
                await driver.execute("COMMIT")
        except BaseException:
            fairy.invalidate()  # in a state nobody knows; closed without a round trip
            raise
        await _give_back(fairy)
        return done
    raise AssertionError("unreachable")


class SqliteHop:
    """SQLite: several statements in ONE hop to the aiosqlite thread — `fn(hop)` runs
    there, calling `SqliteStatement.run(hop, …)` (pure Python besides: no awaiting,
    no session).  `sent` lists what ran, for the cursor listeners, which are told in
    the event loop's thread once the hop is back."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.connection: sqlite3.Connection | None = None
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def call(self, driver: Any, fn: Callable[[SqliteHop], T],
                   events: Connection | Engine | None) -> T:
        """`fn(self)` on aiosqlite connection `driver`'s thread; sqlite3 errors leave
        as SQLAlchemy's DBAPIError, like any statement's."""

        def in_thread() -> T:
            self.connection = driver._conn  # the thread's own sqlite3 connection
            return fn(self)

        try:
            return cast(T, await driver._execute(in_thread))
        except sqlite3.Error as exc:
            sql, values = self.sent[-1] if self.sent else ("", {})
            raise DBAPIError.instance(sql, values, exc, sqlite3.Error,
                                      dialect=self.dialect) from exc
        finally:
            self.tell(events)

    def tell(self, events: Connection | Engine | None) -> None:
        if events is None:
            return
        dispatch = events.dispatch
        conn = events if isinstance(events, Connection) else None
        for sql, values in self.sent:
            if dispatch.before_cursor_execute:
                dispatch.before_cursor_execute(conn, None, sql, values, None, False)
            if dispatch.after_cursor_execute:
                dispatch.after_cursor_execute(conn, None, sql, values, None, False)


async def _give_back(fairy: Any) -> None:
    """Return a pooled connection whose transaction has ended (committed or rolled
    back on the driver) without the pool's reset-on-return ROLLBACK, a round trip (on
    SQLite a hop to the driver's thread), the way SQLAlchemy's own Connection returns
    one after its COMMIT.  In a greenlet: a pool already full of idle connections
    closes an overflow one instead, and that close awaits the driver."""
    await greenlet_spawn(fairy._close_special, transaction_reset=True)


def lone_unit(session: AsyncSession) -> LoneUnit | None:
    """The session's `LoneUnit` when its unit of work was opened with `one_call=True`,
    the unit has not run yet and nothing else ran in the session."""
    lone: LoneUnit | None = session.info.get(LONE_KEY)
    if lone is None or lone.used or session.in_transaction() or session.identity_map:
        return None
    return lone


def sealed(session: AsyncSession) -> bool:
    """True once the session's one call changed something alone (and committed)."""
    lone: LoneUnit | None = session.info.get(LONE_KEY)
    return lone is not None and lone.sealed
