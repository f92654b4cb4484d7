"""`fleetbridge watch` and `FleetClient.events` against a served instance (both stores):
live events over graphql-transport-ws, replay after a cursor, resume after a drop."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.auth.models import Role
from app.client import FleetApiError, FleetClient, FleetEvent, Stream
from app.events.outbox import encode_event_cursor
from app.watch import WatchOptions, watch
from tests.api.test_cli import cli_env, run_cli
from tests.api.worker_helpers import CLAIM, DEADLINE, TRANSITION, ingested_job


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
        "--after", encode_event_cursor(0), env=cli_env(FLEET_TOKEN=token), timeout=DEADLINE,
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
        "--after", cursors[1], "--json", env=cli_env(FLEET_TOKEN=token), timeout=DEADLINE,
    )
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["cursor"], e["kind"], e["id"], e["from"], e["to"]) for e in events] == [
        (cursors[2], "job", str(job.id), "ASSIGNED", "BUILDING"),
        (cursors[3], "job", str(job.id), "BUILDING", "SHIPPED"),
    ]


async def test_client_events_merge_item_and_job_streams(live_server, http_client, make_token):
    server = await live_server(tracker_echo=True)
    member = http_client(server, await make_token("acme", Role.MEMBER))
    worker = http_client(server, await make_token("acme", Role.WORKER))
    item_id, job_id = await ingested_job(member, "the body", [])
    received: list[FleetEvent] = []
    options = WatchOptions(streams=[Stream("item", item_id), Stream("job")],
                           after=encode_event_cursor(0), limit=7)
    async with FleetClient(server.ws_url, await make_token("acme", Role.MEMBER)) as client:
        watcher = asyncio.create_task(watch(client, options, received.append))
        await _move_through_stages(worker, job_id)
        assert await asyncio.wait_for(watcher, DEADLINE) == 7

    def changes(kind: str) -> list[tuple[str | None, str]]:
        return [(e.from_state, e.to_state) for e in received if e.kind == kind]

    assert changes("item") == [(None, "TODO"), ("TODO", "IN_PROGRESS"), ("IN_PROGRESS", "DONE")]
    assert changes("job") == [(None, "QUEUED"), ("QUEUED", "ASSIGNED"),
                              ("ASSIGNED", "BUILDING"), ("BUILDING", "SHIPPED")]


async def test_events_resume_after_a_dropped_connection(live_server, http_client, make_token,
                                                        make_job):
    """The server goes away mid-stream; the client reconnects to its successor on the
    same address and resumes after the last cursor it delivered: no gap, no duplicate."""
    server = await live_server()
    worker = http_client(server, await make_token("acme", Role.WORKER))
    job = await make_job("acme", title="watched")
    token = await make_token("acme", Role.MEMBER)
    received: list[FleetEvent] = []
    async with FleetClient(server.ws_url, token) as client:
        client.retry = type(client.retry)(initial_seconds=0.1, max_seconds=0.5)
        stream = client.events([Stream("job", str(job.id))], after=encode_event_cursor(0))
        received.append(await asyncio.wait_for(anext(stream), DEADLINE))  # (new) -> QUEUED
        # the websocket drops (every open connection of the server is closed)
        for connection in list(server.server.server_state.connections):
            connection.shutdown()
        await _move_through_stages(worker, str(job.id))
        for _ in range(3):
            received.append(await asyncio.wait_for(anext(stream), DEADLINE))
        await stream.aclose()
    assert [(e.from_state, e.to_state) for e in received] == [
        (None, "QUEUED"), ("QUEUED", "ASSIGNED"), ("ASSIGNED", "BUILDING"),
        ("BUILDING", "SHIPPED")]
    assert len({e.cursor for e in received}) == 4


async def test_watch_refuses_a_bad_token_and_a_bad_cursor(live_server, make_token):
    server = await live_server()
    options = WatchOptions(streams=[Stream("job")])
    async with FleetClient(server.ws_url, "not-a-token") as client:
        with pytest.raises(FleetApiError, match="refused the token"):
            await asyncio.wait_for(watch(client, options, lambda _: None), DEADLINE)
    async with FleetClient(server.ws_url, await make_token("acme", Role.MEMBER)) as client:
        with pytest.raises(FleetApiError, match="cursor"):
            await asyncio.wait_for(
                watch(client, WatchOptions(streams=[Stream("job")], after="garbage"),
                      lambda _: None), DEADLINE)
    code, _, err = await run_cli("watch", "--url", server.ws_url,
                                 env=cli_env(FLEET_TOKEN="not-a-token"), timeout=DEADLINE)
    assert code == 2
    assert "refused the token" in err
    assert "Traceback" not in err
