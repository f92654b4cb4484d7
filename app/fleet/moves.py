"""What the general path does to a job's row when it moves it (app.fleet.service):
the locked read it starts from (`locked_job`, `held_job`), requeue with backoff,
release, finish, cancel, and the event that records the move.

The lean path (`app.fleet.cycle`) writes the same columns in SQL; these are the
ORM's version, for the calls that have locked and read the job (DESIGN §2, §4).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import ConflictError, NotFoundError
from app.events.models import EventType
from app.events.outbox import record_event
from app.fleet import repository
from app.fleet.models import Job, JobStage
from app.fleet.records import FleetPolicy
from app.fleet.stages import ACTIVE_STAGES, jittered, retry_backoff_seconds


async def locked_job(session: AsyncSession, product_id: str, job_id: int) -> Job:
    job = await repository.get_job(session, product_id, job_id, for_update=True)
    if job is None:
        raise NotFoundError("job", job_id)
    return job


async def held_job(
    session: AsyncSession, product_id: str, job_id: int, fence: int, now: datetime
) -> Job:
    """The job, if `fence` names its current, unexpired lease; CONFLICT otherwise."""
    job = await locked_job(session, product_id, job_id)
    if job.stage not in ACTIVE_STAGES:
        raise ConflictError(f"job {job_id} is {job.stage.value}; no lease is held on it")
    if fence != job.lease_fence:
        raise ConflictError(f"stale fence {fence}; the current fence is {job.lease_fence}")
    if job.lease_expires_at is None or job.lease_expires_at <= now:
        raise ConflictError(f"the lease on job {job_id} has expired")
    return job


def requeue(job: Job, now: datetime, policy: FleetPolicy, draw: float) -> None:
    """Back to QUEUED after a failed attempt: fence + 1 (the old lease can no longer
    write), lease cleared, not before `now` + the attempt's backoff (seconds,
    `retry_backoff_seconds` capped, jittered by `draw` in [0, 1)); `queued_at` is that
    instant, so aging starts from it (DESIGN §2, §3)."""
    delay = jittered(
        retry_backoff_seconds(job.attempts, base=policy.retry_backoff_seconds,
                              cap=policy.retry_backoff_max_seconds),
        policy.retry_backoff_jitter, draw,
    )
    job.stage = JobStage.QUEUED
    job.lease_fence += 1
    job.lease_worker_id = None
    job.lease_expires_at = None
    job.not_before = now + timedelta(seconds=delay)
    job.queued_at = job.not_before
    job.updated_at = now


def release(job: Job, now: datetime, reason: str | None) -> None:
    """Back to QUEUED at once, given back by its lease holder (`FleetService.release_job`):
    the claim's attempt not counted, fence + 1, lease cleared, no backoff, `queued_at`
    unchanged; `reason` kept in `failure_reason`."""
    job.stage = JobStage.QUEUED
    job.attempts = max(0, job.attempts - 1)
    job.lease_fence += 1
    job.lease_worker_id = None
    job.lease_expires_at = None
    job.not_before = None
    job.failure_reason = reason
    job.updated_at = now


def finish(job: Job, stage: JobStage, now: datetime) -> None:
    """End the job in `stage` (SHIPPED, FAILED, CANCELLED) at `now`; the lease ends."""
    job.stage = stage
    job.lease_worker_id = None
    job.lease_expires_at = None
    job.finished_at = now
    job.updated_at = now


async def cancel(session: AsyncSession, job: Job, reason: str | None, now: datetime) -> None:
    source = job.stage
    job.lease_fence += 1  # whoever holds it can no longer write
    job.failure_reason = reason
    finish(job, JobStage.CANCELLED, now)
    await record_stage(session, job, source)


async def record_stage(session: AsyncSession, job: Job, source: JobStage | None) -> None:
    """Flush the job and append its event (DESIGN §5): `JOB_CREATED` when `source` is
    None, else `JOB_STAGE_CHANGED` from `source`; payload `{attempts, fence[,
    trackerItemId]}`."""
    await session.flush()
    payload: dict[str, Any] = {"attempts": job.attempts, "fence": job.lease_fence}
    if job.tracker_item_id is not None:
        payload["trackerItemId"] = job.tracker_item_id
    await record_event(
        session,
        product_id=job.product_id,
        type=EventType.JOB_CREATED if source is None else EventType.JOB_STAGE_CHANGED,
        entity_id=job.id,
        from_state=None if source is None else source.value,
        to_state=job.stage.value,
        payload=payload,
    )
