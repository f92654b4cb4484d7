"""Many instances on one database: the claim and the background loops.

Two runtimes built on the same database are two instances (separate engines and
pools).  The claim and the reaper are tested on both stores; the index plan and
the advisory locks of the single-runner loops are PostgreSQL's own.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from app.auth.models import Role
from app.background import EVENT_RETENTION_LOCK, SINGLE_RUNNER_CLASS
from app.bridge.service import IngestOptions, write_status_and_comment
from app.db import utcnow
from app.events.models import Event
from app.fleet.cycle import pg_claim_heads_statement
from app.fleet.models import Job, JobStage, Priority
from app.fleet.scheduler import WorkerProfile
from app.fleet.service import JobSpec
from app.main import Runtime
from app.tracker import service as tracker_service
from app.tracker.models import Comment, CommentKind, Item, ItemStatus
from app.tracker.service import NewItem
from tests.conftest import PG_DSN

postgres_only = pytest.mark.parametrize("store", ["postgres"])
DEADLINE = 10.0


class Explain(Executable, ClauseElement):
    """`EXPLAIN (ANALYZE, FORMAT JSON) <statement>`, with the statement's own binds."""

    inherit_cache = False

    def __init__(self, statement: Any) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _compile_explain(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN (ANALYZE, FORMAT JSON) " + compiler.process(element.statement, **kw)


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [node]
    for child in node.get("Plans", ()):
        nodes.extend(plan_nodes(child))
    return nodes


BULK_QUEUE = text("""
INSERT INTO jobs (product_id, title, body_md, kind, stage, priority, capabilities,
                  attempts, max_attempts, lease_fence, cost_usd, tokens_in, tokens_out,
                  echo_attempts, queued_at, created_at, updated_at)
SELECT :product, 'bulk ' || n, 'body', 'code', 'QUEUED',
       (ARRAY['LOW', 'NORMAL', 'HIGH', 'URGENT'])[1 + n % 4],
       CASE WHEN n % 10 = 0 THEN '["gpu"]'::jsonb ELSE '[]'::jsonb END,
       0, 3, 0, 0, 0, 0, 0,
       now() - make_interval(secs => n / 1000.0), now(), now()
FROM generate_series(1, :count) AS n
""")


@postgres_only
async def test_claim_heads_walk_the_claim_index_with_20k_queued(make_runtime, make_token):
    await make_token("acme", Role.WORKER)
    await make_token("globex", Role.WORKER)
    runtime = await make_runtime()
    db = runtime.services.db
    async with db.unit_of_work() as session:
        await session.execute(BULK_QUEUE, {"product": "acme", "count": 20_000})
        await session.execute(BULK_QUEUE, {"product": "globex", "count": 5_000})
    async with db.engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text("ANALYZE jobs"))

    worker = WorkerProfile(worker_id="w", capabilities=frozenset({"os:linux"}))
    heads, params = pg_claim_heads_statement("acme", worker, utcnow())
    async with db.read() as session:
        [[plan]] = (await session.execute(Explain(heads.element), params))
        await session.rollback()
    nodes = plan_nodes(plan[0]["Plan"])
    scans = [node for node in nodes if node.get("Relation Name") == "jobs"]
    print(f"\nclaim heads over 20000 queued: {len(scans)} scan node(s), "
          f"{[s['Actual Loops'] for s in scans]} loops, {plan[0]['Execution Time']:.3f} ms, "
          f"rows read per loop "
          f"{[s['Actual Rows'] + s.get('Rows Removed by Filter', 0) for s in scans]}")
    # one index range scan per priority (the LATERAL head query, run once per queue)
    assert [scan["Node Type"] for scan in scans] == ["Index Scan"]
    assert {scan["Index Name"] for scan in scans} == {"ix_jobs_claim"}
    assert sum(scan["Actual Loops"] for scan in scans) == 4
    assert not [node for node in nodes if node["Node Type"] in {"Sort", "Seq Scan"}]
    # each head stops at the first row that passes the filters: a handful of rows read
    # (EXPLAIN's row counts are per loop)
    assert all(scan["Actual Rows"] == 1 for scan in scans)
    assert all(scan.get("Rows Removed by Filter", 0) <= 2 for scan in scans)

    # and the scheduler picks among the heads: the oldest URGENT jobs without a gpu
    claimed, timings = [], []
    for _ in range(2):
        started = time.perf_counter()
        async with db.unit_of_work() as session:
            job = await runtime.services.fleet.claim_next_job(session, "acme", worker)
            assert job is not None
            claimed.append((job.title, job.priority, job.capabilities, job.stage))
        timings.append((time.perf_counter() - started) * 1000)
    print(f"claims over 20000 queued: first {timings[0]:.1f} ms (cold), "
          f"then {timings[1]:.1f} ms")
    assert claimed == [("bulk 19999", Priority.URGENT, [], JobStage.ASSIGNED),
                       ("bulk 19995", Priority.URGENT, [], JobStage.ASSIGNED)]


async def submit_many(runtime: Runtime, count: int) -> list[int]:
    priorities = list(Priority)
    async with runtime.services.db.unit_of_work() as session:
        return [
            (await runtime.services.fleet.submit_job(session, "acme", JobSpec(
                title=f"job {n}", body_md="b", priority=priorities[n % len(priorities)],
            ))).job.id
            for n in range(count)
        ]


async def test_concurrent_claimers_on_two_instances_never_share_a_job(
    store, make_runtime, make_token
):
    await make_token("acme", Role.WORKER)
    instances = [await make_runtime(), await make_runtime()]
    job_ids = await submit_many(instances[0], 60)
    claimed: dict[int, str] = {}
    duplicates: list[int] = []
    per_instance = [0, 0]

    async def claimer(index: int) -> None:
        runtime = instances[index % 2]
        worker = WorkerProfile(worker_id=f"w{index}")
        while len(claimed) < len(job_ids):
            async with runtime.services.db.unit_of_work() as session:
                job = await runtime.services.fleet.claim_next_job(session, "acme", worker)
                job_id = None if job is None else job.id
            if job_id is None:  # every remaining head is locked by another claimer
                await asyncio.sleep(0)
                continue
            if job_id in claimed:
                duplicates.append(job_id)
            claimed[job_id] = worker.worker_id
            per_instance[index % 2] += 1

    await asyncio.wait_for(asyncio.gather(*(claimer(i) for i in range(12))), 60)
    assert duplicates == []
    assert sorted(claimed) == sorted(job_ids)
    if store == "postgres":  # SKIP LOCKED: both instances' claimers get work
        assert min(per_instance) > 0
    # On SQLite one instance may make every claim: its writer hands the file's write
    # lock from claimer to claimer while the other instance's connection sleeps in
    # SQLite's busy handler; SQLite promises no fairness between processes.
    async with instances[1].services.db.read() as session:
        rows = (await session.execute(select(Job))).scalars().all()
    assert {(job.stage, job.attempts, job.lease_fence) for job in rows} == {
        (JobStage.ASSIGNED, 1, 1)
    }
    assert {job.id: job.lease_worker_id for job in rows} == claimed


async def test_two_reapers_split_the_expired_leases(make_runtime, make_token):
    await make_token("acme", Role.WORKER)
    instances = [await make_runtime(), await make_runtime()]
    job_ids = await submit_many(instances[0], 20)
    long_ago = utcnow() - timedelta(hours=2)
    async with instances[0].services.db.unit_of_work() as session:
        await session.execute(update(Job).values(queued_at=long_ago, created_at=long_ago))
    for _ in job_ids:  # leases that ran out an hour ago
        async with instances[0].services.db.unit_of_work() as session:
            assert await instances[0].services.fleet.claim_next_job(
                session, "acme", WorkerProfile(worker_id="gone"),
                now=utcnow() - timedelta(hours=1), lease_seconds=60,
            )

    first, second = await asyncio.gather(*(rt.loops.reap_once() for rt in instances))
    assert not set(first.requeued) & set(second.requeued)
    assert sorted(first.requeued + second.requeued) == sorted(job_ids)
    async with instances[1].services.db.read() as session:
        rows = (await session.execute(select(Job))).scalars().all()
    assert {(job.stage, job.lease_fence) for job in rows} == {(JobStage.QUEUED, 2)}


@postgres_only
async def test_only_one_instance_sweeps_echoes_at_a_time(make_runtime, make_token):
    await make_token("acme", Role.MEMBER)
    plain = await make_runtime()
    async with plain.services.db.unit_of_work() as session:
        item = await tracker_service.create_item(session, "acme", NewItem(title="t"))
        await plain.services.bridge.ingest_item(session, "acme", item.id, IngestOptions())
    entered, release = asyncio.Event(), asyncio.Event()
    writes_on_b: list[int] = []

    async def slow_writer(session: Any, target: Item, status: ItemStatus, comment: str) -> None:
        entered.set()
        await release.wait()
        await write_status_and_comment(session, target, status, comment)

    async def recording_writer(session: Any, target: Item, status: ItemStatus,
                               comment: str) -> None:
        writes_on_b.append(target.id)
        await write_status_and_comment(session, target, status, comment)

    instance_a = await make_runtime(tracker_echo=True, echo_writer=slow_writer)
    instance_b = await make_runtime(tracker_echo=True, echo_writer=recording_writer)
    pass_on_a = asyncio.create_task(instance_a.loops.sweep_echoes_once())
    await asyncio.wait_for(entered.wait(), DEADLINE)

    # B's pass finds A's pass running and skips at once instead of queueing behind it
    assert await asyncio.wait_for(instance_b.loops.sweep_echoes_once(), DEADLINE) == 0
    assert writes_on_b == []
    release.set()
    assert await asyncio.wait_for(pass_on_a, DEADLINE) == 1
    assert await instance_b.loops.sweep_echoes_once() == 0  # caught up, nothing to do
    async with plain.services.db.read() as session:
        status = (await session.execute(select(Item.status))).scalar_one()
        comments = (await session.execute(
            select(func.count()).select_from(Comment).where(Comment.kind == CommentKind.SYSTEM)
        )).scalar_one()
    assert (status, comments) == (ItemStatus.IN_PROGRESS, 1)


@postgres_only
async def test_retention_skips_while_another_instance_prunes(make_runtime, make_token):
    await make_token("acme", Role.WORKER)
    runtime = await make_runtime()
    await submit_many(runtime, 3)
    async with runtime.services.db.unit_of_work() as session:
        await session.execute(update(Event).values(created_at=utcnow() - timedelta(days=30)))

    other_instance = await asyncpg.connect(
        f"{PG_DSN}/{runtime.services.db.engine.url.database}"
    )
    try:
        async with other_instance.transaction():
            await other_instance.execute(
                "SELECT pg_advisory_xact_lock($1, $2)", SINGLE_RUNNER_CLASS, EVENT_RETENTION_LOCK
            )
            assert await runtime.loops.prune_events_once() == 0
        assert await runtime.loops.prune_events_once() == 3
    finally:
        await other_instance.close()
