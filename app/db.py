"""Engine factory, declarative base and portable column types.

Every wait on the database is bounded (`create_engine(timeout_seconds=…)`, from
FLEET_DB_TIMEOUT_SECONDS): the pool checkout, the connect, each statement (asyncpg's
`command_timeout` on the client and `statement_timeout` on the server, so a silent
partition ends as surely as a slow query) and, on SQLite, the wait for the write
lock (the busy timeout).  app.uow turns each of those into SERVICE_UNAVAILABLE.

SQLite is tuned for a single busy process: WAL journal, a busy timeout, foreign
keys on, and transactions begun explicitly so that a unit of work that writes can
take the write lock up front (`BEGIN IMMEDIATE`).  A deferred transaction that
reads and then writes can fail with "database is locked" when another writer
committed in between; an immediate one waits its turn instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    MetaData,
    String,
    bindparam,
    event,
    func,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.engine.base import OptionEngine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, QueryableAttribute
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEFAULT_DB_TIMEOUT_SECONDS = 10.0
BEGIN_MODE_OPTION = "fleet_sqlite_begin"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# JSON documents: JSONB on PostgreSQL (indexable, containment operators), JSON text elsewhere.
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """The process clock (UTC).  Leases and backoff use `database_now` instead."""
    return datetime.now(UTC)


async def database_now(session: AsyncSession) -> datetime:
    """The one clock all instances share (DESIGN §8): PostgreSQL's `clock_timestamp()`
    (aware UTC), so an instance whose own clock is off neither reaps a live lease nor
    hides a requeued job from the others.  SQLite serves one machine: there the
    process clock is that clock.  One round trip on PostgreSQL."""
    if session.get_bind().dialect.name == "postgresql":
        value = (await session.execute(select(func.clock_timestamp()))).scalar_one()
        return value.astimezone(UTC) if isinstance(value, datetime) else utcnow()
    return utcnow()


def create_engine(
    database_url: str, *, timeout_seconds: float | None = DEFAULT_DB_TIMEOUT_SECONDS,
    **kwargs: Any,
) -> AsyncEngine:
    """Create the async engine; SQLite gets WAL, a busy timeout and explicit BEGINs.

    `timeout_seconds` bounds every wait (seconds): pool checkout, connect, each
    statement on PostgreSQL (client and server side) and the SQLite lock wait.
    None leaves statements unbounded (migrations, which may build large indexes);
    connects and pool waits stay bounded by the default.
    """
    bound = timeout_seconds or DEFAULT_DB_TIMEOUT_SECONDS
    kwargs.setdefault("pool_timeout", bound)
    if database_url.startswith("sqlite"):
        engine = create_async_engine(database_url, connect_args={"timeout": bound}, **kwargs)
        _configure_sqlite(engine, bound)
        return engine
    connect_args: dict[str, Any] = {"timeout": bound}
    if timeout_seconds is not None:
        connect_args["command_timeout"] = timeout_seconds
        connect_args["server_settings"] = {
            "statement_timeout": str(int(timeout_seconds * 1000)),
        }
    engine = create_async_engine(database_url, connect_args=connect_args, **kwargs)
    _drop_closed_connections_at_checkout(engine)
    return engine


def _drop_closed_connections_at_checkout(engine: AsyncEngine) -> None:
    """No pre-ping (a round trip per checkout — three on asyncpg: BEGIN, `;`,
    ROLLBACK): a pooled connection whose server end is known to be gone (asyncpg saw
    the socket close: a server restart, `pg_terminate_backend`, an idle-connection
    killer) is replaced at checkout, with no round trip at all, and so are the
    pool's other connections older than it.  One whose death was not noticed yet
    fails its first statement, and app.uow retries that once on a fresh connection
    (`FleetSession`).  A connection that is silently dead (a partition) would make a
    ping wait just as long as a statement: FLEET_DB_TIMEOUT_SECONDS bounds both."""

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        driver = record.driver_connection
        if driver is not None and driver.is_closed():
            raise sa_exc.InvalidatePoolError("the server closed this pooled connection")


def snapshot_engine(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, for read transactions that see one snapshot throughout:
    `REPEATABLE READ READ ONLY` on PostgreSQL; on SQLite a deferred transaction
    already does (in WAL mode its snapshot is fixed by its first read)."""
    if engine.dialect.name != "postgresql":
        return engine
    return engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)


def writer_engine(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, but transactions that take the SQLite write lock when they begin."""
    if engine.dialect.name != "sqlite":
        return engine
    return engine.execution_options(**{BEGIN_MODE_OPTION: "IMMEDIATE"})


class _PoolOfItsOwn(OptionEngine):
    """An engine with `proxied`'s dialect, execution options and event listeners —
    so a `before_cursor_execute` listener on the main engine sees the writes too,
    and its `begin` listener issues the BEGIN — but a connection pool of its own."""

    def __init__(self, proxied: Engine, pool: Pool, options: dict[str, Any]) -> None:
        self._own_pool = pool
        super().__init__(proxied, options)

    @property
    def pool(self) -> Pool:
        return self._own_pool

    @pool.setter
    def pool(self, pool: Pool) -> None:
        self._own_pool = pool


@dataclass(frozen=True, slots=True)
class SqliteWriter:
    engine: AsyncEngine  # what units of work use
    owner: AsyncEngine  # owns its one-connection pool: dispose this one


def sqlite_writer(engine: AsyncEngine) -> SqliteWriter | None:
    """SQLite: an engine for units of work, on the same file, with a pool of ONE
    connection (issue 12 §4), whose transactions take the write lock when they begin.

    SQLite lets one writer in at a time; with the writes spread over the readers'
    pool, every waiting unit of work held a connection and slept in SQLite's busy
    handler (polling, with growing sleeps) while readers waited for connections.
    With one writer connection the units of work of this process queue in its pool
    instead — in order, woken the moment the connection is returned, the wait bounded
    by the pool timeout (FLEET_DB_TIMEOUT_SECONDS, then SERVICE_UNAVAILABLE as any
    pool wait) — and the busy handler only ever waits for another process's writer
    (a CLI command, a second server).  Reads keep `engine`'s pool, and WAL lets them
    run meanwhile.  The writer shares `engine`'s event listeners (`_PoolOfItsOwn`).
    None for other stores (their writes share the pool)."""
    if engine.dialect.name != "sqlite" or not isinstance(engine.pool, QueuePool):
        return None
    owner = create_engine(
        engine.url.render_as_string(hide_password=False),
        timeout_seconds=engine.pool.timeout(), pool_size=1, max_overflow=0,
    )
    writer = _PoolOfItsOwn(engine.sync_engine, owner.sync_engine.pool,
                           {BEGIN_MODE_OPTION: "IMMEDIATE"})
    return SqliteWriter(engine=AsyncEngine(writer), owner=owner)


def _configure_sqlite(engine: AsyncEngine, busy_timeout_seconds: float) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(BEGIN_MODE_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


class JsonArrayContains(ColumnElement[bool]):
    """`value` is an element of the JSON array in `column` (portable across dialects)."""

    inherit_cache = True
    type = Boolean()
    _traverse_internals = [  # noqa: RUF012  (SQLAlchemy's own convention)
        ("column", InternalTraversal.dp_clauseelement),
        ("value", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: ColumnElement[Any] | QueryableAttribute[Any], value: str) -> None:
        self.column = column
        self.value = bindparam(None, value, type_=String())


@compiles(JsonArrayContains, "sqlite")
def _json_array_contains_sqlite(element: JsonArrayContains, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    value = compiler.process(element.value, **kw)
    return f"EXISTS (SELECT 1 FROM json_each({column}) WHERE json_each.value = {value})"


@compiles(JsonArrayContains, "postgresql")
def _json_array_contains_postgresql(element: JsonArrayContains, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    value = compiler.process(element.value, **kw)
    return f"({column} @> jsonb_build_array(CAST({value} AS TEXT)))"
