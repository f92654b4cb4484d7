"""Fleet coordination: submit, claim, lease, transition, cancel, retry, reap.

Services take an `AsyncSession` and never commit; the caller's unit of work does.
A refused call changes nothing.

The lease holder's calls — claim, transition, heartbeat, release — take the lean
path of `app.fleet.cycle` first: a few fixed statements, the checks in the WHERE of a
conditional UPDATE (issue 12 §4).  When that UPDATE matches no row, or for a
retryable failure (whose backoff is drawn in Python), they take the general path
below: lock and read the job, check in Python, raise the reason (NOT_FOUND,
CONFLICT) or apply the change with the ORM.  Both paths give the same results.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import database_now
from app.errors import BadUserInputError, ConflictError, NotFoundError
from app.fleet import cycle, repository
from app.fleet.models import Job, JobStage
from app.fleet.moves import (
    cancel,
    finish,
    held_job,
    locked_job,
    record_stage,
    release,
    requeue,
)
from app.fleet.records import (
    FleetPolicy,
    JobSpec,
    MetricsDelta,
    ReapResult,
    SubmitOutcome,
    SubmitResult,
)
from app.fleet.scheduler import WorkerProfile, select_job
from app.fleet.stages import BUDGET_EXCEEDED_REASON, can_worker_move, is_terminal, over_budget
from app.lone import lone_unit
from app.pagination import Page, decode_cursor, make_page
from app.tracker import repository as tracker_repository
from app.tracker.models import ItemStatus

JOB_CURSOR = "job"
REAPED_REASON = "lease expired"
ITEM_CANCELLED_REASON = "item cancelled"
__all__ = [
    "FleetPolicy", "FleetService", "JobSpec", "MetricsDelta", "ReapResult", "SubmitOutcome",
    "SubmitResult",
]


CandidateSource = Callable[[AsyncSession, str, WorkerProfile, datetime], Awaitable[Sequence[Job]]]


class FleetService:
    """`candidates` finds the jobs the scheduler chooses among when a worker claims;
    by default (None) the claim reads the head of each priority's queue in one
    statement (`cycle.claim_job`).  The benchmark swaps in a naive source
    (`repository.claim_candidates` is the same choice through the ORM)."""

    def __init__(
        self, policy: FleetPolicy, *, candidates: CandidateSource | None = None
    ) -> None:
        self.policy = policy
        self.candidates = candidates
        self._random = random.Random()

    # -- reads ---------------------------------------------------------------

    async def get_job(self, session: AsyncSession, product_id: str, job_id: int) -> Job:
        job = await repository.get_job(session, product_id, job_id)
        if job is None:
            raise NotFoundError("job", job_id)
        return job

    async def list_jobs(
        self,
        session: AsyncSession,
        product_id: str,
        *,
        stage: JobStage | None = None,
        tracker_item_id: int | None = None,
        first: int = 50,
        after: str | None = None,
    ) -> Page[Job]:
        rows = await repository.list_jobs(
            session, product_id, stage=stage, tracker_item_id=tracker_item_id,
            after_id=decode_cursor(JOB_CURSOR, after), limit=first + 1,
        )
        return make_page(JOB_CURSOR, rows, first, lambda job: job.id, after=after)

    async def first_job_pages(
        self, session: AsyncSession, product_id: str, item_ids: Sequence[int], *, first: int
    ) -> dict[int, Page[Job]]:
        """The first page (oldest first, `first` jobs) of the jobs linked to each of
        `item_ids`, in one query: `Item.jobs` of a list of items (DESIGN §6)."""
        rows = await repository.first_jobs_of_items(session, product_id, item_ids,
                                                    limit=first + 1)
        by_item: dict[int, list[Job]] = {item_id: [] for item_id in item_ids}
        for row in rows:
            if row.tracker_item_id is not None:
                by_item[row.tracker_item_id].append(row)
        return {
            item_id: make_page(JOB_CURSOR, jobs, first, lambda job: job.id)
            for item_id, jobs in by_item.items()
        }

    # -- submit --------------------------------------------------------------

    async def submit_job(
        self, session: AsyncSession, product_id: str, spec: JobSpec
    ) -> SubmitResult:
        """Create a job, or return the one already submitted under the same key.

        Raises BAD_USER_INPUT (`budget`) for a budget that is not > 0, NOT_FOUND for
        an unknown tracker item and CONFLICT for a new job on a CANCELLED item
        (DESIGN §2 and §4).
        """
        if spec.budget is not None and not spec.budget > 0:
            raise BadUserInputError("budget", "must be greater than 0 (USD)")
        if spec.idempotency_key is not None:
            existing = await repository.get_by_idempotency_key(
                session, product_id, spec.idempotency_key
            )
            if existing is not None:
                return SubmitResult(existing, SubmitOutcome.DEDUPED)
        if spec.tracker_item_id is not None:
            item = await tracker_repository.get_item(session, product_id, spec.tracker_item_id)
            if item is None:
                raise NotFoundError("item", spec.tracker_item_id)
            if item.status == ItemStatus.CANCELLED:
                raise ConflictError(f"item {item.id} is CANCELLED; it takes no new jobs")

        now = await self._clock(session)
        job = Job(
            product_id=product_id, title=spec.title, body_md=spec.body_md, kind=spec.kind,
            stage=JobStage.QUEUED, priority=spec.priority, capabilities=list(spec.capabilities),
            engine_class=spec.engine_class, profile=spec.profile, budget=spec.budget,
            attempts=0, max_attempts=spec.max_attempts, tracker_item_id=spec.tracker_item_id,
            idempotency_key=spec.idempotency_key, lease_fence=0, queued_at=now,
            created_at=now, updated_at=now,
        )
        try:
            async with session.begin_nested():
                session.add(job)
                await session.flush()
        except IntegrityError:
            # A concurrent submit with the same key won the race (PostgreSQL).
            if spec.idempotency_key is None:
                raise
            existing = await repository.get_by_idempotency_key(
                session, product_id, spec.idempotency_key
            )
            if existing is None:
                raise
            return SubmitResult(existing, SubmitOutcome.DEDUPED)
        await record_stage(session, job, None)
        return SubmitResult(job, SubmitOutcome.CREATED)

    # -- the lease holder's calls -------------------------------------------

    async def claim_next_job(
        self,
        session: AsyncSession,
        product_id: str,
        worker: WorkerProfile,
        *,
        lease_seconds: int | None = None,
        now: datetime | None = None,
    ) -> Job | None:
        """Give `worker` the job the scheduler picks, under a new lease; None if none.

        The heads of the queues (at most one per priority) are read — and on
        PostgreSQL locked, `SKIP LOCKED` — in one statement that also reads the
        database clock; `select_job` (DESIGN §3, aging included) chooses among them;
        one UPDATE … RETURNING assigns the job (DESIGN §2: ASSIGNED, attempts + 1,
        fence + 1, lease of `lease_seconds` or the policy's) and appends its event.
        `now` (aware UTC) replaces the clock (tests).
        """
        seconds = lease_seconds or self.policy.lease_seconds
        if self.candidates is None:
            return await cycle.claim_job(session, product_id, worker, now=now,
                                         lease_seconds=seconds,
                                         aging_seconds=self.policy.aging_seconds,
                                         echo=self._echo_reads(session))
        now = now or await self._clock(session)
        heads = [repository.to_candidate(job)
                 for job in await self.candidates(session, product_id, worker, now)]
        chosen = select_job(heads, worker, now, self.policy.aging_seconds)
        if chosen is None:
            return None
        return await cycle.assign(session, product_id, chosen.id, worker.worker_id, now=now,
                                  lease_seconds=seconds)

    async def heartbeat(
        self, session: AsyncSession, product_id: str, job_id: int, fence: int,
        *, lease_seconds: int | None = None,
    ) -> Job:
        """Extend the lease held by `fence` to now + `lease_seconds` (the policy's when
        None).  NOT_FOUND outside the product; CONFLICT for a job that holds no lease,
        a stale fence or an expired lease (DESIGN §2)."""
        seconds = lease_seconds or self.policy.lease_seconds
        beaten = await cycle.heartbeat(session, product_id, job_id, fence, seconds)
        if beaten is not None:
            return beaten
        now = await self._clock(session)
        job = await held_job(session, product_id, job_id, fence, now)
        job.lease_expires_at = now + timedelta(seconds=lease_seconds or self.policy.lease_seconds)
        job.updated_at = now
        await session.flush()
        return job

    async def transition_job(
        self,
        session: AsyncSession,
        product_id: str,
        job_id: int,
        fence: int,
        to: JobStage,
        *,
        metrics: MetricsDelta | None = None,
        reason: str | None = None,
        retryable: bool = False,
    ) -> Job:
        """Move a held job along the stage graph, adding `metrics` to its totals.

        A job whose cost total goes over its budget ends FAILED (`budget exceeded`,
        not retryable) in this transition, whatever `to` asked for; the lease ends
        with it.  CONFLICT for a stale fence, an expired lease or a move outside the
        graph (DESIGN §2, §4); NOT_FOUND outside the product.
        """
        if not (to == JobStage.FAILED and retryable):
            delta = metrics or MetricsDelta()
            moved = await cycle.transition(
                session, product_id, job_id, fence, to, cost_usd=delta.cost_usd,
                tokens_in=delta.tokens_in, tokens_out=delta.tokens_out, reason=reason,
                echo=self._echo_reads(session))
            if moved is not None:
                return moved
        now = await self._clock(session)
        job = await held_job(session, product_id, job_id, fence, now)
        if not can_worker_move(job.stage, to):
            raise ConflictError(f"a job may not move from {job.stage.value} to {to.value}")
        if metrics is not None:
            job.cost_usd += metrics.cost_usd
            job.tokens_in += metrics.tokens_in
            job.tokens_out += metrics.tokens_out
        source = job.stage
        if over_budget(job.cost_usd, job.budget):
            job.failure_reason = BUDGET_EXCEEDED_REASON
            finish(job, JobStage.FAILED, now)
        elif to == JobStage.FAILED:
            job.failure_reason = reason
            if retryable and job.attempts < job.max_attempts:
                requeue(job, now, self.policy, self._random.random())
            else:
                finish(job, JobStage.FAILED, now)
        elif to == JobStage.SHIPPED:
            finish(job, JobStage.SHIPPED, now)
        else:
            job.stage = to
            job.updated_at = now
        await record_stage(session, job, source)
        return job

    async def release_job(
        self, session: AsyncSession, product_id: str, job_id: int, fence: int,
        reason: str | None = None,
    ) -> Job:
        """The lease holder gives its job back unfinished (the worker was stopped, or its
        command could not start): QUEUED at once (no backoff), fence raised so the old
        lease can no longer write, and the claim's attempt is not counted (`attempts`
        goes back down by one).  It keeps its place in the queue (`queued_at` is
        unchanged, so its aging goes on).  `reason` is kept in `failureReason`.  One stage-change
        event, as for any other.  Raises NotFoundError (not in the product) and
        ConflictError (no lease, stale fence, expired lease).  Issue 10 item 3."""
        released = await cycle.release(session, product_id, job_id, fence, reason)
        if released is not None:
            return released
        now = await self._clock(session)
        job = await held_job(session, product_id, job_id, fence, now)
        source = job.stage
        release(job, now, reason)
        await record_stage(session, job, source)
        return job

    # -- a member's calls ----------------------------------------------------

    async def cancel_job(
        self, session: AsyncSession, product_id: str, job_id: int, reason: str | None = None
    ) -> Job:
        job = await locked_job(session, product_id, job_id)
        if is_terminal(job.stage):
            raise ConflictError(f"job {job_id} has already ended ({job.stage.value})")
        await cancel(session, job, reason, await self._clock(session))
        return job

    async def cancel_jobs_of_item(
        self, session: AsyncSession, product_id: str, item_id: int,
        reason: str = ITEM_CANCELLED_REASON,
    ) -> list[Job]:
        """Cancel every job of tracker item `item_id` that has not ended (oldest
        first), each as `cancel_job` does: fence raised, one event per job.  Returns
        the jobs cancelled (DESIGN §4, "Tracker → fleet")."""
        now = await self._clock(session)
        jobs = list(await repository.open_jobs_of_item(session, product_id, item_id))
        for job in jobs:
            await cancel(session, job, reason, now)
        return jobs

    async def retry_job(self, session: AsyncSession, product_id: str, job_id: int) -> Job:
        """Queue a FAILED or CANCELLED job again, with a fresh allowance of attempts."""
        job = await locked_job(session, product_id, job_id)
        if job.stage not in (JobStage.FAILED, JobStage.CANCELLED):
            raise ConflictError(
                f"only FAILED or CANCELLED jobs can be retried, not {job.stage.value}"
            )
        if job.tracker_item_id is not None:
            item = await tracker_repository.get_item(session, product_id, job.tracker_item_id)
            if item is not None and item.status == ItemStatus.CANCELLED:
                raise ConflictError(f"item {item.id} is CANCELLED; its jobs cannot be retried")
        source = job.stage
        job.echoed_stage = None  # the retried run ends again: its end is echoed anew
        now = await self._clock(session)
        job.stage = JobStage.QUEUED
        job.attempts = 0
        job.failure_reason = None
        job.finished_at = None
        job.not_before = None
        job.queued_at = now
        job.updated_at = now
        await record_stage(session, job, source)
        return job

    # -- background ----------------------------------------------------------

    async def reap_expired_leases(self, session: AsyncSession, *, limit: int = 100) -> ReapResult:
        """Requeue (with backoff and a higher fence) or fail every job whose lease ran out."""
        now = await self._clock(session)
        requeued: list[int] = []
        failed: list[int] = []
        for job in await repository.expired_leases(session, now, limit):
            source = job.stage
            job.failure_reason = REAPED_REASON
            if job.attempts < job.max_attempts:
                requeue(job, now, self.policy, self._random.random())
                requeued.append(job.id)
            else:
                finish(job, JobStage.FAILED, now)
                failed.append(job.id)
            await record_stage(session, job, source)
        return ReapResult(requeued=tuple(requeued), failed=tuple(failed))

    # -- helpers -------------------------------------------------------------

    def _echo_reads(self, session: AsyncSession) -> bool:
        """The change reads its job's item for the echo (`EventRecord.seen`): with
        FLEET_TRACKER_ECHO on, and only as a unit of work of this one call — whose
        commit then shows exactly what the change read."""
        return self.policy.echo_reads and lone_unit(session) is not None

    @staticmethod
    async def _clock(session: AsyncSession) -> datetime:
        """Now, by the one clock every instance shares (`app.db.database_now`): lease
        expiry, heartbeats, backoff (`notBefore`), aging and the reaper all use it
        (DESIGN §8).  Read once per call, so one unit of work sees one instant."""
        return await database_now(session)
