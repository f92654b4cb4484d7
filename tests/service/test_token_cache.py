"""The token cache and the fill race (app.auth.guard, issue 12 §3), on SQLite, where
the revoke signal is the database's sidecar file (app.auth.revocations).

A read that began before a revoke committed may return the token as active.  Its
result must not outlive the revoke's signal: the seam is a Database whose read()
holds the finished read back until the test lets it go, so the revoke commits and
bumps the sidecar in between — deterministically, no timing involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import repository
from app.auth.guard import TokenGuard
from app.auth.models import Role
from app.auth.revocations import ABSENT, bump, epoch, sidecar_path
from app.auth.service import create_token, hash_token, revoke_token
from app.db import create_engine
from app.uow import Database

SQLITE = pytest.mark.parametrize("store", ["sqlite"])


class HeldDatabase(Database):
    """read() as usual, but the session's end waits for `release` when `hold` is set."""

    def __init__(self, url: str) -> None:
        super().__init__(create_engine(url))
        self.hold = False
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with super().read() as session:
            yield session
        if self.hold:
            self.hold = False
            self.read_done.set()
            await self.release.wait()


async def _token(db: Database) -> tuple[int, str]:
    async with db.unit_of_work() as session:
        secret = await create_token(session, product_id="acme", role=Role.MEMBER)
        token = await repository.get_token_by_hash(session, hash_token(secret))
        assert token is not None
        return token.id, secret


async def _revoke(url: str, token_id: int) -> None:
    """As `fleetbridge token revoke` does, through a Database of its own."""
    db = Database(create_engine(url))
    try:
        async with db.unit_of_work() as session:
            await revoke_token(session, token_id)
    finally:
        await db.dispose()


@pytest.fixture
async def held(database_url: str) -> AsyncIterator[tuple[HeldDatabase, TokenGuard]]:
    db = HeldDatabase(database_url)
    path = sidecar_path(database_url)
    assert path is not None
    guard = TokenGuard(db, cache_seconds=60.0, live=lambda: epoch(path))
    yield db, guard
    await db.dispose()


def test_the_sidecar_changes_on_every_bump(tmp_path) -> None:
    path = sidecar_path(f"sqlite+aiosqlite:///{tmp_path}/fleet.db")
    assert path == tmp_path / "fleet.db.tokens"
    assert epoch(path) == ABSENT
    seen = [epoch(path)]
    for _ in range(20):  # many within one clock tick: each one is still a change
        bump(path)
        seen.append(epoch(path))
    assert len(set(seen)) == len(seen)
    assert sidecar_path("sqlite+aiosqlite://") is None
    assert sidecar_path("sqlite+aiosqlite:///:memory:") is None
    assert sidecar_path("postgresql+asyncpg://u@h/db") is None


@SQLITE
async def test_a_read_begun_before_a_revoke_is_not_cached_when_the_signal_came_first(
    held, database_url
) -> None:
    db, guard = held
    token_id, secret = await _token(db)
    db.hold = True
    reading = asyncio.create_task(guard.authenticate(secret))
    await db.read_done.wait()  # the read saw the token active ...
    await _revoke(database_url, token_id)  # ... then the revoke commits and signals
    assert await guard.authenticate(secret) is None  # another request sees the signal
    db.release.set()
    assert await reading is not None  # in flight before the revoke: answered as before it
    assert await guard.authenticate(secret) is None  # and nothing stale was cached
    assert guard.cache_hits == 0


@SQLITE
async def test_a_read_cached_before_the_signal_was_seen_is_dropped_by_the_next_request(
    held, database_url
) -> None:
    db, guard = held
    token_id, secret = await _token(db)
    db.hold = True
    reading = asyncio.create_task(guard.authenticate(secret))
    await db.read_done.wait()
    await _revoke(database_url, token_id)
    db.release.set()
    assert await reading is not None  # cached under the old epoch ...
    assert await guard.authenticate(secret) is None  # ... and dropped by the new one
    assert guard.cache_hits == 0


@SQLITE
async def test_an_unchanged_sidecar_serves_from_the_cache(held) -> None:
    db, guard = held
    _, secret = await _token(db)
    first = await guard.authenticate(secret)
    assert first is not None
    for _ in range(3):
        assert await guard.authenticate(secret) == first
    assert guard.cache_hits == 3
