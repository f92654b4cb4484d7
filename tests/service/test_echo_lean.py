"""PostgreSQL: a commit's one job is echoed by one guarded statement on the driver
(app.bridge.echo_lean), with no transaction of its own besides that statement's.

Pinned here: the statements the echo sends (the read without locks, then the guarded
write, nothing else); the guard locking the item before the job; a person's status
change between the read and the write refusing the write, after which the locked
echo lets the person's status win, exactly as before; the echo's events gap-free,
stored as handed to the hub, and handed over once; a write that fails leaving
nothing behind (not even a sequence number) and being caught up by the sweeper.

Nothing is mocked: concurrent changes come from a connection of the test's own,
held in a transaction, and the one fault is a trigger in the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, update

from app.bridge import echo_apply, echo_groups, echo_lean
from app.bridge import repository as bridge_repository
from app.bridge.echo_rows import EchoRow
from app.db import utcnow
from app.events.models import Event, EventType
from app.events.outbox import EventRecord
from app.fleet import change_groups
from app.fleet.models import Job, JobStage
from app.fleet.service import JobSpec, MetricsDelta
from app.main import Runtime
from app.tracker.models import ItemStatus
from tests.conftest import PG_DSN
from tests.service.test_cycle import statements
from tests.service.test_echo import (
    DEADLINE,
    PRODUCT,
    WORKER,
    create,
    echo_record,
    ingest,
    load_job,
    lone_claim,
    lone_move,
    notes,
    start,
    status_of,
    submit_for,
)

__all__ = ["start"]  # the fixture, shared with tests/service/test_echo.py
pytestmark = pytest.mark.parametrize("store", ["postgres"])
LOCK_WAITS = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
              " AND datname = $1")


def handed_over(rt: Runtime) -> list[list[EventRecord]]:
    """Every list of events handed to the commit hook from now on (the hub's
    publishing and the echo), one list per call."""
    calls: list[list[EventRecord]] = []
    hook = rt.services.db.on_commit
    assert hook is not None

    async def seen(records: Sequence[EventRecord]) -> None:
        calls.append(list(records))
        await hook(records)

    rt.services.db.on_commit = seen
    return calls


async def stored_events(rt: Runtime, after: int) -> list[tuple[Any, ...]]:
    async with rt.services.db.read() as session:
        rows = (await session.execute(
            select(Event).where(Event.product_id == PRODUCT, Event.seq > after)
            .order_by(Event.seq))).scalars().all()
    return [(e.seq, e.type, e.entity_id, e.from_state, e.to_state, e.payload) for e in rows]


async def last_seq(connection: asyncpg.Connection) -> int:
    seq: int = await connection.fetchval(
        "SELECT last_event_seq FROM products WHERE id = $1", PRODUCT)
    return seq


async def wait_for_a_lock_wait(probe: asyncpg.Connection, database: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while await probe.fetchval(LOCK_WAITS, database) == 0:
        assert asyncio.get_running_loop().time() < deadline, "nothing ever waited"
        await asyncio.sleep(0.01)


async def submit_unlinked(rt: Runtime) -> Job:
    """A job of the product with no tracker item."""
    async with rt.services.db.unit_of_work() as session:
        result = await rt.services.fleet.submit_job(
            session, PRODUCT, JobSpec(title="no item", body_md="no item"))
    return result.job


@pytest.fixture
async def side(start: Any) -> Any:
    """The runtime (echo on) and two connections of the test's own to its database."""
    rt: Runtime = await start(tracker_echo=True)
    database = rt.services.db.engine.url.database
    assert database is not None
    holder = await asyncpg.connect(f"{PG_DSN}/{database}")
    probe = await asyncpg.connect(f"{PG_DSN}/{database}")
    try:
        yield rt, holder, probe, database
    finally:
        await holder.close()
        await probe.close()


async def test_the_end_is_echoed_by_one_guarded_write_on_what_the_transition_read(
    side: Any,
) -> None:
    rt, _, probe, _ = side
    item = await create(rt)
    job = await ingest(rt, item.id)
    held = await lone_claim(rt)
    before = await last_seq(probe)
    calls = handed_over(rt)
    written = echo_lean.STATS.written

    with statements(rt) as sent:
        await lone_move(rt, held, JobStage.SHIPPED)

    transition, *echo = sent  # the transition's statement reads the item for the echo
    assert "LEFT JOIN items ON items.id = change.tracker_item_id" in transition
    assert len(echo) == 1, sent  # nothing read again: the guarded write alone
    assert echo[0].startswith("WITH guard AS (SELECT")
    assert "FOR UPDATE OF items, jobs" in echo[0]
    assert echo_lean.STATS.written == written + 1
    assert await status_of(rt, item.id) == ItemStatus.DONE
    assert [n.body.count("is SHIPPED; item set to DONE") for n in await notes(rt, item.id)] == [
        0, 1]
    assert (await echo_record(rt, job.id)) == (JobStage.SHIPPED, ItemStatus.DONE, 0, None, None)
    # the transition's commit, then the echo's: each handed over once, as stored, gap-free
    handed = [r for call in calls for r in call]
    assert [[r.type for r in call] for call in calls] == [
        [EventType.JOB_STAGE_CHANGED],
        [EventType.ITEM_STATUS_CHANGED, EventType.COMMENT_ADDED]]
    assert [(r.seq, r.type, r.entity_id, r.from_state, r.to_state, r.payload)
            for r in handed] == await stored_events(rt, before)
    assert [r.seq for r in handed] == [before + 1, before + 2, before + 3]
    assert await last_seq(probe) == before + 3
    assert await rt.loops.sweep_echoes_once() == 0


async def test_the_guard_locks_the_item_before_the_job(side: Any) -> None:
    rt, holder, probe, database = side
    item = await create(rt)
    await ingest(rt, item.id)
    held = await lone_claim(rt)
    hook, rt.services.db.on_commit = rt.services.db.on_commit, None
    await lone_move(rt, held, JobStage.SHIPPED)  # not echoed: that is left to the test
    rt.services.db.on_commit = hook
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", held.id)
    echo = asyncio.create_task(echo_lean.echo_alone(rt.services.db, PRODUCT, held.id))
    await wait_for_a_lock_wait(probe, database)  # the guard waits for the job ...
    with pytest.raises(asyncpg.LockNotAvailableError):  # ... holding its item
        await probe.execute("SELECT 1 FROM items WHERE id = $1 FOR UPDATE NOWAIT", item.id)
    await transaction.rollback()
    assert await asyncio.wait_for(echo, DEADLINE) is True
    assert await status_of(rt, item.id) == ItemStatus.DONE


async def test_a_persons_status_set_between_read_and_write_wins(side: Any) -> None:
    """The read sees the item IN_PROGRESS (the bridge's); before the write takes its
    locks a person sets BLOCKED.  The guard refuses, nothing of the write is kept,
    and the echo under lock comments and leaves the person's status alone."""
    rt, holder, probe, database = side
    item = await create(rt)
    job = await ingest(rt, item.id)
    held = await lone_claim(rt)
    before = await last_seq(probe)
    refused = echo_lean.STATS.refused
    calls = handed_over(rt)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("SELECT 1 FROM items WHERE id = $1 FOR UPDATE", item.id)

    shipping = asyncio.create_task(lone_move(rt, held, JobStage.SHIPPED))
    await wait_for_a_lock_wait(probe, database)  # the guarded write waits for the item
    await holder.execute("UPDATE items SET status = 'BLOCKED' WHERE id = $1", item.id)
    await transaction.commit()
    await asyncio.wait_for(shipping, DEADLINE)

    assert echo_lean.STATS.refused == refused + 1
    assert await status_of(rt, item.id) == ItemStatus.BLOCKED  # the person's status wins
    final = [n.body for n in await notes(rt, item.id) if "is SHIPPED" in n.body]
    assert len(final) == 1
    assert "the item's status is left as is" in final[0]
    assert (await echo_record(rt, job.id))[:2] == (JobStage.SHIPPED, ItemStatus.DONE)
    # one comment event, right after the transition's: the refused write took no number
    assert [[r.type for r in call] for call in calls] == [
        [EventType.JOB_STAGE_CHANGED], [EventType.COMMENT_ADDED]]
    assert [r.seq for call in calls for r in call] == [before + 1, before + 2]
    assert await last_seq(probe) == before + 2
    assert [e[0] for e in await stored_events(rt, before)] == [before + 1, before + 2]
    assert await rt.loops.sweep_echoes_once() == 0


async def test_a_failed_write_leaves_nothing_and_the_sweeper_catches_up(side: Any) -> None:
    rt, holder, probe, _ = side
    item = await create(rt)
    job = await ingest(rt, item.id)
    held = await lone_claim(rt)
    await holder.execute("""
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'the tracker refuses comments'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON comments FOR EACH ROW EXECUTE FUNCTION refuse();
    """)
    before = await last_seq(probe)
    calls = handed_over(rt)
    failures = [0]
    rt.services.bridge.on_echo_failure = lambda: failures.__setitem__(0, failures[0] + 1)

    shipped = await lone_move(rt, held, JobStage.SHIPPED)  # the transition stands

    assert (shipped.stage, (await load_job(rt, job.id)).stage) == (JobStage.SHIPPED,) * 2
    assert failures == [1]
    assert await status_of(rt, item.id) == ItemStatus.IN_PROGRESS  # nothing half-written
    assert ["is SHIPPED" in n.body for n in await notes(rt, item.id)] == [False]
    record = await echo_record(rt, job.id)
    assert record[:3] == (JobStage.QUEUED, ItemStatus.IN_PROGRESS, 1)  # ASSIGNED was covered
    assert (record[3] is not None, record[4]) == (True, JobStage.SHIPPED)
    assert [[r.type for r in call] for call in calls] == [[EventType.JOB_STAGE_CHANGED]]
    assert await last_seq(probe) == before + 1  # no number taken for the failed write

    await holder.execute("DROP TRIGGER refuse ON comments")
    async with rt.services.db.unit_of_work() as session:
        await session.execute(update(Job).where(Job.id == job.id).values(
            echo_retry_at=utcnow() - timedelta(seconds=1)))
    assert await rt.loops.sweep_echoes_once() == 1
    assert await status_of(rt, item.id) == ItemStatus.DONE
    assert [n.body.count("is SHIPPED") for n in await notes(rt, item.id)] == [0, 1]
    assert await echo_record(rt, job.id) == (JobStage.SHIPPED, ItemStatus.DONE, 0, None, None)
    assert [e[0] for e in await stored_events(rt, before)] == [
        before + 1, before + 2, before + 3]
    assert await rt.loops.sweep_echoes_once() == 0


async def test_concurrent_end_echoes_of_a_product_commit_in_one_batch(side: Any) -> None:
    """While one echo write of the product runs (held here at the product row), the
    next ones queue and then commit together in one transaction; a member whose item
    someone holds is skipped by the batch and runs alone once the item is free.
    Every echo's events are consecutive, gap-free and handed over once."""
    rt, holder, probe, database = side
    items = [await create(rt, f"item {n}") for n in range(4)]
    for item in items:
        await ingest(rt, item.id)
    held = [await lone_claim(rt) for _ in items]
    hook, rt.services.db.on_commit = rt.services.db.on_commit, None
    for job in held:
        await lone_move(rt, job, JobStage.SHIPPED)  # not echoed: that is left to the test
    rt.services.db.on_commit = hook
    before = await last_seq(probe)
    calls = handed_over(rt)
    stats = echo_groups.STATS
    batches, batched, again = stats.batches, stats.batched, stats.again
    other = await asyncpg.connect(f"{PG_DSN}/{database}")
    try:
        product, item = holder.transaction(), other.transaction()
        await product.start()
        await holder.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", PRODUCT)
        first = asyncio.create_task(echo_lean.echo_alone(rt.services.db, PRODUCT, held[0].id))
        await wait_for_a_lock_wait(probe, database)  # the first write waits, alone
        await item.start()  # someone holds the last job's item
        await other.execute("SELECT 1 FROM items WHERE id = $1 FOR UPDATE", items[3].id)
        rest = [asyncio.create_task(echo_lean.echo_alone(rt.services.db, PRODUCT, job.id))
                for job in held[1:]]
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while change_groups.queued(PRODUCT) < 3:
            assert asyncio.get_running_loop().time() < deadline, "the writes never queued"
            await asyncio.sleep(0.01)
        await product.rollback()
        assert await asyncio.wait_for(first, DEADLINE) is True
        await wait_for_a_lock_wait(probe, database)  # the skipped one, alone, waits
        await item.rollback()
        assert await asyncio.wait_for(asyncio.gather(*rest), DEADLINE) == [True] * 3
    finally:
        await other.close()

    assert (stats.batches, stats.batched, stats.again) == (batches + 1, batched + 3, again + 1)
    assert [await status_of(rt, item.id) for item in items] == [ItemStatus.DONE] * 4
    # each caller hands over its own echo's events once its write committed (batch
    # members in the order they queued): together exactly what the log holds
    handed = sorted((r for call in calls for r in call), key=lambda r: r.seq)
    assert [(r.seq, r.type, r.entity_id, r.from_state, r.to_state, r.payload)
            for r in handed] == await stored_events(rt, before)
    assert [r.seq for r in handed] == list(range(before + 1, before + 9))
    assert [[r.type for r in call] for call in calls] == [
        [EventType.ITEM_STATUS_CHANGED, EventType.COMMENT_ADDED]] * 4
    seqs = {call[0].entity_id: [r.seq for r in call] for call in calls}
    assert all(second == first + 1 for first, second in seqs.values())  # consecutive
    assert (seqs[items[0].id][0], seqs[items[3].id][0]) == (before + 1, before + 7)
    assert await last_seq(probe) == before + 8
    assert await rt.loops.sweep_echoes_once() == 0


async def test_reads_pending_at_once_share_one_round_trip(side: Any) -> None:
    """While one echo's read is in flight, the next ones queue and then run together
    (one fetchmany); each gets exactly its own row, as the read alone gives it."""
    rt, _, _, _ = side
    items = [await create(rt, f"item {n}") for n in range(3)]
    jobs = [await ingest(rt, item.id) for item in items]
    plain = await submit_unlinked(rt)
    engine = rt.services.db.engine
    asked = [(PRODUCT, job.id) for job in jobs] + [(PRODUCT, plain.id), ("globex", jobs[0].id)]
    stats = echo_groups.STATS
    batches, batched = stats.read_batches, stats.reads_batched

    with statements(rt) as sent:
        got = await asyncio.gather(*(echo_groups.read(engine, echo_lean._READ, product, job_id)
                                     for product, job_id in asked))

    assert (stats.read_batches, stats.reads_batched) == (batches + 1, batched + 4)
    assert len(sent) == 2  # the first read alone, then the four that queued meanwhile
    alone = await bridge_repository.echo_rows_unlocked(engine, PRODUCT, [j.id for j in jobs])
    assert [[EchoRow(*row) for row in rows] for rows in got] == [
        [row] for row in alone] + [[], []]  # no item; not that product's job


async def test_with_the_echo_off_a_transition_reads_no_item(start: Any) -> None:
    rt: Runtime = await start(tracker_echo=False)
    item = await create(rt)
    await ingest(rt, item.id)
    held = await lone_claim(rt)
    with statements(rt) as sent:
        await lone_move(rt, held, JobStage.BUILDING)
    assert len(sent) == 1
    assert "items" not in sent[0]


async def test_what_the_transition_read_is_what_the_echos_read_gives(side: Any) -> None:
    """`seen_row` of the transition's row equals the echo's own read right after the
    commit: the same values, converted the same way (enums, UTC datetimes, floats,
    NULLs), for the latest job and for an older one."""
    rt, _, _, _ = side
    item = await create(rt)
    older = await ingest(rt, item.id)
    held = await lone_claim(rt)
    records: list[EventRecord] = []

    async def keep(committed: Sequence[EventRecord]) -> None:
        records.extend(committed)

    rt.services.db.after_commit = keep
    hook, rt.services.db.on_commit = rt.services.db.on_commit, None  # no echo meanwhile
    await lone_move(rt, held, JobStage.BUILDING)
    await submit_for(rt, item.id, "a newer job")  # `older` is no longer the latest
    await lone_move(rt, held, JobStage.SHIPPED,
               metrics=MetricsDelta(cost_usd=0.125, tokens_in=7, tokens_out=3))
    rt.services.db.on_commit = hook

    seen = [r.seen for r in records if r.type == EventType.JOB_STAGE_CHANGED]
    assert len(seen) == 2
    assert all(s is not None for s in seen)
    [read] = await bridge_repository.echo_rows_unlocked(rt.services.db.engine, PRODUCT,
                                                        [older.id])
    last = echo_apply.seen_row(seen[-1])
    assert last == read
    assert (last.latest, last.stage, last.cost_usd, last.tokens_out) == (
        False, JobStage.SHIPPED, 0.125, 3)
    assert last.finished_at is not None
    assert last.finished_at.utcoffset() == timedelta(0)
    assert echo_apply.seen_row(seen[0]).latest is True


async def test_a_claim_and_a_move_the_item_shows_send_nothing_for_their_echo(
    side: Any,
) -> None:
    """Their statements read the item for the echo, which then finds nothing to write
    (decided on what they read, `echo_apply.nothing_to_write_seen`, before any echo
    path) and sends nothing at all."""
    rt, _, _, _ = side
    item = await create(rt)
    job = await ingest(rt, item.id)
    recorded = await echo_record(rt, job.id)
    nothing = echo_lean.STATS.nothing
    settled = echo_apply.settled_count()
    with statements(rt) as sent:
        async with rt.services.db.unit_of_work(one_call=True) as session:
            held = await rt.services.fleet.claim_next_job(session, PRODUCT, WORKER)
        assert held is not None
        async with rt.services.db.unit_of_work(one_call=True) as session:
            await rt.services.fleet.transition_job(
                session, PRODUCT, held.id, held.lease_fence, JobStage.BUILDING)
    assert echo_apply.settled_count() == settled + 2
    assert echo_lean.STATS.nothing == nothing  # settled before the lean echo
    assert all("LEFT JOIN items ON items.id = change.tracker_item_id" in statement
               for statement in sent if "INSERT INTO events" in statement)
    assert not [s for s in sent if "FROM jobs JOIN items" in s or s.startswith("WITH guard")]
    assert await echo_record(rt, job.id) == recorded
