"""The job or item of an event, read once per event for all of its subscribers.

A delivery of `jobStageChanged { … job { … } }` to S subscribers needs the job once,
not S times (issue 12 "fan-out that scales").  `EntityReader` keeps, for each recent
event, one shared read of its entity: the first subscriber to ask starts it, every
other subscriber of that event awaits the same result, and the reads asked for in the
same turn of the event loop go to the database together, one query per product and
kind.  A subscription that did not select the entity never asks (see
app.graphql.subscriptions), so an event nobody wants the entity of costs no read.  A
subscription that did has the hub start the read as it offers the event
(`prefetch`), and is woken once the entity is there.

Reads go through the small event-read pool (never the pool that mutations use).  A
read that fails because the database is unavailable is dropped from the cache, so the
next attempt reads again; callers retry with `stream_retry()` (app.events.retry).
The entity is as it is when the event is delivered (DESIGN §5, subscriptions).
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.events.outbox import EventRecord
from app.fleet import repository as fleet_repository
from app.fleet.models import Job
from app.tracker import repository as tracker_repository
from app.tracker.models import Item
from app.uow import Database

DEFAULT_MAX_ENTRIES = 4_096


class Kind(enum.Enum):
    JOB = "job"
    ITEM = "item"


Loader = Callable[[AsyncSession, str, Sequence[int]], Awaitable[Sequence[Any]]]
_LOADERS: dict[Kind, Loader] = {
    Kind.JOB: fleet_repository.get_jobs,
    Kind.ITEM: tracker_repository.get_items,
}

# (kind, product, event sequence): one entity read per event.
_Key = tuple[Kind, str, int]


class EntityReader:
    """Shared, batched reads of events' entities (`await reader.job(record)`)."""

    def __init__(self, db: Database, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.db = db
        self.max_entries = max_entries
        # Fault seam (tests): how entities of each kind are read, many ids at once.
        self.loaders: dict[Kind, Loader] = dict(_LOADERS)
        self._cache: OrderedDict[_Key, asyncio.Future[Any]] = OrderedDict()
        # What the next read fetches: per (kind, product), per entity, its events' futures.
        self._wanted: dict[tuple[Kind, str], dict[int, dict[int, asyncio.Future[Any]]]] = {}
        self._flush: asyncio.Task[None] | None = None
        self._prefetchers = {kind: functools.partial(self.prefetch, kind) for kind in Kind}
        # Observable counters (tests, benchmark): queries made, entities asked for.
        self.queries = 0
        self.requests = 0

    async def job(self, record: EventRecord) -> Job | None:
        """The job of a job event as it is now (None if it no longer exists).
        Raises StoreUnavailableError when the database cannot be read."""
        job: Job | None = await self._get(Kind.JOB, record)
        return job

    async def item(self, record: EventRecord) -> Item | None:
        """The item of an item event as it is now (None if it no longer exists).
        Raises StoreUnavailableError when the database cannot be read."""
        item: Item | None = await self._get(Kind.ITEM, record)
        return item

    def prefetcher(self, kind: Kind) -> Callable[[EventRecord], asyncio.Future[Any]]:
        """`prefetch` for events of `kind`: the same object every time (a hub asks equal
        gates once per event for all their subscribers)."""
        return self._prefetchers[kind]

    def prefetch(self, kind: Kind, record: EventRecord) -> asyncio.Future[Any]:
        """Start (or join) the shared read of `record`'s entity now, without waiting:
        the future its result will be in.  The hub calls it as it offers an event, so
        that a subscriber wakes once the entity is there (app.events.hub, `Gate`)."""
        key = (kind, record.product_id, record.seq)
        future = self._cache.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._cache[key] = future
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            wanted = self._wanted.setdefault((kind, record.product_id), {})
            wanted.setdefault(record.entity_id, {})[record.seq] = future
            if self._flush is None:
                self._flush = asyncio.create_task(self._read_wanted(), name="event-entities")
        return future

    def peek(self, kind: Kind, record: EventRecord) -> asyncio.Future[Any] | None:
        """The shared read of `record`'s entity if one was started; None otherwise."""
        return self._cache.get((kind, record.product_id, record.seq))

    async def read(self, kind: Kind, record: EventRecord) -> Any:
        """The entity of `record` (`job()` or `item()` by kind)."""
        return await self._get(kind, record)

    async def _get(self, kind: Kind, record: EventRecord) -> Any:
        self.requests += 1
        future = self.prefetch(kind, record)
        if future.done():  # read already (the usual case: the hub asked before waking)
            return future.result()
        # Shielded: a subscriber that goes away must not cancel the others' read.
        return await asyncio.shield(future)

    async def _read_wanted(self) -> None:
        await asyncio.sleep(0)  # let every subscriber woken with this event ask first
        self._flush = None
        wanted, self._wanted = self._wanted, {}
        try:
            async with self.db.read() as session:
                for (kind, product_id), by_entity in wanted.items():
                    rows = await self.loaders[kind](session, product_id, list(by_entity))
                    self.queries += 1
                    found = {row.id: row for row in rows}
                    for entity_id, futures in by_entity.items():
                        for future in futures.values():
                            if not future.done():
                                future.set_result(found.get(entity_id))
        except BaseException as exc:
            failed: list[asyncio.Future[Any]] = []
            for (kind, product_id), by_entity in wanted.items():
                for futures in by_entity.values():
                    for seq, future in futures.items():
                        self._cache.pop((kind, product_id, seq), None)  # read again next time
                        failed.append(future)
            for future in failed:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            # Retrieved here so that a failure nobody awaits any more is not reported.
            for future in failed:
                if future.done() and not future.cancelled():
                    future.exception()
            if not isinstance(exc, Exception):
                raise
