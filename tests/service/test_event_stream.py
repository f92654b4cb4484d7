"""Event streams against the real stores: replay across several log reads while
changes are committed, the bounded hub with a subscriber that never reads, gap
filling, rollback and cursor validation (both stores)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.auth.models import Role
from app.db import create_engine, utcnow
from app.errors import BadUserInputError
from app.events import service as event_service
from app.events.hub import LocalHub
from app.events.models import Event, EventType
from app.events.outbox import EventRecord, encode_event_cursor
from app.events.service import ITEM_STATUS_EVENTS, EventStreams, filter_for
from app.tracker import service as tracker_service
from app.tracker.models import ItemStatus
from app.tracker.service import NewItem
from app.uow import Database

DEADLINE = 10.0
EVERY_ITEM_CHANGE = filter_for(ITEM_STATUS_EVENTS, None)


class Boom(Exception):
    """Raised inside a unit of work after it recorded an event."""


async def create_item(db: Database, product: str = "acme") -> int:
    async with db.unit_of_work() as session:
        item = await tracker_service.create_item(session, product, NewItem(title="an item"))
        return item.id


async def flip_status(db: Database, item_id: int, times: int, product: str = "acme") -> None:
    """`times` status changes of one item in one transaction (one event each)."""
    async with db.unit_of_work() as session:
        item = await tracker_service.get_item(session, product, item_id)
        for _ in range(times):
            target = ItemStatus.IN_PROGRESS if item.status == ItemStatus.TODO else ItemStatus.TODO
            await tracker_service.set_status(session, item, target)


async def next_record(stream: AsyncGenerator[EventRecord, None]) -> EventRecord:
    return await asyncio.wait_for(anext(stream), DEADLINE)


@pytest.fixture
async def database(database_url: str, make_token) -> AsyncIterator[Database]:
    """A plain database without a hub: like another instance writing to the log."""
    await make_token("acme", Role.MEMBER)
    db = Database(create_engine(database_url))
    yield db
    await db.dispose()


async def test_replay_over_several_reads_while_changes_commit_has_no_gap_or_duplicate(
    make_runtime, make_token
):
    await make_token("acme", Role.MEMBER)
    services = (await make_runtime()).services
    item_id = await create_item(services.db)  # seq 1
    stored = event_service.REPLAY_BATCH + 50  # the replay takes two reads, then goes live
    await flip_status(services.db, item_id, stored)  # seq 2 .. stored + 1

    stream = services.streams.stream("acme", EVERY_ITEM_CHANGE, encode_event_cursor(1))
    seqs: list[int] = []
    async with aclosing(stream):
        # The stream is suspended inside its first log read while these commit,
        # and again inside the second read: they are mid-replay by construction.
        commit_after = {1, event_service.REPLAY_BATCH + 10}
        while len(seqs) < stored + len(commit_after):
            record = await next_record(stream)
            seqs.append(record.seq)
            if len(seqs) in commit_after:
                await flip_status(services.db, item_id, 1)
        # replay is over: the next change arrives live, and nothing else before it
        await flip_status(services.db, item_id, 1)
        live = await next_record(stream)
    assert seqs == list(range(2, stored + 4))
    assert live.seq == stored + 4
    assert live.type == EventType.ITEM_STATUS_CHANGED


async def test_slow_subscriber_never_blocks_publisher_or_others_and_catches_up_from_the_log(
    database_url, make_token
):
    await make_token("acme", Role.MEMBER)
    hub = LocalHub(max_queue=2)
    db = Database(create_engine(database_url), on_commit=hub.publish)
    streams = EventStreams(db, hub)
    try:
        item_id = await create_item(db)  # seq 1
        fast_ready, slow_ready = asyncio.Event(), asyncio.Event()
        fast = streams.stream("acme", EVERY_ITEM_CHANGE, encode_event_cursor(1),
                              on_ready=fast_ready.set)
        slow = streams.stream("acme", EVERY_ITEM_CHANGE, encode_event_cursor(1),
                              on_ready=slow_ready.set)
        async with aclosing(fast), aclosing(slow), hub.subscribe("acme") as never_reads, \
                contextlib.AsyncExitStack() as stack:
            bursts, per_burst = 4, 5
            last_seq = 1 + bursts * per_burst

            async def read_fast() -> list[int]:
                seqs: list[int] = []
                while not seqs or seqs[-1] < last_seq:
                    seqs.append((await anext(fast)).seq)
                return seqs

            fast_reader = asyncio.create_task(read_fast())
            slow_first = asyncio.create_task(anext(slow))  # takes one, then stops reading
            stack.callback(fast_reader.cancel)  # on failure, before the streams close
            stack.callback(slow_first.cancel)
            await asyncio.wait_for(fast_ready.wait(), DEADLINE)
            await asyncio.wait_for(slow_ready.wait(), DEADLINE)
            assert hub.subscriber_count("acme") == 3

            for _ in range(bursts):  # each commit publishes 5 events to queues of 2
                await asyncio.wait_for(flip_status(db, item_id, per_burst), DEADLINE)

            # the others were served while the slow ones never read
            assert await asyncio.wait_for(fast_reader, DEADLINE) == list(range(2, last_seq + 1))
            assert never_reads.overflowed
            assert await asyncio.wait_for(never_reads.next_batch(), DEADLINE) == []
            assert (await asyncio.wait_for(slow_first, DEADLINE)).seq == 2

            # the slow stream finally reads: every event, in order, from the log
            slow_seqs = [(await next_record(slow)).seq for _ in range(2, last_seq)]
            assert slow_seqs == list(range(3, last_seq + 1))

            # and after catching up it is live again, as is the raw subscriber
            never_reads.recover()
            await flip_status(db, item_id, 1)
            assert (await next_record(slow)).seq == last_seq + 1
            batch = await asyncio.wait_for(never_reads.next_batch(), DEADLINE)
            assert [record.seq for record in batch] == [last_seq + 1]
        assert hub.subscriber_count("acme") == 0
    finally:
        await db.dispose()


async def test_event_committed_elsewhere_is_filled_from_the_log_in_order(
    make_runtime, database
):
    services = (await make_runtime()).services
    item_id = await create_item(services.db)  # seq 1
    stream = services.streams.stream("acme", EVERY_ITEM_CHANGE, encode_event_cursor(1))
    async with aclosing(stream):
        reading = asyncio.create_task(next_record(stream))
        await flip_status(services.db, item_id, 1)  # seq 2, published here
        assert (await reading).seq == 2  # the stream is live now
        await flip_status(database, item_id, 1)  # seq 3: committed, never published here
        await flip_status(services.db, item_id, 1)  # seq 4, published here
        filled, live = await next_record(stream), await next_record(stream)
    assert (filled.seq, filled.from_state, filled.to_state) == (3, "IN_PROGRESS", "TODO")
    assert (live.seq, live.from_state, live.to_state) == (4, "TODO", "IN_PROGRESS")


async def test_rolled_back_change_publishes_nothing_and_uses_no_sequence(make_runtime, make_token):
    await make_token("acme", Role.MEMBER)
    services = (await make_runtime()).services
    item_id = await create_item(services.db)  # seq 1
    async with services.hub.subscribe("acme") as subscriber:

        async def block_then_fail() -> None:
            async with services.db.unit_of_work() as session:
                item = await tracker_service.get_item(session, "acme", item_id)
                await tracker_service.set_status(session, item, ItemStatus.BLOCKED)
                raise Boom

        with pytest.raises(Boom):
            await block_then_fail()
        await flip_status(services.db, item_id, 1)
        batch = await asyncio.wait_for(subscriber.next_batch(), DEADLINE)
    assert [(r.seq, r.from_state, r.to_state) for r in batch] == [(2, "TODO", "IN_PROGRESS")]
    async with services.db.read() as session:
        item = await tracker_service.get_item(session, "acme", item_id)
    assert item.status == ItemStatus.IN_PROGRESS


async def test_invalid_foreign_and_pruned_cursors_are_bad_user_input(make_runtime, make_token):
    await make_token("acme", Role.MEMBER)
    runtime = await make_runtime()
    services = runtime.services
    item_id = await create_item(services.db)  # seq 1
    await flip_status(services.db, item_id, 5)  # seq 2..6
    streams = services.streams

    for garbage in ("nope", "", encode_event_cursor(1)[:-2] + "!!", "ZXZlbnQ6LTE="):
        with pytest.raises(BadUserInputError, match="not a valid event cursor"):
            await streams.start_position("acme", garbage)
    with pytest.raises(BadUserInputError, match="does not belong"):
        await streams.start_position("acme", encode_event_cursor(7))
    assert await streams.start_position("acme", None) == 6
    assert await streams.start_position("acme", encode_event_cursor(0)) == 0

    # events 1..3 grow older than the retention period and are pruned
    async with services.db.unit_of_work() as session:
        await session.execute(
            update(Event).where(Event.product_id == "acme", Event.seq <= 3)
            .values(created_at=utcnow() - timedelta(
                seconds=services.settings.event_retention_seconds + 60))
        )
    assert await runtime.loops.prune_events_once() == 3
    for stale in (0, 1, 2):
        with pytest.raises(BadUserInputError, match="older than the event retention") as info:
            await streams.start_position("acme", encode_event_cursor(stale))
        assert info.value.extensions == {"code": "BAD_USER_INPUT", "field": "after"}
    assert await streams.start_position("acme", encode_event_cursor(3)) == 3  # nothing lost
    stream = streams.stream("acme", EVERY_ITEM_CHANGE, encode_event_cursor(3))
    async with aclosing(stream):
        assert [(await next_record(stream)).seq for _ in range(3)] == [4, 5, 6]
