"""Fan-out of committed events to live subscribers.

The hub is the only thing that publishes.  `LocalHub` delivers within one process;
the PostgreSQL hub (app.events.pg_hub) adds LISTEN/NOTIFY between instances and
delivers through the same local fan-out.

Each subscriber has a bounded queue.  A subscriber that falls behind is never
allowed to block the publisher or grow memory: when its queue is full the queue is
dropped and the subscriber is flagged `overflowed`; its stream then catches up by
reading the durable event log from the last event it delivered (see
`app.events.service`).  Nothing is lost, and nobody else waits.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from app.events.outbox import EventRecord


class Subscriber:
    def __init__(self, product_id: str, max_queue: int) -> None:
        self.product_id = product_id
        self._queue: asyncio.Queue[EventRecord] = asyncio.Queue(maxsize=max_queue)
        self._wakeup = asyncio.Event()
        self.overflowed = False

    def offer(self, record: EventRecord) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.overflowed = True
            self._drain()
        self._wakeup.set()

    async def next_batch(self) -> list[EventRecord]:
        """Wait for news; return what is queued (empty when the queue overflowed)."""
        while self._queue.empty() and not self.overflowed:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch: list[EventRecord] = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    def recover(self) -> None:
        """Called by the stream after it caught up from the log."""
        self.overflowed = False

    def _drain(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()


class LocalHub:
    """In-process fan-out, per product."""

    def __init__(self, max_queue: int = 1_000) -> None:
        self.max_queue = max_queue
        self._subscribers: dict[str, set[Subscriber]] = defaultdict(set)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def publish(self, records: Sequence[EventRecord]) -> None:
        self.deliver(records)

    def deliver(self, records: Sequence[EventRecord]) -> None:
        for record in records:
            for subscriber in tuple(self._subscribers.get(record.product_id, ())):
                subscriber.offer(record)

    @asynccontextmanager
    async def subscribe(self, product_id: str) -> AsyncIterator[Subscriber]:
        subscriber = Subscriber(product_id, self.max_queue)
        self._subscribers[product_id].add(subscriber)
        try:
            yield subscriber
        finally:
            subscribers = self._subscribers.get(product_id)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._subscribers[product_id]

    def subscriber_count(self, product_id: str) -> int:
        return len(self._subscribers.get(product_id, ()))

    def subscribed_products(self) -> list[str]:
        """The products that have at least one live subscriber here."""
        return [product for product, subscribers in self._subscribers.items() if subscribers]
