"""Faults injected into a claim that runs alone (`unit_of_work(one_call=True)`,
app.lone), PostgreSQL: the claim alone first reads the heads without locks and
assigns its job only if it is as read (two implicit transactions); failing that, it
claims again as an explicit transaction (BEGIN; heads `FOR UPDATE SKIP LOCKED`;
assignment + event; COMMIT) on the driver (app.fleet.claim_batch).

* a job taken by another claimer between the read and the assignment is not assigned
  twice: the claim takes the next one;
* the locking claim's heads stay locked until its assignment commits, so a claimer
  that comes between the two passes over them: the transaction is real;
* a COMMIT that fails stores nothing and publishes nothing, and the store serves on;
* a locking claim's BEGIN that meets a lost connection is run again, once, on a fresh one — nothing
  was sent, so nothing can have committed (app.lone, "a dead pooled connection is
  replaced once").
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from app.errors import StoreUnavailableError
from app.fleet import claim_batch
from app.fleet.change_groups import STATS
from app.fleet.claim_batch import Claim
from app.fleet.claim_statements import pg_claim_heads_statement
from app.fleet.models import JobStage
from app.fleet.scheduler import WorkerProfile
from app.lone import LoneUnit, on_driver
from app.main import Runtime
from tests.service.test_cycle import last_seq, load, stored_events
from tests.service.test_lone import PRODUCT, WORKER, claim, one_call, publishing, submit

DEADLINE = 20.0
pytestmark = pytest.mark.parametrize("store", ["postgres"])


def held_at_first(monkeypatch: pytest.MonkeyPatch, statement: Any
                  ) -> tuple[asyncio.Event, asyncio.Event]:
    """The first run of `statement` waits, once `between` is set, until `go` is."""
    between, go = asyncio.Event(), asyncio.Event()
    fetch = statement.fetch

    async def held_back(*args: Any, **kw: Any) -> Any:
        if not between.is_set():
            between.set()
            await go.wait()
        return await fetch(*args, **kw)

    monkeypatch.setattr(statement, "fetch", held_back)
    return between, go


async def test_a_claim_alone_whose_job_is_taken_meanwhile_takes_the_next_one(
    runtime: Runtime, make_runtime: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claim A reads the heads without locks and is held before its assignment while
    claim B, in another runtime, takes that job from start to end: A's assignment
    finds the job no longer as read and matches nothing, and A claims again, locking
    (app.fleet.claim_batch.pg_claim_first), taking the next job.  Were the assignment
    not conditional on the job as read, both would hold the first job."""
    other = await make_runtime()
    first, second = await submit(runtime, title="first"), await submit(runtime, title="second")
    between, go = held_at_first(monkeypatch, claim_batch.PG_ASSIGN_IF_UNCHANGED)
    raced = STATS.claims_raced
    claim_a = asyncio.create_task(claim(runtime))
    async with asyncio.timeout(DEADLINE):
        await between.wait()
        job_b = await claim(other)
        go.set()
        job_a = await claim_a
    assert (job_a.id, job_b.id) == (second.id, first.id)
    assert STATS.claims_raced == raced + 1
    for job in (first, second):
        assert (await load(runtime, job.id)).attempts == 1
    assert [e.entity_id for e in await stored_events(runtime)][-2:] == [first.id, second.id]


async def test_a_claim_alone_assigns_only_the_job_as_it_read_it(
    runtime: Runtime, make_runtime: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between claim A's read and its assignment, another runtime claims the job and
    gives it back: QUEUED again, at a higher fence.  A's assignment is refused (the job
    is not as read) and A claims again, locking; the job then carries each claim's
    fence in turn."""
    other = await make_runtime()
    job = await submit(runtime)
    between, go = held_at_first(monkeypatch, claim_batch.PG_ASSIGN_IF_UNCHANGED)
    raced = STATS.claims_raced
    claim_a = asyncio.create_task(claim(runtime))
    async with asyncio.timeout(DEADLINE):
        await between.wait()
        taken = await claim(other)
        await one_call(other, "release_job", job.id, taken.lease_fence, "giving it back")
        go.set()
        job_a = await claim_a
    assert STATS.claims_raced == raced + 1
    assert (job_a.id, taken.lease_fence, job_a.lease_fence) == (job.id, 1, 3)


async def test_the_locking_claim_holds_its_heads_until_its_assignment_commits(
    runtime: Runtime, make_runtime: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claim A, its first try lost (as to a claimer that took its job), claims again
    locking, and is held between its heads and its assignment while claim B runs from
    start to end in another runtime: B passes over A's locked head and takes the next
    job, and A then assigns the head it read.  Were the locking claim's heads read
    outside its transaction, B would take A's head and A's assignment would match
    nothing."""
    other = await make_runtime()
    first, second = await submit(runtime, title="first"), await submit(runtime, title="second")

    async def lost(*args: Any, **kw: Any) -> Any:
        return []

    monkeypatch.setattr(claim_batch.PG_ASSIGN_IF_UNCHANGED, "fetch", lost)
    between, go = held_at_first(monkeypatch, claim_batch.PG_ASSIGN)
    claim_a = asyncio.create_task(claim(runtime))
    async with asyncio.timeout(DEADLINE):
        await between.wait()
        job_b = await claim(other)
        go.set()
        job_a = await claim_a
    assert (job_a.id, job_b.id) == (first.id, second.id)
    assert [e.entity_id for e in await stored_events(runtime)][-2:] == [second.id, first.id]


async def test_a_claim_alone_whose_commit_fails_stores_and_publishes_nothing(
    runtime: Runtime,
) -> None:
    """A deferred constraint trigger fails the claim's COMMIT (as a serialization
    failure would): SERVICE_UNAVAILABLE, the job still QUEUED, no sequence number
    used, nothing handed to the hub; the next claim takes the job as usual."""
    job = await submit(runtime)
    seq = await last_seq(runtime)
    async with runtime.services.db.unit_of_work() as session:
        await session.execute(text(
            "CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = 'serialization_failure';"
            " END $$"))
        await session.execute(text(
            "CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER UPDATE ON jobs"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
            " WHEN (NEW.lease_worker_id = 'doomed') EXECUTE FUNCTION refuse_at_commit()"))
    published = publishing(runtime)
    with pytest.raises(StoreUnavailableError):
        await one_call(runtime, "claim_next_job", WorkerProfile("doomed"))
    assert published == []
    stored = await load(runtime, job.id)
    assert (stored.stage, stored.attempts, stored.lease_fence) == (JobStage.QUEUED, 0, 0)
    assert await last_seq(runtime) == seq
    assert (await claim(runtime)).id == job.id
    assert [(e.entity_id, e.seq, e.to_state) for e in published] == [(job.id, seq + 1, "ASSIGNED")]


async def test_a_locking_claim_whose_begin_meets_a_lost_connection_runs_on_a_fresh_one(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection handed out looks alive but is lost when BEGIN is sent (the
    server went away between checkout and use): the locking claim (as a batch's
    member runs it, app.fleet.claim_batch) runs on a new connection instead of
    answering SERVICE_UNAVAILABLE."""
    job = await submit(runtime)
    lost: list[asyncpg.Connection[Any]] = []
    execute = asyncpg.Connection.execute

    async def losing(self: asyncpg.Connection[Any], query: str, *args: Any, **kw: Any) -> Any:
        if query == "BEGIN" and not lost:
            lost.append(self)
            self.terminate()
            raise asyncpg.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation")
        return await execute(self, query, *args, **kw)

    monkeypatch.setattr(asyncpg.Connection, "execute", losing)
    retried = LoneUnit.retried
    engine = runtime.services.db.engine
    _, heads = pg_claim_heads_statement(PRODUCT, WORKER, None)
    locking = Claim(worker=WORKER, heads=heads, lease_seconds=60, aging_seconds=600)
    assigned = await asyncio.wait_for(on_driver(
        engine, lambda driver: claim_batch.pg_claim_alone(driver, engine, locking),
        transaction=True), DEADLINE)
    assert lost
    assert lost[0].is_closed()
    assert LoneUnit.retried == retried + 1
    assert assigned is not None
    assert assigned[0][0] == job.id
    assert (await load(runtime, job.id)).stage is JobStage.ASSIGNED
