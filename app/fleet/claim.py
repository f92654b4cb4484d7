"""The claim (DESIGN §2, §3): the queues' heads, the scheduler's choice, the assignment.

PostgreSQL: the heads (`FOR UPDATE SKIP LOCKED`, reading the database clock) and the
assignment with its event and NOTIFY — two statements in one transaction.  In a unit
of work of one call (`app.lone`) the claim runs on the driver (`claim_job`,
`app.fleet.claim_batch`): alone, the heads read without locks and an assignment
conditional on the job as read, each its own implicit transaction (the locking
transaction only when another claimer took the job meanwhile); a product's claims
that arrive while one is in flight are served together, in one locking transaction.
The statements are `app.fleet.claim_statements`.  SQLite: heads; assign; sequence;
event, under the write lock, in one hop to the driver's thread (with BEGIN and COMMIT
in a unit of work of one call).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.events.outbox import EventRecord
from app.fleet.changes import (
    pg_change,
    pg_changed,
    sqlite_change,
    sqlite_change_in,
    sqlite_changed,
)
from app.fleet.claim_batch import Claim, pg_claim_grouped
from app.fleet.claim_statements import (
    PG_ASSIGN,
    PG_HEADS_RUN,
    SQLITE_ASSIGN,
    SQLITE_HEADS,
    assign_params,
    candidates,
    pg_claim_heads_statement,
    sqlite_heads_params,
)
from app.fleet.models import Job, JobStage
from app.fleet.scheduler import Candidate, WorkerProfile, select_job
from app.fleet.statements import is_postgres, sqlite_hop
from app.lone import SqliteHop, lone_unit

__all__ = ["assign", "claim_heads", "claim_job", "pg_claim_heads_statement"]


async def claim_heads(
    session: AsyncSession, product_id: str, worker: WorkerProfile, now: datetime | None
) -> tuple[list[Candidate], datetime | None]:
    """The first eligible job of each priority (at most four) for `worker`, and the
    instant they were read at (`now`, or the database clock on PostgreSQL; None
    when there is no head), in one statement.

    Each head walks the claim index `(product, stage, priority, queued_at, id)` and
    stops at the first job whose engine class, profile and capabilities the worker
    matches, so its cost does not grow with the length of the queue (DESIGN §3; the
    capability subset test is JSONB `<@` on PostgreSQL and `json_each` on SQLite).
    On PostgreSQL the heads are locked `FOR UPDATE SKIP LOCKED` until commit: a
    concurrent claimer passes over them and can never take the same job.  On SQLite
    the unit of work already holds the write lock.  Only the columns the scheduler
    reads are fetched.
    """
    if is_postgres(session):
        _, params = pg_claim_heads_statement(product_id, worker, now)
        rows: Sequence[Sequence[Any]] = await PG_HEADS_RUN.rows(session, params)
        read_at = rows[0][-1] if rows else None
    else:
        read_at = now or utcnow()
        rows = await SQLITE_HEADS.rows(session, sqlite_heads_params(product_id, worker, read_at))
    if not rows:
        return [], None
    return candidates(rows), read_at


# -- assign ---------------------------------------------------------------------


async def assign(
    session: AsyncSession, product_id: str, job_id: int, worker_id: str, *,
    now: datetime, lease_seconds: int,
) -> Job | None:
    """Give QUEUED job `job_id` to `worker_id` (DESIGN §2): ASSIGNED, attempts + 1,
    fence + 1, lease until `now + lease_seconds`, `notBefore` cleared, `startedAt`
    set on the first claim; one stage-change event.  None when the job is not
    QUEUED (the claim path holds it locked, so that does not happen there)."""
    params = assign_params(product_id, job_id, worker_id, now, lease_seconds)
    if is_postgres(session):
        return await pg_change(session, PG_ASSIGN, params)
    return await sqlite_change(session, SQLITE_ASSIGN, params, source=JobStage.QUEUED)


# -- the claim ------------------------------------------------------------------


async def claim_job(
    session: AsyncSession, product_id: str, worker: WorkerProfile, *,
    now: datetime | None, lease_seconds: int, aging_seconds: int, echo: bool = False,
) -> Job | None:
    """The job `select_job` (DESIGN §3, aging over `aging_seconds`) picks among the
    heads, assigned to `worker` for `lease_seconds`; None when there is none.  `now`
    None reads the database clock (PostgreSQL) or the process clock (SQLite).  `echo`
    (SQLite, or PostgreSQL in one call alone): the assignment's event record carries
    what it read of the job's tracker item for the echo (`EventRecord.seen`)."""
    lone = lone_unit(session)
    if not is_postgres(session):
        clock = now or utcnow()
        params = sqlite_heads_params(product_id, worker, clock)

        def claim_in(hop: SqliteHop) -> tuple[Sequence[Any], EventRecord] | None:
            chosen = select_job(candidates(SQLITE_HEADS.run(hop, params)), worker, clock,
                                aging_seconds)
            if chosen is None:
                return None
            assignment = assign_params(product_id, chosen.id, worker.worker_id, clock,
                                       lease_seconds)
            return sqlite_change_in(hop, SQLITE_ASSIGN,
                                    {**assignment, "event_created_at": utcnow()},
                                    JobStage.QUEUED, echo=echo)

        if lone is not None:
            return await lone.run_sqlite(claim_in, lambda done: sqlite_changed(session, done))
        done = await sqlite_hop(session, claim_in)
        return None if done is None else sqlite_changed(session, done)
    if lone is None:
        heads, read_at = await claim_heads(session, product_id, worker, now)
        chosen = None if read_at is None else select_job(heads, worker, read_at, aging_seconds)
        if chosen is None or read_at is None:
            return None
        return await assign(session, product_id, chosen.id, worker.worker_id, now=read_at,
                            lease_seconds=lease_seconds)
    _, heads_params = pg_claim_heads_statement(product_id, worker, now)
    claim = Claim(worker=worker, heads=heads_params, lease_seconds=lease_seconds,
                  aging_seconds=aging_seconds, echo=echo)
    return await pg_claim_grouped(lone, claim, lambda done: pg_changed(session, *done))
