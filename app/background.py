"""Background loops run by every instance: the lease reaper, the echo sweeper and
event retention.

Every instance runs all three loops; none of them does the same work twice:

* the reaper locks the expired leases it takes `FOR UPDATE SKIP LOCKED` on
  PostgreSQL, so concurrent reapers split the backlog (on SQLite units of work
  never interleave);
* the echo sweeper and event retention run one instance's pass at a time: on
  PostgreSQL a pass first takes a transaction-level advisory lock
  (`pg_try_advisory_xact_lock(SINGLE_RUNNER_CLASS, <loop>)`); an instance that does
  not get it skips this pass and tries again at its next interval.  The lock goes
  with the transaction, so an instance that dies mid-pass never leaves it held.
  On SQLite (one process) there is nothing to coordinate.  Besides, echoes stay
  idempotent under a row lock and pruning twice deletes nothing twice.

A failed pass is logged and the loop goes on.  Tests call the `*_once` methods
directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.bridge.service import BridgeService
from app.config import Settings
from app.db import utcnow
from app.events import repository as event_repository
from app.fleet.service import FleetService, ReapResult
from app.tasks import cancel_and_wait
from app.uow import Database

logger = logging.getLogger(__name__)

# Advisory lock keys (PostgreSQL): one class for fleetbridge, one object per loop.
SINGLE_RUNNER_CLASS = 0x466C6565  # "Flee"
ECHO_SWEEPER_LOCK = 1
EVENT_RETENTION_LOCK = 2


class BackgroundLoops:
    def __init__(
        self, settings: Settings, db: Database, fleet: FleetService, bridge: BridgeService
    ) -> None:
        self.settings = settings
        self.db = db
        self.fleet = fleet
        self.bridge = bridge
        self._tasks: list[asyncio.Task[None]] = []
        # Told what each reaper pass took back (app.metrics counts it).
        self.on_reaped: Callable[[ReapResult], None] | None = None

    async def reap_once(self) -> ReapResult:
        async with self.db.unit_of_work() as session:
            result = await self.fleet.reap_expired_leases(session)
        if self.on_reaped is not None:
            self.on_reaped(result)
        return result

    async def sweep_echoes_once(self) -> int:
        """One sweeper pass; 0 without work when another instance is sweeping."""
        async with self._single_runner(ECHO_SWEEPER_LOCK) as mine:
            if not mine:
                return 0
            return await self.bridge.sweep_echoes(every_stage_change=self.settings.tracker_echo)

    async def prune_events_once(self) -> int:
        """Delete events older than the retention period; 0 when another instance
        is pruning right now."""
        cutoff = utcnow() - timedelta(seconds=self.settings.event_retention_seconds)
        async with self.db.unit_of_work() as session:
            if self.db.dialect == "postgresql" and not await _try_advisory_xact_lock(
                session, EVENT_RETENTION_LOCK
            ):
                return 0
            return await event_repository.delete_older_than(session, cutoff)

    @contextlib.asynccontextmanager
    async def _single_runner(self, loop_key: int) -> AsyncIterator[bool]:
        """Hold the loop's advisory lock in a transaction of its own for the pass."""
        if self.db.dialect != "postgresql":
            yield True
            return
        async with self.db.engine.connect() as connection:
            try:
                yield await _try_advisory_xact_lock(connection, loop_key)
            finally:
                await connection.rollback()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(
                self._every(self.settings.reaper_interval_seconds, self.reap_once), name="reaper"
            ),
            asyncio.create_task(
                self._every(self.settings.echo_sweep_interval_seconds, self.sweep_echoes_once),
                name="echo-sweeper",
            ),
            asyncio.create_task(
                self._every(max(60.0, self.settings.reaper_interval_seconds),
                            self.prune_events_once),
                name="event-retention",
            ),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    @staticmethod
    async def _every(interval: float, step: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await step()
            except Exception:
                logger.exception("background pass %s failed", getattr(step, "__name__", step))
            await asyncio.sleep(interval)


async def _try_advisory_xact_lock(executor: AsyncConnection | AsyncSession, loop_key: int) -> bool:
    """PostgreSQL: take the loop's lock until the transaction ends; True when free."""
    result = await executor.execute(
        text("SELECT pg_try_advisory_xact_lock(:class_key, :loop_key)"),
        {"class_key": SINGLE_RUNNER_CLASS, "loop_key": loop_key},
    )
    return bool(result.scalar())
