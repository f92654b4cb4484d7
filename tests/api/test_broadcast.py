"""The broadcast (app.graphql.broadcast), over real websockets against the served app,
both stores: a caught-up subscriber's events are written to its connection by the
hub without waking its stream, with the stream's semantics (DESIGN §5).

* caught-up subscribers of both protocols get shared frames from the broadcast, in
  order and exactly once, and an event a subscription's filter refuses wakes nobody;
* a slow subscriber (its connection's write buffer above the high-water mark) is not
  written to: its stream waits, its queue overflows and it catches up from the log,
  with no gap and no duplicate, while everyone else keeps receiving;
* a fan-out spread over many turns of the event loop keeps every subscriber's order;
* a connection with permessage-deflate is broadcast to through its compressor;
* a completed subscription gets nothing more.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.events import hub as hub_module
from app.events.hub import LocalHub
from app.graphql.frames import FleetWebSocketProtocol
from tests.api.test_shared_delivery import WITH_JOB, deliveries, wait_live
from tests.api.test_subscriptions import SUBMIT, cursor_now
from tests.api.test_subscriptions import acme as acme
from tests.api.ws_client import (
    JOB_EVENTS,
    LEGACY_WS,
    PROTOCOLS,
    TRANSPORT_WS,
    SubscriptionClient,
    seq_of,
    ws_connect,
)

CANCEL = 'mutation($id: ID!) { cancelJob(jobId: $id, reason: "test") { stage } }'
FIELD = "jobStageChanged"


def hub_of(server: Any) -> LocalHub:
    hub: LocalHub = server.services.hub
    return hub


def server_side(server: Any, client: SubscriptionClient) -> FleetWebSocketProtocol:
    """The served connection of `client` (uvicorn's protocol object)."""
    port = client.connection.local_address[1]
    for connection in server.server.server_state.connections:
        if isinstance(connection, FleetWebSocketProtocol) and connection.client[1] == port:
            return connection
    raise AssertionError("no served websocket for this client")


async def events_of(client: SubscriptionClient, op: str, count: int) -> list[dict[str, Any]]:
    return [await client.next_event(op, FIELD) for _ in range(count)]


def assert_consecutive(events: list[dict[str, Any]], first: int) -> None:
    assert [seq_of(event["cursor"]) for event in events] == list(
        range(first, first + len(events)))


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_caught_up_subscribers_are_written_to_without_waking_their_streams(
    acme, protocol
):
    server, member, _, token = await acme()
    shared, hub = deliveries(server), hub_of(server)
    target = (await member.data(SUBMIT, title="target"))["submitJob"]["job"]["id"]
    since = await cursor_now(member)
    changes = 10
    async with ws_connect(server.ws_url, protocol, token) as a, \
            ws_connect(server.ws_url, protocol, token) as b, \
            ws_connect(server.ws_url, protocol, token) as c:
        ops = [(client, await client.subscribe(WITH_JOB, after=since)) for client in (a, b, c)]
        only_target = await a.subscribe(JOB_EVENTS, after=since, jobId=target)
        await wait_live(member, ops)
        broadcasts, wakeups = shared.broadcasts, hub.wakeups
        for n in range(changes):
            await member.data(SUBMIT, title=f"change {n}")
        await member.data(CANCEL, id=target)
        received = [await events_of(client, op, changes + 1) for client, op in ops]
        (cancelled,) = await events_of(a, only_target, 1)
        for client, op in [*ops, (a, only_target)]:  # nothing more than that arrives
            with pytest.raises(TimeoutError):
                await client.receive(op, timeout=0.3)

    first = seq_of(since) + 2  # after the warm-up
    for events in received:
        assert_consecutive(events, first)
        assert [e["job"]["title"] for e in events] == [
            *(f"change {n}" for n in range(changes)), "target"]
        assert events[-1]["to"] == "CANCELLED"
    assert (cancelled["jobId"], cancelled["to"]) == (target, "CANCELLED")
    assert seq_of(cancelled["cursor"]) == first + changes
    # Per event one stream executes the shared result and the others are written to;
    # the filtered subscription is passed over for the ten events it does not want.
    # Without the broadcast every subscription is woken for every event (44 here);
    # how many are spared depends on timing (a stream still busy takes its own queue).
    deliveries_made = 3 * (changes + 1) + 1
    assert shared.broadcasts - broadcasts >= changes // 2
    assert hub.wakeups - wakeups <= deliveries_made


async def test_a_slow_subscriber_falls_back_to_the_log_and_nobody_else_waits(acme):
    server, member, _, token = await acme(subscriber_queue_size=4)
    shared = deliveries(server)
    since = await cursor_now(member)
    changes = 12
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as a, \
            ws_connect(server.ws_url, LEGACY_WS, token) as b, \
            ws_connect(server.ws_url, TRANSPORT_WS, token) as slow:
        ops = [(client, await client.subscribe(WITH_JOB, after=since)) for client in (a, b)]
        slow_op = await slow.subscribe(WITH_JOB, after=since)
        await wait_live(member, [*ops, (slow, slow_op)])
        broadcasts = shared.broadcasts
        # What its transport does when the write buffer passes the high-water mark.
        served = server_side(server, slow)
        served.pause_writing()
        for n in range(changes):
            await member.data(SUBMIT, title=f"change {n}")
        others = [await events_of(client, op, changes) for client, op in ops]
        assert shared.broadcasts > broadcasts  # the others were broadcast to
        with pytest.raises(TimeoutError):  # nothing is written to a paused transport
            await slow.receive(slow_op, timeout=0.5)
        served.resume_writing()
        late = await events_of(slow, slow_op, changes)
        with pytest.raises(TimeoutError):
            await slow.receive(slow_op, timeout=0.3)

    first = seq_of(since) + 2
    for events in [*others, late]:
        assert_consecutive(events, first)
        assert [e["job"]["title"] for e in events] == [f"change {n}" for n in range(changes)]


async def test_order_and_exactly_once_hold_across_turns_of_the_broadcast(acme, monkeypatch):
    # No time for broadcasting in a turn: every 16 subscribers the turn ends.
    monkeypatch.setattr(hub_module, "TURN_BUDGET_SECONDS", 0.0)
    server, member, _, token = await acme()
    shared = deliveries(server)
    since = await cursor_now(member)
    changes = 6
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as a, \
            ws_connect(server.ws_url, TRANSPORT_WS, token) as b, \
            ws_connect(server.ws_url, LEGACY_WS, token) as c, \
            ws_connect(server.ws_url, LEGACY_WS, token) as d:
        ops = [(client, await client.subscribe(WITH_JOB, after=since))
               for client in (a, b, c, d) for _ in range(10)]
        await wait_live(member, ops)
        broadcasts = shared.broadcasts
        # concurrent changes: one event's fan-out is still going on when the next comes
        await asyncio.gather(*(member.data(SUBMIT, title=f"change {n}")
                               for n in range(changes)))
        received = [await events_of(client, op, changes) for client, op in ops]
        for client, op in ops[::10]:
            with pytest.raises(TimeoutError):
                await client.receive(op, timeout=0.3)

    first = seq_of(since) + 2
    titles = None
    for events in received:
        assert_consecutive(events, first)
        titles = titles or [e["job"]["title"] for e in events]
        assert [e["job"]["title"] for e in events] == titles  # the same commit order
    assert sorted(titles or []) == sorted(f"change {n}" for n in range(changes))
    assert shared.broadcasts > broadcasts


async def test_a_deflate_connection_is_broadcast_to_through_its_compressor(acme):
    server, member, _, token = await acme(ws_per_message_deflate=True)
    shared = deliveries(server)
    since = await cursor_now(member)
    changes = 5
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as a, \
            ws_connect(server.ws_url, TRANSPORT_WS, token) as b:
        for client in (a, b):
            names = [extension.name for extension in client.connection.protocol.extensions]
            assert names == ["permessage-deflate"]
        ops = [(client, await client.subscribe(WITH_JOB, after=since)) for client in (a, b)]
        await wait_live(member, ops)
        broadcasts = shared.broadcasts
        for n in range(changes):
            await member.data(SUBMIT, title=f"change {n}")
        received = [await events_of(client, op, changes) for client, op in ops]

    for events in received:
        assert_consecutive(events, seq_of(since) + 2)
        assert [e["job"]["title"] for e in events] == [f"change {n}" for n in range(changes)]
    assert shared.broadcasts > broadcasts  # written through the compressor


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_completed_subscription_is_sent_nothing_more(acme, protocol):
    server, member, _, token = await acme()
    since = await cursor_now(member)
    async with ws_connect(server.ws_url, protocol, token) as client:
        done = await client.subscribe(WITH_JOB, after=since)
        going_on = await client.subscribe(WITH_JOB, after=since)
        await wait_live(member, [(client, done), (client, going_on)])
        await client.stop(done)
        # The server reads a connection's messages in order: once this one replays
        # the warm-up, `done` was completed.
        marker = await client.subscribe(JOB_EVENTS, after=since)
        assert (await client.next_event(marker, FIELD))["to"] == "QUEUED"
        await member.data(SUBMIT, title="after the complete")
        event = await client.next_event(going_on, FIELD)
        assert event["job"]["title"] == "after the complete"
        assert (await client.next_event(marker, FIELD))["job"]["title"] == "after the complete"
        if protocol == LEGACY_WS:  # the legacy protocol confirms a stop
            assert (await client.receive(done))["type"] == "complete"
        with pytest.raises(TimeoutError):
            await client.receive(done, timeout=0.3)
