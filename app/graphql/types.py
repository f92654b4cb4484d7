"""GraphQL object types, built from ORM rows with `from_model()`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

import strawberry
from strawberry.types import Info

from app.auth.models import Role
from app.bridge.service import EchoResult
from app.events.outbox import EventRecord
from app.fleet.models import Job as JobModel
from app.fleet.models import JobStage, Priority
from app.fleet.service import JOB_CURSOR, SubmitOutcome
from app.graphql.context import Context
from app.limits import page_size
from app.pagination import Page, decode_cursor
from app.tracker.models import Comment as CommentModel
from app.tracker.models import CommentKind, ItemStatus
from app.tracker.models import Item as ItemModel
from app.tracker.service import COMMENT_CURSOR

# The domain enums are the GraphQL enums (same names, same values).
for _enum in (ItemStatus, CommentKind, JobStage, Priority, SubmitOutcome, Role):
    strawberry.enum(_enum)

T = TypeVar("T")


@strawberry.type
class PageInfo:
    end_cursor: str | None
    has_next_page: bool


@strawberry.type
class Connection(Generic[T]):
    nodes: list[T]
    page_info: PageInfo


def connection_of(page: Page[Any], nodes: list[T]) -> Connection[T]:
    return Connection(
        nodes=nodes,
        page_info=PageInfo(end_cursor=page.end_cursor, has_next_page=page.has_next_page),
    )


@strawberry.type
class Viewer:
    product_id: str
    role: Role
    event_cursor: str | None = strawberry.field(
        description="Cursor of the product's latest event: pass it as `after` to a "
        "subscription to receive every change from this moment on."
    )


@strawberry.type
class Comment:
    id: strawberry.ID
    item_id: strawberry.ID
    body: str
    author: str
    kind: CommentKind
    created_at: datetime

    @classmethod
    def from_model(cls, comment: CommentModel) -> Comment:
        return cls(
            id=strawberry.ID(str(comment.id)),
            item_id=strawberry.ID(str(comment.item_id)),
            body=comment.body,
            author=comment.author,
            kind=comment.kind,
            created_at=comment.created_at,
        )


@strawberry.type
class Item:
    id: strawberry.ID
    title: str
    description: str
    status: ItemStatus
    labels: list[str]
    created_at: datetime
    updated_at: datetime
    row_id: strawberry.Private[int]

    @classmethod
    def from_model(cls, item: ItemModel) -> Item:
        return cls(
            id=strawberry.ID(str(item.id)),
            title=item.title,
            description=item.description,
            status=item.status,
            labels=list(item.labels),
            created_at=item.created_at,
            updated_at=item.updated_at,
            row_id=item.id,
        )

    @strawberry.field
    async def comments(
        self, info: Info[Context, None], first: int | None = 50, after: str | None = None
    ) -> Connection[Comment]:
        decode_cursor(COMMENT_CURSOR, after)  # a bad cursor fails this field alone
        page = await info.context.loaders.comments.load((self.row_id, page_size(first), after))
        return connection_of(page, [Comment.from_model(c) for c in page.nodes])

    @strawberry.field
    async def jobs(
        self, info: Info[Context, None], first: int | None = 50, after: str | None = None
    ) -> Connection[Job]:
        """The jobs linked to this item, oldest first, a page at a time."""
        decode_cursor(JOB_CURSOR, after)  # a bad cursor fails this field alone
        page = await info.context.loaders.jobs_of_item.load((self.row_id, page_size(first), after))
        return connection_of(page, [Job.from_model(row) for row in page.nodes])


@strawberry.type
class Lease:
    worker_id: str
    fence: int
    expires_at: datetime


@strawberry.type
class JobMetrics:
    """A job's totals.  GraphQL `Int` has 32 bits: a total beyond it (over two
    billion tokens, or a job that ran for more than 24 days) reads as null rather
    than failing the whole query."""

    cost_usd: float | None
    tokens_in: int | None
    tokens_out: int | None
    duration_ms: int | None


GRAPHQL_INT_MAX = 2**31 - 1


def _graphql_int(value: int | None) -> int | None:
    return value if value is not None and 0 <= value <= GRAPHQL_INT_MAX else None


@strawberry.type
class Job:
    id: strawberry.ID
    title: str
    body_md: str
    kind: str
    stage: JobStage
    priority: Priority
    capabilities: list[str]
    engine_class: str | None
    profile: str | None
    budget: float | None
    attempts: int
    max_attempts: int
    tracker_item_id: strawberry.ID | None
    idempotency_key: str | None
    lease: Lease | None
    metrics: JobMetrics
    last_echoed_status: ItemStatus | None
    not_before: datetime | None
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    item_row_id: strawberry.Private[int | None]

    @classmethod
    def from_model(cls, job: JobModel) -> Job:
        lease = None
        if job.lease_worker_id is not None and job.lease_expires_at is not None:
            lease = Lease(
                worker_id=job.lease_worker_id, fence=job.lease_fence,
                expires_at=job.lease_expires_at,
            )
        duration_ms = None
        if job.started_at is not None and job.finished_at is not None:
            duration_ms = int((job.finished_at - job.started_at).total_seconds() * 1000)
        return cls(
            id=strawberry.ID(str(job.id)),
            title=job.title,
            body_md=job.body_md,
            kind=job.kind,
            stage=job.stage,
            priority=job.priority,
            capabilities=list(job.capabilities),
            engine_class=job.engine_class,
            profile=job.profile,
            budget=job.budget,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            tracker_item_id=(
                strawberry.ID(str(job.tracker_item_id)) if job.tracker_item_id else None
            ),
            idempotency_key=job.idempotency_key,
            lease=lease,
            metrics=JobMetrics(
                cost_usd=job.cost_usd,
                tokens_in=_graphql_int(job.tokens_in),
                tokens_out=_graphql_int(job.tokens_out),
                duration_ms=_graphql_int(duration_ms),
            ),
            last_echoed_status=job.last_echoed_status,
            not_before=job.not_before,
            failure_reason=job.failure_reason,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            item_row_id=job.tracker_item_id,
        )

    @strawberry.field
    async def item(self, info: Info[Context, None]) -> Item | None:
        if self.item_row_id is None:
            return None
        row = await info.context.loaders.item.load(self.item_row_id)
        return Item.from_model(row) if row is not None else None


@strawberry.type
class SubmitJobPayload:
    job: Job
    outcome: SubmitOutcome


@strawberry.type
class EchoPayload:
    echoed: ItemStatus | None
    error: str | None
    item: Item | None

    @classmethod
    def from_result(cls, result: EchoResult) -> EchoPayload:
        return cls(
            echoed=result.echoed,
            error=result.error,
            item=Item.from_model(result.item) if result.item is not None else None,
        )


@strawberry.type
class ClaimPayload:
    job: Job | None
    lease: Lease | None


@strawberry.type
class JobStageEvent:
    cursor: str
    job_id: strawberry.ID
    from_: JobStage | None = strawberry.field(name="from")
    to: JobStage
    at: datetime
    job: Job | None

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


@strawberry.type
class ItemStatusEvent:
    cursor: str
    item_id: strawberry.ID
    from_: ItemStatus | None = strawberry.field(name="from")
    to: ItemStatus
    at: datetime
    item: Item | None

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
