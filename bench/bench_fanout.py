"""Fan-out benchmark: S websocket subscribers, M changes, commit → receive.

    .venv/bin/python bench/bench_fanout.py                 # the full set (see SCENARIOS)
    .venv/bin/python bench/bench_fanout.py --quick         # small sizes, < 2 minutes
    .venv/bin/python bench/bench_fanout.py --json          # one JSON object, printed last
    .venv/bin/python bench/bench_fanout.py --scenario sqlite-1000 --scenario pg-two-1000
    .venv/bin/python bench/bench_fanout.py --app-dir before=/path/to/old --app-dir after=.
                                                           # several checkouts, side by side
    .venv/bin/python bench/bench_fanout.py --server-env FLEET_WS_PER_MESSAGE_DEFLATE=true

Everything is real: `python -m app.cli serve` processes (one, or two on one
PostgreSQL database), S websocket clients speaking `graphql-transport-ws`, spread
over a few client processes, each with one `jobStageChanged` subscription selecting
`cursor at job { id stage }`, and a driver that submits M jobs over HTTP at a fixed
rate (each submit is one `JOB_CREATED` event).

Measured per scenario:

* delivery latency commit → receive: the client's wall clock at receipt minus the
  event's `at` (stamped by the server just before its commit; same machine clock),
  p50/p99 over every (subscriber, event);
* events lost: expected S x (submits that succeeded + 1 probe) minus what arrived by
  the drain deadline (late counts as lost; a subscriber that failed loses the rest);
  every subscriber's cursors are also checked to be consecutive (order, no duplicate);
* RSS per subscriber: the serving process's RSS growth from before the first
  subscriber to after all are live, / S;
* server CPU per delivery: user+system CPU of the delivering process(es) over the
  mutation and drain phase / events delivered (it includes serving the mutations,
  not the closing of the connections: clients close only once every subscriber has
  counted, so that teardown never overlaps the deliveries measured);
* mutation latency during fan-out: p50/p99 of the submit round trips;
* request latency during fan-out: p50 of `{ __typename }` round trips to the
  delivering process, ten a second (what the event loop's latency adds to anything).

The subscribers send no websocket pings of their own (browsers and graphql-ws clients
send none); the server's keep-alive pings are answered.  Server warnings and errors
and the first subscriber failures are summed up in `notes`.

The subscriber processes and their lean websocket client are bench/fanout_client.py;
the served processes, fresh databases and /proc readings, bench/fanout_servers.py.

`--app-dir` serves another checkout of the code (a `git worktree` of an older commit)
with this same driver, which is how bench/RESULTS.md records before/after; given
several times (`LABEL=DIR`), each scenario runs once per checkout, one right after the
other, so both sides see the same load on a shared machine.  `--server-env` adds
environment to the served processes.  Every websocket uses one token from one address,
so the served processes run with the per-token and per-address limits lifted.  There is
one client process per SUBSCRIBERS_PER_CLIENT subscribers (at least two), and the open-
files limit is raised to the hard limit (10,000 websockets are 10,000 descriptors in the
server and across the clients).  `FLEET_BENCH_PROFILE=DIR` writes a cProfile of each
served process there, `FLEET_BENCH_LOGS=DIR` keeps their logs.  The PostgreSQL server
is FLEET_BENCH_PG (default postgresql://postgres@127.0.0.1:5432); PostgreSQL scenarios
are skipped when it does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from fanout_client import client_main
from fanout_servers import (
    PG_DSN,
    Server,
    fresh_database,
    pg_answers,
    prepare,
    proc_cpu_seconds,
    proc_rss_kib,
)

REPO = Path(__file__).resolve().parent.parent
CLIENT_PROCESSES = 2  # at least; one more per SUBSCRIBERS_PER_CLIENT
SUBSCRIBERS_PER_CLIENT = 2_500
SUBMIT = "mutation($input: SubmitJobInput!) { submitJob(input: $input) { outcome job { id } } }"
CURSOR = "query { viewer { eventCursor } }"


@dataclass(frozen=True)
class Scenario:
    name: str
    store: str  # "sqlite" | "postgres"
    subscribers: int
    changes: int
    rate: float  # changes per second
    instances: int = 1  # 2: mutations on A, subscribers on B


SCENARIOS = [
    Scenario("sqlite-1000", "sqlite", 1_000, 200, 20.0),
    Scenario("pg-1000", "postgres", 1_000, 200, 20.0),
    Scenario("pg-two-1000", "postgres", 1_000, 200, 20.0, instances=2),
    Scenario("sqlite-10000", "sqlite", 10_000, 20, 2.0),
    Scenario("pg-10000", "postgres", 10_000, 20, 2.0),
]
QUICK = [
    Scenario("sqlite-200", "sqlite", 200, 60, 20.0),
    Scenario("pg-200", "postgres", 200, 60, 20.0),
    Scenario("pg-two-200", "postgres", 200, 60, 20.0, instances=2),
]


@dataclass
class Result:
    scenario: str
    store: str
    subscribers: int
    changes: int
    rate: float
    instances: int
    label: str = ""
    delivery_p50_ms: float | None = None
    delivery_p99_ms: float | None = None
    delivery_max_ms: float | None = None
    lost: int = 0
    out_of_order: int = 0
    errors: int = 0
    mutation_errors: int = 0
    rss_per_subscriber_kib: float | None = None
    server_cpu_per_delivery_ms: float | None = None
    mutation_p50_ms: float | None = None
    request_p50_ms: float | None = None  # `{ __typename }` on the delivering process
    mutation_p99_ms: float | None = None
    subscribe_seconds: float | None = None
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


# -- one scenario -----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def _drive(scenario: Scenario, servers: list[Server], token: str, tmp: Path,
                 result: Result, drain_seconds: float) -> None:
    mutator, delivering = servers[0], servers[-1]
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=mutator.url, timeout=120, headers=headers) as http:
        cursor = (await http.post("/graphql", json={"query": CURSOR})).json()
        after = cursor["data"]["viewer"]["eventCursor"]
        rss_before = proc_rss_kib(delivering.pid)
        ctx = mp.get_context("spawn")
        ready, results, go, close_go = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
        processes = min(max(CLIENT_PROCESSES, -(-scenario.subscribers // SUBSCRIBERS_PER_CLIENT)),
                        scenario.subscribers)
        shares = [scenario.subscribers // processes + (i < scenario.subscribers % processes)
                  for i in range(processes)]
        expected = scenario.changes + 1
        clients = [ctx.Process(target=client_main, args=(
            delivering.ws_url, token, share, after, expected, ready, go, results,
            drain_seconds + scenario.changes / scenario.rate, close_go,
        )) for share in shares]
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        for client in clients:
            client.start()
        for _ in clients:
            await loop.run_in_executor(None, ready.get, True, 600)  # all live
        result.subscribe_seconds = round(time.monotonic() - began, 1)
        rss_live = proc_rss_kib(delivering.pid)

        async def submit(n: int) -> float:
            t0 = time.perf_counter()
            response = await http.post("/graphql", json={
                "query": SUBMIT,
                "variables": {"input": {"title": f"fan-out {n}", "bodyMd": "x"}},
            })
            try:
                body = response.json()
            except ValueError:
                body = {"errors": [f"HTTP {response.status_code}: {response.text[:100]}"]}
            if response.status_code != 200 or body.get("errors"):
                result.mutation_errors += 1
                if len(result.notes) < 5:
                    result.notes.append(f"submit failed: {str(body)[:200]}")
            return (time.perf_counter() - t0) * 1000.0

        await submit(-1)  # the probe: every subscriber sees it, so all are registered
        for _ in clients:
            await loop.run_in_executor(None, ready.get, True, 600)  # all saw the probe
        rss_after = proc_rss_kib(delivering.pid)
        result.rss_per_subscriber_kib = round(
            (max(rss_live, rss_after) - rss_before) / scenario.subscribers, 1
        )
        cpu_before = sum(proc_cpu_seconds(s.pid) for s in servers)
        cpu_delivering_before = proc_cpu_seconds(delivering.pid)
        go.set()
        mutation_ms: list[float] = []
        pending: list[asyncio.Task[float]] = []
        probe_ms: list[float] = []

        async def probe() -> None:
            """A request that reads nothing, while the changes are made: what the event
            loop's latency adds to any request during fan-out."""
            async with httpx.AsyncClient(base_url=delivering.url, timeout=120) as anonymous:
                while True:
                    started = time.perf_counter()
                    await anonymous.post("/graphql", json={"query": "{ __typename }"})
                    probe_ms.append((time.perf_counter() - started) * 1000.0)
                    await asyncio.sleep(0.1)

        probing = asyncio.create_task(probe())
        t0 = loop.time()
        for n in range(scenario.changes):
            await asyncio.sleep(max(0.0, t0 + n / scenario.rate - loop.time()))
            pending.append(asyncio.create_task(submit(n)))
        mutation_ms = list(await asyncio.gather(*pending))
        probing.cancel()
        for _ in clients:  # every subscriber got everything, or the deadline passed
            await loop.run_in_executor(None, ready.get, True, 900)
        cpu_delivering = proc_cpu_seconds(delivering.pid) - cpu_delivering_before
        cpu_all = sum(proc_cpu_seconds(s.pid) for s in servers) - cpu_before
        close_go.set()
        outcomes = [await loop.run_in_executor(None, results.get, True, 900) for _ in clients]
        for client in clients:
            client.join(timeout=30)
    latencies = [value for outcome in outcomes for value in outcome["latencies"]]
    received = sum(outcome["received"] for outcome in outcomes)
    # Only changes that committed make events: a refused submit is counted apart.
    committed = scenario.changes - result.mutation_errors + 1
    result.lost = scenario.subscribers * committed - received
    result.out_of_order = sum(outcome["out_of_order"] for outcome in outcomes)
    result.errors += sum(outcome["errors"] for outcome in outcomes)
    for outcome in outcomes:
        for failure in [*outcome.get("failures", []), outcome.get("failure")]:
            if failure and len(result.notes) < 8:
                result.notes.append(f"subscriber: {failure}")
    worst: dict[int, float] = {}
    for outcome in outcomes:
        for seq, latency in outcome.get("worst", {}).items():
            worst[seq] = max(worst.get(seq, 0.0), latency)
    if worst:  # which events were slow: one burst, or all of them
        first = min(worst)
        slowest = sorted(worst.items(), key=lambda item: -item[1])[:3]
        result.notes.append("slowest events (n-th timed: max ms): " + ", ".join(
            f"{seq - first + 1}: {latency:.0f}" for seq, latency in slowest))
    result.delivery_p50_ms = percentile(latencies, 0.50)
    result.delivery_p99_ms = percentile(latencies, 0.99)
    result.delivery_max_ms = percentile(latencies, 1.0)
    delivered = max(1, len(latencies))
    result.server_cpu_per_delivery_ms = round(cpu_delivering * 1000.0 / delivered, 3)
    if scenario.instances > 1:
        result.notes.append(f"CPU of both instances per delivery "
                            f"{cpu_all * 1000.0 / delivered:.3f} ms")
    result.request_p50_ms = percentile(probe_ms, 0.50)
    result.mutation_p50_ms = percentile(mutation_ms, 0.50)
    result.mutation_p99_ms = percentile(mutation_ms, 0.99)


def run_scenario(scenario: Scenario, app_dir: Path, drain_seconds: float,
                 label: str = "", extra_env: dict[str, str] | None = None) -> Result:
    result = Result(scenario.name, scenario.store, scenario.subscribers, scenario.changes,
                    scenario.rate, scenario.instances, label=label or str(app_dir))
    if scenario.store == "postgres" and not pg_answers():
        result.skipped = f"PostgreSQL does not answer at {PG_DSN}"
        return result
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp_name:
        tmp = Path(tmp_name)
        with fresh_database(scenario.store, tmp) as database_url:
            token = prepare(app_dir, database_url)
            servers = [Server(app_dir, database_url, tmp, name, extra_env or {})
                       for name in "AB"[: scenario.instances]]
            try:
                async def main() -> None:
                    await asyncio.gather(*(server.wait_healthy() for server in servers))
                    await _drive(scenario, servers, token, tmp, result, drain_seconds)

                asyncio.run(main())
            finally:
                for server in servers:
                    server.stop()
                    keep = os.environ.get("FLEET_BENCH_LOGS")  # a directory: keep the logs
                    if keep:
                        Path(keep, f"{scenario.name}-{label or 'default'}-"
                                   f"{server.log_path.name}").write_bytes(
                            server.log_path.read_bytes())
                    problems = [line for line in server.log_path.read_text(
                        errors="replace").splitlines()
                        if " WARNING " in line or " ERROR " in line or "Traceback" in line]
                    if problems:
                        result.notes.append(f"server {server.log_path.stem}: "
                                            f"{len(problems)} warning/error lines, last: "
                                            f"{problems[-1][:300]}")
    return result


def machine() -> dict[str, Any]:
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def raise_open_files_limit() -> None:
    """10,000 websockets need 10,000 descriptors in the server and in the clients
    (which inherit this process's limit): raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(quick: bool = False, names: list[str] | None = None, app_dir: Path = REPO,
        drain_seconds: float = 60.0, *, app_dirs: list[tuple[str, Path]] | None = None,
        extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the scenarios; returns {"machine": …, "fanout": [result, …]} (for bench/run.py).

    `app_dirs` ([(label, checkout)]) serves several checkouts side by side: each
    scenario runs once per checkout, one after the other, before the next scenario."""
    raise_open_files_limit()
    chosen = QUICK if quick else SCENARIOS
    if names:
        chosen = [s for s in SCENARIOS + QUICK if s.name in names]
    checkouts = app_dirs or [("", app_dir)]
    results = []
    for scenario in chosen:
        for label, directory in checkouts:
            print(f"fan-out {scenario.name}{f' [{label}]' if label else ''}: "
                  f"S={scenario.subscribers} M={scenario.changes} "
                  f"at {scenario.rate}/s, {scenario.instances} instance(s)…", file=sys.stderr,
                  flush=True)
            result = run_scenario(scenario, directory, drain_seconds, label, extra_env)
            print("  " + json.dumps(asdict(result)), file=sys.stderr, flush=True)
            results.append(asdict(result))
    return {"machine": machine(), "app_dir": str(checkouts[0][1]),
            "app_dirs": {label or "default": str(path) for label, path in checkouts},
            "fanout": results}


def print_table(report: dict[str, Any]) -> None:
    header = ("scenario", "code", "S", "M", "p50 ms", "p99 ms", "lost", "order", "err",
              "RSS KiB/sub", "CPU ms/deliv", "mut p50", "mut p99", "req p50")
    print(" | ".join(header))
    for r in report["fanout"]:
        if r["skipped"]:
            print(f"{r['scenario']} | skipped: {r['skipped']}")
            continue
        print(" | ".join(str(x) for x in (
            r["scenario"], r["label"], r["subscribers"], r["changes"], r["delivery_p50_ms"],
            r["delivery_p99_ms"], r["lost"], r["out_of_order"], r["errors"],
            r["rss_per_subscriber_kib"], r["server_cpu_per_delivery_ms"],
            r["mutation_p50_ms"], r["mutation_p99_ms"], r.get("request_p50_ms"),
        )))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--scenario", action="append", dest="names")
    parser.add_argument("--app-dir", action="append", default=[], metavar="[LABEL=]DIR",
                        help="checkout to serve (repeat to run several side by side; "
                        "default: this one)")
    parser.add_argument("--drain-seconds", type=float, default=60.0)
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the served processes (repeatable)")
    args = parser.parse_args()
    app_dirs = []
    for spec in args.app_dir or [str(REPO)]:
        label, _, directory = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(directory).resolve()
        app_dirs.append((label or path.name, path))
    extra_env = dict(spec.split("=", 1) for spec in args.server_env)
    report = run(args.quick, args.names, app_dirs[0][1], args.drain_seconds,
                 app_dirs=app_dirs, extra_env=extra_env)
    print_table(report)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
