"""The command line as a user runs it: real processes against real databases (both stores).

`migrate` and `serve` run on empty databases; `worker` and `watch` run against a live
server (uvicorn in the test's loop), so every subprocess is awaited asynchronously.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import inspect

from app.auth.models import Role
from app.db import create_engine
from app.events.outbox import encode_event_cursor
from app.watch import Stream, WatchError, WatchEvent, WatchOptions, watch
from app.worker import EX_TEMPFAIL, FleetClient, Worker, WorkerConfig
from tests.conftest import _pg_admin, _pg_url, free_port

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0
APP_TABLES = {"products", "tokens", "items", "comments", "jobs", "events"}

CREATE_ITEM = "mutation($input: CreateItemInput!) { createItem(input: $input) { id } }"
INGEST = "mutation($id: ID!) { ingestItemAsJob(itemId: $id) { job { id } } }"
JOB = """query($id: ID!) { job(id: $id) { stage attempts failureReason lease { fence }
  metrics { costUsd tokensIn tokensOut } item { status } } }"""
CLAIM = """mutation($worker: WorkerInput!) { claimNextJob(worker: $worker) {
  job { id } lease { fence } } }"""
TRANSITION = """mutation($id: ID!, $fence: Int!, $to: JobStage!) {
  transitionJob(jobId: $id, fence: $fence, to: $to) { stage } }"""
CANCEL = "mutation($id: ID!) { cancelJob(jobId: $id) { stage } }"

# Ships only when the body arrives on stdin and the job's fields are in the environment;
# leaves metrics for the worker to report.  The worker's token must not be passed on.
CHECKING_COMMAND = """
import json, os, sys
body = sys.stdin.read()
env = os.environ
ok = (body == 'the body' and env['FLEET_JOB_TITLE'] == 'Ship it'
      and env['FLEET_JOB_ID'] == env['EXPECTED_JOB_ID'] and env['FLEET_JOB_ATTEMPT'] == '1'
      and env['FLEET_JOB_CAPABILITIES'] == 'os:linux' and 'FLEET_TOKEN' not in env)
with open(env['FLEET_METRICS_FILE'], 'w') as f:
    json.dump({'costUsd': 0.5, 'tokensIn': 120, 'tokensOut': 30}, f)
sys.exit(0 if ok else 3)
"""


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLEET_") and k != "DATABASE_URL"}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str], timeout: float = DEADLINE) -> tuple[
    int, str, str
]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def table_names(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


@pytest.fixture
def empty_database_url(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[
    str
]:
    """An empty (never migrated) database: a zero-byte SQLite file, or a new PG database."""
    if store == "sqlite":
        path = tmp_path / "empty.db"
        path.touch()
        yield f"sqlite+aiosqlite:///{path}"
        return
    request.getfixturevalue("pg_template")  # skips (or fails under CI) without PostgreSQL
    name = f"fleetbridge_cli_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    try:
        yield _pg_url(name)
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# -- migrate and serve -------------------------------------------------------------


async def test_migrate_creates_the_tables_in_an_empty_database(empty_database_url):
    assert await table_names(empty_database_url) == set()
    code, _, err = await run_cli("migrate", env=cli_env(DATABASE_URL=empty_database_url))
    assert code == 0, err
    assert APP_TABLES <= await table_names(empty_database_url)
    # running it again is a no-op, not an error
    code, _, err = await run_cli("migrate", env=cli_env(DATABASE_URL=empty_database_url))
    assert code == 0, err


async def test_serve_migrates_an_empty_database_and_answers_healthz(empty_database_url):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        cwd=ROOT, env=cli_env(DATABASE_URL=empty_database_url, FLEET_LOG_LEVEL="warning"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        health = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            while health is None:
                assert process.returncode is None, "serve exited early"
                assert time.monotonic() < deadline, "serve did not answer /healthz in time"
                try:
                    health = await http.get("/healthz")
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert health.status_code == 200
            assert health.json() == {"status": "ok"}
            ready = await http.get("/readyz")
            assert ready.status_code == 200
        assert APP_TABLES <= await table_names(empty_database_url)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    # uvicorn shuts down cleanly, then re-raises the signal it caught
    assert process.returncode in (0, -signal.SIGTERM), err.decode()
    assert "Traceback" not in err.decode()


# -- worker ------------------------------------------------------------------------


async def _ingested_job(member, description: str, labels: list[str]) -> tuple[str, str]:
    item = (await member.data(CREATE_ITEM, input={
        "title": "Ship it", "description": description, "labels": labels,
    }))["createItem"]
    job = (await member.data(INGEST, id=item["id"]))["ingestItemAsJob"]["job"]
    return item["id"], job["id"]


async def test_worker_once_ships_the_job_and_the_item_turns_done(
    live_server, http_client, make_token
):
    server = await live_server(tracker_echo=True)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await _ingested_job(member, "the body", ["cap:os:linux"])

    code, _, err = await run_cli(
        "worker", "--url", f"{server.url}/graphql", "--worker-id", "cli-worker",
        "--capability", "os:linux", "--once", "--", sys.executable, "-c", CHECKING_COMMAND,
        env=cli_env(FLEET_TOKEN=await make_token("acme", Role.WORKER), EXPECTED_JOB_ID=job_id),
    )
    assert code == 0, err
    assert f"job {job_id}: exit 0 -> SHIPPED" in err
    job = (await member.data(JOB, id=job_id))["job"]
    assert job["stage"] == "SHIPPED"
    assert job["item"]["status"] == "DONE"
    assert job["metrics"] == {"costUsd": 0.5, "tokensIn": 120, "tokensOut": 30}


async def test_worker_reports_a_failing_command_with_its_exit_code(
    live_server, http_client, make_token
):
    server = await live_server(tracker_echo=True)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await _ingested_job(member, "not what the command wants", [])

    code, _, err = await run_cli(
        "worker", "--url", f"{server.url}/graphql", "--token",
        await make_token("acme", Role.WORKER), "--once", "--", sys.executable, "-c",
        "import sys; data=sys.stdin.read(); sys.exit(0 if data=='the body' else 3)",
        env=cli_env(),
    )
    assert code == 0, err
    job = (await member.data(JOB, id=job_id))["job"]
    assert (job["stage"], job["failureReason"]) == ("FAILED", "exit code 3")
    assert job["item"]["status"] == "BLOCKED"


async def test_worker_once_without_a_job_exits_cleanly_and_a_bad_token_is_an_error(
    live_server, make_token
):
    server = await live_server()
    worker_token = await make_token("acme", Role.WORKER)
    args = ("worker", "--url", f"{server.url}/graphql", "--once", "--", "true")
    code, _, err = await run_cli(*args, env=cli_env(FLEET_TOKEN=worker_token))
    assert (code, err) == (0, "")
    code, _, err = await run_cli(*args, env=cli_env(FLEET_TOKEN="not-a-token"))
    assert code == 2
    assert "UNAUTHENTICATED" in err


async def test_exit_tempfail_is_a_retryable_failure(live_server, http_client, make_token):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await _ingested_job(member, "the body", [])
    client = FleetClient(f"{server.url}/graphql", await make_token("acme", Role.WORKER))
    command = [sys.executable, "-c", f"import sys; sys.exit({EX_TEMPFAIL})"]
    try:
        outcomes = await asyncio.wait_for(
            Worker(client, WorkerConfig(command=command, worker_id="w", once=True)).run(),
            DEADLINE,
        )
    finally:
        await client.aclose()
    assert [(o.job_id, o.exit_code, o.stage) for o in outcomes] == [
        (job_id, EX_TEMPFAIL, "QUEUED")
    ]
    job = (await member.data(JOB, id=job_id))["job"]
    assert (job["stage"], job["attempts"], job["failureReason"]) == (
        "QUEUED", 1, f"exit code {EX_TEMPFAIL}")


async def test_a_command_that_cannot_start_is_a_retryable_failure(
    live_server, http_client, make_token
):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await _ingested_job(member, "the body", [])
    client = FleetClient(f"{server.url}/graphql", await make_token("acme", Role.WORKER))
    config = WorkerConfig(command=["/nonexistent/agent"], worker_id="w", once=True)
    try:
        [outcome] = await asyncio.wait_for(Worker(client, config).run(), DEADLINE)
    finally:
        await client.aclose()
    assert outcome.stage == "QUEUED"
    job = (await member.data(JOB, id=job_id))["job"]
    assert job["stage"] == "QUEUED"
    assert job["failureReason"].startswith("cannot run the command")


async def test_a_lost_lease_kills_the_command(live_server, http_client, make_token):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await _ingested_job(member, "the body", [])
    client = FleetClient(f"{server.url}/graphql", await make_token("acme", Role.WORKER))
    command = [sys.executable, "-c", "import time; time.sleep(120)"]
    worker = Worker(client, WorkerConfig(command=command, worker_id="w", once=True,
                                         lease_seconds=5))
    run = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + DEADLINE
        while (await member.data(JOB, id=job_id))["job"]["stage"] != "BUILDING":
            assert not run.done(), run
            assert time.monotonic() < deadline, "the worker never started the job"
            await asyncio.sleep(0.05)
        # cancelling raises the fence: the next heartbeat is a CONFLICT
        assert (await member.data(CANCEL, id=job_id))["cancelJob"]["stage"] == "CANCELLED"
        outcomes = await asyncio.wait_for(run, DEADLINE)
    finally:
        run.cancel()
        await client.aclose()
    [outcome] = outcomes
    assert outcome.lease_lost
    assert outcome.stage is None
    assert outcome.exit_code == -signal.SIGTERM
    job = (await member.data(JOB, id=job_id))["job"]
    assert (job["stage"], job["lease"]) == ("CANCELLED", None)


async def test_stopping_the_worker_kills_the_command_and_requeues_the_job(
    live_server, http_client, make_token
):
    server = await live_server()
    member = http_client(server, await make_token("acme", Role.MEMBER))
    _, job_id = await _ingested_job(member, "the body", [])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "worker", "--url", f"{server.url}/graphql",
        "--", sys.executable, "-c", "import time; time.sleep(120)",
        cwd=ROOT, env=cli_env(FLEET_TOKEN=await make_token("acme", Role.WORKER)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while (await member.data(JOB, id=job_id))["job"]["stage"] != "BUILDING":
            assert process.returncode is None, "the worker exited early"
            assert time.monotonic() < deadline, "the worker never started the job"
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    job = (await member.data(JOB, id=job_id))["job"]
    assert (job["stage"], job["attempts"], job["failureReason"]) == (
        "QUEUED", 1, "worker stopped")


# -- watch -------------------------------------------------------------------------


async def _move_through_stages(worker, job_id: str) -> None:
    claim = (await worker.data(CLAIM, worker={"workerId": "w"}))["claimNextJob"]
    assert claim["job"]["id"] == job_id
    fence = claim["lease"]["fence"]
    for stage in ("BUILDING", "SHIPPED"):
        await worker.data(TRANSITION, id=job_id, fence=fence, to=stage)


async def test_watch_prints_a_jobs_stage_changes(live_server, http_client, make_token,
                                                 make_job):
    server = await live_server()
    worker = http_client(server, await make_token("acme", Role.WORKER))
    other = await make_job("acme", title="another job", capabilities=["os:mac"])
    job = await make_job("acme", title="watched")
    token = await make_token("acme", Role.MEMBER)

    # From the cursor 0 the watch replays what is stored and then goes on live, so it
    # sees every change whether it subscribes before or after they happen.
    watcher = asyncio.create_task(run_cli(
        "watch", "--url", server.ws_url, "--job", str(job.id), "--limit", "4",
        "--after", encode_event_cursor(0), env=cli_env(FLEET_TOKEN=token),
    ))
    await _move_through_stages(worker, str(job.id))
    code, out, err = await watcher
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        f"job {job.id} (new) -> QUEUED",
        f"job {job.id} QUEUED -> ASSIGNED",
        f"job {job.id} ASSIGNED -> BUILDING",
        f"job {job.id} BUILDING -> SHIPPED",
    ]
    assert all(str(other.id) not in line.split(" ", 1)[1] for line in lines)
    cursors = [line.split(" ", 1)[0] for line in lines]
    assert len(set(cursors)) == 4

    # resuming after the second cursor gives exactly the rest, as JSON lines
    code, out, err = await run_cli(
        "watch", "--url", server.url + "/graphql", "--job", str(job.id), "--limit", "2",
        "--after", cursors[1], "--json", env=cli_env(FLEET_TOKEN=token),
    )
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["cursor"], e["kind"], e["id"], e["from"], e["to"]) for e in events] == [
        (cursors[2], "job", str(job.id), "ASSIGNED", "BUILDING"),
        (cursors[3], "job", str(job.id), "BUILDING", "SHIPPED"),
    ]


async def test_watch_follows_item_statuses_live(live_server, http_client, make_token):
    server = await live_server(tracker_echo=True)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    worker = http_client(server, await make_token("acme", Role.WORKER))
    item_id, job_id = await _ingested_job(member, "the body", [])
    received: list[WatchEvent] = []
    options = WatchOptions(
        url=server.ws_url, token=await make_token("acme", Role.MEMBER),
        streams=[Stream("item", item_id), Stream("job")], after=encode_event_cursor(0),
        limit=7,
    )
    watcher = asyncio.create_task(watch(options, received.append))
    await _move_through_stages(worker, job_id)
    assert await asyncio.wait_for(watcher, DEADLINE) == 7

    def changes(kind: str) -> list[tuple[str | None, str]]:
        return [(e.from_state, e.to_state) for e in received if e.kind == kind]

    assert changes("item") == [(None, "TODO"), ("TODO", "IN_PROGRESS"), ("IN_PROGRESS", "DONE")]
    assert changes("job") == [(None, "QUEUED"), ("QUEUED", "ASSIGNED"),
                              ("ASSIGNED", "BUILDING"), ("BUILDING", "SHIPPED")]
    assert options.cursors == {"item": received_last(received, "item"),
                               "job": received_last(received, "job")}


def received_last(events: list[WatchEvent], kind: str) -> Any:
    return [e.cursor for e in events if e.kind == kind][-1]


async def test_watch_refuses_a_bad_token_and_a_bad_cursor(live_server, make_token):
    server = await live_server()
    options = WatchOptions(url=server.ws_url, token="not-a-token", streams=[Stream("job")])
    with pytest.raises(WatchError, match="refused the token"):
        await asyncio.wait_for(watch(options, lambda _: None), DEADLINE)
    options = WatchOptions(url=server.ws_url, token=await make_token("acme", Role.MEMBER),
                           streams=[Stream("job")], after="garbage")
    with pytest.raises(WatchError, match="cursor"):
        await asyncio.wait_for(watch(options, lambda _: None), DEADLINE)
