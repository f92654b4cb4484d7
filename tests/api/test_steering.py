"""The tracker steers the fleet over real HTTP (both stores), DESIGN §4: cancel from the
item (with a real `fleetbridge worker` process whose command is killed), auto-ingest,
ingest by the item's state and follow-ups, a person's status wins, budgets.

Jobs of an item are read with `jobs(trackerItemId:)`, the top-level connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import update

from app.auth.models import Role
from app.db import utcnow
from app.fleet.models import Job
from tests.conftest import error_codes
from tests.service.test_bridge import CountingWriter

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0

CREATE = "mutation($input: CreateItemInput!) { createItem(input: $input) { id status } }"
UPDATE = """mutation($id: ID!, $input: UpdateItemInput!) {
  updateItem(id: $id, input: $input) { id status labels } }"""
INGEST = """mutation($id: ID!, $options: IngestOptions) {
  ingestItemAsJob(itemId: $id, options: $options) { outcome job { id idempotencyKey } } }"""
SUBMIT = """mutation($input: SubmitJobInput!) { submitJob(input: $input) {
  outcome job { id } } }"""
JOBS = """query($item: ID!) { jobs(trackerItemId: $item) { nodes {
  id stage failureReason idempotencyKey lease { fence } } } }"""
ITEM = """query($id: ID!) { item(id: $id) { status
  comments(first: 100) { nodes { kind body } } } }"""
ITEMS = "query { items(first: 100) { nodes { id } } }"
CLAIM = """mutation { claimNextJob(worker: {workerId: "w1"}) { job { id } lease { fence } } }"""
MOVE = """mutation($id: ID!, $fence: Int!, $to: JobStage!, $metrics: JobMetricsInput) {
  transitionJob(jobId: $id, fence: $fence, to: $to, metrics: $metrics) {
    stage failureReason metrics { costUsd } } }"""
HEARTBEAT = "mutation($id: ID!, $fence: Int!) { heartbeat(jobId: $id, fence: $fence) { fence } }"


async def clients(live_server: Any, http_client: Any, make_token: Any, **settings: Any
                  ) -> tuple[Any, Any, Any]:
    server = await live_server(**settings)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    worker = http_client(server, await make_token("acme", Role.WORKER))
    return server, member, worker


async def jobs_of(member: Any, item_id: str) -> list[dict[str, Any]]:
    return list((await member.data(JOBS, item=item_id))["jobs"]["nodes"])


async def claim(worker: Any) -> tuple[str, int]:
    claimed = (await worker.data(CLAIM))["claimNextJob"]
    return claimed["job"]["id"], claimed["lease"]["fence"]


def bad_input_field(body: dict[str, Any]) -> str:
    assert error_codes(body) == ["BAD_USER_INPUT"], body
    assert body["data"] is None
    return str(body["errors"][0]["extensions"]["field"])


async def test_item_cancel_auto_ingest_and_follow_ups_over_http(
    live_server, http_client, make_token
):
    _, member, worker = await clients(live_server, http_client, make_token)
    item = (await member.data(CREATE, input={"title": "t", "labels": ["fleet"]}))["createItem"]
    [job] = await jobs_of(member, item["id"])
    assert job["idempotencyKey"] == f"tracker-{item['id']}"
    job_id, fence = await claim(worker)
    assert job_id == job["id"]
    await member.data(UPDATE, id=item["id"], input={"labels": ["fleet", "x"]})  # no 2nd job
    await worker.data(MOVE, id=job_id, fence=fence, to="BUILDING")

    cancelled = await member.data(UPDATE, id=item["id"], input={"status": "CANCELLED"})
    assert cancelled["updateItem"]["status"] == "CANCELLED"
    [job] = await jobs_of(member, item["id"])
    assert (job["stage"], job["failureReason"], job["lease"]) == (
        "CANCELLED", "item cancelled", None)
    assert error_codes(await worker.execute(HEARTBEAT, id=job_id, fence=fence)) == ["CONFLICT"]
    assert error_codes(await worker.execute(MOVE, id=job_id, fence=fence, to="SHIPPED")) == [
        "CONFLICT"]
    assert error_codes(await member.execute(INGEST, id=item["id"])) == ["CONFLICT"]
    assert len(await jobs_of(member, item["id"])) == 1

    # a wrong hint refuses the create, naming the label; no item is written
    before = (await member.data(ITEMS))["items"]["nodes"]
    body = await member.execute(CREATE, input={"title": "t", "labels": ["fleet", "priority:x"]})
    assert bad_input_field(body) == "input.labels"
    assert "priority:x" in body["errors"][0]["message"]
    assert (await member.data(ITEMS))["items"]["nodes"] == before

    # follow-ups: the job failed and the item is open again
    item = (await member.data(CREATE, input={"title": "again"}))["createItem"]
    await member.data(INGEST, id=item["id"])
    job_id, fence = await claim(worker)
    await worker.data(MOVE, id=job_id, fence=fence, to="FAILED")
    follow_up = (await member.data(INGEST, id=item["id"]))["ingestItemAsJob"]
    assert (follow_up["outcome"], follow_up["job"]["idempotencyKey"]) == (
        "CREATED", f"tracker-{item['id']}-1")
    job_id, fence = await claim(worker)
    await worker.data(MOVE, id=job_id, fence=fence, to="SHIPPED")
    await member.data(UPDATE, id=item["id"], input={"status": "DONE"})
    again = (await member.data(INGEST, id=item["id"]))["ingestItemAsJob"]
    assert (again["outcome"], again["job"]["id"]) == ("DEDUPED", job_id)
    assert (await member.data(ITEM, id=item["id"]))["item"]["status"] == "DONE"
    assert [j["stage"] for j in await jobs_of(member, item["id"])] == ["FAILED", "SHIPPED"]


async def test_persons_status_and_budgets_over_http(live_server, http_client, make_token):
    _, member, worker = await clients(live_server, http_client, make_token, tracker_echo=True)
    # DONE by a person while the job builds; the job then fails: the item stays DONE
    item = (await member.data(CREATE, input={"title": "t"}))["createItem"]
    await member.data(INGEST, id=item["id"], options={"budget": 1.0})
    job_id, fence = await claim(worker)
    building = await worker.data(MOVE, id=job_id, fence=fence, to="BUILDING",
                                 metrics={"costUsd": 0.6})
    assert building["transitionJob"]["stage"] == "BUILDING"
    await member.data(UPDATE, id=item["id"], input={"status": "DONE"})
    # the budget: a second $0.6 on $1.0 ends the job FAILED, whatever was asked
    ended = (await worker.data(MOVE, id=job_id, fence=fence, to="SHIPPED",
                               metrics={"costUsd": 0.6}))["transitionJob"]
    assert ended["stage"] == "FAILED"
    assert ended["failureReason"] == "budget exceeded"
    assert abs(ended["metrics"]["costUsd"] - 1.2) < 1e-9
    assert error_codes(await worker.execute(HEARTBEAT, id=job_id, fence=fence)) == ["CONFLICT"]
    shown = (await member.data(ITEM, id=item["id"]))["item"]
    assert shown["status"] == "DONE"
    final = shown["comments"]["nodes"][-1]
    assert final["kind"] == "SYSTEM"
    assert "FAILED" in final["body"]
    assert "$1.2000" in final["body"]

    for budget in (0, -1):
        body = await member.execute(SUBMIT, input={"title": "x", "bodyMd": "x",
                                                   "budget": budget})
        assert bad_input_field(body) == "input.budget"
        body = await member.execute(INGEST, id=item["id"], options={"budget": budget})
        assert bad_input_field(body) == "options.budget"


# -- a real worker process -----------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _until(check: Any, what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while not (result := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return result


async def test_cancelling_the_item_kills_the_reference_workers_command(
    live_server, http_client, make_token, tmp_path
):
    # a short lease, so the worker heartbeats every couple of seconds
    server, member, _ = await clients(live_server, http_client, make_token, lease_seconds=6)
    item = (await member.data(CREATE, input={"title": "t", "labels": ["fleet"]}))["createItem"]
    [job] = await jobs_of(member, item["id"])
    pid_file = tmp_path / "command.pid"
    command = ("import os, pathlib, sys, time; "
               "pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(120)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLEET_") and k != "DATABASE_URL"}
    env["FLEET_TOKEN"] = await make_token("acme", Role.WORKER)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "worker", "--url", f"{server.url}/graphql", "--once",
        "--", sys.executable, "-c", command, str(pid_file),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    pid: int | None = None
    try:
        async def command_started() -> bool:
            assert process.returncode is None, "the worker exited early"
            return pid_file.exists() and pid_file.read_text().strip() != ""

        await _until(command_started, "the worker to start the command")
        pid = int(pid_file.read_text())
        assert (await jobs_of(member, item["id"]))[0]["stage"] in ("ASSIGNED", "BUILDING")

        await member.data(UPDATE, id=item["id"], input={"status": "CANCELLED"})

        async def command_gone() -> bool:
            assert pid is not None
            return not _alive(pid)

        await _until(command_gone, "the worker to kill the command")
        with contextlib.suppress(TimeoutError):  # --once: it stops after that job
            await asyncio.wait_for(process.wait(), DEADLINE)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), DEADLINE)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in err.decode()
    [job] = await jobs_of(member, item["id"])
    assert (job["stage"], job["failureReason"], job["lease"]) == (
        "CANCELLED", "item cancelled", None)


ECHO = "mutation($id: ID!) { echoJobToItem(jobId: $id) { echoed error } }"


async def test_follow_up_race_and_who_sets_the_status_over_http(
    live_server, http_client, make_token
):
    _, member, worker = await clients(live_server, http_client, make_token, tracker_echo=True)
    # TODO by a person during BUILDING: it stays TODO through the end, with one final note
    item = (await member.data(CREATE, input={"title": "t"}))["createItem"]
    await member.data(INGEST, id=item["id"])
    job_id, fence = await claim(worker)
    await worker.data(MOVE, id=job_id, fence=fence, to="BUILDING")
    await member.data(UPDATE, id=item["id"], input={"status": "TODO"})
    await worker.data(MOVE, id=job_id, fence=fence, to="REVIEW")
    await worker.data(MOVE, id=job_id, fence=fence, to="FAILED")
    shown = (await member.data(ITEM, id=item["id"]))["item"]
    assert shown["status"] == "TODO"
    assert sum("is FAILED" in c["body"] for c in shown["comments"]["nodes"]) == 1
    assert (await member.data(ECHO, id=job_id))["echoJobToItem"] == {"echoed": None,
                                                                      "error": None}

    # the item is open and its job ended: ten concurrent ingests make one follow-up
    answers = await asyncio.gather(*(member.data(INGEST, id=item["id"]) for _ in range(10)))
    outcomes = sorted(a["ingestItemAsJob"]["outcome"] for a in answers)
    assert outcomes == ["CREATED"] + ["DEDUPED"] * 9
    assert len({a["ingestItemAsJob"]["job"]["id"] for a in answers}) == 1
    jobs = await jobs_of(member, item["id"])
    assert [j["idempotencyKey"] for j in jobs] == [f"tracker-{item['id']}",
                                                   f"tracker-{item['id']}-1"]
    assert (await member.data(ITEM, id=item["id"]))["item"]["status"] == "IN_PROGRESS"

    # two jobs on one item: only the latest sets the status
    older_id, older_fence = await claim(worker)
    assert older_id == jobs[1]["id"]
    newer = (await member.data(SUBMIT, input={"title": "n", "bodyMd": "n",
                                              "trackerItemId": item["id"]}))["submitJob"]
    newer_id, newer_fence = await claim(worker)
    assert newer_id == newer["job"]["id"]
    await worker.data(MOVE, id=newer_id, fence=newer_fence, to="SHIPPED")
    await worker.data(MOVE, id=older_id, fence=older_fence, to="FAILED")
    assert (await member.data(ITEM, id=item["id"]))["item"]["status"] == "DONE"


async def test_flag_off_sweeper_retries_only_the_manual_echos_stage_over_http(
    live_server, http_client, make_token
):
    writer = CountingWriter()
    server, member, worker = await clients(live_server, http_client, make_token,
                                           echo_writer=writer)
    item = (await member.data(CREATE, input={"title": "t"}))["createItem"]
    await member.data(INGEST, id=item["id"])
    job_id, fence = await claim(worker)
    await worker.data(MOVE, id=job_id, fence=fence, to="BUILDING")
    writer.failures = 1
    failed = (await member.data(ECHO, id=job_id))["echoJobToItem"]
    assert failed["echoed"] is None
    assert failed["error"]
    await worker.data(MOVE, id=job_id, fence=fence, to="SHIPPED")
    async with server.services.db.unit_of_work() as session:  # its backoff runs out
        await session.execute(update(Job).where(Job.id == int(job_id)).values(
            echo_retry_at=utcnow()))
    loops = server.app.state.runtime.loops
    assert await loops.sweep_echoes_once() == 1
    assert await loops.sweep_echoes_once() == 0
    shown = (await member.data(ITEM, id=item["id"]))["item"]
    assert shown["status"] == "IN_PROGRESS"  # the manual echo's stage, never SHIPPED's
    assert ["is BUILDING" in c["body"] for c in shown["comments"]["nodes"]] == [True]
