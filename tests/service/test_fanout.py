"""Fan-out that scales (issue 12 item 2), proven at a reduced size: correctness only.

* the hub delivers each product's events in sequence order, holding back one that
  comes ahead of a missing one, so streams never read the log to fill a gap;
* over real websockets, an event's job is read once for all subscribers that
  selected it and not at all when none did, and deliveries take no connection from
  the pool that requests use;
* across two PostgreSQL instances, the receiving instance reads each new event once,
  not once per subscriber.

Speed is measured in bench/bench_fanout.py, never asserted here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import pytest
from sqlalchemy import event

from app.auth.models import Role
from app.db import utcnow
from app.events.hub import WAKE_CHUNK, LogHub
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.events.service import JOB_STAGE_EVENTS, filter_for
from app.uow import Database
from tests.api.ws_client import JOB_EVENTS, TRANSPORT_WS, seq_of, ws_connect
from tests.service.test_pg_hub import QUIET, hub_of, submit

SUBMIT = """mutation($title: String!) {
  submitJob(input: {title: $title, bodyMd: "do it"}) { job { id } } }"""
VIEWER = "{ viewer { eventCursor } }"
STAGES_ONLY = """subscription($after: String) {
  jobStageChanged(after: $after) { cursor jobId to } }"""
CHANGES = 8


def record(seq: int, product_id: str = "acme") -> EventRecord:
    return EventRecord(product_id=product_id, seq=seq, type=EventType.JOB_CREATED,
                       entity_id=seq, from_state=None, to_state="QUEUED", created_at=utcnow())


async def test_the_hub_delivers_in_sequence_order_and_holds_back_what_comes_early(
    make_runtime, make_token
):
    await make_token("acme", Role.MEMBER)
    hub = (await make_runtime(hub_poll_seconds=QUIET)).services.hub
    assert isinstance(hub, LogHub)
    async with hub.subscribe("acme") as subscriber:  # the log is empty: head 0
        hub.deliver([record(3)])
        hub.deliver([record(2)])
        assert not subscriber.queued()  # 1 is missing: nothing is offered yet
        hub.deliver([record(1), record(2)])
        hub.deliver([record(1), record(4, "globex")])  # a duplicate; nobody on globex
        assert [r.seq for r in await subscriber.next_batch()] == [1, 2, 3]
        hub.deliver([record(4)])
        assert [r.seq for r in await subscriber.next_batch()] == [4]


async def test_a_subscriber_waiting_for_its_events_entity_wakes_once_it_is_read(
    make_runtime, make_token
):
    await make_token("acme", Role.MEMBER)
    hub = (await make_runtime(hub_poll_seconds=QUIET)).services.hub
    entity_read: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    async with hub.subscribe("acme", gate=lambda _: entity_read) as gated, \
            hub.subscribe("acme") as plain:
        waiting = [asyncio.create_task(s.next_batch()) for s in (gated, plain)]
        await asyncio.sleep(0)  # both wait for news
        hub.deliver([record(1)])
        assert [r.seq for r in await waiting[1]] == [1]
        assert not waiting[0].done()  # its event is queued, its wake-up held
        entity_read.set_result(None)
        assert [r.seq for r in await waiting[0]] == [1]


async def test_a_big_fan_out_wakes_subscribers_a_chunk_per_turn_of_the_loop(
    make_runtime, make_token
):
    await make_token("acme", Role.MEMBER)
    hub = (await make_runtime(hub_poll_seconds=QUIET)).services.hub
    count = WAKE_CHUNK * 4
    async with AsyncExitStack() as stack:
        subscribers = [await stack.enter_async_context(hub.subscribe("acme"))
                       for _ in range(count)]
        waiting = [asyncio.create_task(s.next_batch()) for s in subscribers]
        await asyncio.sleep(0)
        hub.deliver([record(1)])
        served_meanwhile: list[int] = []
        loop = asyncio.get_running_loop()

        def request_step() -> None:  # e.g. a mutation's database answer arriving
            served_meanwhile.append(sum(task.done() for task in waiting))

        # ready one turn after the event: it waits for one chunk of deliveries, not for
        # every subscriber of the event
        loop.call_soon(loop.call_soon, request_step)
        batches = await asyncio.gather(*waiting)
    assert all([r.seq for r in batch] == [1] for batch in batches)
    assert served_meanwhile == [WAKE_CHUNK]


@contextmanager
def checkouts(db: Database) -> Iterator[list[int]]:
    """Count connections taken from `db`'s pool meanwhile."""
    counter = [0]

    def count(*_: Any) -> None:
        counter[0] += 1

    event.listen(db.engine.sync_engine.pool, "checkout", count)
    try:
        yield counter
    finally:
        event.remove(db.engine.sync_engine.pool, "checkout", count)


async def test_an_events_job_is_read_once_for_all_subscribers_and_never_from_the_request_pool(
    live_server, http_client, make_token
):
    server = await live_server(hub_poll_seconds=QUIET)
    token = await make_token("acme", Role.MEMBER)
    member = http_client(server, token)
    await member.data(SUBMIT, title="first")
    since = (await member.data(VIEWER))["viewer"]["eventCursor"]
    entities, db = server.services.entities, server.services.db
    with checkouts(db) as one_submit:
        await member.data(SUBMIT, title="warm-up")
    per_submit = one_submit[0]

    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as a, \
            ws_connect(server.ws_url, TRANSPORT_WS, token) as b, \
            ws_connect(server.ws_url, TRANSPORT_WS, token) as plain:
        with_job = [(client, await client.subscribe(JOB_EVENTS, after=since))
                    for client in (a, b) for _ in range(10)]
        without_job = [(plain, await plain.subscribe(STAGES_ONLY, after=since))
                       for _ in range(10)]
        everyone = with_job + without_job
        for client, op in everyone:  # all are live once they saw the warm-up
            assert (await client.next_event(op, "jobStageChanged"))["to"] == "QUEUED"
        queries = entities.queries
        with checkouts(db) as during:
            for n in range(CHANGES):
                await member.data(SUBMIT, title=f"change {n}")
            received = {(id(client), op): [await client.next_event(op, "jobStageChanged")
                                            for _ in range(CHANGES)]
                        for client, op in everyone}
        for (client_id, _), events in received.items():
            assert [seq_of(e["cursor"]) for e in events] == list(
                range(seq_of(since) + 2, seq_of(since) + 2 + CHANGES))
            if client_id != id(plain):
                assert [e["job"]["title"] for e in events] == [
                    f"change {n}" for n in range(CHANGES)]
        # one read per event at most (reads asked for together are one query) for 20
        # subscribers that selected the job, and deliveries took nothing from the pool
        # that requests use: only the submits did
        assert 1 <= entities.queries - queries <= CHANGES
        # (a submit takes a few: its token check, maybe the token's last use, its unit of
        # work; reading the job per delivery there would take 20 x CHANGES)
        assert during[0] <= CHANGES * max(per_submit, 3)

        await a.close()
        await b.close()
        queries = entities.queries
        await member.data(SUBMIT, title="nobody wants the job")
        for _, op in without_job:
            assert (await plain.next_event(op, "jobStageChanged"))["to"] == "QUEUED"
        assert entities.queries == queries  # no subscriber selected it: no read


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["postgres"])
async def test_across_instances_each_new_event_is_read_once_per_instance(
    make_runtime, make_token
):
    await make_token("acme", Role.MEMBER)
    instance_a = await make_runtime(hub_poll_seconds=QUIET)
    instance_b = await make_runtime(hub_poll_seconds=QUIET)
    streams = instance_b.services.streams
    reads = {"count": 0}
    real_read = streams.read_events

    async def counted(*args: Any, **kwargs: Any) -> Any:
        reads["count"] += 1
        return await real_read(*args, **kwargs)

    streams.read_events = counted
    subscribers = 25
    ready = [asyncio.Event() for _ in range(subscribers)]
    running = [streams.stream("acme", filter_for(JOB_STAGE_EVENTS, None),
                              on_ready=ready[n].set) for n in range(subscribers)]
    pumps = [asyncio.create_task(_take(stream, CHANGES)) for stream in running]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 10)
        replay_reads, log_reads = reads["count"], hub_of(instance_b).log_reads
        for n in range(CHANGES):
            await submit(instance_a, "acme", f"on A {n}")
        results = await asyncio.wait_for(asyncio.gather(*pumps), 20)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream in running:
            await stream.aclose()
    for seqs in results:
        assert seqs == list(range(1, CHANGES + 1))
    assert reads["count"] == replay_reads  # no subscriber read the log for live events
    # one read per wake-up at most (+1: the catch-up of the product's first subscribers)
    assert 1 <= hub_of(instance_b).log_reads - log_reads <= CHANGES + 1


async def _take(stream: Any, count: int) -> list[int]:
    seqs = []
    async for item in stream:
        seqs.append(item.seq)
        if len(seqs) == count:
            break
    return seqs
