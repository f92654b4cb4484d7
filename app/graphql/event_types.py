"""GraphQL types of the events a subscription delivers (DESIGN §5, §6), built from
an event record and the entity as it is at delivery (`from_record`)."""

from __future__ import annotations

from datetime import datetime

import strawberry

from app.events.outbox import EventRecord
from app.fleet.models import Job as JobModel
from app.fleet.models import JobStage
from app.graphql.types import Item, Job
from app.tracker.models import Item as ItemModel
from app.tracker.models import ItemStatus


@strawberry.type(description="A job changed stage (or was created).")
class JobStageEvent:
    cursor: str = strawberry.field(
        description="The event's cursor: pass it as `after` to resume after this event."
    )
    job_id: strawberry.ID = strawberry.field(description="Id of the job.")
    from_: JobStage | None = strawberry.field(
        name="from", description="The stage it left; null when the job was created."
    )
    to: JobStage = strawberry.field(description="The stage it reached.")
    at: datetime = strawberry.field(description="When the change was committed (UTC).")
    job: Job | None = strawberry.field(
        description="The job as it is when the event is delivered."
    )

    @classmethod
    def from_record(cls, record: EventRecord, job: JobModel | None) -> JobStageEvent:
        assert record.to_state is not None  # a job event always names the stage reached
        return cls(
            cursor=record.cursor,
            job_id=strawberry.ID(str(record.entity_id)),
            from_=JobStage(record.from_state) if record.from_state else None,
            to=JobStage(record.to_state),
            at=record.created_at,
            job=Job.from_model(job) if job is not None else None,
        )


@strawberry.type(description="A tracker item changed status (or was created).")
class ItemStatusEvent:
    cursor: str = strawberry.field(
        description="The event's cursor: pass it as `after` to resume after this event."
    )
    item_id: strawberry.ID = strawberry.field(description="Id of the item.")
    from_: ItemStatus | None = strawberry.field(
        name="from", description="The status it left; null when the item was created."
    )
    to: ItemStatus = strawberry.field(description="The status it reached.")
    at: datetime = strawberry.field(description="When the change was committed (UTC).")
    item: Item | None = strawberry.field(
        description="The item as it is when the event is delivered."
    )

    @classmethod
    def from_record(cls, record: EventRecord, item: ItemModel | None) -> ItemStatusEvent:
        assert record.to_state is not None  # an item event always names the status reached
        return cls(
            cursor=record.cursor,
            item_id=strawberry.ID(str(record.entity_id)),
            from_=ItemStatus(record.from_state) if record.from_state else None,
            to=ItemStatus(record.to_state),
            at=record.created_at,
            item=Item.from_model(item) if item is not None else None,
        )
