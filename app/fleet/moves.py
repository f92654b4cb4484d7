"""What the general path does to a job's row when it moves it (app.fleet.service):
requeue with backoff, finish, and the event that records the move.

The lean path (`app.fleet.cycle`) writes the same columns in SQL; these are the
ORM's version, for the calls that have locked and read the job (DESIGN §2, §4).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.events.models import EventType
from app.events.outbox import record_event
from app.fleet.models import Job, JobStage
from app.fleet.records import FleetPolicy
from app.fleet.stages import jittered, retry_backoff_seconds


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


def finish(job: Job, stage: JobStage, now: datetime) -> None:
    """End the job in `stage` (SHIPPED, FAILED, CANCELLED) at `now`; the lease ends."""
    job.stage = stage
    job.lease_worker_id = None
    job.lease_expires_at = None
    job.finished_at = now
    job.updated_at = now


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
