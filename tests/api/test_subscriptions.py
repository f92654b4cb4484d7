"""Subscriptions over real websockets against the served app (both stores).

Every subscriber passes `after: viewer.eventCursor` taken before the changes it
waits for, so a change made right after subscribing is replayed if it committed
before the subscription went live: no race and no sleeping.  Receives have
deadlines (tests/api/ws_client.py).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from app.auth.models import Role
from app.db import utcnow
from app.events.models import Event
from app.events.outbox import encode_event_cursor
from app.events.service import REPLAY_BATCH
from app.fleet.models import JobStage
from app.tracker import service as tracker_service
from app.tracker.models import ItemStatus
from tests.api.ws_client import (
    ITEM_EVENTS,
    JOB_EVENTS,
    LEGACY_WS,
    PROTOCOLS,
    TRANSPORT_WS,
    InitRefusedError,
    seq_of,
    ws_connect,
)
from tests.conftest import GraphQLClient, LiveServer, error_codes

CREATE_ITEM = "mutation($title: String!) { createItem(input: {title: $title}) { id status } }"
SET_STATUS = """mutation($id: ID!, $status: ItemStatus!) {
  updateItem(id: $id, input: {status: $status}) { id status } }"""
INGEST = "mutation($id: ID!) { ingestItemAsJob(itemId: $id) { job { id stage title } } }"
SUBMIT = """mutation($title: String!) {
  submitJob(input: {title: $title, bodyMd: "do it"}) { job { id stage } } }"""
CLAIM = 'mutation { claimNextJob(worker: {workerId: "w1"}) { job { id } lease { fence } } }'
TRANSITION = """mutation($id: ID!, $fence: Int!, $to: JobStage!) {
  transitionJob(jobId: $id, fence: $fence, to: $to) { stage } }"""
VIEWER = "{ viewer { productId eventCursor } }"
JOB = "query($id: ID!) { job(id: $id) { stage } }"


async def cursor_now(client: GraphQLClient) -> str:
    cursor: str = (await client.data(VIEWER))["viewer"]["eventCursor"]
    return cursor


async def create_item(client: GraphQLClient, title: str = "an item") -> str:
    item_id: str = (await client.data(CREATE_ITEM, title=title))["createItem"]["id"]
    return item_id


async def set_status(client: GraphQLClient, item_id: str, status: str) -> None:
    await client.data(SET_STATUS, id=item_id, status=status)


async def flip_in_bulk(server: LiveServer, item_id: str, times: int) -> None:
    """`times` TODO ↔ IN_PROGRESS changes committed in one transaction."""
    async with server.services.db.unit_of_work() as session:
        item = await tracker_service.get_item(session, "acme", int(item_id))
        for _ in range(times):
            target = ItemStatus.IN_PROGRESS if item.status == ItemStatus.TODO else ItemStatus.TODO
            await tracker_service.set_status(session, item, target)


@pytest.fixture
async def acme(live_server, http_client, make_token):
    """`server, member, worker, member_token = await acme(**settings)`."""

    async def start(**settings: Any) -> tuple[LiveServer, GraphQLClient, GraphQLClient, str]:
        server = await live_server(**settings)
        token = await make_token("acme", Role.MEMBER)
        worker = http_client(server, await make_token("acme", Role.WORKER))
        return server, http_client(server, token), worker, token

    return start


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_job_stages_and_echoed_item_statuses_arrive_in_order(acme, protocol):
    server, member, worker, token = await acme(tracker_echo=True)
    item_id = await create_item(member, "Ship the thing")
    before_ingest = await cursor_now(member)
    async with ws_connect(server.ws_url, protocol, token) as client:
        assert client.ack_payload == {"productId": "acme", "role": "member"}
        item_op = await client.subscribe(ITEM_EVENTS, itemId=item_id, after=before_ingest)
        job = (await member.data(INGEST, id=item_id))["ingestItemAsJob"]["job"]
        job_op = await client.subscribe(JOB_EVENTS, jobId=job["id"],
                                        after=await cursor_now(member))
        fence = (await worker.data(CLAIM))["claimNextJob"]["lease"]["fence"]
        for stage in ("BUILDING", "REVIEW", "SHIPPED"):
            await worker.data(TRANSITION, id=job["id"], fence=fence, to=stage)

        stages = [await client.next_event(job_op, "jobStageChanged") for _ in range(4)]
        statuses = [await client.next_event(item_op, "itemStatusChanged") for _ in range(2)]

    assert [(e["from"], e["to"]) for e in stages] == [
        ("QUEUED", "ASSIGNED"), ("ASSIGNED", "BUILDING"), ("BUILDING", "REVIEW"),
        ("REVIEW", "SHIPPED")]
    assert {e["jobId"] for e in stages} == {job["id"]}
    assert all(e["job"]["id"] == job["id"] and e["job"]["title"] == "Ship the thing"
               for e in stages)
    assert stages[-1]["job"]["stage"] == "SHIPPED"
    assert [(e["from"], e["to"], e["itemId"]) for e in statuses] == [
        ("TODO", "IN_PROGRESS", item_id), ("IN_PROGRESS", "DONE", item_id)]
    assert statuses[-1]["item"] == {"id": item_id, "status": "DONE", "title": "Ship the thing"}
    for events in (stages, statuses):
        seqs = [seq_of(e["cursor"]) for e in events]
        assert seqs == sorted(set(seqs))
        times = [datetime.fromisoformat(e["at"]) for e in events]
        assert times == sorted(times)
        assert all(t.tzinfo is not None for t in times)


async def test_resume_replays_the_rest_then_goes_live_with_no_gap_or_duplicate(acme):
    server, member, _, token = await acme()
    item_id = await create_item(member)
    first = await cursor_now(member)  # the item's creation
    stored = REPLAY_BATCH + 50  # a replay of more than one log read
    await flip_in_bulk(server, item_id, stored)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        op = await client.subscribe(ITEM_EVENTS, after=first)
        events: list[dict[str, Any]] = []
        # commit while the stored events are still being replayed to us
        during_replay = {1: "BLOCKED", 100: "DONE", 400: "TODO"}
        while len(events) < stored + len(during_replay):
            events.append(await client.next_event(op, "itemStatusChanged"))
            if len(events) in during_replay:
                await set_status(member, item_id, during_replay[len(events)])
        await set_status(member, item_id, "CANCELLED")  # replay is over: this one is live
        live = await client.next_event(op, "itemStatusChanged")

    seqs = [seq_of(e["cursor"]) for e in [*events, live]]
    assert seqs == list(range(seq_of(first) + 1, seq_of(first) + stored + 5))
    assert [e["to"] for e in events[stored:]] == ["BLOCKED", "DONE", "TODO"]
    assert (live["from"], live["to"], live["item"]["status"]) == ("TODO", "CANCELLED", "CANCELLED")


async def test_another_products_subscriber_receives_nothing_of_ours(
    acme, http_client, make_token
):
    server, member, worker, _ = await acme()
    globex_token = await make_token("globex", Role.MEMBER)
    globex = http_client(server, globex_token)
    await create_item(globex, "globex's first")  # globex seq 1
    async with ws_connect(server.ws_url, TRANSPORT_WS, globex_token) as client:
        assert client.ack_payload == {"productId": "globex", "role": "member"}
        since = await cursor_now(globex)
        job_op = await client.subscribe(JOB_EVENTS, after=since)
        item_op = await client.subscribe(ITEM_EVENTS, after=since)
        # acme changes items and jobs
        item_id = await create_item(member)
        await set_status(member, item_id, "IN_PROGRESS")
        job_id = (await member.data(SUBMIT, title="acme job"))["submitJob"]["job"]["id"]
        fence = (await worker.data(CLAIM))["claimNextJob"]["lease"]["fence"]
        await worker.data(TRANSITION, id=job_id, fence=fence, to="SHIPPED")
        # then globex makes one change of each kind: the very next message of each
        # subscription is globex's own, so nothing of acme's came before it
        own_item = await create_item(globex, "globex's second")
        own_job = (await globex.data(SUBMIT, title="globex job"))["submitJob"]["job"]["id"]
        item_event = await client.next_event(item_op, "itemStatusChanged")
        job_event = await client.next_event(job_op, "jobStageChanged")
    assert (item_event["itemId"], seq_of(item_event["cursor"])) == (own_item, 2)
    assert (job_event["jobId"], job_event["from"], job_event["to"]) == (own_job, None, "QUEUED")
    assert seq_of(job_event["cursor"]) == 3


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_anonymous_and_bad_tokens_are_refused_at_connection_init(acme, protocol):
    server, _, _, token = await acme()
    for bad in (None, "not-a-token", token + "x"):
        with pytest.raises(InitRefusedError) as refused:
            async with ws_connect(server.ws_url, protocol, bad):
                pass
        if protocol == TRANSPORT_WS:
            assert (refused.value.code, refused.value.reason) == (4403, "Forbidden")
        else:
            assert refused.value.message == {
                "type": "connection_error",
                "payload": {"message": "a valid bearer token is required"}}
            assert refused.value.code is not None
    # GraphiQL sends the headers of its header editor as the init payload
    async with ws_connect(server.ws_url, protocol, None, init=False) as client:
        await client.init(token, key="Authorization")
        assert client.ack_payload == {"productId": "acme", "role": "member"}
    # subscribing without connection_init is refused too
    async with ws_connect(server.ws_url, protocol, None, init=False) as client:
        await client.subscribe(JOB_EVENTS)
        assert await client.wait_closed() == (4401, "Unauthorized")


async def test_failed_changes_publish_no_event(acme):
    server, member, worker, token = await acme()
    job_id = (await member.data(SUBMIT, title="a job"))["submitJob"]["job"]["id"]
    fence = (await worker.data(CLAIM))["claimNextJob"]["lease"]["fence"]
    since = await cursor_now(member)  # the claim (ASSIGNED)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        op = await client.subscribe(JOB_EVENTS, after=since)
        # a refused transition, a stale fence, and a unit of work that records an
        # event and then fails: none of them may reach a subscriber
        refused = await worker.execute(TRANSITION, id=job_id, fence=fence, to="QUEUED")
        assert error_codes(refused) == ["CONFLICT"]
        stale = await worker.execute(TRANSITION, id=job_id, fence=fence + 1, to="BUILDING")
        assert error_codes(stale) == ["CONFLICT"]

        async def review_then_fail() -> None:
            async with server.services.db.unit_of_work() as session:
                await server.services.fleet.transition_job(
                    session, "acme", int(job_id), fence, JobStage.REVIEW)
                raise RuntimeError("fails after the event was recorded")

        with pytest.raises(RuntimeError, match="after the event"):
            await review_then_fail()
        await worker.data(TRANSITION, id=job_id, fence=fence, to="BUILDING")
        event = await client.next_event(op, "jobStageChanged")
    assert seq_of(event["cursor"]) == seq_of(since) + 1
    assert (event["from"], event["to"]) == ("ASSIGNED", "BUILDING")
    assert (await member.data(JOB, id=job_id))["job"]["stage"] == "BUILDING"


async def test_subscriber_that_never_reads_does_not_hold_up_the_others(acme):
    server, member, _, token = await acme(subscriber_queue_size=2)
    item_id = await create_item(member)
    since = await cursor_now(member)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as stalled, \
            ws_connect(server.ws_url, LEGACY_WS, token) as reader:
        stalled_op = await stalled.subscribe(ITEM_EVENTS, after=since)
        reader_op = await reader.subscribe(ITEM_EVENTS, after=since)
        await set_status(member, item_id, "BLOCKED")  # both are live once they saw this
        for client, op in ((stalled, stalled_op), (reader, reader_op)):
            assert (await client.next_event(op, "itemStatusChanged"))["to"] == "BLOCKED"
        # bursts far larger than the per-subscriber queue; `stalled` reads nothing
        # (no change follows the last burst: catching up must not wait for one)
        for _ in range(3):
            await flip_in_bulk(server, item_id, 8)
        expected = list(range(seq_of(since) + 2, seq_of(since) + 26))
        got = [seq_of((await reader.next_event(reader_op, "itemStatusChanged"))["cursor"])
               for _ in expected]
        assert got == expected
        # when it finally reads, the stalled one gets everything, in order
        late = [seq_of((await stalled.next_event(stalled_op, "itemStatusChanged"))["cursor"])
                for _ in expected]
        assert late == expected


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_bad_and_expired_cursors_reach_the_client_as_bad_user_input(acme, protocol):
    server, member, _, token = await acme()
    item_id = await create_item(member)  # seq 1
    for status in ("IN_PROGRESS", "BLOCKED", "IN_PROGRESS", "DONE"):  # seq 2..5
        await set_status(member, item_id, status)
    # events 1..3 grow older than the retention period; the retention loop prunes them
    async with server.services.db.unit_of_work() as session:
        await session.execute(update(Event).where(Event.product_id == "acme", Event.seq <= 3)
                              .values(created_at=utcnow() - timedelta(days=30)))
    assert await server.app.state.runtime.loops.prune_events_once() == 3

    cases = {
        "garbage": "not a valid event cursor",
        encode_event_cursor(99): "does not belong to this event log",
        encode_event_cursor(1): "older than the event retention period",
    }
    async with ws_connect(server.ws_url, protocol, token) as client:
        for query in (JOB_EVENTS, ITEM_EVENTS):
            for cursor, message in cases.items():
                op = await client.subscribe(query, after=cursor)
                errors = await client.operation_errors(op)
                assert [e["extensions"] for e in errors] == [
                    {"code": "BAD_USER_INPUT", "field": "after"}]
                assert message in errors[0]["message"]
                assert (await client.receive(op))["type"] == "complete"
        # the oldest cursor that lost nothing still works
        op = await client.subscribe(ITEM_EVENTS, after=encode_event_cursor(3))
        replayed = [await client.next_event(op, "itemStatusChanged") for _ in range(2)]
    assert [(seq_of(e["cursor"]), e["to"]) for e in replayed] == [
        (4, "IN_PROGRESS"), (5, "DONE")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_init_timeout_and_subscriptions_per_connection_are_bounded(acme, protocol):
    server, member, _, token = await acme(connection_init_timeout_seconds=0.5,
                                          max_subscriptions_per_connection=2)
    async with ws_connect(server.ws_url, protocol, token, init=False) as idle:
        assert await idle.wait_closed(timeout=5) == (4408, "Connection initialisation timeout")

    item_id = await create_item(member)
    since = await cursor_now(member)
    async with ws_connect(server.ws_url, protocol, token) as client:
        first = await client.subscribe(ITEM_EVENTS, after=since)
        second = await client.subscribe(ITEM_EVENTS, itemId=item_id, after=since)
        third = await client.subscribe(ITEM_EVENTS, after=since)
        errors = await client.operation_errors(third)
        assert [e["message"] for e in errors] == ["Subscription limit reached"]
        await client.stop(first)  # a freed slot can be used again
        fourth = await client.subscribe(JOB_EVENTS, after=since)
        await set_status(member, item_id, "DONE")
        job_id = (await member.data(SUBMIT, title="a job"))["submitJob"]["job"]["id"]
        assert (await client.next_event(second, "itemStatusChanged"))["to"] == "DONE"
        assert (await client.next_event(fourth, "jobStageChanged"))["jobId"] == job_id


async def test_closing_the_socket_leaves_the_hub(acme):
    server, member, _, token = await acme()
    item_id = await create_item(member)
    since = await cursor_now(member)
    hub = server.services.hub
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        op = await client.subscribe(ITEM_EVENTS, after=since)
        await set_status(member, item_id, "DONE")
        await client.next_event(op, "itemStatusChanged")
        assert hub.subscriber_count("acme") == 1
    await wait_until(lambda: hub.subscriber_count("acme") == 0)


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    """Poll `condition` until it holds, for at most `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)
