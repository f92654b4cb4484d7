"""The bridge's queries: the echo's own statements (`app.bridge.echo_rows`,
`app.bridge.echo_writes`, re-exported here) and the sweeper's backlog, the one query
that spans products.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, and_, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.bridge.echo_rows import JOBS, EchoKey, EchoRow, echo_rows, echo_rows_of
from app.bridge.echo_rows import echo_rows_unlocked as echo_rows_unlocked
from app.bridge.echo_rows import echo_rows_unlocked_on as echo_rows_unlocked_on
from app.bridge.echo_rows import job_exists as job_exists
from app.bridge.echo_writes import EchoRecord, record_echoes, write_bridge_status, write_onto_item
from app.bridge.mapping import same_status_stages
from app.fleet.models import JobStage

__all__ = [
    "EchoKey", "EchoRecord", "EchoRow", "echo_backlog", "echo_rows", "echo_rows_of",
    "echo_rows_unlocked", "echo_rows_unlocked_on", "job_exists", "record_echoes",
    "write_bridge_status", "write_onto_item",
]

# -- the sweeper's backlog --------------------------------------------------------


def _covered() -> ColumnElement[bool]:
    """`mapping.echo_covered` as SQL on `jobs` (no NULL ever makes it unknown)."""
    jobs = JOBS.c
    return and_(
        jobs.echo_retry_at.is_(None),
        or_(*(
            and_(jobs.stage.in_(stages), jobs.echoed_stage.is_not(None),
                 jobs.echoed_stage.in_(stages), jobs.last_echoed_status.is_not(None),
                 jobs.last_echoed_status == status)
            for status, stages in same_status_stages().items()
        )),
    )


async def echo_backlog(
    session: AsyncSession, now: datetime, limit: int, *, every_stage_change: bool
) -> Sequence[tuple[str, int, JobStage | None]]:
    """(product, job id, stage to echo) of tracker-linked jobs whose echo is due, of
    every product, oldest job first.

    With `every_stage_change` (FLEET_TRACKER_ECHO on) that is every such job whose
    current stage has not been echoed yet, to be echoed at its current stage (None),
    except those an earlier echo covers (`mapping.echo_covered`: a move within one
    status that the item already shows); otherwise only jobs whose manual echo failed
    and waits for a retry, each with the stage that echo attempted (DESIGN §4).  Jobs
    still backing off are left out.
    """
    jobs = JOBS.c
    stmt = (
        select(jobs.product_id, jobs.id, jobs.echo_retry_stage)
        .where(
            jobs.tracker_item_id.is_not(None),
            or_(jobs.echo_retry_at.is_(None), jobs.echo_retry_at <= now),
        )
        .order_by(jobs.id)
        .limit(limit)
    )
    if every_stage_change:
        stmt = stmt.where(
            or_(jobs.echoed_stage.is_(None), jobs.echoed_stage != jobs.stage), not_(_covered())
        )
        return [(row[0], row[1], None) for row in (await session.execute(stmt)).all()]
    stmt = stmt.where(jobs.echo_retry_at.is_not(None), jobs.echo_retry_stage.is_not(None))
    return [(row[0], row[1], row[2]) for row in (await session.execute(stmt)).all()]
