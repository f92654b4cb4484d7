"""Background loops run by every instance: the lease reaper, the echo sweeper and
event retention.

Each pass is one short unit of work and may run on many instances at once: the
reaper locks the rows it takes (`FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite
units of work never interleave), echoes are idempotent under a row lock, and
pruning old events twice deletes nothing twice.  A failed pass is logged and the
loop goes on.  Tests call the `*_once` methods directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from app.bridge.service import BridgeService
from app.config import Settings
from app.db import utcnow
from app.events import repository as event_repository
from app.fleet.service import FleetService, ReapResult
from app.uow import Database

logger = logging.getLogger(__name__)


class BackgroundLoops:
    def __init__(
        self, settings: Settings, db: Database, fleet: FleetService, bridge: BridgeService
    ) -> None:
        self.settings = settings
        self.db = db
        self.fleet = fleet
        self.bridge = bridge
        self._tasks: list[asyncio.Task[None]] = []

    async def reap_once(self) -> ReapResult:
        async with self.db.unit_of_work() as session:
            return await self.fleet.reap_expired_leases(session)

    async def sweep_echoes_once(self) -> int:
        return await self.bridge.sweep_echoes(every_stage_change=self.settings.tracker_echo)

    async def prune_events_once(self) -> int:
        cutoff = utcnow() - timedelta(seconds=self.settings.event_retention_seconds)
        async with self.db.unit_of_work() as session:
            return await event_repository.delete_older_than(session, cutoff)

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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    @staticmethod
    async def _every(interval: float, step: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await step()
            except Exception:
                logger.exception("background pass %s failed", getattr(step, "__name__", step))
            await asyncio.sleep(interval)
