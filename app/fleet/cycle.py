"""The lease holder's hot path in few round trips: claim, transition, heartbeat, release.

Issue 12 §4.  Every statement here is SQL text built once, at import, with bind
parameters only; no ORM flush and no ORM loading (how they run:
`app.fleet.statements`).  Each function returns the changed job, or None when its
conditional UPDATE matched no row: the caller (`app.fleet.service`) then takes its
general path, which locks and reads the job, raises the same NOT_FOUND / CONFLICT
as ever, or — should a concurrent change have made the call valid after all —
applies it.  A refused call changes nothing.

The claim is `app.fleet.claim`; the change-with-event statements, `app.fleet.changes`.
This module keeps the names other modules import from it (`SqliteStatement`,
`claim_heads`, `assign`, `pg_claim_heads_statement`, `job_from_row`, `stage_payload`).

Round trips per call (BEGIN and COMMIT counted; on SQLite, hops to the driver's
thread):

| call | PostgreSQL, one call alone | PostgreSQL, in a larger unit | SQLite, alone | SQLite |
|---|---|---|---|---|
| claim | 2: heads; assign-if-unchanged + event + NOTIFY (N claims batched: 4) | 4 | 1 | 3 |
| transition, release | 1: lock + UPDATE + event + NOTIFY | 3 | 1 | 3 |
| heartbeat | 1 | 3 | 1 | 3 |

A transition or a release alone that finds another change of its product (and
statement: on PostgreSQL one statement serves every target stage) in flight in this
process queues behind it, and the changes queued meanwhile commit together, in one
round trip (`app.fleet.change_groups`); a claim alone likewise queues behind the
product's claim in flight, and the queued claims share one transaction
(`app.fleet.claim_batch`).

"One call alone" is a unit of work opened with `one_call=True` (`app.lone`: the
lease holder's mutations): there the statements run on the driver, a single
PostgreSQL statement is its own implicit transaction, and on SQLite BEGIN
IMMEDIATE, the statements (sequence, UPDATE, event) and COMMIT are one hop.  In a
larger unit of work SQLite's statements are still one hop, between the unit's BEGIN
and COMMIT (`app.fleet.statements.SqliteHop`).

The clock (DESIGN §8): on PostgreSQL the statements read `clock_timestamp()` once
(a MATERIALIZED `clock` CTE), the instant `app.db.database_now` would have returned,
without a round trip of its own; on SQLite the process clock is the clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import BigInteger, Float, String, bindparam
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeEngine

from app.db import UTCDateTime, utcnow
from app.events.outbox import EVENT_CREATED_AT
from app.fleet.changes import (
    ECHO_RESULT,
    EVENT_RESULT,
    pg_change,
    pg_job_change,
    pg_with_event,
    sqlite_change,
)
from app.fleet.claim import assign, claim_heads, claim_job, pg_claim_heads_statement
from app.fleet.models import Job, JobStage
from app.fleet.stages import (
    ACTIVE_STAGES,
    BUDGET_EXCEEDED_REASON,
    BUDGET_TOLERANCE_USD,
    can_worker_move,
)
from app.fleet.statements import (
    ACTIVE,
    PgStatement,
    SqliteStatement,
    is_postgres,
    job_from_row,
    returning,
    sqlite_job_statement,
    stage_list,
    stage_payload,
)
from app.lone import lone_unit

__all__ = [
    "FAST_TARGETS", "SqliteStatement", "assign", "claim_heads", "claim_job", "heartbeat",
    "job_from_row", "pg_claim_heads_statement", "release", "stage_payload", "transition",
]

# -- transition -----------------------------------------------------------------

# The budget rule (DESIGN §4) on the UPDATE's old values: the new cost total is over
# the budget by more than the float tolerance (app.fleet.stages.over_budget).
_OVER_BUDGET = ("(jobs.budget IS NOT NULL"
                " AND jobs.cost_usd + :cost_usd > jobs.budget + :budget_tolerance)")
_TRANSITION_TYPES: dict[str, TypeEngine[Any]] = {
    "cost_usd": Float(), "budget_tolerance": Float(), "tokens_in": BigInteger(),
    "tokens_out": BigInteger(), "reason": String(), "budget_reason": String(),
}


def _transition_set(to: JobStage) -> str:
    """The SET list of a move to `to` (not a retryable FAILED, which draws a backoff in
    Python), with `{now}` for the clock: the metrics added; over budget, FAILED
    `budget exceeded` whatever `to` is; SHIPPED and FAILED end the lease and stamp
    `finishedAt`."""
    over = _OVER_BUDGET
    if to == JobStage.FAILED:
        stage = "'FAILED'"
        reason = f"CASE WHEN {over} THEN :budget_reason ELSE :reason END"
    else:
        stage = f"CASE WHEN {over} THEN 'FAILED' ELSE '{to.value}' END"
        reason = f"CASE WHEN {over} THEN :budget_reason ELSE jobs.failure_reason END"
    if to in (JobStage.SHIPPED, JobStage.FAILED):
        worker, expires, finished = "NULL", "NULL", "{now}"
    else:
        worker = f"CASE WHEN {over} THEN NULL ELSE jobs.lease_worker_id END"
        expires = f"CASE WHEN {over} THEN NULL ELSE jobs.lease_expires_at END"
        finished = f"CASE WHEN {over} THEN {{now}} ELSE jobs.finished_at END"
    return f"""stage = {stage}, failure_reason = {reason},
        cost_usd = jobs.cost_usd + :cost_usd, tokens_in = jobs.tokens_in + :tokens_in,
        tokens_out = jobs.tokens_out + :tokens_out,
        lease_worker_id = {worker}, lease_expires_at = {expires},
        finished_at = {finished}, updated_at = {{now}}"""


def _held_where(sources: Sequence[JobStage] | str, now: str) -> str:
    """The lease is held (DESIGN §2): the job is in one of `sources` (active stages;
    or, given as SQL, the condition on its stage), `fence` is its current fence and
    its lease has not expired."""
    stage = sources if isinstance(sources, str) else f"jobs.stage IN ({stage_list(sources)})"
    return (f"jobs.product_id = :product_id AND jobs.id = :job_id"
            f" AND jobs.lease_fence = :fence AND {stage}"
            f" AND jobs.lease_expires_at > {now}")


_TO = "CAST(:to AS VARCHAR)"


def _any_transition_set() -> str:
    """`_transition_set` for every target at once, the target bound as `:to`."""
    over = _OVER_BUDGET
    ends = f"({over} OR {_TO} IN ('{JobStage.SHIPPED.value}', '{JobStage.FAILED.value}'))"
    return f"""stage = CASE WHEN {over} THEN 'FAILED' ELSE {_TO} END,
        failure_reason = CASE WHEN {over} THEN :budget_reason
                              WHEN {_TO} = 'FAILED' THEN :reason ELSE jobs.failure_reason END,
        cost_usd = jobs.cost_usd + :cost_usd, tokens_in = jobs.tokens_in + :tokens_in,
        tokens_out = jobs.tokens_out + :tokens_out,
        lease_worker_id = CASE WHEN {ends} THEN NULL ELSE jobs.lease_worker_id END,
        lease_expires_at = CASE WHEN {ends} THEN NULL ELSE jobs.lease_expires_at END,
        finished_at = CASE WHEN {ends} THEN {{now}} ELSE jobs.finished_at END,
        updated_at = {{now}}"""


def _any_move() -> str:
    """The job's stage may move to `:to` (the graph of app.fleet.stages), as SQL."""
    pairs = ", ".join(f"('{source.value}', '{to.value}')"
                      for to in FAST_TARGETS for source in _sources(to))
    return f"(jobs.stage, {_TO}) IN ({pairs})"


def _pg_fenced_change(
    set_sql: str, sources: Sequence[JobStage] | str, types: Mapping[str, TypeEngine[Any]],
    *, echo: bool = False,
) -> tuple[PgStatement, PgStatement]:
    """PostgreSQL: lock the job, apply `set_sql` if the lease is held, append the
    event and NOTIFY — one statement.  `locked` takes the row lock first (waiting for
    a concurrent writer, as `SELECT … FOR UPDATE` does) and gives the stage the job
    had, the event's `from`.  With it, its variant for a batch
    (app.fleet.change_groups), which skips a job another transaction holds locked
    instead of waiting for it.  `echo`: the row also reads the job's tracker item for
    the echo (`app.fleet.changes.EchoSeen`)."""

    def statement(lock: str) -> PgStatement:
        change = (
            f"UPDATE jobs SET {set_sql.format(now='clock.now')} FROM locked, clock"
            f" WHERE jobs.id = locked.id AND {_held_where(sources, 'clock.now')}"
            f" RETURNING {returning('jobs.')}, locked.stage AS source_stage"
        )
        return PgStatement(
            "WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now), "
            "locked AS (SELECT id, stage FROM jobs"
            f" WHERE product_id = :product_id AND id = :job_id {lock}), "
            + pg_with_event(change, echo=echo),
            *(ECHO_RESULT if echo else EVENT_RESULT),
            binds=(*(bindparam(name, type_=type_) for name, type_ in types.items()),
                   EVENT_CREATED_AT),
        )

    return statement("FOR UPDATE"), statement("FOR UPDATE SKIP LOCKED")


def _sqlite_fenced_change(
    set_sql: str, sources: Sequence[JobStage], types: Mapping[str, TypeEngine[Any]]
) -> SqliteStatement:
    return sqlite_job_statement(
        f"UPDATE jobs SET {set_sql.format(now=':now')} WHERE {_held_where(sources, ':now')}"
        f" RETURNING {returning('')}",
        now=UTCDateTime(), **types,
    )


def _sources(to: JobStage) -> tuple[JobStage, ...]:
    """The stages a lease holder may move a job to `to` from (app.fleet.stages)."""
    return tuple(sorted(stage for stage in ACTIVE_STAGES if can_worker_move(stage, to)))


# The targets some stage may move to; a move to another one (QUEUED, ASSIGNED,
# CANCELLED) can match no row, so it needs no statement to be refused.
FAST_TARGETS = tuple(stage for stage in JobStage if _sources(stage))
# PostgreSQL: ONE statement for every target, so that a product's concurrent moves
# (BUILDING, SHIPPED, …) share its batches (app.fleet.change_groups keys them by
# statement).
_PG_TRANSITION = _pg_fenced_change(_any_transition_set(), _any_move(),
                                   {**_TRANSITION_TYPES, "to": String()})
# FLEET_TRACKER_ECHO on: the same, reading the job's item too (app.bridge.echo_lean
# decides the echo on it instead of reading again after the commit).
_PG_TRANSITION_ECHO = _pg_fenced_change(_any_transition_set(), _any_move(),
                                        {**_TRANSITION_TYPES, "to": String()}, echo=True)
_SQLITE_TRANSITIONS = {
    to: _sqlite_fenced_change(_transition_set(to), _sources(to), _TRANSITION_TYPES)
    for to in FAST_TARGETS
}


async def transition(
    session: AsyncSession, product_id: str, job_id: int, fence: int, to: JobStage, *,
    cost_usd: float = 0.0, tokens_in: int = 0, tokens_out: int = 0, reason: str | None = None,
    echo: bool = False,
) -> Job | None:
    """Move a held job to `to` in one conditional UPDATE (DESIGN §2, §4): the fence,
    the source stage (the graph of app.fleet.stages) and the unexpired lease are in
    its WHERE; the metrics (USD, tokens) are added to the totals; the budget rule
    and the end of the lease (SHIPPED, FAILED, or over budget) are CASE expressions.
    `reason` is kept on a FAILED job.  Not for a retryable FAILED (its backoff is
    drawn in Python).

    Returns the job as changed, with its stage-change event appended, or None when
    the UPDATE matched nothing: the job is missing, its lease is not held by
    `fence`, or the move leaves the graph — the caller finds out which.

    `echo` (FLEET_TRACKER_ECHO on): the event record also carries what the statement
    (on SQLite, its hop) read of the job's tracker item (`EventRecord.seen`).
    """
    if to not in FAST_TARGETS:
        return None
    params = {
        "product_id": product_id, "job_id": job_id, "fence": fence, "cost_usd": cost_usd,
        "tokens_in": tokens_in, "tokens_out": tokens_out, "reason": reason,
        "budget_tolerance": BUDGET_TOLERANCE_USD, "budget_reason": BUDGET_EXCEEDED_REASON,
    }
    if is_postgres(session):
        alone, grouped = _PG_TRANSITION_ECHO if echo else _PG_TRANSITION
        return await pg_change(session, alone, {**params, "to": to.value}, grouped=grouped)
    return await sqlite_change(session, _SQLITE_TRANSITIONS[to], params, echo=echo)


# -- release --------------------------------------------------------------------

_RELEASE_SET = """stage = 'QUEUED',
        attempts = CASE WHEN jobs.attempts > 0 THEN jobs.attempts - 1 ELSE 0 END,
        lease_fence = jobs.lease_fence + 1, lease_worker_id = NULL,
        lease_expires_at = NULL, not_before = NULL, failure_reason = :reason,
        updated_at = {now}"""
_PG_RELEASE, _PG_RELEASE_GROUPED = _pg_fenced_change(_RELEASE_SET, ACTIVE, {"reason": String()})
_SQLITE_RELEASE = _sqlite_fenced_change(_RELEASE_SET, ACTIVE, {"reason": String()})


async def release(
    session: AsyncSession, product_id: str, job_id: int, fence: int, reason: str | None
) -> Job | None:
    """The lease holder gives the job back: QUEUED at once, attempts - 1 (not below
    0), fence + 1, lease and `notBefore` cleared, `reason` kept; `queuedAt` unchanged.
    One event.  None when the lease is not held by `fence` (see `transition`)."""
    params = {"product_id": product_id, "job_id": job_id, "fence": fence, "reason": reason}
    if is_postgres(session):
        return await pg_change(session, _PG_RELEASE, params, grouped=_PG_RELEASE_GROUPED)
    return await sqlite_change(session, _SQLITE_RELEASE, params)


# -- heartbeat ------------------------------------------------------------------

_PG_HEARTBEAT = PgStatement(
    "WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now)"
    " UPDATE jobs SET lease_expires_at = clock.now + make_interval(secs => :lease_seconds),"
    " updated_at = clock.now FROM clock"
    f" WHERE {_held_where(ACTIVE, 'clock.now')} RETURNING {returning('jobs.')}",
    binds=(bindparam("lease_seconds", type_=Float()),),
)
_SQLITE_HEARTBEAT = sqlite_job_statement(
    "UPDATE jobs SET lease_expires_at = :expires_at, updated_at = :now"
    f" WHERE {_held_where(ACTIVE, ':now')} RETURNING {returning('')}",
    now=UTCDateTime(), expires_at=UTCDateTime(),
)


async def heartbeat(
    session: AsyncSession, product_id: str, job_id: int, fence: int, lease_seconds: int
) -> Job | None:
    """Extend a held lease to now + `lease_seconds` in one UPDATE; no event.  None
    when the lease is not held by `fence` (see `transition`)."""
    params: dict[str, Any] = {"product_id": product_id, "job_id": job_id, "fence": fence}
    if is_postgres(session):
        params["lease_seconds"] = float(lease_seconds)
        return await pg_job_change(session, _PG_HEARTBEAT, params)
    params["now"] = now = utcnow()
    params["expires_at"] = now + timedelta(seconds=lease_seconds)
    if (lone := lone_unit(session)) is not None:
        return await lone.run_sqlite(lambda hop: _SQLITE_HEARTBEAT.first_of(hop, params),
                                     lambda row: job_from_row(session, row))
    row = await _SQLITE_HEARTBEAT.first(session, params)
    return None if row is None else job_from_row(session, row)
