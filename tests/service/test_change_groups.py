"""Group commit of a product's changes on PostgreSQL (app.fleet.change_groups).

Every test forces the interleaving it needs: another transaction holds the product
row, so the first transition (alone) waits for it on the server while the next ones
queue behind it in this process (`queued`); letting the row go then commits the
first alone and the queued ones as one batch.  Nothing is mocked: the faults are a
statement the server refuses (a bigint overflow) and a backend terminated while the
batch waits.

* the queued changes commit in one batch (`STATS`), each caller gets its own job,
  the sequence stays gap-free and every event is published once, in order;
* a refused member gets the same CONFLICT as alone and changes nothing, the others
  commit; a batch the server fails runs each member alone, so only the bad one fails;
* two changes of one job never share a batch;
* a batch skips a job another transaction holds (SKIP LOCKED) and runs it alone after
  committing, instead of holding the product row while it waits (a deadlock);
* a change made while a batch is in flight queues behind it; another product's change
  never queues behind this one's, nor another runtime's (engine's);
* a caller cancelled while queued still gets its committed change published;
* a connection lost mid-batch is SERVICE_UNAVAILABLE for each member, run again for
  none (the batch may have committed).

The commit order under concurrent claimers on two instances, batches included, is
tests/service/test_cycle.py `test_event_sequence_is_gap_free_under_concurrent_claimers`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, text, update

from app.auth.models import Product, Role
from app.errors import ConflictError, StoreUnavailableError
from app.fleet import change_groups
from app.fleet.change_groups import STATS, queued
from app.fleet.models import Job, JobStage
from app.fleet.service import MetricsDelta
from app.main import Runtime
from tests.service.test_cycle import columns, last_seq, load, stored_events
from tests.service.test_lone import WORKER, claim, one_call, publishing, submit

PRODUCT = "acme"
OTHER = "beta"
DEADLINE = 20.0
pytestmark = pytest.mark.parametrize("store", ["postgres"])


async def until(condition: Callable[[], Awaitable[bool] | bool]) -> None:
    """Poll `condition` (the server's lock waits, this process's queue) until it holds."""
    async with asyncio.timeout(DEADLINE):
        while True:
            holds = condition()
            if holds if isinstance(holds, bool) else await holds:
                return
            await asyncio.sleep(0.01)


async def lock_waiters(rt: Runtime) -> list[int]:
    """The backends of the lean path's statements waiting for a lock."""
    async with rt.services.db.read() as session:
        return list((await session.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE 'WITH clock%'"))).scalars())


@asynccontextmanager
async def product_held(rt: Runtime) -> AsyncIterator[Any]:
    """Another transaction holds the product row (whose sequence every event bumps)."""
    async with rt.services.db.read() as blocker:
        await blocker.execute(
            select(Product.id).where(Product.id == PRODUCT).with_for_update())
        yield blocker


async def claimed(rt: Runtime, count: int) -> list[Job]:
    for n in range(count):
        await submit(rt, title=f"job {n}")
    return [await claim(rt) for _ in range(count)]


def move(rt: Runtime, job: Job, to: JobStage = JobStage.BUILDING, *, fence: int | None = None,
         **kw: Any) -> asyncio.Task[Any]:
    return asyncio.create_task(one_call(
        rt, "transition_job", job.id, job.lease_fence if fence is None else fence, to, **kw))


async def first_then_queued(rt: Runtime, first: asyncio.Task[Any],
                            make_rest: Callable[[], list[asyncio.Task[Any]]]
                            ) -> list[asyncio.Task[Any]]:
    """`first` waits on the server for the (held) product row; then the tasks of
    `make_rest` queue behind it in this process."""
    await until(lambda: _waiting(rt))
    rest = make_rest()
    await until(lambda: queued(PRODUCT) == len(rest))
    return rest


async def _waiting(rt: Runtime) -> bool:
    return bool(await lock_waiters(rt))


async def _lock_waiting(rt: Runtime, pid: int) -> bool:
    async with rt.services.db.read() as session:
        return bool((await session.execute(text(
            "SELECT 1 FROM pg_stat_activity WHERE pid = :pid AND wait_event_type = 'Lock'"),
            {"pid": pid})).first())


async def _queued_or_waiting(rt: Runtime, waiters: int) -> bool:
    """A change queued in this process, or `waiters` of them waiting on the server."""
    return queued(PRODUCT) > 0 or len(await lock_waiters(rt)) >= waiters


def _pending() -> int:
    """Changes waiting in any group of this process."""
    return sum(flight.group.pending for flight in change_groups._FLIGHTS.values())


@asynccontextmanager
async def job_held(rt: Runtime, job: Job) -> AsyncIterator[Any]:
    """Another transaction holds `job`'s row, as a change of it on the general path
    does before it bumps the product's sequence."""
    async with rt.services.db.read() as holder:
        await holder.execute(select(Job.id).where(Job.id == job.id).with_for_update())
        yield holder


async def test_queued_transitions_commit_as_one_batch(runtime: Runtime) -> None:
    jobs = await claimed(runtime, 6)
    published = publishing(runtime)
    before = (STATS.batches, STATS.batched)
    seq = await last_seq(runtime)
    async with product_held(runtime) as blocker:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [move(runtime, j) for j in jobs[1:]])
        await blocker.rollback()
    moved = await asyncio.gather(first, *rest)
    assert (STATS.batches, STATS.batched) == (before[0] + 1, before[1] + 5)
    assert [job.id for job in moved] == [job.id for job in jobs]  # each caller its own
    for job in moved:
        assert job.stage == JobStage.BUILDING
        assert columns(job) == columns(await load(runtime, job.id))
    stored = await stored_events(runtime)
    assert [e.seq for e in stored] == list(range(1, seq + 7))
    assert stored[-6].entity_id == jobs[0].id  # the first, alone, first
    assert sorted(e.entity_id for e in stored[-5:]) == sorted(j.id for j in jobs[1:])
    assert sorted(published, key=lambda e: e.seq) == stored[-6:]


async def test_moves_to_different_stages_share_a_batch_and_each_lands_as_alone(
    runtime: Runtime,
) -> None:
    """One statement serves every target stage on PostgreSQL: moves to BUILDING,
    SHIPPED and FAILED queue together and commit as one batch, each with what its
    target does to the lease, `finishedAt` and the reason; a move the graph refuses
    (BUILDING → BUILDING) is refused as ever."""
    jobs = await claimed(runtime, 5)
    await move(runtime, jobs[4])  # BUILDING, and BUILDING → BUILDING is not a move
    before = (STATS.batches, STATS.batched)
    async with product_held(runtime) as blocker:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [
            move(runtime, jobs[1], JobStage.SHIPPED),
            move(runtime, jobs[2], JobStage.FAILED, reason="gave up"),
            move(runtime, jobs[3], JobStage.REVIEW),
            move(runtime, jobs[4], JobStage.BUILDING)])
        await blocker.rollback()
    outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert (STATS.batches, STATS.batched) == (before[0] + 1, before[1] + 4)
    assert isinstance(outcomes[4], ConflictError)
    moved = outcomes[:4]
    assert [job.stage for job in moved] == [
        JobStage.BUILDING, JobStage.SHIPPED, JobStage.FAILED, JobStage.REVIEW]
    for job in moved:
        assert columns(job) == columns(await load(runtime, job.id))
    ended = [(job.lease_worker_id is None, job.finished_at is not None) for job in moved]
    assert ended == [(False, False), (True, True), (True, True), (False, False)]
    assert [job.failure_reason for job in moved] == [None, None, "gave up", None]
    assert (await load(runtime, jobs[4].id)).stage == JobStage.BUILDING
    stored = await stored_events(runtime)
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))


async def test_a_refused_member_is_refused_as_alone_and_the_others_commit(
    runtime: Runtime,
) -> None:
    jobs = await claimed(runtime, 4)
    untouched = columns(await load(runtime, jobs[2].id))
    async with product_held(runtime) as blocker:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [
            move(runtime, jobs[1]), move(runtime, jobs[2], fence=jobs[2].lease_fence - 1),
            move(runtime, jobs[3])])
        await blocker.rollback()
    outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert isinstance(outcomes[2], ConflictError)
    assert "stale fence" in str(outcomes[2])
    assert [o.stage for i, o in enumerate(outcomes) if i != 2] == [JobStage.BUILDING] * 3
    assert columns(await load(runtime, jobs[2].id)) == untouched
    stored = await stored_events(runtime)
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
    assert jobs[2].id not in [e.entity_id for e in stored[-3:]]


async def test_a_batch_the_server_fails_runs_each_member_alone(runtime: Runtime) -> None:
    jobs = await claimed(runtime, 4)
    async with runtime.services.db.unit_of_work() as session:
        await session.execute(update(Job).where(Job.id == jobs[2].id).values(tokens_in=1))
    overflow = MetricsDelta(tokens_in=2**63 - 1)  # 1 + that: bigint out of range
    with pytest.raises(asyncpg.NumericValueOutOfRangeError) as alone:
        await one_call(runtime, "transition_job", jobs[2].id, jobs[2].lease_fence,
                       JobStage.BUILDING, metrics=overflow)
    failed = STATS.failed
    async with product_held(runtime) as blocker:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [
            move(runtime, jobs[1]), move(runtime, jobs[2], metrics=overflow),
            move(runtime, jobs[3])])
        await blocker.rollback()
    outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert STATS.failed == failed + 1
    assert type(outcomes[2]) is alone.type
    assert str(outcomes[2]) == str(alone.value)
    assert [o.stage for i, o in enumerate(outcomes) if i != 2] == [JobStage.BUILDING] * 3
    assert (await load(runtime, jobs[2].id)).stage == JobStage.ASSIGNED
    stored = await stored_events(runtime)
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))


async def test_two_changes_of_one_job_never_share_a_batch(runtime: Runtime) -> None:
    jobs = await claimed(runtime, 3)
    before = (STATS.batches, STATS.batched)
    async with product_held(runtime) as blocker:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [
            move(runtime, jobs[1]), move(runtime, jobs[1]), move(runtime, jobs[2])])
        await blocker.rollback()
    outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert (STATS.batches, STATS.batched) == (before[0] + 1, before[1] + 2)
    # jobs[1]'s first change commits in the batch; its second, alone, is refused
    assert outcomes[1].stage == JobStage.BUILDING
    assert isinstance(outcomes[2], ConflictError)
    assert "from BUILDING to BUILDING" in str(outcomes[2])
    assert outcomes[3].stage == JobStage.BUILDING
    assert [e.entity_id for e in await stored_events(runtime)].count(jobs[1].id) == 3


async def test_a_batch_skips_a_job_another_transaction_holds_instead_of_deadlocking(
    runtime: Runtime,
) -> None:
    jobs = await claimed(runtime, 3)
    before = (STATS.failed, STATS.again)
    async with product_held(runtime) as blocker, job_held(runtime, jobs[2]) as holder:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [
            move(runtime, jobs[1]), move(runtime, jobs[2])])
        await blocker.rollback()
        await first
        await until(lambda: _waiting(runtime))  # jobs[2]'s change waits for its row
        # the holder now wants the product row, as its event would: the batch must
        # not be holding it while it waits for the job (a deadlock, one side aborted)
        await holder.execute(
            select(Product.id).where(Product.id == PRODUCT).with_for_update())
        await holder.rollback()
    moved = await asyncio.gather(*rest)
    assert (STATS.failed, STATS.again) == (before[0], before[1] + 1)
    assert [job.stage for job in moved] == [JobStage.BUILDING] * 2
    stored = await stored_events(runtime)
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
    assert [e.entity_id for e in stored[-3:]] == [j.id for j in jobs]


async def test_a_change_made_while_a_batch_is_in_flight_queues_behind_it(
    runtime: Runtime,
) -> None:
    jobs = await claimed(runtime, 4)
    before = (STATS.batches, STATS.batched)
    async with product_held(runtime) as blocker, runtime.services.db.read() as other:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [
            move(runtime, jobs[1]), move(runtime, jobs[2])])
        # another transaction queues for the product row behind the first, so that the
        # batch, sent once the first has committed, waits on the server for it
        pid = (await other.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        other_holds = asyncio.create_task(other.execute(
            select(Product.id).where(Product.id == PRODUCT).with_for_update()))
        await until(lambda: _lock_waiting(runtime, pid))
        await blocker.rollback()
        await first
        await other_holds
        await until(lambda: _waiting(runtime))  # the batch, holding the flight
        late = move(runtime, jobs[3])
        await until(lambda: _queued_or_waiting(runtime, 2))
        assert queued(PRODUCT) == 1  # behind the batch, not beside it on the server
        await other.rollback()
    moved = await asyncio.gather(*rest, late)
    assert [job.stage for job in moved] == [JobStage.BUILDING] * 3
    assert (STATS.batches, STATS.batched) == (before[0] + 1, before[1] + 2)
    assert not change_groups._FLIGHTS


async def test_another_products_change_never_waits_for_this_ones(
    runtime: Runtime, make_token: Any,
) -> None:
    await make_token(OTHER, Role.WORKER)
    jobs = await claimed(runtime, 1)
    await submit(runtime, product=OTHER)
    other_job: Job = await one_call(runtime, "claim_next_job", WORKER, product=OTHER)
    async with product_held(runtime) as blocker:
        first = move(runtime, jobs[0])
        await until(lambda: _waiting(runtime))
        elsewhere = asyncio.create_task(one_call(
            runtime, "transition_job", other_job.id, other_job.lease_fence, JobStage.BUILDING,
            product=OTHER))
        await until(lambda: elsewhere.done() or _pending() > 0)
        assert _pending() == 0  # it did not queue behind acme's change: it ran alone
        assert (await elsewhere).stage == JobStage.BUILDING
        await blocker.rollback()
    assert (await first).stage == JobStage.BUILDING
    assert [e.seq for e in await stored_events(runtime, OTHER)] == [1, 2, 3]


async def test_another_runtimes_change_never_queues_behind_this_ones(
    runtime: Runtime, make_runtime: Any,
) -> None:
    """Two runtimes in one process (two engines, as on two instances): each groups its
    own changes — a group runs what it took on its own engine's pool and database."""
    other = await make_runtime()
    jobs = await claimed(runtime, 2)
    async with product_held(runtime) as blocker:
        first = move(runtime, jobs[0])
        await until(lambda: _waiting(runtime))
        beside = move(other, jobs[1])
        await until(lambda: _queued_or_waiting(runtime, 2))
        assert queued(PRODUCT) == 0  # on the server beside the first, alone
        await blocker.rollback()
    moved = await asyncio.gather(first, beside)
    assert [job.stage for job in moved] == [JobStage.BUILDING] * 2
    assert not change_groups._FLIGHTS


async def test_a_caller_cancelled_while_queued_still_publishes_what_committed(
    runtime: Runtime,
) -> None:
    jobs = await claimed(runtime, 3)
    published = publishing(runtime)
    async with product_held(runtime) as blocker:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [
            move(runtime, jobs[1]), move(runtime, jobs[2])])
        rest[0].cancel()
        await asyncio.sleep(0)
        assert not rest[0].done()  # it waits for its change to run
        await blocker.rollback()
    with pytest.raises(asyncio.CancelledError):
        await rest[0]
    await asyncio.gather(first, rest[1])
    assert (await load(runtime, jobs[1].id)).stage == JobStage.BUILDING
    assert sorted(e.entity_id for e in published) == sorted(j.id for j in jobs)


async def test_a_connection_lost_mid_batch_is_unavailable_and_runs_nothing_again(
    runtime: Runtime,
) -> None:
    jobs = await claimed(runtime, 3)
    seq, failed = await last_seq(runtime), STATS.failed
    async with product_held(runtime), runtime.services.db.read() as admin:
        first = move(runtime, jobs[0])
        rest = await first_then_queued(runtime, first, lambda: [
            move(runtime, jobs[1]), move(runtime, jobs[2])])
        killed: list[int] = []
        pids: list[int] = []

        async def another() -> bool:
            pids[:] = [p for p in await lock_waiters(runtime) if p not in killed]
            return bool(pids)

        for task in (first, rest[0]):  # the first alone, then the batch, cut off

            await until(another)
            killed.extend(pids)
            await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pids[0]})
            await until(task.done)
    outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert all(isinstance(o, StoreUnavailableError) for o in outcomes), outcomes
    assert STATS.failed == failed  # not run again
    assert await last_seq(runtime) == seq
    for job in jobs:
        assert (await load(runtime, job.id)).stage == JobStage.ASSIGNED
    # and the product's changes go on as usual
    assert (await one_call(runtime, "transition_job", jobs[0].id, jobs[0].lease_fence,
                           JobStage.BUILDING)).stage == JobStage.BUILDING
    assert not change_groups._FLIGHTS
