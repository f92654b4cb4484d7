"""Fleet-wide aggregates for /metrics (issue 10 item 6), across every product.

Each is one bounded query: queue depth reads the jobs that have not ended (through
the `(stage, lease_expires_at)` index), leases held the active ones, the echo
backlog counts at most `cap` rows.  Ended jobs, which only ever grow, are never
counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.fleet.models import Job, JobStage, Priority
from app.fleet.stages import ACTIVE_STAGES, TERMINAL_STAGES

OPEN_STAGES = tuple(stage for stage in JobStage if stage not in TERMINAL_STAGES)
ECHO_BACKLOG_CAP = 10_000


@dataclass(frozen=True, slots=True)
class FleetStats:
    """`depth[(stage, priority)]` counts jobs that have not ended (0s included);
    `leases_held` active jobs whose lease has not expired; `echo_backlog` jobs whose
    echo failed and awaits the sweeper (at most ECHO_BACKLOG_CAP)."""

    depth: dict[tuple[JobStage, Priority], int]
    leases_held: int
    echo_backlog: int


async def fleet_stats(session: AsyncSession, now: datetime) -> FleetStats:
    depth = {(stage, priority): 0 for stage in OPEN_STAGES for priority in Priority}
    rows = await session.execute(
        select(Job.stage, Job.priority, func.count())
        .where(Job.stage.in_(OPEN_STAGES))
        .group_by(Job.stage, Job.priority)
    )
    for stage, priority, count in rows:
        depth[(stage, priority)] = int(count)
    leases = await session.scalar(
        select(func.count()).select_from(Job).where(
            Job.stage.in_(ACTIVE_STAGES), Job.lease_expires_at > now
        )
    )
    pending = (
        select(Job.id).where(Job.echo_retry_at.is_not(None)).limit(ECHO_BACKLOG_CAP).subquery()
    )
    backlog = await session.scalar(select(func.count()).select_from(pending))
    return FleetStats(depth=depth, leases_held=int(leases or 0), echo_backlog=int(backlog or 0))
