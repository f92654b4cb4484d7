"""The lean lease-holder path (app.fleet.cycle, issue 12 §4) on both stores.

* every refusal comes from the conditional UPDATE matching nothing, and the reason
  found afterwards is the same NOT_FOUND / CONFLICT as ever; nothing changes, the
  product's event sequence included, even when the caller's transaction goes on;
* the budget rule runs inside the transition's statement (one statement on
  PostgreSQL);
* the jobs and events the lean statements return are exactly the stored rows;
* under concurrent claimers on PostgreSQL the event sequence stays gap-free, in
  order per job, and reaches another instance's live stream whole.

Statements are counted with a SQLAlchemy `before_cursor_execute` listener on the
runtime's own engine (nothing is mocked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, func, select, update

from app.auth.models import Product, Role
from app.db import utcnow
from app.errors import ConflictError, NotFoundError
from app.events.models import Event, EventType
from app.events.outbox import EventRecord
from app.events.service import JOB_STAGE_EVENTS, filter_for
from app.fleet.change_groups import STATS
from app.fleet.models import Job, JobStage
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec, MetricsDelta
from app.main import Runtime

PRODUCT = "acme"
OTHER = "globex"
WORKER = WorkerProfile("worker-1")
DEADLINE = 20.0


@contextmanager
def statements(rt: Runtime) -> Iterator[list[str]]:
    """The SQL statements the runtime's engine sends meanwhile."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split()))

    engine = rt.services.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


async def call(rt: Runtime, name: str, *args: Any, product: str = PRODUCT, **kw: Any) -> Any:
    async with rt.services.db.unit_of_work() as session:
        return await getattr(rt.services.fleet, name)(session, product, *args, **kw)


async def submit(rt: Runtime, product: str = PRODUCT, **fields: Any) -> Job:
    fields.setdefault("title", "a job")
    fields.setdefault("body_md", "do the thing")
    job: Job = (await call(rt, "submit_job", JobSpec(**fields), product=product)).job
    return job


async def claim(rt: Runtime, **options: Any) -> Job:
    job: Job | None = await call(rt, "claim_next_job", WORKER, **options)
    assert job is not None
    return job


async def load(rt: Runtime, job_id: int, product: str = PRODUCT) -> Job:
    async with rt.services.db.read() as session:
        return await rt.services.fleet.get_job(session, product, job_id)


def columns(job: Job) -> dict[str, Any]:
    return {col.key: getattr(job, col.key) for col in Job.__table__.columns}


async def last_seq(rt: Runtime, product: str = PRODUCT) -> int:
    async with rt.services.db.read() as session:
        stmt = select(Product.last_event_seq).where(Product.id == product)
        return int((await session.execute(stmt)).scalar_one())


async def stored_events(rt: Runtime, product: str = PRODUCT) -> list[EventRecord]:
    async with rt.services.db.read() as session:
        rows = await session.execute(
            select(Event).where(Event.product_id == product).order_by(Event.seq))
        return [EventRecord.from_model(row) for row in rows.scalars()]


def lean_writes(sent: list[str]) -> list[str]:
    """The lean path's conditional UPDATEs of a job among `sent`."""
    return [sql for sql in sent if "jobs.lease_fence = " in sql and "UPDATE jobs SET" in sql]


def lean_tried(sent: list[str]) -> bool:
    """The lean path ran: its UPDATE, or on SQLite the sequence bump that reads the
    job's stage first (no such job: no UPDATE)."""
    return bool(lean_writes(sent)) or any("(SELECT stage FROM jobs" in sql for sql in sent)


async def expire_lease(rt: Runtime, job_id: int) -> None:
    async with rt.services.db.unit_of_work() as session:
        await session.execute(update(Job).where(Job.id == job_id).values(
            lease_expires_at=utcnow() - timedelta(minutes=1)))


# -- refusals -------------------------------------------------------------------

B, A, Q = JobStage.BUILDING, JobStage.ASSIGNED, JobStage.QUEUED
REFUSALS = [
    # (call, how the job is prepared, fence offset, target stage, error, message)
    ("transition_job", "held", -1, B, ConflictError, "stale fence 0; the current fence is 1"),
    ("heartbeat", "held", +1, None, ConflictError, "stale fence 2; the current fence is 1"),
    ("transition_job", "expired", 0, B, ConflictError, "lease on job .* has expired"),
    ("release_job", "expired", 0, None, ConflictError, "has expired"),
    ("heartbeat", "expired", 0, None, ConflictError, "has expired"),
    ("transition_job", "queued", 0, B, ConflictError, "is QUEUED; no lease is held"),
    ("heartbeat", "shipped", 0, None, ConflictError, "is SHIPPED; no lease is held"),
    ("release_job", "shipped", 0, None, ConflictError, "is SHIPPED; no lease is held"),
    ("transition_job", "building", 0, A, ConflictError, "may not move from BUILDING to ASSIGNED"),
    ("transition_job", "held", 0, Q, ConflictError, "may not move from ASSIGNED to QUEUED"),
    ("transition_job", "foreign", 0, B, NotFoundError, "job"),
    ("release_job", "missing", 0, None, NotFoundError, "job"),
]


@pytest.mark.parametrize(
    ("call_name", "prepared", "offset", "to", "error", "message"), REFUSALS,
    ids=[f"{case[0]}-{case[1]}-{case[-1][:20]}" for case in REFUSALS],
)
async def test_a_refusal_is_found_after_the_update_matched_nothing_and_changes_nothing(
    runtime: Runtime, call_name: str, prepared: str, offset: int, to: JobStage | None,
    error: type[Exception], message: str,
) -> None:
    job = await submit(runtime)
    fence = 1 if prepared == "queued" else (await claim(runtime)).lease_fence
    if prepared == "expired":
        await expire_lease(runtime, job.id)
    if prepared in ("building", "shipped"):
        stage = JobStage.BUILDING if prepared == "building" else JobStage.SHIPPED
        await call(runtime, "transition_job", job.id, fence, stage)
    job_id = {"foreign": (await submit(runtime, OTHER)).id,
              "missing": job.id + 1_000}.get(prepared, job.id)
    args: tuple[Any, ...] = (job_id, fence + offset) + (() if to is None else (to,))
    before = columns(await load(runtime, job.id))
    events, seq = await stored_events(runtime), await last_seq(runtime)

    # The caller's transaction goes on after the refusal and commits something else.
    with statements(runtime) as sent:
        async with runtime.services.db.unit_of_work() as session:
            with pytest.raises(error, match=message):
                await getattr(runtime.services.fleet, call_name)(session, PRODUCT, *args)
            await runtime.services.fleet.submit_job(
                session, PRODUCT, JobSpec(title="after the refusal", body_md="b"))

    # the lean conditional UPDATE is tried first (a target no stage may move to,
    # ASSIGNED or QUEUED, needs no statement to be refused)
    assert lean_tried(sent) is (to not in (A, Q))
    assert columns(await load(runtime, job.id)) == before
    after = await stored_events(runtime)
    assert after[:-1] == events
    assert [(e.seq, e.type, e.to_state) for e in after[-1:]] == [
        (seq + 1, EventType.JOB_CREATED, JobStage.QUEUED.value)]  # no gap, no extra event
    assert await last_seq(runtime) == seq + 1


# -- the budget rule in the statement -------------------------------------------


async def test_the_budget_overrun_ends_the_job_inside_the_transition_statement(
    runtime: Runtime, store: str,
) -> None:
    job = await submit(runtime, budget=0.3)
    fence = (await claim(runtime)).lease_fence
    # 0.1 + 0.2 is 0.30000000000000004: within the tolerance, not over a 0.3 budget
    await call(runtime, "transition_job", job.id, fence, JobStage.BUILDING,
               metrics=MetricsDelta(cost_usd=0.1, tokens_in=10))
    within = await call(runtime, "transition_job", job.id, fence, JobStage.REVIEW,
                        metrics=MetricsDelta(cost_usd=0.2, tokens_out=3))
    assert (within.stage, within.failure_reason) == (JobStage.REVIEW, None)

    with statements(runtime) as sent:
        over = await call(runtime, "transition_job", job.id, fence, JobStage.SHIPPED,
                          metrics=MetricsDelta(cost_usd=0.01, tokens_in=5))

    assert (over.stage, over.failure_reason) == (JobStage.FAILED, "budget exceeded")
    assert (over.lease_worker_id, over.lease_expires_at) == (None, None)
    assert over.finished_at is not None
    assert over.lease_fence == fence
    assert over.cost_usd == pytest.approx(0.31)
    assert (over.tokens_in, over.tokens_out) == (15, 3)
    assert columns(await load(runtime, job.id)) == columns(over)
    [last] = (await stored_events(runtime))[-1:]
    assert (last.from_state, last.to_state, last.payload) == (
        JobStage.REVIEW.value, JobStage.FAILED.value, {"attempts": 1, "fence": fence})
    # one statement on PostgreSQL: lock, UPDATE, sequence, event and NOTIFY together
    sent = [sql for sql in sent if not sql.startswith("BEGIN")]
    assert len(sent) == (1 if store == "postgres" else 3), sent
    assert len(lean_writes(sent)) == 1
    # and the lease has ended: the holder's next write is refused
    with pytest.raises(ConflictError, match="is FAILED; no lease is held"):
        await call(runtime, "heartbeat", job.id, fence)


async def test_a_failure_over_budget_keeps_the_budget_reason(runtime: Runtime) -> None:
    job = await submit(runtime, budget=1.0)
    fence = (await claim(runtime)).lease_fence
    failed = await call(runtime, "transition_job", job.id, fence, JobStage.FAILED,
                        metrics=MetricsDelta(cost_usd=2.0), reason="gave up")
    assert (failed.stage, failed.failure_reason) == (JobStage.FAILED, "budget exceeded")
    other = await submit(runtime, budget=1.0)
    fence = (await claim(runtime)).lease_fence
    failed = await call(runtime, "transition_job", other.id, fence, JobStage.FAILED,
                        metrics=MetricsDelta(cost_usd=0.5), reason="gave up")
    assert (failed.stage, failed.failure_reason) == (JobStage.FAILED, "gave up")
    assert failed.finished_at is not None


# -- what the lean statements return is what they stored ------------------------


async def test_returned_jobs_and_events_are_the_stored_rows(runtime: Runtime) -> None:
    published: list[EventRecord] = []

    async def keep(records: Any) -> None:
        published.extend(records)

    runtime.services.db.after_commit = keep
    item_job = await submit(runtime, capabilities=("gpu",), budget=5.0, priority="HIGH")
    worker = WorkerProfile("w", capabilities=frozenset({"gpu"}))
    claimed = await call(runtime, "claim_next_job", worker, lease_seconds=90)
    assert claimed is not None
    assert claimed.id == item_job.id
    returned = [claimed]
    fence = claimed.lease_fence
    returned.append(await call(runtime, "heartbeat", item_job.id, fence, lease_seconds=600))
    returned.append(await call(runtime, "transition_job", item_job.id, fence,
                               JobStage.BUILDING, metrics=MetricsDelta(0.25, 100, 20)))
    returned.append(await call(runtime, "release_job", item_job.id, fence, "stopping"))
    again = await call(runtime, "claim_next_job", worker)
    returned.append(again)
    returned.append(await call(runtime, "transition_job", item_job.id, again.lease_fence,
                               JobStage.SHIPPED))
    shipped = await load(runtime, item_job.id)
    assert columns(returned[-1]) == columns(shipped)
    assert shipped.started_at == claimed.started_at  # set on the first claim only
    assert shipped.attempts == 1  # the released attempt was given back
    assert [job.stage for job in returned] == [
        JobStage.ASSIGNED, JobStage.ASSIGNED, JobStage.BUILDING, JobStage.QUEUED,
        JobStage.ASSIGNED, JobStage.SHIPPED]
    for job in returned:  # typed like loaded rows: aware datetimes, enums, lists
        assert job.queued_at.tzinfo is not None
        assert job.updated_at.tzinfo is not None
        assert isinstance(job.stage, JobStage)
        assert job.capabilities == ["gpu"]
    stored = await stored_events(runtime)
    assert published == stored  # what the hub got is exactly what the log holds
    assert [(e.from_state, e.to_state) for e in stored] == [
        (None, "QUEUED"), ("QUEUED", "ASSIGNED"), ("ASSIGNED", "BUILDING"),
        ("BUILDING", "QUEUED"), ("QUEUED", "ASSIGNED"), ("ASSIGNED", "SHIPPED")]


async def test_a_job_the_session_already_holds_is_updated_in_place(runtime: Runtime) -> None:
    job = await submit(runtime)
    fence = (await claim(runtime)).lease_fence
    async with runtime.services.db.unit_of_work() as session:
        held = await runtime.services.fleet.get_job(session, PRODUCT, job.id)
        moved = await runtime.services.fleet.transition_job(
            session, PRODUCT, job.id, fence, JobStage.TESTING)
        assert moved is held
        assert held.stage == JobStage.TESTING
        again = await runtime.services.fleet.get_job(session, PRODUCT, job.id)
        assert again is held


# -- concurrency (PostgreSQL) ---------------------------------------------------


@pytest.mark.parametrize("store", ["postgres"])
@pytest.mark.parametrize("mode", ["session", "one-call", "batched"])
async def test_event_sequence_is_gap_free_under_concurrent_claimers(
    make_runtime: Any, make_token: Any, mode: str,
) -> None:
    """Claimers on two instances (two engines), each call a unit of work of its own —
    through a session, or alone on the driver (`one-call`, app.lone: a transition is
    its own implicit transaction; `batched`: each claimer claims several jobs, then
    moves them all at once, so that the transitions commit in batches,
    app.fleet.change_groups).  The log stays gap-free and in commit order: every
    snapshot a reader takes is a whole prefix 1..n (never n + 1 without n), and a live
    stream on the other instance receives every event once, in order (DESIGN §5)."""
    one_call = mode != "session"
    batches = STATS.batches
    await make_token(PRODUCT, Role.WORKER)
    instance_a = await make_runtime()
    instance_b = await make_runtime(hub_poll_seconds=60.0)  # only NOTIFY wakes it
    jobs = 40
    total = jobs * 4  # created, ASSIGNED, BUILDING, SHIPPED

    received: list[int] = []
    ready = asyncio.Event()
    stream = instance_b.services.streams.stream(
        PRODUCT, filter_for(JOB_STAGE_EVENTS, None), after=None, on_ready=ready.set)

    async def watch() -> None:
        async for record in stream:
            received.append(record.seq)
            if record.seq == total:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(ready.wait(), DEADLINE)
    async with instance_a.services.db.unit_of_work() as session:
        for n in range(jobs):
            await instance_a.services.fleet.submit_job(
                session, PRODUCT, JobSpec(title=f"job {n}", body_md="b"))

    finished = asyncio.Event()
    snapshots: list[list[int]] = []

    async def reader() -> None:
        while not finished.is_set():
            async with instance_b.services.db.read() as session:
                snapshots.append(list((await session.execute(
                    select(Event.seq).where(Event.product_id == PRODUCT)
                    .order_by(Event.seq))).scalars()))
            await asyncio.sleep(0)

    async def move(rt: Runtime, job: Job, stage: JobStage) -> None:
        async with rt.services.db.unit_of_work(one_call=one_call) as session:
            await rt.services.fleet.transition_job(
                session, PRODUCT, job.id, job.lease_fence, stage)

    async def claimer(rt: Runtime, index: int) -> None:
        worker = WorkerProfile(f"w{index}")
        while True:
            held: list[Job] = []
            while len(held) < (3 if mode == "batched" else 1):
                async with rt.services.db.unit_of_work(one_call=one_call) as session:
                    job = await rt.services.fleet.claim_next_job(session, PRODUCT, worker)
                if job is None:
                    break
                held.append(job)
            if not held:
                return
            for stage in (JobStage.BUILDING, JobStage.SHIPPED):
                await asyncio.gather(*(move(rt, job, stage) for job in held))

    reading = asyncio.create_task(reader())
    try:
        await asyncio.wait_for(asyncio.gather(
            *(claimer(rt, n) for n in range(5) for rt in (instance_a, instance_b))), 120)
        await asyncio.wait_for(watcher, DEADLINE)
    finally:
        finished.set()
        await reading
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await stream.aclose()

    stored = await stored_events(instance_a)
    assert [e.seq for e in stored] == list(range(1, total + 1))
    assert await last_seq(instance_a) == total
    by_job: dict[int, list[tuple[str | None, str | None]]] = {}
    for record in stored:
        by_job.setdefault(record.entity_id, []).append((record.from_state, record.to_state))
    assert len(by_job) == jobs
    assert all(moves == [(None, "QUEUED"), ("QUEUED", "ASSIGNED"), ("ASSIGNED", "BUILDING"),
                         ("BUILDING", "SHIPPED")] for moves in by_job.values())
    assert received == list(range(1, total + 1))  # whole and in order on the other instance
    async with instance_a.services.db.read() as session:
        stages = (await session.execute(
            select(Job.stage, func.count()).group_by(Job.stage))).all()
    assert stages == [(JobStage.SHIPPED, jobs)]
    assert len({len(seqs) for seqs in snapshots}) > 2  # the reader saw the log grow
    for seqs in snapshots:
        assert seqs == list(range(1, len(seqs) + 1)), seqs  # never n + 1 without n
    if mode == "batched":
        assert STATS.batches > batches  # some transitions did commit together
