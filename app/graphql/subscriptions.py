"""Subscriptions over the durable event log (DESIGN §5; see app.events.service).

Without an id a subscription receives every change of the caller's product; the
creation of a job or item counts as its first change (`from` is null).  The `job`
and `item` fields hold the entity as it is when the event is delivered.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

import strawberry
from strawberry.types import Info

from app.auth.service import Permission
from app.errors import BadUserInputError
from app.events.service import ITEM_STATUS_EVENTS, JOB_STAGE_EVENTS, filter_for
from app.fleet import repository as fleet_repository
from app.fleet.models import JobStage as JobStageModel
from app.graphql.context import Context
from app.graphql.ids import parse_id
from app.graphql.types import Item, ItemStatusEvent, Job, JobStageEvent
from app.tracker import repository as tracker_repository
from app.tracker.models import ItemStatus as ItemStatusModel


def _entity_filter(field: str, value: strawberry.ID | None) -> int | None:
    if value is None:
        return None
    ident = parse_id(value)
    if ident is None:
        raise BadUserInputError(field, "not a valid id")
    return ident


@strawberry.type
class Subscription:
    @strawberry.subscription
    async def job_stage_changed(
        self, info: Info[Context, None], job_id: strawberry.ID | None = None,
        after: str | None = None,
    ) -> AsyncGenerator[JobStageEvent, None]:
        principal = info.context.require(Permission.READ)
        event_filter = filter_for(JOB_STAGE_EVENTS, _entity_filter("jobId", job_id))
        services = info.context.services
        stream = services.streams.stream(principal.product_id, event_filter, after)
        async with aclosing(stream):  # leave the hub as soon as the client goes
            async for record in stream:
                async with services.db.read() as session:
                    row = await fleet_repository.get_job(
                        session, principal.product_id, record.entity_id
                    )
                yield JobStageEvent(
                    cursor=record.cursor,
                    job_id=strawberry.ID(str(record.entity_id)),
                    from_=JobStageModel(record.from_state) if record.from_state else None,
                    to=JobStageModel(record.to_state or ""),
                    at=record.created_at,
                    job=Job.from_model(row) if row is not None else None,
                )

    @strawberry.subscription
    async def item_status_changed(
        self, info: Info[Context, None], item_id: strawberry.ID | None = None,
        after: str | None = None,
    ) -> AsyncGenerator[ItemStatusEvent, None]:
        principal = info.context.require(Permission.READ)
        event_filter = filter_for(ITEM_STATUS_EVENTS, _entity_filter("itemId", item_id))
        services = info.context.services
        stream = services.streams.stream(principal.product_id, event_filter, after)
        async with aclosing(stream):  # leave the hub as soon as the client goes
            async for record in stream:
                async with services.db.read() as session:
                    row = await tracker_repository.get_item(
                        session, principal.product_id, record.entity_id
                    )
                yield ItemStatusEvent(
                    cursor=record.cursor,
                    item_id=strawberry.ID(str(record.entity_id)),
                    from_=ItemStatusModel(record.from_state) if record.from_state else None,
                    to=ItemStatusModel(record.to_state or ""),
                    at=record.created_at,
                    item=Item.from_model(row) if row is not None else None,
                )
