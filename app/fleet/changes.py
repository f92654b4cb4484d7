"""A job change and its event, in as few round trips as each store allows.

Events (DESIGN §5): on PostgreSQL the job UPDATE, the bump of the product's
`last_event_seq`, the event row and the NOTIFY are one statement
(`pg_with_event`, on `app.events.outbox.pg_append_event_ctes`); the product row
stays locked until commit, as with `record_event`, so sequences stay gap-free and in
commit order.  In a unit of work of one call (`app.lone`) that statement is the
whole transaction.  On SQLite the transaction holds the write lock throughout: the
sequence is bumped first (the job's stage read by the same statement, for the
event's `from`) and given back if the UPDATE then matches nothing, which no other
connection can observe; the three statements run in one hop to the driver's
thread (`SqliteHop`), with BEGIN and COMMIT too in a unit of work of one call.
Either way the record is handed to the hub with `remember_event`, as
`record_event` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, String, column
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.events.models import EventType
from app.events.outbox import (
    EVENT_BIND_TYPES,
    PG_NOTIFY_SQL,
    SQLITE_INSERT_EVENT_SQL,
    EventRecord,
    event_row_values,
    pg_append_event_ctes,
    remember_event,
)
from app.fleet.change_groups import pg_change_grouped
from app.fleet.models import Job, JobStage
from app.fleet.statements import (
    COLUMNS,
    KEYS,
    PgStatement,
    SqliteStatement,
    job_from_row,
    row_stage_event,
    sqlite_hop,
    stage_event,
)
from app.lone import SqliteHop, lone_unit

# For the tracker echo (`echo=True`): the job's item as the statement reads it, and
# whether the job is the item's latest (app.bridge.echo_lean decides on them).
_ECHO_SELECT = (
    ", items.status AS echo_item_status, items.bridge_status AS echo_bridge_status,"
    " NOT EXISTS (SELECT 1 FROM jobs AS newer WHERE newer.tracker_item_id ="
    " change.tracker_item_id AND newer.id > change.id) AS echo_latest"
)


def pg_with_event(change_sql: str, *, echo: bool = False) -> str:
    """`change AS (<change_sql>), <event CTEs> SELECT change.*, seq, NOTIFY` —
    `change_sql` is an UPDATE … RETURNING the job's columns and `source_stage`.
    `echo`: the row also carries `ECHO_RESULT` (NULLs for a job with no item)."""
    payload = ("jsonb_strip_nulls(jsonb_build_object('attempts', change.attempts, "
               "'fence', change.lease_fence, 'trackerItemId', change.tracker_item_id))")
    return (
        f"change AS (\n    {change_sql}\n), "
        + pg_append_event_ctes(
            "change", type_sql=f"'{EventType.JOB_STAGE_CHANGED.value}'",
            entity_id_sql="change.id", from_state_sql="change.source_stage",
            to_state_sql="change.stage", payload_sql=payload,
        )
        + f"\nSELECT change.*, event_row.seq AS event_seq, {PG_NOTIFY_SQL} AS notified"
        + (_ECHO_SELECT if echo else "") + " FROM change CROSS JOIN event_row"
        + (" LEFT JOIN items ON items.id = change.tracker_item_id" if echo else "")
    )


EVENT_RESULT = (column("source_stage", String), column("event_seq", BigInteger),
                column("notified", String))
ECHO_RESULT = (*EVENT_RESULT, column("echo_item_status", String),
               column("echo_bridge_status", String), column("echo_latest", Boolean))
_SEEN = len(COLUMNS) + len(EVENT_RESULT)


@dataclass(frozen=True, slots=True)
class EchoSeen:
    """What a stage change's own statement read for the tracker echo: the job's row
    as changed (model column order) and its item's status, bridge status and
    whether the job is the item's latest, as of the statement.  Carried by the
    change's event record (`EventRecord.seen`), never stored."""

    job: Sequence[Any]
    item_status: str
    bridge_status: str | None
    latest: bool


def pg_changed(session: AsyncSession, row: Sequence[Any], created_at: datetime) -> Job:
    """The job of a change-with-event row; its event remembered for the hub (with
    what the row carries for the echo, `EchoSeen`, when it does)."""
    job = job_from_row(session, row)
    source, seq = JobStage(row[len(COLUMNS)]), row[len(COLUMNS) + 1]
    record = stage_event(job, source, seq, created_at)
    if len(row) > _SEEN and row[_SEEN] is not None:
        record = replace(record, seen=EchoSeen(row[:len(COLUMNS)], *row[_SEEN:_SEEN + 3]))
    remember_event(session, record)
    return job


async def pg_change(
    session: AsyncSession, statement: PgStatement, params: dict[str, Any], *,
    grouped: PgStatement | None = None,
) -> Job | None:
    """PostgreSQL: run a change-with-event statement; remember its event.  Alone
    (its own implicit transaction) when the unit of work is this one call — and
    then, given `grouped` (the statement's batch variant, `params` naming the
    product and the job), committed with the product's concurrent changes of this
    process when one is in flight (`app.fleet.change_groups`)."""
    created_at = utcnow()
    args = {**params, "event_created_at": created_at}

    def then(row: Sequence[Any]) -> Job:
        return pg_changed(session, row, created_at)

    lone = lone_unit(session)
    if grouped is not None and lone is not None:
        return await pg_change_grouped(lone, statement, grouped, args, then)
    return await _pg_first(session, statement, args, then)


async def pg_job_change(
    session: AsyncSession, statement: PgStatement, params: dict[str, Any]
) -> Job | None:
    """PostgreSQL: a change without an event (heartbeat); alone as `pg_change`."""
    return await _pg_first(session, statement, params, lambda row: job_from_row(session, row))


async def _pg_first(session: AsyncSession, statement: PgStatement, args: dict[str, Any],
                    then: Callable[[Sequence[Any]], Job]) -> Job | None:
    """`then` of the statement's first row (None when it matched nothing): alone on the
    driver, as its own implicit transaction, when the unit of work is this one call;
    else in the session's transaction."""
    lone = lone_unit(session)
    if lone is not None:
        bind = session.get_bind()

        async def alone(driver: Any) -> Sequence[Any] | None:
            rows = await statement.fetch(driver, bind.dialect, args, bind)
            return rows[0] if rows else None

        return await lone.run(alone, then, transaction=False)
    row = await statement.first(session, args)
    return None if row is None else then(row)


_SQLITE_BUMP = SqliteStatement(
    "UPDATE products SET last_event_seq = last_event_seq + 1 WHERE id = :product_id"
    " RETURNING last_event_seq"
)
_SQLITE_BUMP_READING_STAGE = SqliteStatement(
    "UPDATE products SET last_event_seq = last_event_seq + 1 WHERE id = :product_id"
    " RETURNING last_event_seq,"
    " (SELECT stage FROM jobs WHERE product_id = :product_id AND id = :job_id)"
)
_SQLITE_UNBUMP = SqliteStatement(
    "UPDATE products SET last_event_seq = last_event_seq - 1 WHERE id = :product_id"
)
_SQLITE_EVENT = SqliteStatement(SQLITE_INSERT_EVENT_SQL, binds=EVENT_BIND_TYPES)
# FLEET_TRACKER_ECHO on: the job's item as the change leaves it, under the same write
# lock (`EchoSeen`, as the PostgreSQL statement's `_ECHO_SELECT` reads it).
_SQLITE_ECHO_ITEM = SqliteStatement(
    "SELECT status, bridge_status, NOT EXISTS (SELECT 1 FROM jobs AS newer"
    " WHERE newer.tracker_item_id = :item_id AND newer.id > :job_id)"
    " FROM items WHERE id = :item_id"
)
_ITEM_ID = KEYS.index("tracker_item_id")
_JOB_ID = KEYS.index("id")


def sqlite_change_in(
    hop: SqliteHop, statement: SqliteStatement, params: dict[str, Any],
    source: JobStage | None, *, echo: bool = False,
) -> tuple[Sequence[Any], EventRecord] | None:
    """SQLite, in the driver's thread: the change and its event in three statements
    under the write lock.  With `source` None the job's current stage is read (the
    event's `from`) by the statement that bumps the sequence, which is given back
    when the change matches nothing; with `source` given the sequence is bumped after
    the change.  `params` carries `now` and `event_created_at`.  `echo`
    (FLEET_TRACKER_ECHO on): the record also carries the job's item as the change
    leaves it (`EchoSeen`), read in the same hop."""
    if source is None:
        bumped = _SQLITE_BUMP_READING_STAGE.first_of(hop, params)
        if bumped is None:  # no such product: no such job either
            return None
        if bumped[1] is None or (row := statement.first_of(hop, params)) is None:
            _SQLITE_UNBUMP.run(hop, params)
            return None
        seq, source = bumped[0], JobStage(bumped[1])
    else:
        if (row := statement.first_of(hop, params)) is None:
            return None
        [[seq]] = _SQLITE_BUMP.run(hop, params)
    record = row_stage_event(row, source, seq, params["event_created_at"])
    _SQLITE_EVENT.run(hop, event_row_values(record))
    if echo and row[_ITEM_ID] is not None:
        item = _SQLITE_ECHO_ITEM.first_of(hop, {"item_id": row[_ITEM_ID],
                                                "job_id": row[_JOB_ID]})
        if item is not None:
            record = replace(record, seen=EchoSeen(tuple(row[:len(COLUMNS)]), item[0],
                                                   item[1], bool(item[2])))
    return row, record


def sqlite_changed(session: AsyncSession, done: tuple[Sequence[Any], EventRecord]) -> Job:
    """The job of `sqlite_change_in`'s row; its event remembered for the hub."""
    row, record = done
    job = job_from_row(session, row)
    remember_event(session, record)
    return job


async def sqlite_change(
    session: AsyncSession, statement: SqliteStatement, params: dict[str, Any], *,
    source: JobStage | None = None, echo: bool = False,
) -> Job | None:
    """SQLite: `sqlite_change_in` in one hop to the driver's thread — in the session's
    transaction, or, in a unit of work of this one call (`app.lone`), as a
    transaction of its own in that same hop."""
    now = utcnow()
    params = {"now": now, "event_created_at": now, **params}

    def change_in(hop: SqliteHop) -> tuple[Sequence[Any], EventRecord] | None:
        return sqlite_change_in(hop, statement, params, source, echo=echo)

    lone = lone_unit(session)
    if lone is not None:
        return await lone.run_sqlite(change_in, lambda done: sqlite_changed(session, done))
    done = await sqlite_hop(session, change_in)
    return None if done is None else sqlite_changed(session, done)
