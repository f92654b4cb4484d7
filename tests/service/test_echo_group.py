"""How echoes share work (issue 12, "echo on ÷ off"): on SQLite the after-commit
echoes waiting for the one writer connection share one unit of work (group commit),
a failure in it holds back only the failing echo, and a move the item already shows
rides along in a unit of work that waits anyway; the unlocked reads keep a pooled
connection of their own until the bridge is closed; a driver error in an echo's
one-hop write is SQLAlchemy's error, and writes nothing.

Nothing is mocked: the writer is held by a real unit of work while the echoes queue
for it, and faults are injected only at the bridge's item-writing seam.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.auth.models import Product, Role
from app.bridge import repository as bridge_repository
from app.db import utcnow
from app.events.outbox import EventRecord
from app.fleet.models import Job, JobStage
from app.main import Runtime
from app.tracker.models import Comment, CommentKind, Item, ItemStatus
from tests.service.test_echo import (
    DEADLINE,
    PRODUCT,
    ItemFaults,
    claim,
    comment_events,
    create,
    echo_record,
    ingest,
    load_job,
    lone_claim,
    lone_move,
    move,
    notes,
    set_status,
    status_of,
    watch_commits,
)


@pytest.fixture
async def start(make_runtime: Any, make_token: Any) -> Any:
    await make_token(PRODUCT, Role.MEMBER)
    return make_runtime


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until `condition` holds (bounded by DEADLINE)."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0)


async def commits_without_echo(rt: Runtime, steps: Sequence[Any]) -> list[list[EventRecord]]:
    """Run `steps` (coroutine factories, each one unit of work) with the commit hook
    set aside: their echoes have not run; the records of each commit are returned."""
    db = rt.services.db
    hook, kept = db.on_commit, []

    async def keep(records: Sequence[EventRecord]) -> None:
        kept.append(list(records))

    db.on_commit = keep
    try:
        for step in steps:
            await step()
    finally:
        db.on_commit = hook
    return kept


async def shipped_without_echo(rt: Runtime, count: int) -> tuple[list[Item], list[Job],
                                                                  list[list[EventRecord]]]:
    """`count` items whose jobs are SHIPPED, the echoes of those moves not run yet."""
    items = [await create(rt, f"item {n}") for n in range(count)]
    jobs = [await ingest(rt, item.id) for item in items]  # the item goes IN_PROGRESS
    held = [await claim(rt) for _ in items]
    kept = await commits_without_echo(
        rt, [lambda job=job: move(rt, job, JobStage.SHIPPED) for job in held])
    return items, jobs, kept


async def echo_while_the_writer_is_held(
    rt: Runtime, kept: list[list[EventRecord]]
) -> list[asyncio.Task[None]]:
    """Start the echoes of `kept` while a unit of work holds the writer, once all of
    them wait for the same group commit run; the writer is free when this returns."""
    bridge = rt.services.bridge
    group = bridge.group_commit
    assert group is not None
    async with rt.services.db.unit_of_work() as holder:
        await holder.connection()  # BEGIN IMMEDIATE: the writer is ours
        echoes: list[asyncio.Task[None]] = []

        def queued() -> bool:
            return group.waiting() and group.pending == len(echoes)

        for records in kept:
            echoes.append(asyncio.create_task(bridge.echo_stage_changes(records)))
            await until(queued)
        assert not any(echo.done() for echo in echoes)  # all wait for the writer
    return echoes


@pytest.mark.parametrize("store", ["sqlite"])
async def test_echoes_waiting_for_the_writer_share_one_unit_of_work(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=True)
    items, jobs, kept = await shipped_without_echo(rt, 4)
    group = rt.services.bridge.group_commit
    assert group is not None
    runs = group.runs
    commits = watch_commits(rt)

    echoes = await echo_while_the_writer_is_held(rt, kept)
    await asyncio.wait_for(asyncio.gather(*echoes), DEADLINE)

    assert group.runs == runs + 1
    assert comment_events(commits) == [[item.id for item in items]]  # one commit, in order
    for item, job in zip(items, jobs, strict=True):
        assert await status_of(rt, item.id) == ItemStatus.DONE
        assert [n.body.count("is SHIPPED") for n in await notes(rt, item.id)] == [0, 1]
        assert (await echo_record(rt, job.id))[:3] == (JobStage.SHIPPED, ItemStatus.DONE, 0)
    assert await rt.loops.sweep_echoes_once() == 0


@pytest.mark.parametrize("store", ["sqlite"])
async def test_a_failure_in_a_shared_unit_of_work_holds_back_only_its_own_echo(
    start: Any,
) -> None:
    writer = ItemFaults()
    rt: Runtime = await start(tracker_echo=True, echo_writer=writer)
    items, jobs, kept = await shipped_without_echo(rt, 3)
    failing = items[1]
    writer.failing = {failing.id}
    writer.calls.clear()
    commits = watch_commits(rt)

    echoes = await echo_while_the_writer_is_held(rt, kept)
    await asyncio.wait_for(asyncio.gather(*echoes), DEADLINE)  # no echo raised

    # the shared unit of work wrote nothing; then each job was echoed on its own
    assert comment_events(commits) == [[items[0].id], [items[2].id]]
    assert writer.calls.count(failing.id) == 2  # together, then alone
    assert writer.calls[-3:] == [item.id for item in items]
    for item in (items[0], items[2]):
        assert await status_of(rt, item.id) == ItemStatus.DONE
    assert await status_of(rt, failing.id) == ItemStatus.IN_PROGRESS
    held_back = await load_job(rt, jobs[1].id)
    assert (held_back.echo_retry_stage, held_back.echo_retry_at is not None) == (
        JobStage.SHIPPED, True)
    for job in (jobs[0], jobs[2]):
        assert (await load_job(rt, job.id)).echo_retry_at is None


@pytest.mark.parametrize("store", ["sqlite"])
async def test_a_move_the_item_shows_rides_along_a_waiting_unit_of_work(start: Any) -> None:
    """A move whose change did not read the item (`EventRecord.seen` unset: made in a
    larger unit of work) rides along the unit of work that waits for the writer."""
    rt: Runtime = await start(tracker_echo=True)
    [shipped], _, kept = await shipped_without_echo(rt, 1)
    other = await create(rt, "other")
    job = await ingest(rt, other.id)  # QUEUED: the item goes IN_PROGRESS
    recorded = await echo_record(rt, job.id)
    [assigned] = await commits_without_echo(rt, [lambda: claim(rt)])  # ASSIGNED: nothing new
    kept.append([replace(record, seen=None) for record in assigned])
    bridge = rt.services.bridge
    assert bridge.probes is not None
    probes = bridge.probes.runs
    commits = watch_commits(rt)

    echoes = await echo_while_the_writer_is_held(rt, kept)
    await asyncio.wait_for(asyncio.gather(*echoes), DEADLINE)

    assert bridge.probes.runs == probes  # no read of its own
    assert comment_events(commits) == [[shipped.id]]  # the move wrote nothing
    assert await echo_record(rt, job.id) == recorded  # not even the job's record
    assert (await status_of(rt, other.id), len(await notes(rt, other.id))) == (
        ItemStatus.IN_PROGRESS, 1)
    assert await status_of(rt, shipped.id) == ItemStatus.DONE
    assert await rt.loops.sweep_echoes_once() == 0


@pytest.mark.parametrize("store", ["sqlite"])
async def test_a_move_the_item_shows_is_settled_on_what_its_change_read(start: Any) -> None:
    """The claim's hop read the job's item (`EventRecord.seen`, FLEET_TRACKER_ECHO on):
    its echo has nothing to write and ends at once, with no read of its own and
    without waiting for the writer another unit of work holds."""
    rt: Runtime = await start(tracker_echo=True)
    [shipped], _, kept = await shipped_without_echo(rt, 1)
    other = await create(rt, "other")
    job = await ingest(rt, other.id)  # QUEUED: the item goes IN_PROGRESS
    recorded = await echo_record(rt, job.id)
    [assigned] = await commits_without_echo(rt, [lambda: lone_claim(rt)])  # ASSIGNED
    assert [record.seen is not None for record in assigned] == [True]
    bridge = rt.services.bridge
    assert bridge.probes is not None
    assert bridge.group_commit is not None
    probes, commits = bridge.probes.runs, watch_commits(rt)

    echoes = await echo_while_the_writer_is_held(rt, kept)  # the shipped job's: queued
    async with rt.services.db.unit_of_work() as holder:
        await holder.connection()  # the writer is ours again
        await asyncio.wait_for(bridge.echo_stage_changes(assigned), DEADLINE)
        assert bridge.group_commit.pending == 0  # it never queued for the writer
    await asyncio.wait_for(asyncio.gather(*echoes), DEADLINE)

    assert bridge.probes.runs == probes  # no read of its own
    assert comment_events(commits) == [[shipped.id]]  # the move wrote nothing
    assert await echo_record(rt, job.id) == recorded
    assert await status_of(rt, other.id) == ItemStatus.IN_PROGRESS


@pytest.mark.parametrize("store", ["sqlite"])
async def test_a_commit_with_nothing_to_echo_never_waits_for_a_group(start: Any) -> None:
    """A commit without a tracker-linked job's stage change (an item's, a job without
    an item) returns at once, even while a group commit run waits for the writer."""
    rt: Runtime = await start(tracker_echo=True)
    [shipped], _, kept = await shipped_without_echo(rt, 1)
    other = await create(rt, "no job")
    kept_item = await commits_without_echo(  # an item change: no job event at all
        rt, [lambda: set_status(rt, other.id, ItemStatus.BLOCKED)])
    bridge = rt.services.bridge
    group = bridge.group_commit
    assert group is not None
    async with rt.services.db.unit_of_work() as holder:
        await holder.connection()  # the writer is ours
        echo = asyncio.create_task(bridge.echo_stage_changes(kept[0]))
        await until(lambda: group.waiting() and group.pending == 1)
        for records in (kept_item[0], []):  # while the run still waits
            await asyncio.wait_for(bridge.echo_stage_changes(records), DEADLINE)
        assert group.pending == 1
    await asyncio.wait_for(echo, DEADLINE)
    assert await status_of(rt, shipped.id) == ItemStatus.DONE


async def test_postgres_keeps_a_unit_of_work_per_commits_echo(start: Any, store: str) -> None:
    rt: Runtime = await start(tracker_echo=True)
    assert (rt.services.bridge.group_commit is None) == (store == "postgres")


async def test_the_unlocked_reads_keep_one_connection_until_the_bridge_closes(
    start: Any, store: str,
) -> None:
    """SQLite: the unlocked reads share a connection the bridge keeps until it is
    closed; PostgreSQL: each read checks one out and gives it back (shared, their
    round trips would queue).  The changes here do not read the item themselves
    (`echo_reads` off, as in a larger unit of work), so their echoes read it."""
    rt: Runtime = await start(tracker_echo=True)
    rt.services.fleet.policy = replace(rt.services.fleet.policy, echo_reads=False)
    item = await create(rt)
    job = await ingest(rt, item.id)
    bridge = rt.services.bridge
    pool: Any = rt.services.db.engine.pool
    held = await claim(rt)  # ASSIGNED: the item already shows it, one unlocked read
    await move(rt, held, JobStage.BUILDING)  # another
    assert (await echo_record(rt, job.id))[0] == JobStage.QUEUED  # nothing written
    if store == "postgres":
        assert bridge.probes is None
        assert pool.checkedout() == 0
        return
    assert bridge.probes is not None
    assert bridge.probes.runs == 2
    assert pool.checkedout() == 1
    await bridge.aclose()
    assert pool.checkedout() == 0
    await move(rt, held, JobStage.REVIEW)  # a closed bridge's next read checks one out
    assert pool.checkedout() == 1


async def test_a_driver_error_in_the_item_write_is_sqlalchemys_and_writes_nothing(
    start: Any,
) -> None:
    rt: Runtime = await start()
    item = await create(rt)
    db = rt.services.db

    async def seq() -> int:
        async with db.read() as session:
            value = await session.scalar(
                select(Product.last_event_seq).where(Product.id == PRODUCT))
            return int(value or 0)

    async def two_writes() -> None:
        async with db.unit_of_work() as session:
            await bridge_repository.write_onto_item(  # a good one first
                session, PRODUCT, item.id, previous=ItemStatus.TODO, status=ItemStatus.DONE,
                body="fleetbridge: job 1 is SHIPPED", author="fleetbridge",
                kind=CommentKind.SYSTEM, now=utcnow())
            await bridge_repository.write_onto_item(  # no such item: the comment's FK
                session, PRODUCT, 10_000, previous=ItemStatus.TODO, status=None,
                body="fleetbridge: job 2 is SHIPPED", author="fleetbridge",
                kind=CommentKind.SYSTEM, now=utcnow())

    before = await seq()
    with pytest.raises(IntegrityError):
        await two_writes()
    assert await seq() == before
    assert await status_of(rt, item.id) == ItemStatus.TODO
    async with db.read() as session:
        assert await session.scalar(select(func.count()).select_from(Comment)) == 0


async def test_only_a_unit_of_work_of_one_call_reads_the_item_for_the_echo(
    start: Any, store: str,
) -> None:
    """A claim or a transition in a larger unit of work carries no `EventRecord.seen`:
    another statement of that unit could still change the item before it commits, so
    its echo reads the item for itself.  As the mutation makes them (one call), they
    carry what they read."""
    rt: Runtime = await start(tracker_echo=True)
    for title in ("first", "second"):
        await ingest(rt, (await create(rt, title)).id)
    held: list[Job] = []

    async def plain_claim() -> None:
        held.append(await claim(rt))

    plain = await commits_without_echo(rt, [
        plain_claim, lambda: move(rt, held[0], JobStage.BUILDING)])
    lone = await commits_without_echo(rt, [
        lambda: lone_claim(rt), lambda: lone_move(rt, held[0], JobStage.REVIEW)])
    assert [[record.seen is None for record in commit] for commit in plain] == [[True]] * 2
    assert [[record.seen is not None for record in commit] for commit in lone] == [[True]] * 2
