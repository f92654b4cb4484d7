"""Two real `fleetbridge serve` processes on one PostgreSQL database (issue 4 §6).

Each instance is a separate OS process with its own pools, hub and background
loops (all on, so their reapers, sweepers and retention passes run side by side).
The figures are printed; run with `-s` to see them.  PostgreSQL only: required
under CI=true, skipped with a message elsewhere when no PostgreSQL answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.auth.models import Role
from app.events.outbox import decode_event_cursor, encode_event_cursor
from tests.conftest import GraphQLClient, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("store", ["postgres"])]

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 20.0
JOBS = 100
CLAIMERS = 20
SUBMITS_AT_MOST = 60
FROM_THE_START = encode_event_cursor(0)

SUBMIT = """
mutation($input: SubmitJobInput!) { submitJob(input: $input) { outcome job { id } } }
"""
CLAIM = """
mutation($worker: WorkerInput!) { claimNextJob(worker: $worker) {
  job { id attempts } lease { workerId fence } } }
"""
JOBS_QUERY = """
query { jobs(first: 200) { nodes { id stage attempts lease { workerId fence } } } }
"""
JOB_EVENTS = """
subscription($after: String) { jobStageChanged(after: $after) { cursor jobId from to } }
"""


class Instance:
    """One `python -m app.cli serve` process."""

    def __init__(self, name: str, database_url: str, log_dir: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/graphql"
        self.log_path = log_dir / f"instance-{name}.log"
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "FLEET_BACKGROUND_LOOPS": "true",
            "FLEET_REAPER_INTERVAL_SECONDS": "0.5",
            "FLEET_ECHO_SWEEP_INTERVAL_SECONDS": "0.5",
            "FLEET_HUB_POLL_SECONDS": "0.5",
            "FLEET_LOG_LEVEL": "warning",
            "FLEET_DB_TIMEOUT_SECONDS": "30",  # a loaded CI machine queues for the pool
            **(extra_env or {}),
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def wait_healthy(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"instance {self.name} exited:\n{self.log()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise AssertionError(f"instance {self.name} never became healthy:\n{self.log()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
async def two_instances(database_url: str, tmp_path: Path) -> AsyncIterator[list[Instance]]:
    instances: list[Instance] = []
    try:
        for name in ("A", "B"):
            instances.append(Instance(name, database_url, tmp_path))
        await asyncio.gather(*(instance.wait_healthy() for instance in instances))
        yield instances
    finally:
        for instance in instances:
            instance.kill()
            if log := instance.log():  # shown by pytest when the test fails
                print(f"--- instance {instance.name} log ---\n{log}")


class JobStream:
    """A `jobStageChanged` subscription over graphql-transport-ws."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    @classmethod
    async def open(cls, instance: Instance, token: str, after: str | None = None) -> JobStream:
        # No client keepalive pings: under a loaded machine a late pong would end the test
        # for a reason it does not test (delivery, not keepalive).
        connection = await connect(
            instance.ws_url, subprotocols=["graphql-transport-ws"], ping_interval=None
        )
        stream = cls(connection)
        await stream._send({"type": "connection_init",
                            "payload": {"authorization": f"Bearer {token}"}})
        assert (await stream._receive())["type"] == "connection_ack"
        await stream._send({"id": "1", "type": "subscribe",
                            "payload": {"query": JOB_EVENTS, "variables": {"after": after}}})
        return stream

    async def _send(self, message: dict[str, Any]) -> None:
        await self.connection.send(json.dumps(message))

    async def _receive(self) -> dict[str, Any]:
        while True:
            message: dict[str, Any] = json.loads(
                await asyncio.wait_for(self.connection.recv(), DEADLINE)
            )
            if message["type"] == "ping":
                await self._send({"type": "pong"})
                continue
            return message

    async def next_event(self) -> dict[str, Any]:
        message = await self._receive()
        assert message["type"] == "next", message
        assert not message["payload"].get("errors"), message
        event: dict[str, Any] = message["payload"]["data"]["jobStageChanged"]
        return event

    async def take(self, count: int) -> list[dict[str, Any]]:
        return [await self.next_event() for _ in range(count)]

    async def close(self) -> None:
        await self.connection.close()


@pytest.fixture
async def streams() -> AsyncIterator[Callable[..., Awaitable[JobStream]]]:
    opened: list[JobStream] = []

    async def open_stream(instance: Instance, token: str, after: str = FROM_THE_START) -> JobStream:
        # With a cursor the stream starts from it whenever the server gets to it, so
        # nothing made between this call and the server's subscribing is missed.
        stream = await JobStream.open(instance, token, after)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        with contextlib.suppress(ConnectionClosed, OSError):
            await stream.close()


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [decode_event_cursor(event["cursor"]) for event in events]


async def submit(client: GraphQLClient, title: str) -> int:
    data = await client.data(SUBMIT, input={"title": title, "bodyMd": "work"})
    return int(data["submitJob"]["job"]["id"])


async def test_twenty_claimers_on_two_instances_claim_every_job_once(
    two_instances, http_client, streams, make_token
):
    instance_a, instance_b = two_instances
    member, worker = await make_token("acme", Role.MEMBER), await make_token("acme", Role.WORKER)
    stream_a, stream_b = await streams(instance_a, member), await streams(instance_b, member)
    submitters = [http_client(instance_a, member), http_client(instance_b, member)]
    job_ids = await asyncio.gather(*(submit(submitters[n % 2], f"job {n}") for n in range(JOBS)))
    assert len(set(job_ids)) == JOBS

    claims: list[tuple[int, str]] = []
    empty_answers: list[int] = []
    claimers = [(http_client(two_instances[n % 2], worker), two_instances[n % 2].name)
                for n in range(CLAIMERS)]

    async def claimer(n: int) -> None:
        client, instance_name = claimers[n]
        while len(claims) < JOBS:
            claim = (await client.data(CLAIM, worker={"workerId": f"w{n}"}))["claimNextJob"]
            if claim["job"] is None:  # every remaining job is being claimed right now
                empty_answers.append(n)
                continue
            assert (claim["job"]["attempts"], claim["lease"]["fence"]) == (1, 1)
            claims.append((int(claim["job"]["id"]), instance_name))

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(claimer(n) for n in range(CLAIMERS))), 60)
    elapsed = time.perf_counter() - started
    per_instance = {name: sum(1 for _, by in claims if by == name) for name in ("A", "B")}
    print(f"\ntwo instances: {JOBS} jobs, {CLAIMERS} claimers, {len(claims)} claims "
          f"(A {per_instance['A']}, B {per_instance['B']}), "
          f"{len({job for job, _ in claims})} distinct, {len(empty_answers)} empty answers, "
          f"in {elapsed:.2f} s")
    assert sorted(job for job, _ in claims) == sorted(job_ids)  # each exactly once
    assert min(per_instance.values()) > 0
    for client, _ in claimers[:2]:  # nothing left on either instance
        assert (await client.data(CLAIM, worker={"workerId": "late"}))["claimNextJob"] == {
            "job": None, "lease": None}
    stored = (await submitters[1].data(JOBS_QUERY))["jobs"]["nodes"]
    assert {(job["stage"], job["attempts"], job["lease"]["fence"]) for job in stored} == {
        ("ASSIGNED", 1, 1)}

    # every change, whichever instance made it, reaches both subscribers in order
    started = time.perf_counter()
    seen_on_a, seen_on_b = await asyncio.gather(stream_a.take(2 * JOBS), stream_b.take(2 * JOBS))
    print(f"subscribers: {len(seen_on_a)} events on A, {len(seen_on_b)} on B, "
          f"identical cursors: {seen_on_a == seen_on_b}, "
          f"drained in {time.perf_counter() - started:.2f} s after the last claim")
    assert seqs(seen_on_b) == list(range(1, 2 * JOBS + 1))
    assert seen_on_a == seen_on_b
    assert sorted(int(e["jobId"]) for e in seen_on_b if e["to"] == "ASSIGNED") == sorted(job_ids)


async def test_the_survivor_keeps_serving_when_an_instance_is_killed(
    two_instances, http_client, streams, make_token
):
    instance_a, instance_b = two_instances
    member, worker = await make_token("acme", Role.MEMBER), await make_token("acme", Role.WORKER)
    stream_a, stream_b = await streams(instance_a, member), await streams(instance_b, member)
    through_a = http_client(instance_a, member)
    acknowledged: list[int] = []

    async def keep_submitting(lane: int) -> None:
        with contextlib.suppress(httpx.TransportError):
            for n in range(SUBMITS_AT_MOST):
                acknowledged.append(await submit(through_a, f"through A {lane}.{n}"))

    submitting = [asyncio.create_task(keep_submitting(lane)) for lane in range(3)]
    before_kill = await stream_b.take(5)  # A's changes are streaming to B ...
    instance_a.kill()  # ... when A dies, mid-stream, with requests in flight
    await asyncio.wait_for(asyncio.gather(*submitting), DEADLINE)
    assert len(acknowledged) < 3 * SUBMITS_AT_MOST  # A died with work still coming
    with pytest.raises(ConnectionClosed):
        await stream_a.take(2 * len(acknowledged) + 10)

    on_b = http_client(instance_b, member)
    committed = sorted(int(job["id"]) for job in (await on_b.data(JOBS_QUERY))["jobs"]["nodes"])
    assert set(acknowledged) <= set(committed)  # a commit may beat the kill to its answer
    rest = await stream_b.take(len(committed) - len(before_kill))
    seen = before_kill + rest
    assert seqs(seen) == list(range(1, len(committed) + 1))  # nothing lost, nothing twice
    assert sorted(int(event["jobId"]) for event in seen) == committed

    # B still claims and still streams, live and replayed
    claim = (await http_client(instance_b, worker).data(
        CLAIM, worker={"workerId": "survivor"}))["claimNextJob"]
    assert claim["job"]["id"] is not None
    [assigned] = await stream_b.take(1)
    assert (assigned["jobId"], assigned["to"]) == (claim["job"]["id"], "ASSIGNED")
    replay = await streams(instance_b, member, after=seen[-1]["cursor"])
    assert await replay.take(1) == [assigned]
    print(f"\nkilled A after B had streamed {len(before_kill)} events; "
          f"{len(acknowledged)} submits answered by A, {len(committed)} committed; "
          f"B streamed all {len(seen)} in order, then claimed job {claim['job']['id']}")
