"""Claim benchmark: the index-backed claim against a naive full scan, and concurrency.

    .venv/bin/python bench/bench_claim.py            # 1k, 10k, 50k queued jobs
    .venv/bin/python bench/bench_claim.py --quick    # 1k and 10k, fewer samples

Everything runs in one process, side by side, on a fresh SQLite file and (when it
answers at FLEET_BENCH_PG, default postgresql://postgres@127.0.0.1:5432) on a fresh
PostgreSQL database, both migrated with the real migrations and dropped afterwards.

1. Latency.  A queue of N QUEUED jobs (seeded random priorities, ages up to two hours,
   a quarter needing a capability the worker lacks, some engine classes) is claimed
   from alternately by
   - *indexed*: `FleetService.claim_next_job`, i.e. the heads of each priority's queue
     from `claim_candidates` (the claim index), then `select_job`;
   - *naive*: the same claim, but the candidates are every QUEUED job of the product,
     loaded and handed to `select_job`.
   Both do the same writes (stage, lease, event) in one unit of work.  Before timing,
   the two candidate sets are checked to make the same choice.  Printed: the median
   claim latency of each and the ratio naive / indexed.
2. Throughput.  1 claimer, then 8 concurrent claimers on one product, then 8 spread
   over 8 products drain the same number of jobs, each claim its own unit of work;
   printed: claims per second and the ratio to 1 claimer.  Every claim appends an
   event with the product's next gap-free sequence number, which locks the product
   row until commit, so claims within one product are serialised by design.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.auth.models import Role
from app.auth.service import create_token
from app.db import create_engine, utcnow
from app.fleet import repository
from app.fleet.models import Job, JobStage, Priority
from app.fleet.scheduler import WorkerProfile, select_job
from app.fleet.service import FleetPolicy, FleetService
from app.migrate import upgrade
from app.uow import Database

PG_DSN = os.environ.get("FLEET_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
PRODUCT = "bench"
SEED = 20_261_123
WORKER = WorkerProfile(
    worker_id="bench-worker",
    capabilities=frozenset({"os:linux", "gpu"}),
    engine_classes=frozenset({"agentic-coder"}),
)


async def all_queued(
    session: AsyncSession, product_id: str, _worker: WorkerProfile, _now: datetime
) -> list[Job]:
    """The naive candidate source: every QUEUED job of the product, no index help."""
    stmt = select(Job).where(Job.product_id == product_id, Job.stage == JobStage.QUEUED)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return list((await session.execute(stmt)).scalars().all())


# -- stores ------------------------------------------------------------------------


@dataclass
class Store:
    name: str
    url: str
    cleanup_db: str | None = None


async def _pg_admin(sql: str) -> None:
    connection = await asyncpg.connect(f"{PG_DSN}/postgres", timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def pg_store() -> Store | None:
    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    name = f"fleetbridge_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    return Store("postgresql", f"postgresql+asyncpg://{PG_DSN.split('://', 1)[1]}/{name}", name)


def fresh_store(kind: str, scratch: Path) -> Store | None:
    """A newly migrated, empty database."""
    if kind == "sqlite":
        store = Store("sqlite", f"sqlite+aiosqlite:///{scratch / f'{uuid.uuid4().hex}.db'}")
    else:
        found = pg_store()
        if found is None:
            return None
        store = found
    upgrade(store.url)
    return store


def drop_store(store: Store) -> None:
    if store.cleanup_db:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {store.cleanup_db} WITH (FORCE)"))


# -- data --------------------------------------------------------------------------


def job_rows(count: int, now: datetime, rng: random.Random,
             product: str) -> list[dict[str, object]]:
    priorities = list(Priority)
    rows: list[dict[str, object]] = []
    for n in range(count):
        roll = rng.random()
        capabilities = (["os:mac"] if roll < 0.25 else ["gpu"] if roll < 0.4
                        else ["os:linux"] if roll < 0.6 else [])
        queued_at = now - timedelta(seconds=rng.uniform(0, 7_200))
        rows.append({
            "product_id": product, "title": f"job {n}", "body_md": "benchmark job",
            "kind": "code", "stage": JobStage.QUEUED, "priority": rng.choice(priorities),
            "capabilities": capabilities,
            "engine_class": "agentic-coder" if rng.random() < 0.3 else None,
            "profile": None, "attempts": 0, "max_attempts": 3, "lease_fence": 0,
            "cost_usd": 0.0, "tokens_in": 0, "tokens_out": 0, "echo_attempts": 0,
            "queued_at": queued_at, "created_at": queued_at, "updated_at": queued_at,
        })
    return rows


async def fill(db: Database, count: int, product: str = PRODUCT) -> None:
    rng = random.Random(SEED + count)
    now = utcnow()
    async with db.unit_of_work() as session:
        await create_token(session, product_id=product, role=Role.WORKER)
    rows = job_rows(count, now, rng, product)
    for start in range(0, len(rows), 5_000):
        async with db.unit_of_work() as session:
            await session.execute(insert(Job), rows[start:start + 5_000])
    async with db.unit_of_work() as session:
        await session.execute(text("ANALYZE"))  # planner statistics, as autovacuum would


# -- measurements -------------------------------------------------------------------


async def same_choice(db: Database, policy: FleetPolicy) -> bool:
    now = utcnow()
    async with db.read() as session:
        heads = await repository.claim_candidates(session, PRODUCT, WORKER, now)
        everything = await all_queued(session, PRODUCT, WORKER, now)
    pick = select_job(map(repository.to_candidate, heads), WORKER, now, policy.aging_seconds)
    full = select_job(map(repository.to_candidate, everything), WORKER, now,
                      policy.aging_seconds)
    return pick is not None and full is not None and pick.id == full.id


async def timed_claim(db: Database, service: FleetService) -> float:
    started = time.perf_counter()
    async with db.unit_of_work() as session:
        job = await service.claim_next_job(session, PRODUCT, WORKER)
    elapsed = time.perf_counter() - started
    assert job is not None, "the queue ran dry"
    return elapsed


async def latency(url: str, size: int, samples: int) -> tuple[float, float, bool]:
    policy = FleetPolicy()
    db = Database(create_engine(url))
    try:
        await fill(db, size)
        agree = await same_choice(db, policy)
        indexed, naive = FleetService(policy), FleetService(policy, candidates=all_queued)
        await timed_claim(db, indexed)  # warm the pool and the statement caches
        await timed_claim(db, naive)
        fast: list[float] = []
        slow: list[float] = []
        for _ in range(samples):
            fast.append(await timed_claim(db, indexed))
            slow.append(await timed_claim(db, naive))
        return statistics.median(fast), statistics.median(slow), agree
    finally:
        await db.dispose()


async def throughput(url: str, claimers: int, claims: int, products: int = 1) -> float:
    """Claims per second when `claimers` tasks drain `claims` jobs together; claimer
    n works for product n mod `products`."""
    db = Database(create_engine(url, pool_size=max(5, claimers)))
    service = FleetService(FleetPolicy())
    names = [f"{PRODUCT}-{n}" for n in range(products)]
    try:
        for name in names:
            await fill(db, claims // products, name)
        done = 0

        async def claimer(index: int) -> None:
            nonlocal done
            worker = WorkerProfile(worker_id=f"w{index}", capabilities=WORKER.capabilities | {
                "os:mac"}, engine_classes=WORKER.engine_classes)
            while True:
                async with db.unit_of_work() as session:
                    job = await service.claim_next_job(
                        session, names[index % products], worker)
                if job is None:
                    return
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(claimer(n) for n in range(claimers)))
        elapsed = time.perf_counter() - started
        total = claims // products * products
        assert done == total, f"{done} claims for {total} jobs"
        return total / elapsed
    finally:
        await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k, fewer samples")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 50_000]
    samples = {1_000: 15, 10_000: 9, 50_000: 5} if args.quick else {
        1_000: 31, 10_000: 11, 50_000: 5}
    throughput_claims = 200 if args.quick else 320
    kinds = ["sqlite"] if args.no_pg else ["sqlite", "postgresql"]

    print(f"# fleetbridge claim benchmark — {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        for kind in kinds:
            probe = fresh_store(kind, scratch)
            if probe is None:
                print(f"\n## {kind}: not reachable at {PG_DSN}, skipped")
                continue
            drop_store(probe)
            print(f"\n## {kind}: claim latency (median of n claims, ms)")
            print(f"{'queued':>8} {'n':>4} {'indexed':>9} {'naive':>9} {'naive/indexed':>14}"
                  f"  same choice")
            for size in sizes:
                store = fresh_store(kind, scratch)
                assert store is not None
                try:
                    fast, slow, agree = asyncio.run(latency(store.url, size, samples[size]))
                finally:
                    drop_store(store)
                print(f"{size:>8} {samples[size]:>4} {fast * 1e3:>9.2f} {slow * 1e3:>9.2f} "
                      f"{slow / fast:>13.1f}x  {'yes' if agree else 'NO'}", flush=True)
            print(f"\n## {kind}: claim throughput ({throughput_claims} jobs drained)")
            rates: dict[tuple[int, int], float] = {}
            for claimers, products in ((1, 1), (8, 1), (8, 8)):
                store = fresh_store(kind, scratch)
                assert store is not None
                try:
                    rate = asyncio.run(
                        throughput(store.url, claimers, throughput_claims, products))
                finally:
                    drop_store(store)
                rates[claimers, products] = rate
                print(f"{claimers:>2} claimer(s), {products} product(s): {rate:>8.0f} claims/s"
                      f"  ({rate / rates[1, 1]:.2f}x of 1 claimer)", flush=True)


if __name__ == "__main__":
    main()
