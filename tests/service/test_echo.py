"""How the echo does its work (both stores unless marked): a move the item already
shows writes nothing at all (and the sweeper agrees it is done), the jobs of one
commit are echoed together and in its order, one item's failure never holds back
another's echo, and the echo locks an item before its job, as every item write does.

The rules themselves are tested in tests/service/test_bridge.py and
tests/service/test_steering.py.  Nothing is mocked; faults are injected only at the
bridge's item-writing seam, and commits are watched at `Database.after_commit`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import insert, select, update

from app.auth.models import Role
from app.bridge import repository as bridge_repository
from app.bridge.mapping import echo_covered
from app.bridge.service import EchoTarget, IngestOptions, write_status_and_comment
from app.db import utcnow
from app.events.models import Event, EventType
from app.events.outbox import EventRecord
from app.fleet.models import Job, JobStage
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec, MetricsDelta
from app.main import Runtime
from app.tracker import service as tracker_service
from app.tracker.models import Comment, CommentKind, Item, ItemStatus
from app.tracker.service import ItemChanges, NewItem
from tests.conftest import PG_DSN

PRODUCT = "acme"
WORKER = WorkerProfile("w1")
DEADLINE = 10.0


class ItemFaults:
    """The real item writer behind a seam that fails while an item is in `failing`."""

    def __init__(self) -> None:
        self.failing: set[int] = set()
        self.calls: list[int] = []

    async def __call__(
        self, session: Any, item: EchoTarget, status: ItemStatus | None, comment: str
    ) -> None:
        self.calls.append(item.id)
        if item.id in self.failing:
            raise RuntimeError("the tracker is down for this item")
        await write_status_and_comment(session, item, status, comment)


@pytest.fixture
async def start(make_runtime: Any, make_token: Any) -> Any:
    await make_token(PRODUCT, Role.MEMBER)
    return make_runtime


def watch_commits(rt: Runtime) -> list[list[EventRecord]]:
    """Every commit's events from now on, one list per commit."""
    commits: list[list[EventRecord]] = []

    async def seen(records: Sequence[EventRecord]) -> None:
        commits.append(list(records))

    rt.services.db.after_commit = seen
    return commits


async def create(rt: Runtime, title: str = "Ship the thing") -> Item:
    async with rt.services.db.unit_of_work() as session:
        return await tracker_service.create_item(session, PRODUCT, NewItem(title=title))


async def ingest(rt: Runtime, item_id: int, **options: Any) -> Job:
    async with rt.services.db.unit_of_work() as session:
        result = await rt.services.bridge.ingest_item(
            session, PRODUCT, item_id, IngestOptions(**options)
        )
    return result.job


async def submit_for(rt: Runtime, item_id: int, title: str) -> Job:
    async with rt.services.db.unit_of_work() as session:
        result = await rt.services.fleet.submit_job(
            session, PRODUCT, JobSpec(title=title, body_md=title, tracker_item_id=item_id)
        )
    return result.job


async def claim(rt: Runtime, **options: Any) -> Job:
    async with rt.services.db.unit_of_work() as session:
        job = await rt.services.fleet.claim_next_job(session, PRODUCT, WORKER, **options)
    assert job is not None
    return job


async def move(rt: Runtime, job: Job, to: JobStage, **options: Any) -> Job:
    async with rt.services.db.unit_of_work() as session:
        return await rt.services.fleet.transition_job(
            session, PRODUCT, job.id, job.lease_fence, to, **options)


async def lone_claim(rt: Runtime) -> Job:
    """`claim` as the mutation makes it: a unit of work of this one call (app.lone),
    whose change reads the job's item for the echo (`EventRecord.seen`)."""
    async with rt.services.db.unit_of_work(one_call=True) as session:
        job = await rt.services.fleet.claim_next_job(session, PRODUCT, WORKER)
    assert job is not None
    return job


async def lone_move(rt: Runtime, job: Job, to: JobStage, **options: Any) -> Job:
    """`move` as the mutation makes it (see `lone_claim`)."""
    async with rt.services.db.unit_of_work(one_call=True) as session:
        return await rt.services.fleet.transition_job(
            session, PRODUCT, job.id, job.lease_fence, to, **options)


async def set_status(rt: Runtime, item_id: int, status: ItemStatus) -> None:
    """A person sets the item's status (through the tracker alone)."""
    async with rt.services.db.unit_of_work() as session:
        await tracker_service.update_item(session, PRODUCT, item_id, ItemChanges(status=status))


async def load_job(rt: Runtime, job_id: int) -> Job:
    async with rt.services.db.read() as session:
        return await rt.services.fleet.get_job(session, PRODUCT, job_id)


async def status_of(rt: Runtime, item_id: int) -> ItemStatus:
    async with rt.services.db.read() as session:
        return (await tracker_service.get_item(session, PRODUCT, item_id)).status


async def notes(rt: Runtime, item_id: int) -> list[Comment]:
    async with rt.services.db.read() as session:
        page = await tracker_service.list_comments(session, PRODUCT, item_id, first=100,
                                                   after=None)
    return list(page.nodes)


def comment_events(commits: list[list[EventRecord]]) -> list[list[int]]:
    """The item ids of the comments each commit added (commits without any left out)."""
    found = [[r.payload["itemId"] for r in commit if r.type == EventType.COMMENT_ADDED]
             for commit in commits]
    return [ids for ids in found if ids]


async def test_the_jobs_of_one_commit_are_echoed_together_in_its_order(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=True)
    item = await create(rt)
    older = await ingest(rt, item.id)
    newer = await submit_for(rt, item.id, "a second job")
    commits = watch_commits(rt)

    # the item is cancelled: both jobs end in that one commit, and both are echoed
    async with rt.services.db.unit_of_work() as session:
        await rt.services.bridge.update_item(session, PRODUCT, item.id,
                                             ItemChanges(status=ItemStatus.CANCELLED))

    assert comment_events(commits) == [[item.id, item.id]]  # one echo commit for both
    final = [n for n in await notes(rt, item.id) if "is CANCELLED" in n.body]
    assert [f"job {job.id} is CANCELLED" in n.body for n, job in zip(
        final, (older, newer), strict=True)] == [True, True]  # in the commit's order
    assert all(n.kind == CommentKind.SYSTEM for n in final)
    assert await status_of(rt, item.id) == ItemStatus.CANCELLED
    for job in (older, newer):
        stored = await load_job(rt, job.id)
        assert (stored.echoed_stage, stored.echo_retry_at) == (JobStage.CANCELLED, None)
    assert await rt.loops.sweep_echoes_once() == 0


async def test_one_items_failure_never_holds_back_another_items_echo(start: Any) -> None:
    writer = ItemFaults()
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer)
    first, second = await create(rt, "first"), await create(rt, "second")
    jobs = {item.id: await ingest(rt, item.id, max_attempts=1) for item in (first, second)}
    long_ago = utcnow() - timedelta(hours=2)
    async with rt.services.db.unit_of_work() as session:
        await session.execute(update(Job).values(queued_at=long_ago, created_at=long_ago))
    for _ in jobs:  # leases that ran out an hour ago, on the last attempt of each job
        await claim(rt, now=utcnow() - timedelta(hours=1), lease_seconds=60)
    writer.failing = {first.id}
    commits = watch_commits(rt)

    reaped = await rt.loops.reap_once()  # both jobs end FAILED in one commit
    assert sorted(reaped.failed) == sorted(job.id for job in jobs.values())
    assert await status_of(rt, second.id) == ItemStatus.BLOCKED
    assert "is FAILED" in (await notes(rt, second.id))[-1].body
    assert await status_of(rt, first.id) == ItemStatus.IN_PROGRESS  # its write failed
    assert comment_events(commits) == [[second.id]]  # nothing of the first item
    held_back = await load_job(rt, jobs[first.id].id)
    assert (held_back.echo_retry_stage, held_back.echo_retry_at is not None) == (
        JobStage.FAILED, True)
    assert (await load_job(rt, jobs[second.id].id)).echo_retry_at is None

    # the sweeper catches the first item up once its tracker answers again
    writer.failing.clear()
    async with rt.services.db.unit_of_work() as session:
        await session.execute(update(Job).where(Job.id == jobs[first.id].id).values(
            echo_retry_at=utcnow() - timedelta(seconds=1)))
    assert await rt.loops.sweep_echoes_once() == 1
    assert await status_of(rt, first.id) == ItemStatus.BLOCKED
    assert [n.body.count("is FAILED") for n in await notes(rt, first.id)][-1] == 1
    assert await rt.loops.sweep_echoes_once() == 0


async def test_the_echo_hands_the_hub_exactly_the_events_it_stored(start: Any) -> None:
    """The echo appends its events itself (one statement on PostgreSQL): what the hub
    is given after each commit is what the log holds, gap-free and in order."""
    rt: Runtime = await start(tracker_echo=True)
    item = await create(rt)
    await set_status(rt, item.id, ItemStatus.BLOCKED)  # a person's: the echo comments only
    commits = watch_commits(rt)
    job = await ingest(rt, item.id)  # QUEUED: a comment, the status left as is
    await set_status(rt, item.id, ItemStatus.IN_PROGRESS)  # what the job shows
    held = await claim(rt)  # the bridge takes the status as its own: no event
    await move(rt, held, JobStage.SHIPPED)  # the status and a comment

    handed = [r for commit in commits for r in commit]
    async with rt.services.db.read() as session:
        stored = (await session.execute(
            select(Event).where(Event.product_id == PRODUCT, Event.seq >= handed[0].seq)
            .order_by(Event.seq))).scalars().all()
    assert [(r.seq, r.type, r.entity_id, r.from_state, r.to_state, r.payload)
            for r in handed] == [
        (e.seq, e.type, e.entity_id, e.from_state, e.to_state, e.payload) for e in stored]
    assert [r.seq for r in handed] == list(range(handed[0].seq, handed[0].seq + len(handed)))
    first, last = (c.id for c in await notes(rt, item.id))
    by_echo = [(r.type, r.entity_id, r.from_state, r.to_state, r.payload) for r in handed
               if r.type == EventType.COMMENT_ADDED or r.to_state == "DONE"]
    assert by_echo == [
        (EventType.COMMENT_ADDED, first, None, None, {"itemId": item.id, "kind": "SYSTEM"}),
        (EventType.ITEM_STATUS_CHANGED, item.id, "IN_PROGRESS", "DONE", {}),
        (EventType.COMMENT_ADDED, last, None, None, {"itemId": item.id, "kind": "SYSTEM"}),
    ]
    assert (await status_of(rt, item.id), (await load_job(rt, job.id)).echoed_stage) == (
        ItemStatus.DONE, JobStage.SHIPPED)


async def test_the_unlocked_read_sees_what_the_locked_read_sees(start: Any) -> None:
    """The unlocked read runs on the driver, outside SQLAlchemy's statements: the same
    rows, converted the same way (enums, UTC datetimes, booleans, floats, NULLs)."""
    rt: Runtime = await start(tracker_echo=True)
    item, other = await create(rt), await create(rt, "other")
    first = await ingest(rt, item.id)
    second = await submit_for(rt, item.id, "the latest job")
    plain = await ingest(rt, other.id)
    held = await claim(rt)
    await move(rt, held, JobStage.SHIPPED, metrics=MetricsDelta(cost_usd=0.125, tokens_in=7))
    async with rt.services.db.unit_of_work() as session:
        await session.execute(update(Job).where(Job.id == plain.id).values(
            echo_attempts=2, echo_retry_at=utcnow(), echo_retry_stage=JobStage.QUEUED))
    ids = [second.id, plain.id, first.id, 10_000]  # a job that does not exist is left out

    unlocked = await bridge_repository.echo_rows_unlocked(
        rt.services.db.engine, PRODUCT, ids)
    async with rt.services.db.unit_of_work() as session:
        locked = await bridge_repository.echo_rows(session, PRODUCT, ids)
    assert unlocked == locked
    assert [(row.job_id, row.latest) for row in locked] == [  # in the order asked for
        (second.id, True), (plain.id, True), (first.id, False)]
    shipped = locked[2]
    assert (shipped.stage, shipped.cost_usd, shipped.tokens_in) == (JobStage.SHIPPED, 0.125, 7)
    assert shipped.finished_at is not None
    assert shipped.finished_at.utcoffset() == timedelta(0)
    assert (locked[1].echo_retry_stage, locked[1].echo_retry_at is not None) == (
        JobStage.QUEUED, True)
    assert await bridge_repository.echo_rows_unlocked(
        rt.services.db.engine, "globex", ids) == []


@pytest.mark.parametrize("store", ["postgres"])
async def test_the_echo_locks_the_item_before_the_job(start: Any) -> None:
    """Every item write locks the item first (cancelling an item then locks its jobs),
    so an echo that locked its job first could deadlock with it."""
    rt: Runtime = await start(tracker_echo=True)
    item = await create(rt)
    job = await ingest(rt, item.id)
    database = rt.services.db.engine.url.database
    holder = await asyncpg.connect(f"{PG_DSN}/{database}")
    probe = await asyncpg.connect(f"{PG_DSN}/{database}")
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", job.id)
        echo = asyncio.create_task(rt.services.bridge.echo_job(PRODUCT, job.id))
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' " \
                  "AND datname = $1"
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while await probe.fetchval(waiting, database) == 0:  # the echo waits for the job
            assert asyncio.get_running_loop().time() < deadline, "the echo never waited"
            await asyncio.sleep(0.01)
        with pytest.raises(asyncpg.LockNotAvailableError):  # ... holding its item
            await probe.execute("SELECT 1 FROM items WHERE id = $1 FOR UPDATE NOWAIT", item.id)
        await transaction.rollback()
        result = await asyncio.wait_for(echo, DEADLINE)
        assert result.error is None
    finally:
        await holder.close()
        await probe.close()


# -- a move the item already shows -----------------------------------------------


async def echo_record(rt: Runtime, job_id: int) -> tuple[Any, ...]:
    job = await load_job(rt, job_id)
    return (job.echoed_stage, job.last_echoed_status, job.echo_attempts, job.echo_retry_at,
            job.echo_retry_stage)


async def test_a_move_the_item_already_shows_writes_nothing_at_all(start: Any) -> None:
    writer = ItemFaults()
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer, retry_backoff_seconds=0)
    item = await create(rt)
    job = await ingest(rt, item.id)  # QUEUED: the item goes IN_PROGRESS, with a comment
    recorded = await echo_record(rt, job.id)
    assert recorded[:2] == (JobStage.QUEUED, ItemStatus.IN_PROGRESS)
    commits = watch_commits(rt)

    held = await claim(rt)
    held = await move(rt, held, JobStage.BUILDING)
    await move(rt, held, JobStage.REVIEW)
    # each commit is the stage change's own: the echoes opened no write transaction
    assert [[r.type for r in commit] for commit in commits] == [
        [EventType.JOB_STAGE_CHANGED]] * 3
    assert writer.calls == [item.id]
    assert await echo_record(rt, job.id) == recorded  # not even the job's record moved
    assert await rt.loops.sweep_echoes_once() == 0  # and the sweeper agrees it is done
    assert (await status_of(rt, item.id), len(await notes(rt, item.id))) == (
        ItemStatus.IN_PROGRESS, 1)

    await move(rt, held, JobStage.FAILED, retryable=True)  # back to the queue: IN_PROGRESS
    held = await claim(rt)
    assert len(commits) == 5
    assert await echo_record(rt, job.id) == recorded
    await move(rt, held, JobStage.SHIPPED)  # the end is echoed as ever
    assert await status_of(rt, item.id) == ItemStatus.DONE
    assert [n.body.count("is SHIPPED") for n in await notes(rt, item.id)] == [0, 1]
    assert (await echo_record(rt, job.id))[:2] == (JobStage.SHIPPED, ItemStatus.DONE)
    assert await rt.loops.sweep_echoes_once() == 0


async def test_a_move_still_takes_back_the_status_the_item_shows_again(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=True)
    item = await create(rt)
    await set_status(rt, item.id, ItemStatus.BLOCKED)  # a person's status, before the job
    job = await ingest(rt, item.id)
    assert await status_of(rt, item.id) == ItemStatus.BLOCKED  # the person's status wins
    await set_status(rt, item.id, ItemStatus.IN_PROGRESS)  # ... and shows the job's again

    held = await claim(rt)  # the bridge takes IN_PROGRESS as its own again
    assert (await echo_record(rt, job.id))[0] == JobStage.ASSIGNED
    await move(rt, held, JobStage.SHIPPED)  # so the end moves the item
    assert await status_of(rt, item.id) == ItemStatus.DONE


async def test_a_move_after_a_failed_echo_writes_what_that_echo_could_not(start: Any) -> None:
    writer = ItemFaults()
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer)
    item = await create(rt)
    writer.failing = {item.id}
    job = await ingest(rt, item.id)  # the QUEUED echo fails
    assert (await status_of(rt, item.id), (await echo_record(rt, job.id))[3] is not None) == (
        ItemStatus.TODO, True)
    writer.failing.clear()

    await claim(rt)  # ASSIGNED shows as the same status, but the item does not show it
    assert await status_of(rt, item.id) == ItemStatus.IN_PROGRESS
    assert ["is ASSIGNED" in n.body for n in await notes(rt, item.id)] == [True]
    assert await echo_record(rt, job.id) == (JobStage.ASSIGNED, ItemStatus.IN_PROGRESS, 0,
                                             None, None)
    assert await rt.loops.sweep_echoes_once() == 0


async def test_the_sweepers_backlog_leaves_out_exactly_the_covered_echoes(start: Any) -> None:
    """The backlog's SQL agrees with `mapping.echo_covered` on every combination of
    a job's stage, the stage it echoed last, the status it echoed last and a pending
    retry."""
    rt: Runtime = await start(tracker_echo=True)
    item = await create(rt)
    now = utcnow()
    combos = list(itertools.product(JobStage, [None, *JobStage], [None, *ItemStatus],
                                    [False, True]))
    rows = [{
        "product_id": PRODUCT, "title": "t", "body_md": "b", "kind": "code", "stage": stage,
        "priority": "NORMAL", "capabilities": [], "attempts": 0, "max_attempts": 3,
        "tracker_item_id": item.id, "lease_fence": 0, "cost_usd": 0.0, "tokens_in": 0,
        "tokens_out": 0, "echoed_stage": echoed, "last_echoed_status": last,
        "echo_attempts": int(retry), "echo_retry_at": now - timedelta(seconds=1) if retry
        else None, "echo_retry_stage": stage if retry else None, "queued_at": now,
        "created_at": now, "updated_at": now,
    } for stage, echoed, last, retry in combos]
    async with rt.services.db.unit_of_work() as session:
        await session.execute(insert(Job), rows)
        ids = list((await session.execute(select(Job.id).order_by(Job.id))).scalars())
    async with rt.services.db.read() as session:
        backlog = await bridge_repository.echo_backlog(
            session, utcnow(), len(combos) + 1, every_stage_change=True)
    expected = [
        job_id for job_id, (stage, echoed, last, retry) in zip(ids, combos, strict=True)
        if echoed != stage and not echo_covered(
            stage=stage, echoed_stage=echoed, job_last_status=last, retry_pending=retry)
    ]
    assert [job_id for _, job_id, _ in backlog] == expected
    assert 0 < len(expected) < len(combos)
