"""The tracker steers the fleet, at the service level (both stores), DESIGN §4:
cancel from the item, auto-ingest on a label, ingest by the item's state and
follow-ups, a person's status wins over the echo, final figures, the flag-off
sweeper, and budgets.

Nothing is mocked; a fault is injected only at the bridge's item-writing seam.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select

from app.auth.models import Role
from app.bridge.service import IngestOptions
from app.errors import BadUserInputError, ConflictError
from app.events.models import Event, EventType
from app.fleet.models import Job, JobStage
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec, MetricsDelta, SubmitOutcome, SubmitResult
from app.main import Runtime
from app.tracker import service as tracker_service
from app.tracker.models import Comment, CommentKind, Item, ItemStatus
from app.tracker.service import ItemChanges, NewItem
from tests.service.test_bridge import CountingWriter

PRODUCT = "acme"
WORKER = WorkerProfile("w1")
TABLES = ("items", "comments", "jobs", "events")


@pytest.fixture
async def start(make_runtime: Any, make_token: Any) -> Any:
    await make_token(PRODUCT, Role.MEMBER)
    return make_runtime


async def create(rt: Runtime, **fields: Any) -> Item:
    fields.setdefault("title", "Ship the thing")
    fields["labels"] = tuple(fields.get("labels", ()))
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.bridge.create_item(session, PRODUCT, NewItem(**fields))


async def update(rt: Runtime, item_id: int, **changes: Any) -> Item:
    if "labels" in changes:
        changes["labels"] = tuple(changes["labels"])
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.bridge.update_item(session, PRODUCT, item_id,
                                                    ItemChanges(**changes))


async def ingest(rt: Runtime, item_id: int, options: IngestOptions | None = None
                 ) -> SubmitResult:
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.bridge.ingest_item(session, PRODUCT, item_id,
                                                    options or IngestOptions())


async def claim(rt: Runtime) -> Job:
    async with rt.services.db.unit_of_work() as session:
        job = await rt.services.fleet.claim_next_job(session, PRODUCT, WORKER)
    assert job is not None
    return job


async def move(rt: Runtime, job: Job, to: JobStage, **options: Any) -> Job:
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.fleet.transition_job(
            session, PRODUCT, job.id, job.lease_fence, to, **options)


async def heartbeat(rt: Runtime, job: Job) -> Job:
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.fleet.heartbeat(session, PRODUCT, job.id, job.lease_fence)


async def load_job(rt: Runtime, job_id: int) -> Job:
    async with rt.services.db.read() as session:
        return await rt.services.fleet.get_job(session, PRODUCT, job_id)


async def jobs_of(rt: Runtime, item_id: int) -> list[Job]:
    async with rt.services.db.read() as session:
        page = await rt.services.fleet.list_jobs(session, PRODUCT, tracker_item_id=item_id)
    return list(page.nodes)


async def status_of(rt: Runtime, item_id: int) -> ItemStatus:
    async with rt.services.db.read() as session:
        return (await tracker_service.get_item(session, PRODUCT, item_id)).status


async def notes(rt: Runtime, item_id: int) -> list[Comment]:
    async with rt.services.db.read() as session:
        page = await tracker_service.list_comments(session, PRODUCT, item_id, first=100,
                                                   after=None)
    return list(page.nodes)


async def row_counts(rt: Runtime) -> dict[str, int]:
    counts: dict[str, int] = {}
    async with rt.services.db.read() as session:
        for model in (Item, Comment, Job, Event):
            counts[model.__tablename__] = int((await session.execute(
                select(func.count()).select_from(model))).scalar_one())
    return counts


async def stage_events(rt: Runtime) -> Counter[tuple[int, str | None]]:
    async with rt.services.db.read() as session:
        rows = (await session.execute(select(Event.entity_id, Event.to_state).where(
            Event.type == EventType.JOB_STAGE_CHANGED))).all()
    return Counter((row[0], row[1]) for row in rows)


# -- 1. cancel from the tracker ----------------------------------------------------


@pytest.mark.parametrize("echo", [False, True], ids=["echo-off", "echo-on"])
async def test_cancelling_the_item_cancels_its_running_jobs_in_the_same_unit_of_work(
    start: Any, echo: bool
) -> None:
    rt: Runtime = await start(tracker_echo=echo)
    item = await create(rt)
    first = (await ingest(rt, item.id)).job
    building = await claim(rt)
    await move(rt, building, JobStage.BUILDING)
    async with rt.services.db.unit_of_work() as session:  # a second job, ASSIGNED
        second = (await rt.services.fleet.submit_job(session, PRODUCT, JobSpec(
            title="more", body_md="more", tracker_item_id=item.id))).job
    assigned = await claim(rt)
    assert (building.id, assigned.id) == (first.id, second.id)
    other = await create(rt, title="unrelated")
    unrelated = (await ingest(rt, other.id)).job
    events_before = await stage_events(rt)

    await update(rt, item.id, status=ItemStatus.CANCELLED)

    for held in (building, assigned):
        job = await load_job(rt, held.id)
        assert (job.stage, job.failure_reason) == (JobStage.CANCELLED, "item cancelled")
        assert (job.lease_fence, job.lease_worker_id) == (held.lease_fence + 1, None)
        with pytest.raises(ConflictError):
            await heartbeat(rt, held)
        with pytest.raises(ConflictError):
            await move(rt, held, JobStage.SHIPPED)
    changes = await stage_events(rt) - events_before
    assert changes == Counter({(first.id, "CANCELLED"): 1, (second.id, "CANCELLED"): 1})
    assert (await load_job(rt, unrelated.id)).stage == JobStage.QUEUED
    assert await status_of(rt, item.id) == ItemStatus.CANCELLED

    # a CANCELLED item takes no job: ingest, submit and retry are CONFLICT, 0 rows written
    counts = await row_counts(rt)
    with pytest.raises(ConflictError):
        await ingest(rt, item.id)
    with pytest.raises(ConflictError):
        async with rt.services.db.unit_of_work() as session:
            await rt.services.fleet.submit_job(session, PRODUCT, JobSpec(
                title="x", body_md="x", tracker_item_id=item.id))
    with pytest.raises(ConflictError):
        async with rt.services.db.unit_of_work() as session:
            await rt.services.fleet.retry_job(session, PRODUCT, first.id)
    assert await row_counts(rt) == counts
    # with the echo on, each cancelled job's final figures reach the item once
    finals = [n for n in await notes(rt, item.id) if "is CANCELLED" in n.body]
    assert len(finals) == (2 if echo else 0)


# -- 2. auto-ingest on a label ------------------------------------------------------


async def test_auto_ingest_on_the_label(start: Any) -> None:
    rt: Runtime = await start()
    assert rt.services.settings.auto_ingest_label == "fleet"
    created = await create(rt, labels=["fleet", "priority:high"], description="the body")
    [job] = await jobs_of(rt, created.id)
    assert (job.idempotency_key, job.body_md, job.priority.value) == (
        f"tracker-{created.id}", "the body", "HIGH")

    plain = await create(rt, labels=["bug"])
    assert await jobs_of(rt, plain.id) == []
    await update(rt, plain.id, labels=["bug", "fleet"])
    [added] = await jobs_of(rt, plain.id)
    for n in range(5):  # edits, the label sent again, removed and added back: one job
        await update(rt, plain.id, title=f"edit {n}", labels=["fleet"] if n % 2 else ["x"])
    await update(rt, plain.id, labels=["bug"])  # removing the label cancels nothing
    [still] = await jobs_of(rt, plain.id)
    assert (still.id, still.stage, still.lease_fence) == (added.id, JobStage.QUEUED, 0)

    # a wrong hint refuses the create / the update, naming the label; nothing written
    counts = await row_counts(rt)
    with pytest.raises(BadUserInputError, match="priority:asap") as raised:
        await create(rt, labels=["fleet", "priority:asap"])
    assert raised.value.field == "labels"
    with pytest.raises(BadUserInputError, match="priority:asap"):
        await update(rt, plain.id, title="renamed", labels=["fleet", "priority:asap"])
    assert await row_counts(rt) == counts
    async with rt.services.db.read() as session:
        unchanged = await tracker_service.get_item(session, PRODUCT, plain.id)
    assert (unchanged.title, unchanged.labels) == ("edit 4", ["bug"])

    # a closed item does not flow into the fleet
    closed = await create(rt, labels=["fleet"], status=ItemStatus.CANCELLED)
    assert await jobs_of(rt, closed.id) == []

    # an empty setting disables it
    off: Runtime = await start(auto_ingest_label="")
    quiet = await create(off, labels=["fleet"])
    await update(off, quiet.id, labels=["fleet", "other"])
    assert await jobs_of(off, quiet.id) == []


# -- 3. ingest by the item's state; follow-ups ------------------------------------


async def test_ingest_follows_the_item_state_and_creates_follow_ups(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=True)
    item = await create(rt)
    first = (await ingest(rt, item.id)).job
    assert (await ingest(rt, item.id)).outcome == SubmitOutcome.DEDUPED
    await move(rt, await claim(rt), JobStage.FAILED, reason="broke")
    assert await status_of(rt, item.id) == ItemStatus.BLOCKED
    # ingest while BLOCKED (open) after the job ended: the first follow-up
    await update(rt, item.id, status=ItemStatus.TODO)
    follow_up = await ingest(rt, item.id)
    assert follow_up.outcome == SubmitOutcome.CREATED
    assert follow_up.job.idempotency_key == f"tracker-{item.id}-1"
    assert await status_of(rt, item.id) == ItemStatus.IN_PROGRESS  # its stages show again
    assert (await ingest(rt, item.id)).job.id == follow_up.job.id  # running: DEDUPED

    async with rt.services.db.unit_of_work() as session:
        await rt.services.fleet.cancel_job(session, PRODUCT, follow_up.job.id)
    await update(rt, item.id, status=ItemStatus.TODO)
    racers = await asyncio.gather(*(ingest(rt, item.id) for _ in range(10)))
    assert Counter(r.outcome for r in racers) == {SubmitOutcome.CREATED: 1,
                                                  SubmitOutcome.DEDUPED: 9}
    assert len({r.job.id for r in racers}) == 1
    jobs = await jobs_of(rt, item.id)
    assert [j.idempotency_key for j in jobs] == [
        f"tracker-{item.id}", f"tracker-{item.id}-1", f"tracker-{item.id}-2"]
    assert jobs[0].id == first.id

    # a DONE item whose job shipped: DEDUPED, its status untouched
    await move(rt, await claim(rt), JobStage.SHIPPED)
    assert await status_of(rt, item.id) == ItemStatus.DONE
    counts = await row_counts(rt)
    again = await ingest(rt, item.id)
    assert (again.outcome, again.job.id, again.job.stage) == (
        SubmitOutcome.DEDUPED, jobs[2].id, JobStage.SHIPPED)
    assert await status_of(rt, item.id) == ItemStatus.DONE
    assert await row_counts(rt) == counts


# -- 4 and 5. a person's status wins; the final figures always arrive ----------------


async def test_a_persons_status_wins_and_the_final_figures_arrive_once(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=True)
    # DONE by a person, then the job FAILED: stays DONE, with the final comment
    done = await create(rt, title="done by hand")
    await ingest(rt, done.id)
    job = await claim(rt)
    await move(rt, job, JobStage.BUILDING)
    await update(rt, done.id, status=ItemStatus.DONE)
    await move(rt, job, JobStage.FAILED, reason="broke",
               metrics=MetricsDelta(cost_usd=0.75, tokens_in=300, tokens_out=40))
    assert await status_of(rt, done.id) == ItemStatus.DONE
    final = (await notes(rt, done.id))[-1]
    assert final.kind == CommentKind.SYSTEM
    assert "FAILED" in final.body
    assert "$0.7500" in final.body
    assert "300 in / 40 out" in final.body
    # exactly one: echoing again, sweeping, nothing more
    count = len(await notes(rt, done.id))
    assert (await rt.services.bridge.echo_job(PRODUCT, job.id)).echoed is None
    assert await rt.loops.sweep_echoes_once() == 0
    assert len(await notes(rt, done.id)) == count

    # TODO by a person during BUILDING: stays TODO through later stages and the end
    todo = await create(rt, title="back to todo")
    await ingest(rt, todo.id)
    job = await claim(rt)
    await move(rt, job, JobStage.BUILDING)
    await update(rt, todo.id, status=ItemStatus.TODO)
    await move(rt, job, JobStage.REVIEW)
    await move(rt, job, JobStage.SHIPPED, metrics=MetricsDelta(cost_usd=0.1))
    assert await status_of(rt, todo.id) == ItemStatus.TODO
    shipped_notes = [n for n in await notes(rt, todo.id) if "is SHIPPED" in n.body]
    assert len(shipped_notes) == 1
    assert "left as is" in shipped_notes[0].body

    # two jobs on one item: only the latest sets the status
    both = await create(rt, title="two jobs")
    older = (await ingest(rt, both.id)).job
    async with rt.services.db.unit_of_work() as session:
        newer = (await rt.services.fleet.submit_job(session, PRODUCT, JobSpec(
            title="newer", body_md="b", tracker_item_id=both.id))).job
    held_older, held_newer = await claim(rt), await claim(rt)
    assert (held_older.id, held_newer.id) == (older.id, newer.id)
    await move(rt, held_newer, JobStage.SHIPPED)
    assert await status_of(rt, both.id) == ItemStatus.DONE
    before = len(await notes(rt, both.id))
    await move(rt, held_older, JobStage.FAILED)  # the older job's late end: a comment only
    assert await status_of(rt, both.id) == ItemStatus.DONE
    assert len(await notes(rt, both.id)) == before + 1


# -- 6. flag off: the sweeper retries a failed manual echo for its own stage only ---


async def test_flag_off_sweeper_retries_only_the_stage_the_manual_echo_attempted(
    start: Any,
) -> None:
    writer = CountingWriter()
    rt: Runtime = await start(echo_writer=writer)
    item = await create(rt)
    await ingest(rt, item.id)
    job = await claim(rt)
    await move(rt, job, JobStage.BUILDING)
    writer.failures = 1
    failed = await rt.services.bridge.echo_job(PRODUCT, job.id)  # the manual echo fails
    assert failed.error is not None
    await move(rt, job, JobStage.SHIPPED)  # a later stage change, while the flag is off
    async with rt.services.db.unit_of_work() as session:  # let its backoff run out
        stored = await rt.services.fleet.get_job(session, PRODUCT, job.id)
        assert (stored.echo_retry_stage, stored.echo_retry_at is not None) == (
            JobStage.BUILDING, True)
        stored.echo_retry_at = stored.updated_at

    assert await rt.loops.sweep_echoes_once() == 1
    assert await status_of(rt, item.id) == ItemStatus.IN_PROGRESS  # not DONE
    [note] = await notes(rt, item.id)
    assert "is BUILDING" in note.body
    assert await rt.loops.sweep_echoes_once() == 0  # and never the later stage
    assert await status_of(rt, item.id) == ItemStatus.IN_PROGRESS
    assert writer.calls == 2


# -- 7. budgets ----------------------------------------------------------------------


async def test_a_budget_ends_the_job_in_the_transition_that_crosses_it(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=True)
    item = await create(rt)
    job = (await ingest(rt, item.id, IngestOptions(budget=1.0))).job
    held = await claim(rt)
    assert held.id == job.id
    building = await move(rt, held, JobStage.BUILDING, metrics=MetricsDelta(cost_usd=0.6))
    assert building.stage == JobStage.BUILDING
    events_before = await stage_events(rt)
    ended = await move(rt, held, JobStage.REVIEW, retryable=True,
                       metrics=MetricsDelta(cost_usd=0.6, tokens_in=10))
    assert (ended.stage, ended.failure_reason) == (JobStage.FAILED, "budget exceeded")
    assert ended.cost_usd == pytest.approx(1.2)
    assert (ended.tokens_in, ended.lease_worker_id, ended.lease_expires_at) == (10, None, None)
    assert await stage_events(rt) - events_before == Counter({(job.id, "FAILED"): 1})
    with pytest.raises(ConflictError):
        await heartbeat(rt, held)
    with pytest.raises(ConflictError):
        await move(rt, held, JobStage.SHIPPED)
    assert await status_of(rt, item.id) == ItemStatus.BLOCKED
    assert "$1.2000" in (await notes(rt, item.id))[-1].body

    counts = await row_counts(rt)
    for budget in (0.0, -1.0):
        with pytest.raises(BadUserInputError) as raised:
            async with rt.services.db.unit_of_work() as session:
                await rt.services.fleet.submit_job(session, PRODUCT, JobSpec(
                    title="x", body_md="x", budget=budget))
        assert raised.value.field == "budget"
        with pytest.raises(BadUserInputError):
            await ingest(rt, (await create(rt, title="b")).id, IngestOptions(budget=budget))
    assert (await row_counts(rt))["jobs"] == counts["jobs"]
