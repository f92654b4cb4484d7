"""The echo's own queries: what it reads (the item and the job, in one statement) and
what it records on the job.

Core statements on the tables, no ORM objects: an echo runs after every stage change
when FLEET_TRACKER_ECHO is on, and it neither needs the whole job nor keeps anything
in the session.  Every query is scoped to one product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    and_,
    bindparam,
    func,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.bridge.mapping import same_status_stages
from app.fleet.models import Job, JobStage
from app.tracker.models import ItemStatus
from app.tracker.repository import ITEMS

JOBS: Table = Job.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class EchoRow:
    """One tracker-linked job as an echo reads it: its item's status, what the bridge
    recorded on both, whether it is the item's latest job, and its metrics."""

    product_id: str
    job_id: int
    item_id: int
    item_status: ItemStatus
    bridge_status: ItemStatus | None
    latest: bool
    stage: JobStage
    echoed_stage: JobStage | None
    last_echoed_status: ItemStatus | None
    echo_attempts: int
    echo_retry_at: datetime | None
    echo_retry_stage: JobStage | None
    attempts: int
    max_attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    cost_usd: float
    tokens_in: int
    tokens_out: int


def _echo_rows_query(*, lock: bool) -> Select[Any]:
    jobs, items = JOBS.c, ITEMS.c
    newer = JOBS.alias("newer")
    latest = (
        select(func.max(newer.c.id))
        .where(newer.c.product_id == jobs.product_id,
               newer.c.tracker_item_id == jobs.tracker_item_id)
        .scalar_subquery()
    )
    stmt = (
        select(
            jobs.product_id, jobs.id.label("job_id"), items.id.label("item_id"),
            items.status.label("item_status"), items.bridge_status,
            (latest == jobs.id).label("latest"),
            jobs.stage, jobs.echoed_stage, jobs.last_echoed_status, jobs.echo_attempts,
            jobs.echo_retry_at, jobs.echo_retry_stage, jobs.attempts, jobs.max_attempts,
            jobs.started_at, jobs.finished_at, jobs.cost_usd, jobs.tokens_in, jobs.tokens_out,
        )
        .select_from(ITEMS)
        .join(JOBS, and_(jobs.tracker_item_id == items.id, jobs.product_id == items.product_id))
        .where(jobs.product_id == bindparam("product_id"),
               jobs.id.in_(bindparam("job_ids", expanding=True)))
        .order_by(items.id, jobs.id)
    )
    if lock:
        stmt = stmt.with_for_update(of=[ITEMS, JOBS])
    return stmt


_LOCKED_ROWS = _echo_rows_query(lock=True)
_ROWS = _echo_rows_query(lock=False)


async def echo_rows(
    session: AsyncSession | AsyncConnection, product_id: str, job_ids: Sequence[int], *, lock: bool
) -> list[EchoRow]:
    """The tracker-linked jobs among `job_ids` (of `product_id`) whose item exists, each
    with its item, in one statement, ordered by item then job.  A job that is not in
    the product, has no item or whose item is gone is simply not returned.

    With `lock` the rows are locked FOR UPDATE on PostgreSQL: each item's row before
    its job's (FOR UPDATE OF items, jobs takes its row marks in that order), and the
    items in id order, so two echoes never wait on each other in a cycle, and an item
    is always locked before its jobs as by every other item write.  On SQLite the
    writer transaction already holds the database's write lock."""
    stmt = _LOCKED_ROWS if lock else _ROWS
    result = await session.execute(
        stmt, {"product_id": product_id, "job_ids": list(job_ids)}
    )
    return [EchoRow(**row._asdict()) for row in result]


_JOB_EXISTS = select(JOBS.c.id).where(JOBS.c.product_id == bindparam("b_product_id"),
                                      JOBS.c.id == bindparam("b_job_id"))


async def job_exists(
    session: AsyncSession | AsyncConnection, product_id: str, job_id: int
) -> bool:
    result = await session.execute(_JOB_EXISTS, {"b_product_id": product_id, "b_job_id": job_id})
    return result.first() is not None


@dataclass(frozen=True, slots=True)
class EchoRecord:
    """What a completed echo leaves on its job: the stage echoed and the status last
    echoed; any pending retry is cleared."""

    job_id: int
    stage: JobStage
    last_echoed_status: ItemStatus | None


_RECORD_ECHO = (
    update(JOBS)
    .where(JOBS.c.product_id == bindparam("b_product_id"), JOBS.c.id == bindparam("b_job_id"))
    .values(
        echoed_stage=bindparam("b_stage"),
        last_echoed_status=bindparam("b_status"),
        echo_attempts=0,
        echo_retry_at=None,
        echo_retry_stage=None,
    )
)


async def record_echoes(
    session: AsyncSession | AsyncConnection, product_id: str, records: Sequence[EchoRecord]
) -> None:
    """Store each completed echo on its job, in one UPDATE (executemany for several).
    The caller holds the jobs' row locks (`echo_rows(lock=True)`)."""
    params = [
        {"b_product_id": product_id, "b_job_id": record.job_id, "b_stage": record.stage,
         "b_status": record.last_echoed_status}
        for record in records
    ]
    if len(params) == 1:  # the usual case: a plain execute, not the executemany path
        await session.execute(_RECORD_ECHO, params[0])
    elif params:
        await session.execute(_RECORD_ECHO, params)


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
