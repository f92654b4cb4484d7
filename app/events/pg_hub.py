"""The cross-instance hub: PostgreSQL `LISTEN/NOTIFY` on top of the local fan-out.

Many stateless instances share one PostgreSQL database.  Every instance runs a
`PostgresHub`:

* The wake-up, `NOTIFY fleetbridge_events, '<product>:<seq>'`, is sent by the
  statement that appends the event (app.events.outbox), inside the committing
  transaction: PostgreSQL delivers it when that transaction commits and drops it when
  it rolls back.  `publish(records)` (called after a unit of work commits) only
  delivers the records to this instance's subscribers.  The payload only wakes the
  other instances; the events themselves stay in the event table.
* One dedicated asyncpg connection per instance `LISTEN`s on that channel.  On a
  notification for a product with live subscribers here, whose sequence is above
  the last one this hub delivered for it, the hub reads the newer events from the
  event table (`app.events.repository.events_after`) once, and delivers them to all
  of this instance's subscribers (`LogHub`, in sequence order).
* A notification can be lost: the listening connection may drop (and the one that
  replaces it does not hear what was sent meanwhile).  So every
  `poll_seconds` (FLEET_HUB_POLL_SECONDS) the hub compares each subscribed
  product's `last_event_seq` with what it has delivered and reads what is missing;
  and after the listening connection is re-established (with backoff) it catches
  up the same way.  A dropped notification costs latency, never an event.

Delivery here only has to *wake* subscribers: a stream (`app.events.service`)
remembers the last sequence it delivered, drops what it has already seen and fills
any gap from the log.  Sequences are per product, gap-free and in commit order, so
cursors are identical on every instance.

An instance hears its own wake-ups too, at its commit and usually a moment before it
publishes the same events locally; so a wake-up for a product this instance has
published events of in the last `LOCAL_WINDOW_SECONDS` reads the log only if, after
`WAKEUP_GRACE_SECONDS` (10 ms), its sequence is still beyond what was delivered here.
A wake-up for a product nobody commits to here (the usual case for an instance that
serves subscribers while others take the mutations) reads the log at once: the grace
would only add to every cross-instance delivery (issue 12).  Guessing wrong costs one
read of the log (what it brings was delivered already and is dropped), never an event.

Fault seam: `on_wakeup(product_id, seq)` handles each wake-up heard; tests replace
it to drop notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import asyncpg
from sqlalchemy.engine import make_url

from app.events.hub import LogHub
from app.events.outbox import EVENT_CHANNEL, EventRecord
from app.uow import Database

logger = logging.getLogger(__name__)

CHANNEL = EVENT_CHANNEL
CONNECT_TIMEOUT_SECONDS = 5.0
RECONNECT_INITIAL_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
# How long a wake-up waits before it reads the log: an instance hears its own NOTIFY
# at its commit, usually just before it publishes the same events locally, which
# then makes the read unnecessary.
WAKEUP_GRACE_SECONDS = 0.01
# Local publishes of a product this recent make its wake-ups wait for the grace.
LOCAL_WINDOW_SECONDS = 1.0


def listen_dsn(database_url: str) -> str:
    """The asyncpg DSN for a SQLAlchemy URL such as `postgresql+asyncpg://…`."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def encode_wakeup(product_id: str, seq: int) -> str:
    return f"{product_id}:{seq}"


def decode_wakeup(payload: str) -> tuple[str, int] | None:
    product_id, _, seq = payload.rpartition(":")
    if not product_id or not seq.isdigit():
        return None
    return product_id, int(seq)


class PostgresHub(LogHub):
    def __init__(
        self,
        db: Database,
        database_url: str,
        *,
        max_queue: int = 1_000,
        poll_seconds: float = 1.0,
        retry_seconds: float = 30.0,
    ) -> None:
        super().__init__(db, max_queue=max_queue, poll_seconds=poll_seconds,
                         retry_seconds=retry_seconds)
        self.dsn = listen_dsn(database_url)
        self.on_wakeup: Callable[[str, int], None] = self.wake_for
        self._connection: asyncpg.Connection | None = None
        self._connection_lost: asyncio.Event | None = None
        # Other channels heard on the same connection (see `listen`).
        self._channels: dict[str, Callable[[str], None]] = {}
        # When this instance last published each product's events (loop time).
        self._published_at: dict[str, float] = {}
        # Observable counters (logs, tests): listening connections opened, wake-ups received.
        self.connections_opened = 0
        self.notifications_received = 0

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start listening.  A first connection that fails is retried in the
        background; until then the poll keeps subscribers current."""
        first: asyncpg.Connection | None = None
        try:
            first = await self._listen_connection()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            logger.warning("event hub could not LISTEN yet; will retry", exc_info=True)
        await super().start()
        self._tasks.append(
            asyncio.create_task(self._keep_listening(first), name="event-hub-listen")
        )

    async def stop(self) -> None:
        await super().stop()
        await self._close_connection()

    @property
    def listener_pid(self) -> int | None:
        """The server process id of the listening connection (None when down)."""
        connection = self._connection
        if connection is None or connection.is_closed():
            return None
        return int(connection.get_server_pid())

    def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Also LISTEN on `channel` over the hub's connection; `callback(payload)` runs
        in the event loop for each notification.  Call before `start()`.  (Token
        revokes use it: app.auth.guard.)"""
        self._channels[channel] = callback

    # -- publishing ------------------------------------------------------------

    async def publish(self, records: Sequence[EventRecord]) -> None:
        """Deliver committed records here; the other instances were woken by the
        NOTIFY their own statement sent when it committed (app.events.outbox)."""
        if records:
            now = asyncio.get_running_loop().time()
            for record in records:
                if record.product_id in self._delivered:  # subscribed here
                    self._published_at[record.product_id] = now
        self.deliver(records)

    # -- listening -------------------------------------------------------------

    async def _listen_connection(self) -> asyncpg.Connection:
        connection = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT_SECONDS)
        try:
            await connection.add_listener(CHANNEL, self._on_notification)
            for channel, callback in self._channels.items():
                await connection.add_listener(channel, _payload_to(callback))
        except BaseException:
            await connection.close(timeout=1)
            raise
        # One event per connection: a late signal from an old one must not count.
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        self._connection, self._connection_lost = connection, lost
        self.connections_opened += 1
        return connection

    async def _keep_listening(self, first: asyncpg.Connection | None) -> None:
        """Hold the LISTEN connection; reconnect with backoff when it drops, and
        catch up on every (re)connect, since wake-ups were lost meanwhile."""
        connection = first
        delay = RECONNECT_INITIAL_SECONDS
        while True:
            if connection is None:
                try:
                    connection = await self._listen_connection()
                except (OSError, asyncpg.PostgresError, TimeoutError):
                    logger.warning("event hub reconnect failed; retrying in %.1fs", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                    continue
                logger.info("event hub listening again")
                self._request_catch_up(self.subscribed_products())
            delay = RECONNECT_INITIAL_SECONDS
            await self._until_lost(connection)
            logger.warning("event hub lost its LISTEN connection; reconnecting")
            await self._close_connection()
            connection = None

    async def _until_lost(self, connection: asyncpg.Connection) -> None:
        """Return when the listening connection is gone (probed every poll)."""
        lost = self._connection_lost
        assert lost is not None
        while not connection.is_closed():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_seconds):
                    await lost.wait()
            if lost.is_set():
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    await connection.execute("SELECT 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                return

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            try:
                await connection.close(timeout=1)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                connection.terminate()

    def _on_notification(self, _connection: object, _pid: int, _channel: str,
                         payload: str) -> None:
        wakeup = decode_wakeup(payload)
        if wakeup is None:
            logger.warning("ignoring malformed event wake-up %r", payload)
            return
        self.notifications_received += 1
        self.on_wakeup(*wakeup)

    def wake_for(self, product_id: str, seq: int) -> None:
        """Read the log of `product_id` if `seq` is beyond what was delivered here:
        at once when this instance has not published the product's events lately,
        otherwise if it still is after `WAKEUP_GRACE_SECONDS` (module docstring)."""
        if not self._behind(product_id, seq):
            return
        loop = asyncio.get_running_loop()
        published = self._published_at.get(product_id)
        if published is None or loop.time() - published > LOCAL_WINDOW_SECONDS:
            self._request_catch_up([product_id])
            return
        loop.call_later(WAKEUP_GRACE_SECONDS, self._catch_up_if_behind, product_id, seq)

    def _catch_up_if_behind(self, product_id: str, seq: int) -> None:
        if self._behind(product_id, seq):
            self._request_catch_up([product_id])

    def _behind(self, product_id: str, seq: int) -> bool:
        delivered = self._delivered.get(product_id)
        return delivered is not None and seq > delivered


def _payload_to(callback: Callable[[str], None]) -> Callable[[object, int, str, str], None]:
    def on_notification(_connection: object, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)

    return on_notification
