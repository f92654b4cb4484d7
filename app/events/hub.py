"""Fan-out of committed events to live subscribers (DESIGN §5).

The hub is the only thing that publishes.  `LocalHub` is the in-process fan-out;
`LogHub` feeds it in sequence order with the durable event log as the source of
truth (the hub every store uses); the PostgreSQL hub (app.events.pg_hub) adds
LISTEN/NOTIFY between instances on top of `LogHub`.

Each subscriber has a bounded queue.  A subscriber that falls behind is never
allowed to block the publisher or grow memory: when its queue is full the queue is
dropped and the subscriber is flagged `overflowed`; its stream then catches up by
reading the durable event log from the last event it delivered (see
`app.events.service`).  Nothing is lost, and nobody else waits.

`LogHub` delivers each subscribed product's events exactly in sequence order, so a
stream never sees a gap it would have to fill from the log itself: an event that
arrives ahead of a missing one (another commit not published yet, a publish lost
to a crash, an event committed by another instance) is held back, and the hub reads
the missing ones from the log once for every subscriber of this process.  Every
`poll_seconds` it also compares each subscribed product's newest sequence with what
it has delivered, so an event whose publishing never happened still arrives
(issue 11 "no lost live event").  A hub read costs one query per product and batch,
whatever the number of subscribers (issue 12 "fan-out that scales").

Offering an event to S subscribers does not wake S tasks: a caught-up subscriber
whose stream gave a fast path (app.events.subscriber, the broadcast of
app.graphql.broadcast) has the event written to its connection by the hub, in a
bounded share of each turn of the event loop (`TURN_BUDGET_SECONDS`), and its stream
sleeps on; only what the fast path cannot deliver wakes a stream (`WAKE_CHUNK` per
turn), so a request's next step waits behind at most one turn's share.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sqlalchemy import select

from app.auth.models import Product
from app.events import repository
from app.events.outbox import EventRecord
from app.events.retry import with_retry
from app.events.subscriber import (
    SLOW,
    WAIT,
    Gate,
    Subscriber,
)
from app.tasks import cancel_and_wait
from app.uow import Database

logger = logging.getLogger(__name__)

CATCH_UP_BATCH = 500


# Subscribers woken per turn of the event loop: a request's next step waits for at
# most this many deliveries, not for the whole fan-out of an event.
WAKE_CHUNK = 32
# And at most about this long (seconds) of broadcast writes per turn (`FastPath`).
TURN_BUDGET_SECONDS = 0.001
_BUDGET_CHECK_EVERY = 16

class LocalHub:
    """In-process fan-out, per product.

    Offering an event queues it for every subscriber of its product at once (so each
    sees events in the order they were offered), but wakes them `WAKE_CHUNK` per turn
    of the event loop, and a subscriber whose gate holds (its event's entity is being
    read) only once that is done, so that it does not wake twice for one event.
    Subscribers are kept by product and gate: equal gates are asked once per event."""

    def __init__(self, max_queue: int = 1_000) -> None:
        self.max_queue = max_queue
        self._subscribers: dict[str, dict[Gate | None, set[Subscriber]]] = {}
        self._to_wake: deque[Subscriber] = deque()
        self._retry: list[Subscriber] = []
        self._waking = False
        # Observable counters (tests, benchmark): subscribers handed to their fast path
        # (broadcast) and stream wake-ups.
        self.fast_passes = 0
        self.wakeups = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def publish(self, records: Sequence[EventRecord]) -> None:
        self.deliver(records)

    def deliver(self, records: Sequence[EventRecord]) -> None:
        for record in records:
            self._offer(record)

    def _offer(self, record: EventRecord) -> None:
        groups = self._subscribers.get(record.product_id)
        if not groups:
            return
        wake = self._to_wake
        for gate, members in groups.items():
            ready = gate(record) if gate is not None else None
            if ready is None or ready.done():
                for subscriber in members:
                    if subscriber.offer(record):
                        wake.append(subscriber)
                continue
            held: list[Subscriber] = []
            for subscriber in members:
                if subscriber.offer(record):
                    # one that overflowed reads the log: it needs no entity to wake
                    (wake if subscriber.overflowed else held).append(subscriber)
            if held:
                ready.add_done_callback(functools.partial(self._wake_later, held))
        self._wake_soon()

    def _wake_later(self, subscribers: list[Subscriber], _: object) -> None:
        self._to_wake.extend(subscribers)
        self._wake_soon()

    def _wake_soon(self) -> None:
        if self._to_wake and not self._waking:
            self._waking = True
            asyncio.get_running_loop().call_soon(self._wake_some)

    def _wake_some(self) -> None:
        """One turn's share of the fan-out: subscribers with a fast path get their
        events from it (for about TURN_BUDGET_SECONDS), the others — and those the
        fast path cannot serve — are woken, at most WAKE_CHUNK of them; the rest wait
        for the next turn, so a request's next step never waits for a whole event."""
        loop = asyncio.get_running_loop()
        retry, self._retry = self._retry, []
        for subscriber in retry:  # answered WAIT last turn: this time it is final
            if subscriber.deliver_fast(True) == SLOW:
                subscriber.wake()
                self.wakeups += 1
        wake, woken, passes, spent = self._to_wake, 0, 0, False
        deadline = loop.time() + TURN_BUDGET_SECONDS
        while wake and woken < WAKE_CHUNK and not spent:
            subscriber = wake.popleft()
            outcome = SLOW
            if subscriber.fast is not None:
                passes += 1
                outcome = subscriber.deliver_fast(False)
                spent = passes % _BUDGET_CHECK_EVERY == 0 and loop.time() >= deadline
            if outcome == SLOW:
                subscriber.wake()
                woken += 1
            elif outcome == WAIT:
                self._retry.append(subscriber)
        self.fast_passes += passes
        self.wakeups += woken
        if wake or self._retry:
            loop.call_soon(self._wake_some)
        else:
            self._waking = False

    @asynccontextmanager
    async def subscribe(self, product_id: str, gate: Gate | None = None
                        ) -> AsyncIterator[Subscriber]:
        """Register a subscriber of `product_id` for the block (`gate`: see `Gate`;
        subscribers with equal gates share one call of it per event)."""
        subscriber = Subscriber(product_id, self.max_queue, gate)
        self._subscribers.setdefault(product_id, {}).setdefault(gate, set()).add(subscriber)
        try:
            yield subscriber
        finally:
            groups = self._subscribers.get(product_id, {})
            members = groups.get(gate)
            if members is not None:
                members.discard(subscriber)
                if not members:
                    del groups[gate]
                    if not groups:
                        del self._subscribers[product_id]

    def subscriber_count(self, product_id: str) -> int:
        return sum(len(members) for members in self._subscribers.get(product_id, {}).values())

    def delivered(self, product_id: str) -> int | None:
        """The sequence through which this hub delivers `product_id`'s events in order
        to its subscribers (everything after it will reach them); None if unknown."""
        return None

    def subscribed_products(self) -> list[str]:
        """The products that have at least one live subscriber here."""
        return list(self._subscribers)


class LogHub(LocalHub):
    """The local fan-out fed in sequence order and kept current from the event log.

    `db` should be the small database handle for event reads (not the pool that
    mutations use); `poll_seconds` is FLEET_HUB_POLL_SECONDS.
    """

    def __init__(self, db: Database, *, max_queue: int = 1_000, poll_seconds: float = 1.0,
                 retry_seconds: float = 30.0) -> None:
        super().__init__(max_queue=max_queue)
        self.db = db
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds  # how long a subscribe rides out a blip
        # The highest sequence delivered here in order, per product with live subscribers.
        self._delivered: dict[str, int] = {}
        # Events that arrived ahead of a missing one, per product, by sequence.
        self._held: dict[str, dict[int, EventRecord]] = {}
        self._pending: set[str] = set()
        self._opening: dict[str, asyncio.Future[int]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Observable counters (logs, tests): poll passes that found missing events, and
        # reads of the log made by the hub (one per product and batch, not per subscriber).
        self.polls_that_found_news = 0
        self.log_reads = 0

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._catch_up_forever(), name="event-hub-catch-up"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    # -- delivering in order ---------------------------------------------------

    def deliver(self, records: Sequence[EventRecord]) -> None:
        """Offer `records` to this process's subscribers, each product's in sequence
        order: what is already delivered is dropped, what comes ahead of a missing
        event waits for it (and asks for a read of the log)."""
        for record in sorted(records, key=lambda r: (r.product_id, r.seq)):
            product_id = record.product_id
            delivered = self._delivered.get(product_id)
            if delivered is None or record.seq <= delivered:
                continue
            if record.seq > delivered + 1:
                held = self._held.setdefault(product_id, {})
                if len(held) < self.max_queue:  # past that, the log read brings them
                    held[record.seq] = record
                self._request_catch_up([product_id])
                continue
            self._offer(record)
            delivered = record.seq
            held = self._held.get(product_id, {})
            while (following := held.pop(delivered + 1, None)) is not None:
                self._offer(following)
                delivered = following.seq
            self._delivered[product_id] = delivered
            for seq in [seq for seq in held if seq <= delivered]:
                del held[seq]
            if not held:
                self._held.pop(product_id, None)

    # -- subscribing -----------------------------------------------------------

    def delivered(self, product_id: str) -> int | None:
        return self._delivered.get(product_id)

    @asynccontextmanager
    async def subscribe(self, product_id: str, gate: Gate | None = None
                        ) -> AsyncIterator[Subscriber]:
        if product_id not in self._delivered:
            # The first subscribers of a product share one read of the log's head.
            opening = self._opening.get(product_id)
            if opening is None:
                opening = asyncio.ensure_future(
                    with_retry(functools.partial(self._log_head, product_id), self.retry_seconds)
                )
                self._opening[product_id] = opening
                opening.add_done_callback(lambda _: self._opening.pop(product_id, None))
            head = await asyncio.shield(opening)
            if product_id not in self._delivered:
                self._delivered[product_id] = head
                # What was published while the head was read went to nobody: read again.
                self._request_catch_up([product_id])
        try:
            async with super().subscribe(product_id, gate) as subscriber:
                yield subscriber
        finally:
            if self.subscriber_count(product_id) == 0:
                self._delivered.pop(product_id, None)
                self._held.pop(product_id, None)
                self._pending.discard(product_id)

    async def _log_head(self, product_id: str) -> int:
        async with self.db.read() as session:
            last, _ = await repository.log_bounds(session, product_id)
        return last

    # -- catching up from the log ----------------------------------------------

    def _request_catch_up(self, products: Sequence[str]) -> None:
        self._pending.update(product for product in products if product in self._delivered)
        if self._pending:
            self._wake.set()

    async def _catch_up_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.poll_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_poll - loop.time())):
                    await self._wake.wait()
            try:
                if loop.time() >= next_poll:
                    next_poll = loop.time() + self.poll_seconds
                    await self._poll()
                self._wake.clear()
                pending, self._pending = self._pending, set()
                for product_id in sorted(pending):
                    await self._catch_up(product_id)
            except Exception:
                logger.warning("event hub catch-up failed; retrying at the next poll",
                               exc_info=True)

    async def _poll(self) -> None:
        """Find subscribed products whose log has moved past what was delivered."""
        products = self.subscribed_products()
        if not products:
            return
        async with self.db.read() as session:
            heads = (
                await session.execute(
                    select(Product.id, Product.last_event_seq).where(Product.id.in_(products))
                )
            ).all()
        behind = [product for product, last in heads
                  if last is not None and last > self._delivered.get(product, last)]
        if behind:
            self.polls_that_found_news += 1
            self._request_catch_up(behind)

    async def _catch_up(self, product_id: str) -> None:
        while (after := self._delivered.get(product_id)) is not None:
            async with self.db.read() as session:
                rows = await repository.events_after(
                    session, product_id, after, limit=CATCH_UP_BATCH
                )
                records = [EventRecord.from_model(row) for row in rows]
            self.log_reads += 1
            self.deliver(records)
            if len(records) < CATCH_UP_BATCH:
                return
