"""A product's concurrent claims served together on PostgreSQL (app.fleet.claim_batch).

Each test forces its interleaving: another transaction holds the product row, so the
first claim (alone) waits for it on the server, holding its heads, while the next
claims queue behind it in this process, one at a time (`queued`), so the batch's order
is known.  Letting the row go commits the first alone and the queued ones as one
batch.  Nothing is mocked; the faults are a statement the server refuses and a connection
that drops while the batch runs.

* each claim of the batch gets what it would have got alone, one after the other: the
  scheduler's choice among what the earlier claims left, its own profile's jobs only;
  claims beyond the queue get none; the events are gap-free and published in order;
* a batch the server fails runs each claim alone, and each still gets a job;
* a connection lost mid-batch is SERVICE_UNAVAILABLE for each claim, none run again,
  and nothing of the batch is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from app.errors import StoreUnavailableError
from app.fleet import claim_batch
from app.fleet.change_groups import STATS, queued
from app.fleet.models import Job, JobStage, Priority
from app.fleet.scheduler import WorkerProfile
from app.main import Runtime
from tests.service.test_change_groups import product_held, until
from tests.service.test_cycle import last_seq, load, stored_events
from tests.service.test_lone import one_call, publishing, submit

PRODUCT = "acme"
PLAIN = WorkerProfile("plain")
GPU = WorkerProfile("gpu", capabilities=frozenset({"gpu"}))
pytestmark = pytest.mark.parametrize("store", ["postgres"])


def claim_task(rt: Runtime, worker: WorkerProfile) -> asyncio.Task[Job | None]:
    return asyncio.create_task(one_call(rt, "claim_next_job", worker))


async def lock_waiting(rt: Runtime) -> bool:
    async with rt.services.db.read() as session:
        return bool((await session.execute(text(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"))).first())


async def batch_of(rt: Runtime, first: WorkerProfile, rest: list[WorkerProfile]
                   ) -> list[Job | None]:
    """`first` claims alone and waits for the held product row; `rest` queue behind it
    in this order; then the row goes: the claims' jobs, in that order."""
    async with product_held(rt) as blocker:
        tasks = [claim_task(rt, first)]
        await until(lambda: lock_waiting(rt))
        for n, worker in enumerate(rest, start=1):
            tasks.append(claim_task(rt, worker))
            await until(lambda n=n: queued(PRODUCT) == n)  # type: ignore[misc]
        await blocker.rollback()
    async with asyncio.timeout(20):
        return list(await asyncio.gather(*tasks))


async def test_queued_claims_each_get_what_they_would_have_got_one_after_the_other(
    runtime: Runtime,
) -> None:
    gpu_job = await submit(runtime, title="needs a gpu", capabilities=("gpu",))
    normal = [await submit(runtime, title=f"normal {n}") for n in range(2)]
    low = await submit(runtime, title="low", priority=Priority.LOW)
    high = await submit(runtime, title="high", priority=Priority.HIGH)
    urgent = await submit(runtime, title="urgent", priority=Priority.URGENT)
    seq, batches, batched = await last_seq(runtime), STATS.claim_batches, STATS.claims_batched
    published = publishing(runtime)

    jobs = await batch_of(runtime, PLAIN, [PLAIN, PLAIN, GPU, GPU, PLAIN, PLAIN])

    assert [None if job is None else job.id for job in jobs] == [
        urgent.id, high.id, normal[0].id,  # the plain worker never sees the gpu job
        gpu_job.id,  # the oldest NORMAL job a gpu worker may take
        normal[1].id, low.id, None]
    assert (STATS.claim_batches, STATS.claims_batched) == (batches + 1, batched + 6)
    workers = ["plain", "plain", "plain", "gpu", "gpu", "plain"]
    for job, worker in zip(jobs, workers, strict=False):
        assert job is not None
        stored = await load(runtime, job.id)
        assert (stored.stage, stored.lease_worker_id, stored.lease_fence, stored.attempts) == (
            JobStage.ASSIGNED, worker, 1, 1)
    events = (await stored_events(runtime))[-6:]
    assert [e.seq for e in events] == list(range(seq + 1, seq + 7))
    assert [e.entity_id for e in events] == [job.id for job in jobs if job is not None]
    assert sorted(published, key=lambda e: e.seq) == events


async def test_a_batch_the_server_fails_runs_each_claim_alone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for n in range(4):
        await submit(runtime, title=f"job {n}")
    heads = claim_batch.PG_HEADS_N_RUN.fetch

    async def refused(driver: Any, *args: Any, **kw: Any) -> Any:
        await driver.fetch("SELECT 1 / 0")  # the server fails the transaction
        return await heads(driver, *args, **kw)

    monkeypatch.setattr(claim_batch.PG_HEADS_N_RUN, "fetch", refused)
    failed, batches = STATS.failed, STATS.claim_batches

    jobs = await batch_of(runtime, PLAIN, [PLAIN, PLAIN, PLAIN])

    assert (STATS.failed, STATS.claim_batches) == (failed + 1, batches)
    assert len({job.id for job in jobs if job is not None}) == 4
    assert await last_seq(runtime) == 4 + 4  # four submissions, four claims, no gap


async def test_a_connection_lost_mid_batch_fails_each_claim_and_runs_none_again(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch,
) -> None:
    submitted = [await submit(runtime, title=f"job {n}") for n in range(4)]
    assign = claim_batch.PG_ASSIGN.fetch_many

    async def lost(driver: Any, *args: Any, **kw: Any) -> Any:
        driver.terminate()  # the connection drops (the server then rolls back)
        return await assign(driver, *args, **kw)

    monkeypatch.setattr(claim_batch.PG_ASSIGN, "fetch_many", lost)
    async with product_held(runtime) as blocker:
        first = claim_task(runtime, PLAIN)
        await until(lambda: lock_waiting(runtime))
        rest = []
        for n in range(1, 4):
            rest.append(claim_task(runtime, PLAIN))
            await until(lambda n=n: queued(PRODUCT) == n)  # type: ignore[misc]
        await blocker.rollback()
    async with asyncio.timeout(20):
        assert (await first) is not None
        outcomes = await asyncio.gather(*rest, return_exceptions=True)
    assert all(isinstance(outcome, StoreUnavailableError) for outcome in outcomes)
    stages = [(await load(runtime, job.id)).stage for job in submitted]
    assert stages == [JobStage.ASSIGNED] + [JobStage.QUEUED] * 3
    assert await last_seq(runtime) == 4 + 1
