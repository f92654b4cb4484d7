"""The claim's statements (DESIGN §2, §3), built once at import: the queues' heads and
the assignment with its event, for each store; and the rows-to-candidates step
between them.  How they run: `app.fleet.claim` (one claim) and
`app.fleet.claim_batch` (a batch of a product's concurrent claims on PostgreSQL).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, TextualSelect, bindparam, column, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import Integer, TypeEngine

from app.db import JsonDocument, UTCDateTime
from app.events.outbox import EVENT_CREATED_AT
from app.fleet.changes import ECHO_RESULT, EVENT_RESULT, pg_with_event
from app.fleet.models import JobStage, Priority
from app.fleet.scheduler import Candidate, WorkerProfile
from app.fleet.statements import (
    TABLE,
    PgStatement,
    SqliteStatement,
    returning,
    sqlite_job_statement,
)

_HEAD_COLUMNS = ("id, priority, capabilities, engine_class, profile, queued_at, not_before,"
                 " lease_fence")
_HEAD_TYPES: tuple[TypeEngine[Any], ...] = (
    Integer(), TABLE.c.priority.type, JsonDocument, String(), String(), UTCDateTime(),
    UTCDateTime(), Integer(),
)
HEAD_FENCE = 7  # a head row's lease_fence


def _head_sql(priority: str, *, now: str, postgres: bool, limit: str = "1",
              lock: bool = True) -> str:
    """One priority's queue head (`priority`: an SQL expression), its first `limit`
    rows: an index range scan of `ix_jobs_claim` in queue order that stops at the
    first rows passing the engine-class, profile and capability filters (on
    PostgreSQL with `lock`, locking them and skipping rows another claimer has
    locked)."""
    if postgres:
        filters = """(engine_class IS NULL OR engine_class = ANY(:engine_classes))
      AND (profile IS NULL OR profile = ANY(:profiles))
      AND capabilities <@ :capabilities"""
        locking = " FOR UPDATE SKIP LOCKED" if lock else ""
    else:
        filters = """(engine_class IS NULL
           OR engine_class IN (SELECT value FROM json_each(:engine_classes)))
      AND (profile IS NULL OR profile IN (SELECT value FROM json_each(:profiles)))
      AND NOT EXISTS (SELECT 1 FROM json_each(jobs.capabilities) AS needed
                      WHERE needed.value NOT IN (SELECT value FROM json_each(:capabilities)))"""
        locking = ""
    return f"""SELECT {_HEAD_COLUMNS} FROM jobs
    WHERE product_id = :product_id AND stage = 'QUEUED' AND jobs.priority = {priority}
      AND queued_at <= {now}
      AND {filters}
    ORDER BY queued_at, id LIMIT {limit}{locking}"""


def _pg_heads(limit: str, *, lock: bool = True) -> TextualSelect:
    """The four heads (`limit` rows each: a literal, or `:n`; locked with `lock`) and
    the clock they were read at, as one statement, in no particular order (the
    scheduler's choice and `claim_batch.first_untaken` do not depend on it).

    One head query, run for each priority by a LATERAL join over the four: planned
    once, where four CTEs were planned one by one.  With the table analyzed (as
    autovacuum keeps it) PostgreSQL plans a prepared statement anew for each run, and
    that planning was most of the heads' cost: 0.78 → 0.39 ms per run on 2,000
    queued jobs (bench/RESULTS.md, 2026-11-30 19:41)."""
    binds: list[BindParameter[Any]] = [
        bindparam("now", type_=UTCDateTime()),
        bindparam("engine_classes", type_=ARRAY(String())),
        bindparam("profiles", type_=ARRAY(String())),
        bindparam("capabilities", type_=JSONB()),
    ]
    if limit.startswith(":"):
        binds.append(bindparam(limit[1:], type_=Integer()))
    queues = ", ".join(f"('{priority.value}')" for priority in Priority)
    return (
        text(
            "WITH clock AS MATERIALIZED (SELECT coalesce(:now, clock_timestamp()) AS now)\n"
            f"SELECT heads.*, clock.now FROM clock CROSS JOIN (VALUES {queues})"
            " AS queue(priority)\nCROSS JOIN LATERAL (\n    "
            + _head_sql("queue.priority", now="clock.now", postgres=True, limit=limit,
                        lock=lock)
            + ") AS heads"
        )
        .bindparams(*binds)
        .columns(*(column(name.strip(), type_) for name, type_ in
                   zip(_HEAD_COLUMNS.split(","), _HEAD_TYPES, strict=True)),
                 column("now", UTCDateTime()))
    )


PG_HEADS = _pg_heads("1")
PG_HEADS_RUN = PgStatement.of(PG_HEADS)
# The first `n` rows of each priority's queue: the heads of a batch of n claims
# (app.fleet.claim_batch).
PG_HEADS_N_RUN = PgStatement.of(_pg_heads(":n"))
# The heads read without locking them: a claim alone's first try (app.fleet.claim_batch),
# which then assigns only if its job is as it read it (`PG_ASSIGN_IF_UNCHANGED`).
PG_HEADS_READ_RUN = PgStatement.of(_pg_heads("1", lock=False))
SQLITE_HEADS = SqliteStatement(
    " UNION ALL ".join(
        "SELECT * FROM ("
        + _head_sql(f"'{priority.value}'", now=":now", postgres=False) + ")"
        for priority in Priority
    ),
    binds={"now": UTCDateTime()}, results=_HEAD_TYPES,
)


def sqlite_heads_params(
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
    return PG_HEADS, {
        "product_id": product_id, "now": now,
        "engine_classes": sorted(worker.engine_classes),
        "profiles": sorted(worker.profiles),
        "capabilities": sorted(worker.capabilities),
    }


def candidates(rows: Sequence[Sequence[Any]]) -> list[Candidate]:
    """Head rows (`_HEAD_COLUMNS`) as the scheduler's candidates."""
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


def _pg_assign(*, echo: bool) -> PgStatement:
    """`PG_ASSIGN`; `echo`: its row also reads the job's tracker item for the echo
    (`app.fleet.changes.EchoSeen`, FLEET_TRACKER_ECHO on)."""
    return PgStatement(
        "WITH " + pg_with_event(
            f"UPDATE jobs SET {_ASSIGN_SET.format(p='jobs.')}"
            f" WHERE {_ASSIGN_WHERE.format(p='jobs.')}"
            f" RETURNING {returning('jobs.')}, CAST('QUEUED' AS VARCHAR) AS source_stage",
            echo=echo),
        *(ECHO_RESULT if echo else EVENT_RESULT),
        binds=(bindparam("now", type_=UTCDateTime()),
               bindparam("expires_at", type_=UTCDateTime()), EVENT_CREATED_AT),
    )


def _pg_assign_if_unchanged(*, echo: bool) -> PgStatement:
    """`PG_ASSIGN_IF_UNCHANGED`; `echo` as for `_pg_assign`."""
    return PgStatement(
        "WITH locked AS (SELECT id FROM jobs WHERE product_id = :product_id AND id = :job_id"
        " AND stage = 'QUEUED' AND lease_fence = :fence"
        " AND (not_before IS NULL OR not_before <= :now) FOR UPDATE SKIP LOCKED), "
        + pg_with_event(
            f"UPDATE jobs SET {_ASSIGN_SET.format(p='jobs.')} FROM locked"
            f" WHERE jobs.id = locked.id AND {_ASSIGN_WHERE.format(p='jobs.')}"
            f" RETURNING {returning('jobs.')}, CAST('QUEUED' AS VARCHAR) AS source_stage",
            echo=echo),
        *(ECHO_RESULT if echo else EVENT_RESULT),
        binds=(bindparam("now", type_=UTCDateTime()), bindparam("fence", type_=Integer()),
               bindparam("expires_at", type_=UTCDateTime()), EVENT_CREATED_AT),
    )


PG_ASSIGN = _pg_assign(echo=False)
PG_ASSIGN_ECHO = _pg_assign(echo=True)
# The assignment of a job read without a lock: only while it is still QUEUED at the
# fence read (any claim or requeue since has raised it), eligible at `now`, and not
# locked by another transaction (SKIP LOCKED: the statement never waits, and a job
# another claimer is assigning is simply not assigned) — one statement, its own
# implicit transaction.
PG_ASSIGN_IF_UNCHANGED = _pg_assign_if_unchanged(echo=False)
PG_ASSIGN_IF_UNCHANGED_ECHO = _pg_assign_if_unchanged(echo=True)
SQLITE_ASSIGN = sqlite_job_statement(
    f"UPDATE jobs SET {_ASSIGN_SET.format(p='')} WHERE {_ASSIGN_WHERE.format(p='')}"
    f" RETURNING {returning('')}",
    now=UTCDateTime(), expires_at=UTCDateTime(),
)


def assign_params(product_id: str, job_id: int, worker_id: str, now: datetime,
                   lease_seconds: int) -> dict[str, Any]:
    return {
        "product_id": product_id, "job_id": job_id, "worker_id": worker_id, "now": now,
        "expires_at": now + timedelta(seconds=lease_seconds),
    }
