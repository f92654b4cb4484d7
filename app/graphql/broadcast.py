"""The broadcast: live events written to caught-up subscribers without waking them
(issue 12 "fan-out that scales"; DESIGN §5).

Without it every subscriber of an event costs a task wake-up, a pass through its
event stream's generators, strawberry's handler and Starlette's and uvicorn's send:
most of the CPU of a delivery, even with the result executed and encoded once
(app.graphql.delivery).  With it, the hub (app.events.hub, `Subscriber.deliver_fast`)
hands a parked subscriber's queued events to its `Broadcast`, which writes the
event's shared frame, spliced with the operation's id, straight to the connection
(app.graphql.frames.Wire), for a bounded share of each turn of the event loop.

Semantics are those of the stream it stands in for:

* order and exactly-once: the hub gives it the subscriber's queued events in order,
  only while the stream is parked (everything before is delivered), and the stream
  resumes after the last one it wrote; a gap is left to the stream (the log);
* filters: events its filter refuses are passed over without a wake-up;
* a slow subscriber: when the connection's write buffer is above its high-water mark
  (or a close is under way, or the operation is completed or cancelled) nothing is
  written and the stream is woken instead — it waits on the buffer as before, its
  queue fills and overflows, and it catches up from the log; nobody else waits;
* only a shared, error-free result is written (`SharedResults`): for the first
  subscriber of an event and share key that finds none, its stream is woken and
  executes it (`SharedResults.lead`), the others ask again on the next turn and then
  write it; a result with errors, an execution still running on the next turn, an
  entity read that failed: the stream is woken and does what it always did;
* the entity (`job`, `item`): an event whose entity is being read is left queued;
  the hub hands it over again once the read is done (its gate).

A connection not served by app.graphql.frames.FleetWebSocketProtocol (another
server, an in-process client) has no wire and no broadcast: its stream is woken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.events.entities import EntityReader, Kind
from app.events.outbox import EventRecord
from app.events.subscriber import DONE, HELD, SLOW, WAIT
from app.graphql.delivery import DirectSender
from app.graphql.sharing import SharedData, SharedResults, Standing


class Broadcast:
    """One subscription's fast path at the hub (app.events.hub.FastPath).

    `kind` is the entity kind its selection reads (None when it selects none);
    `build(record, entity)` makes the event's payload, shared through `payloads`."""

    __slots__ = ("build", "entities", "kind", "payloads", "sender")

    def __init__(self, sender: DirectSender, entities: EntityReader, payloads: SharedResults,
                 kind: Kind | None, build: Callable[[EventRecord, Any], Any]) -> None:
        self.sender = sender
        self.entities = entities
        self.payloads = payloads
        self.kind = kind
        self.build = build

    def __call__(self, record: EventRecord, final: bool) -> int:
        sender = self.sender
        shared, key, wire = sender.shared, sender.share_key, sender.wire
        if shared is None or key is None or wire is None or not sender.open():
            return SLOW
        latest = shared.latest.get(key)
        if latest is not None and latest[0] is record:  # another subscriber's, this turn
            data: SharedData | None = latest[1]
            standing = Standing.READY
        else:
            row = None
            if self.kind is not None:
                read = self.entities.peek(self.kind, record)
                if read is None:
                    return SLOW
                if not read.done():
                    return HELD
                if read.cancelled() or read.exception() is not None:
                    return SLOW
                row = read.result()
            build = self.build
            payload = self.payloads.payload((build, record.product_id, record.seq), build,
                                            record, row)
            standing, data = shared.standing(key, payload)
            if data is not None:
                shared.remember(key, record, data)
        if data is not None:
            frame = sender.frame_bytes(data)
            if frame is None:
                return SLOW
            wire.write_text(frame)
            shared.broadcasts += 1
            return DONE
        if final:
            return SLOW
        if standing is Standing.RUNNING:
            return WAIT
        if standing is Standing.ABSENT and not shared.lead(key, payload):
            return WAIT
        return SLOW  # this one executes (it leads), or nobody shares this result


def broadcast(sender: DirectSender | None, entities: EntityReader, payloads: SharedResults,
              kind: Kind | None, build: Callable[[EventRecord, Any], Any]) -> Broadcast | None:
    """The fast path of a subscription sent by `sender`; None without a wire."""
    if sender is None or sender.wire is None:
        return None
    return Broadcast(sender, entities, payloads, kind, build)
