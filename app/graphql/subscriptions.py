"""Subscriptions over the durable event log (DESIGN §5; see app.events.service).

Without an id a subscription receives every change of the caller's product; the
creation of a job or item counts as its first change (`from` is null).  The `job`
and `item` fields hold the entity as it is when the event is delivered: read once
per event for every subscriber that selected it (app.events.entities), and not at
all when the subscription did not select it.  An event's payload is built once for
all its subscribers, and its result executed and encoded once per distinct
subscription (app.graphql.delivery).  While the database is unavailable a
stream retries its reads for FLEET_STREAM_RETRY_SECONDS before it ends with
`SERVICE_UNAVAILABLE` (app.events.retry).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import aclosing
from typing import Annotated, Any, TypeVar

import strawberry
from strawberry.types import Info
from strawberry.types.nodes import SelectedField, Selection

from app.auth.service import Permission
from app.errors import BadUserInputError
from app.events.entities import Kind
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.events.retry import with_retry
from app.events.service import ITEM_STATUS_EVENTS, JOB_STAGE_EVENTS, filter_for
from app.graphql.broadcast import broadcast
from app.graphql.context import Context
from app.graphql.delivery import direct_sender
from app.graphql.event_types import ItemStatusEvent, JobStageEvent
from app.graphql.ids import parse_id

Payload = TypeVar("Payload")


def _entity_filter(field: str, value: strawberry.ID | None) -> int | None:
    if value is None:
        return None
    ident = parse_id(value)
    if ident is None:
        raise BadUserInputError(field, "not a valid id")
    return ident


def selects(selections: Iterable[Selection], name: str) -> bool:
    """Whether `name` is selected directly or through a fragment of `selections`."""
    for selection in selections:
        if isinstance(selection, SelectedField):
            if selection.name == name:
                return True
        elif selects(selection.selections, name):  # a fragment spread or inline fragment
            return True
    return False


async def _events(
    info: Info[Context, None],
    types: frozenset[EventType],
    id_field: str,
    entity_id: strawberry.ID | None,
    after: str | None,
    entity_field: str,
    kind: Kind,
    build: Callable[[EventRecord, Any], Payload],
) -> AsyncGenerator[Payload, None]:
    """The caller's product's events of `types` (of one entity, if given) as payloads,
    `build(record, entity)`, the entity as it is now when `entity_field` is selected
    (None otherwise): the hub starts its read as it offers the event, and wakes the
    stream once it is there.  An event whose result for this subscription is shared
    and encoded already goes straight to the websocket from here (in order, like the
    rest), the others on to graphql-core (app.graphql.delivery).  Once it is caught
    up, the hub writes its shared frames without waking it (app.graphql.broadcast)."""
    principal = info.context.require(Permission.READ)
    event_filter = filter_for(types, _entity_filter(id_field, entity_id))
    services = info.context.services
    wants_entity = any(selects(field.selections, entity_field) for field in info.selected_fields)
    quota = services.quotas.subscription(info.context.token_key,
                                         services.settings.max_subscriptions_per_token)
    entities, payloads, direct = services.entities, services.deliveries, direct_sender()
    gate = entities.prefetcher(kind) if wants_entity else None
    fast = broadcast(direct, entities, payloads, kind if wants_entity else None, build)
    stream = services.streams.stream(principal.product_id, event_filter, after, gate=gate,
                                     fast=fast)
    with quota:  # per-token live subscriptions (DESIGN §8)
        async with aclosing(stream):  # leave the hub as soon as the client goes
            async for record in stream:
                row = None
                if wants_entity:
                    read = entities.peek(kind, record)
                    if (read is not None and read.done() and not read.cancelled()
                            and read.exception() is None):
                        row = read.result()  # the usual case: read before this stream woke
                    else:
                        row = await with_retry(functools.partial(entities.read, kind, record),
                                               services.streams.retry_seconds)
                payload = payloads.payload((build, record.product_id, record.seq), build,
                                           record, row)
                if direct is not None and (frame := direct.frame(payload)) is not None:
                    await direct.send(frame)
                    continue
                yield payload


EventAfter = Annotated[
    str | None,
    strawberry.argument(
        description="Replay the stored events after this cursor (an event's `cursor` or "
        "`viewer.eventCursor`) before going live, with no gap and no duplicate."
    ),
]


@strawberry.type(
    description="Live changes of the caller's product, served over the websocket "
    "(graphql-transport-ws or graphql-ws) at /graphql, never over plain HTTP."
)
class Subscription:
    @strawberry.subscription(description="Every stage change of jobs (creation included).")
    def job_stage_changed(
        self, info: Info[Context, None],
        job_id: Annotated[
            strawberry.ID | None,
            strawberry.argument(description="Only this job's changes; null for every job."),
        ] = None,
        after: EventAfter = None,
    ) -> AsyncGenerator[JobStageEvent, None]:
        return _events(info, JOB_STAGE_EVENTS, "jobId", job_id, after, "job", Kind.JOB,
                       JobStageEvent.from_record)

    @strawberry.subscription(description="Every status change of tracker items (creation "
                             "included).")
    def item_status_changed(
        self, info: Info[Context, None],
        item_id: Annotated[
            strawberry.ID | None,
            strawberry.argument(description="Only this item's changes; null for every item."),
        ] = None,
        after: EventAfter = None,
    ) -> AsyncGenerator[ItemStatusEvent, None]:
        return _events(info, ITEM_STATUS_EVENTS, "itemId", item_id, after, "item", Kind.ITEM,
                       ItemStatusEvent.from_record)
