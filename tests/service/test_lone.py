"""A unit of work of one call (`unit_of_work(one_call=True)`, app.lone) on both stores.

On PostgreSQL the lease holder's call then runs on the driver, a transition as one
statement that is its own transaction.  These tests hold it to the contract of any
unit of work:

* the same answers, refusals (NOT_FOUND / CONFLICT, same messages) and stored rows
  as a unit of work of several calls, on both stores;
* cursors stay gap-free and in commit order (tests/service/test_cycle.py,
  `test_event_sequence_is_gap_free_under_concurrent_claimers[one-call]`, and
  `[batched]` for group commit, tests/service/test_change_groups.py);
* once the call has changed something the session takes no further statement, and
  what it committed is still published;
* a caller cancelled while its statement runs still gets its committed change
  published;
* a pooled connection found dead when handed out is replaced once, not an error.
* the claim alone keeps SKIP LOCKED; a call after another statement joins the
  session's transaction instead of running alone; a COMMIT that fails publishes
  nothing and stores nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Role
from app.errors import ConflictError, NotFoundError, StoreUnavailableError
from app.events.outbox import EventRecord
from app.fleet.models import Job, JobStage
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec
from app.lone import LONE_KEY, LoneUnit
from app.main import Runtime
from tests.service.test_cycle import columns, last_seq, load, statements, stored_events

PRODUCT = "acme"
OTHER = "globex"
WORKER = WorkerProfile("worker-1")
DEADLINE = 20.0
postgres_only = pytest.mark.parametrize("store", ["postgres"])


async def one_call(rt: Runtime, name: str, *args: Any, product: str = PRODUCT,
                   **kw: Any) -> Any:
    async with rt.services.db.unit_of_work(one_call=True) as session:
        return await getattr(rt.services.fleet, name)(session, product, *args, **kw)


async def submit(rt: Runtime, product: str = PRODUCT, **fields: Any) -> Job:
    fields.setdefault("title", "a job")
    fields.setdefault("body_md", "do the thing")
    async with rt.services.db.unit_of_work() as session:
        result = await rt.services.fleet.submit_job(session, product, JobSpec(**fields))
    return result.job


async def claim(rt: Runtime) -> Job:
    job: Job | None = await one_call(rt, "claim_next_job", WORKER)
    assert job is not None
    return job


# -- the same answers as ever ----------------------------------------------------


async def test_the_lease_holders_calls_answer_and_store_as_ever(
    runtime: Runtime, store: str,
) -> None:
    published: list[EventRecord] = []

    async def keep(records: Any) -> None:
        published.extend(records)

    runtime.services.db.after_commit = keep
    job = await submit(runtime, budget=1.0)
    invalidated: list[Any] = []
    pools = {runtime.services.db.engine.sync_engine.pool}
    if (writer := runtime.services.db.writer_engine) is not None:
        pools.add(writer.sync_engine.pool)  # SQLite: the one writer connection
    for pool in pools:
        event.listen(pool, "invalidate", lambda *args: invalidated.append(args))
    with statements(runtime) as sent:
        claimed = await claim(runtime)
        fence = claimed.lease_fence
        returned = [
            claimed,
            await one_call(runtime, "heartbeat", job.id, fence, lease_seconds=600),
            await one_call(runtime, "transition_job", job.id, fence, JobStage.BUILDING),
            await one_call(runtime, "release_job", job.id, fence, "stopping"),
        ]
    again = await claim(runtime)
    shipped = await one_call(runtime, "transition_job", job.id, again.lease_fence,
                             JobStage.SHIPPED)
    assert columns(shipped) == columns(await load(runtime, job.id))
    assert [row.stage for row in returned] == [
        JobStage.ASSIGNED, JobStage.ASSIGNED, JobStage.BUILDING, JobStage.QUEUED]
    assert all(row.updated_at.tzinfo is not None for row in returned)
    stored = await stored_events(runtime)
    assert published == stored
    assert [(e.seq, e.from_state, e.to_state) for e in stored] == [
        (1, None, "QUEUED"), (2, "QUEUED", "ASSIGNED"), (3, "ASSIGNED", "BUILDING"),
        (4, "BUILDING", "QUEUED"), (5, "QUEUED", "ASSIGNED"), (6, "ASSIGNED", "SHIPPED")]
    assert invalidated == []  # every connection went back to its pool as it was
    writes = [sql for sql in sent if sql.startswith(("WITH", "UPDATE", "INSERT"))]
    if store == "postgres":  # heads + assign, then one statement per call; no BEGIN
        assert len(writes) == 5, writes
        assert not any(sql.startswith(("BEGIN", "COMMIT")) for sql in sent)


REFUSALS = [
    ("transition_job", "stale", JobStage.BUILDING, ConflictError, "stale fence 0"),
    ("transition_job", "held", JobStage.QUEUED, ConflictError, "from ASSIGNED to QUEUED"),
    ("heartbeat", "stale", None, ConflictError, "stale fence 0; the current fence is 1"),
    ("release_job", "shipped", None, ConflictError, "is SHIPPED; no lease is held"),
    ("transition_job", "foreign", JobStage.BUILDING, NotFoundError, "job"),
]


@pytest.mark.parametrize(("call_name", "prepared", "to", "error", "message"), REFUSALS)
async def test_a_refusal_alone_is_the_same_and_changes_nothing(
    runtime: Runtime, call_name: str, prepared: str, to: JobStage | None,
    error: type[Exception], message: str,
) -> None:
    job = await submit(runtime)
    fence = (await claim(runtime)).lease_fence
    if prepared == "shipped":
        await one_call(runtime, "transition_job", job.id, fence, JobStage.SHIPPED)
    job_id = (await submit(runtime, OTHER)).id if prepared == "foreign" else job.id
    args: tuple[Any, ...] = (job_id, fence - 1 if prepared == "stale" else fence)
    before, seq = columns(await load(runtime, job.id)), await last_seq(runtime)
    with pytest.raises(error, match=message):
        await one_call(runtime, call_name, *args, *(() if to is None else (to,)))
    assert columns(await load(runtime, job.id)) == before
    assert await last_seq(runtime) == seq


# -- locks, commits and transactions -----------------------------------------------


@postgres_only
async def test_a_claim_alone_skips_a_head_another_transaction_holds(runtime: Runtime) -> None:
    """The one-call claim keeps SKIP LOCKED: a head locked elsewhere is passed over at
    once, not waited for (DESIGN §4, the claim)."""
    first, second = await submit(runtime, title="first"), await submit(runtime, title="second")
    async with runtime.services.db.read() as session:
        await session.execute(select(Job.id).where(Job.id == first.id).with_for_update())
        job = await asyncio.wait_for(claim(runtime), 5.0)
    assert job.id == second.id
    assert (await claim(runtime)).id == first.id  # once the lock is gone


async def test_a_commit_that_fails_publishes_nothing(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Side effects only after commit (app.uow): when COMMIT itself fails, the events
    the unit of work recorded are neither handed to the commit hook nor stored."""
    published = publishing(runtime)

    async def cut(self: AsyncSession) -> None:
        raise OperationalError("COMMIT", {}, ConnectionResetError("cut off"))

    with monkeypatch.context() as patch:
        patch.setattr(AsyncSession, "commit", cut)
        with pytest.raises(StoreUnavailableError):
            await submit(runtime, title="never committed")
    assert published == []
    assert await stored_events(runtime) == []
    assert (await submit(runtime, title="next")).title == "next"  # the store serves on
    assert [record.seq for record in published] == [1]


async def test_a_call_after_another_statement_stays_in_the_sessions_transaction(
    runtime: Runtime,
) -> None:
    """Once the session has begun its transaction, the call is not run alone: it joins
    that transaction and commits with the unit of work (app.lone.lone_unit)."""
    job = await submit(runtime)
    fence = (await claim(runtime)).lease_fence
    async with runtime.services.db.unit_of_work(one_call=True) as session:
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1
        moved = await asyncio.wait_for(runtime.services.fleet.transition_job(
            session, PRODUCT, job.id, fence, JobStage.BUILDING), 5.0)
        assert moved.stage is JobStage.BUILDING
        assert not session.info[LONE_KEY].used
    assert (await load(runtime, job.id)).stage is JobStage.BUILDING


# -- sealed, cancelled, replaced -------------------------------------------------


@postgres_only
async def test_after_a_change_alone_the_unit_of_work_takes_nothing_more(
    runtime: Runtime,
) -> None:
    job = await submit(runtime)
    fence = (await claim(runtime)).lease_fence
    published = publishing(runtime)

    async def more_after_the_call() -> None:
        async with runtime.services.db.unit_of_work(one_call=True) as session:
            await runtime.services.fleet.transition_job(
                session, PRODUCT, job.id, fence, JobStage.BUILDING)
            await session.execute(text("SELECT 1"))

    with pytest.raises(RuntimeError, match="alone"):
        await more_after_the_call()
    # the change committed by itself, and its event was published all the same
    assert (await load(runtime, job.id)).stage == JobStage.BUILDING
    assert [(e.from_state, e.to_state) for e in published] == [("ASSIGNED", "BUILDING")]
    # a unit of work of several calls is not run alone
    async with runtime.services.db.unit_of_work() as session:
        await runtime.services.fleet.transition_job(
            session, PRODUCT, job.id, fence, JobStage.REVIEW)
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


async def waiting_for_a_lock(rt: Runtime) -> bool:
    async with rt.services.db.read() as session:  # a fresh statistics snapshot
        return bool((await session.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE 'WITH clock%'"))).scalar_one())


def publishing(rt: Runtime) -> list[EventRecord]:
    """What the runtime's commit hook is handed from now on (it still publishes)."""
    published: list[EventRecord] = []
    hook = rt.services.db.on_commit
    assert hook is not None

    async def keep(records: Any) -> None:
        published.extend(records)
        await hook(records)

    rt.services.db.on_commit = keep
    return published


@postgres_only
async def test_a_caller_cancelled_mid_statement_still_publishes_what_committed(
    runtime: Runtime,
) -> None:
    job = await submit(runtime)
    fence = (await claim(runtime)).lease_fence
    published = publishing(runtime)
    # another transaction holds the job's row: the transition waits for it
    async with runtime.services.db.read() as blocker:
        await blocker.execute(select(Job.id).where(Job.id == job.id).with_for_update())
        moving = asyncio.create_task(
            one_call(runtime, "transition_job", job.id, fence, JobStage.BUILDING))
        async with asyncio.timeout(DEADLINE):
            while not await waiting_for_a_lock(runtime):
                assert not moving.done()
                await asyncio.sleep(0.01)
        moving.cancel()
        await asyncio.sleep(0)
        assert not moving.done()  # the statement runs to completion
        await blocker.rollback()  # let it through
    with pytest.raises(asyncio.CancelledError):
        await moving
    assert (await load(runtime, job.id)).stage == JobStage.BUILDING
    assert [(e.from_state, e.to_state) for e in published] == [("ASSIGNED", "BUILDING")]
    assert [e.to_state for e in await stored_events(runtime)][-1] == "BUILDING"


@postgres_only
async def test_a_connection_dead_when_handed_out_is_replaced_once(runtime: Runtime) -> None:
    from sqlalchemy.util import await_

    job = await submit(runtime)
    fence = (await claim(runtime)).lease_fence
    kill_next = [True]

    def kill(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if kill_next:
            kill_next.clear()
            with contextlib.suppress(Exception):
                await_(record.driver_connection.execute(
                    "SELECT pg_terminate_backend(pg_backend_pid())"))

    engine = runtime.services.db.engine.sync_engine
    event.listen(engine, "checkout", kill)
    retried = LoneUnit.retried
    try:
        moved = await one_call(runtime, "transition_job", job.id, fence, JobStage.BUILDING)
    finally:
        event.remove(engine, "checkout", kill)
    assert not kill_next
    assert LoneUnit.retried == retried + 1
    assert moved.stage == (await load(runtime, job.id)).stage == JobStage.BUILDING
    # and a claim (an explicit transaction alone) likewise
    await submit(runtime)
    kill_next[:] = [True]
    event.listen(engine, "checkout", kill)
    try:
        assert (await claim(runtime)).stage == JobStage.ASSIGNED
    finally:
        event.remove(engine, "checkout", kill)
    assert LoneUnit.retried == retried + 2


@postgres_only
async def test_a_store_failure_alone_is_service_unavailable_and_changes_nothing(
    make_runtime: Any, make_token: Any,
) -> None:
    from app.errors import StoreUnavailableError

    await make_token(PRODUCT, Role.WORKER)
    rt = await make_runtime(db_timeout_seconds=1.0)
    job = await submit(rt)
    fence = (await claim(rt)).lease_fence
    seq = await last_seq(rt)
    # another transaction holds the job's row past the statement timeout
    async with rt.services.db.read() as blocker:
        await blocker.execute(select(Job.id).where(Job.id == job.id).with_for_update())
        with pytest.raises(StoreUnavailableError):
            await one_call(rt, "transition_job", job.id, fence, JobStage.BUILDING)
    assert (await load(rt, job.id)).stage == JobStage.ASSIGNED
    assert await last_seq(rt) == seq
    # the pool serves as usual afterwards
    moved = await one_call(rt, "transition_job", job.id, fence, JobStage.BUILDING)
    assert moved.stage == JobStage.BUILDING


async def test_overflow_connections_go_back_closed_not_leaked(
    make_runtime: Any, make_token: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """More concurrent calls alone than the pool keeps: the overflow connections are
    closed when they come back (which awaits the driver), not dropped open.  (A
    product's concurrent claims and transitions share connections on PostgreSQL —
    app.fleet.claim_batch, app.fleet.change_groups — its heartbeats do not.)"""
    await make_token(PRODUCT, Role.WORKER)
    rt = await make_runtime(db_pool_size=1, db_max_overflow=6)
    for n in range(6):
        await submit(rt, title=f"job {n}")
    closed: list[Any] = []
    event.listen(rt.services.db.engine.sync_engine.pool, "close", lambda *a: closed.append(a))
    with caplog.at_level("ERROR", logger="sqlalchemy.pool"):
        jobs = await asyncio.gather(*(
            one_call(rt, "claim_next_job", WorkerProfile(f"w{n}")) for n in range(6)))
        await asyncio.gather(*(
            one_call(rt, "heartbeat", job.id, job.lease_fence) for job in jobs))
    assert sorted(job.id for job in jobs) == sorted({job.id for job in jobs})
    assert not [r for r in caplog.records if "closing connection" in r.getMessage()]
    if rt.services.db.dialect == "postgresql":
        assert closed  # the pool did close overflow connections, and without an error
