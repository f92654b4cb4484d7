"""SQLite: several of the echo's statements in one hop to the driver's thread.

aiosqlite runs every call on a thread of its own, one queue hop per call (about
40 µs of CPU on both sides, more when the event loop is busy), while running a
statement once there costs a few µs.  An echo's item write is five statements, a
group commit's read one per job: `on_driver_thread` runs all of one step's
statements in a single hop, on the unit of work's own connection and inside its
transaction, as `app.fleet.cycle`'s `SqliteStatement` does for one statement.

The engine's `before_cursor_execute` / `after_cursor_execute` listeners see each
statement (with no cursor and no execution context), and a driver error leaves as
SQLAlchemy's `DBAPIError`, like any other statement's.

It uses aiosqlite's internal queue (`Connection._execute`, the method every public
call of aiosqlite 0.17 to 0.22 goes through): there is no public call that runs a
function on the connection's thread.  Every SQLite echo goes through it, so a
release that changed it fails the echo tests at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeEngine

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]

_Processor = Any  # a SQLAlchemy bind or result processor, or None
# By (dialect name, type object, bind/result); the type is kept with its processor so
# that an id is never taken for another type's.
_PROCESSORS: dict[tuple[str, int, str], tuple[TypeEngine[Any], _Processor]] = {}


def bind_processor(dialect: Dialect, type_: TypeEngine[Any]) -> _Processor:
    """SQLAlchemy's conversion of a parameter of `type_` for `dialect` (None: none)."""
    key = (dialect.name, id(type_), "bind")
    found = _PROCESSORS.get(key)
    if found is None or found[0] is not type_:
        found = _PROCESSORS[key] = (type_, type_.dialect_impl(dialect).bind_processor(dialect))
    return found[1]


def result_processor(dialect: Dialect, type_: TypeEngine[Any]) -> _Processor:
    """SQLAlchemy's conversion of a result column of `type_` (None: none)."""
    key = (dialect.name, id(type_), "result")
    found = _PROCESSORS.get(key)
    if found is None or found[0] is not type_:
        found = _PROCESSORS[key] = (
            type_, type_.dialect_impl(dialect).result_processor(dialect, None))
    return found[1]


def bind(dialect: Dialect, params: Mapping[str, Any],
         types: Mapping[str, TypeEngine[Any]]) -> dict[str, Any]:
    """`params` with the values named in `types` converted for the driver."""
    values = dict(params)
    for name, type_ in types.items():
        process = bind_processor(dialect, type_)
        if process is not None and name in values:
            values[name] = process(values[name])
    return values


async def on_driver_thread(
    connection: AsyncConnection, work: Work[T],
    statements: Sequence[tuple[str, Any]],
) -> T:
    """Run `work(sqlite3_connection)` on the driver's thread of `connection`, in one
    hop; `statements` are the (sql, parameters) it runs, for the engine's listeners.
    A driver error is raised as SQLAlchemy's DBAPIError."""
    sync = connection.sync_connection
    driver = (await connection.get_raw_connection()).driver_connection
    assert sync is not None  # an open connection
    assert driver is not None
    for sql, params in statements:
        sync.dispatch.before_cursor_execute(sync, None, sql, params, None, False)
    try:
        result: T = await driver._execute(work, driver._conn)
    except sqlite3.Error as exc:
        sql, params = statements[0] if statements else ("", None)
        raise DBAPIError.instance(sql, params, exc, sqlite3.Error,
                                  dialect=connection.dialect) from exc
    for sql, params in statements:
        sync.dispatch.after_cursor_execute(sync, None, sql, params, None, False)
    return result
