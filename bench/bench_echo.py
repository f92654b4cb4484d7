"""What one tracker echo costs (FLEET_TRACKER_ECHO, DESIGN §4): statements and CPU.

    .venv/bin/python bench/bench_echo.py            # 300 jobs per store
    .venv/bin/python bench/bench_echo.py --jobs 100
    .venv/bin/python bench/bench_echo.py --cycle 5  # the cycle, echo off / on, 5 rounds
    .venv/bin/python bench/bench_echo.py --cycle 5 --no-sqlite  # PostgreSQL only

On a fresh SQLite file and (when it answers at FLEET_BENCH_PG) a fresh PostgreSQL
database, migrated with the real migrations: N items are ingested as jobs and
claimed, then the after-commit echo (`BridgeService.echo_stage_changes`, what the
commit hook calls) is run one commit at a time, with nothing else running, for

- *move*: the claim's commit (QUEUED → ASSIGNED: the item already shows
  IN_PROGRESS, so the echo has nothing to write), and
- *end*: the commit of the move to SHIPPED (the item goes DONE, with the metrics
  comment), including the publishing of the echo's own events.

Printed per echo: statements the engine's cursor listeners saw (on SQLite BEGIN
included; on PostgreSQL asyncpg's BEGIN and COMMIT are not statements), and this
process's CPU.  The cycle of bench/run.py has two moves and one end per job.

`--cycle N` measures what the issue's target is about instead: bench/run.py's cycle
(`cycle.service_cycle`, 10 claimers, claim → BUILDING → SHIPPED, `--jobs` jobs) with
FLEET_TRACKER_ECHO off and on, back to back on fresh databases, N rounds per store,
each round's on ÷ off of jobs/s and of CPU per job, and the medians.  Alternating
keeps a shared machine's drift out of each round's ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_claim import PG_DSN, drop_store, fresh_store  # noqa: E402
from sqlalchemy import event  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from app.auth.models import Role  # noqa: E402
from app.auth.service import create_token  # noqa: E402
from app.bridge.service import IngestOptions  # noqa: E402
from app.config import Settings  # noqa: E402
from app.events.outbox import EventRecord  # noqa: E402
from app.fleet.models import JobStage  # noqa: E402
from app.fleet.scheduler import WorkerProfile  # noqa: E402
from app.main import build_runtime  # noqa: E402
from app.tracker.service import NewItem  # noqa: E402

PRODUCT = "bench-echo"
_statements = [0]


@event.listens_for(Engine, "before_cursor_execute")
def _count(*_: Any) -> None:
    _statements[0] += 1


async def measure(url: str, jobs: int) -> dict[str, dict[str, float]]:
    runtime = build_runtime(Settings(database_url=url, tracker_echo=True,
                                     background_loops=False, log_level="warning"))
    await runtime.start(background=False)
    db, fleet, bridge = runtime.services.db, runtime.services.fleet, runtime.services.bridge
    hook = db.on_commit
    committed: list[list[EventRecord]] = []

    async def keep(records: Sequence[EventRecord]) -> None:
        committed.append(list(records))

    try:
        async with db.unit_of_work() as session:
            await create_token(session, product_id=PRODUCT, role=Role.WORKER)
        for n in range(jobs):  # the QUEUED echo runs here, as in production
            async with db.unit_of_work() as session:
                item = await bridge.create_item(session, PRODUCT, NewItem(title=f"item {n}"))
            async with db.unit_of_work() as session:
                await bridge.ingest_item(session, PRODUCT, item.id, IngestOptions())
        out: dict[str, dict[str, float]] = {}

        async def echo_each(name: str, commits: list[list[EventRecord]]) -> None:
            db.on_commit = hook  # the echo's own commits publish, as in production
            _statements[0], started = 0, time.process_time()
            for records in commits:
                await bridge.echo_stage_changes(records)
            out[name] = {"statements": _statements[0] / len(commits),
                         "cpu_ms": (time.process_time() - started) * 1e3 / len(commits)}
            db.on_commit = keep  # the stage changes themselves commit without echoing

        db.on_commit = keep
        held = []
        for _ in range(jobs):
            async with db.unit_of_work() as session:
                job = await fleet.claim_next_job(session, PRODUCT, WorkerProfile("bench"))
            assert job is not None
            held.append((job.id, job.lease_fence))
        await echo_each("move", committed[:])
        committed.clear()
        for job_id, fence in held:
            async with db.unit_of_work() as session:
                await fleet.transition_job(session, PRODUCT, job_id, fence, JobStage.SHIPPED)
        await echo_each("end", committed[:])
        return out
    finally:
        db.on_commit = hook
        await runtime.stop()


def cycle_rounds(kind: str, scratch: Path, jobs: int, rounds: int) -> None:
    """`rounds` rounds of the cycle with the echo off, then on; one line each."""
    import statistics

    from cycle import service_cycle

    rates: list[float] = []
    cpus: list[float] = []
    for n in range(rounds):
        figures = {}
        for echo in (False, True):
            store = fresh_store(kind, scratch)
            if store is None:
                print(f"{kind}: not reachable at {PG_DSN}, skipped")
                return
            try:
                figures[echo] = asyncio.run(
                    service_cycle(store.url, claimers=10, jobs=jobs, echo=echo))
            finally:
                drop_store(store)
        off, on = figures[False], figures[True]
        rates.append(on["per_s"] / off["per_s"])
        cpus.append(off["cpu_ms"] / on["cpu_ms"])
        print(f"{kind:<11} round {n + 1}: off {off['per_s']:6.1f} jobs/s {off['cpu_ms']:5.2f} ms"
              f"  on {on['per_s']:6.1f} jobs/s {on['cpu_ms']:5.2f} ms  on/off {rates[-1]:.2f}"
              f"  CPU off/on {cpus[-1]:.2f}", flush=True)
    print(f"{kind:<11} median of {rounds}: jobs/s on/off {statistics.median(rates):.2f}"
          f"  CPU per job off/on {statistics.median(cpus):.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/bench_echo.py",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--cycle", type=int, default=0, metavar="ROUNDS",
                        help="measure the cycle with the echo off and on, ROUNDS rounds")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    args = parser.parse_args(argv)
    kinds = tuple(kind for kind, skip in (("sqlite", args.no_sqlite), ("postgresql", args.no_pg))
                  if not skip)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-echo-") as scratch:
        if args.cycle:
            for kind in kinds:
                cycle_rounds(kind, Path(scratch), args.jobs, args.cycle)
            return
        for kind in kinds:
            store = fresh_store(kind, Path(scratch))
            if store is None:
                print(f"{kind}: not reachable at {PG_DSN}, skipped")
                continue
            try:
                figures = asyncio.run(measure(store.url, args.jobs))
            finally:
                drop_store(store)
            for name, row in figures.items():
                print(f"{kind:<11} {name:<5} {row['statements']:5.1f} statements/echo"
                      f"  {row['cpu_ms']:6.2f} ms CPU/echo")


if __name__ == "__main__":
    main()
