"""Which exceptions mean "the store could not serve" (SERVICE_UNAVAILABLE) and which
are refusals or bugs (app.uow.is_store_failure)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from app.errors import ConflictError, StoreUnavailableError
from app.uow import is_store_failure, store_unavailable


def wrapped(driver_error: BaseException, kind: type[sa_exc.DBAPIError] = sa_exc.DBAPIError,
            *, invalidated: bool = False) -> sa_exc.DBAPIError:
    """As SQLAlchemy raises it: the driver's error as `orig` and as the cause."""
    error = kind("SELECT 1", {}, driver_error, connection_invalidated=invalidated)
    error.__cause__ = driver_error
    return error


@pytest.mark.parametrize(
    "error",
    [
        sa_exc.OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked")),
        sa_exc.InterfaceError("SELECT 1", {}, Exception("connection is closed")),
        sa_exc.TimeoutError("QueuePool limit of size 1 overflow 0 reached"),
        wrapped(asyncpg.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation")),
        wrapped(asyncpg.QueryCanceledError("canceling statement due to statement timeout")),
        wrapped(asyncpg.AdminShutdownError("terminating connection")),
        wrapped(asyncpg.CannotConnectNowError("the database system is starting up")),
        wrapped(asyncpg.DeadlockDetectedError("deadlock detected")),
        wrapped(Exception("anything"), invalidated=True),
        ConnectionResetError(104, "Connection reset by peer"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        StoreUnavailableError("down"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_store_failures_are_recognised(error: BaseException) -> None:
    assert is_store_failure(error)
    assert store_unavailable(error).extensions == {"code": "SERVICE_UNAVAILABLE"}


@pytest.mark.parametrize(
    "error",
    [
        wrapped(asyncpg.UniqueViolationError("duplicate key"), sa_exc.IntegrityError),
        wrapped(asyncpg.UndefinedColumnError("no such column"), sa_exc.ProgrammingError),
        wrapped(asyncpg.CharacterNotInRepertoireError("invalid byte"), sa_exc.DataError),
        ConflictError("stale fence"),
        ValueError("a bug"),
        KeyError("another"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_refusals_and_bugs_are_not_store_failures(error: BaseException) -> None:
    assert not is_store_failure(error)


def test_the_chain_is_followed_without_looping() -> None:
    outer = RuntimeError("while handling")
    inner = asyncpg.ConnectionDoesNotExistError("closed")
    outer.__context__ = inner
    inner.__context__ = outer  # a cycle
    assert is_store_failure(outer)
    loop = RuntimeError("no store here")
    loop.__context__ = loop
    assert not is_store_failure(loop)
