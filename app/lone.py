"""A unit of work that runs alone on a pooled connection's driver (PostgreSQL).

`Database.unit_of_work(one_call=True)` (app.uow) declares that the caller makes one
service call in it and nothing else — the lease holder's mutations.  The service
may then ask for the `LoneUnit` (`lone_unit(session)`, None when not granted) and
run its statements on asyncpg directly, with no SQLAlchemy session, execution
context or greenlet hop in between:

* `run(work, then, transaction=False)`: `work` sends ONE statement, which is its own
  implicit transaction: PostgreSQL commits it when it ends.  No BEGIN and no COMMIT
  round trip, and any row lock it takes (the product row the event sequence bumps,
  app.events.outbox) is held only while the server runs it, not while a client
  round trip and the client's event loop go by.
* `run(work, then, transaction=True)`: BEGIN, `work`'s statements, COMMIT.

Why commit order is still sequence order (DESIGN §5).  A change-with-event
statement bumps `products.last_event_seq` with an UPDATE; that row lock is held
until the transaction ends — for an implicit transaction, until the statement's own
commit, exactly as for an explicit one.  A concurrent bump waits for the lock, and
under READ COMMITTED re-reads the committed row, so it gets the next number, and it
can only commit after the first one has committed and become visible (PostgreSQL
releases a transaction's locks after its commit is recorded and visible).  Hence
seq n+1 commits after seq n, every snapshot that shows n+1 shows n, and NOTIFY —
queued at commit, under the same lock — reaches listeners in sequence order.

The unit of work's contract holds:
* the service does not commit: `run` does, as the unit of work's machinery, and
  only because the caller declared the call to be the whole unit of work; once a
  call has changed something (`work` returned a row), the session is *sealed*:
  any further statement, flush or pending ORM change is a RuntimeError, so nothing
  can silently run outside that transaction;
* side effects only after commit: `then`, called once committed, remembers the
  event records on the session; the unit of work publishes them when it ends — and `run` runs to
  completion in a task of its own, so a caller cancelled meanwhile (a client gone)
  cannot leave a committed change unpublished;
* store failures leave as the driver's errors, which app.uow turns into
  SERVICE_UNAVAILABLE; the connection is then invalidated;
* a dead pooled connection is replaced once: one found closed when handed out, and
  (explicit transaction) a BEGIN that fails on a lost connection, run again on a
  fresh one — nothing was sent, or nothing committed.  A single statement whose
  connection is lost while it runs is not run again: it may have committed, as a
  COMMIT cut off may have (SERVICE_UNAVAILABLE).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.tasks import run_to_completion

LONE_KEY = "fleet.lone_unit"
T = TypeVar("T")
R = TypeVar("R")
Work = Callable[[Any], Awaitable[R | None]]

_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)


class LoneUnit:
    retried = 0  # connections replaced (process-wide; tests, diagnostics)

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.used = False
        self.sealed = False

    async def run(self, work: Work[R], then: Callable[[R], T], *,
                  transaction: bool) -> T | None:
        """`work(driver)` on an asyncpg connection of the pool, alone (see the module
        docstring); None when it found nothing to change (it returned None), else
        `then` of what it returned, called once committed — at once, so that the
        locks of an explicit transaction are held no longer than they must be."""
        self.used = True
        return await run_to_completion(self._run(work, then, transaction))

    async def _run(self, work: Work[R], then: Callable[[R], T],
                   transaction: bool) -> T | None:
        for attempt in (1, 2):
            fairy = await self.engine.raw_connection()
            driver: Any = fairy.driver_connection
            replace = driver is None or driver.is_closed()
            if not replace and transaction:
                try:
                    await driver.execute("BEGIN")
                except _LOST:
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
            fairy.close()  # back to the pool, idle (nothing to reset)
            if done is None:
                return None
            self.sealed = True
            return then(done)
        raise AssertionError("unreachable")


def lone_unit(session: AsyncSession) -> LoneUnit | None:
    """The session's `LoneUnit` when its unit of work was opened with `one_call=True`
    (PostgreSQL), the unit has not run yet and nothing else ran in the session."""
    lone: LoneUnit | None = session.info.get(LONE_KEY)
    if lone is None or lone.used or session.in_transaction() or session.identity_map:
        return None
    return lone


def sealed(session: AsyncSession) -> bool:
    """True once the session's one call changed something alone (and committed)."""
    lone: LoneUnit | None = session.info.get(LONE_KEY)
    return lone is not None and lone.sealed
