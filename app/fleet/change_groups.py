"""Group commit of a product's job changes on PostgreSQL (issue 12).

A change-with-event statement (`app.fleet.changes.pg_with_event`: a transition, a
release) bumps its product's `last_event_seq`, and that row lock is held until the
statement's transaction has committed and its WAL is flushed: one product's changes
commit strictly one after the other, each paying a commit of its own.  Run alone
(`app.lone`, a unit of work of one call), a change goes through the `GroupCommit`
(app.bridge.group_commit) of its product and statement in this process:

* nothing of that kind in flight: it runs at once, alone, exactly as without this
  module (`LoneUnit.run` of `statement.fetch`, its own implicit transaction, one
  round trip, in the caller's call);
* else it queues in the group, whose run waits until the change in flight is done
  (the one alone, or the group's previous run); then every change that queued
  meanwhile runs as ONE implicit transaction in ONE round trip: asyncpg's
  `fetchmany` (`PgStatement.fetch_many`: a Bind and an Execute for each, one Sync
  at the end).  No timer: a change never waits for company, only for the run ahead.

The batch uses the statement's `grouped` variant, whose job lock is `FOR UPDATE SKIP
LOCKED`: within the batch each execution holds the product row once the first has
bumped it, and must then never wait for a job row someone else holds (that one may
be waiting for the product row: a deadlock).  A member whose job was locked, or whose
change was refused (the UPDATE matched nothing), returned no row: it runs again
alone, with the plain statement, and gets that answer (None for a refusal, which the
service then explains; the job for a change that had only met a lock).

Results go back by job id (each row carries it); two changes of the same job never
share a batch — the later one runs alone after it.

Failures.  The batch is one implicit transaction, so an error the server reports
(a constraint, a deadlock, a timeout; or one of the arguments refused before the
Sync, which asyncpg rolls back) means nothing of it committed: each member then runs
alone, so one bad change cannot fail the others.  A connection lost while the batch
ran (`app.lone.LOST`) may have committed it — the Sync may have been processed even
if its answer never came — so, as for one statement alone, nothing is run again:
each member fails with that error (SERVICE_UNAVAILABLE).

Sequences (DESIGN §5).  The executions of a batch run one after another in one
transaction: the first bumps the product's sequence and keeps the row locked until
the transaction ends, so the next ones take the next numbers, gap-free, with no other
transaction's number in between; the batch commits all of them at once, so every
snapshot shows none or all of them, after every number before them (the argument of
`app.lone`, for a transaction of N events instead of one) — and their NOTIFYs are
delivered at that commit, in order.  Across processes the product row serializes the
batches as it serializes single statements.

The flights themselves (`Flight`, `in_flight`: alone when idle, else queue for the
group's next run) serve other requests too: a product's claims
(app.fleet.claim_batch), whose batch is an explicit transaction instead.

Cancellation: the caller awaits its change through `LoneUnit.run` or
`LoneUnit.run_queued`, in a task its cancellation cannot stop, and a group's run is a
task of its own: a committed change is always handed back, and its event published.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from app.bridge.group_commit import GroupCommit, Take
from app.fleet.statements import KEYS, PgStatement
from app.lone import LOST, LoneUnit, R, Work, on_driver

logger = logging.getLogger(__name__)
_ID = KEYS.index("id")
Row = Sequence[Any]
T = TypeVar("T")


@dataclass(kw_only=True)
class Request:
    """One caller's request in a group: what its run made of it (`row`, or `error`),
    and whether it ran at all."""

    row: Any = None
    error: BaseException | None = None
    ran: bool = False

    def served(self) -> Any:
        """What the run made of the request: its row (None: it changed nothing), or
        its error raised."""
        if self.error is not None:
            raise self.error
        if not self.ran:
            raise asyncpg.InterfaceError("the group's run ended before this one ran")
        return self.row


@dataclass
class _Change(Request):
    """One caller's change: `statement` with `args`, for job `job_id`."""

    statement: PgStatement
    grouped: PgStatement
    args: dict[str, Any]
    job_id: int


@dataclass
class Stats:
    """Process-wide counters (tests, diagnostics)."""

    batches: int = 0  # fetch_many round trips that committed
    batched: int = 0  # changes those carried
    failed: int = 0  # batches that raised and were run again alone
    again: int = 0  # members that returned no row and ran again alone
    claim_batches: int = 0  # claim batches committed (app.fleet.claim)
    claims_batched: int = 0  # claims those carried
    claims_raced: int = 0  # claims alone whose job changed before its assignment


STATS = Stats()
Q = TypeVar("Q", bound=Request)


class Flight(Generic[Q]):
    """One product's requests of one kind in this process, on `engine`: the one
    running alone (`alone`, set once it is done), and the group the others queue in,
    whose `run(flight, take)` serves them."""

    def __init__(self, run: Callable[[Flight[Q], Take[Q]], Awaitable[None]],
                 engine: AsyncEngine, name: str) -> None:
        self.engine = engine
        self.alone: asyncio.Event | None = None
        self.group: GroupCommit[Q] = GroupCommit(lambda take: run(self, take), name=name)

    def idle(self) -> bool:
        return self.alone is None and not self.group.busy

    async def after_alone(self) -> None:
        """Wait until the request running alone (if one is) is done."""
        if self.alone is not None:
            await self.alone.wait()


_FLIGHTS: dict[tuple[Any, ...], Flight[Any]] = {}


async def in_flight(
    lone: LoneUnit, key: tuple[Any, ...], request: Q, *,
    run: Callable[[Flight[Q], Take[Q]], Awaitable[None]],
    alone: Work[R], transaction: bool, then: Callable[[R], T],
) -> T | None:
    """`then` of what `request` came to (None when it changed nothing) in unit of work
    `lone`: with nothing of flight `key` (engine, product, kind) in flight, `alone`
    runs at once in `lone.run` (`transaction` as there), as it would without the
    group; else `request` queues in the flight's group, whose `run` serves it with the
    others that queued meanwhile (see the module docstring)."""
    flight = _FLIGHTS.get(key)
    if flight is None:
        flight = _FLIGHTS[key] = Flight(run, lone.engine, name=f"pg-{key[-1]}-group")
    try:
        if flight.idle():
            flight.alone = done = asyncio.Event()
            try:
                return await lone.run(alone, then, transaction=transaction)
            finally:
                flight.alone = None
                done.set()

        async def queued() -> Any:
            await flight.group.submit(request)
            return request.served()

        return await lone.run_queued(queued, then)
    finally:
        if flight.idle() and _FLIGHTS.get(key) is flight:
            del _FLIGHTS[key]


def split_by_job(requests: list[Q], job_of: Callable[[Q], int]) -> tuple[list[Q], list[Q]]:
    """`requests` (in the order they came) as a batch with one request per job, and
    the later requests of a job already in it, which run alone after it."""
    batch: list[Q] = []
    later: list[Q] = []
    jobs: set[int] = set()
    for request in requests:
        (later if job_of(request) in jobs else batch).append(request)
        jobs.add(job_of(request))
    return batch, later


async def run_batch(
    engine: AsyncEngine, batch: Sequence[Q], work: Work[R], *, transaction: bool,
    alone: Callable[[Q], Awaitable[None]], what: str, stats: Any,
) -> tuple[bool, R | None]:
    """`work` for `batch` as one transaction on `engine`'s driver (`on_driver`):
    (True, what it returned) once committed; else (False, None), the members already
    answered.  A connection lost while it ran may have committed it, so nothing runs
    again: each member fails with that error (SERVICE_UNAVAILABLE).  An error the
    server reported committed nothing: each member runs `alone`, side by side, as it
    would have without the group, and `stats.failed` counts the batch."""
    try:
        return True, await on_driver(engine, work, transaction)
    except LOST as exc:
        for request in batch:
            request.error, request.ran = exc, True
    except Exception:
        logger.debug("a batch of %d %s failed; each runs alone", len(batch), what,
                     exc_info=True)
        stats.failed += 1
        await asyncio.gather(*(alone(request) for request in batch))
    return False, None


async def pg_change_grouped(
    lone: LoneUnit, statement: PgStatement, grouped: PgStatement, args: dict[str, Any],
    then: Callable[[Row], T],
) -> T | None:
    """`then` of the row of change `statement` (None when it matched nothing),
    committed alone or in a batch with its product's concurrent changes (see the
    module docstring), in unit of work `lone`.  With nothing in flight it runs at once
    in `lone.run`, as it would without the group.  `args` holds `product_id` and
    `job_id`.  Store errors leave as the driver's."""
    engine = lone.engine
    change = _Change(statement=statement, grouped=grouped, args=args, job_id=args["job_id"])
    return await in_flight(
        lone, (engine, args["product_id"], statement, "change"), change, run=_run,
        alone=lambda driver: _first(driver, engine, change), transaction=False, then=then)


async def _first(driver: Any, engine: AsyncEngine, change: _Change) -> Row | None:
    rows = await change.statement.fetch(driver, engine.dialect, change.args, engine.sync_engine)
    return rows[0] if rows else None


async def _run(flight: Flight[_Change], take: Take[_Change]) -> None:
    """A run of the group, once the change running alone is done: the changes pending
    then, alone or as one batch; a second change of a job already in the batch runs
    alone after it."""
    await flight.after_alone()
    engine = flight.engine
    batch, later = split_by_job(take(), lambda change: change.job_id)
    if len(batch) == 1:
        await _alone(engine, batch[0])
    else:
        await _together(engine, batch)
    for change in later:
        await _alone(engine, change)


async def _alone(engine: AsyncEngine, change: _Change) -> None:
    try:
        change.row = await on_driver(engine, lambda driver: _first(driver, engine, change),
                                     transaction=False)
    except Exception as exc:
        change.error = exc
    change.ran = True


async def _together(engine: AsyncEngine, batch: list[_Change]) -> None:
    dialect = engine.dialect
    grouped = batch[0].grouped

    async def work(driver: Any) -> list[tuple[Any, ...]]:
        return await grouped.fetch_many(driver, dialect, [change.args for change in batch],
                                        engine.sync_engine)

    committed, rows = await run_batch(
        engine, batch, work, transaction=False, alone=lambda change: _alone(engine, change),
        what="changes", stats=STATS)
    if not committed:
        return
    STATS.batches += 1
    STATS.batched += len(batch)
    by_job = {row[_ID]: row for row in rows or ()}
    again: list[_Change] = []
    for change in batch:
        row = by_job.get(change.job_id)
        if row is None:  # refused, or its job was locked: alone, as ever
            again.append(change)
        else:
            change.row, change.ran = row, True
    STATS.again += len(again)
    await _each_alone(engine, again)


async def _each_alone(engine: AsyncEngine, changes: list[_Change]) -> None:
    """Each of `changes` alone, side by side on connections of their own, as they would
    have run without the group (a batch that timed out costs its members one more
    timeout at most, not one each)."""
    await asyncio.gather(*(_alone(engine, change) for change in changes))


def queued(product_id: str) -> int:
    """Changes of `product_id` waiting in this process for the run in flight
    (tests, diagnostics)."""
    return sum(flight.group.pending for key, flight in _FLIGHTS.items()
               if key[1] == product_id)
