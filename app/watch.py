"""`fleetbridge watch`: live events, one line each, through `FleetClient.events`.

    <cursor> job 12 ASSIGNED -> BUILDING
    <cursor> item 7 TODO -> IN_PROGRESS

(the creation of a job or item shows as `(new) -> QUEUED`), or with `--json` one JSON
object per line.  The subscription runs over `graphql-transport-ws` (gql's websockets
transport); a connection lost after it was acknowledged is opened again with capped,
jittered backoff (one warning line each) and each stream resumes after the last cursor
it printed, with no gap and no duplicate.  Events before the first one printed are only
replayed when `--after` was given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.client import FleetClient, FleetEvent, Stream


@dataclass(frozen=True, slots=True)
class WatchOptions:
    streams: Sequence[Stream]
    after: str | None = None
    limit: int | None = None
    reconnect: bool = True


def choose_streams(job: str | None, item: str | None, only: str | None) -> list[Stream]:
    """The streams the CLI's options name: `--job`/`--item` narrow to one id each;
    otherwise both kinds, or the one `--only` names."""
    named = [Stream(kind, entity) for kind, entity in (("job", job), ("item", item))
             if entity is not None]
    return named or [Stream(kind) for kind in ("job", "item") if only in (None, kind)]


async def watch(
    client: FleetClient, options: WatchOptions, on_event: Callable[[FleetEvent], None]
) -> int:
    """Deliver events to `on_event` until the limit or the end of every stream; returns
    how many were delivered.  Raises FleetApiError (a refused token or subscription) and
    the transport's error when the first connection fails."""
    seen = 0
    events = client.events(options.streams, after=options.after, reconnect=options.reconnect)
    try:
        async for event in events:
            on_event(event)
            seen += 1
            if options.limit is not None and seen >= options.limit:
                break
    finally:
        await events.aclose()
    return seen
