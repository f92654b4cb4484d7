"""fleetbridge benchmark harness: everything side by side in one run, ratios first.

    .venv/bin/python bench/run.py --quick          # under 5 minutes
    .venv/bin/python bench/run.py                  # full: 1M queued jobs, more of each
    .venv/bin/python bench/run.py --quick --json   # ... and one JSON object, printed last
    make bench                                     # the full run

On SQLite and on PostgreSQL (FLEET_BENCH_PG, default postgresql://postgres@127.0.0.1:5432;
skipped when it does not answer), each measurement on a fresh database migrated with
the real migrations:

1. cycle — claim → BUILDING → SHIPPED with N concurrent claimers through the service
   layer, against a raw-SQL loop (asyncpg SKIP LOCKED / aiosqlite) and Procrastinate
   (PostgreSQL, `pip install -e ".[bench]"`) with the same concurrency; the same cycle
   with FLEET_TRACKER_ECHO on; ingest (item → job) per second.  bench/cycle.py.
2. requests — `{ __typename }` anonymous and with a token, `{ viewer { role } }` and the
   claim + transitions over GraphQL on one served process, server CPU per request.
   bench/served.py.
3. latency — the indexed claim's median at 1k queued jobs and at 1M (--quick: 20k),
   the two queues sampled alternately.
4. fan-out — bench/bench_fanout.py (its own --json), when present.

CPU figures are milliseconds of process CPU per operation (this process for the cycle,
the server process for requests); rates drift on a shared machine, ratios less so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from harness import fmt_num, fmt_ratio, percentile, ratio  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, finishes in under 5 minutes")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--only", action="append",
                        choices=["cycle", "requests", "latency", "fanout"],
                        help="run only these parts (repeatable)")
    parser.add_argument("--claimers", type=int, default=10, help="concurrent claimers")
    return parser.parse_args(argv)


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"cycle_jobs": 60, "requests": 90, "concurrency": 4,
                "small_queue": 1_000, "large_queue": 20_000, "latency_samples": 21}
    return {"cycle_jobs": 2_000, "requests": 1_500, "concurrency": 4,
            "small_queue": 1_000, "large_queue": 1_000_000, "latency_samples": 101}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def in_store(kind: str, scratch: Path, body: Callable[[str], Any]) -> Any:
    """Run `body(url)` on a fresh migrated database of `kind`, dropped afterwards."""
    from bench_claim import drop_store, fresh_store

    store = fresh_store(kind, scratch)
    assert store is not None
    try:
        return body(store.url)
    finally:
        drop_store(store)


def part_cycle(kind: str, scratch: Path, size: dict[str, int], claimers: int) -> dict[str, Any]:
    import cycle

    jobs = size["cycle_jobs"]
    out: dict[str, Any] = {}
    for name, run in (
        ("service", lambda url: cycle.service_cycle(url, claimers=claimers, jobs=jobs,
                                                    echo=False)),
        ("service_echo", lambda url: cycle.service_cycle(url, claimers=claimers, jobs=jobs,
                                                         echo=True)),
        ("raw", lambda url: (cycle.raw_pg_cycle if kind == "postgresql"
                             else cycle.raw_sqlite_cycle)(url, claimers=claimers, jobs=jobs)),
        *((("procrastinate", lambda url: cycle.procrastinate_cycle(
            url, claimers=claimers, jobs=jobs)),) if kind == "postgresql" else ()),
    ):
        log(f"  {kind}: cycle {name} ({jobs} jobs, {claimers} claimers)")
        out[name] = in_store(kind, scratch, lambda url, run=run: asyncio.run(run(url)))
        log(f"    {json.dumps(out[name])}")
    service = out["service"]["per_s"]
    out["ratios"] = {
        "service_vs_raw": ratio(service, out["raw"]["per_s"]),
        "echo_on_vs_off": ratio(out["service_echo"]["per_s"], service),
    }
    if "procrastinate" in out:
        out["ratios"]["service_vs_procrastinate"] = ratio(service, out["procrastinate"]["per_s"])
    return out


def part_requests(kind: str, scratch: Path, size: dict[str, int]) -> dict[str, Any]:
    import served

    log(f"  {kind}: requests ({size['requests']} of each kind)")
    out: dict[str, Any] = in_store(kind, scratch, lambda url: asyncio.run(
        served.requests_bench(url, requests=size["requests"],
                              concurrency=size["concurrency"])))
    log(f"    {json.dumps(out)}")
    cpu = {name: figures["server_cpu_ms"] for name, figures in out.items()}
    out["ratios"] = {
        "viewer_cpu_vs_anonymous_typename": ratio(cpu["viewer_role"],
                                                  cpu["typename_anonymous"]),
        "token_typename_cpu_vs_anonymous": ratio(cpu["typename_token"],
                                                 cpu["typename_anonymous"]),
        "claim_transition_vs_viewer_per_s": ratio(out["claim_transition"]["per_s"],
                                                  out["viewer_role"]["per_s"]),
    }
    return out


async def _claim_latencies(urls: dict[str, str], queued: dict[str, int],
                           samples: int) -> dict[str, dict[str, float]]:
    """Median and p90 claim latency (ms, `claimNextJob`'s unit of work of one call, as
    served) on each database of `urls`, its queue `queued[label]` jobs long.  Every
    queue is seeded and settled first (VACUUM ANALYZE; on SQLite ANALYZE and a WAL
    checkpoint); then the samples alternate between the queues,
    round by round and in turn first, so that what the machine does meanwhile (the
    checkpoint and autovacuum that follow a million-row load, other processes) falls
    on every size alike."""
    from bench_claim import PRODUCT
    from cycle import ALL_CAPS, seed_jobs, settle

    from app.db import create_engine
    from app.fleet.service import FleetPolicy, FleetService
    from app.uow import Database

    dbs = {label: Database(create_engine(url)) for label, url in urls.items()}
    try:
        for label, db in dbs.items():
            await seed_jobs(db, queued[label])
            # settled as a queue that has stood a while (`settle`: PostgreSQL vacuumed
            # and analyzed), SQLite analyzed and its WAL checkpointed into the file
            await settle(db)
            if db.engine.dialect.name != "postgresql":
                for sql in ("ANALYZE", "PRAGMA wal_checkpoint(TRUNCATE)"):
                    async with db.engine.connect() as connection:
                        auto = await connection.execution_options(
                            isolation_level="AUTOCOMMIT")
                        await auto.exec_driver_sql(sql)
        service = FleetService(FleetPolicy())
        times: dict[str, list[float]] = {label: [] for label in dbs}
        order = list(dbs)
        for n in range(samples + 1):
            for label in order if n % 2 else reversed(order):
                started = time.perf_counter()
                async with dbs[label].unit_of_work(one_call=True) as session:
                    job = await service.claim_next_job(session, PRODUCT, ALL_CAPS)
                assert job is not None, "the queue ran dry"
                if n:  # the first round warms the pools and the statement caches
                    times[label].append((time.perf_counter() - started) * 1e3)
        return {label: {"queued": queued[label], "median_ms": statistics.median(found),
                        "p90_ms": percentile(found, 90)}
                for label, found in times.items()}
    finally:
        for db in dbs.values():
            await db.dispose()


def part_latency(kind: str, scratch: Path, size: dict[str, int]) -> dict[str, Any]:
    from bench_claim import drop_store, fresh_store

    labels = ("small_queue", "large_queue")
    queued = {label: size[label] for label in labels}
    log(f"  {kind}: claim latency at {queued['small_queue']:,} and"
        f" {queued['large_queue']:,} queued, alternated")
    stores = []
    try:
        for _ in labels:
            store = fresh_store(kind, scratch)
            assert store is not None
            stores.append(store)
        out: dict[str, Any] = asyncio.run(_claim_latencies(
            {label: store.url for label, store in zip(labels, stores, strict=True)},
            queued, size["latency_samples"]))
    finally:
        for store in stores:
            drop_store(store)
    log(f"    {json.dumps(out)}")
    out["ratios"] = {"large_vs_small": ratio(out["large_queue"]["median_ms"],
                                             out["small_queue"]["median_ms"])}
    return out


def part_fanout(quick: bool) -> dict[str, Any]:
    """bench/bench_fanout.py --json in a child process; its last stdout line."""
    script = HERE / "bench_fanout.py"
    if not script.exists():
        return {"skipped": "bench/bench_fanout.py not present"}
    log("  fan-out: bench/bench_fanout.py")
    command = [sys.executable, str(script), "--json", *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          cwd=HERE.parent)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        return {"skipped": f"bench_fanout.py exited {done.returncode}",
                "stderr_tail": done.stderr[-2_000:]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("sqlalchemy", "strawberry-graphql", "asyncpg", "aiosqlite", "uvicorn",
                 "procrastinate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    import sqlite3

    found["sqlite"] = sqlite3.sqlite_version
    return found


def headline(report: dict[str, Any]) -> list[str]:
    """The ratio lines printed at the end, one per store and measure."""
    lines = []
    for kind, parts in report["stores"].items():
        for part, figures in parts.items():
            for name, value in (figures.get("ratios") or {}).items():
                lines.append(f"{kind:<11} {part:<9} {name:<36} {fmt_ratio(value)}")
    return lines


def details(report: dict[str, Any]) -> list[str]:
    lines = []
    for kind, parts in report["stores"].items():
        for part, figures in parts.items():
            for name, row in figures.items():
                if name == "ratios" or not isinstance(row, dict):
                    continue
                shown = ", ".join(
                    f"{key}={fmt_num(value, digits=2) if isinstance(value, float) else value}"
                    for key, value in row.items())
                lines.append(f"{kind:<11} {part:<9} {name:<20} {shown}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    size = sizes(args.quick)
    parts = args.only or ["cycle", "requests", "latency", "fanout"]
    from bench_claim import PG_DSN, drop_store, fresh_store

    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"load average {os.getloadavg()[0]:.1f}",
        "mode": "quick" if args.quick else "full", "sizes": size,
        "claimers": args.claimers, "versions": versions(), "stores": {},
    }
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        kinds = [kind for kind, off in (("sqlite", args.no_sqlite), ("postgresql", args.no_pg))
                 if not off]
        for kind in kinds:
            probe = fresh_store(kind, scratch)
            if probe is None:
                log(f"{kind}: not reachable at {PG_DSN}, skipped")
                continue
            drop_store(probe)
            store: dict[str, Any] = report["stores"].setdefault(kind, {})
            if "cycle" in parts:
                store["cycle"] = part_cycle(kind, scratch, size, args.claimers)
            if "requests" in parts:
                store["requests"] = part_requests(kind, scratch, size)
            if "latency" in parts:
                store["latency"] = part_latency(kind, scratch, size)
    if "fanout" in parts:
        report["fanout"] = part_fanout(args.quick)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_after"] = round(os.getloadavg()[0], 1)

    print(f"# fleetbridge benchmarks — {report['date']}, {report['machine']}, "
          f"{report['mode']} run, {report['seconds']} s")
    print(f"# versions: {json.dumps(report['versions'])}")
    print("\n## figures (per_s = operations per wall second; cpu_ms = CPU ms per operation)")
    print("\n".join(details(report)))
    if "fanout" in report:
        print(f"\nfan-out: {json.dumps(report['fanout'])}")
    print("\n## headline ratios")
    print("\n".join(headline(report)))
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
