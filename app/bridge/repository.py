"""The echo's own statements: what it reads (the item and the job, in one statement),
what it writes onto the item (status, comment and their events) and records on the
job, and the sweeper's backlog.  Every query is scoped to one product, except the
backlog, which spans them.

An echo runs after every stage change while FLEET_TRACKER_ECHO is on, so it goes the
way of the lease holder's hot path (`app.fleet.cycle`): SQL built once, at import,
with bind parameters only; no ORM loading and no ORM flush.  On PostgreSQL each
statement is one round trip on the unit of work's connection, and the whole item
write — status, comment, the product's sequence bumped once for both events, the
two event rows and their NOTIFY — is a single statement.  On SQLite each statement
is one hop to the driver's thread (`SqliteStatement`), the item write four.

| an echo | PostgreSQL | SQLite |
|---|---|---|
| read under lock (item, job, latest job) | 1 | 1 |
| item: status + comment + events, and the job's echo record | 1 | 5 |
| item: comment + event (status left as is), and the record | 1 | 4 |
| the job's echo record alone (nothing on the item) | 1 | 1 |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Float,
    Integer,
    String,
    Table,
    TextualSelect,
    and_,
    bindparam,
    column,
    not_,
    or_,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.types import TypeEngine

from app.bridge.mapping import same_status_stages
from app.db import JsonDocument, UTCDateTime
from app.events.models import EventType
from app.events.outbox import (
    EVENT_CHANNEL,
    EventRecord,
    remember_event,
)
from app.fleet.cycle import SqliteStatement
from app.fleet.models import JOB_STAGE, Job, JobStage
from app.tracker.models import ITEM_STATUS, CommentKind, ItemStatus

JOBS: Table = Job.__table__  # type: ignore[assignment]


def _postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# -- the read ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EchoRow:
    """One tracker-linked job as an echo reads it: its item's status, what the bridge
    recorded on both, whether it is the item's latest job, and its metrics."""

    product_id: str
    job_id: int
    item_id: int
    item_status: ItemStatus
    bridge_status: ItemStatus | None
    latest: bool
    stage: JobStage
    echoed_stage: JobStage | None
    last_echoed_status: ItemStatus | None
    echo_attempts: int
    echo_retry_at: datetime | None
    echo_retry_stage: JobStage | None
    attempts: int
    max_attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    cost_usd: float
    tokens_in: int
    tokens_out: int


_ROW_COLUMNS: tuple[tuple[str, str, TypeEngine[Any]], ...] = (
    ("product_id", "jobs.product_id", String()),
    ("job_id", "jobs.id", Integer()),
    ("item_id", "items.id", Integer()),
    ("item_status", "items.status", ITEM_STATUS),
    ("bridge_status", "items.bridge_status", ITEM_STATUS),
    ("latest", "NOT EXISTS (SELECT 1 FROM jobs AS newer"
               " WHERE newer.tracker_item_id = jobs.tracker_item_id AND newer.id > jobs.id)",
     Boolean()),
    ("stage", "jobs.stage", JOB_STAGE),
    ("echoed_stage", "jobs.echoed_stage", JOB_STAGE),
    ("last_echoed_status", "jobs.last_echoed_status", ITEM_STATUS),
    ("echo_attempts", "jobs.echo_attempts", Integer()),
    ("echo_retry_at", "jobs.echo_retry_at", UTCDateTime()),
    ("echo_retry_stage", "jobs.echo_retry_stage", JOB_STAGE),
    ("attempts", "jobs.attempts", Integer()),
    ("max_attempts", "jobs.max_attempts", Integer()),
    ("started_at", "jobs.started_at", UTCDateTime()),
    ("finished_at", "jobs.finished_at", UTCDateTime()),
    ("cost_usd", "jobs.cost_usd", Float()),
    ("tokens_in", "jobs.tokens_in", BigInteger()),
    ("tokens_out", "jobs.tokens_out", BigInteger()),
)


def _row_sql(product: str, job: str, lock: str = "") -> str:
    """The read of one job and its item.  Its shape keeps it to unique lookups whatever
    the planner's statistics say (a fresh database has none, and then takes any
    `product_id = …` to match a handful of rows, so a join or an `= ANY(…)` would scan
    all of a product's jobs and items): the job by `(product_id, id)`, its item by
    primary key only (a job's item is always in the job's product), and `latest` as
    "no newer job of the item" (`ix_jobs_tracker_item_id`; a max(id) would become a
    backward scan of the product's jobs)."""
    listed = ", ".join(f"{sql} AS {name}" for name, sql, _ in _ROW_COLUMNS)
    return (
        f"SELECT {listed} FROM jobs JOIN items ON items.id = jobs.tracker_item_id"
        f" WHERE jobs.product_id = {product} AND jobs.id = {job}{lock}"
    )


# FOR UPDATE OF items, jobs takes each row's marks in that order: the item's row
# before its job's (tests/service/test_echo.py checks it).
_PG_LOCKED_ROW = (
    text(_row_sql(":product_id", ":job_id", " FOR UPDATE OF items, jobs"))
    .bindparams(bindparam("job_id", type_=Integer()))
    .columns(*(column(name, type_) for name, _, type_ in _ROW_COLUMNS))
)
_SQLITE_ROW_SQL = _row_sql(":product_id", ":job_id")
_SQLITE_ROW = SqliteStatement(
    _SQLITE_ROW_SQL, results=tuple(type_ for _, _, type_ in _ROW_COLUMNS)
)
_PG_DRIVER_ROW_SQL = _row_sql("$1", "$2")


async def echo_rows(
    session: AsyncSession, product_id: str, job_ids: Sequence[int]
) -> list[EchoRow]:
    """The tracker-linked jobs among `job_ids` (of `product_id`) whose item exists, each
    with its item, in the order given; one statement per job.  A job that is not in
    the product, has no item or whose item is gone is simply not returned.

    On PostgreSQL each row is locked FOR UPDATE, the item's before its job's, as by
    every other item write (which then locks the item's jobs).  Jobs of several items
    are locked in the order given; should two such echoes ever wait on each other,
    the database ends one of them, and the bridge then echoes its jobs one by one.
    On SQLite the writer transaction already holds the database's write lock.
    """
    rows: list[Sequence[Any]] = []
    postgres = _postgres(session)
    for job_id in job_ids:
        params = {"product_id": product_id, "job_id": job_id}
        row = (
            (await session.execute(_PG_LOCKED_ROW, params)).first() if postgres
            else await _SQLITE_ROW.first(session, params)
        )
        if row is not None:
            rows.append(row)
    return [EchoRow(*row) for row in rows]


_Processor = Any  # a SQLAlchemy result processor, or None
_DRIVER_RESULTS: dict[str, tuple[_Processor, ...]] = {}


async def echo_rows_unlocked(
    engine: AsyncEngine, product_id: str, job_ids: Sequence[int]
) -> list[EchoRow]:
    """`echo_rows` without locks and outside any transaction: each statement runs
    straight on the driver of a pooled connection of `engine`, in the driver's
    autocommit (a single statement reads one snapshot), with no BEGIN, no ROLLBACK and
    no session — on SQLite one hop to the driver's thread where a read session takes
    six.
    The engine's cursor listeners see the statements like any other.  Driver errors
    are raised as the driver's."""
    fetched: list[Sequence[Any]] = []
    async with engine.connect() as connection:
        sync = connection.sync_connection
        driver = (await connection.get_raw_connection()).driver_connection
        assert sync is not None
        assert driver is not None
        dialect = connection.dialect
        postgres = dialect.name == "postgresql"
        sql = _PG_DRIVER_ROW_SQL if postgres else _SQLITE_ROW_SQL
        for job_id in job_ids:
            params: Any = (
                (product_id, job_id) if postgres
                else {"product_id": product_id, "job_id": job_id}
            )
            sync.dispatch.before_cursor_execute(sync, None, sql, params, None, False)
            fetched.extend(
                await driver.fetch(sql, *params) if postgres
                else await driver.execute_fetchall(sql, params)
            )
            sync.dispatch.after_cursor_execute(sync, None, sql, params, None, False)
    results = _DRIVER_RESULTS.get(dialect.name)
    if results is None:
        # SQLAlchemy's own conversions (enums, UTC datetimes, SQLite's 0/1 booleans);
        # floats come back as floats from both drivers (asyncpg's float processor
        # would want the column's type oid).
        results = _DRIVER_RESULTS[dialect.name] = tuple(
            None if isinstance(type_, Float)
            else type_.dialect_impl(dialect).result_processor(dialect, None)
            for _, _, type_ in _ROW_COLUMNS
        )
    return [
        EchoRow(*(value if process is None else process(value)
                  for process, value in zip(results, row, strict=True)))
        for row in fetched
    ]


_JOB_EXISTS = select(JOBS.c.id).where(JOBS.c.product_id == bindparam("b_product_id"),
                                      JOBS.c.id == bindparam("b_job_id"))


async def job_exists(session: AsyncSession, product_id: str, job_id: int) -> bool:
    result = await session.execute(_JOB_EXISTS, {"b_product_id": product_id, "b_job_id": job_id})
    return result.first() is not None


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
_SQLITE_RECORD_ECHO = SqliteStatement(_RECORD_ECHO_SQL)


async def record_echoes(
    session: AsyncSession, product_id: str, records: Sequence[EchoRecord]
) -> None:
    """Store each completed echo on its job: one UPDATE (on PostgreSQL one executemany
    for several).  The caller holds the jobs' row locks (`echo_rows`)."""
    params = [_record_params(product_id, record) for record in records]
    if not params:
        return
    if not _postgres(session):
        for values in params:
            await _SQLITE_RECORD_ECHO.rows(session, values)
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

_SQLITE_SET_STATUS = SqliteStatement(_SET_STATUS_SQL, binds={"now": UTCDateTime()})
_SQLITE_INSERT_COMMENT = SqliteStatement(_INSERT_COMMENT_SQL, binds={"now": UTCDateTime()})
_SQLITE_BUMP = SqliteStatement(
    "UPDATE products SET last_event_seq = last_event_seq + :count WHERE id = :product_id"
    " RETURNING last_event_seq"
)
_SQLITE_EVENT_ROW = (":product_id, :seq_{n}, :type_{n}, :entity_id_{n}, :from_state_{n},"
                     " :to_state_{n}, :payload_{n}, :event_created_at")
_SQLITE_EVENTS = {
    count: SqliteStatement(
        f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES "
        + ", ".join(f"({_SQLITE_EVENT_ROW.format(n=n)})" for n in range(count)),
        binds={"event_created_at": UTCDateTime(),
               **{f"payload_{n}": JsonDocument for n in range(count)}},
    )
    for count in (1, 2)
}


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
    (`record_echoes`) is stored by the same statement.  One statement on PostgreSQL,
    three to five on SQLite (see the module docstring)."""
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
        if record is not None:
            await _SQLITE_RECORD_ECHO.rows(session, params)
        if status is not None:
            await _SQLITE_SET_STATUS.rows(session, params)
        [[comment_id]] = await _SQLITE_INSERT_COMMENT.rows(session, params)
        count = 1 if status is None else 2
        [[last]] = await _SQLITE_BUMP.rows(session, {"product_id": product_id, "count": count})
        seqs = [(last - 1, item_id)] if status is not None else []
        seqs.append((last, comment_id))
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
    if not _postgres(session):
        values: dict[str, Any] = {"product_id": product_id, "event_created_at": now}
        for n, event in enumerate(events):
            values.update({
                f"seq_{n}": event.seq, f"type_{n}": event.type.value,
                f"entity_id_{n}": event.entity_id, f"from_state_{n}": event.from_state,
                f"to_state_{n}": event.to_state, f"payload_{n}": event.payload,
            })
        await _SQLITE_EVENTS[len(events)].rows(session, values)
    for event in events:
        remember_event(session, event)


_SET_BRIDGE_STATUS_SQL = "UPDATE items SET bridge_status = :bridge_status WHERE id = :item_id"
_PG_SET_BRIDGE_STATUS = text(_SET_BRIDGE_STATUS_SQL).bindparams(
    bindparam("bridge_status", type_=String()))
_SQLITE_SET_BRIDGE_STATUS = SqliteStatement(_SET_BRIDGE_STATUS_SQL)


async def write_bridge_status(
    session: AsyncSession, product_id: str, item_id: int, bridge_status: ItemStatus | None
) -> None:
    """Record `bridge_status` as the status the bridge owns on an item the caller
    holds (the status itself is left as it is)."""
    params = {"item_id": item_id,
              "bridge_status": None if bridge_status is None else bridge_status.value}
    if _postgres(session):
        await session.execute(_PG_SET_BRIDGE_STATUS, params)
    else:
        await _SQLITE_SET_BRIDGE_STATUS.rows(session, params)


# -- the sweeper's backlog --------------------------------------------------------


def _covered() -> ColumnElement[bool]:
    """`mapping.echo_covered` as SQL on `jobs` (no NULL ever makes it unknown)."""
    jobs = JOBS.c
    return and_(
        jobs.echo_retry_at.is_(None),
        or_(*(
            and_(jobs.stage.in_(stages), jobs.echoed_stage.is_not(None),
                 jobs.echoed_stage.in_(stages), jobs.last_echoed_status.is_not(None),
                 jobs.last_echoed_status == status)
            for status, stages in same_status_stages().items()
        )),
    )


async def echo_backlog(
    session: AsyncSession, now: datetime, limit: int, *, every_stage_change: bool
) -> Sequence[tuple[str, int, JobStage | None]]:
    """(product, job id, stage to echo) of tracker-linked jobs whose echo is due, of
    every product, oldest job first.

    With `every_stage_change` (FLEET_TRACKER_ECHO on) that is every such job whose
    current stage has not been echoed yet, to be echoed at its current stage (None),
    except those an earlier echo covers (`mapping.echo_covered`: a move within one
    status that the item already shows); otherwise only jobs whose manual echo failed
    and waits for a retry, each with the stage that echo attempted (DESIGN §4).  Jobs
    still backing off are left out.
    """
    jobs = JOBS.c
    stmt = (
        select(jobs.product_id, jobs.id, jobs.echo_retry_stage)
        .where(
            jobs.tracker_item_id.is_not(None),
            or_(jobs.echo_retry_at.is_(None), jobs.echo_retry_at <= now),
        )
        .order_by(jobs.id)
        .limit(limit)
    )
    if every_stage_change:
        stmt = stmt.where(
            or_(jobs.echoed_stage.is_(None), jobs.echoed_stage != jobs.stage), not_(_covered())
        )
        return [(row[0], row[1], None) for row in (await session.execute(stmt)).all()]
    stmt = stmt.where(jobs.echo_retry_at.is_not(None), jobs.echo_retry_stage.is_not(None))
    return [(row[0], row[1], row[2]) for row in (await session.execute(stmt)).all()]
