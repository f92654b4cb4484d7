"""What an echo writes: the item's status, the metrics comment and their events, and
the job's echo record.  Every write is scoped to one product.

An echo runs after every stage change while FLEET_TRACKER_ECHO is on, so it goes the
way of the lease holder's hot path (`app.fleet.cycle`): SQL built once, at import,
with bind parameters only; no ORM loading and no ORM flush.  On PostgreSQL each
statement is one round trip on the unit of work's connection, and the whole item
write — status, comment, the product's sequence bumped once for both events, the
two event rows and their NOTIFY — is a single statement.  On SQLite each write is
one hop to the driver's thread, whatever its number of statements
(`app.bridge.driver`).

| an echo | PostgreSQL | SQLite statements (hops) |
|---|---|---|
| read under lock (item, job, latest job) | 1 | 1 per job (1 for all) |
| item: status + comment + events, and the job's echo record | 1 | 5 (1) |
| item: comment + event (status left as is), and the record | 1 | 4 (1) |
| the jobs' echo records alone (nothing on the item) | 1 | 1 per job (1 for all) |
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, String, TextualSelect, bindparam, column, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeEngine

from app.bridge.driver import bind, on_driver_thread
from app.db import JsonDocument, UTCDateTime
from app.events.models import EventType
from app.events.outbox import EVENT_CHANNEL, EventRecord, remember_event
from app.fleet.models import JobStage
from app.tracker.models import CommentKind, ItemStatus


def _postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# -- the job's record -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EchoRecord:
    """What a completed echo leaves on its job: the stage echoed and the status last
    echoed; any pending retry is cleared."""

    job_id: int
    stage: JobStage
    last_echoed_status: ItemStatus | None


_RECORD_ECHO_SQL = (
    "UPDATE jobs SET echoed_stage = :echoed_stage, last_echoed_status = :echoed_status,"
    " echo_attempts = 0, echo_retry_at = NULL, echo_retry_stage = NULL"
    " WHERE product_id = :product_id AND id = :job_id"
)
_PG_RECORD_ECHO = text(_RECORD_ECHO_SQL).bindparams(
    bindparam("echoed_stage", type_=String()), bindparam("echoed_status", type_=String()))


def _record_params(product_id: str, record: EchoRecord) -> dict[str, Any]:
    return {"product_id": product_id, "job_id": record.job_id,
            "echoed_stage": record.stage.value,
            "echoed_status": None if record.last_echoed_status is None
            else record.last_echoed_status.value}


async def record_echoes(
    session: AsyncSession, product_id: str, records: Sequence[EchoRecord]
) -> None:
    """Store each completed echo on its job: one UPDATE each (on PostgreSQL one
    executemany for several, on SQLite one hop for all).  The caller holds the jobs'
    row locks (`echo_rows`)."""
    params = [_record_params(product_id, record) for record in records]
    if not params:
        return
    if not _postgres(session):
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(_RECORD_ECHO_SQL, params)

        await on_driver_thread(await session.connection(), run,
                               [(_RECORD_ECHO_SQL, values) for values in params])
    elif len(params) == 1:  # the usual case: a plain execute, not the executemany path
        await session.execute(_PG_RECORD_ECHO, params[0])
    else:
        await session.execute(_PG_RECORD_ECHO, params)


# -- the item write ---------------------------------------------------------------

# An item is written by primary key alone: the echo found it as the tracker item of
# a job of the product, under lock (`echo_rows`).  `product_id = … AND id = …` would
# let a planner without statistics scan the product's items instead.
_SET_STATUS_SQL = (
    "UPDATE items SET status = :status, bridge_status = :status, updated_at = :now"
    " WHERE id = :item_id"
)
_INSERT_COMMENT_SQL = (
    "INSERT INTO comments (product_id, item_id, body, author, kind, created_at)"
    " VALUES (:product_id, :item_id, :body, :author, :kind, :now) RETURNING id"
)
_EVENT_COLUMNS = "product_id, seq, type, entity_id, from_state, to_state, payload, created_at"
_STATUS_EVENT = (
    f"'{EventType.ITEM_STATUS_CHANGED.value}', CAST(:item_id AS INTEGER),"
    " CAST(:previous AS VARCHAR), CAST(:status AS VARCHAR), CAST('{}' AS JSONB)"
)
_COMMENT_EVENT = (
    f"'{EventType.COMMENT_ADDED.value}', comment_row.id, NULL, NULL,"
    " CAST(:comment_payload AS JSONB)"
)


def _pg_write_sql(*, status: bool, record: bool) -> str:
    """PostgreSQL: the item write in one statement, with the job's echo record when
    `record`.  The product's sequence is bumped once, by the number of events (its
    row stays locked until commit: gap-free, commit-ordered sequences, as
    `app.events.outbox` keeps them); the status change takes the first of them, the
    comment the last; each event row is announced by its NOTIFY when the transaction
    commits."""
    events = 2 if status else 1
    status_cte = f"item_row AS ({_SET_STATUS_SQL} RETURNING id), " if status else ""
    if record:
        status_cte = f"job_row AS ({_RECORD_ECHO_SQL} RETURNING id), " + status_cte
    status_event = (
        f"SELECT event_seq.id, event_seq.last_event_seq - 1, {_STATUS_EVENT},"
        " :event_created_at FROM event_seq UNION ALL " if status else ""
    )
    return f"""WITH {status_cte}comment_row AS ({_INSERT_COMMENT_SQL}),
event_seq AS (
    UPDATE products SET last_event_seq = products.last_event_seq + {events}
    WHERE products.id = :product_id
    RETURNING products.id, products.last_event_seq
), event_row AS (
    INSERT INTO events ({_EVENT_COLUMNS})
    {status_event}SELECT event_seq.id, event_seq.last_event_seq, {_COMMENT_EVENT},
           :event_created_at FROM event_seq CROSS JOIN comment_row
    RETURNING product_id, seq, entity_id
)
SELECT seq, entity_id, pg_notify('{EVENT_CHANNEL}', product_id || ':' || seq) AS notified
FROM event_row ORDER BY seq"""


def _pg_write(*, status: bool, record: bool) -> TextualSelect:
    return (
        text(_pg_write_sql(status=status, record=record))
        .bindparams(
            bindparam("now", type_=UTCDateTime()),
            bindparam("event_created_at", type_=UTCDateTime()),
            bindparam("comment_payload", type_=JsonDocument),
        )
        .columns(column("seq", BigInteger), column("entity_id", Integer),
                 column("notified", String))
    )


_PG_WRITES = {(status, record): _pg_write(status=status, record=record)
              for status in (False, True) for record in (False, True)}

_SQLITE_BUMP_SQL = (
    "UPDATE products SET last_event_seq = last_event_seq + :count WHERE id = :product_id"
    " RETURNING last_event_seq"
)
_SQLITE_EVENT_SQL = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (:product_id, :seq, :type, :entity_id,"
    " :from_state, :to_state, :payload, :created_at)"
)
_SQLITE_TYPES: dict[str, TypeEngine[Any]] = {
    "now": UTCDateTime(), "event_created_at": UTCDateTime()}
_SQLITE_EVENT_TYPES: dict[str, TypeEngine[Any]] = {
    "created_at": UTCDateTime(), "payload": JsonDocument}


async def write_onto_item(
    session: AsyncSession, product_id: str, item_id: int, *, previous: ItemStatus,
    status: ItemStatus | None, body: str, author: str, kind: CommentKind, now: datetime,
    record: EchoRecord | None = None,
) -> None:
    """The echo's write onto an item the caller holds (read under its row lock, with
    status `previous`): `status` set, with `updated_at = now`, and recorded as the
    status the bridge owns (`bridge_status`), unless it is None; the comment added;
    and the events of both (ITEM_STATUS_CHANGED first, then COMMENT_ADDED), handed to
    the hub after commit (`remember_event`).  With `record`, the job's echo record
    (`record_echoes`) is stored with it.  One statement on PostgreSQL, one hop of
    four or five statements on SQLite (see the module docstring)."""
    params: dict[str, Any] = {
        "product_id": product_id, "item_id": item_id, "body": body, "author": author,
        "kind": kind.value, "now": now, "event_created_at": now,
    }
    comment_payload = {"itemId": item_id, "kind": kind.value}
    if status is not None:
        params.update(status=status.value, previous=previous.value)
    if record is not None:
        params.update(_record_params(product_id, record))
    if _postgres(session):
        statement = _PG_WRITES[(status is not None, record is not None)]
        rows = (await session.execute(
            statement, {**params, "comment_payload": comment_payload})).all()
        seqs = [(row[0], row[1]) for row in rows]
    else:
        seqs = await _sqlite_write(session, params, comment_payload,
                                   status=status is not None, record=record is not None)
    events = []
    if status is not None:
        seq, _ = seqs[0]
        events.append(EventRecord(
            product_id=product_id, seq=seq, type=EventType.ITEM_STATUS_CHANGED,
            entity_id=item_id, from_state=previous.value, to_state=status.value,
            created_at=now, payload={},
        ))
    seq, comment_id = seqs[-1]
    events.append(EventRecord(
        product_id=product_id, seq=seq, type=EventType.COMMENT_ADDED, entity_id=comment_id,
        from_state=None, to_state=None, created_at=now, payload=comment_payload,
    ))
    for event in events:
        remember_event(session, event)


async def _sqlite_write(
    session: AsyncSession, params: dict[str, Any], comment_payload: dict[str, Any],
    *, status: bool, record: bool,
) -> list[tuple[int, int]]:
    """SQLite: `write_onto_item`'s statements in one hop: the record, the status, the
    comment, the product's sequence bumped once for both events (the transaction holds
    the write lock), the event rows.  Returns (seq, entity id) of each event."""
    connection = await session.connection()
    dialect = connection.dialect
    values = bind(dialect, params, _SQLITE_TYPES)
    count = 2 if status else 1
    bump = {"product_id": params["product_id"], "count": count}
    status_event = bind(dialect, {
        "product_id": params["product_id"], "type": EventType.ITEM_STATUS_CHANGED.value,
        "entity_id": params["item_id"], "from_state": params.get("previous"),
        "to_state": params.get("status"), "payload": {}, "created_at": params["now"],
    }, _SQLITE_EVENT_TYPES)
    comment_event = bind(dialect, {
        "product_id": params["product_id"], "type": EventType.COMMENT_ADDED.value,
        "from_state": None, "to_state": None, "payload": comment_payload,
        "created_at": params["now"],
    }, _SQLITE_EVENT_TYPES)
    statements = [
        *([(_RECORD_ECHO_SQL, values)] if record else []),
        *([(_SET_STATUS_SQL, values)] if status else []),
        (_INSERT_COMMENT_SQL, values), (_SQLITE_BUMP_SQL, bump),
        *([(_SQLITE_EVENT_SQL, status_event)] if status else []),
        (_SQLITE_EVENT_SQL, comment_event),
    ]

    def write(conn: sqlite3.Connection) -> list[tuple[int, int]]:
        if record:
            conn.execute(_RECORD_ECHO_SQL, values)
        if status:
            conn.execute(_SET_STATUS_SQL, values)
        [(comment_id,)] = conn.execute(_INSERT_COMMENT_SQL, values).fetchall()
        [(last,)] = conn.execute(_SQLITE_BUMP_SQL, bump).fetchall()
        seqs = [(last - 1, params["item_id"])] if status else []
        seqs.append((last, comment_id))
        if status:
            conn.execute(_SQLITE_EVENT_SQL, {**status_event, "seq": last - 1})
        conn.execute(_SQLITE_EVENT_SQL,
                     {**comment_event, "seq": last, "entity_id": comment_id})
        return seqs

    return await on_driver_thread(connection, write, statements)


_SET_BRIDGE_STATUS_SQL = "UPDATE items SET bridge_status = :bridge_status WHERE id = :item_id"
_PG_SET_BRIDGE_STATUS = text(_SET_BRIDGE_STATUS_SQL).bindparams(
    bindparam("bridge_status", type_=String()))


async def write_bridge_status(
    session: AsyncSession, product_id: str, item_id: int, bridge_status: ItemStatus | None
) -> None:
    """Record `bridge_status` as the status the bridge owns on an item the caller
    holds (the status itself is left as it is)."""
    params = {"item_id": item_id,
              "bridge_status": None if bridge_status is None else bridge_status.value}
    if _postgres(session):
        await session.execute(_PG_SET_BRIDGE_STATUS, params)
        return

    def run(conn: sqlite3.Connection) -> None:
        conn.execute(_SET_BRIDGE_STATUS_SQL, params)

    await on_driver_thread(await session.connection(), run, [(_SET_BRIDGE_STATUS_SQL, params)])
