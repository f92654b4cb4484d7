"""The claim → BUILDING → SHIPPED cycle, four ways, on the same database (bench/run.py).

- *service*: `FleetService` through units of work of the runtime `create_app` builds
  (`build_runtime`: the commit hook publishes to the hub, counts metrics and, with
  FLEET_TRACKER_ECHO on, echoes onto the item).  The jobs are ingested from tracker
  items first (`ingestItemAsJob`'s service call), which is timed as *ingest*.
- *raw*: the same claim and the same two stage writes as hand-written SQL — asyncpg
  `FOR UPDATE SKIP LOCKED` on PostgreSQL, aiosqlite `BEGIN IMMEDIATE` on SQLite — each
  step its own transaction, on the same `jobs` table.
- *procrastinate*: a no-op task deferred N times and drained by a Procrastinate worker
  with the same concurrency (PostgreSQL only; `pip install -e ".[bench]"`).

CPU is this process's CPU time (client and service; the database server's is not
counted).  Each function returns a plain dict of figures.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiosqlite
import asyncpg
from bench_claim import PRODUCT, job_rows
from harness import Clock
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import Role
from app.auth.service import create_token
from app.bridge.service import IngestOptions
from app.config import Settings
from app.db import create_engine
from app.errors import StoreUnavailableError
from app.fleet.models import Job, JobStage
from app.fleet.scheduler import WorkerProfile
from app.main import build_runtime
from app.tracker.service import NewItem
from app.uow import Database

T = TypeVar("T")
RETRIES = 5
ALL_CAPS = WorkerProfile(
    worker_id="cycle", capabilities=frozenset({"os:linux", "os:mac", "gpu"}),
    engine_classes=frozenset({"agentic-coder"}),
)


def _worker(index: int) -> WorkerProfile:
    return WorkerProfile(worker_id=f"w{index}", capabilities=ALL_CAPS.capabilities,
                         engine_classes=ALL_CAPS.engine_classes)


async def seed_jobs(db: Database, count: int, product: str = PRODUCT) -> None:
    """`count` QUEUED jobs inserted in bulk (the raw loops' and the latency queue)."""
    async with db.unit_of_work() as session:
        await create_token(session, product_id=product, role=Role.WORKER)
    rng, now = random.Random(count), datetime.now(UTC)
    for start in range(0, count, 5_000):  # in chunks: 1M rows do not fit in memory at once
        rows = job_rows(min(5_000, count - start), now, rng, product)
        async with db.unit_of_work() as session:
            await session.execute(insert(Job), rows)


async def settle(db: Database) -> None:
    """The database as one that has stood a while under load: on PostgreSQL
    `VACUUM ANALYZE`, what autovacuum does within a minute of a load; on SQLite,
    which gathers no statistics on its own, nothing.  Every part runs it between its
    seeding and its timed stretch, for the product and its peers alike: the planner
    plans a prepared statement differently with statistics and without (a fresh
    table's claim statement planned anew on every run cost 0.6 ms, 0.14 once
    analyzed; bench/RESULTS.md, 2026-11-30 19:41)."""
    if db.engine.dialect.name != "postgresql":
        return
    async with db.engine.connect() as connection:
        auto = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await auto.exec_driver_sql("VACUUM ANALYZE")


async def service_cycle(url: str, *, claimers: int, jobs: int, echo: bool) -> dict[str, Any]:
    """Ingest `jobs` items as jobs, then `claimers` tasks run the cycle until the queue
    is empty.  Returns ingest/s, cycles/s and CPU ms per cycle."""
    settings = Settings(database_url=url, tracker_echo=echo, background_loops=False,
                        db_timeout_seconds=60,
                        db_pool_size=max(5, claimers), log_level="warning")
    runtime = build_runtime(settings)
    await runtime.start(background=False)
    services = runtime.services
    db, fleet, bridge = services.db, services.fleet, services.bridge
    try:
        async with db.unit_of_work() as session:
            await create_token(session, product_id=PRODUCT, role=Role.WORKER)
        item_ids: list[int] = []
        for n in range(jobs):
            async with db.unit_of_work() as session:
                item = await bridge.create_item(session, PRODUCT, NewItem(title=f"item {n}"))
                item_ids.append(item.id)
        clock = Clock().start()
        for item_id in item_ids:
            async with db.unit_of_work() as session:
                await bridge.ingest_item(session, PRODUCT, item_id, IngestOptions())
        ingest = clock.stop()
        await settle(db)
        done = retries = 0

        async def retried(step: Callable[[AsyncSession], Awaitable[T]]) -> T:
            """A unit of work of one call, as the mutations open it (app.lone), again
            when the store was unavailable (a worker retries; on a loaded SQLite the
            lock wait can outlast FLEET_DB_TIMEOUT_SECONDS)."""
            nonlocal retries
            for _ in range(RETRIES):
                try:
                    async with db.unit_of_work(one_call=True) as session:
                        return await step(session)
                except StoreUnavailableError:
                    retries += 1
            raise RuntimeError(f"the store stayed unavailable {RETRIES} times")

        async def claimer(index: int) -> None:
            nonlocal done
            worker = _worker(index)

            async def claim(session: AsyncSession) -> tuple[int, int] | None:
                job = await fleet.claim_next_job(session, PRODUCT, worker)
                return None if job is None else (job.id, job.lease_fence)

            while True:
                held = await retried(claim)
                if held is None:
                    return
                for stage in (JobStage.BUILDING, JobStage.SHIPPED):
                    await retried(lambda session, stage=stage, held=held: fleet.transition_job(
                        session, PRODUCT, held[0], held[1], stage))
                done += 1

        clock = Clock().start()
        await asyncio.gather(*(claimer(n) for n in range(claimers)))
        span = clock.stop()
        assert done == jobs, f"{done} cycles for {jobs} jobs"
        rate, cpu_ms = span.per(jobs)
        ingest_rate, ingest_cpu = ingest.per(jobs)
        return {"jobs": jobs, "claimers": claimers, "echo": echo, "per_s": rate,
                "cpu_ms": cpu_ms, "store_unavailable_retries": retries,
                "ingest_per_s": ingest_rate, "ingest_cpu_ms": ingest_cpu}
    finally:
        await runtime.stop()


_PG_CLAIM = """
UPDATE jobs SET stage = 'ASSIGNED', attempts = attempts + 1, lease_fence = lease_fence + 1,
       lease_worker_id = $2, lease_expires_at = now() + interval '5 minutes',
       started_at = coalesce(started_at, now()), updated_at = now()
 WHERE id = (SELECT id FROM jobs WHERE product_id = $1 AND stage = 'QUEUED'
              ORDER BY priority, queued_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, lease_fence"""
_PG_MOVE = """UPDATE jobs SET stage = $3::varchar, updated_at = now(),
       finished_at = CASE WHEN $3::varchar = 'SHIPPED' THEN now() END
 WHERE id = $1 AND lease_fence = $2"""


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy `postgresql+asyncpg://` URL as a plain libpq DSN."""
    return "postgresql://" + url.split("://", 1)[1]


async def raw_pg_cycle(url: str, *, claimers: int, jobs: int) -> dict[str, Any]:
    """The cycle as three autocommitted statements per job over an asyncpg pool."""
    db = Database(create_engine(url))
    try:
        await seed_jobs(db, jobs)
        await settle(db)
    finally:
        await db.dispose()
    pool = await asyncpg.create_pool(asyncpg_dsn(url), min_size=claimers, max_size=claimers)
    done = 0

    async def claimer(index: int) -> None:
        nonlocal done
        while True:
            async with pool.acquire() as conn:
                row = await conn.fetchrow(_PG_CLAIM, PRODUCT, f"w{index}")
                if row is None:
                    return
                for stage in ("BUILDING", "SHIPPED"):
                    await conn.execute(_PG_MOVE, row["id"], row["lease_fence"], stage)
            done += 1

    try:
        clock = Clock().start()
        await asyncio.gather(*(claimer(n) for n in range(claimers)))
        span = clock.stop()
    finally:
        await pool.close()
    assert done == jobs, f"{done} cycles for {jobs} jobs"
    rate, cpu_ms = span.per(jobs)
    return {"jobs": jobs, "claimers": claimers, "per_s": rate, "cpu_ms": cpu_ms}


def _sqlite_path(url: str) -> str:
    return url.split(":///", 1)[1]


async def raw_sqlite_cycle(url: str, *, claimers: int, jobs: int) -> dict[str, Any]:
    """The cycle as three `BEGIN IMMEDIATE` transactions per job, one aiosqlite
    connection per claimer (WAL, 30 s busy timeout)."""
    db = Database(create_engine(url))
    try:
        await seed_jobs(db, jobs)
    finally:
        await db.dispose()
    done = 0

    def stamp() -> str:
        return datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")

    async def claimer(index: int) -> None:
        nonlocal done
        async with aiosqlite.connect(_sqlite_path(url), timeout=30,
                                     isolation_level=None) as conn:
            while True:
                await conn.execute("BEGIN IMMEDIATE")
                cursor = await conn.execute(
                    "SELECT id, lease_fence FROM jobs WHERE product_id = ? AND stage = 'QUEUED'"
                    " ORDER BY priority, queued_at, id LIMIT 1", (PRODUCT,))
                row = await cursor.fetchone()
                if row is None:
                    await conn.execute("COMMIT")
                    return
                now = stamp()
                expires = (datetime.now(UTC) + timedelta(minutes=5)).replace(tzinfo=None)
                await conn.execute(
                    "UPDATE jobs SET stage = 'ASSIGNED', attempts = attempts + 1,"
                    " lease_fence = lease_fence + 1, lease_worker_id = ?, lease_expires_at = ?,"
                    " started_at = coalesce(started_at, ?), updated_at = ? WHERE id = ?",
                    (f"w{index}", expires.isoformat(sep=" "), now, now, row[0]))
                await conn.execute("COMMIT")
                for stage in ("BUILDING", "SHIPPED"):
                    await conn.execute("BEGIN IMMEDIATE")
                    await conn.execute(
                        "UPDATE jobs SET stage = ?, updated_at = ? WHERE id = ?"
                        " AND lease_fence = ?", (stage, stamp(), row[0], row[1] + 1))
                    await conn.execute("COMMIT")
                done += 1

    clock = Clock().start()
    await asyncio.gather(*(claimer(n) for n in range(claimers)))
    span = clock.stop()
    assert done == jobs, f"{done} cycles for {jobs} jobs"
    rate, cpu_ms = span.per(jobs)
    return {"jobs": jobs, "claimers": claimers, "per_s": rate, "cpu_ms": cpu_ms}


async def procrastinate_cycle(url: str, *, claimers: int, jobs: int) -> dict[str, Any]:
    """`jobs` no-op Procrastinate jobs drained by one worker of `claimers` concurrency
    (its fetch is `FOR UPDATE SKIP LOCKED` too, then doing → succeeded).  None-valued
    figures when procrastinate is not installed."""
    try:
        import procrastinate
    except ImportError:
        return {"jobs": jobs, "claimers": claimers, "per_s": None, "cpu_ms": None,
                "skipped": "procrastinate not installed (pip install -e '.[bench]')"}
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=asyncpg_dsn(url), min_size=1, max_size=claimers + 2))

    @app.task(name="cycle")
    async def cycle() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        await cycle.batch_defer_async(*({} for _ in range(jobs)))
        db = Database(create_engine(url))
        try:
            await settle(db)
        finally:
            await db.dispose()
        clock = Clock().start()
        await app.run_worker_async(concurrency=claimers, wait=False, listen_notify=False,
                                   install_signal_handlers=False)
        span = clock.stop()
        async with app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
            cursor = await conn.execute(
                "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
            succeeded = (await cursor.fetchone())[0]
    assert succeeded == jobs, f"{succeeded} succeeded of {jobs}"
    rate, cpu_ms = span.per(jobs)
    return {"jobs": jobs, "claimers": claimers, "per_s": rate, "cpu_ms": cpu_ms}
