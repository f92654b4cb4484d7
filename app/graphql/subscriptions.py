"""Subscriptions over the durable event log (DESIGN §5; see app.events.service).

Without an id a subscription receives every change of the caller's product; the
creation of a job or item counts as its first change (`from` is null).  The `job`
and `item` fields hold the entity as it is when the event is delivered.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.types import Info

from app.auth.service import Permission
from app.errors import BadUserInputError
from app.events.models import EventType
from app.events.outbox import EventRecord
from app.events.service import ITEM_STATUS_EVENTS, JOB_STAGE_EVENTS, filter_for
from app.fleet import repository as fleet_repository
from app.graphql.context import Context
from app.graphql.ids import parse_id
from app.graphql.types import ItemStatusEvent, JobStageEvent
from app.tracker import repository as tracker_repository

Row = TypeVar("Row")


def _entity_filter(field: str, value: strawberry.ID | None) -> int | None:
    if value is None:
        return None
    ident = parse_id(value)
    if ident is None:
        raise BadUserInputError(field, "not a valid id")
    return ident


async def _changes(
    info: Info[Context, None],
    types: frozenset[EventType],
    id_field: str,
    entity_id: strawberry.ID | None,
    after: str | None,
    load: Callable[[AsyncSession, str, int], Awaitable[Row | None]],
) -> AsyncGenerator[tuple[EventRecord, Row | None], None]:
    """The caller's product's events of `types` (of one entity, if given), each with
    the entity as it is now."""
    principal = info.context.require(Permission.READ)
    event_filter = filter_for(types, _entity_filter(id_field, entity_id))
    services = info.context.services
    stream = services.streams.stream(principal.product_id, event_filter, after)
    async with aclosing(stream):  # leave the hub as soon as the client goes
        async for record in stream:
            async with services.db.read() as session:
                row = await load(session, principal.product_id, record.entity_id)
            yield record, row


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def job_stage_changed(
        self, info: Info[Context, None], job_id: strawberry.ID | None = None,
        after: str | None = None,
    ) -> AsyncGenerator[JobStageEvent, None]:
        changes = _changes(info, JOB_STAGE_EVENTS, "jobId", job_id, after, fleet_repository.get_job)
        async with aclosing(changes):
            async for record, job in changes:
                yield JobStageEvent.from_record(record, job)

    @strawberry.subscription
    async def item_status_changed(
        self, info: Info[Context, None], item_id: strawberry.ID | None = None,
        after: str | None = None,
    ) -> AsyncGenerator[ItemStatusEvent, None]:
        changes = _changes(
            info, ITEM_STATUS_EVENTS, "itemId", item_id, after, tracker_repository.get_item
        )
        async with aclosing(changes):
            async for record, item in changes:
                yield ItemStatusEvent.from_record(record, item)
