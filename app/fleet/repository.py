"""All queries on jobs.  Every query is scoped to one product unless it says otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import (
    Select,
    func,
    literal,
    or_,
    select,
    tuple_,
    type_coerce,
    union_all,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.db import UTCDateTime
from app.fleet.models import Job, JobStage, Priority
from app.fleet.scheduler import Candidate, WorkerProfile, is_eligible
from app.fleet.stages import ACTIVE_STAGES, TERMINAL_STAGES

# How many queued jobs of one priority the claim reads at a time while looking for
# one whose capabilities the worker has.  Larger windows cost more per read; the
# scan goes on window after window, so an eligible job is never missed.
CLAIM_WINDOW = 64


def _dialect(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


async def get_job(
    session: AsyncSession, product_id: str, job_id: int, *, for_update: bool = False
) -> Job | None:
    stmt = select(Job).where(Job.product_id == product_id, Job.id == job_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_jobs(session: AsyncSession, product_id: str, ids: Sequence[int]) -> Sequence[Job]:
    stmt = select(Job).where(Job.product_id == product_id, Job.id.in_(ids))
    return (await session.execute(stmt)).scalars().all()


async def first_jobs_of_items(
    session: AsyncSession, product_id: str, item_ids: Sequence[int], *, limit: int
) -> Sequence[Job]:
    """The first (oldest) `limit` jobs linked to each item, in one query (a window per
    item), ordered by item then job id."""
    ranked = (
        select(
            Job,
            func.row_number()
            .over(partition_by=Job.tracker_item_id, order_by=Job.id)
            .label("position"),
        )
        .where(Job.product_id == product_id, Job.tracker_item_id.in_(item_ids))
        .subquery()
    )
    job = aliased(Job, ranked)
    stmt = select(job).where(ranked.c.position <= limit).order_by(job.tracker_item_id, job.id)
    return (await session.execute(stmt)).scalars().all()


async def count_jobs_of_item(session: AsyncSession, product_id: str, item_id: int) -> int:
    stmt = select(func.count()).select_from(Job).where(
        Job.product_id == product_id, Job.tracker_item_id == item_id
    )
    return int((await session.execute(stmt)).scalar_one())


async def latest_job_of_item(
    session: AsyncSession, product_id: str, item_id: int, *, open_only: bool = False
) -> Job | None:
    """The newest job linked to one tracker item (with `open_only`, the newest that
    has not ended); None when there is none."""
    stmt = select(Job).where(Job.product_id == product_id, Job.tracker_item_id == item_id)
    if open_only:
        stmt = stmt.where(Job.stage.not_in(TERMINAL_STAGES))
    stmt = stmt.order_by(Job.id.desc()).limit(1)
    return (await session.execute(stmt)).scalar_one_or_none()


async def open_jobs_of_item(
    session: AsyncSession, product_id: str, item_id: int
) -> Sequence[Job]:
    """The jobs of one tracker item that have not ended, oldest first, locked."""
    stmt = (
        select(Job)
        .where(Job.product_id == product_id, Job.tracker_item_id == item_id,
               Job.stage.not_in(TERMINAL_STAGES))
        .order_by(Job.id)
        .with_for_update()
    )
    return (await session.execute(stmt)).scalars().all()


async def latest_job_id_of_item(session: AsyncSession, product_id: str, item_id: int) -> int | None:
    stmt = select(func.max(Job.id)).where(
        Job.product_id == product_id, Job.tracker_item_id == item_id
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_by_idempotency_key(session: AsyncSession, product_id: str, key: str) -> Job | None:
    stmt = select(Job).where(Job.product_id == product_id, Job.idempotency_key == key)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_jobs(
    session: AsyncSession,
    product_id: str,
    *,
    stage: JobStage | None,
    tracker_item_id: int | None,
    after_id: int | None,
    limit: int,
) -> Sequence[Job]:
    stmt = select(Job).where(Job.product_id == product_id)
    if stage is not None:
        stmt = stmt.where(Job.stage == stage)
    if tracker_item_id is not None:
        stmt = stmt.where(Job.tracker_item_id == tracker_item_id)
    if after_id is not None:
        stmt = stmt.where(Job.id > after_id)
    return (await session.execute(stmt.order_by(Job.id).limit(limit))).scalars().all()


def _queue_of(product_id: str, priority: Priority, worker: WorkerProfile, now: datetime,
              postgres: bool) -> Select[Job]:
    """Queued, due jobs of one priority that match the worker's engine class and
    profile, in scheduler order; on PostgreSQL the capability subset test too."""
    stmt = select(Job).where(
        Job.product_id == product_id,
        Job.stage == JobStage.QUEUED,
        Job.priority == priority,
        Job.queued_at <= now,
        or_(Job.engine_class.is_(None), Job.engine_class.in_(sorted(worker.engine_classes))),
        or_(Job.profile.is_(None), Job.profile.in_(sorted(worker.profiles))),
    )
    if postgres:
        stmt = stmt.where(
            type_coerce(Job.capabilities, JSONB).contained_by(sorted(worker.capabilities))
        )
    return stmt.order_by(Job.queued_at, Job.id)


def claim_heads_query(product_id: str, worker: WorkerProfile, now: datetime) -> Select[Job]:
    """PostgreSQL: the head of each priority's queue, locked, in one statement.

    `WITH head_low AS (SELECT … LIMIT 1 FOR UPDATE SKIP LOCKED), … SELECT … FROM
    head_low UNION ALL …` — PostgreSQL refuses row locks directly under UNION, so
    each head is a CTE of its own.  Each is an index range scan of `ix_jobs_claim`
    in queue order that stops at the first row passing the engine-class, profile
    and capability (JSONB `<@`) filters and not locked by another claimer.
    """
    heads = [
        _queue_of(product_id, priority, worker, now, postgres=True)
        .limit(1)
        .with_for_update(skip_locked=True)
        .cte(f"head_{priority.value.lower()}")
        for priority in Priority
    ]
    union = union_all(*(select(head) for head in heads)).subquery("heads")
    return select(aliased(Job, union))


async def claim_candidates(
    session: AsyncSession, product_id: str, worker: WorkerProfile, now: datetime,
    *, window: int = CLAIM_WINDOW,
) -> list[Job]:
    """The first eligible job of each priority (at most four), for the scheduler to
    choose from.  Each read walks the claim index `(product, stage, priority,
    queued_at, id)`, so its cost does not grow with the length of the queue.

    On PostgreSQL all four heads come from one statement (`claim_heads_query`),
    each locked `FOR UPDATE SKIP LOCKED`: a concurrent claimer passes over them
    instead of waiting, and can never take the same job.  On SQLite the caller's
    transaction already holds the write lock.
    """
    postgres = _dialect(session) == "postgresql"
    if postgres:
        heads_stmt = claim_heads_query(product_id, worker, now)
        return list((await session.execute(heads_stmt)).scalars().all())
    heads: list[Job] = []
    for priority in Priority:
        stmt = _queue_of(product_id, priority, worker, now, postgres)
        after: tuple[datetime, int] | None = None
        while True:
            page_stmt = stmt
            if after is not None:
                page_stmt = page_stmt.where(
                    tuple_(Job.queued_at, Job.id)
                    > tuple_(literal(after[0], UTCDateTime()), literal(after[1]))
                )
            page = (await session.execute(page_stmt.limit(window))).scalars().all()
            head = next(
                (job for job in page if is_eligible(to_candidate(job), worker, now)), None
            )
            if head is not None:
                heads.append(head)
                break
            if len(page) < window:
                break
            after = (page[-1].queued_at, page[-1].id)
    return heads


async def expired_leases(session: AsyncSession, now: datetime, limit: int) -> Sequence[Job]:
    """Jobs of any product whose lease has run out, locked for the reaper."""
    stmt = (
        select(Job)
        .where(Job.stage.in_(ACTIVE_STAGES), Job.lease_expires_at < now)
        .order_by(Job.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return (await session.execute(stmt)).scalars().all()


def to_candidate(job: Job) -> Candidate:
    return Candidate(
        id=job.id,
        stage=job.stage,
        priority=job.priority,
        capabilities=frozenset(job.capabilities or ()),
        engine_class=job.engine_class,
        profile=job.profile,
        eligible_since=job.queued_at,
        not_before=job.not_before,
    )

