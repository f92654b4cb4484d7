"""Event streams: replay from the log, then live, with no gap and no duplicate.

A product's events carry a gap-free sequence in commit order (app.events.outbox).
A stream remembers the last sequence it delivered and relies on that:

1. subscribe to the hub first, so nothing published from now on is missed;
2. replay stored events after the cursor (or start at the log's head);
3. deliver live events, dropping any at or below the last sequence delivered
   (already replayed), and filling from the log whenever the next one is not
   `last + 1` (another instance's event, or one published out of order);
4. after a queue overflow, catch up from the log the same way.

Every read of the log is retried from the stream's last sequence while the database
is unavailable, for at most `retry_seconds` (app.events.retry), before the stream
ends with `SERVICE_UNAVAILABLE`.  Reads use the small event-read pool given as `db`,
never the pool that mutations use; a live stream holds no connection between reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any

from app.errors import BadUserInputError
from app.events import repository
from app.events.hub import LocalHub
from app.events.models import EventType
from app.events.outbox import EventRecord, decode_event_cursor
from app.events.retry import with_retry
from app.events.subscriber import FastPath, Gate
from app.uow import Database

DEFAULT_RETRY_SECONDS = 30.0

REPLAY_BATCH = 500


@dataclass(frozen=True, slots=True)
class EventFilter:
    types: frozenset[EventType]
    entity_id: int | None = None

    def matches(self, record: EventRecord) -> bool:
        return record.type in self.types and (
            self.entity_id is None or record.entity_id == self.entity_id
        )


@dataclass(frozen=True, slots=True)
class FilteredGate:
    """A stream's gate at the hub: `gate` for the events its filter lets through.  Equal
    for streams with the same gate and filter, so the hub asks it once per event for
    all of them (`gate` must then be one object: EntityReader.prefetcher)."""

    gate: Gate
    event_filter: EventFilter

    def __call__(self, record: EventRecord) -> asyncio.Future[Any] | None:
        return self.gate(record) if self.event_filter.matches(record) else None


JOB_STAGE_EVENTS = frozenset({EventType.JOB_CREATED, EventType.JOB_STAGE_CHANGED})
ITEM_STATUS_EVENTS = frozenset({EventType.ITEM_CREATED, EventType.ITEM_STATUS_CHANGED})


class EventStreams:
    def __init__(self, db: Database, hub: LocalHub, *,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        self.db = db
        self.hub = hub
        self.retry_seconds = retry_seconds
        # Fault seam (tests): the read of stored events a stream makes.
        self.read_events = repository.events_after

    async def start_position(
        self, product_id: str, after: str | None, *, delivered: int | None = None
    ) -> int:
        """The sequence a stream starts after; validates the cursor.  Raises
        BadUserInputError for a bad cursor, StoreUnavailableError after retrying.

        `delivered` is what the hub has delivered of the product while the stream is
        registered with it: everything after it reaches the stream live, so "from now"
        starts there, and a cursor at exactly that point needs no read at all (the
        usual case: `viewer.eventCursor`, then subscribe)."""
        if delivered is not None:
            if after is None:
                return delivered
            with contextlib.suppress(BadUserInputError):  # a bad cursor is refused below
                if decode_event_cursor(after) == delivered:
                    return delivered

        async def bounds() -> tuple[int, int | None]:
            async with self.db.read() as session:
                return await repository.log_bounds(session, product_id)

        last, oldest = await with_retry(bounds, self.retry_seconds)
        if after is None:
            return last
        seq = decode_event_cursor(after)
        if seq > last:
            raise BadUserInputError("after", "this cursor does not belong to this event log")
        pruned = (oldest is None and seq < last) or (oldest is not None and seq + 1 < oldest)
        if pruned:
            raise BadUserInputError(
                "after", "this cursor is older than the event retention period; "
                "subscribe without 'after' and re-read current state"
            )
        return seq

    async def stream(
        self, product_id: str, event_filter: EventFilter, after: str | None = None,
        on_ready: Callable[[], None] | None = None, gate: Gate | None = None,
        fast: FastPath | None = None,
    ) -> AsyncGenerator[EventRecord, None]:
        """The product's events after `after` (or from now) that match the filter.

        `on_ready` is called once the stream is registered with the hub and has
        fixed its starting point: from then on no committed event can be missed.
        `gate` (app.events.hub) holds the stream's wake-up for a live event that
        matches the filter until what it returns is done (one object for all streams
        that use it, such as `EntityReader.prefetcher(kind)`).
        `fast` (app.events.hub.FastPath) delivers the live events that match the
        filter while the stream is caught up, without waking it (the broadcast,
        app.graphql.broadcast); the stream resumes after the last one it delivered.
        """
        hub_gate = FilteredGate(gate, event_filter) if gate is not None else None
        async with self.hub.subscribe(product_id, hub_gate) as subscriber:
            delivered = self.hub.delivered(product_id)
            start = await self.start_position(product_id, after, delivered=delivered)
            if on_ready is not None:
                on_ready()
            replay = delivered is None or start < delivered
            # Inline rather than a generator of its own: this loop runs once per
            # subscriber and event, and each layer of async generators costs.
            matches = event_filter.matches
            subscriber.fast, subscriber.matches = fast, matches
            last = start
            read_to_head = replay  # the replay first; later, after the queue overflowed
            while True:
                if read_to_head:
                    async for record in self._read_log(product_id, last, None):
                        last = record.seq
                        if matches(record):
                            yield record
                subscriber.last = last  # parked: the fast path continues from here
                batch = await subscriber.next_batch()
                last = subscriber.last if subscriber.last is not None else last
                read_to_head = subscriber.overflowed
                if read_to_head:
                    subscriber.recover()
                    continue
                for live in batch:
                    if live.seq <= last:  # already replayed or delivered
                        continue
                    if live.seq > last + 1:  # a gap: the missing events are in the log
                        async for record in self._read_log(product_id, last, live.seq - 1):
                            last = record.seq
                            if matches(record):
                                yield record
                    last = live.seq
                    if matches(live):
                        yield live

    async def _read_log(
        self, product_id: str, after_seq: int, through_seq: int | None
    ) -> AsyncIterator[EventRecord]:
        while True:
            records = await with_retry(
                functools.partial(self._read_batch, product_id, after_seq, through_seq),
                self.retry_seconds,
            )
            for record in records:
                yield record
            if len(records) < REPLAY_BATCH:
                return
            after_seq = records[-1].seq


    async def _read_batch(
        self, product_id: str, after_seq: int, through_seq: int | None
    ) -> list[EventRecord]:
        async with self.db.read() as session:
            rows = await self.read_events(
                session, product_id, after_seq, limit=REPLAY_BATCH, through_seq=through_seq
            )
            return [EventRecord.from_model(row) for row in rows]


def filter_for(types: Collection[EventType], entity_id: int | None) -> EventFilter:
    return EventFilter(types=frozenset(types), entity_id=entity_id)
