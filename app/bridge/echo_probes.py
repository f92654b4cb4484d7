"""The echo's unlocked reads on SQLite (`BridgeService._nothing_to_write`): the reads
pending at the same moment share one hop (`app.bridge.group_commit`), on a pooled
connection the bridge keeps for them until its `aclose`.
"""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncConnection

from app.bridge import repository as bridge_repository
from app.bridge.echo_apply import Probe
from app.bridge.group_commit import Take
from app.uow import Database

logger = logging.getLogger(__name__)


class ProbeReader:
    """The run of a `GroupCommit[Probe]` (`run`) and the connection it reads on."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._connection: AsyncConnection | None = None

    async def run(self, take: Take[Probe]) -> None:
        """A run of unlocked reads (`BridgeService._nothing_to_write`): the probes
        pending now, then those that arrived meanwhile, until none is left, on the
        bridge's own pooled connection (checked out at the first read, given back by
        `BridgeService.aclose`, replaced after a failure)."""
        try:
            if self._connection is None:
                self._connection = await self.db.engine.connect()
            while probes := take():
                keys = list(dict.fromkeys(
                    (probe.product_id, job_id) for probe in probes for job_id in probe.job_ids))
                rows = await bridge_repository.echo_rows_unlocked_on(self._connection, keys)
                found = {(row.product_id, row.job_id): row for row in rows}
                for probe in probes:
                    probe.decide([found[key] for key in
                                  ((probe.product_id, job_id) for job_id in probe.job_ids)
                                  if key in found])
        except Exception:
            logger.info("reading the echo state of jobs failed", exc_info=True)
            await self.drop_connection(invalidate=True)
            take()  # those still waiting are echoed as usual

    async def drop_connection(self, *, invalidate: bool = False) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await (connection.invalidate() if invalidate else connection.close())
        except Exception:  # the connection is gone either way
            logger.debug("closing the echo's read connection raised", exc_info=True)
