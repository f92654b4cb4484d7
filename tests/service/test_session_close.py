"""How app.uow ends a session (issue 12 §3): one that holds no transaction — a read
that read nothing, a unit of work after its commit, a unit of work whose one call
ran alone — is closed without AsyncSession.close's greenlet hop; one that holds a
transaction is closed by AsyncSession.close.  Either way the session ends closed
(its objects detached) and every connection is back in its pool."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.auth.models import Token
from app.graphql.context import Services


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which way each session was closed: 'async' (AsyncSession.close) or 'sync'."""
    seen: list[str] = []
    async_close, sync_close = AsyncSession.close, Session.close

    async def counted_async(self: AsyncSession) -> None:
        seen.append("async")
        await async_close(self)

    def counted_sync(self: Session, *args: Any, **kwargs: Any) -> None:
        if not seen or seen[-1] != "async":  # not the sync half of an async close
            seen.append("sync")
        sync_close(self, *args, **kwargs)

    monkeypatch.setattr(AsyncSession, "close", counted_async)
    monkeypatch.setattr(Session, "close", counted_sync)
    return seen


def _checked_out(services: Services) -> int:
    engines = [services.db.engine, services.db.writer_engine]
    return sum(engine.pool.checkedout() for engine in engines if engine is not None)


async def test_a_read_that_read_nothing_closes_without_a_hop(
    services: Services, closes: list[str]
) -> None:
    async with services.db.read() as session:
        pass
    assert closes == ["sync"]
    assert not session.in_transaction()
    assert _checked_out(services) == 0


async def test_a_read_gives_its_connection_back(services: Services, closes: list[str]) -> None:
    async with services.db.read() as session:
        token = (await session.scalars(select(Token).limit(1))).first()
        assert session.in_transaction()
    assert closes == ["async"]
    assert _checked_out(services) == 0
    assert token is None or token not in session  # detached


async def test_a_committed_unit_of_work_closes_without_a_hop(
    services: Services, closes: list[str]
) -> None:
    async with services.db.unit_of_work() as session:
        await session.execute(text("SELECT 1"))
    assert closes == ["sync"]  # the commit ended its transaction and gave back the connection
    assert _checked_out(services) == 0


async def test_a_failed_unit_of_work_is_rolled_back_and_closed(
    services: Services, closes: list[str]
) -> None:
    opened: list[AsyncSession] = []

    async def failing() -> None:
        async with services.db.unit_of_work() as session:
            opened.append(session)
            await session.execute(text("SELECT 1"))
            raise RuntimeError("the caller failed")

    with pytest.raises(RuntimeError):
        await failing()
    (session,) = opened
    assert closes == ["sync"]  # rolled back first: nothing left to give back
    assert not session.in_transaction()
    assert _checked_out(services) == 0
