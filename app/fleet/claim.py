"""The claim (DESIGN §2, §3): the queues' heads, the scheduler's choice, the assignment.

PostgreSQL: the heads (`FOR UPDATE SKIP LOCKED`, reading the database clock) and the
assignment with its event and NOTIFY — two statements in one transaction; in a unit
of work of one call (`app.lone`) the whole transaction runs on the driver
(`claim_job`).  SQLite: heads; assign; sequence; event, under the write lock, in one
hop to the driver's thread (with BEGIN and COMMIT in a unit of work of one call).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, TextualSelect, bindparam, column, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import Integer, TypeEngine

from app.db import JsonDocument, UTCDateTime, utcnow
from app.events.outbox import EVENT_CREATED_AT, EventRecord
from app.fleet.changes import (
    EVENT_RESULT,
    pg_change,
    pg_changed,
    pg_with_event,
    sqlite_change,
    sqlite_change_in,
    sqlite_changed,
)
from app.fleet.models import Job, JobStage, Priority
from app.fleet.scheduler import Candidate, WorkerProfile, select_job
from app.fleet.statements import (
    TABLE,
    PgStatement,
    SqliteStatement,
    is_postgres,
    returning,
    sqlite_hop,
    sqlite_job_statement,
)
from app.lone import SqliteHop, lone_unit

_HEAD_COLUMNS = "id, priority, capabilities, engine_class, profile, queued_at, not_before"
_HEAD_TYPES: tuple[TypeEngine[Any], ...] = (
    Integer(), TABLE.c.priority.type, JsonDocument, String(), String(), UTCDateTime(),
    UTCDateTime(),
)


def _head_sql(priority: Priority, *, now: str, postgres: bool) -> str:
    """One priority's queue head: an index range scan of `ix_jobs_claim` in queue order
    that stops at the first row passing the engine-class, profile and capability
    filters (on PostgreSQL, and skipping rows another claimer has locked)."""
    if postgres:
        filters = """(engine_class IS NULL OR engine_class = ANY(:engine_classes))
      AND (profile IS NULL OR profile = ANY(:profiles))
      AND capabilities <@ :capabilities"""
        lock = " FOR UPDATE SKIP LOCKED"
    else:
        filters = """(engine_class IS NULL
           OR engine_class IN (SELECT value FROM json_each(:engine_classes)))
      AND (profile IS NULL OR profile IN (SELECT value FROM json_each(:profiles)))
      AND NOT EXISTS (SELECT 1 FROM json_each(jobs.capabilities) AS needed
                      WHERE needed.value NOT IN (SELECT value FROM json_each(:capabilities)))"""
        lock = ""
    return f"""SELECT {_HEAD_COLUMNS} FROM jobs
    WHERE product_id = :product_id AND stage = 'QUEUED' AND priority = '{priority.value}'
      AND queued_at <= {now}
      AND {filters}
    ORDER BY queued_at, id LIMIT 1{lock}"""


_PG_HEADS = (
    text(
        "WITH clock AS MATERIALIZED (SELECT coalesce(:now, clock_timestamp()) AS now), "
        + ", ".join(
            f"head_{priority.value.lower()} AS (\n    "
            + _head_sql(priority, now="(SELECT now FROM clock)", postgres=True) + ")"
            for priority in Priority
        )
        + "\nSELECT heads.*, clock.now FROM ("
        + " UNION ALL ".join(f"SELECT * FROM head_{p.value.lower()}" for p in Priority)
        + ") AS heads CROSS JOIN clock"
    )
    .bindparams(
        bindparam("now", type_=UTCDateTime()),
        bindparam("engine_classes", type_=ARRAY(String())),
        bindparam("profiles", type_=ARRAY(String())),
        bindparam("capabilities", type_=JSONB()),
    )
    .columns(*(column(name.strip(), type_) for name, type_ in
               zip(_HEAD_COLUMNS.split(","), _HEAD_TYPES, strict=True)),
             column("now", UTCDateTime()))
)
_PG_HEADS_RUN = PgStatement.of(_PG_HEADS)
_SQLITE_HEADS = SqliteStatement(
    " UNION ALL ".join(
        f"SELECT * FROM ({_head_sql(priority, now=':now', postgres=False)})"
        for priority in Priority
    ),
    binds={"now": UTCDateTime()}, results=_HEAD_TYPES,
)


def _sqlite_heads_params(
    product_id: str, worker: WorkerProfile, now: datetime
) -> dict[str, Any]:
    return {
        "product_id": product_id, "now": now,
        "engine_classes": json.dumps(sorted(worker.engine_classes)),
        "profiles": json.dumps(sorted(worker.profiles)),
        "capabilities": json.dumps(sorted(worker.capabilities)),
    }


def pg_claim_heads_statement(
    product_id: str, worker: WorkerProfile, now: datetime | None
) -> tuple[TextualSelect, dict[str, Any]]:
    """PostgreSQL: the heads statement and its parameters (also for EXPLAIN);
    `now` None reads the database clock."""
    return _PG_HEADS, {
        "product_id": product_id, "now": now,
        "engine_classes": sorted(worker.engine_classes),
        "profiles": sorted(worker.profiles),
        "capabilities": sorted(worker.capabilities),
    }


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
        rows: Sequence[Sequence[Any]] = await _PG_HEADS_RUN.rows(session, params)
        read_at = rows[0][-1] if rows else None
    else:
        read_at = now or utcnow()
        rows = await _SQLITE_HEADS.rows(session, _sqlite_heads_params(product_id, worker, read_at))
    if not rows:
        return [], None
    return _candidates(rows), read_at


def _candidates(rows: Sequence[Sequence[Any]]) -> list[Candidate]:
    return [
        Candidate(id=row[0], stage=JobStage.QUEUED, priority=row[1],
                  capabilities=frozenset(row[2] or ()), engine_class=row[3], profile=row[4],
                  eligible_since=row[5], not_before=row[6])
        for row in rows
    ]


# -- assign ---------------------------------------------------------------------

_ASSIGN_SET = """stage = 'ASSIGNED', attempts = {p}attempts + 1,
        lease_fence = {p}lease_fence + 1, lease_worker_id = :worker_id,
        lease_expires_at = :expires_at, not_before = NULL,
        started_at = coalesce({p}started_at, :now), updated_at = :now"""
_ASSIGN_WHERE = "{p}product_id = :product_id AND {p}id = :job_id AND {p}stage = 'QUEUED'"
_PG_ASSIGN = PgStatement(
    "WITH " + pg_with_event(
        f"UPDATE jobs SET {_ASSIGN_SET.format(p='jobs.')}"
        f" WHERE {_ASSIGN_WHERE.format(p='jobs.')}"
        f" RETURNING {returning('jobs.')}, CAST('QUEUED' AS VARCHAR) AS source_stage"
    ),
    *EVENT_RESULT,
    binds=(bindparam("now", type_=UTCDateTime()),
           bindparam("expires_at", type_=UTCDateTime()), EVENT_CREATED_AT),
)
_SQLITE_ASSIGN = sqlite_job_statement(
    f"UPDATE jobs SET {_ASSIGN_SET.format(p='')} WHERE {_ASSIGN_WHERE.format(p='')}"
    f" RETURNING {returning('')}",
    now=UTCDateTime(), expires_at=UTCDateTime(),
)


def _assign_params(product_id: str, job_id: int, worker_id: str, now: datetime,
                   lease_seconds: int) -> dict[str, Any]:
    return {
        "product_id": product_id, "job_id": job_id, "worker_id": worker_id, "now": now,
        "expires_at": now + timedelta(seconds=lease_seconds),
    }


async def assign(
    session: AsyncSession, product_id: str, job_id: int, worker_id: str, *,
    now: datetime, lease_seconds: int,
) -> Job | None:
    """Give QUEUED job `job_id` to `worker_id` (DESIGN §2): ASSIGNED, attempts + 1,
    fence + 1, lease until `now + lease_seconds`, `notBefore` cleared, `startedAt`
    set on the first claim; one stage-change event.  None when the job is not
    QUEUED (the claim path holds it locked, so that does not happen there)."""
    params = _assign_params(product_id, job_id, worker_id, now, lease_seconds)
    if is_postgres(session):
        return await pg_change(session, _PG_ASSIGN, params)
    return await sqlite_change(session, _SQLITE_ASSIGN, params, source=JobStage.QUEUED)


# -- the claim ------------------------------------------------------------------


async def claim_job(
    session: AsyncSession, product_id: str, worker: WorkerProfile, *,
    now: datetime | None, lease_seconds: int, aging_seconds: int,
) -> Job | None:
    """The job `select_job` (DESIGN §3, aging over `aging_seconds`) picks among the
    heads, assigned to `worker` for `lease_seconds`; None when there is none.  `now`
    None reads the database clock (PostgreSQL) or the process clock (SQLite)."""
    lone = lone_unit(session)
    if not is_postgres(session):
        clock = now or utcnow()
        params = _sqlite_heads_params(product_id, worker, clock)

        def claim_in(hop: SqliteHop) -> tuple[Sequence[Any], EventRecord] | None:
            chosen = select_job(_candidates(_SQLITE_HEADS.run(hop, params)), worker, clock,
                                aging_seconds)
            if chosen is None:
                return None
            assignment = _assign_params(product_id, chosen.id, worker.worker_id, clock,
                                        lease_seconds)
            return sqlite_change_in(hop, _SQLITE_ASSIGN,
                                    {**assignment, "event_created_at": utcnow()},
                                    JobStage.QUEUED)

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
    bind = session.get_bind()
    _, heads_params = pg_claim_heads_statement(product_id, worker, now)

    async def alone(driver: Any) -> tuple[Sequence[Any], datetime] | None:
        rows = await _PG_HEADS_RUN.fetch(driver, bind.dialect, heads_params, bind)
        if not rows:
            return None
        read_at: datetime = rows[0][-1]
        chosen = select_job(_candidates(rows), worker, read_at, aging_seconds)
        if chosen is None:
            return None
        created_at = utcnow()
        params = _assign_params(product_id, chosen.id, worker.worker_id, read_at, lease_seconds)
        assigned = await _PG_ASSIGN.fetch(
            driver, bind.dialect, {**params, "event_created_at": created_at}, bind)
        return (assigned[0], created_at) if assigned else None

    return await lone.run(alone, lambda done: pg_changed(session, *done), transaction=True)
