"""GraphQL object types, built from ORM rows with `from_model()` (DESIGN §6).

Every type, field, argument and enum value carries a description (GraphiQL's docs
pane and the SDL read them; tests/api/test_schema_docs.py fails on a missing one).
Lists are Relay connections: `nodes`, `edges { cursor node }` and `pageInfo`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

import strawberry
from strawberry.types import Info

from app.auth.models import Role
from app.bridge.service import EchoResult
from app.events import repository as event_repository
from app.events.outbox import encode_event_cursor
from app.fleet.models import Job as JobModel
from app.fleet.models import JobStage, Priority
from app.fleet.service import JOB_CURSOR, SubmitOutcome
from app.graphql import enums as _enums  # noqa: F401  (registers the GraphQL enums)
from app.graphql.context import Context
from app.limits import page_size
from app.pagination import Page, decode_cursor
from app.tracker.models import Comment as CommentModel
from app.tracker.models import CommentKind, ItemStatus
from app.tracker.models import Item as ItemModel
from app.tracker.service import COMMENT_CURSOR

T = TypeVar("T")

First = Annotated[
    int | None,
    strawberry.argument(description="How many nodes to return (1 to 200; default 50)."),
]
After = Annotated[
    str | None,
    strawberry.argument(
        description="Return the nodes after this cursor (an edge's `cursor`, or "
        "`pageInfo.endCursor` of the previous page)."
    ),
]


@strawberry.type(description="Where a page stands in its list (Relay's PageInfo).")
class PageInfo:
    start_cursor: str | None = strawberry.field(
        description="Cursor of the page's first node; null when the page is empty."
    )
    end_cursor: str | None = strawberry.field(
        description="Cursor of the page's last node; null when the page is empty. "
        "Pass it as `after` to read the next page."
    )
    has_next_page: bool = strawberry.field(description="True when more nodes follow this page.")
    has_previous_page: bool = strawberry.field(
        description="True when the page was read after a cursor (nodes come before it)."
    )


@strawberry.type(description="One node of a page with its cursor (Relay's edge).")
class Edge(Generic[T]):
    cursor: str = strawberry.field(
        description="Opaque cursor of this node: pass it as `after` to read what follows."
    )
    node: T = strawberry.field(description="The node.")


@strawberry.type(
    description="A page of a list, oldest first, in Relay's connection shape; `nodes` "
    "holds the same nodes as `edges` without their cursors."
)
class Connection(Generic[T]):
    nodes: list[T] = strawberry.field(description="The page's nodes, in order.")
    edges: list[Edge[T]] = strawberry.field(description="The page's nodes with their cursors.")
    page_info: PageInfo = strawberry.field(description="Where the page stands in the list.")


def connection_of(page: Page[Any], nodes: list[T]) -> Connection[T]:
    """The connection of `page`; `nodes` are its GraphQL objects, in the page's order."""
    return Connection(
        nodes=nodes,
        edges=[Edge(cursor=cursor, node=node) for cursor, node in zip(page.cursors, nodes,
                                                                       strict=True)],
        page_info=PageInfo(
            start_cursor=page.start_cursor, end_cursor=page.end_cursor,
            has_next_page=page.has_next_page, has_previous_page=page.has_previous_page,
        ),
    )


@strawberry.type(description="Who is calling: the product and role of the bearer token.")
class Viewer:
    product_id: str = strawberry.field(description="The product every read and write is scoped to.")
    role: Role = strawberry.field(description="What the token may do.")

    @strawberry.field(
        description="Cursor of the product's latest event: pass it as `after` to a "
        "subscription to receive every change from this moment on."
    )
    async def event_cursor(self, info: Info[Context, None]) -> str | None:
        # Read only when selected (`{ viewer { role } }` reads nothing), through the
        # query's one snapshot (app.graphql.snapshot).  Before the product's first
        # event this is the cursor of the start, so a subscriber that passes it
        # misses nothing made after this read.
        async with info.context.read() as session:
            last = await event_repository.last_seq(session, self.product_id)
        return encode_event_cursor(last)


@strawberry.type(description="A comment on a tracker item.")
class Comment:
    id: strawberry.ID = strawberry.field(description="The comment's id.")
    item_id: strawberry.ID = strawberry.field(description="Id of the item it belongs to.")
    body: str = strawberry.field(description="The text (Markdown).")
    author: str = strawberry.field(
        description="Name of the token that wrote it, or `fleetbridge` for SYSTEM comments."
    )
    kind: CommentKind = strawberry.field(description="Whether a person or fleetbridge wrote it.")
    created_at: datetime = strawberry.field(description="When it was written (UTC).")

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


@strawberry.type(description="A tracker item (an issue) of the caller's product.")
class Item:
    id: strawberry.ID = strawberry.field(description="The item's id.")
    title: str = strawberry.field(description="One-line summary.")
    description: str = strawberry.field(description="The full text (Markdown); may be empty.")
    status: ItemStatus = strawberry.field(description="Where the item stands.")
    labels: list[str] = strawberry.field(description="Labels, in the order they were given.")
    created_at: datetime = strawberry.field(description="When it was created (UTC).")
    updated_at: datetime = strawberry.field(description="When it last changed (UTC).")
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

    @strawberry.field(description="The item's comments, oldest first.")
    async def comments(
        self, info: Info[Context, None], first: First = 50, after: After = None
    ) -> Connection[Comment]:
        decode_cursor(COMMENT_CURSOR, after)  # a bad cursor fails this field alone
        page = await info.context.loaders.comments.load((self.row_id, page_size(first), after))
        return connection_of(page, [Comment.from_model(c) for c in page.nodes])

    @strawberry.field(description="The jobs made from this item, oldest first.")
    async def jobs(
        self, info: Info[Context, None], first: First = 50, after: After = None
    ) -> Connection[Job]:
        """The jobs linked to this item, oldest first, a page at a time."""
        decode_cursor(JOB_CURSOR, after)  # a bad cursor fails this field alone
        page = await info.context.loaders.jobs_of_item.load((self.row_id, page_size(first), after))
        return connection_of(page, [Job.from_model(row) for row in page.nodes])


@strawberry.type(description="A worker's hold on a job (DESIGN §4).")
class Lease:
    worker_id: str = strawberry.field(description="The worker that holds the job.")
    fence: int = strawberry.field(
        description="Fencing token: pass it to `heartbeat` and `transitionJob`; a newer "
        "lease raises it, so a stale holder's calls are refused with CONFLICT."
    )
    expires_at: datetime = strawberry.field(
        description="When the lease lapses unless renewed with `heartbeat` (UTC)."
    )


@strawberry.type(
    description="A job's totals over all its attempts. A count beyond GraphQL's 32-bit "
    "Int reads as null."
)
class JobMetrics:
    """A job's totals.  GraphQL `Int` has 32 bits: a total beyond it (over two
    billion tokens, or a job that ran for more than 24 days) reads as null rather
    than failing the whole query."""

    cost_usd: float | None = strawberry.field(description="Cost reported so far, in USD.")
    tokens_in: int | None = strawberry.field(description="Input tokens reported so far.")
    tokens_out: int | None = strawberry.field(description="Output tokens reported so far.")
    duration_ms: int | None = strawberry.field(
        description="Milliseconds from start to finish; null until the job has finished."
    )


GRAPHQL_INT_MAX = 2**31 - 1


def _graphql_int(value: int | None) -> int | None:
    return value if value is not None and 0 <= value <= GRAPHQL_INT_MAX else None


@strawberry.type(description="A unit of work for the fleet of coding agents.")
class Job:
    id: strawberry.ID = strawberry.field(description="The job's id.")
    title: str = strawberry.field(description="One-line summary.")
    body_md: str = strawberry.field(description="What to do (Markdown), as the agent reads it.")
    kind: str = strawberry.field(description="Kind of work (free text; default `code`).")
    stage: JobStage = strawberry.field(description="Where the job stands.")
    priority: Priority = strawberry.field(description="How urgent it is.")
    capabilities: list[str] = strawberry.field(
        description="Capabilities a worker must all have to claim it."
    )
    engine_class: str | None = strawberry.field(
        description="Engine class a worker must offer to claim it; null for any."
    )
    profile: str | None = strawberry.field(
        description="Profile a worker must offer to claim it; null for any."
    )
    budget: float | None = strawberry.field(description="Spending limit in USD; null for none.")
    attempts: int = strawberry.field(description="Attempts started so far (claims).")
    max_attempts: int = strawberry.field(
        description="Attempts allowed before a retryable failure becomes final."
    )
    tracker_item_id: strawberry.ID | None = strawberry.field(
        description="Id of the tracker item it was made from; null for a free-standing job."
    )
    idempotency_key: str | None = strawberry.field(
        description="The client's key: a second submit with it answers this job."
    )
    lease: Lease | None = strawberry.field(
        description="The current lease while a worker holds the job; null otherwise."
    )
    metrics: JobMetrics = strawberry.field(description="Cost, tokens and duration so far.")
    last_echoed_status: ItemStatus | None = strawberry.field(
        description="The item status last written back onto its tracker item; null before."
    )
    not_before: datetime | None = strawberry.field(
        description="A queued job is not claimed before this time (retry backoff; UTC)."
    )
    failure_reason: str | None = strawberry.field(
        description="Why the last attempt failed or the job was cancelled."
    )
    created_at: datetime = strawberry.field(description="When it was submitted (UTC).")
    updated_at: datetime = strawberry.field(description="When it last changed (UTC).")
    started_at: datetime | None = strawberry.field(
        description="When its current or last attempt started running (UTC)."
    )
    finished_at: datetime | None = strawberry.field(
        description="When it reached a final stage (UTC)."
    )
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

    @strawberry.field(description="The tracker item it was made from, if any.")
    async def item(self, info: Info[Context, None]) -> Item | None:
        if self.item_row_id is None:
            return None
        row = await info.context.loaders.item.load(self.item_row_id)
        return Item.from_model(row) if row is not None else None


@strawberry.type(description="The answer to `submitJob` and `ingestItemAsJob`.")
class SubmitJobPayload:
    job: Job = strawberry.field(description="The job created, or the existing one.")
    outcome: SubmitOutcome = strawberry.field(description="Whether a job was created.")


@strawberry.type(description="The answer to `echoJobToItem`.")
class EchoPayload:
    echoed: ItemStatus | None = strawberry.field(
        description="The status written onto the item; null when nothing was written."
    )
    error: str | None = strawberry.field(
        description="Why the echo failed (its kind, not internal details); null on success."
    )
    item: Item | None = strawberry.field(description="The item as the echo left it.")

    @classmethod
    def from_result(cls, result: EchoResult) -> EchoPayload:
        return cls(
            echoed=result.echoed,
            error=result.error,
            item=Item.from_model(result.item) if result.item is not None else None,
        )


@strawberry.type(description="The answer to `claimNextJob`.")
class ClaimPayload:
    job: Job | None = strawberry.field(
        description="The job now held by the worker; null when none is eligible."
    )
    lease: Lease | None = strawberry.field(
        description="The worker's lease on it; null when no job was claimed."
    )
