"""One execution and one encoding per event and distinct subscription
(app.graphql.delivery), over real websockets against the served app, both stores.

Subscribers with the same document, the same values of the variables the per-event
execution reads, the same product and role share one execution result per event
(`SharedResults.executions` counts executions), and receive the same payload text in
frames that each carry their own operation id.  Different variables or documents are
not shared; a result with errors is not shared and reaches every subscriber masked
and formatted as it would without sharing; order and exactly-once hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from app.auth.models import Role
from app.graphql.delivery import SharedResults
from tests.api.test_subscriptions import INGEST, SUBMIT, create_item, cursor_now
from tests.api.test_subscriptions import acme as acme
from tests.api.ws_client import (
    DEADLINE,
    JOB_EVENTS,
    LEGACY_WS,
    PROTOCOLS,
    TRANSPORT_WS,
    SubscriptionClient,
    seq_of,
    ws_connect,
)

WITH_JOB = """subscription($after: String, $jobId: ID) {
  jobStageChanged(after: $after, jobId: $jobId) { cursor jobId to job { id title stage } } }"""
MAYBE_JOB = """subscription($after: String, $withJob: Boolean!) {
  jobStageChanged(after: $after) { cursor to job @include(if: $withJob) { id title } } }"""
JOB_ITEM = """subscription($after: String) {
  jobStageChanged(after: $after) { cursor job { id item { title } } } }"""
BAD_PAGE = """subscription($after: String) {
  jobStageChanged(after: $after) {
    cursor job { item { comments(first: 500) { nodes { id } } } } } }"""


def deliveries(server: Any) -> SharedResults:
    shared: SharedResults = server.services.deliveries
    return shared


async def raw_frame(client: SubscriptionClient, timeout: float = DEADLINE) -> str:
    """The next text frame as sent (pings answered, keep-alives skipped)."""
    while True:
        raw = await asyncio.wait_for(client.connection.recv(), timeout)
        assert isinstance(raw, str)  # text frames, as strawberry sends them
        kind = json.loads(raw).get("type")
        if kind == "ping":
            await client.send({"type": "pong"})
        elif kind != "ka":
            return raw


def payload_text(frame: str) -> str:
    """The `payload` member's text inside a result frame."""
    return frame[frame.index('"payload":') + len('"payload":'):-1]


async def wait_live(member: Any, clients: list[tuple[SubscriptionClient, str]],
                    field: str = "jobStageChanged") -> None:
    """Submit a warm-up job; every subscription is live once it has seen it."""
    await member.data(SUBMIT, title="warm-up")
    for client, op in clients:
        result = await client.next_result(op)
        assert result["data"][field]["to"] == "QUEUED", result


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_subscribers_of_one_document_share_one_execution_and_one_payload(acme, protocol):
    server, member, _, token = await acme()
    shared = deliveries(server)
    since = await cursor_now(member)
    async with ws_connect(server.ws_url, protocol, token) as a, \
            ws_connect(server.ws_url, protocol, token) as b:
        op_a = await a.subscribe(WITH_JOB, after=since)
        await b.subscribe(JOB_EVENTS, after=since)  # another document, shifts b's ids
        op_b = await b.subscribe(WITH_JOB, after=since)  # b's "2"
        op_b_other = "1"
        await wait_live(member, [(a, op_a), (b, op_b), (b, op_b_other)])
        executions = shared.executions

        await member.data(SUBMIT, title="shared")
        frames_a = [await raw_frame(a)]
        frames_b = [await raw_frame(b), await raw_frame(b)]

    # one execution per distinct document for the event: WITH_JOB once for a and b,
    # JOB_EVENTS once
    assert shared.executions - executions == 2
    (frame_a,) = frames_a
    frame_b = next(f for f in frames_b if json.loads(f)["id"] == op_b)
    kind = "next" if protocol == TRANSPORT_WS else "data"
    for frame, op in ((frame_a, op_a), (frame_b, op_b)):
        message = json.loads(frame)
        assert (message["id"], message["type"]) == (op, kind)
        event = message["payload"]["data"]["jobStageChanged"]
        assert (event["to"], event["job"]["title"]) == ("QUEUED", "shared")
        # exactly what strawberry itself would have sent
        assert frame == json.dumps(message, separators=(",", ":"))
    # the same payload text for both, each in a frame with its own operation id
    assert payload_text(frame_a) == payload_text(frame_b)
    assert op_a != op_b


async def test_root_field_arguments_do_not_split_sharing_but_other_variables_do(acme):
    server, member, _, token = await acme()
    shared = deliveries(server)
    first = await cursor_now(member)
    await member.data(SUBMIT, title="between")
    second = await cursor_now(member)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        # `after` and `jobId` only shape which events a stream gets: shared
        old = await client.subscribe(WITH_JOB, after=first)
        new = await client.subscribe(WITH_JOB, after=second)
        assert (await client.next_event(old, "jobStageChanged"))["job"]["title"] == "between"
        # `withJob` is read by every event's execution: not shared across values
        with_job = await client.subscribe(MAYBE_JOB, after=second, withJob=True)
        without = await client.subscribe(MAYBE_JOB, after=second, withJob=False)
        everyone = [(client, old), (client, new), (client, with_job), (client, without)]
        await wait_live(member, everyone)
        executions, hits = shared.executions, shared.shared

        await member.data(SUBMIT, title="one event")
        results = {op: await client.next_event(op, "jobStageChanged") for _, op in everyone}

    # WITH_JOB once for `old` and `new`; MAYBE_JOB once per value of withJob
    assert shared.executions - executions == 3
    assert shared.shared - hits == 1
    assert results[old] == results[new]
    assert results[with_job]["job"]["title"] == "one event"
    assert "job" not in results[without]


async def test_other_products_and_roles_never_share_a_result(acme, make_token):
    server, member, _, token = await acme()
    shared = deliveries(server)
    worker_token = await make_token("acme", Role.WORKER)
    since = await cursor_now(member)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as as_member, \
            ws_connect(server.ws_url, TRANSPORT_WS, worker_token) as as_worker:
        ops = [(as_member, await as_member.subscribe(WITH_JOB, after=since)),
               (as_worker, await as_worker.subscribe(WITH_JOB, after=since))]
        await wait_live(member, ops)
        executions = shared.executions
        await member.data(SUBMIT, title="roles")
        events = [await client.next_event(op, "jobStageChanged") for client, op in ops]
    assert shared.executions - executions == 2  # the role is part of the key
    assert events[0] == events[1]


async def test_a_result_with_errors_is_not_shared_and_reaches_everyone_formatted(acme):
    server, member, _, token = await acme()
    shared = deliveries(server)
    since = await cursor_now(member)
    item_id = await create_item(member, "with an item")
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as a, \
            ws_connect(server.ws_url, TRANSPORT_WS, token) as b:
        ops = [(a, await a.subscribe(BAD_PAGE, after=since)),
               (b, await b.subscribe(BAD_PAGE, after=since))]
        await member.data(SUBMIT, title="warm-up")  # a job without an item: no error
        for client, op in ops:
            assert not (await client.next_result(op)).get("errors")
        executions, unshared = shared.executions, shared.unshared

        await member.data(INGEST, id=item_id)  # a job with an item: its page is refused
        results = [await client.next_result(op) for client, op in ops]

    assert shared.executions - executions == 2  # each subscriber executed on its own
    assert shared.unshared - unshared >= 1
    for result in results:
        assert result["data"]["jobStageChanged"]["job"]["item"] is None
        (error,) = result["errors"]
        assert error["extensions"]["code"] == "BAD_USER_INPUT"
        assert error["path"] == ["jobStageChanged", "job", "item", "comments"]
    assert results[0] == results[1]


async def test_an_unexpected_error_is_masked_for_every_subscriber(acme, monkeypatch, caplog):
    from app.tracker import repository as tracker_repository

    server, member, _, token = await acme()
    shared = deliveries(server)
    since = await cursor_now(member)
    item_id = await create_item(member, "secret title")

    async def broken_get_items(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom secret")

    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as a, \
            ws_connect(server.ws_url, TRANSPORT_WS, token) as b:
        ops = [(a, await a.subscribe(JOB_ITEM, after=since)),
               (b, await b.subscribe(JOB_ITEM, after=since))]
        await member.data(SUBMIT, title="warm-up")
        for client, op in ops:
            assert not (await client.next_result(op)).get("errors")
        executions = shared.executions
        monkeypatch.setattr(tracker_repository, "get_items", broken_get_items)
        with caplog.at_level(logging.ERROR, logger="app.graphql"):
            await member.data(INGEST, id=item_id)
            frames = [await raw_frame(client) for client, _ in ops]

    assert shared.executions - executions == 2
    for frame in frames:
        assert "boom secret" not in frame
        result = json.loads(frame)["payload"]
        assert result["data"]["jobStageChanged"]["job"]["item"] is None
        (error,) = result["errors"]
        assert error["message"] == "Unexpected error."
        assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
    assert any("boom secret" in record.getMessage() for record in caplog.records)


async def test_shared_deliveries_arrive_exactly_once_in_order_for_everyone(acme):
    server, member, _, token = await acme()
    shared = deliveries(server)
    changes = 25
    since = await cursor_now(member)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as a, \
            ws_connect(server.ws_url, LEGACY_WS, token) as b:
        ops = [(a, await a.subscribe(WITH_JOB, after=since)),
               (a, await a.subscribe(WITH_JOB, after=since)),  # twice on one connection
               (b, await b.subscribe(WITH_JOB, after=since)),
               (b, await b.subscribe(JOB_EVENTS, after=since))]
        await wait_live(member, ops)
        start = shared.shared
        for n in range(changes):
            await member.data(SUBMIT, title=f"change {n}")
        received = {(id(client), op): [await client.next_event(op, "jobStageChanged")
                                        for _ in range(changes)] for client, op in ops}
        # nothing more than that arrives
        for client, op in ops:
            with pytest.raises(TimeoutError):
                await client.receive(op, timeout=0.3)

    first = seq_of(since) + 2  # after the warm-up
    for events in received.values():
        assert [seq_of(e["cursor"]) for e in events] == list(range(first, first + changes))
        assert [e["job"]["title"] for e in events] == [f"change {n}" for n in range(changes)]
    # the three WITH_JOB subscriptions got most of their events from a shared result
    assert shared.shared - start >= changes
