"""A stream's place at the event hub (app.events.hub): its queue of live events, its
wake-up, its gate, and its fast path (the broadcast, app.graphql.broadcast)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from app.events.outbox import EventRecord

# A gate holds a subscriber's wake-up for an event until something it will need for
# it is ready (the event's entity being read, app.events.entities): (record) → a
# future to wait for, or None.
Gate = Callable[[EventRecord], "asyncio.Future[Any] | None"]

# What a subscriber's fast path did with an event (`FastPath`):
DONE = 0  # delivered it (or it needs nothing from the stream)
SLOW = 1  # cannot: wake the stream, which delivers it the usual way
WAIT = 2  # not yet (another subscriber is making the shared result): ask again next turn
HELD = 3  # not yet (its entity is being read): the gate wakes the subscriber again

# A stream's fast path (app.graphql.broadcast): (record, final) → DONE, SLOW, WAIT or
# HELD, delivering `record` without waking the stream; `final` forbids WAIT.
FastPath = Callable[[EventRecord, bool], int]


class Subscriber:
    """One stream's place at the hub: its queue of live events and its wake-up.

    A stream may also give a fast path (`fast`, with its filter `matches`): while the
    stream is parked in `next_batch` (caught up: everything before its queue is
    delivered, `last` being the last sequence it passed), `deliver_fast` hands the
    queued events to the fast path in order instead of waking the stream, and wakes
    it only for what the fast path cannot deliver."""

    __slots__ = ("_queue", "_waiter", "fast", "gate", "last", "matches", "max_queue",
                 "overflowed", "product_id")

    def __init__(self, product_id: str, max_queue: int, gate: Gate | None = None) -> None:
        self.product_id = product_id
        self.max_queue = max_queue
        self.gate = gate
        self._queue: deque[EventRecord] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        self.fast: FastPath | None = None
        self.matches: Callable[[EventRecord], bool] | None = None
        self.last: int | None = None  # set by the stream before it parks

    def offer(self, record: EventRecord) -> bool:
        """Queue `record`; True when the subscriber should be woken for it.  A full
        queue is dropped and the subscriber flagged `overflowed` (it reads the log)."""
        if self.overflowed:
            return False
        if len(self._queue) >= self.max_queue:
            self.overflowed = True
            self._queue.clear()
        else:
            self._queue.append(record)
        return True

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def queued(self) -> int:
        return len(self._queue)

    def deliver_fast(self, final: bool) -> int:
        """Deliver the queued events through the fast path, in order, while the stream
        is parked: DONE when nothing is left for the stream (or it is busy and takes
        its queue itself), otherwise the fast path's answer for the first event it
        could not deliver (SLOW: wake the stream; WAIT; HELD), the rest left queued."""
        fast, last = self.fast, self.last
        if fast is None or self.overflowed or last is None:
            return SLOW
        waiter = self._waiter
        if waiter is None or waiter.done():
            return DONE
        queue, matches = self._queue, self.matches
        while queue:
            record = queue[0]
            seq = record.seq
            if seq > last:
                if seq != last + 1:
                    return SLOW  # a gap: the stream reads it from the log
                if matches is None or matches(record):
                    outcome = fast(record, final)
                    if outcome != DONE:
                        return outcome
                self.last = last = seq
            queue.popleft()
        return DONE

    async def next_batch(self) -> list[EventRecord]:
        """Wait for news; return what is queued (empty when the queue overflowed)."""
        while not self._queue and not self.overflowed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch = list(self._queue)
        self._queue.clear()
        return batch

    def recover(self) -> None:
        """Called by the stream after it caught up from the log."""
        self.overflowed = False


__all__ = ["DONE", "HELD", "SLOW", "WAIT", "FastPath", "Gate", "Subscriber"]
