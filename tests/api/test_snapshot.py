"""One snapshot per query (DESIGN §8, issue 11 item 5): the documented way to start a
live view — `viewer { eventCursor }` beside a list — never gives a cursor that covers
a change the list lacks, nor a list ahead of its cursor, while writers commit
concurrently.  Both stores; reduced size (FLEET_FAULT_FULL=1 for the full size)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from sqlalchemy import select

from app.auth.models import Role
from app.events.models import Event, EventType
from app.events.outbox import decode_event_cursor
from app.tracker import service as tracker_service
from app.tracker.service import NewItem
from tests.conftest import GraphQLClient, LiveServer, TokenFactory

FULL = os.environ.get("FLEET_FAULT_FULL", "").lower() in {"1", "true", "yes"}
READS = 400 if FULL else 60
WRITERS = 4
MAX_ITEMS = 190  # one page of 200 holds every item

START = "{ viewer { eventCursor } items(first: 200) { nodes { id } } }"


async def test_the_cursor_and_the_list_of_one_query_agree_under_concurrent_writers(
    live_server: Callable[..., Awaitable[LiveServer]],
    http_client: Callable[[LiveServer, str | None], GraphQLClient],
    make_token: TokenFactory,
) -> None:
    server = await live_server()
    reader = http_client(server, await make_token("acme", Role.MEMBER))
    done = asyncio.Event()
    written = 0

    async def writer(n: int) -> None:
        nonlocal written
        while not done.is_set() and written < MAX_ITEMS:
            written += 1
            async with server.services.db.unit_of_work() as session:
                await tracker_service.create_item(
                    session, "acme", NewItem(title=f"w{n}-{written}", labels=())
                )
            await asyncio.sleep(0)

    async def read_all() -> list[tuple[int, set[int]]]:
        seen = []
        try:
            for _ in range(READS):
                data = await reader.data(START)
                cursor = data["viewer"]["eventCursor"]
                seq = decode_event_cursor(cursor) if cursor else 0
                seen.append((seq, {int(node["id"]) for node in data["items"]["nodes"]}))
        finally:
            done.set()
        return seen

    reads, *_ = await asyncio.gather(read_all(), *(writer(n) for n in range(WRITERS)))
    async with server.services.db.read() as session:
        created = (await session.execute(
            select(Event.seq, Event.entity_id).where(
                Event.product_id == "acme", Event.type == EventType.ITEM_CREATED)
        )).all()
    mismatched = [
        (seq, ids) for seq, ids in reads
        if ids != {item for event_seq, item in created if event_seq <= seq}
    ]
    changing = len({seq for seq, _ in reads})
    print(f"\nsnapshot: {len(reads)} reads over {changing} cursors, {len(created)} items "
          f"written by {WRITERS} writers, {len(mismatched)} inconsistent")
    assert changing > 5, "the writers never overlapped the reads"
    assert mismatched == []
