"""What one tracker echo costs (FLEET_TRACKER_ECHO, DESIGN §4): statements and CPU.

    .venv/bin/python bench/bench_echo.py            # 300 jobs per store
    .venv/bin/python bench/bench_echo.py --jobs 100

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/bench_echo.py",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fleet-bench-echo-") as scratch:
        for kind in ("sqlite", "postgresql"):
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
