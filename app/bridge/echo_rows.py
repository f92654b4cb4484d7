"""What an echo reads: a tracker-linked job and its item, in one statement per job.

Every read is scoped to one product.  SQL is built once, at import, with bind
parameters only; no ORM loading.  PostgreSQL: one round trip per job, the rows
locked (`FOR UPDATE OF items, jobs`).  SQLite: the statements of all the jobs
asked for run in one hop to the driver's thread (`app.bridge.driver`); the unit of
work already holds the write lock.  The unlocked read (`echo_rows_unlocked`) runs
outside any transaction, on the driver of a pooled connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Integer,
    String,
    Table,
    bindparam,
    column,
    select,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.types import TypeEngine

from app.bridge.driver import on_driver_thread, result_processor
from app.db import UTCDateTime
from app.fleet.models import JOB_STAGE, Job, JobStage
from app.tracker.models import ITEM_STATUS, ItemStatus

JOBS: Table = Job.__table__  # type: ignore[assignment]


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
_SQLITE_ROW_SQL = _row_sql("?", "?")
# The unlocked read as a statement of its own, for the driver (app.bridge.echo_lean).
PG_UNLOCKED_ROW = (
    text(_row_sql(":product_id", ":job_id"))
    .bindparams(bindparam("job_id", type_=Integer()))
    .columns(*(column(name, type_) for name, _, type_ in _ROW_COLUMNS))
)
# (name, SQL expression, type) of each column an `EchoRow` holds, in its order.
ROW_COLUMNS = _ROW_COLUMNS
_PG_DRIVER_ROW_SQL = _row_sql("$1", "$2")

EchoKey = tuple[str, int]  # (product, job id)


async def echo_rows(
    session: AsyncSession, product_id: str, job_ids: Sequence[int]
) -> list[EchoRow]:
    """`echo_rows_of` the jobs `job_ids` of one product."""
    return await echo_rows_of(session, [(product_id, job_id) for job_id in job_ids])


async def echo_rows_of(session: AsyncSession, keys: Sequence[EchoKey]) -> list[EchoRow]:
    """The tracker-linked jobs among `keys` (product, job id) whose item exists, each
    with its item, in the order given; one statement per job.  A job that is not in
    its product, has no item or whose item is gone is simply not returned.

    On PostgreSQL each row is locked FOR UPDATE, the item's before its job's, as by
    every other item write (which then locks the item's jobs).  Jobs of several items
    are locked in the order given; should two such echoes ever wait on each other,
    the database ends one of them, and the bridge then echoes its jobs one by one.
    On SQLite the writer transaction already holds the database's write lock, and all
    the statements run in one hop to the driver's thread.
    """
    if session.get_bind().dialect.name != "postgresql":
        return await _sqlite_rows(await session.connection(), keys)
    rows: list[Sequence[Any]] = []
    for product_id, job_id in keys:
        row = (await session.execute(
            _PG_LOCKED_ROW, {"product_id": product_id, "job_id": job_id})).first()
        if row is not None:
            rows.append(row)
    return [EchoRow(*row) for row in rows]


async def _sqlite_rows(connection: AsyncConnection, keys: Sequence[EchoKey]) -> list[EchoRow]:
    """SQLite: the rows of `keys`, read by one hop to the driver's thread."""
    params = [tuple(key) for key in keys]

    def read(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        found: list[tuple[Any, ...]] = []
        for values in params:
            found.extend(conn.execute(_SQLITE_ROW_SQL, values).fetchall())
        return found

    fetched = await on_driver_thread(
        connection, read, [(_SQLITE_ROW_SQL, values) for values in params])
    return _converted(connection.dialect, fetched)


async def echo_rows_unlocked(
    engine: AsyncEngine, product_id: str, job_ids: Sequence[int]
) -> list[EchoRow]:
    """`echo_rows_unlocked_on` a pooled connection of `engine`, for jobs of one product."""
    async with engine.connect() as connection:
        return await echo_rows_unlocked_on(
            connection, [(product_id, job_id) for job_id in job_ids])


async def echo_rows_unlocked_on(
    connection: AsyncConnection, keys: Sequence[EchoKey]
) -> list[EchoRow]:
    """`echo_rows_of` without locks and outside any transaction: the statements run
    straight on the driver of `connection` (one that has begun no transaction), in the
    driver's autocommit (a single statement reads one snapshot), with no BEGIN, no
    ROLLBACK and no session — on SQLite all of them in one hop to the driver's
    thread, where a read session takes six.  The engine's cursor listeners see the
    statements like any other.  Driver errors are raised as the driver's (on SQLite
    as SQLAlchemy's DBAPIError)."""
    if connection.dialect.name != "postgresql":
        return await _sqlite_rows(connection, keys)
    sync = connection.sync_connection
    driver = (await connection.get_raw_connection()).driver_connection
    assert sync is not None
    assert driver is not None
    fetched: list[Sequence[Any]] = []
    for params in keys:
        sync.dispatch.before_cursor_execute(sync, None, _PG_DRIVER_ROW_SQL, params, None, False)
        fetched.extend(await driver.fetch(_PG_DRIVER_ROW_SQL, *params))
        sync.dispatch.after_cursor_execute(sync, None, _PG_DRIVER_ROW_SQL, params, None, False)
    return _converted(connection.dialect, fetched)


_RESULTS: dict[str, tuple[Any, ...]] = {}  # by dialect name


def _converted(dialect: Dialect, fetched: Sequence[Sequence[Any]]) -> list[EchoRow]:
    """Rows as the driver gave them, converted by SQLAlchemy's own conversions (enums,
    UTC datetimes, SQLite's 0/1 booleans); floats come back as floats from both
    drivers (asyncpg's float processor would want the column's type oid)."""
    results = _RESULTS.get(dialect.name)
    if results is None:
        results = _RESULTS[dialect.name] = tuple(
            None if isinstance(type_, Float) else result_processor(dialect, type_)
            for _, _, type_ in _ROW_COLUMNS)
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
