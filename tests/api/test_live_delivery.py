"""No lost live event, and streams that ride out a database blip (issue 11 items 2, 4).

Real websockets against the served app on both stores.  Faults are injected at
seams: `Database.after_commit` (the moment right after a commit), `db.on_commit`
(the publishing of a committed change), `EventStreams.read_events` (a stream's read
of the log) and `EntityReader.loaders` (the read of an event's job or item).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import OperationalError

from app.events.entities import Kind
from app.events.outbox import EventRecord, encode_event_cursor
from tests.api.test_subscriptions import SUBMIT, cursor_now
from tests.api.test_subscriptions import acme as acme
from tests.api.ws_client import DEADLINE, JOB_EVENTS, TRANSPORT_WS, seq_of, ws_connect

QUIET = 60.0  # a hub poll interval long enough that only the publish can deliver
TRIALS = 3


async def test_a_mutation_cancelled_right_after_its_commit_still_reaches_live_subscribers(acme):
    server, member, _, token = await acme(hub_poll_seconds=QUIET)
    db = server.services.db
    await member.data(SUBMIT, title="before")  # the log is not empty: a cursor exists
    since = await cursor_now(member)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as watcher:
        op = await watcher.subscribe(JOB_EVENTS, after=since)
        await member.data(SUBMIT, title="warm-up")  # the watcher is live once it sees it
        last = seq_of((await watcher.next_event(op, "jobStageChanged"))["cursor"])
        for trial in range(TRIALS):
            committed, cancelled = asyncio.Event(), asyncio.Event()

            async def drop_here(records: Sequence[EventRecord], committed=committed,
                                cancelled=cancelled) -> None:
                if not records:  # another unit of work (a token's last use, say)
                    return
                committed.set()
                try:
                    await asyncio.Event().wait()  # until the client's going cancels us
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

            db.after_commit = drop_here
            try:
                async with ws_connect(server.ws_url, TRANSPORT_WS, token) as mutator:
                    await mutator.subscribe(SUBMIT, title=f"dropped {trial}")
                    await asyncio.wait_for(committed.wait(), DEADLINE)
                # the socket is gone; the server cancels the mutation right after commit
                await asyncio.wait_for(cancelled.wait(), DEADLINE)
            finally:
                db.after_commit = None
            event = await watcher.next_event(op, "jobStageChanged")
            assert (event["job"]["title"], event["to"]) == (f"dropped {trial}", "QUEUED")
            assert seq_of(event["cursor"]) == last + 1
            last += 1


async def test_a_change_whose_publishing_was_lost_still_reaches_live_subscribers(acme):
    server, member, _, token = await acme(hub_poll_seconds=0.2)
    db = server.services.db
    publish = db.on_commit
    await member.data(SUBMIT, title="before")  # the log is not empty: a cursor exists
    since = await cursor_now(member)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as watcher:
        op = await watcher.subscribe(JOB_EVENTS, after=since)
        await member.data(SUBMIT, title="warm-up")
        first = await watcher.next_event(op, "jobStageChanged")

        async def lost(_records: Sequence[EventRecord]) -> None:
            return None  # the process "died" between commit and publish

        db.on_commit = lost
        try:
            await member.data(SUBMIT, title="never published")
        finally:
            db.on_commit = publish
        event = await watcher.next_event(op, "jobStageChanged")
    assert event["job"]["title"] == "never published"
    assert seq_of(event["cursor"]) == seq_of(first["cursor"]) + 1


def failing(times: int, real: Any) -> Any:
    """`real`, except that its first `times` calls fail as an unreachable database."""
    calls = {"failed": 0}

    async def read(*args: Any, **kwargs: Any) -> Any:
        if calls["failed"] < times:
            calls["failed"] += 1
            raise OperationalError("SELECT …", {}, ConnectionResetError("connection cut"))
        return await real(*args, **kwargs)

    read.calls = calls  # type: ignore[attr-defined]
    return read


async def test_a_stream_rides_out_a_database_blip_with_no_gap_and_no_duplicate(acme):
    server, member, _, token = await acme(stream_retry_seconds=20)
    streams, entities = server.services.streams, server.services.entities
    for n in range(5):
        await member.data(SUBMIT, title=f"stored {n}")
    # the replay and the reads of the jobs fail a few times, then the database is back
    streams.read_events = failing(3, streams.read_events)
    entities.loaders[Kind.JOB] = failing(3, entities.loaders[Kind.JOB])
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        op = await client.subscribe(JOB_EVENTS, after=encode_event_cursor(0))
        replayed = [await client.next_event(op, "jobStageChanged", timeout=30)
                    for _ in range(5)]
        await member.data(SUBMIT, title="live")
        live = await client.next_event(op, "jobStageChanged")
    assert streams.read_events.calls["failed"] == 3
    assert entities.loaders[Kind.JOB].calls["failed"] == 3
    events = [*replayed, live]
    assert [seq_of(e["cursor"]) for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e["job"]["title"] for e in events] == [
        *(f"stored {n}" for n in range(5)), "live"]


async def test_a_blip_longer_than_the_retry_ends_the_stream_with_service_unavailable(acme):
    server, member, _, token = await acme(stream_retry_seconds=0.5)
    await member.data(SUBMIT, title="stored")
    streams = server.services.streams
    streams.read_events = failing(10**9, streams.read_events)
    async with ws_connect(server.ws_url, TRANSPORT_WS, token) as client:
        op = await client.subscribe(JOB_EVENTS, after=encode_event_cursor(0))
        errors = await client.operation_errors(op)
        assert [e["extensions"]["code"] for e in errors] == ["SERVICE_UNAVAILABLE"]
        assert (await client.receive(op))["type"] == "complete"

