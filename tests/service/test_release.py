"""`release_job` at the service level (both stores): the lease holder gives its job back.

QUEUED at once (no backoff), fence raised, the claim's attempt not counted, one
stage-change event; anything but the current, unexpired lease is CONFLICT and changes
nothing.  An expired lease is made without sleeping (claimed with `now=` in the past).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app.auth.models import Role
from app.db import utcnow
from app.errors import ConflictError, NotFoundError
from app.events.models import Event
from app.fleet.models import Job, JobStage
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec
from app.main import Runtime

PRODUCT = "acme"
WORKER = WorkerProfile("worker-1")


@pytest.fixture
async def runtime(make_runtime: Any, make_token: Any) -> Runtime:
    await make_token(PRODUCT, Role.MEMBER)
    await make_token("globex", Role.MEMBER)
    result: Runtime = await make_runtime(retry_backoff_seconds=600.0)
    return result


async def call(rt: Runtime, name: str, *args: Any, product: str = PRODUCT, **kw: Any) -> Any:
    async with rt.services.db.unit_of_work() as session:
        return await getattr(rt.services.fleet, name)(session, product, *args, **kw)


async def submit(rt: Runtime, **fields: Any) -> Job:
    fields.setdefault("title", "a job")
    fields.setdefault("body_md", "do the thing")
    job: Job = (await call(rt, "submit_job", JobSpec(**fields))).job
    return job


async def load(rt: Runtime, job_id: int) -> Job:
    async with rt.services.db.read() as session:
        return await rt.services.fleet.get_job(session, PRODUCT, job_id)


async def stage_events(rt: Runtime, job_id: int) -> list[tuple[str | None, str]]:
    async with rt.services.db.read() as session:
        rows = await session.execute(
            select(Event.from_state, Event.to_state)
            .where(Event.entity_id == job_id).order_by(Event.id)
        )
        return [(row[0], row[1]) for row in rows]


async def snapshot(rt: Runtime, job_id: int) -> tuple[Any, ...]:
    job = await load(rt, job_id)
    async with rt.services.db.read() as session:
        events = (await session.execute(select(func.count()).select_from(Event))).scalar_one()
    return (job.stage, job.lease_fence, job.attempts, job.lease_worker_id,
            job.lease_expires_at, job.not_before, job.failure_reason, job.updated_at, events)


async def assert_refused(rt: Runtime, job_id: int, fence: int, match: str) -> None:
    before = await snapshot(rt, job_id)
    with pytest.raises(ConflictError, match=match):
        await call(rt, "release_job", job_id, fence, "worker stopped")
    assert await snapshot(rt, job_id) == before


@pytest.mark.parametrize("held_in", [JobStage.ASSIGNED, JobStage.BUILDING, JobStage.TESTING])
async def test_release_requeues_at_once_without_using_the_attempt(
    runtime: Runtime, held_in: JobStage
) -> None:
    job = await submit(runtime, max_attempts=2)
    claimed = await call(runtime, "claim_next_job", WORKER)
    assert (claimed.id, claimed.attempts, claimed.lease_fence) == (job.id, 1, 1)
    if held_in != JobStage.ASSIGNED:
        await call(runtime, "transition_job", job.id, 1, held_in)

    released = await call(runtime, "release_job", job.id, 1, "worker stopped (SIGINT)")

    assert released.stage == JobStage.QUEUED
    assert (released.attempts, released.lease_fence) == (0, 2)
    assert (released.lease_worker_id, released.lease_expires_at, released.not_before) == (
        None, None, None)
    assert released.failure_reason == "worker stopped (SIGINT)"
    assert released.finished_at is None
    events = await stage_events(runtime, job.id)
    assert events[-1] == (held_in.value, "QUEUED")
    # the old lease can no longer write
    with pytest.raises(ConflictError):
        await call(runtime, "heartbeat", job.id, 1)
    with pytest.raises(ConflictError):
        await call(runtime, "transition_job", job.id, 1, JobStage.SHIPPED)
    # no backoff (a failure would wait 600 s here): the next claim gets it, as attempt 1
    again = await call(runtime, "claim_next_job", WorkerProfile("worker-2"))
    assert (again.id, again.attempts, again.lease_fence) == (job.id, 1, 3)


async def test_releasing_again_and_again_never_exhausts_the_attempts(runtime: Runtime) -> None:
    job = await submit(runtime, max_attempts=1)
    for fence in (1, 3, 5):
        claimed = await call(runtime, "claim_next_job", WORKER)
        assert (claimed.id, claimed.lease_fence, claimed.attempts) == (job.id, fence, 1)
        await call(runtime, "release_job", job.id, fence)
    claimed = await call(runtime, "claim_next_job", WORKER)
    shipped = await call(runtime, "transition_job", job.id, claimed.lease_fence,
                         JobStage.SHIPPED)
    assert (shipped.stage, shipped.attempts) == (JobStage.SHIPPED, 1)


async def test_only_the_current_unexpired_lease_may_release(runtime: Runtime) -> None:
    queued = await submit(runtime, title="queued")
    await assert_refused(runtime, queued.id, 0, "no lease")

    held = await call(runtime, "claim_next_job", WORKER)
    await assert_refused(runtime, held.id, held.lease_fence - 1, "stale fence")
    await assert_refused(runtime, held.id, held.lease_fence + 1, "stale fence")

    shipped = await call(runtime, "transition_job", held.id, held.lease_fence, JobStage.SHIPPED)
    await assert_refused(runtime, shipped.id, held.lease_fence, "SHIPPED")

    cancelled = await submit(runtime, title="cancelled by a member")
    lease = await call(runtime, "claim_next_job", WORKER)
    assert lease.id == cancelled.id
    await call(runtime, "cancel_job", cancelled.id, "item cancelled")
    await assert_refused(runtime, cancelled.id, lease.lease_fence, "CANCELLED")

    expired = await submit(runtime, title="expired")
    an_hour_ago = utcnow() - timedelta(hours=1)
    async with runtime.services.db.unit_of_work() as session:
        await session.execute(update(Job).where(Job.id == expired.id).values(
            queued_at=an_hour_ago, created_at=an_hour_ago))
    stale = await call(runtime, "claim_next_job", WORKER,
                       now=utcnow() - timedelta(minutes=30), lease_seconds=60)
    assert stale.id == expired.id
    await assert_refused(runtime, expired.id, stale.lease_fence, "expired")


async def test_another_products_job_is_not_found(runtime: Runtime) -> None:
    job = await submit(runtime)
    claimed = await call(runtime, "claim_next_job", WORKER)
    with pytest.raises(NotFoundError):
        await call(runtime, "release_job", job.id, claimed.lease_fence, product="globex")
    assert (await load(runtime, job.id)).stage == JobStage.ASSIGNED
