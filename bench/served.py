"""GraphQL requests against one served process (`fleetbridge serve`), side by side
(bench/run.py): `{ __typename }` anonymous and with a token, `{ viewer { role } }`,
and the worker's claimNextJob + transitionJob(BUILDING) + transitionJob(SHIPPED).

The server's CPU per request is its process's user + system CPU time (/proc) over the
stretches of that kind divided by its requests; the client runs `concurrency` requests
at a time over keep-alive HTTP/1.1.  Returns a dict per request kind: requests/s,
server CPU ms per request.

The kinds take turns, ROUNDS rounds of a third of each kind's requests: the ratios
compare kinds, and on a shared machine the load drifts over seconds, so one stretch
per kind would compare kinds measured under different loads (the noise of the
`viewer` ÷ anonymous ratio in bench/RESULTS.md, 2026-11-30 13:00).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from bench_claim import PRODUCT, job_rows
from cycle import settle
from harness import SERVED_ENV, Clock, Span
from sqlalchemy import insert

from app.auth.models import Role
from app.auth.service import create_token
from app.db import create_engine
from app.fleet.models import Job
from app.uow import Database

ROOT = Path(__file__).resolve().parent.parent
CLAIM = """mutation($w: WorkerInput!) { claimNextJob(worker: $w) {
  job { id stage } lease { fence } } }"""
MOVE = """mutation($id: ID!, $fence: Int!, $to: JobStage!) {
  transitionJob(jobId: $id, fence: $fence, to: $to) { id stage } }"""
WORKER = {"workerId": "served", "capabilities": ["os:linux", "os:mac", "gpu"],
          "engineClasses": ["agentic-coder"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def prepare(url: str, jobs: int) -> str:
    """A worker token and `jobs` QUEUED jobs in the (migrated) database, settled
    (`cycle.settle`); the token."""
    db = Database(create_engine(url))
    try:
        async with db.unit_of_work() as session:
            secret = await create_token(session, product_id=PRODUCT, role=Role.WORKER)
        rows = job_rows(jobs, datetime.now(UTC), random.Random(jobs), PRODUCT)
        async with db.unit_of_work() as session:
            await session.execute(insert(Job), rows)
        await settle(db)
        return secret
    finally:
        await db.dispose()


@contextlib.contextmanager
def serving(url: str) -> Iterator[tuple[int, str]]:
    """`fleetbridge serve` on a free port; yields (pid, base URL) once /healthz answers."""
    port = free_port()
    env = {**os.environ, **SERVED_ENV, "FLEET_DATABASE_URL": url}
    process = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "serve",
         "--port", str(port)], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the served process did not come up")
            time.sleep(0.2)
        yield process.pid, base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


ROUNDS = 3


async def _stretch(pid: int, count: int, concurrency: int,
                   one: Callable[[int], Awaitable[int]]) -> tuple[int, Span]:
    """Run `one(n)` for n < count, `concurrency` at a time; `one` returns how many
    requests it made.  (requests made, the stretch's wall and server CPU seconds)."""
    made = 0
    queue = iter(range(count))

    async def lane() -> None:
        nonlocal made
        for n in queue:
            requests = await one(n)
            made += requests  # after the await: `made += await ...` would lose updates

    clock = Clock(cpu_of=pid).start()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return made, clock.stop()


async def _measure(pid: int, count: int, concurrency: int,
                   one: Callable[[int], Awaitable[int]]) -> dict[str, float]:
    """One stretch of `count` (see `_stretch`): requests, requests/s, server CPU ms."""
    made, span = await _stretch(pid, count, concurrency, one)
    rate, cpu_ms = span.per(made)
    return {"requests": made, "per_s": rate, "server_cpu_ms": cpu_ms}


async def _measure_in_turns(
    pid: int, concurrency: int,
    kinds: list[tuple[str, Callable[[int], Awaitable[int]], int]],
) -> dict[str, dict[str, float]]:
    """Each kind's `count` split over ROUNDS rounds, the kinds taking turns in each;
    per kind the totals over its stretches, as `_measure` gives them."""
    totals = {name: [0, 0.0, 0.0] for name, _, _ in kinds}
    for round_ in range(ROUNDS):
        for name, one, count in kinds:
            share = count // ROUNDS + (1 if round_ < count % ROUNDS else 0)
            made, span = await _stretch(pid, share, concurrency, one)
            total = totals[name]
            total[0] += made
            total[1] += span.wall
            total[2] += span.cpu
    results = {}
    for name, (made, wall, cpu) in totals.items():
        rate, cpu_ms = Span(wall, cpu).per(int(made))
        results[name] = {"requests": int(made), "per_s": rate, "server_cpu_ms": cpu_ms}
    return results


async def requests_bench(url: str, *, requests: int, concurrency: int) -> dict[str, Any]:
    """Each request kind `requests` times (the cycle: requests // 3 jobs, three
    mutations each) on one served process."""
    cycles = max(1, requests // 3)
    token = await prepare(url, cycles * 2)  # spare jobs: a head SKIP LOCKED by another lane
    results: dict[str, Any] = {}
    with serving(url) as (pid, base):
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

            async def post(query: str, variables: dict[str, Any] | None = None,
                           auth: bool = True) -> dict[str, Any]:
                headers = {"authorization": f"Bearer {token}"} if auth else {}
                response = await client.post("/graphql", headers=headers, json={
                    "query": query, "variables": variables or {}})
                body: dict[str, Any] = response.json()
                if response.status_code != 200 or body.get("errors"):
                    raise RuntimeError(f"{response.status_code}: {body}")
                return body["data"]

            async def typename_anon(_: int) -> int:
                await post("{ __typename }", auth=False)
                return 1

            async def typename_token(_: int) -> int:
                await post("{ __typename }")
                return 1

            async def viewer(_: int) -> int:
                data = await post("{ viewer { role } }")
                assert data["viewer"]["role"] == "WORKER"
                return 1

            async def cycle(_: int) -> int:
                claim = (await post(CLAIM, {"w": WORKER}))["claimNextJob"]
                if claim["job"] is None:  # every head SKIP LOCKED by the other lanes
                    return 1
                job_id, fence = claim["job"]["id"], claim["lease"]["fence"]
                for stage in ("BUILDING", "SHIPPED"):
                    await post(MOVE, {"id": job_id, "fence": fence, "to": stage})
                return 3

            for warm in (typename_anon, viewer):  # connections, caches, imports
                await _measure(pid, 20, concurrency, warm)
            kinds: list[tuple[str, Callable[[int], Awaitable[int]], int]] = [
                ("typename_anonymous", typename_anon, requests),
                ("typename_token", typename_token, requests),
                ("viewer_role", viewer, requests),
                ("claim_transition", cycle, cycles),
            ]
            results.update(await _measure_in_turns(pid, concurrency, kinds))
    return results
