"""How the lean path's statements run, and how their rows become jobs and events.

The lease holder's statements (app.fleet.claim, app.fleet.cycle) are SQL text built
once, at import, with bind parameters only.  They run on the driver's own
connection wherever SQLAlchemy's execution costs more than the statement:

* `SqliteStatement`: straight on the unit of work's aiosqlite connection, inside its
  transaction, in one hop to the driver's thread (a SQLAlchemy execution takes three
  or four — cursor, execute, fetch, close — at about 0.1 ms of CPU each; measured
  0.58 ms against 0.07 ms per statement).
* `PgStatement`: a `text()` statement compiled once per dialect by SQLAlchemy (the
  same SQL, casts and parameter conversion `session.execute` would send), run with
  asyncpg's `fetch` on the unit of work's connection once its transaction has begun
  — or as a unit of work of its own (`app.uow.lone_statement`).  A session's first
  statement still goes through `session.execute`, which begins the transaction and
  retries a dead pooled connection once (`app.uow.FleetSession`).

Either way parameters and results are converted by the same SQLAlchemy types as the
ORM's; the engine's `before_cursor_execute` / `after_cursor_execute` listeners see
each statement (with no cursor and no execution context).

Jobs are built from a statement's RETURNING row, not loaded through the ORM: a
transient `Job` (not in the session) — or, when the session already holds that
job, the session's own instance updated in place, so a session never keeps a stale
copy.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Float, TextualSelect, inspect, text
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import TypeEngine

from app.events.models import EventType
from app.events.outbox import EventRecord
from app.fleet.models import Job, JobStage
from app.fleet.stages import ACTIVE_STAGES
from app.lone import SqliteHop

T = TypeVar("T")
TABLE = Job.__table__
COLUMNS = tuple(TABLE.columns)
KEYS = tuple(col.key for col in COLUMNS)
JOB_TYPES = tuple(col.type for col in COLUMNS)
ACTIVE = tuple(sorted(ACTIVE_STAGES))
_MAPPER = inspect(Job)
_NEW_JOB = manager_of_class(Job).new_instance


def is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def returning(prefix: str) -> str:
    """The job's columns, in model order, for a RETURNING list."""
    return ", ".join(f"{prefix}{col.name}" for col in COLUMNS)


def stage_list(stages: Sequence[JobStage]) -> str:
    return ", ".join(f"'{stage.value}'" for stage in sorted(stages))


# -- rows into jobs and events --------------------------------------------------


def job_from_row(session: AsyncSession, values: Sequence[Any]) -> Job:
    """A `Job` of the first len(columns) values of a row, in model column order."""
    data = dict(zip(KEYS, values, strict=False))
    existing = session.identity_map.get(_MAPPER.identity_key_from_primary_key((data["id"],)))
    if isinstance(existing, Job):
        for key, value in data.items():
            set_committed_value(existing, key, value)
        return existing
    job: Job = _NEW_JOB()
    job.__dict__.update(data)
    return job


def stage_payload(job: Job) -> dict[str, Any]:
    """A job event's payload: `{attempts, fence[, trackerItemId]}`."""
    payload: dict[str, Any] = {"attempts": job.attempts, "fence": job.lease_fence}
    if job.tracker_item_id is not None:
        payload["trackerItemId"] = job.tracker_item_id
    return payload


def stage_event(job: Job, source: JobStage, seq: int, created_at: datetime) -> EventRecord:
    return EventRecord(
        product_id=job.product_id, seq=seq, type=EventType.JOB_STAGE_CHANGED,
        entity_id=job.id, from_state=source.value, to_state=job.stage.value,
        created_at=created_at, payload=stage_payload(job),
    )


def row_stage_event(
    row: Sequence[Any], source: JobStage, seq: int, created_at: datetime
) -> EventRecord:
    """`stage_event` of a job row (model column order), without building the job."""
    data = dict(zip(KEYS, row, strict=False))
    payload: dict[str, Any] = {"attempts": data["attempts"], "fence": data["lease_fence"]}
    if data["tracker_item_id"] is not None:
        payload["trackerItemId"] = data["tracker_item_id"]
    return EventRecord(
        product_id=data["product_id"], seq=seq, type=EventType.JOB_STAGE_CHANGED,
        entity_id=data["id"], from_state=source.value, to_state=JobStage(data["stage"]).value,
        created_at=created_at, payload=payload,
    )


# -- PostgreSQL -----------------------------------------------------------------

_Processor = Any  # a SQLAlchemy bind or result processor, or None


def _pg_result_processor(type_: TypeEngine[Any], dialect: Dialect) -> _Processor:
    # asyncpg gives double precision as float; SQLAlchemy's float processor wants the
    # column's type oid from a cursor description, which a driver fetch has not got
    if isinstance(type_, Float) and not type_.asdecimal:
        return None
    return type_._cached_result_processor(dialect, None)


class PgStatement:
    """PostgreSQL: `sql`, whose result is the job's columns (in model order) then
    `extra`; `binds` type the parameters `sql` uses (the others are left out)."""

    def __init__(self, sql: str, *extra: Any, binds: Sequence[BindParameter[Any]] = ()) -> None:
        used = [bind for bind in binds if re.search(rf":{bind.key}\b", sql)]
        self.statement: TextualSelect = text(sql).bindparams(*used).columns(*COLUMNS, *extra)
        self._plan: tuple[Dialect, str, tuple[tuple[str, _Processor], ...],
                          tuple[_Processor, ...]] | None = None

    @classmethod
    def of(cls, statement: TextualSelect) -> PgStatement:
        """A statement built elsewhere (its own result columns)."""
        made = cls.__new__(cls)
        made.statement, made._plan = statement, None
        return made

    def _compiled(
        self, dialect: Dialect
    ) -> tuple[str, tuple[tuple[str, _Processor], ...], tuple[_Processor, ...]]:
        plan = self._plan
        if plan is None or plan[0] is not dialect:
            compiled = self.statement.compile(dialect=dialect)
            names = compiled.positiontup or []
            binds = tuple((name, compiled.binds[name].type._cached_bind_processor(dialect))
                          for name in names)
            results = tuple(_pg_result_processor(col.type, dialect)
                            for col in self.statement.selected_columns)
            plan = self._plan = (dialect, compiled.string, binds, results)
        return plan[1], plan[2], plan[3]

    async def fetch(
        self, driver: Any, dialect: Dialect, params: Mapping[str, Any],
        events: Connection | Engine | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run on asyncpg connection `driver` (in whatever transaction it is in);
        `events` is the SQLAlchemy connection (or, with no connection, the engine)
        whose cursor listeners are told."""
        sql, binds, results = self._compiled(dialect)
        args = _bound(binds, params)
        tell = _Tell(events, sql, args, many=False)
        records = await driver.fetch(sql, *args)
        tell.after()
        return [_typed(record, results) for record in records]

    async def fetch_many(
        self, driver: Any, dialect: Dialect, params: Sequence[Mapping[str, Any]],
        events: Connection | Engine | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run once for each of `params`, in ONE round trip (asyncpg's `fetchmany`:
        a Bind and an Execute each, then one Sync — outside BEGIN … COMMIT, one
        implicit transaction, all of it committed or none); the rows of all the
        runs, in order.  The listeners are told once, as an `executemany`."""
        sql, binds, results = self._compiled(dialect)
        args = [_bound(binds, one) for one in params]
        tell = _Tell(events, sql, args, many=True)
        records = await driver.fetchmany(sql, args)
        tell.after()
        return [_typed(record, results) for record in records]

    async def rows(
        self, session: AsyncSession, params: Mapping[str, Any]
    ) -> Sequence[Sequence[Any]]:
        """Run in `session`'s transaction: through `session.execute` when it begins
        the transaction, on the driver once it has begun."""
        if session.in_transaction():
            connection = await session.connection()
            raw = await connection.get_raw_connection()
            # SQLAlchemy's asyncpg adapter issues BEGIN before its first statement
            if getattr(raw.dbapi_connection, "_transaction", None) is not None:
                return await self.fetch(raw.driver_connection, connection.dialect, params,
                                        connection.sync_connection)
        return (await session.execute(self.statement, params)).all()

    async def first(
        self, session: AsyncSession, params: Mapping[str, Any]
    ) -> Sequence[Any] | None:
        rows = await self.rows(session, params)
        return rows[0] if rows else None


def _bound(binds: Sequence[tuple[str, _Processor]], params: Mapping[str, Any]) -> list[Any]:
    return [params.get(name) if process is None else process(params.get(name))
            for name, process in binds]


def _typed(record: Sequence[Any], results: Sequence[_Processor]) -> tuple[Any, ...]:
    return tuple(value if process is None else process(value)
                 for value, process in zip(record, results, strict=False))


class _Tell:
    """The cursor listeners of `events` told of a driver statement: before at once,
    `after()` once it ran."""

    def __init__(self, events: Connection | Engine | None, sql: str, args: Any, *,
                 many: bool) -> None:
        self.dispatch = events.dispatch if events is not None else None
        self.conn = events if isinstance(events, Connection) else None
        self.sql, self.args, self.many = sql, args, many
        if self.dispatch is not None and self.dispatch.before_cursor_execute:
            self.dispatch.before_cursor_execute(self.conn, None, sql, args, None, many)

    def after(self) -> None:
        if self.dispatch is not None and self.dispatch.after_cursor_execute:
            self.dispatch.after_cursor_execute(self.conn, None, self.sql, self.args, None,
                                               self.many)


# -- SQLite ---------------------------------------------------------------------


class SqliteStatement:
    """SQLite: SQL text with `:name` parameters, run on the driver connection in one
    hop (see the module docstring).  `binds` types the parameters that need
    converting (datetimes, JSON); `results` types the result columns in order."""

    def __init__(self, sql: str, *, binds: Mapping[str, TypeEngine[Any]] | None = None,
                 results: Sequence[TypeEngine[Any]] = ()) -> None:
        self.sql = sql
        self.binds = dict(binds or {})
        self.results = tuple(results)
        self._plan: tuple[Dialect, dict[str, _Processor], tuple[_Processor, ...]] | None = None

    def _processors(
        self, dialect: Dialect
    ) -> tuple[dict[str, _Processor], tuple[_Processor, ...]]:
        plan = self._plan
        if plan is None or plan[0] is not dialect:
            binds = {name: type_.dialect_impl(dialect).bind_processor(dialect)
                     for name, type_ in self.binds.items()}
            results = tuple(type_.dialect_impl(dialect).result_processor(dialect, None)
                            for type_ in self.results)
            self._plan = (dialect, binds, results)
            return binds, results
        return plan[1], plan[2]

    def run(self, hop: SqliteHop, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run on `hop`'s connection, in the driver's thread (see `SqliteHop`)."""
        binds, results = self._processors(hop.dialect)
        values = dict(params)
        for name, process in binds.items():
            if process is not None and name in values:
                values[name] = process(values[name])
        hop.sent.append((self.sql, values))
        assert hop.connection is not None
        fetched = hop.connection.execute(self.sql, values).fetchall()
        typed = len(results)
        return [
            tuple(value if index >= typed or results[index] is None else results[index](value)
                  for index, value in enumerate(row))
            for row in fetched
        ]

    def first_of(self, hop: SqliteHop, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        rows = self.run(hop, params)
        return rows[0] if rows else None

    async def rows(
        self, session: AsyncSession, params: Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        """Run in `session`'s transaction (begun, with its write lock, if need be)."""
        connection = await session.connection()
        binds, results = self._processors(connection.dialect)
        values = dict(params)
        for name, process in binds.items():
            if process is not None and name in values:
                values[name] = process(values[name])
        sync = connection.sync_connection
        driver = (await connection.get_raw_connection()).driver_connection
        assert sync is not None  # an open, begun connection
        assert driver is not None
        sync.dispatch.before_cursor_execute(sync, None, self.sql, values, None, False)
        try:
            fetched = await driver.execute_fetchall(self.sql, values)
        except sqlite3.Error as exc:
            raise DBAPIError.instance(self.sql, values, exc, sqlite3.Error,
                                      dialect=connection.dialect) from exc
        sync.dispatch.after_cursor_execute(sync, None, self.sql, values, None, False)
        typed = len(results)  # the columns after those come back as the driver gives them
        return [
            tuple(value if index >= typed or results[index] is None else results[index](value)
                  for index, value in enumerate(row))
            for row in fetched
        ]

    async def first(
        self, session: AsyncSession, params: Mapping[str, Any]
    ) -> tuple[Any, ...] | None:
        rows = await self.rows(session, params)
        return rows[0] if rows else None


def sqlite_job_statement(sql: str, **binds: TypeEngine[Any]) -> SqliteStatement:
    return SqliteStatement(sql, binds=binds, results=JOB_TYPES)


async def sqlite_hop(session: AsyncSession, fn: Callable[[SqliteHop], T]) -> T:
    """`fn` in `session`'s transaction (begun, with its write lock, if need be), in
    one hop to the driver's thread."""
    connection = await session.connection()
    driver = (await connection.get_raw_connection()).driver_connection
    return await SqliteHop(connection.dialect).call(driver, fn, connection.sync_connection)
