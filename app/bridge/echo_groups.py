"""Group commit of a product's concurrent echo writes on PostgreSQL, and the echo's
unlocked reads pending at the same moment in one round trip (issue 12).

An echo that writes onto its item (`app.bridge.echo_lean`) bumps its product's event
sequence, and that row stays locked until the statement has committed and its WAL is
flushed: one commit per echo, during which every claim and transition of the product
waits.  The guarded writes go through a `GroupCommit` per product and statement in
this process, exactly as the product's job changes do (`app.fleet.change_groups`,
whose `in_flight` and `Flight` this module uses):

* nothing of that kind in flight: the write runs at once, alone, its own implicit
  transaction, one round trip, as without this module;
* else it queues, and once the write in flight is done, the writes that queued
  meanwhile run as ONE implicit transaction in ONE round trip (asyncpg's
  `fetchmany`: a Bind and an Execute each, one Sync), with the statement's batch
  variant, whose guard takes its locks `SKIP LOCKED`: an execution after the first
  holds the product row, and must never wait for an item or a job someone else holds
  (that one may wait for the product row).  A member whose guard matched nothing —
  its rows locked, or what its decision rests on changed — returned no row and runs
  again alone, with the plain statement, which waits for the locks and gives the
  member its answer (no row: refused, the echo then goes under lock).

Rows carry the job id, so each member gets its own (one or two: the events'); two
writes of the same job never share a batch.  Failures as in `change_groups`: an
error the server reports means nothing of the batch committed, and each member runs
alone; a connection lost meanwhile may have committed it, and each member fails
with that error (the echo's retry writes nothing twice: `decide_echo`).

Sequences (DESIGN §5): the first execution's bump locks the product row to the end
of the batch's one transaction, so the batch's events take consecutive numbers and
commit at once, in statement order, with their NOTIFYs (the argument of `app.lone`
for a transaction of N statements).  Each caller hands its own events to the hub
once the batch has committed.

Reads (`read`).  Each round trip costs the process about as much CPU as the echo's
own work, and the echoes of concurrent commits (a claim batch's, say) read at the
same moment: while one read is in flight, the next ones queue and then run in one
round trip (`fetch_many`), each still its own statement and snapshot; they lock
nothing, so a batch of them waits for nobody and holds nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.bridge.group_commit import Take
from app.fleet.change_groups import Flight, Request, in_flight, run_batch, split_by_job
from app.fleet.statements import PgStatement
from app.lone import LoneUnit, on_driver

if TYPE_CHECKING:
    from app.bridge.echo_lean import Write

Rows = list[tuple[Any, ...]]


@dataclass
class _EchoWrite(Request):
    write: Write
    job_id: int


@dataclass
class _EchoRead(Request):
    statement: PgStatement
    params: dict[str, Any]


@dataclass
class Stats:
    """Process-wide counters (tests, diagnostics)."""

    batches: int = 0  # fetch_many round trips that committed
    batched: int = 0  # writes those carried
    failed: int = 0  # batches that raised and were run again alone
    again: int = 0  # members that returned no row and ran again alone
    read_batches: int = 0  # unlocked reads served several at once
    reads_batched: int = 0  # reads those carried


STATS = Stats()


async def write(engine: AsyncEngine, planned: Write) -> Rows:
    """The rows of guarded write `planned` (empty: its guard matched nothing, and
    nothing was written), committed alone or in a batch with its product's
    concurrent writes of the same statement (see the module docstring).  Store
    errors leave as the driver's."""
    request = _EchoWrite(write=planned, job_id=planned.params["job_id"])
    key = (engine, planned.params["product_id"], planned.statement, "echo")
    rows: Rows | None = await in_flight(
        LoneUnit(engine), key, request, run=_run,
        alone=lambda driver: _fetch(driver, engine, planned), transaction=False,
        then=lambda rows: rows)
    return rows or []


async def _fetch(driver: Any, engine: AsyncEngine, planned: Write) -> Rows:
    return await planned.statement.fetch(driver, engine.dialect, planned.params,
                                         engine.sync_engine)


async def _run(flight: Flight[_EchoWrite], take: Take[_EchoWrite]) -> None:
    """A run of the group, once the write running alone is done: the writes pending
    then, alone or as one batch; a second write of a job already in the batch runs
    alone after it."""
    await flight.after_alone()
    batch, later = split_by_job(take(), lambda request: request.job_id)
    if len(batch) == 1:
        await _alone(flight.engine, batch[0])
    else:
        await _together(flight.engine, batch)
    for request in later:
        await _alone(flight.engine, request)


async def _alone(engine: AsyncEngine, request: _EchoWrite) -> None:
    try:
        request.row = await on_driver(
            engine, lambda driver: _fetch(driver, engine, request.write), transaction=False)
    except Exception as exc:
        request.error = exc
    request.ran = True


async def _together(engine: AsyncEngine, batch: list[_EchoWrite]) -> None:
    grouped = batch[0].write.grouped

    async def work(driver: Any) -> Rows:
        return await grouped.fetch_many(driver, engine.dialect,
                                        [request.write.params for request in batch],
                                        engine.sync_engine)

    committed, rows = await run_batch(
        engine, batch, work, transaction=False, alone=lambda request: _alone(engine, request),
        what="echo writes", stats=STATS)
    if not committed:
        return
    STATS.batches += 1
    STATS.batched += len(batch)
    by_job: dict[int, Rows] = {}
    for row in rows or ():
        by_job.setdefault(row[0], []).append(row)
    again = []
    for request in batch:
        found = by_job.get(request.job_id)
        if found is None:  # its rows were locked, or its guard refused: alone, as ever
            again.append(request)
        else:
            request.row, request.ran = found, True
    STATS.again += len(again)
    await asyncio.gather(*(_alone(engine, request) for request in again))


# -- the unlocked reads ------------------------------------------------------------


_READS: dict[tuple[Any, ...], Flight[_EchoRead]] = {}


async def read(engine: AsyncEngine, statement: PgStatement, product_id: str,
               job_id: int) -> Rows:
    """The rows of the echo's read without locks (`statement`: product id and job id
    its first two columns, as `params` its only parameters), for job `job_id`:
    alone when no read is in flight in this process, else with the reads that queued
    meanwhile, in ONE round trip (`fetch_many`; several statements that lock
    nothing, in one implicit transaction).  Each read still sees only committed
    data, as of its own statement; nothing is written, so a batch holds no lock, and
    a caller cancelled meanwhile leaves nothing behind (unlike `in_flight`'s
    changes, a read needs no task of its own).  Store errors leave as the driver's
    (a batch that fails fails each of its reads: they decide nothing, and the echo
    is handled as failed)."""
    params = {"product_id": product_id, "job_id": job_id}
    key = (engine, statement)
    flight = _READS.get(key)
    if flight is None:
        flight = _READS[key] = Flight(_run_reads, engine, name="pg-echo-read-group")
    try:
        if flight.idle():
            flight.alone = done = asyncio.Event()
            try:
                return await on_driver(
                    engine, lambda driver: statement.fetch(driver, engine.dialect, params,
                                                           engine.sync_engine),
                    transaction=False) or []
            finally:
                flight.alone = None
                done.set()
        request = _EchoRead(statement=statement, params=params)
        await flight.group.submit(request)
        rows: Rows = request.served()
        return rows
    finally:
        if flight.idle() and _READS.get(key) is flight:
            del _READS[key]


async def _run_reads(flight: Flight[_EchoRead], take: Take[_EchoRead]) -> None:
    await flight.after_alone()
    reads = take()
    engine = flight.engine
    statement = reads[0].statement

    async def work(driver: Any) -> Rows:
        if len(reads) == 1:
            return await statement.fetch(driver, engine.dialect, reads[0].params,
                                         engine.sync_engine)
        return await statement.fetch_many(driver, engine.dialect,
                                          [one.params for one in reads], engine.sync_engine)

    try:
        rows = await on_driver(engine, work, transaction=False) or []
    except Exception as exc:
        for one in reads:
            one.error, one.ran = exc, True
        return
    if len(reads) > 1:
        STATS.read_batches += 1
        STATS.reads_batched += len(reads)
    found = {(row[0], row[1]): row for row in rows}
    for one in reads:
        row = found.get((one.params["product_id"], one.params["job_id"]))
        one.row, one.ran = ([] if row is None else [row]), True
