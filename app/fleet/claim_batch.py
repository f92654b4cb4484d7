"""A product's concurrent claims served together on PostgreSQL (issue 12).

The locking claim (`pg_claim_alone`) is one transaction of four round trips: BEGIN;
the heads, locked `FOR UPDATE SKIP LOCKED`; the assignment with its event, which
bumps the product's `last_event_seq` and holds that row; COMMIT.  Claims of one
product commit one after the other, each paying its own WAL flush while the product
row stays locked.  Through the flights of
`app.fleet.change_groups` (one per product, kind "claim"):

* nothing of the product's claims in flight in this process: the claim runs at once,
  alone, in `LoneUnit.run` — the heads read without locks, then the assignment only
  if the job is still as read, two implicit transactions (`pg_claim_first`; the
  locking claim, `pg_claim_alone`, only when another process's claimer took the job
  meanwhile);
* else it queues; when the claim in flight is done, the N claims that queued
  meanwhile are served by ONE transaction of four round trips: BEGIN; the heads, N
  rows of each priority (`PG_HEADS_N_RUN`, once per distinct worker profile, most
  often once); the scheduler's choice for each claim in turn, in Python; the N
  assignments in one `fetchmany`; COMMIT.

Why each claim gets what it would have got alone, one after the other (DESIGN §3).
The heads statement returns each priority's first eligible QUEUED jobs in queue
order `(queued_at, id)`, skipping those other transactions hold; alone, a claim takes
each priority's first one and `select_job` picks among those four.  In the batch, the
claims choose in order, and each takes, of each priority, the first row that an
earlier claim of the batch has not taken — exactly the first row the heads statement
would return once the earlier claims' assignments were made (they are no longer
QUEUED).  With N rows per priority and at most N - 1 taken before the last claim
chooses, that row is always among those fetched when the priority has one.  Two
claims never get the same job: the batch holds every row it read locked until
COMMIT, and within the batch a taken job is never chosen again.

Sequences (DESIGN §5): the N assignments run one after another in the transaction;
the first bumps the product's sequence and holds the row to COMMIT, so the N events
take consecutive numbers and become visible at once, in order (`app.lone`).

Failures, as for the change groups: an error the server reports rolled the whole
transaction back, so each claim then runs alone, side by side; a connection lost
while it ran (`app.lone.LOST`) may have committed it, so nothing runs again and each
claim fails with that error (SERVICE_UNAVAILABLE).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from app.bridge.group_commit import Take
from app.db import utcnow
from app.fleet.change_groups import STATS, Flight, Request, in_flight, run_batch
from app.fleet.claim_statements import (
    HEAD_FENCE,
    PG_ASSIGN,
    PG_ASSIGN_ECHO,
    PG_ASSIGN_IF_UNCHANGED,
    PG_ASSIGN_IF_UNCHANGED_ECHO,
    PG_HEADS_N_RUN,
    PG_HEADS_READ_RUN,
    PG_HEADS_RUN,
    assign_params,
    candidates,
)
from app.fleet.scheduler import Candidate, WorkerProfile, select_job
from app.fleet.statements import KEYS, PgStatement
from app.lone import LoneUnit, on_driver

T = TypeVar("T")
Assigned = tuple[Sequence[Any], datetime]  # the assignment's row, the event's creation
_ID = KEYS.index("id")


@dataclass(kw_only=True)
class Claim(Request):
    """One caller's claim: `worker`, the heads statement's parameters (`heads`, naming
    the product; `app.fleet.claim_statements.pg_claim_heads_statement`), the lease and
    the aging in seconds.  Served, its `row` is `Assigned`, or None: no job for it."""

    worker: WorkerProfile
    heads: dict[str, Any]
    lease_seconds: int
    aging_seconds: int
    echo: bool = False  # its assignment reads the job's item for the echo (EchoSeen)

    def profile(self) -> tuple[Any, ...]:
        """What its heads depend on besides the product: claims with the same
        profile share one read of the heads."""
        heads = self.heads
        return (heads["now"], tuple(heads["engine_classes"]), tuple(heads["profiles"]),
                tuple(heads["capabilities"]))


async def pg_claim_grouped(
    lone: LoneUnit, claim: Claim, then: Callable[[Assigned], T]
) -> T | None:
    """`then` of `claim`'s assignment, None when there is no job for its worker:
    alone, or with the product's concurrent claims in this process (see the module
    docstring), in unit of work `lone`.  Store errors leave as the driver's."""
    engine = lone.engine
    return await in_flight(
        lone, (engine, claim.heads["product_id"], "claim"), claim, run=_run,
        alone=lambda driver: pg_claim_first(driver, engine, claim), transaction=False,
        then=then)


async def pg_claim_first(driver: Any, engine: AsyncEngine, claim: Claim) -> Assigned | None:
    """`claim` alone with nothing of its product's claims in flight in this process, on
    asyncpg connection `driver` outside any transaction: the heads read without locks,
    `select_job`'s choice, and its assignment only if the job is as read
    (`PG_ASSIGN_IF_UNCHANGED`) — two statements, each its own implicit transaction.
    When the job changed or was locked meanwhile (another process's claimer took it),
    the claim runs again as the locking claim, `pg_claim_alone`, in a transaction.

    Why this is the same claim (DESIGN §2, §3): the choice is `select_job`'s among the
    heads at the instant they were read, as the locking claim's is; the assignment
    happens only while the job is still QUEUED at the fence read — a claim or a
    requeue since would have raised the fence — and eligible, under its row lock, so
    no two claimers get the same job.  What the locking claim adds, holding its heads
    until it commits, only spares concurrent claimers a wasted try; in this process
    the flight already makes the product's claims take turns."""
    params = await _choice(driver, engine, claim, PG_HEADS_READ_RUN)
    if params is None:
        return None
    assign = PG_ASSIGN_IF_UNCHANGED_ECHO if claim.echo else PG_ASSIGN_IF_UNCHANGED
    assigned = await assign.fetch(driver, engine.dialect, params, engine.sync_engine)
    if assigned:
        return assigned[0], params["event_created_at"]
    STATS.claims_raced += 1
    async with driver.transaction():
        return await pg_claim_alone(driver, engine, claim)


async def pg_claim_alone(driver: Any, engine: AsyncEngine, claim: Claim) -> Assigned | None:
    """`claim` alone, in the transaction open on asyncpg connection `driver`: the
    heads, `select_job`'s choice, the assignment with its event."""
    params = await _choice(driver, engine, claim, PG_HEADS_RUN)
    if params is None:
        return None
    assign = PG_ASSIGN_ECHO if claim.echo else PG_ASSIGN
    assigned = await assign.fetch(driver, engine.dialect, params, engine.sync_engine)
    return (assigned[0], params["event_created_at"]) if assigned else None


async def _choice(driver: Any, engine: AsyncEngine, claim: Claim, heads: PgStatement
                  ) -> dict[str, Any] | None:
    """The assignment's parameters of `select_job`'s choice among the heads `heads`
    reads (with the fence the job was read at), or None when there is none."""
    rows = await heads.fetch(driver, engine.dialect, claim.heads, engine.sync_engine)
    if not rows:
        return None
    read_at: datetime = rows[0][-1]
    chosen = select_job(candidates(rows), claim.worker, read_at, claim.aging_seconds)
    if chosen is None:
        return None
    fence = next(row[HEAD_FENCE] for row in rows if row[0] == chosen.id)
    return {**_assignment(claim, chosen.id, read_at), "fence": fence}


def _assignment(claim: Claim, job_id: int, read_at: datetime) -> dict[str, Any]:
    return {**assign_params(claim.heads["product_id"], job_id, claim.worker.worker_id,
                            read_at, claim.lease_seconds),
            "event_created_at": utcnow()}


def first_untaken(rows: Sequence[Sequence[Any]], taken: set[int]) -> list[Candidate]:
    """Of head rows (up to N per priority), each priority's first in queue order
    `(queued_at, id)` whose job is not in `taken`, as the scheduler's candidates."""
    firsts: dict[Any, Sequence[Any]] = {}
    for row in sorted(rows, key=lambda row: (row[5], row[0])):
        if row[0] not in taken and row[1] not in firsts:
            firsts[row[1]] = row
    return candidates(list(firsts.values()))


async def _run(flight: Flight[Claim], take: Take[Claim]) -> None:
    """A run of the group, once the claim running alone is done."""
    await flight.after_alone()
    claims = take()
    engine = flight.engine
    if len(claims) == 1:
        await _alone(engine, claims[0])
        return
    committed, served = await run_batch(
        engine, claims, lambda driver: _batch(driver, engine, claims), transaction=True,
        alone=lambda claim: _alone(engine, claim), what="claims", stats=STATS)
    if not committed:
        return
    STATS.claim_batches += 1
    STATS.claims_batched += len(claims)
    for claim, assigned in served or ():
        claim.row, claim.ran = assigned, True


async def _alone(engine: AsyncEngine, claim: Claim) -> None:
    """`claim` as a claim alone (`pg_claim_first`): a run's one claim, or each claim of
    a batch the server failed."""
    try:
        claim.row = await on_driver(
            engine, lambda driver: pg_claim_first(driver, engine, claim), transaction=False)
    except Exception as exc:
        claim.error = exc
    claim.ran = True


async def _batch(driver: Any, engine: AsyncEngine, claims: list[Claim]
                 ) -> list[tuple[Claim, Assigned | None]]:
    """The batch's statements, in the transaction open on `driver` (see the module
    docstring); each claim with what it was assigned."""
    dialect, events = engine.dialect, engine.sync_engine
    heads: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for claim in claims:
        if claim.profile() not in heads:
            heads[claim.profile()] = await PG_HEADS_N_RUN.fetch(
                driver, dialect, {**claim.heads, "n": len(claims)}, events)
    taken: set[int] = set()
    chosen: list[tuple[Claim, dict[str, Any]]] = []
    for claim in claims:
        rows = heads[claim.profile()]
        if not rows:
            continue
        read_at: datetime = rows[0][-1]
        job = select_job(first_untaken(rows, taken), claim.worker, read_at,
                         claim.aging_seconds)
        if job is not None:
            taken.add(job.id)
            chosen.append((claim, _assignment(claim, job.id, read_at)))
    assign = PG_ASSIGN_ECHO if any(claim.echo for claim in claims) else PG_ASSIGN
    assigned = ({row[_ID]: row for row in await assign.fetch_many(
        driver, dialect, [params for _, params in chosen], events)} if chosen else {})
    if len(assigned) != len(chosen):  # each job was QUEUED and is held: cannot happen
        raise RuntimeError("an assignment of the batch matched nothing")
    served: dict[int, Assigned] = {
        id(claim): (assigned[params["job_id"]], params["event_created_at"])
        for claim, params in chosen}
    return [(claim, served.get(id(claim))) for claim in claims]
