"""Fleet coordinator at the service level (both stores): submit, claim, lease,
transition, reaper, cancel, retry and product isolation.

Every call runs through `services.fleet` inside a real unit of work.  An expired
lease is made without sleeping: the job is backdated (it "was submitted an hour
ago") and claimed with `now=` half an hour ago and a one-minute lease.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text, update

from app.auth.models import Role
from app.db import database_now, utcnow
from app.errors import ConflictError, NotFoundError
from app.fleet.models import Job, JobStage
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec, MetricsDelta, SubmitOutcome, SubmitResult
from app.main import Runtime

PRODUCT = "acme"
OTHER_PRODUCT = "globex"
WORKER = WorkerProfile("worker-1")
TRANSITION = "transition_job"


@pytest.fixture
async def runtime(make_runtime: Any, make_token: Any) -> Runtime:
    await make_token(PRODUCT, Role.MEMBER)
    await make_token(OTHER_PRODUCT, Role.MEMBER)
    result: Runtime = await make_runtime()
    return result


async def submit(rt: Runtime, product: str = PRODUCT, **fields: Any) -> SubmitResult:
    fields.setdefault("title", "a job")
    fields.setdefault("body_md", "do the thing")
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.fleet.submit_job(session, product, JobSpec(**fields))


async def fleet_write(rt: Runtime, call: str, *args: Any, product: str = PRODUCT,
                      **options: Any) -> Any:
    """`services.fleet.<call>(session, product, *args)` in a unit of work of its own."""
    async with rt.services.db.unit_of_work() as session:
        return await getattr(rt.services.fleet, call)(session, product, *args, **options)


async def claim(rt: Runtime, worker: WorkerProfile = WORKER, **options: Any) -> Job | None:
    job: Job | None = await fleet_write(rt, "claim_next_job", worker, **options)
    return job


async def transition(rt: Runtime, job_id: int, fence: int, to: JobStage, **options: Any) -> Job:
    job: Job = await fleet_write(rt, TRANSITION, job_id, fence, to, **options)
    return job


async def load(rt: Runtime, job_id: int) -> Job:
    async with rt.services.db.read() as session:
        return await rt.services.fleet.get_job(session, PRODUCT, job_id)


async def count_rows(rt: Runtime, table: str) -> int:
    async with rt.services.db.read() as session:
        return int((await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def job_state(rt: Runtime, job_id: int) -> tuple[Any, ...]:
    """Everything a refused call must leave exactly as it was, and the event count."""
    job = await load(rt, job_id)
    return (job.stage, job.lease_fence, job.attempts, job.lease_worker_id,
            job.lease_expires_at, job.updated_at, job.cost_usd, job.tokens_in,
            job.tokens_out, job.failure_reason, await count_rows(rt, "events"))


async def assert_refused(
    rt: Runtime, call: str, job_id: int, *args: Any, match: str | None = None, **options: Any
) -> None:
    """`fleet.<call>(job_id, …)` is a CONFLICT and leaves the job and the log as they were."""
    before = await job_state(rt, job_id)
    with pytest.raises(ConflictError, match=match):
        await fleet_write(rt, call, job_id, *args, **options)
    assert await job_state(rt, job_id) == before, (call, args)


async def claim_with_expired_lease(rt: Runtime, job_id: int) -> Job:
    """Claim `job_id` under a lease that ran out 29 minutes ago (the job, and any
    backoff it had, are moved an hour into the past first)."""
    an_hour_ago = utcnow() - timedelta(hours=1)
    async with rt.services.db.unit_of_work() as session:
        await session.execute(
            update(Job).where(Job.id == job_id).values(
                queued_at=an_hour_ago, created_at=an_hour_ago, not_before=None)
        )
    job = await claim(rt, now=utcnow() - timedelta(minutes=30), lease_seconds=60)
    assert job is not None
    assert job.id == job_id
    assert job.lease_expires_at is not None
    assert job.lease_expires_at < utcnow()
    return job


async def test_submit_is_idempotent_on_product_and_key(runtime: Runtime) -> None:
    first = await submit(runtime, idempotency_key="build-42", title="original")
    jobs, events = await count_rows(runtime, "jobs"), await count_rows(runtime, "events")

    again = await submit(runtime, idempotency_key="build-42", title="a different title")

    assert first.outcome == SubmitOutcome.CREATED
    assert again.outcome == SubmitOutcome.DEDUPED
    assert again.job.id == first.job.id
    assert again.job.title == "original"
    assert (await count_rows(runtime, "jobs"), await count_rows(runtime, "events")) == (
        jobs, events)
    # the same key in another product is another job
    foreign = await submit(runtime, OTHER_PRODUCT, idempotency_key="build-42")
    assert foreign.outcome == SubmitOutcome.CREATED
    assert foreign.job.id != first.job.id


async def test_claim_takes_a_fresh_lease_and_the_fence_grows_every_time(
    runtime: Runtime,
) -> None:
    job = (await submit(runtime)).job
    assert (job.lease_fence, job.attempts) == (0, 0)

    first = await claim_with_expired_lease(runtime, job.id)
    assert (first.stage, first.lease_fence, first.attempts) == (JobStage.ASSIGNED, 1, 1)
    assert (await runtime.loops.reap_once()).requeued == (job.id,)
    requeued = await load(runtime, job.id)
    assert (requeued.stage, requeued.lease_fence) == (JobStage.QUEUED, 2)

    before = utcnow()
    second = await claim(runtime, lease_seconds=120)
    after = utcnow()
    assert second is not None
    stored = await load(runtime, job.id)
    assert stored.lease_fence == 3 > requeued.lease_fence > first.lease_fence
    assert (stored.stage, stored.attempts, stored.lease_worker_id) == (
        JobStage.ASSIGNED, 2, WORKER.worker_id)
    assert stored.lease_expires_at is not None
    assert before + timedelta(seconds=120) <= stored.lease_expires_at
    assert stored.lease_expires_at <= after + timedelta(seconds=120)
    assert await claim(runtime) is None  # nothing else is queued

    await submit(runtime)
    before = utcnow()
    default = await claim(runtime)  # no lease length given: the settings' one
    assert default is not None
    assert default.lease_expires_at is not None
    lease = timedelta(seconds=runtime.services.settings.lease_seconds)
    assert before + lease <= default.lease_expires_at <= utcnow() + lease


async def test_twenty_concurrent_claimers_take_every_job_exactly_once(
    runtime: Runtime,
) -> None:
    async with runtime.services.db.unit_of_work() as session:
        for number in range(100):
            await runtime.services.fleet.submit_job(
                session, PRODUCT, JobSpec(title=f"job {number}", body_md="work")
            )
    claims: list[tuple[str, int]] = []

    async def claimer(worker_id: str) -> None:
        worker = WorkerProfile(worker_id)
        while True:
            async with runtime.services.db.unit_of_work() as session:
                job = await runtime.services.fleet.claim_next_job(session, PRODUCT, worker)
            if job is None:
                return
            claims.append((worker_id, job.id))

    await asyncio.wait_for(
        asyncio.gather(*(claimer(f"worker-{n}") for n in range(20))), timeout=120
    )

    assert len(claims) == 100
    claimed_ids = [job_id for _, job_id in claims]
    assert len(set(claimed_ids)) == 100
    async with runtime.services.db.read() as session:
        page = await runtime.services.fleet.list_jobs(session, PRODUCT, first=200)
    assert {job.id for job in page.nodes} == set(claimed_ids)
    holder = dict((job_id, worker_id) for worker_id, job_id in claims)
    for job in page.nodes:
        assert (job.stage, job.attempts, job.lease_fence) == (JobStage.ASSIGNED, 1, 1)
        assert job.lease_worker_id == holder[job.id]


async def test_stale_fence_expired_lease_and_illegal_moves_conflict_and_change_nothing(
    runtime: Runtime,
) -> None:
    metrics = MetricsDelta(cost_usd=1.5, tokens_in=10, tokens_out=5)
    job = (await submit(runtime)).job
    leased = await claim(runtime)
    assert leased is not None
    fence = leased.lease_fence
    refused: list[tuple[int, JobStage]] = [
        (fence - 1, JobStage.BUILDING),  # stale fence
        (fence + 1, JobStage.BUILDING),  # a fence from the future is no better
        (fence, JobStage.QUEUED),  # ASSIGNED → QUEUED
        (fence, JobStage.CANCELLED),  # only a member cancels
        (fence, JobStage.ASSIGNED),  # ASSIGNED → ASSIGNED
    ]
    for stale_or_current, target in refused:
        await assert_refused(runtime, TRANSITION, job.id, stale_or_current, target,
                             metrics=metrics)
    await transition(runtime, job.id, fence, JobStage.BUILDING)
    await assert_refused(runtime, TRANSITION, job.id, fence, JobStage.ASSIGNED, metrics=metrics)
    await transition(runtime, job.id, fence, JobStage.SHIPPED)
    await assert_refused(runtime, TRANSITION, job.id, fence, JobStage.BUILDING, metrics=metrics)
    await assert_refused(runtime, "heartbeat", job.id, fence)

    expired = (await submit(runtime)).job
    lease = await claim_with_expired_lease(runtime, expired.id)
    await assert_refused(runtime, TRANSITION, expired.id, lease.lease_fence, JobStage.BUILDING,
                         metrics=metrics, match="expired")
    await assert_refused(runtime, "heartbeat", expired.id, lease.lease_fence, match="expired")


async def test_heartbeat_extends_the_lease_and_refuses_a_stale_fence(runtime: Runtime) -> None:
    await submit(runtime)
    job = await claim(runtime, lease_seconds=60)
    assert job is not None
    assert job.lease_expires_at is not None
    first_expiry = job.lease_expires_at

    before = utcnow()
    beaten = await fleet_write(runtime, "heartbeat", job.id, job.lease_fence, lease_seconds=900)
    stored = await load(runtime, job.id)
    assert stored.lease_expires_at == beaten.lease_expires_at
    assert stored.lease_expires_at is not None
    assert stored.lease_expires_at > first_expiry
    assert stored.lease_expires_at >= before + timedelta(seconds=900)
    assert (stored.stage, stored.lease_fence, stored.attempts) == (JobStage.ASSIGNED, 1, 1)

    await assert_refused(runtime, "heartbeat", job.id, job.lease_fence - 1,
                         lease_seconds=3_600, match="stale fence")


async def test_transition_metrics_add_up_to_totals(runtime: Runtime) -> None:
    job = (await submit(runtime)).job
    leased = await claim(runtime)
    assert leased is not None
    fence = leased.lease_fence
    await transition(runtime, job.id, fence, JobStage.BUILDING,
                     metrics=MetricsDelta(cost_usd=0.25, tokens_in=1000, tokens_out=200))
    await transition(runtime, job.id, fence, JobStage.REVIEW,
                     metrics=MetricsDelta(cost_usd=0.5, tokens_in=30, tokens_out=7))
    await transition(runtime, job.id, fence, JobStage.BUILDING)  # rework
    shipped = await transition(runtime, job.id, fence, JobStage.SHIPPED,
                               metrics=MetricsDelta(cost_usd=0.125, tokens_in=1))
    stored = await load(runtime, job.id)
    assert stored.cost_usd == pytest.approx(0.875)
    assert (stored.tokens_in, stored.tokens_out) == (1031, 207)
    assert (stored.stage, shipped.stage) == (JobStage.SHIPPED, JobStage.SHIPPED)
    assert stored.finished_at is not None
    assert stored.lease_worker_id is None


async def test_retryable_failure_requeues_with_backoff_and_a_higher_fence(
    make_runtime: Any, make_token: Any
) -> None:
    await make_token(PRODUCT, Role.MEMBER)
    rt: Runtime = await make_runtime(retry_backoff_seconds=30.0)
    job = (await submit(rt, max_attempts=2)).job
    leased = await claim(rt)
    assert leased is not None

    failed_at = utcnow()
    requeued = await transition(rt, job.id, leased.lease_fence, JobStage.FAILED,
                                reason="flaky network", retryable=True)
    stored = await load(rt, job.id)
    assert requeued.stage == stored.stage == JobStage.QUEUED
    assert stored.lease_fence == leased.lease_fence + 1
    assert (stored.lease_worker_id, stored.lease_expires_at) == (None, None)
    assert stored.not_before is not None
    # equal jitter (the default): somewhere in [½·backoff, backoff]
    assert failed_at + timedelta(seconds=15) <= stored.not_before
    assert stored.not_before <= utcnow() + timedelta(seconds=30)
    assert stored.failure_reason == "flaky network"

    await assert_refused(rt, TRANSITION, job.id, leased.lease_fence, JobStage.BUILDING)
    assert await claim(rt) is None  # still backing off

    second = await claim(rt, now=stored.not_before + timedelta(seconds=1))
    assert second is not None
    assert (second.attempts, second.lease_fence) == (2, leased.lease_fence + 2)
    exhausted = await transition(rt, job.id, second.lease_fence, JobStage.FAILED,
                                 retryable=True)
    assert exhausted.stage == JobStage.FAILED
    assert (await load(rt, job.id)).stage == JobStage.FAILED

    # not retryable: FAILED at once, attempts to spare or not
    other = (await submit(rt, max_attempts=5)).job
    leased = await claim(rt)
    assert leased is not None
    await transition(rt, other.id, leased.lease_fence, JobStage.BUILDING)
    await transition(rt, other.id, leased.lease_fence, JobStage.FAILED, reason="broken")
    stored = await load(rt, other.id)
    assert (stored.stage, stored.attempts, stored.failure_reason) == (
        JobStage.FAILED, 1, "broken")
    assert stored.finished_at is not None
    assert await claim(rt) is None


async def test_reaper_requeues_an_expired_lease_and_fails_when_attempts_are_used_up(
    runtime: Runtime,
) -> None:
    again = (await submit(runtime, max_attempts=2, title="gets another go")).job
    lease = await claim_with_expired_lease(runtime, again.id)
    live = (await submit(runtime, title="healthy lease")).job
    live_lease = await claim(runtime)
    assert live_lease is not None
    assert live_lease.id == live.id

    reaped = await runtime.loops.reap_once()
    assert (reaped.requeued, reaped.failed) == ((again.id,), ())
    requeued = await load(runtime, again.id)
    assert requeued.stage == JobStage.QUEUED
    assert requeued.lease_fence > lease.lease_fence
    assert requeued.lease_worker_id is None
    assert (await load(runtime, live.id)).stage == JobStage.ASSIGNED  # untouched
    await assert_refused(runtime, TRANSITION, again.id, lease.lease_fence, JobStage.BUILDING)

    last = await claim_with_expired_lease(runtime, again.id)
    assert last.attempts == 2
    reaped = await runtime.loops.reap_once()
    assert (reaped.requeued, reaped.failed) == ((), (again.id,))
    ended = await load(runtime, again.id)
    assert (ended.stage, ended.failure_reason) == (JobStage.FAILED, "lease expired")
    assert (await runtime.loops.reap_once()).requeued == ()


async def test_cancel_any_job_that_has_not_ended(runtime: Runtime) -> None:
    queued = (await submit(runtime, title="queued")).job
    assert (await fleet_write(runtime, "cancel_job", queued.id)).stage == JobStage.CANCELLED

    held = (await submit(runtime, title="held")).job
    lease = await claim(runtime)
    assert lease is not None
    assert lease.id == held.id
    await transition(runtime, held.id, lease.lease_fence, JobStage.BUILDING)
    cancelled = await fleet_write(runtime, "cancel_job", held.id)
    assert cancelled.stage == JobStage.CANCELLED
    assert cancelled.lease_fence > lease.lease_fence
    await assert_refused(runtime, TRANSITION, held.id, lease.lease_fence, JobStage.SHIPPED)
    await assert_refused(runtime, "heartbeat", held.id, lease.lease_fence)

    shipped = (await submit(runtime, title="shipped")).job
    ship_lease = await claim(runtime)
    assert ship_lease is not None
    await transition(runtime, shipped.id, ship_lease.lease_fence, JobStage.SHIPPED)
    for ended in (queued.id, held.id, shipped.id):
        await assert_refused(runtime, "cancel_job", ended)


async def test_retry_requeues_failed_and_cancelled_jobs_with_fresh_attempts(
    runtime: Runtime,
) -> None:
    failing = (await submit(runtime, max_attempts=1, title="fails")).job
    lease = await claim(runtime)
    assert lease is not None
    await transition(runtime, failing.id, lease.lease_fence, JobStage.FAILED, reason="boom")
    cancelled = (await submit(runtime, title="cancelled")).job
    await fleet_write(runtime, "cancel_job", cancelled.id)

    for job_id in (failing.id, cancelled.id):
        retried = await fleet_write(runtime, "retry_job", job_id)
        stored = await load(runtime, job_id)
        assert retried.stage == stored.stage == JobStage.QUEUED
        assert (stored.attempts, stored.failure_reason, stored.finished_at) == (0, None, None)
    again = await claim(runtime)
    assert again is not None
    assert again.id == failing.id
    assert (again.attempts, again.lease_fence) == (1, lease.lease_fence + 1)

    shipped = await claim(runtime)
    assert shipped is not None
    await transition(runtime, shipped.id, shipped.lease_fence, JobStage.SHIPPED)
    still_queued = (await submit(runtime, title="waiting")).job
    for job_id in (still_queued.id, shipped.id):
        await assert_refused(runtime, "retry_job", job_id)


async def test_another_product_cannot_see_or_touch_our_jobs(runtime: Runtime) -> None:
    ours = (await submit(runtime, idempotency_key="mine")).job
    foreign_worker = WorkerProfile("foreign")
    assert await claim(runtime, foreign_worker, product=OTHER_PRODUCT) is None

    lease = await claim(runtime)
    assert lease is not None
    before = await job_state(runtime, ours.id)
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("get_job", ()), (TRANSITION, (lease.lease_fence, JobStage.BUILDING)),
        ("heartbeat", (lease.lease_fence,)), ("cancel_job", ()), ("retry_job", ()),
    ]
    for call, args in calls:
        with pytest.raises(NotFoundError):
            await fleet_write(runtime, call, ours.id, *args, product=OTHER_PRODUCT)
    assert (await fleet_write(runtime, "list_jobs", product=OTHER_PRODUCT)).nodes == []
    assert await job_state(runtime, ours.id) == before

    # a job of the other product is theirs alone, and our worker never gets it
    theirs = (await submit(runtime, OTHER_PRODUCT)).job
    assert await claim(runtime) is None
    taken = await claim(runtime, foreign_worker, product=OTHER_PRODUCT)
    assert taken is not None
    assert taken.id == theirs.id
    assert await claim(runtime, foreign_worker, product=OTHER_PRODUCT) is None


async def test_jobs_failing_together_come_back_spread_out(
    make_runtime: Any, make_token: Any
) -> None:
    """Jittered backoff (issue 11): 40 jobs failed at once do not all retry at +2.000 s."""
    await make_token(PRODUCT, Role.MEMBER)
    rt: Runtime = await make_runtime(retry_backoff_seconds=2.0)
    for n in range(40):
        await submit(rt, title=f"job {n}")
    held = [job for job in [await claim(rt) for _ in range(40)] if job is not None]
    assert len(held) == 40
    delays = []
    for job in held:
        async with rt.services.db.unit_of_work() as session:
            failed_at = await database_now(session)
            requeued = await rt.services.fleet.transition_job(
                session, PRODUCT, job.id, job.lease_fence, JobStage.FAILED, retryable=True
            )
            assert requeued.not_before is not None
            delays.append((requeued.not_before - failed_at).total_seconds())
    assert all(0.9 <= delay <= 2.1 for delay in delays), delays
    assert len({round(delay, 3) for delay in delays}) > 30
    assert max(delays) - min(delays) > 0.5
